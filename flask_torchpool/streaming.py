"""Streams: a call whose model yields, and callers that go away.

:class:`Stream` is what ``model.stream(...)`` returns on every backend: an iterator (and an async iterator)
over the model's outputs, in order, that ends with the model's error, if any, after the chunks it produced.
Closing it, or dropping it, cancels the work. :class:`StreamBook` is the process pool's half: it opens a
stream's call, takes its chunks off the manager thread, moves its deadline, hands credits back to the
worker, and cancels calls whose caller stopped waiting (streams or not)::

    view thread                        manager thread                           worker
    -----------                        --------------                           ------
    pool.stream() -> Call (window W) --------------------------------------->  gen = model(...)
                                                                                next(gen), place in arena
    Stream.__next__ <-- _Sink.put <--- on_chunk (read refs, move deadline) <--  StreamChunk (W credits)
         | consumed: Credit(1, releases) ---------------------------------->  (blocks at 0 credits)
    Stream.close() --> cancel: Cancel ------------------------------------->  gen.close() (finally runs)
                        kill after CANCEL_GRACE if it goes on               <--  StreamEnd
                                       complete (frees inputs, frees slot)

Note [Streams]
~~~~~~~~~~~~~~
A stream is a :class:`~flask_torchpool.batching.Call` with ``target = (method, window)``, window > 0, never
batched and never retried (part of the answer may already be out): a worker dying under it fails it with
``WorkerCrashedError``. It occupies its worker until it ends. Backpressure is a credit window: the worker
may produce ``TORCHPOOL_STREAM_BUFFER`` chunks ahead of the caller, and one more each time the caller takes
one (:class:`~flask_torchpool.messages.Credit`, which also carries the output blocks the caller is done
with: a worker busy with a stream gets no call to carry them). So at most that many chunks wait in shared
memory per stream; then the generator is simply not resumed. The deadline (``TORCHPOOL_TIMEOUT``) is moved
on by every sign of progress, a chunk arriving or the caller taking one, so it bounds the time to the first
chunk and between chunks; ``TORCHPOOL_STREAM_TIMEOUT`` bounds the whole stream. Past either, the caller's
iterator raises ``InferenceTimeoutError``, the worker is told to stop (it closes the generator, so its
``finally`` blocks run, and takes its next call), and a worker that has not stopped within
:data:`CANCEL_GRACE` seconds (stuck inside the generator) is killed and replaced. A caller that closes or
drops its iterator cancels the same way, without an error to anyone.

A plain call whose caller stopped waiting (``future.cancel()``, the view's deadline) is dropped if it has
not started: removed from the queue, or cancelled in the worker before it runs. One that has started runs
to its end and its result is discarded: the model cannot be interrupted without killing its worker.
"""

from __future__ import annotations

import functools
import heapq
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from . import codec, messages, shm
from .batching import Call, CallState, Scheduler
from .errors import InferenceTimeoutError, OutputError
from .status import WorkerState

if TYPE_CHECKING:
    import asyncio

    from .config import PoolConfig
    from .metrics import Metrics
    from .workers import WorkerSet, WorkerSlot

log = logging.getLogger(__name__)

#: Seconds a worker told to stop a stream may take to stop before it is killed.
CANCEL_GRACE = 1.0


def new_call(config: PoolConfig, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None,
             method: str | None, arrays: bool = False, retries: int | None = None) -> Call:
    """A call of the process pool (or Ray's), its arguments checked and flattened here, in the calling
    thread. With *arrays* numpy arrays stay numpy arrays (the process pool writes them into shared
    memory itself: Note [A pool server without torch] in :mod:`flask_torchpool.codec`), else
    they become torch tensors sharing their memory."""
    codec.check_timeout(timeout)  # a NaN deadline would stall the manager
    check_method(method)
    flat = codec.flatten_call(args, kwargs, config.max_input_bytes, arrays=arrays)
    timeout = config.timeout if timeout is None else timeout
    call = Call(flat.args, flat.kwargs, flat.tensors, Future(), None,
                config.retries if retries is None else retries, target=(method, 0), numpy=flat.numpy)
    call.deadline = None if timeout is None else call.enqueued + timeout
    return call


