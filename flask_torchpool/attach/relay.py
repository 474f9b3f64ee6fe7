"""The pool server's half of streams and cancellation for attached web processes.

A client's :class:`~flask_torchpool.messages.RemoteCall` with ``stream`` set starts a stream of the
server's pool (:meth:`~flask_torchpool.backend.Backend.stream`); one relay thread per stream takes its
chunks and queues them for the client's writer thread, which writes each into the client's arena and sends
a :class:`~flask_torchpool.messages.StreamChunk` (then :class:`~flask_torchpool.messages.StreamEnd`, or a
:class:`~flask_torchpool.messages.RemoteError` after the chunks). The client hands credits back with
:class:`~flask_torchpool.messages.Credit` as its view takes chunks; without credit the relay stops taking
chunks, so the worker's own window fills and its generator pauses (Note [Streams]): at most twice
``TORCHPOOL_STREAM_BUFFER`` chunks (plus the one the relay holds) wait between the model and a slow view.
:class:`~flask_torchpool.messages.Cancel` closes the stream (or cancels a plain call that has not
started), and so does the client going away: its calls are dropped and its streams closed at once.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .. import codec, messages, shm
from ..errors import InvalidInputError
from ..streaming import Stream

if TYPE_CHECKING:
    from ..backend import Backend
    from .server import _Client

log = logging.getLogger(__name__)


class Chunk:
    """A chunk of stream to write into the client's arena. ``send`` returns whether the call ends."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def send(self, client: _Client, call_id: int) -> bool:
        value, self.value = self.value, None
        client._send_result(call_id, value, messages.StreamChunk)
        return False


class End:
    """The end of a stream that finished."""

    __slots__ = ("chunks",)

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    def send(self, client: _Client, call_id: int) -> bool:
        client._send(messages.StreamEnd(call_id, self.chunks))
        return True


class _Relay:
    """One stream of one client: its credit and the thread that moves its chunks."""

    def __init__(self, stream: Stream, credit: int) -> None:
        self.stream = stream
        self.credit = credit
        self.cond = threading.Condition()
        self.closed = False


class StreamRelay:
    """A client's streams and cancellable calls, by call id. Thread-safe."""

    def __init__(self, client: _Client) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._streams: dict[int, _Relay] = {}
        self._calls: dict[int, Future[Any]] = {}
        self._closed = False

    def track(self, call_id: int, future: Future[Any]) -> None:
        """A plain call the client may cancel (until it is done)."""
        with self._lock:
            self._calls[call_id] = future
        future.add_done_callback(lambda _: self._forget(call_id))

    def _forget(self, call_id: int) -> None:
        with self._lock:
            self._calls.pop(call_id, None)

    def start(self, msg: messages.RemoteCall, pool: Backend, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> bool:
        """Start the stream the client asked for with *msg* (raises what :meth:`Backend.stream` raises);
        its chunks flow as the client's credits allow. True: the client's reader goes on."""
        call_id = msg.id
        stream = pool.stream(args, kwargs, msg.timeout, msg.method)
        relay = _Relay(stream, pool.config.stream_buffer)
        with self._lock:
            closed = self._closed
            if not closed:
                self._streams[call_id] = relay
        if closed:
            stream.close()
            return True
        threading.Thread(target=self._run, args=(call_id, relay), daemon=True,
                         name=f"torchpool-client-{self._client.pid}-stream-{call_id}").start()
        return True

    def on_message(self, msg: messages.Cancel | messages.Credit) -> None:
        """A :class:`~flask_torchpool.messages.Cancel` or :class:`~flask_torchpool.messages.Credit` from
        the client."""
        if isinstance(msg, messages.Credit):
            outputs = self._client.outputs
            for offset in msg.releases:
                outputs.free(offset)
        with self._lock:
            relay = self._streams.get(msg.id)
            future = self._calls.get(msg.id) if relay is None else None
        if future is not None and isinstance(msg, messages.Cancel):
            future.cancel()
        if relay is None:
            return
        with relay.cond:
            if isinstance(msg, messages.Cancel):
                relay.closed = True
            else:
                relay.credit += msg.chunks
            relay.cond.notify_all()
        if isinstance(msg, messages.Cancel):
            relay.stream.close()  # wakes the relay if it waits for a chunk

    def close(self) -> None:
        """The client went away: close every stream and cancel every call not started."""
        with self._lock:
            self._closed = True
            relays = list(self._streams.values())
            futures = list(self._calls.values())
        for relay in relays:
            with relay.cond:
                relay.closed = True
                relay.cond.notify_all()
            relay.stream.close()
        for future in futures:
            future.cancel()

    def _run(self, call_id: int, relay: _Relay) -> None:
        client, stream = self._client, relay.stream
        item: Any = None
        sent = 0
        try:
            while True:
                with relay.cond:
                    relay.cond.wait_for(lambda: relay.credit > 0 or relay.closed)
                    if relay.closed:
                        break
                    relay.credit -= 1
                value = next(stream, _DONE)
                if value is _DONE:
                    item = End(sent)
                    break
                client.replies.put((call_id, Chunk(value)))
                sent += 1
                del value
        except BaseException as exc:  # noqa: BLE001 - the stream's error goes to its caller
            item = exc
        finally:
            stream.close()
            with self._lock:
                self._streams.pop(call_id, None)
        # A cancelled stream ends without a word: the client forgot it already, or is gone.
        client.replies.put((call_id, item if item is not None else End(sent)))


_DONE = object()


def read_inputs(arena: shm.Arena, refs: tuple[shm.TensorRef, ...], fds: list[int],
                arrays: bool = False) -> list[Any]:
    """Views of a client's inputs (numpy arrays with *arrays*: then this process needs no torch), after
    checking that every reference lies inside what it may name: its arena's input half, or a descriptor
    it sent along."""
    sizes = []
    try:
        for fd in fds:
            sizes.append(shm.check_sealed(fd))
        start, length = arena.inputs
        for ref in refs:
            if arrays and ref.dtype not in codec.NUMPY_WIRE_NAMES:
                raise InvalidInputError(f"bad call header: a call of numpy arrays names dtype {ref.dtype!r}, "
                                        "which numpy lacks")
            dtype = codec.numpy_dtype(ref.dtype) if arrays else codec.dtype_from_name(ref.dtype)
            numel = 1
            for dim in ref.shape:
                if not isinstance(dim, int) or dim < 0:
                    raise InvalidInputError(f"bad tensor shape {ref.shape!r} in a call header")
                numel *= dim
            if ref.nbytes != numel * dtype.itemsize:
                raise InvalidInputError("a tensor reference's size does not match its shape")
            if ref.nbytes == 0:
                continue
            if ref.seg == -1:
                ok = start <= ref.offset and ref.offset + ref.nbytes <= start + length \
                    and ref.offset % shm.ALIGN == 0
            else:
                ok = 0 <= ref.seg < len(fds) and ref.offset == 0 and ref.nbytes <= sizes[ref.seg]
            if not ok:
                raise InvalidInputError("a tensor reference points outside the caller's shared memory")
    except (codec.UnsupportedValue, shm.UnsealedSegment, OSError) as exc:
        for fd in fds:
            os.close(fd)
        raise InvalidInputError(f"bad call header: {exc}") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return shm.read_refs(arena, refs, fds, arrays=arrays, forward=True)
