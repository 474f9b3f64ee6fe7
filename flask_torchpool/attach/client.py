"""Attaching to a pool server: what a web process runs in ``TORCHPOOL_MODE = "attach"`` (or ``"auto"``).

:class:`PoolConnection` is this process's one connection to the pool server on a Unix socket, shared by
every model and every thread. A call validates its arguments in the calling thread, writes its tensors
into this process's own arena (Note [Attached arenas] in :mod:`.server`) and sends a small header; one
reader thread resolves the futures as results arrive. :class:`RemotePool` is the per-model face of it, a
:class:`~flask_torchpool.backend.Backend`, so views, health and metrics work unchanged.

Failure handling: when the server goes away, every pending call fails at once with
:class:`~flask_torchpool.PoolUnavailableError` (503 + ``Retry-After``), and the next call reconnects
(with a fresh arena). While no server is reachable calls fail fast the same way, except while a server
is starting (its lock is held, its socket not yet listening): then a call waits for it, within its own
deadline.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from .. import codec, errors, messages, shm
from ..channel import Channel
from ..config import PoolConfig
from ..errors import PoolUnavailableError, WireError, from_wire
from ..exits import process_gone, process_stopped
from ..streaming import Sink, Stream, check_method, stream_ended
from . import affinity
from .lanes import ClientLanes
from .rendezvous import (
    ServerSpawner,
    check_same_user,
    close_at_exit,
    server_running,
    shutdown_socket,
    stopped_message,
    wait_for_hello,
)

log = logging.getLogger(__name__)

_ids = itertools.count(1)
#: How long to wait between connection attempts while a server is starting.
_CONNECT_BACKOFF = (0.01, 0.25)
#: How often the reader looks at a server that sends nothing, and how long the server must stay stopped
#: (SIGSTOP) before its calls fail: a stopped server would otherwise be noticed only by call deadlines.
_WATCH_INTERVAL = 0.5
_STOPPED_GRACE = 1.0


@dataclass
class _Pending:
    future: Future[Any]
    blocks: list[int]
    sink: Sink | None = None  # a stream's chunks
    numpy: bool = False       # the call passed numpy arrays: its outputs are read as numpy arrays


@dataclass(eq=False)
class _Link:
    """One connection to a server, with the arena made for it (a reconnect makes both afresh)."""

    channel: Channel
    arena: shm.Arena
    inputs: shm.Allocator
    releases: shm.ReleaseQueue
    welcome: messages.Welcome
    server_pid: int  # the kernel's word for it (SO_PEERCRED), not the Welcome's


def _missing_hint(auto: bool, spawner: ServerSpawner | None) -> str:
    """What to do about a server that is not there: start one, or (auto mode) where its error is."""
    if not auto:
        return "start it with `flask torchpool serve` (or use TORCHPOOL_MODE='auto' under gunicorn)"
    process = spawner.process if spawner is not None else None
    code = process.poll() if process is not None else None
    if process is not None and code:
        return (f"the server this web process started (pid {process.pid}) exited with code {code} before "
                "it served: the web server's log has its error (a model that fails to load, say); "
                "TORCHPOOL_MODE 'auto' starts it again")
    return ("TORCHPOOL_MODE 'auto' starts it; when none comes up, the web server's log has the server's "
            "error (a model that fails to load, say)")


class PoolConnection:
    """This web process's connection to the pool server at *path*. Thread-safe; reconnects on demand."""

    def __init__(self, path: str, arena_bytes: int, retry_after: int = 1, web_affinity: str = "off") -> None:
        self.path = path
        self.arena_bytes = arena_bytes
        self.retry_after = retry_after
        self.web_affinity = web_affinity  # TORCHPOOL_WEB_AFFINITY (Note [Web affinity])
        self._lock = threading.Lock()        # connecting, and the pending table
        self._link: _Link | None = None
        self._pending: dict[int, _Pending] = {}
        self._statuses: dict[int, Future[Any]] = {}
        self._pid = os.getpid()
        self.spawner: ServerSpawner | None = None
        #: Called (auto mode) when no server holds the socket's lock: starts one.
        self.on_missing: Callable[[], None] | None = None
        self.closed = False
        self._last_welcome: messages.Welcome | None = None
        self._last_pid: int | None = None
        self._reader: threading.Thread | None = None
        self.lanes = ClientLanes(self._report, retry_after, self._server_gone)   # Note [Lanes]
        close_at_exit(self)

    # --- connecting -------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link is not None and self._pid == os.getpid()

    @property
    def welcome(self) -> messages.Welcome | None:
        """What the server said when this process last attached (kept after the connection ends, so
        that the models' placements stay known)."""
        return self._last_welcome

    def connect(self, wait: float = 0.0) -> messages.Welcome:
        """Connect if not connected. While a server is starting, wait for it up to *wait* seconds.
        Raises :class:`PoolUnavailableError` when no server answers."""
        deadline = time.monotonic() + wait
        delay = _CONNECT_BACKOFF[0]
        while True:
            with self._lock:
                if self.closed:
                    raise errors.PoolClosedError("this web process detached from the pool server "
                                                 "(shutdown); call TorchPool.start() to attach again",
                                                 retry_after=self.retry_after)
                if self._pid != os.getpid():
                    self._forget_parent()
                if self._link is not None:
                    return self._link.welcome
                try:
                    return self._connect_locked().welcome
                except (FileNotFoundError, ConnectionRefusedError) as exc:
                    reason = exc
                except OSError as exc:
                    raise self._unavailable(f"cannot attach: {exc.strerror or exc}") from None
            starting = self.starting()
            if not starting and self.on_missing is not None:
                self.on_missing()
                starting = self.starting()
            remaining = deadline - time.monotonic()
            if not starting or remaining <= 0:
                what = ("is still starting" if starting else
                        f"is not running ({reason.strerror or reason})")
                hint = _missing_hint(self.on_missing is not None, self.spawner)
                raise self._unavailable(f"the pool server at {self.path} {what}; {hint}")
            time.sleep(min(delay, remaining))  # polls a socket that is being set up, with backoff
            delay = min(delay * 2, _CONNECT_BACKOFF[1])

    def starting(self) -> bool:
        """Whether a server for this socket is running or starting (its lock is held)."""
        return server_running(self.path) or (self.spawner is not None and self.spawner.alive())

    def _connect_locked(self) -> _Link:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        try:
            server_pid = check_same_user(sock, f"the process serving {self.path}")  # our user only
            if process_stopped(server_pid):  # it would never answer the hello
                raise OSError(errno.EAGAIN, stopped_message(server_pid))
        except OSError:
            sock.close()
            raise
        channel = Channel(Connection(sock.detach()), messages.ATTACH_PROTOCOL)
        fd = shm.create_memfd(self.arena_bytes, "torchpool-client")
        offers: list[tuple[messages.LaneOffer, list[int]]] = []
        try:
            arena = shm.Arena(fd, self.arena_bytes)
            channel.send(messages.Hello(messages.PROTOCOL_VERSION, os.getpid(), self.arena_bytes), (fd,))
            wait_for_hello(channel, server_pid, _WATCH_INTERVAL)
            welcome, fds = channel.recv()
            while isinstance(welcome, messages.LaneOffer):  # Note [Lanes]: they come first
                offers.append((welcome, fds))
                welcome, fds = channel.recv()
            for extra in fds:
                os.close(extra)
            if not isinstance(welcome, messages.Welcome):
                raise OSError(errno.EPROTO, f"expected a Welcome, got {type(welcome).__name__}")
        except (EOFError, OSError) as exc:
            channel.close()
            for _, offer_fds in offers:
                for extra in offer_fds:
                    os.close(extra)
            if isinstance(exc, OSError) and exc.errno in (errno.EAGAIN, errno.ETIMEDOUT):
                raise
            raise OSError(getattr(exc, "errno", None) or errno.ECONNRESET,
                          f"the pool server closed the connection: {exc}") from None
        finally:
            os.close(fd)
        link = self._link = _Link(channel, arena, shm.Allocator(*arena.inputs), shm.ReleaseQueue(), welcome,
                                  server_pid)
        self._last_welcome = welcome
        self._last_pid = server_pid
        for offer, offer_fds in offers:
            self.lanes.add(offer, offer_fds)
        if self.web_affinity == "worker":  # Note [Web affinity]
            pinning = affinity.Pinning.start(welcome.models, self.lanes.prefer)
            self.lanes.observer = None if pinning is None else pinning.observe
        self._reader = threading.Thread(target=self._read_loop, args=(link,), name="torchpool-attach-reader",
                         daemon=True)
        self._reader.start()
        log.info("torchpool: attached to the pool server at %s (pid %d)", self.path, server_pid)
        return link

    def _forget_parent(self) -> None:
        # A forked child (gunicorn --preload) inherited its parent's connection: not ours to use.
        self._lock = threading.Lock()
        self._link = None
        self._pending.clear()
        self._statuses.clear()
        self.spawner = None
        self.lanes = ClientLanes(self._report, self.retry_after, self._server_gone)  # not the parent's
        self._pid = os.getpid()

    def _unavailable(self, message: str) -> PoolUnavailableError:
        return PoolUnavailableError(message, retry_after=self.retry_after, socket=self.path)

    def close(self, drain_timeout: float = 0.0) -> None:
        """Detach: wait up to *drain_timeout* for pending calls, then close. The server keeps running."""
        deadline = time.monotonic() + drain_timeout
        with self._lock:
            self.closed = True
            pending = [p.future for p in self._pending.values()]
        for future in pending + self.lanes.futures():
            with contextlib.suppress(Exception):
                future.exception(max(0.0, deadline - time.monotonic()))
        link = self._link
        if self._pid == os.getpid():
            self.lanes.close(self._unavailable(f"this web process detached from the pool server (shutdown); "
                                               f"{self.path}"))
        if link is not None and self._pid == os.getpid():
            self._lost(link, "this web process detached from the pool server (shutdown)")
        self._join_reader()

    def _join_reader(self) -> None:  # before the interpreter finalizes: see rendezvous.close_at_exit
        reader = self._reader
        if reader is not None and reader is not threading.current_thread() and self._pid == os.getpid():
            reader.join(2 * _WATCH_INTERVAL + 1.0)

    # --- calls ------------------------------------------------------------------------------------------

    def submit(self, model: str | None, args: tuple[Any, ...], kwargs: dict[str, Any],
               timeout: float | None, batch: bool, max_input_bytes: int,
               method: str | None = None, waiter: bool = False) -> Future[Any]:
        """Send one call. Cancelling its future tells the server to drop it if it has not started.
        *waiter*: the calling thread calls the future's ``result()`` next (Note [Claimed lanes])."""
        return self._start(model, args, kwargs, timeout, batch, max_input_bytes, method, None,
                           waiter=waiter)[0]

    def _start(self, model: str | None, args: tuple[Any, ...], kwargs: dict[str, Any],
               timeout: float | None, batch: bool, max_input_bytes: int, method: str | None,
               sink: Sink | None, direct: bool = True, waiter: bool = False,
               retried: bool = False) -> tuple[Future[Any], int]:
        """Send one call (a stream with *sink*): its future, and its id. A plain call goes on a lane
        when this process holds one for the model (Note [Lanes]), else through the server (*retried*:
        a lane call sent again after its worker died running it)."""
        codec.check_timeout(timeout)
        check_method(method)
        skel_args, skel_kwargs, tensors, numpy = codec.flatten_call(args, kwargs, max_input_bytes,
                                                                    arrays=True)
        self.connect(wait=timeout if timeout is not None else 60.0)
        link = self._link
        if link is None:
            raise self._unavailable(f"lost the connection to the pool server at {self.path}")
        name = model if model is not None else link.welcome.default_model
        lane = self.lanes.take(name) if direct and sink is None and name is not None else None
        if lane is not None:
            limit = timeout if timeout is not None else link.welcome.models[lane.model]["timeout"]
            deadline = time.monotonic() + limit if limit else 0.0

            def resend(retried: bool = False) -> Future[Any]:  # the lane ended: through the server
                left = None if not deadline else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise errors.InferenceTimeoutError(
                        "the call did not finish within its deadline (its worker ended "
                        f"{'while running' if retried else 'before running'} it)")
                return self._start(model, args, kwargs, left, batch, max_input_bytes, method, None, False,
                                   retried=retried)[0]

            lane_id = next(_ids)
            sent = self.lanes.submit(lane, lane_id, skel_args, skel_kwargs, tensors, deadline, method, resend,
                                     numpy, waiter, link.welcome.models[lane.model].get("retries", 0))
            if sent is not None:
                return sent, lane_id
        placer = shm.Placer(link.arena, link.inputs)
        refs = placer.place_all(tensors)
        call_id = next(_ids)
        future: Future[Any] = Future()
        with self._lock:
            if self._link is not link:  # the server went away while we wrote
                placer.rollback()
                raise self._unavailable(f"lost the connection to the pool server at {self.path}")
            # Kept until the server answers, even once cancelled: it may still read these input blocks.
            self._pending[call_id] = _Pending(future, placer.blocks, sink, numpy)
        try:
            link.channel.send(messages.RemoteCall(call_id, model, skel_args, skel_kwargs, refs, timeout,
                                                  batch, link.releases.drain(), method, sink is not None,
                                                  numpy, retried),
                              tuple(placer.fds))
        except OSError as exc:
            with self._lock:
                self._pending.pop(call_id, None)
            placer.rollback()
            self._lost(link, f"sending to the pool server failed: {exc}")
            raise self._unavailable(f"lost the connection to the pool server at {self.path}: {exc}") \
                from None
        placer.close_fds()
        if sink is None:
            future.add_done_callback(functools.partial(self._cancelled, link, call_id))
        return future, call_id

    def stream(self, model: str | None, args: tuple[Any, ...], kwargs: dict[str, Any],
               timeout: float | None, method: str | None, config: PoolConfig) -> Stream:
        """Start a stream on the server (Note [Streams]; :mod:`.relay` is the server's half)."""
        sink = Sink()
        future, call_id = self._start(model, args, kwargs, timeout, False, config.max_input_bytes, method,
                                      sink)
        link = self._link
        future.add_done_callback(functools.partial(stream_ended, sink))

        def consumed() -> None:
            if link is not None:
                self.tell(link, messages.Credit(call_id, 1, link.releases.drain()))

        def cancel() -> None:
            if link is not None:
                self.tell(link, messages.Cancel(call_id))
                self.tell(link, messages.Credit(call_id, 0, link.releases.drain()))

        limit = config.timeout if timeout is None else timeout
        return Stream(sink, cancel, consumed, None if limit is None else limit + 5.0)

    def _cancelled(self, link: _Link, call_id: int, future: Future[Any]) -> None:
        if future.cancelled():
            self.tell(link, messages.Cancel(call_id))

    def tell(self, link: _Link, msg: Any) -> None:
        """Send a small message to the server; a lost connection fails the calls by itself."""
        try:
            link.channel.send(msg)
        except OSError:
            pass

    @property
    def server_pid(self) -> int | None:
        """The pid of the server this process is attached to, as the kernel reports it."""
        link = self._link
        return link.server_pid if link is not None else None

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The server's status (every model); raises :class:`PoolUnavailableError` without a server."""
        self.connect()
        self.lanes.flush()  # this process's lane calls are counted before the status is taken
        status: dict[str, Any] = self.ask(lambda call_id: messages.StatusRequest(call_id), timeout)
        return status

    def _server_gone(self) -> PoolUnavailableError | None:
        pid = self._last_pid
        if pid is None or not process_gone(pid):
            return None
        return self._unavailable(f"the pool server (pid {pid}) ended (its workers end with it); {self.path}")

    def _report(self, msg: messages.Observed) -> None:
        link = self._link
        if link is not None:
            self.tell(link, msg)

    def ask(self, request: Callable[[int], Any], timeout: float) -> Any:
        """Send the request ``request(id)`` and wait for the server's :class:`~messages.StatusReply` to it
        (its status). Raises :class:`PoolUnavailableError` without a server."""
        self.connect()
        with self._lock:
            link = self._link
            call_id = next(_ids)
            future: Future[Any] = Future()
            self._statuses[call_id] = future
        if link is None:
            raise self._unavailable(f"not attached to the pool server at {self.path}")
        try:
            link.channel.send(request(call_id))
            return future.result(timeout)
        except (OSError, TimeoutError) as exc:
            raise self._unavailable(f"the pool server at {self.path} did not answer: {exc}") from None
        finally:
            with self._lock:
                self._statuses.pop(call_id, None)

    # --- the reader thread ------------------------------------------------------------------------------

    def _read_loop(self, link: _Link) -> None:
        reason = "the pool server closed the connection (it stopped, died or restarted)"
        stopped_since: float | None = None
        while True:
            try:
                if not link.channel.poll(_WATCH_INTERVAL):
                    # Quiet: is the server frozen? Its calls (and status requests) fail now rather
                    # than at their deadlines (or never, without one), and the link is dropped.
                    if not process_stopped(link.server_pid):
                        stopped_since = None
                        continue
                    now = time.monotonic()
                    stopped_since = now if stopped_since is None else stopped_since
                    if now - stopped_since < _STOPPED_GRACE:
                        continue
                    reason = stopped_message(link.server_pid)
                    break
                stopped_since = None
                msg, fds = link.channel.recv()
            except (EOFError, OSError) as exc:
                if isinstance(exc, OSError):
                    reason = f"the connection to the pool server failed: {exc}"
                break
            if isinstance(msg, messages.LaneOffer):
                self.lanes.add(msg, fds)
                continue
            if isinstance(msg, messages.StatusReply):
                with self._lock:
                    waiter = self._statuses.pop(msg.id, None)
                if waiter is not None:
                    waiter.set_result(msg.status)
                continue
            with self._lock:
                chunk = isinstance(msg, messages.StreamChunk)
                pending = self._pending.get(msg.id) if chunk else self._pending.pop(msg.id, None)
            if pending is None:
                for fd in fds:
                    os.close(fd)
                continue
            if chunk:
                self._on_chunk(link, pending, msg, fds)
                continue
            for offset in pending.blocks:
                link.inputs.free(offset)
            if isinstance(msg, messages.Result):
                try:
                    tensors = shm.read_refs(link.arena, msg.refs, fds, on_free=link.releases,
                                            arrays=pending.numpy)
                    _settle(pending.future, codec.unflatten(msg.value, tensors))
                except Exception as exc:  # noqa: BLE001 - a bad result fails its call, not the reader
                    _settle(pending.future, exc=errors.OutputError(f"cannot read the result: {exc}"))
            elif isinstance(msg, messages.RemoteError):
                for fd in fds:
                    os.close(fd)
                _settle(pending.future, exc=from_wire(WireError(*msg[1:])))
            elif isinstance(msg, messages.StreamEnd):
                _settle(pending.future, None)
            del pending
        self._lost(link, reason)
        link.channel.close()  # only here: closing while this thread reads could reuse the descriptor

    def _on_chunk(self, link: _Link, pending: _Pending, msg: messages.StreamChunk, fds: list[int]) -> None:
        try:
            tensors = shm.read_refs(link.arena, msg.refs, fds, on_free=link.releases, arrays=pending.numpy)
            value = codec.unflatten(msg.value, tensors)
        except Exception as exc:  # noqa: BLE001 - a bad chunk fails its stream, not the reader
            if pending.sink is not None:
                pending.sink.end(errors.OutputError(f"cannot read a chunk of the stream: {exc}"))
            return
        if pending.sink is not None:
            pending.sink.put(value)

    def _lost(self, link: _Link, reason: str) -> None:
        with self._lock:
            if self._link is not link:
                return
            self._link = None
            pending, self._pending = self._pending, {}
            statuses, self._statuses = self._statuses, {}
        shutdown_socket(link.channel.fileno())  # the reader sees end-of-file and closes it
        if not self.closed:
            log.warning("torchpool: %s; %d call(s) failed; the next call reconnects", reason, len(pending))
        err = self._unavailable(f"{reason}; {self.path}")
        for p in pending.values():
            _settle(p.future, exc=err)
        for waiter in statuses.values():
            waiter.set_exception(err)


def _settle(future: Future[Any], value: Any = None, exc: BaseException | None = None) -> None:
    """Resolve *future*, unless its caller cancelled it."""
    with contextlib.suppress(InvalidStateError):
        future.set_result(value) if exc is None else future.set_exception(exc)


__all__ = ["PoolConnection"]