def check_method(method: str | None) -> None:
    """Refuse a method name that is not a public attribute name (every backend checks it the same way)."""
    if method is not None and not (isinstance(method, str) and method.isidentifier()
                                   and not method.startswith("_")):
        raise ValueError(f"method {method!r} is not allowed: name a public method of the model, such as "
                         "'generate' (None runs the model itself)")


#: What :meth:`Sink.take` returns once the stream finished.
FINISHED: Any = object()


class _End:
    """The end of a stream: *error* is None when it finished."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Sink:
    """A stream's chunks as they arrive (any producing thread), for one reader. Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._items: deque[Any] = deque()
        self._end: _End | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.chunks = 0

    @property
    def ended(self) -> bool:
        return self._end is not None

    def put(self, value: Any) -> bool:
        """Add a chunk; False when the stream already ended (the chunk is dropped)."""
        with self._cond:
            if self._end is not None:
                return False
            self._items.append(value)
            self.chunks += 1
            self._wake()
        return True

    def end(self, error: BaseException | None = None) -> None:
        """The stream ended (once; later calls are ignored)."""
        with self._cond:
            if self._end is None:
                self._end = _End(error)
                self._wake()

    def discard(self) -> None:
        """End the stream for the reader and drop what waits (zero-copy chunks give their memory back)."""
        with self._cond:
            if self._end is None:
                self._end = _End(None)
            self._items.clear()
            self._wake()

    def _wake(self) -> None:
        self._cond.notify_all()
        waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut)

    def _pop(self) -> Any:
        """Under the condition: the next chunk, or :data:`FINISHED` / the stream's error once it ended."""
        if self._items:
            return self._items.popleft()
        assert self._end is not None
        error, self._end = self._end.error, _End(None)  # the error is raised once
        if error is not None:
            raise error
        return FINISHED

    def take(self, timeout: float | None) -> Any:
        """Block for the next chunk (:data:`FINISHED` at the end). *timeout* is a safety net: the backend
        ends a stream at its deadline."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._end is not None, timeout):
                raise InferenceTimeoutError(f"no chunk and no end of the stream within {timeout:g}s")
            return self._pop()

    async def take_async(self) -> Any:
        import asyncio  # loaded by whoever awaits this; a web process without async views never loads it

        while True:
            with self._cond:
                if self._items or self._end is not None:
                    return self._pop()
                loop = asyncio.get_running_loop()
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            await fut


def stream_ended(sink: Sink, done: Future[Any]) -> None:
    """The done-callback of a stream's call: it resolves after every chunk was put (the reader reads in
    order); its error is the stream's error. A cancelled stream ends without one."""
    exc = None if done.cancelled() else done.exception()
    sink.end(None if isinstance(exc, CancelledError) else exc)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Stream(Iterator[Any], AsyncIterator[Any]):
    """The outputs of a model that yields, in order: ``for chunk in model.stream(x)`` or
    ``async for chunk in model.stream(x)``.

    The iterator raises the pool's error classes (``InferenceError``, ``InferenceTimeoutError``,
    ``WorkerCrashedError``, ...) after the chunks produced before the error. :meth:`close` (also on
    ``with``, and when the iterator is garbage-collected, e.g. when the WSGI server closes the response
    of a view that iterates it) stops the model's generator and frees its worker (Note [Streams])."""

    def __init__(self, sink: Sink, cancel: Callable[[], None], consumed: Callable[[], None] | None = None,
                 wait_limit: float | None = None) -> None:
        self._sink = sink
        self._cancel: Callable[[], None] | None = cancel
        self._consumed = consumed
        self._wait_limit = wait_limit
        self._hooks: list[Callable[[], None]] | None = []  # None once it ended for its reader

    @property
    def chunks(self) -> int:
        """Chunks received so far."""
        return self._sink.chunks

    def on_end(self, hook: Callable[[], None]) -> None:
        """Run *hook* once the stream has ended for its reader: it finished, failed or was closed."""
        if self._hooks is None:
            hook()
        else:
            self._hooks.append(hook)

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Any:
        try:
            value = self._sink.take(self._wait_limit)
        except BaseException:
            self._ended()
            raise
        if value is FINISHED:
            self._ended()
            raise StopIteration
        if self._consumed is not None:
            self._consumed()
        return value

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        import asyncio

        try:
            value = await self._sink.take_async()
        except asyncio.CancelledError:
            self.close()
            raise
        except BaseException:
            self._ended()
            raise
        if value is FINISHED:
            self._ended()
            raise StopAsyncIteration
        if self._consumed is not None:
            self._consumed()
        return value

    def _ended(self) -> None:
        cancel, hooks, self._cancel, self._hooks = self._cancel, self._hooks, None, None
        _close(self._sink, None, hooks)
        del cancel

    def close(self) -> None:
        """Stop the stream: the worker closes the model's generator and takes its next call; chunks not
        taken yet are dropped. Idempotent; once the stream ended, it only drops what is left."""
        cancel, hooks, self._cancel, self._hooks = self._cancel, self._hooks, None, None
        _close(self._sink, cancel, hooks)

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        hooks = getattr(self, "_hooks", None)
        # At interpreter exit the pool's exit hook has stopped the pool already, and no thread can
        # start any more (the closer's Thread.start() would wait for it forever): nothing to close.
        if hooks is not None and not sys.is_finalizing():
            # Not close() here: garbage collection may run this in any thread, while it holds a lock
            # that cancelling takes (the scheduler's, a channel's). A SimpleQueue put is safe here.
            _closer().put(functools.partial(_close, self._sink, self._cancel, hooks))


