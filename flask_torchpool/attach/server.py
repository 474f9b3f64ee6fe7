"""The pool server: one pool per host that every web process of a pre-fork server attaches to.

``flask torchpool serve`` (or :meth:`TorchPool.serve`) starts the app's model workers in this process and
listens on a Unix socket in a private directory (mode 0700; no TCP; see :mod:`.rendezvous`). Web
processes in ``TORCHPOOL_MODE`` ``"attach"`` or ``"auto"`` connect (see :mod:`.client`)::

    web process (gunicorn worker)          pool server                          model worker
    -----------------------------          -----------                          ------------
    flatten, write tensors into ITS arena
    RemoteCall header --------------------> views of the client's arena
                                            Pool.submit (copies into the
                                            worker's arena, batches across   --> run model
                                            all clients) ...                 <-- outputs
                                            write outputs into the CLIENT's
    Result header <------------------------ arena, send header
    views / copies of its arena

Note [Attached arenas]
~~~~~~~~~~~~~~~~~~~~~~
Each attached web process creates its own memfd arena and hands the descriptor over (``SCM_RIGHTS``)
with its :class:`~flask_torchpool.messages.Hello`. The layout is a worker arena's: the client allocates
its inputs in the first half, the server allocates outputs in the second half. Only the client and the
server map it, so no web process can see another's tensors (the model workers never map client arenas:
the server copies the inputs into the worker's own arena, which it alone shares with that worker). Tensor
data is never pickled on either hop. Every :class:`~flask_torchpool.shm.TensorRef` a client sends is
checked against its arena before it is mapped, and a peer must run as the server's user
(``SO_PEERCRED``).

A client that disconnects (it exited, was recycled by ``max_requests`` or was killed) loses only its own
calls: their results are dropped when they finish, and its arena is unmapped once no call uses it. When
the server stops, every client sees end-of-file at once and fails its calls with
:class:`~flask_torchpool.PoolUnavailableError` (503), then reconnects on its next call.

The server holds its socket's lock (:func:`.rendezvous.take_lock`) for its whole life.

Note [Hostile clients]
~~~~~~~~~~~~~~~~~~~~~~
Any process of the server's user can connect, so the server assumes nothing of what a client sends:
messages are decoded without pickle and checked field by field (Note [The wire format] in
:mod:`flask_torchpool.messages`), every descriptor received must be a sealed memfd (Note [Sealed
segments] in :mod:`flask_torchpool.shm`) and is closed on every path, and each resource a client can
make the server spend has a bound (the module constants below; docs/reliability.rst, "Hostile peers"):
connections, the time a handshake may take, the size of a message and of an arena, the calls a client
may have in flight, and the time a reply may wait for a client that does not read. A client past a
bound is dropped; the others never notice. Logs name a client by the pid the kernel reports for its
socket (``SO_PEERCRED``), not the one it claims. A one-off segment a client sends (a big body's buffer)
is handed on to the worker that runs that client's call (Note [Forwarded segments] in
:mod:`flask_torchpool.shm`): the worker checks its seals again and maps it copy-on-write, as it does a
segment sent on a direct lane.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import queue
import select
import signal
import socket
import threading
from collections.abc import Mapping
from concurrent.futures import CancelledError, Future
from multiprocessing.connection import Connection
from typing import Any

from .. import codec, messages, shm
from ..backend import Backend
from ..channel import Channel
from ..errors import InferenceError, InvalidInputError, TorchPoolError, to_wire
from .affinity import Pairs
from .broker import LaneBroker, record_observed
from .control import answer_request
from .relay import Chunk, End, StreamRelay, read_inputs
from .rendezvous import (
    check_same_user,
    ensure_private_dir,
    exit_now,
    set_send_timeout,
    shutdown_socket,
    take_lock,
)

log = logging.getLogger(__name__)

_STOP = object()

#: Connections (attached or still in their handshake) a server accepts at once; more are closed at once.
MAX_CONNECTIONS = 1024
#: Seconds from accept to a complete hello; a slower client is dropped.
HANDSHAKE_SECONDS = 10.0
#: Size of a hello.
MAX_HELLO_BYTES = 64 * 1024
#: Bytes a call header may have beyond its model's ``TORCHPOOL_MAX_INPUT_BYTES`` (str/bytes arguments
#: count against that key; the rest is the header's own fields).
HEADER_SLACK_BYTES = 1 << 20
#: A client's arena may be at most the largest ``TORCHPOOL_ARENA_BYTES`` of the models served, or this.
MAX_ARENA_BYTES = 1 << 30
#: Calls one client may have taken and not yet been answered; a client past it is dropped.
MAX_PENDING_CALLS = 4096
#: Seconds a reply may wait to be written to a client that does not read; then the client is dropped.
SEND_TIMEOUT = 30.0


# --- the server ----------------------------------------------------------------------------------------


class PoolServer:
    """Serves *pools* (model name -> started :class:`~flask_torchpool.backend.Backend`) on the Unix socket
    *path* to attached web processes. :meth:`start` listens; :meth:`stop` drains and closes."""

    def __init__(self, pools: Mapping[str, Backend], path: str, *, default_model: str | None = None,
                 lock_fd: int | None = None, drain_timeout: float = 30.0) -> None:
        if not pools:
            raise ValueError("a pool server needs at least one pool")
        self.pools = dict(pools)
        self.path = path
        self.default_model = default_model if default_model is not None else (
            next(iter(self.pools)) if len(self.pools) == 1 else None)
        self.drain_timeout = drain_timeout
        self._lock_fd = lock_fd
        self._listener: socket.socket | None = None
        self._clients: set[_Client] = set()
        self._clients_lock = threading.Lock()
        self._connections = 0  # attached or in their handshake; under _clients_lock
        self.pairs = Pairs()  # Note [Web affinity]
        self.max_message_bytes = max(p.config.max_input_bytes for p in self.pools.values()) + \
            HEADER_SLACK_BYTES
        self.max_arena_bytes = max(MAX_ARENA_BYTES, *(p.config.arena_bytes for p in self.pools.values()))
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._accepter: threading.Thread | None = None
        self.lanes = LaneBroker(self)   # Note [Lanes]
        self.lanes.hook()

    def client_list(self) -> list[_Client]:
        with self._clients_lock:
            return list(self._clients)

    @property
    def clients(self) -> int:
        """How many web processes are attached."""
        with self._clients_lock:
            return len(self._clients)

    def start(self) -> None:
        """Take the lock (unless given), bind the socket and accept clients in a thread."""
        if self._lock_fd is None:
            self._lock_fd = take_lock(self.path)
        else:
            ensure_private_dir(self.path)
        # We hold the lock, so a socket file left here is a dead server's.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o077)
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        listener.listen(128)
        self._listener = listener
        self._accepter = threading.Thread(target=self._accept_loop, name="torchpool-server-accept",
                                          daemon=True)
        self._accepter.start()
        log.info("torchpool server (pid %d): serving %s on %s", os.getpid(), ", ".join(self.pools),
                 self.path)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` has finished; True if it has."""
        return self._stopped.wait(timeout)

    def stop(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, let calls in flight finish (up to *drain_timeout*), stop the pools, then
        close every client connection. Idempotent."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            drain = self.drain_timeout if drain_timeout is None else drain_timeout
            listener, self._listener = self._listener, None
            if listener is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
                with contextlib.suppress(OSError):
                    listener.shutdown(socket.SHUT_RDWR)
                listener.close()
            threads = [threading.Thread(target=p.shutdown, kwargs={"wait": True, "drain_timeout": drain})
                       for p in self.pools.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with self._clients_lock:
                clients = list(self._clients)
            for client in clients:
                client.flush(timeout=5.0)
                client.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            self._stopped.set()
            log.info("torchpool server (pid %d): stopped", os.getpid())

    # --- connections ------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._listener is None:
                    return
                log.exception("torchpool server: accept failed")
                self._stopped.wait(0.1)  # out of descriptors (EMFILE): do not spin on it
                continue
            with self._clients_lock:
                full = self._connections >= MAX_CONNECTIONS
                if not full:
                    self._connections += 1
            if full:
                log.warning("torchpool server: refused a connection: %d connections already (the bound)",
                            MAX_CONNECTIONS)
                sock.close()
                continue
            # The handshake runs in the connection's own thread: a client slow to say hello (or one
            # that only probes the socket) must not hold up the others.
            threading.Thread(target=self._serve_connection, args=(sock,), name="torchpool-server-conn",
                             daemon=True).start()

    def _serve_connection(self, sock: socket.socket) -> None:
        try:
            pid = check_same_user(sock, "web process")
        except OSError as exc:
            log.warning("torchpool server: refused a connection: %s", exc)
            sock.close()
            self._disconnected()
            return
        channel = Channel(Connection(sock.detach()), messages.ATTACH_PROTOCOL, MAX_HELLO_BYTES)
        # The whole handshake has one deadline: past it the socket is shut down, so the read in
        # progress ends, however slowly the client trickles its bytes.
        timer = threading.Timer(HANDSHAKE_SECONDS, shutdown_socket, (channel.fileno(),))
        timer.daemon = True
        timer.start()
        client = None
        try:
            client = self._welcome(channel, pid)
        except (OSError, EOFError, ValueError, TorchPoolError) as exc:
            log.info("torchpool server: refused a connection from pid %d: %s", pid,
                     exc or type(exc).__name__)
        except Exception:
            log.exception("torchpool server: the handshake of a connection from pid %d failed", pid)
        finally:
            timer.cancel()
            timer.join()  # the timer must not touch the descriptor once it may be closed and reused
        if client is None:
            channel.close()
            self._disconnected()
            return
        with self._clients_lock:
            stopped = self._stopped.is_set() or self._listener is None
            if not stopped:
                self._clients.add(client)
        if stopped:
            self.pairs.give_back(client)
            client.close()
            client.channel.close()
            self._disconnected()
            return
        client.start()

    def _disconnected(self) -> None:
        with self._clients_lock:
            self._connections -= 1

    def _welcome(self, channel: Channel, pid: int) -> _Client:
        fds: list[int] = []
        try:
            msg, fds = channel.recv()
            if not isinstance(msg, messages.Hello) or len(fds) != 1:
                raise ValueError(f"expected a Hello with one descriptor, got {type(msg).__name__}")
            if msg.version != messages.PROTOCOL_VERSION:
                raise ValueError(f"client pid {pid} speaks protocol {msg.version}, this server "
                                 f"{messages.PROTOCOL_VERSION}: upgrade flask_torchpool on both sides")
            size = shm.check_sealed(fds[0])
            smallest = shm.CONTROL_BYTES + 2 * shm.ALIGN
            if size != msg.arena_bytes or not smallest <= size <= self.max_arena_bytes:
                raise ValueError(f"client pid {pid} sent an arena of {size} bytes, announced "
                                 f"{msg.arena_bytes}; it must be at most {self.max_arena_bytes}")
            arena = shm.Arena(fds[0], size)
        finally:
            for fd in fds:
                os.close(fd)
        channel.max_bytes = self.max_message_bytes
        set_send_timeout(channel.fileno(), SEND_TIMEOUT)
        client = _Client(self, channel, arena, pid)
        self.lanes.offer_all(client)  # before the Welcome: the client has them once attached
        models = self._models()
        name = self.default_model or next(iter(self.pools))
        if models[name]["workers"] and self.lanes.eligible(self.pools[name]):  # Note [Web affinity]
            models[name]["pair"] = client.pair = self.pairs.take(len(models[name]["workers"]))
        try:
            channel.send(messages.Welcome(messages.PROTOCOL_VERSION, os.getpid(), self.default_model, models))
        except BaseException:
            self.pairs.give_back(client)
            raise
        log.info("torchpool server: web process %d attached", pid)
        return client

    def _models(self) -> dict[str, Any]:
        return {name: {"max_input_bytes": p.config.max_input_bytes, "timeout": p.config.timeout,
                       "retry_after": p.config.retry_after, "retries": p.config.retries,
                       "workers": [tuple(placement) for placement in p.placements]}
                for name, p in self.pools.items()}

    def _forget(self, client: _Client) -> None:
        with self._clients_lock:
            if client not in self._clients:
                return
            self._clients.discard(client)
            self._connections -= 1
        self.pairs.give_back(client)

    def status(self) -> dict[str, Any]:
        """Every model's :class:`~flask_torchpool.status.ModelStatus`, with this server's pid, socket and
        attached clients."""
        status = {name: p.status() for name, p in self.pools.items()}
        return {"pid": os.getpid(), "socket": self.path, "clients": self.clients,
                "default_model": self.default_model, "models": status}


class _Client:
    """One attached web process: a reader thread takes its calls, a writer thread sends their results."""

    def __init__(self, server: PoolServer, channel: Channel, arena: shm.Arena, pid: int) -> None:
        self.server = server
        self.channel = channel
        self.arena = arena
        self.pid = pid
        self.outputs = shm.Allocator(*arena.outputs)
        self.replies: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.pending = 0
        self.pair: int | None = None  # the worker it is paired with (Note [Web affinity])
        self.idle = threading.Condition()
        self.closed = False
        self.streams = StreamRelay(self)  # its streams, and its calls it may cancel

    def start(self) -> None:
        threading.Thread(target=self._read_loop, name=f"torchpool-client-{self.pid}-read",
                         daemon=True).start()
        threading.Thread(target=self._write_loop, name=f"torchpool-client-{self.pid}-write",
                         daemon=True).start()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.replies.put(_STOP)
            shutdown_socket(self.channel.fileno())
            self.streams.close()

    def flush(self, timeout: float) -> None:
        """Wait (up to *timeout*) until every call taken has been answered."""
        with self.idle:
            self.idle.wait_for(lambda: self.pending == 0 or self.closed, timeout)

    def _read_loop(self) -> None:
        try:
            while True:
                try:
                    msg, fds = self.channel.recv()
                except messages.ProtocolError as exc:
                    log.warning("torchpool server: web process %d sent a bad message (%s); closing it",
                                self.pid, exc.strerror)
                    break
                except (EOFError, OSError):
                    break
                if isinstance(msg, messages.RemoteCall):
                    if not self._on_call(msg, fds):
                        break
                elif isinstance(msg, (messages.Cancel, messages.Credit)):
                    self.streams.on_message(msg)
                elif isinstance(msg, messages.Observed):  # its lane calls, for the metrics (Note [Lanes])
                    pool = self.server.pools.get(msg.model)
                    if pool is None or not record_observed(pool, msg):
                        log.warning("torchpool server: web process %d sent a bad Observed; closing it",
                                    self.pid)
                        break
                elif isinstance(msg, (messages.StatusRequest, messages.ReloadRequest)):
                    for fd in fds:
                        os.close(fd)
                    try:
                        answer_request(self.server, msg, self._send)
                    except OSError:  # it does not read (SEND_TIMEOUT) or went away
                        break
                else:
                    for fd in fds:
                        os.close(fd)
                    log.warning("torchpool server: web process %d sent a %s; closing it", self.pid,
                                type(msg).__name__)
                    break
        except Exception:  # a bug here must not take the server down with it
            log.exception("torchpool server: the connection of web process %d failed", self.pid)
        finally:
            log.info("torchpool server: web process %d detached", self.pid)
            self.close()
            self.channel.close()  # only here: closing while this thread reads could reuse the descriptor
            self.server._forget(self)
            # Unmap the client's arena as soon as no call of it holds a view: drop ours now, whatever
            # still refers to this object.
            self.arena = self.outputs = None  # type: ignore[assignment]

    def _on_call(self, msg: messages.RemoteCall, fds: list[int]) -> bool:
        """Take one call; False when the client is past :data:`MAX_PENDING_CALLS` (it is dropped)."""
        with self.idle:
            if self.pending >= MAX_PENDING_CALLS:
                for fd in fds:
                    os.close(fd)
                log.warning("torchpool server: web process %d has %d calls in flight (the bound); "
                            "closing it", self.pid, self.pending)
                return False
            self.pending += 1
        try:
            for offset in msg.releases:
                self.outputs.free(offset)
            model = msg.model if msg.model is not None else self.server.default_model
            pool = self.server.pools.get(model) if model is not None else None
            if pool is None:
                for fd in fds:
                    os.close(fd)
                raise InvalidInputError(f"this pool server has no model {model!r}; it serves "
                                        f"{sorted(self.server.pools)}", model=model)
            tensors = read_inputs(self.arena, msg.refs, fds, arrays=msg.numpy)
            args = codec.unflatten(msg.args, tensors)
            kwargs = codec.unflatten(msg.kwargs, tensors)
            if msg.stream:
                return self.streams.start(msg, pool, tuple(args), dict(kwargs))
            future = pool.submit(tuple(args), dict(kwargs), msg.timeout, msg.batch, method=msg.method,
                                 retries=max(0, pool.config.retries - 1) if msg.retried else None)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            self.replies.put((msg.id, exc))
            return True
        self.streams.track(msg.id, future)
        future.add_done_callback(functools.partial(self._done, msg.id))
        return True

    def _done(self, call_id: int, future: Future[Any]) -> None:
        if self.closed:  # the client is gone: drop the result (its blocks go back to the worker)
            with self.idle:
                self.pending -= 1
                self.idle.notify_all()
            return
        self.replies.put((call_id, future))

    def _write_loop(self) -> None:
        while True:
            item = self.replies.get()
            if item is _STOP:
                break
            call_id, outcome = item
            ends = not isinstance(outcome, Chunk)
            try:
                if self.closed:
                    continue
                if isinstance(outcome, (Chunk, End)):
                    outcome.send(self, call_id)
                    continue
                if isinstance(outcome, BaseException):
                    self._send_error(call_id, outcome)
                    continue
                try:
                    result = outcome.result()
                except BaseException as exc:  # noqa: BLE001
                    self._send_error(call_id, exc)
                    continue
                self._send_result(call_id, result)
            except OSError:
                self.close()  # the client went away while we answered
            finally:
                del item, outcome
                with self.idle:
                    self.pending -= ends
                    self.idle.notify_all()
        # Anything still queued belongs to a closed client: drop it (and the worker blocks it holds).
        with contextlib.suppress(queue.Empty):
            while True:
                self.replies.get_nowait()

    def _send_result(self, call_id: int, result: Any, kind: type = messages.Result) -> None:  # or a chunk
        tensors: list[Any] = []
        try:
            skel = codec.flatten(result, tensors, "output")
        except codec.UnsupportedValue as exc:  # pragma: no cover - the pool already checked the output
            self._send_error(call_id, InferenceError(f"the output cannot travel: {exc}"))
            return
        placer = shm.Placer(self.arena, self.outputs)
        refs = placer.place_all(tensors)
        del tensors, result
        try:
            self._send(kind(call_id, skel, refs), tuple(placer.fds))
        except BaseException:
            placer.rollback()
            raise
        placer.close_fds()

    def _send_error(self, call_id: int, exc: BaseException) -> None:
        if not isinstance(exc, (TorchPoolError, CancelledError)):  # cancelled: by its client
            log.error("torchpool server: a call failed in the server itself", exc_info=exc)
        self._send(messages.RemoteError(call_id, *to_wire(exc)))

    def _send(self, msg: Any, fds: tuple[int, ...] = ()) -> None:
        if not self.closed:
            self.channel.send(msg, fds)


# --- running a server as its own process ---------------------------------------------------------------


def watch_owner(owner_pid: int, on_death: Any) -> None:
    """Call *on_death* (in a thread) when process *owner_pid* exits."""
    try:
        pidfd = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        on_death()
        return

    def wait() -> None:
        try:
            select.select([pidfd], [], [])
        finally:
            os.close(pidfd)
        log.warning("torchpool server: owner process %d exited; stopping", owner_pid)
        on_death()

    threading.Thread(target=wait, name="torchpool-server-owner", daemon=True).start()


def serve_forever(server: PoolServer, owner_pid: int | None = None, ready_fd: int | None = None) -> None:
    """Run *server* until SIGTERM/SIGINT (from the main thread) or the owner's death; then drain.
    Once it listens, the socket path is written to *ready_fd* (which is closed) and systemd is told."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    if owner_pid is not None:
        watch_owner(owner_pid, stop.set)
    server.start()
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, server.path.encode() + b"\n")
        os.close(ready_fd)
    _notify_ready()
    try:
        while not stop.wait(3600):
            pass
    finally:
        server.stop()


def _notify_ready() -> None:
    """Tell systemd (Type=notify) that the server is ready, when it is watching."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)



def main(argv: list[str] | None = None) -> int:
    """``python -m flask_torchpool.server --app IMPORT [--socket PATH]``: what auto mode and the gunicorn
    hook start. It runs ``flask --app IMPORT torchpool serve``, the same command people use."""
    parser = argparse.ArgumentParser(prog="python -m flask_torchpool.server",
                                     description="Serve a Flask app's flask_torchpool models to attached "
                                                 "web processes.")
    parser.add_argument("--app", required=True, help="the app, as for flask --app (module:name)")
    parser.add_argument("--socket", default=None, help="Unix socket path (default: TORCHPOOL_SOCKET)")
    parser.add_argument("--owner-pid", type=int, default=None, help="stop when this process exits")
    parser.add_argument("--lock-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=None,
                        help="write the socket path to this descriptor once serving")
    parser.add_argument("--sync-web", action="store_true",
                        help="the web processes are gunicorn sync workers (TORCHPOOL_WORKER_NICE 'auto')")
    args = parser.parse_args(argv)
    from flask.cli import ScriptInfo

    from ..cli import LOG_FORMAT, serve_command

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)

    command = [f"--{name.replace('_', '-')}" + ("" if value is True else f"={value}")
               for name, value in vars(args).items() if name != "app" and value not in (None, False)]
    serve_command.main(command, prog_name=parser.prog, obj=ScriptInfo(app_import_path=args.app))
    exit_now(1)  # pragma: no cover - the command ends the process
    return 1
