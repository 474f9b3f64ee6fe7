"""The worker process: pin, load the model, serve calls from the arena until told to stop.

``worker_main`` is the spawn target. It first makes the pipes it was given its stdout and stderr and
sends its log records there (:mod:`flask_torchpool.logs`). Then it arranges to die with its parent
(``PR_SET_PDEATHSIG`` plus a check that the parent is still the one that spawned it), pins itself to its
cores, sets torch's thread counts and, on a GPU, selects the device before CUDA initialises. Then it
builds the model (``.eval()``, moved to the device), maps the pool's shared weights
(:mod:`flask_torchpool.weights`), reports :class:`~flask_torchpool.messages.Ready` (or ``StartupFailed``)
and serves.

The serve loop reads every message already waiting before it runs the next call, so a ``Cancel`` for a
call that has not started yet removes it, and output blocks released by the web process are reused at
once. Every call runs under ``torch.inference_mode()``; the id of the running call is kept in the arena's
control words for the supervisor to read. A call that fails goes back as the error its caller gets
(the model raised, its output or inputs cannot travel, it was cancelled), through
:func:`~flask_torchpool.errors.to_wire`, with the worker's traceback.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import io
import logging
import os
import selectors
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import torch

from . import codec, lanes, messages, shm, weights
from .channel import Channel
from .config import WORKER_ENV, PinnedFile
from .errors import (
    ConfigError,
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    OutputError,
    RemoteTraceback,
    TorchPoolError,
    WorkerStartupError,
    to_wire,
)
from .logs import flush_c_streams, redirect_output
from .placement import Placement

log = logging.getLogger(__name__)


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl
            pass
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os._exit(70)


def _pin(placement: Placement) -> None:
    if hasattr(os, "sched_setaffinity") and placement.cores:
        try:
            os.sched_setaffinity(0, placement.cores)
        except OSError as exc:  # cores taken away by a cgroup since planning
            log.warning("worker %d: cannot pin to cores %s: %s", placement.worker, placement.cores, exc)
    torch.set_num_threads(placement.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (inter-op pool started by an import)
        pass
    if placement.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(placement.device))


def load_model(spec: Any, device: str) -> Any:
    """Build the model from its spec (see ``TORCHPOOL_MODEL``), in eval mode on *device*. A
    :class:`~flask_torchpool.config.PinnedFile` is read once, checked against its SHA-256, and loaded from
    the bytes that were checked (no window in which the file could be swapped)."""
    if isinstance(spec, PinnedFile):
        with open(spec.path, "rb") as f:
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != spec.sha256:
            raise ConfigError(spec.key, f"the model file {spec.path!r} has SHA-256 {digest}, not the pinned "
                                        f"{spec.sha256}; refusing to load it (model files are code). "
                                        "Deploy the file you pinned, or pin this one")
        if spec.path.endswith(".pt2"):
            model = torch.export.load(io.BytesIO(data)).module()
        else:
            model = torch.jit.load(io.BytesIO(data), map_location=device)  # type: ignore[no-untyped-call]
    elif isinstance(spec, str) and spec.endswith(".pt2"):
        model = torch.export.load(spec).module()
    elif isinstance(spec, str) and spec.endswith((".pt", ".pth", ".ts", ".jit")):
        model = torch.jit.load(spec, map_location=device)  # type: ignore[no-untyped-call]
    elif isinstance(spec, str):
        module_name, _, attr = spec.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        model = obj()
    else:
        model = spec()
    if model is None or not callable(model):
        raise TypeError(f"the factory {spec!r} returned {type(model).__qualname__}, not a callable model")
    if isinstance(model, torch.nn.Module):
        try:
            model.eval()
        except NotImplementedError:  # torch.export modules: already traced for inference
            pass
        if device != "cpu":
            model.to(device)
    return model


def worker_main(placement: Placement, model_spec: Any, conn: Connection, arena_fd: Any,
                arena_size: int, parent_pid: int, share_weights: bool = False,
                output_fds: tuple[Any, Any] | None = None, log_level: int = logging.INFO,
                pool_name: str = "torchpool", nice: int = 0) -> None:
    """Entry point of a worker process (forked by the fork server, or the target given to the spawn
    context)."""
    os.environ[WORKER_ENV] = f"{pool_name} worker {placement.worker}"
    if output_fds is not None:
        out_fd, err_fd = (fd.detach() if hasattr(fd, "detach") else fd for fd in output_fds)
        redirect_output(out_fd, err_fd, log_level)
    _die_with_parent(parent_pid)
    if nice:
        # Below the web tier (TORCHPOOL_WORKER_NICE): a request is parsed the moment it arrives, and the
        # model gets every cycle the web processes leave.
        os.nice(nice)
    # Ctrl-C in a terminal reaches the whole process group; the web process decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGTERM to the whole process group (systemd's KillMode=control-group, a terminal's job
    # control) must let the web process drain: it stops the workers itself, and PR_SET_PDEATHSIG
    # still ends them if it dies.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = Channel(conn, messages.WORKER_PROTOCOL)
    try:
        fd = arena_fd.detach() if hasattr(arena_fd, "detach") else arena_fd
        arena = shm.Arena(fd, arena_size)
        os.close(fd)
        _pin(placement)
        model = load_model(model_spec, placement.device)
        shared = weights.share_weights(channel, model) if share_weights and placement.device == "cpu" else 0
    except BaseException as exc:
        log.error("worker %d could not load the model %r", placement.worker, model_spec, exc_info=True)
        flush_c_streams()
        err = WorkerStartupError.load_failed(placement.worker, model_spec, f"{type(exc).__name__}: {exc}",
                                             traceback.format_exc())
        channel.send(messages.StartupFailed(*to_wire(err)))
        os._exit(3)
    channel.send(messages.Ready(os.getpid(), {"device": placement.device, "cores": list(placement.cores),
                                        "threads": torch.get_num_threads(),
                                        "shared_weight_bytes": shared}))
    try:
        _Server(channel, arena, model, placement.device).serve()
    except Exception:
        # One record with the traceback (multiprocessing would print it line by line), same exit code.
        log.critical("worker %d: the serve loop failed", placement.worker, exc_info=True)
        flush_c_streams()
        os._exit(1)
    # Nothing to clean up that the kernel does not: skip the interpreter's teardown of torch, which
    # takes seconds and would make every shutdown wait for it.
    sys.stdout.flush()
    sys.stderr.flush()
    flush_c_streams()
    os._exit(0)


class _Server:
    def __init__(self, channel: Channel, arena: shm.Arena, model: Any, device: str) -> None:
        self.channel = channel
        self.main = lanes.Peer(0, channel, arena)
        self.arena = arena
        self.model = model
        self.device = torch.device(device)
        self.outputs = self.main.outputs
        self.pending: deque[tuple[lanes.Peer, messages.Call, list[int]]] = deque()
        # Note [Lanes]: the direct lanes of attached web processes, by socket descriptor.
        self.lanes: dict[int, lanes.Peer] = {}
        self.selector: selectors.BaseSelector | None = None
        self.alarm: lanes.Alarm | None = None
        self.stop_by = 0.0
        # The stream being run (Note [Streams] in streaming.py): its call id, credits, and whether it was
        # cancelled or the pool said Stop meanwhile.
        self.streaming = 0
        self.credit = 0
        self.cancelled = False
        self.stopping = False
        self.lanes_closing = False  # CloseLanes: the pool drains (Note [Lanes])
        if self.device.type == "cuda":
            _pin_host_memory(arena)

    def serve(self) -> None:
        # One inference_mode for the whole loop rather than one per call: entering it costs a few
        # microseconds, and nothing in a worker ever needs autograd.
        try:
            with torch.inference_mode():
                self._serve()
        except (EOFError, ConnectionError):
            return  # the web process is gone

    def _serve(self) -> None:
        main = self.main
        while True:
            if self.selector is None:  # no lane yet: the pool's channel only
                if not self.pending and not self._handle(main, *self.channel.recv()):
                    return
                while self.channel.poll(0):
                    if not self._handle(main, *self.channel.recv()):
                        return
            elif not self._select():
                return
            if self.pending:
                self._run(*self.pending.popleft())
                if self.stopping and not self.lanes:  # a Stop read while a stream ran
                    return
                self._publish()

    def _select(self) -> bool:
        """Read what the pool and the lanes sent (waiting when nothing is queued); False: stop now."""
        assert self.selector is not None
        if self.stopping:
            timeout: float | None = max(0.0, self.stop_by - time.monotonic())
            if not self.lanes or not timeout:
                return False
        else:
            timeout = None
        for key, _ in self.selector.select(0 if self.pending else timeout):
            peer: lanes.Peer = key.data
            try:
                # The lane itself, not its number: handling an earlier event can close a lane and open
                # another with the same descriptor number, and this event is not the new lane's.
                while (peer is self.main or self.lanes.get(peer.fd) is peer) and peer.channel.poll(0):
                    if not self._handle(peer, *peer.channel.recv()):
                        if peer is self.main:
                            self._begin_stop()
                        break
            except (EOFError, OSError) as exc:
                if peer is self.main:
                    raise EOFError from exc
                if isinstance(exc, messages.ProtocolError):
                    log.warning("lane %d: %s; closing it", peer.lane, exc.strerror)
                self._close_lane(peer)
        self._publish()
        return not (self.stopping and not self.lanes and not self.pending)

    def _handle(self, peer: lanes.Peer, msg: Any, fds: list[int]) -> bool:
        kind = type(msg)
        if kind is messages.Call:
            for offset in msg.releases:
                peer.outputs.free(offset)
            if peer.lane:
                if peer.queued >= lanes.MAX_LANE_CALLS or msg.window:
                    for fd in fds:
                        os.close(fd)
                    raise messages.ProtocolError("a stream, or more calls than a lane may queue")
                peer.queued += 1
            self.pending.append((peer, msg, fds))
        elif kind is messages.Credit and not peer.lane:
            for offset in msg.releases:
                self.outputs.free(offset)
            if msg.id == self.streaming:
                self.credit += msg.chunks
        elif kind is messages.Cancel:
            if msg.id == self.streaming and not peer.lane:
                self.cancelled = True
            for i, (owner, call, call_fds) in enumerate(self.pending):
                if call.id == msg.id and owner is peer:
                    del self.pending[i]
                    owner.queued -= owner is not self.main
                    for fd in call_fds:
                        os.close(fd)
                    self._fail(peer, call.id, InferenceTimeoutError("the call was cancelled before it ran"))
                    break
        elif kind is messages.Stop:
            if peer.lane:  # the web process agreed: it sends nothing more on this lane
                peer.acked = True
                if not peer.queued:
                    self._close_lane(peer)
                return True
            self.stopping = True
            return False
        elif kind is messages.OpenLane and not peer.lane:
            self._open_lane(msg, fds)
        elif kind is messages.CloseLanes and not peer.lane:
            self.lanes_closing = True
            for lane in list(self.lanes.values()):
                self._stop_lane(lane)
        else:
            for fd in fds:
                os.close(fd)
            raise messages.ProtocolError(f"a {kind.__name__} on a lane")
        return True

    def _open_lane(self, msg: messages.OpenLane, fds: list[int]) -> None:
        try:
            peer = lanes.open_lane(msg, fds)
        except (OSError, ValueError) as exc:
            log.warning("cannot open lane %d: %s", msg.lane, exc)
            return
        if self.selector is None:
            self.selector = selectors.DefaultSelector()
            self.selector.register(self.channel.fileno(), selectors.EVENT_READ, self.main)
            self.alarm = lanes.Alarm()
        self.lanes[peer.fd] = peer
        self.selector.register(peer.fd, selectors.EVENT_READ, peer)
        if self.stopping or self.lanes_closing:
            self._stop_lane(peer)
        self._publish()

    def _begin_stop(self) -> None:
        """Stop read from the pool: Note [Lanes], each lane is told and served until it agrees."""
        self.stop_by = time.monotonic() + lanes.STOP_GRACE
        for peer in list(self.lanes.values()):
            self._stop_lane(peer)

    def _stop_lane(self, peer: lanes.Peer) -> None:
        try:
            peer.channel.send(messages.Stop())
        except OSError:
            self._close_lane(peer)

    def _close_lane(self, peer: lanes.Peer) -> None:
        fd = peer.fd
        if self.lanes.get(fd) is not peer:  # closed already (its number may be another lane's now)
            return
        del self.lanes[fd]
        if self.selector is not None:
            self.selector.unregister(fd)
        peer.channel.close()
        for item in [p for p in self.pending if p[0] is peer]:  # nobody waits for them any more
            self.pending.remove(item)
            for call_fd in item[2]:
                os.close(call_fd)
        peer.words = None

    def _publish(self) -> None:
        """Note [Lanes]: every lane sees this worker's load (full while it runs a stream, so that no lane
        call waits behind it, whatever publishes meanwhile); the pool sees how many lane calls it holds."""
        if self.lanes:
            lanes.publish_load(self.lanes.values(), lanes.FULL_LOAD if self.streaming else len(self.pending))
        main = self.main
        if self.selector is not None and main.words is not None:
            main.words[lanes.CTRL_LOAD] = sum(1 for item in self.pending if item[0] is not main)
            main.words[lanes.CTRL_LANES] = len(self.lanes)

    def _run(self, peer: lanes.Peer, call: messages.Call, fds: list[int]) -> None:
        control = peer.words
        if peer is not self.main:
            peer.queued -= 1
        assert control is not None
        control[shm.CTRL_RUNNING] = call.id
        alarm = self.alarm if call.deadline and peer is not self.main else None
        try:
            if alarm is not None and not alarm.arm(call.deadline):
                for fd in fds:
                    os.close(fd)
                self._fail(peer, call.id, InferenceTimeoutError("the call's deadline passed before it ran"))
                return
            try:
                tensors = shm.read_refs(peer.arena, call.refs, fds, inline=call.inline)
                if self.device.type != "cpu":
                    tensors = [t.to(self.device, non_blocking=True) for t in tensors]
                args = codec.unflatten(call.args, tensors)
                kwargs = codec.unflatten(call.kwargs, tensors)
            except Exception as exc:
                self._fail(peer, call.id, _traced(InvalidInputError(
                    f"the worker could not read the inputs: {type(exc).__name__}: {exc}")))
                return
            try:
                out = (self.model if call.method is None else call_target(self.model, call.method))(
                    *args, **kwargs)
            except Exception as exc:
                self._fail(peer, call.id, InferenceError.model_raised(type(exc).__name__, str(exc),
                                                                      traceback.format_exc()))
                return
            finally:
                if alarm is not None:
                    alarm.disarm()
            del args, kwargs, tensors
            if call.window:
                self._stream(call.id, out, call.window)
            elif isinstance(out, Iterator):
                close_iterator(out)
                self._fail(peer, call.id, OutputError(
                    f"the model returned {codec.describe(out)}: it yields its outputs one by one; iterate "
                    "them with model.stream(...) instead of calling model(...)", remote_type="Iterator"))
            else:
                self._reply(peer, call.id, out)
        finally:
            if alarm is not None:
                alarm.disarm()
            if peer.words is not None:  # not a lane closed meanwhile
                control[shm.CTRL_RUNNING] = 0
            if peer.acked and not peer.queued:
                self._close_lane(peer)

    def _stream(self, call_id: int, out: Any, window: int) -> None:
        """Note [Streams]: send what *out* yields, *window* chunks ahead of the caller's credits; stop at a
        Cancel or Stop (closing the generator, so its ``finally`` blocks run)."""
        if not isinstance(out, Iterator):
            self._fail(self.main, call_id, OutputError(
                f"model.stream() needs a model that yields its outputs (a generator or an iterator); it "
                f"returned {codec.describe(out)}: call model(...) instead", remote_type="NotAnIterator"))
            return
        self.streaming, self.credit, self.cancelled = call_id, window, False
        self._publish()  # full: no lane call waits behind a stream
        sent = 0
        failure: TorchPoolError | None = None
        try:
            while True:
                # What arrived first (a Cancel, credits, new calls); at 0 credits, wait for more.
                while self.channel.poll(0) or (self.credit <= 0 and not (self.cancelled or self.stopping)):
                    if not self._handle(self.main, *self.channel.recv()):
                        break
                if self.cancelled or self.stopping:
                    break
                try:
                    item = next(out)
                except StopIteration:
                    break
                except Exception as exc:
                    failure = InferenceError.model_raised(type(exc).__name__, str(exc),
                                                          traceback.format_exc())
                    break
                failure = self._chunk(call_id, item)
                if failure is not None:
                    break
                sent += 1
                self.credit -= 1
        finally:
            self.streaming = 0
            close_iterator(out)
        if failure is not None:
            self._fail(self.main, call_id, failure)
        else:
            self.channel.send(messages.StreamEnd(call_id, sent))

    def _chunk(self, call_id: int, item: Any) -> TorchPoolError | None:
        """Send one chunk of a stream, as :meth:`_reply` sends a result (never aliasing an input: the
        input blocks are freed when the stream ends); the error that ends the stream if it cannot."""
        placer = shm.Placer(self.arena, self.outputs)
        try:
            produced: list[torch.Tensor] = []
            value = codec.flatten(item, produced, "output")
            msg = messages.StreamChunk(call_id, value, tuple(placer.place(t) for t in produced))
        except codec.UnsupportedValue as exc:
            placer.rollback()
            return OutputError(f"the model yielded {codec.describe(item)}, which cannot travel back: {exc}",
                               remote_type="UnsupportedValue")
        except Exception as exc:
            placer.rollback()
            return _traced(OutputError(str(exc), remote_type=type(exc).__name__))
        try:
            self.channel.send(msg, tuple(placer.fds))
        finally:
            placer.close_fds()
        return None

    def _reply(self, peer: lanes.Peer, call_id: int, out: Any) -> None:
        placer = shm.Placer(peer.arena, peer.outputs, inline=peer is not self.main)  # Note [Inline tensors]
        try:
            produced: list[torch.Tensor] = []
            value = codec.flatten(out, produced, "output")
            refs = tuple(self._alias(peer, t) or placer.place(t) for t in produced)
            msg = messages.Result(call_id, value, refs, placer.inline)
        except codec.UnsupportedValue as exc:
            placer.rollback()
            self._fail(peer, call_id, OutputError(f"the model returned {codec.describe(out)}, which cannot "
                                                  f"travel back: {exc}", remote_type="UnsupportedValue"))
            return
        except Exception as exc:
            placer.rollback()
            self._fail(peer, call_id, _traced(OutputError(str(exc), remote_type=type(exc).__name__)))
            return
        try:
            self._send(peer, msg, tuple(placer.fds))
        finally:
            placer.close_fds()

    def _alias(self, peer: lanes.Peer, t: torch.Tensor) -> shm.TensorRef | None:
        """Note [Outputs that are inputs]: an output lying contiguously in this call's inputs (the
        identity, an in-place op, a view of an input) goes back as a reference to those bytes, not a
        copy; the web process keeps that input block until the output is collected."""
        nbytes = codec.tensor_nbytes(t)
        if nbytes < shm.ZERO_COPY_MIN_BYTES or t.device.type != "cpu" or not t.is_contiguous():
            return None
        base = peer.arena.bytes.data_ptr()
        start, size = peer.arena.inputs
        offset = t.data_ptr() - base
        if offset < start or offset + nbytes > start + size or offset % t.element_size():
            return None
        return shm.TensorRef(shm.INPUT_ALIAS, offset, nbytes, str(t.dtype), tuple(t.shape))

    def _fail(self, peer: lanes.Peer, call_id: int, err: TorchPoolError) -> None:
        """Call *call_id* failed with *err*, the error its caller gets (rebuilt there by ``from_wire``)."""
        self._send(peer, messages.Failure(call_id, *to_wire(err)))

    def _send(self, peer: lanes.Peer, msg: Any, fds: tuple[int, ...] = ()) -> None:
        if peer is self.main:
            peer.channel.send(msg, fds)
            return
        words = self.main.words
        if words is not None and type(msg) is not messages.Stop:  # counted for the pool's status
            words[lanes.CTRL_LANE_CALLS] += 1
            words[lanes.CTRL_LANE_ERRORS] += type(msg) is messages.Failure
            self._publish()  # the answered call is no longer held: so it reads to whoever got the answer
        try:  # a lane's web process went away: that lane only ends
            peer.channel.send(msg, fds)
        except OSError:
            self._close_lane(peer)


def call_target(model: Any, name: str) -> Any:
    """The public method *name* of *model* (``model.call("generate", ...)``)."""
    if not name.isidentifier() or name.startswith("_"):
        raise AttributeError(f"{name!r} is not a public method name")
    method = getattr(model, name, None)
    if not callable(method):
        raise AttributeError(f"the model ({type(model).__qualname__}) has no method {name!r}")
    return method


def close_iterator(out: Any) -> None:
    """Close a generator the model returned (its ``finally`` blocks run); log what closing raises."""
    close = getattr(out, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:
        log.warning("closing the model's generator raised", exc_info=True)


def _traced(err: TorchPoolError) -> TorchPoolError:
    """*err*, with the traceback of the exception being handled as its remote cause."""
    err.__cause__ = RemoteTraceback(traceback.format_exc())
    return err


def _pin_host_memory(arena: shm.Arena) -> None:
    """Page-lock the arena so host-to-device copies of inputs run at full speed and asynchronously
    (``non_blocking=True``) and device-to-host copies of outputs land in it directly."""
    try:
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        err = cudart.cudaHostRegister(arena.bytes.data_ptr(), arena.size, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister returned {err}")
    except Exception as exc:  # pinning is an optimisation: serve without it
        log.warning("cannot pin the arena for fast GPU copies (%s); serving with pageable memory", exc)