def _close(sink: Sink, cancel: Callable[[], None] | None, hooks: list[Callable[[], None]] | None) -> None:
    running = not sink.ended
    sink.discard()
    if cancel is not None and running:
        cancel()
    for hook in hooks or ():
        hook()


_closer_queue: tuple[int, queue.SimpleQueue[Callable[[], None]]] | None = None
_closer_lock = threading.Lock()


def _closer() -> queue.SimpleQueue[Callable[[], None]]:
    """The queue of a daemon thread (one per process) that closes the streams garbage collection
    finds: cancelling takes locks, which a finalizer must not."""
    global _closer_queue
    current = _closer_queue
    if current is not None and current[0] == os.getpid():
        return current[1]
    with _closer_lock:
        if _closer_queue is None or _closer_queue[0] != os.getpid():
            todo: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
            threading.Thread(target=_run_closer, args=(todo,), name="torchpool-stream-closer",
                             daemon=True).start()
            _closer_queue = (os.getpid(), todo)
        return _closer_queue[1]


def _run_closer(todo: queue.SimpleQueue[Callable[[], None]]) -> None:
    while True:
        close = todo.get()
        try:
            close()
        except Exception:
            log.exception("torchpool: closing a dropped stream failed")
        del close


# --- the process pool's half ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Open:
    """A stream of the pool still running."""

    sink: Sink
    timeout: float | None     # to each chunk: the call's timeout (TORCHPOOL_TIMEOUT or the view's)
    total: float | None       # TORCHPOOL_STREAM_TIMEOUT's deadline
    first: float | None = None


class StreamBook:
    """The pool's streams, and cancelling calls whose caller went away (Note [Streams]). The methods run
    in the manager thread unless said otherwise; state is guarded by the scheduler's lock."""

    def __init__(self, config: PoolConfig, sched: Scheduler[WorkerSlot], workers: WorkerSet, metrics: Metrics,
                 wake: Callable[[], None]) -> None:
        self._config = config
        self._sched = sched
        self._workers = workers
        self._metrics = metrics
        self._wake = wake
        self._open: dict[int, _Open] = {}                      # call id -> stream
        self._grace: list[tuple[float, int, WorkerSlot]] = []  # (kill at, job id, its worker)

    @property
    def open_count(self) -> int:
        return len(self._open)

    # --- caller threads ----------------------------------------------------------------------------------

    def start(self, call: Call, enqueue: Callable[[Call], None]) -> Stream:
        """Open *call* as a stream and ``enqueue`` it; its caller's iterator."""
        stream = self.open(call)
        try:
            enqueue(call)
        except BaseException:
            stream.close()
            raise
        return stream

    def cancellable(self, call: Call) -> Future[Any]:
        """The future of a plain *call*, whose cancellation drops the call if it has not started."""
        future = call.future
        assert future is not None
        future.add_done_callback(functools.partial(self.cancelled, call))
        return future

    def open(self, call: Call) -> Stream:
        """*call* is a stream: register it (before it is queued) and return its caller's iterator."""
        config = self._config
        now = call.enqueued
        total = None if config.stream_timeout is None else now + config.stream_timeout
        timeout = None if call.deadline is None else call.deadline - now  # new_call's
        call.deadline = min((t for t in (call.deadline, total) if t is not None), default=None)
        call.retries = 0
        call.target = (call.target[0], config.stream_buffer)
        record = _Open(Sink(), timeout, total)
        future = call.future
        assert future is not None
        with self._sched.lock:
            self._open[call.id] = record
        self._metrics.record_stream(1)
        book = weakref.ref(self)

        def ended(done: Future[Any]) -> None:
            stream_ended(record.sink, done)
            me = book()
            if me is not None:
                with me._sched.lock:
                    me._open.pop(call.id, None)
                me._metrics.record_stream(-1)

        future.add_done_callback(ended)
        wait = None if timeout is None else timeout + 5.0
        return Stream(record.sink, lambda: self.cancel(call), lambda: self.consumed(call, record), wait)

    def consumed(self, call: Call, record: _Open) -> None:
        """The caller took a chunk: one more credit for the worker, and the deadline moves on."""
        job = call.job
        if job is None or record.sink.ended:
            return
        self._move_deadline(call, record, time.monotonic())
        slot = job.slot
        channel = slot.channel
        if channel is not None:
            try:
                channel.send(messages.Credit(job.id, 1, slot.releases.drain()))
            except OSError:
                pass  # the worker died: the manager fails the stream

    def cancelled(self, call: Call, future: Future[Any]) -> None:
        """The done-callback of a plain call's future: :meth:`cancel` it if its caller cancelled it."""
        if future.cancelled():
            self.cancel(call, stream=False)

    def cancel(self, call: Call, stream: bool = True) -> None:
        """The caller of *call* went away: drop it if it has not started; a running stream is stopped
        (and its worker killed if it does not stop within :data:`CANCEL_GRACE`); a running plain call
        finishes and its result is discarded."""
        sched = self._sched
        tell: tuple[WorkerSlot, int] | None = None
        with sched.lock:
            if call.state is CallState.DONE:
                return
            queued = call.state is CallState.QUEUED
            job = call.job
            sched.finish(call, exc=CancelledError())
            if queued:
                try:
                    sched.queue.remove(call)
                except ValueError:
                    pass
            elif job is not None and job.sent and not job.alive() and job.slot.jobs.get(job.id) is job:
                job.expired = True
                tell = (job.slot, job.id)
                if stream:
                    heapq.heappush(self._grace, (time.monotonic() + CANCEL_GRACE, job.id, job.slot))
        sched.flush()
        if tell is not None:
            slot, job_id = tell
            channel = slot.channel
            try:
                if channel is not None:
                    channel.send(messages.Cancel(job_id))
                    channel.send(messages.Credit(job_id, 0, slot.releases.drain()))
            except OSError:
                pass
            if stream:
                self._wake()  # a new kill time for the manager

    # --- the manager thread ------------------------------------------------------------------------------

    def on_chunk(self, slot: WorkerSlot, msg: messages.StreamChunk, fds: list[int]) -> None:
        now = time.monotonic()
        with self._sched.lock:
            job = slot.jobs.get(msg.id)
            call = job.members[0] if job is not None and job.members else None
            live = call is not None and call.state is not CallState.DONE
            record = self._open.get(call.id) if call is not None and live else None
        if record is None or call is None or slot.arena is None:
            _discard(slot, msg, fds)  # nobody reads it any more: the blocks go straight back
            return
        try:
            value = codec.unflatten(msg.value, shm.read_refs(slot.arena, msg.refs, fds, slot.releases,
                                                             arrays=call.numpy))
        except Exception as err:  # a malformed chunk is a worker bug; the stream must not hang
            with self._sched.lock:
                self._sched.finish(call, exc=OutputError(f"cannot read a chunk of the stream: {err}"))
            self._sched.flush()
            return
        if record.sink.put(value):
            first = record.first is None
            if first:
                record.first = now
            self._metrics.record_chunk(now - call.enqueued if first else None)
            self._move_deadline(call, record, now)

    def on_message(self, slot: WorkerSlot, msg: messages.StreamChunk | messages.StreamEnd,
                   fds: list[int]) -> None:
        if isinstance(msg, messages.StreamChunk):
            self.on_chunk(slot, msg, fds)
        else:  # the end: complete the call, free its inputs and its worker
            self._sched.complete(slot, messages.Result(msg.id, None, ()), fds)

    def _move_deadline(self, call: Call, record: _Open, now: float) -> None:
        # A float written without the lock: _Deadlines.expire re-reads it before it fails the call.
        nxt = None if record.timeout is None else now + record.timeout
        call.deadline = min((t for t in (nxt, record.total) if t is not None), default=None)

    def timeout_error(self, call: Call, waited: float) -> InferenceTimeoutError | None:
        """The error of a stream past its deadline (None: *call* is not a stream)."""
        record = self._open.get(call.id)
        if record is None:
            return None
        if record.total is not None and record.total <= time.monotonic():
            why = (f"the stream did not end within TORCHPOOL_STREAM_TIMEOUT={self._config.stream_timeout:g}s "
                   f"({record.sink.chunks} chunks)")
        else:
            done = "no chunk yet" if record.first is None else f"after {record.sink.chunks} chunks"
            why = (f"the stream made no progress for {record.timeout or 0:g}s (TORCHPOOL_TIMEOUT or the "
                   f"view's timeout; {done}): "
                   "the model produced no chunk, or the view took none")
        return InferenceTimeoutError(f"{why}. Raise the timeout, or add workers")

    def stop_later(self, slot: WorkerSlot, job_id: int) -> None:
        """Under the lock: a stream past its deadline: tell the worker to stop it now and kill it if it
        has not within :data:`CANCEL_GRACE`."""
        heapq.heappush(self._grace, (time.monotonic() + CANCEL_GRACE, job_id, slot))

    def next_kill(self) -> float | None:
        """Under the lock."""
        return self._grace[0][0] if self._grace else None

    def kill_due(self, now: float) -> None:
        """Kill the workers still running a stream they were told to stop :data:`CANCEL_GRACE` ago."""
        kill = []
        with self._sched.lock:
            while self._grace and self._grace[0][0] <= now:
                _, job_id, slot = heapq.heappop(self._grace)
                arena = slot.arena
                if arena is None or slot.jobs.get(job_id) is None or arena.running != job_id \
                        or slot.state is not WorkerState.READY:
                    continue  # it stopped, or died
                slot.state = WorkerState.DEAD
                slot.killed_for = (f"the pool killed it: it did not stop a cancelled stream within "
                                   f"{CANCEL_GRACE:g}s (stuck inside the model's generator?)")
                kill.append(slot)
        for slot in kill:
            self._workers.kill(slot)


def _discard(slot: WorkerSlot, msg: messages.StreamChunk, fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    for ref in msg.refs:
        if ref.seg == -1 and ref.nbytes:
            slot.releases(ref.offset)
