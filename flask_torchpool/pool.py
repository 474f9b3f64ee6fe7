"""The supervisor: start workers, route calls to them, notice deaths, respawn, drain and shut down.

How a call travels (see also docs/design.rst)::

    caller thread                     manager thread                        worker process
    -------------                     --------------                        --------------
    submit(args) --flatten/validate
      | worker free? --> write tensors into that worker's arena (inputs half)
      |                  send Call header ------------------------------------> run model
      | else: queue (bounded, TORCHPOOL_MAX_QUEUE)                               write outputs
      v                                                                          (outputs half)
    Future <------------ set result <-- wait([conns, sentinels, wakeup]) <----- Result header
                          (reads outputs, frees input blocks, dispatches queued calls)

One manager thread per pool blocks in ``multiprocessing.connection.wait`` on every worker's socket, every
worker's process sentinel and a wakeup pipe, with a timeout that is the next deadline or respawn time; it
never polls. It receives results, fails calls whose deadline passed, handles deaths (fail or retry the
calls that were on the worker, respawn with backoff within a restart budget) and runs the shutdown
sequence. It is also the only thread that spawns processes: ``PR_SET_PDEATHSIG`` fires when the *thread*
that forked exits, so workers must be children of a thread that lives as long as the pool. The same
selector holds each worker's stdout and stderr pipes: the manager forwards what workers log and print
to the app's logger (:mod:`flask_torchpool.logs`).

What a worker runs is a *job*: one call, or a batch of calls (``TORCHPOOL_MAX_BATCH_SIZE``) whose inputs
agree on everything but dim 0. Callers place their own call when a worker has room
(``TORCHPOOL_PIPELINE_DEPTH`` jobs outstanding per worker, least outstanding first), so copying tensors into
the arena happens in parallel in the callers' threads; a queued call is placed by whichever thread frees a
worker. See Note [Batching] for how batches form.
"""

from __future__ import annotations

import atexit
import bisect
import enum
import heapq
import itertools
import logging
import os
import pickle
import selectors
import signal
import threading
import time
import traceback
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing import reduction
from typing import Any, Callable

import torch
import torch.multiprocessing as tmp

from . import codec, messages, shm
from .config import PoolConfig
from .errors import (
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    OutputError,
    PoolClosedError,
    PoolOverloadedError,
    RemoteTraceback,
    TorchPoolError,
    WorkerCrashedError,
    WorkerStartupError,
)
from .logs import WorkerOutput
from .metrics import Metrics, outcome_of
from .placement import Placement
from .status import ModelStatus, model_status, worker_status
from .status import WorkerState as StatusState

log = logging.getLogger(__name__)

_ids = itertools.count(1)
_SPAWN = tmp.get_context("spawn")
#: Pools whose manager thread runs (it holds them alive), for the exit hook in extension.py.
_running_pools: weakref.WeakSet[Pool] = weakref.WeakSet()

# Note [Batching]
# ~~~~~~~~~~~~~~~
# A call is batchable when batching is on (TORCHPOOL_MAX_BATCH_SIZE > 1, and the view did not opt out),
# it carries at least one tensor, and all its tensors have the same size n >= 1 along dim 0. Its *key* is
# its structure with the non-tensor values, plus (dtype, shape[1:]) of every tensor: calls with the same
# key can run as one forward pass on their inputs stacked along dim 0.
#
# A batch is a job opened on a worker with room. It reserves, for every tensor of the key, one block of
# max_batch_size rows in that worker's arena; each member copies its rows straight into its slice, in its
# own thread (no staging copy, no torch.cat). The size limit counts rows, not calls, and is strict: a call
# that does not fit starts the next batch. A batch is sent when it is full, when the oldest member has
# waited TORCHPOOL_MAX_BATCH_DELAY_MS, or at once when its worker has nothing else to do, so that light
# traffic adds no delay and batches fill exactly when the workers are busy. The pipeline depth counts jobs,
# not calls, so it never caps how full a batch gets. The worker runs a batch like any call; the web
# process splits every output tensor along dim 0 back to the members, and an error reaches the members
# of that batch only.


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DEAD = "dead"          # died; a respawn is scheduled
    FAILED = "failed"      # restart budget spent; retried after TORCHPOOL_RESTART_WINDOW
    STOPPED = "stopped"


class _CallState(enum.Enum):
    QUEUED = "queued"
    PLACED = "placed"      # a member of a job on a worker
    DONE = "done"


@dataclass(eq=False)
class _Call:
    """One caller's call."""

    args: Any
    kwargs: Any
    tensors: list[torch.Tensor]
    future: Future[Any] | None  # None once finished
    deadline: float | None
    retries: int
    key: Any = None        # batch key, None when not batchable
    rows: int = 0          # size along dim 0 when batchable
    id: int = field(default_factory=lambda: next(_ids))
    state: _CallState = _CallState.QUEUED
    job: _Job | None = None
    enqueued: float = field(default_factory=time.monotonic)
    dispatched: float | None = None


@dataclass(eq=False)
class _Job:
    """What a worker runs: one call, or a batch of calls stacked along dim 0."""

    worker: _Worker
    key: Any = None                  # None: a single unbatched call
    id: int = field(default_factory=lambda: next(_ids))
    members: list[_Call] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)   # first row of each member
    rows: int = 0
    capacity: int = 0
    slots: list[tuple[int, int]] = field(default_factory=list)  # batch: (offset, bytes per row) a tensor
    blocks: list[int] = field(default_factory=list)   # input blocks to free when the worker is done
    kept: set[int] = field(default_factory=set)       # of those, blocks zero-copy outputs still use
    fds: list[int] = field(default_factory=list)      # one-off segments of a single call
    refs: tuple[shm.TensorRef, ...] = ()
    writers: int = 0       # members still copying their inputs in
    sealed: bool = False   # takes no more members
    sent: bool = False
    expired: bool = False  # every member finished without it (deadline) while the worker may run it
    opened: float = field(default_factory=time.monotonic)
    sent_at: float = 0.0

    def alive(self) -> bool:
        return any(m.state is not _CallState.DONE for m in self.members)


@dataclass(eq=False)
class _Worker:
    """One worker slot. A respawn replaces the process, channel and arena, and keeps the slot."""

    placement: Placement
    state: WorkerState = WorkerState.STOPPED
    process: Any = None
    channel: messages.Channel | None = None
    output: list[WorkerOutput] = field(default_factory=list)   # its stdout and stderr pipes
    arena: shm.Arena | None = None
    inputs: shm.Allocator | None = None
    releases: shm.ReleaseQueue = field(default_factory=shm.ReleaseQueue)
    jobs: dict[int, _Job] = field(default_factory=dict)   # opened, sent or running
    pid: int | None = None
    restarts: deque[float] = field(default_factory=deque[float])   # monotonic times of recent restarts
    total_restarts: int = 0
    calls: int = 0
    errors: int = 0
    killed_for: str | None = None   # why the pool killed it, for the crash message
    last_reply: float = 0.0         # monotonic time of its last message
    last_exit: str | None = None
    respawn_at: float | None = None

    @property
    def index(self) -> int:
        return self.placement.worker

    @property
    def load(self) -> int:
        return sum(1 for j in self.jobs.values() if not j.expired)

    @property
    def idle(self) -> bool:
        """Nothing sent or ready to send (open batches still taking members do not count)."""
        return not any((j.sent or j.sealed) and not j.expired for j in self.jobs.values())


class Pool:
    """A pool of model workers. Thread-safe; one per app (see :class:`~flask_torchpool.TorchPool`)."""

    enforces_deadlines = True

    def __init__(self, config: PoolConfig, placements: list[Placement], name: str = "torchpool",
                 logger_name: str = "flask_torchpool.worker") -> None:
        self.config = config
        self.name = name
        #: The logger that what the workers log and print goes to (the Flask app's logger).
        self.logger_name = logger_name
        self.workers = [_Worker(p) for p in placements]
        self._lock = threading.Lock()
        self._queue: deque[_Call] = deque()
        self._open: dict[Any, _Job] = {}   # batch key -> the batch taking members
        self._deadlines: list[tuple[float, int, _Call]] = []
        self._next_wake = float("inf")
        self._wakeup_r, self._wakeup_w = _SPAWN.Pipe(duplex=False)
        self._manager: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: WorkerStartupError | None = None
        self._closing = False        # no new calls
        self._drain_deadline: float | None = None
        self._stopped = threading.Event()
        self._start_lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._workers_changed = True  # the manager re-registers sockets and sentinels
        # Futures are resolved outside the lock (a done-callback may submit again): _finish queues them
        # here and _flush resolves them once the lock is released.
        self._done: deque[tuple[Future[Any], Any, BaseException | None]] = deque()
        self._outbox: deque[_Job] = deque()  # jobs claimed for sending, sent by _flush likewise
        self._batch_delay = config.max_batch_delay_ms / 1000.0
        # Note [Shared weights] (worker.py): the segment, its layout, who fills it, who waits for it.
        self._weights_fd: int | None = None
        self._weights: tuple[str, int] | None = None
        self._weights_filled = False
        self._weights_filler: _Worker | None = None
        self._weights_waiting: list[_Worker] = []
        self.metrics = Metrics(config.name)
        self.counters = {"calls": 0, "ok": 0, "errors": 0, "timeouts": 0, "crashes": 0, "overloaded": 0,
                         "retries": 0, "batches": 0}

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started.is_set() and self._startup_error is None

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def placements(self) -> list[Placement]:
        return [w.placement for w in self.workers]

    def start(self) -> None:
        """Spawn every worker and return once each has loaded its model.

        Raises :class:`WorkerStartupError` (with the worker's traceback as ``__cause__``) if one fails,
        dies or does not load within ``TORCHPOOL_START_TIMEOUT``; the other workers are stopped then.
        """
        with self._start_lock:
            if self._closing:
                raise PoolClosedError("the pool is shut down; create a new TorchPool to serve again")
            if self._manager is None:
                self._manager = threading.Thread(target=self._manage, name=f"{self.name}-manager",
                                                 daemon=True)
                _running_pools.add(self)
                self._manager.start()
            if not self._started.wait(self.config.start_timeout):
                with self._lock:
                    missing = [w.index for w in self.workers if w.state is not WorkerState.READY]
                    self._startup_error = WorkerStartupError(
                        f"worker(s) {missing} did not load the model within TORCHPOOL_START_TIMEOUT="
                        f"{self.config.start_timeout:g}s; the model may be too slow to build, or stuck")
                self.shutdown(wait=True, drain_timeout=0)
            if self._startup_error is not None:
                self._stopped.wait(self.config.drain_timeout + 10)
                raise self._startup_error

    def shutdown(self, wait: bool = True, drain_timeout: float | None = None) -> None:
        """Stop accepting calls, let calls in flight finish (up to *drain_timeout*, default
        ``TORCHPOOL_DRAIN_TIMEOUT``), then stop every worker. Idempotent; safe from any thread."""
        if os.getpid() != self._owner_pid:
            return  # a forked child must not touch its parent's workers
        drain = self.config.drain_timeout if drain_timeout is None else drain_timeout
        with self._lock:
            deadline = time.monotonic() + drain
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
            self._closing = True
            if drain == 0:
                for call in list(self._queue):
                    self._finish(call, exc=PoolClosedError("the pool shut down before this call ran",
                                                      retry_after=self.config.retry_after))
                self._queue.clear()
        self._flush()
        manager = self._manager
        if manager is None:
            self._stopped.set()
            return
        self._wake()
        if wait and manager is not threading.current_thread():
            manager.join()

    # --- calls ----------------------------------------------------------------------------------------

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               batch: bool = True) -> Future[Any]:
        """Queue one call; the returned future holds the model's output or a :class:`TorchPoolError`.

        Input that cannot travel is refused here, in the calling thread, before anything is queued.
        """
        skel_args, skel_kwargs, tensors = codec.flatten_call(args, kwargs, self.config.max_input_bytes)
        timeout = self.config.timeout if timeout is None else timeout
        future: Future[Any] = Future()
        call = _Call(skel_args, skel_kwargs, tensors, future,
                     None if timeout is None else time.monotonic() + timeout, self.config.retries)
        if batch and self.config.max_batch_size > 1:
            call.key, call.rows = _batch_key(call)
        future.set_running_or_notify_cancel()
        with self._lock:
            self._check_open()
            job = self._place(call)
            if job is None:
                if len(self._queue) >= self.config.max_queue:
                    self.counters["overloaded"] += 1
                    self.metrics.record_call("overloaded")
                    raise PoolOverloadedError(
                        f"{len(self._queue)} calls are already waiting (TORCHPOOL_MAX_QUEUE="
                        f"{self.config.max_queue}); try again shortly",
                        retry_after=self.config.retry_after)
                self._queue.append(call)
            self.counters["calls"] += 1
            wake = False
            if call.deadline is not None:
                heapq.heappush(self._deadlines, (call.deadline, call.id, call))
                wake = call.deadline < self._next_wake
            if job is not None and job.key is not None and not job.sealed and self._batch_delay:
                wake = wake or job.opened + self._batch_delay < self._next_wake
        if job is not None:
            self._write(job, call)
        else:
            self._flush()
        if wake:
            self._wake()
        return future

    def _check_open(self) -> None:
        if self._closing:
            raise PoolClosedError("the pool is shutting down and takes no new calls",
                                  retry_after=self.config.retry_after)
        if self._startup_error is not None:
            raise self._startup_error
        if self.workers and all(w.state is WorkerState.FAILED for w in self.workers):
            raise PoolClosedError(
                "no worker is left to serve: every worker crashed more than TORCHPOOL_MAX_RESTARTS="
                f"{self.config.max_restarts} times within {self.config.restart_window:g}s; they are "
                "retried after TORCHPOOL_RESTART_WINDOW (see the log for their exit causes)",
                retry_after=int(self.config.restart_window))

    def _pick_worker(self) -> _Worker | None:
        best = None
        for w in self.workers:
            if w.state is WorkerState.READY and len(w.jobs) < self.config.pipeline_depth:
                if best is None or w.load < best.load:
                    best = w
        return best

    def _place(self, call: _Call, seal_idle: bool = True) -> _Job | None:
        """Under the lock: put *call* in an open batch or a new job, or return None (no room).

        The caller must then :meth:`_write` the call's inputs (outside the lock). With *seal_idle*, a
        batch opened on an idle worker is sealed at once; :meth:`_dispatch` passes False so that every
        queued call that fits joins the batch first."""
        if call.key is not None:
            job = self._open.get(call.key)
            if job is not None and job.rows + call.rows > job.capacity:
                self._seal(job)
                self._maybe_send(job)
                job = None
            if job is None:
                worker = self._pick_worker()
                if worker is None:
                    return None
                job = self._open_batch(worker, call, seal_idle)
            if job is not None:
                self._join(job, call)
                if job.rows >= job.capacity:
                    self._seal(job)
                return job
        worker = self._pick_worker()
        if worker is None:
            return None
        job = _Job(worker, sealed=True)
        worker.jobs[job.id] = job
        self._join(job, call)
        return job

    def _open_batch(self, worker: _Worker, call: _Call, seal_idle: bool = True) -> _Job | None:
        """A batch for *call*'s key on *worker*, with max_batch_size rows reserved per tensor; None
        when the arena has no room for that (the call then runs alone)."""
        capacity = max(self.config.max_batch_size, call.rows)
        assert worker.inputs is not None
        slots: list[tuple[int, int]] = []
        blocks: list[int] = []
        for t in call.tensors:
            row_bytes = codec.tensor_nbytes(t) // call.rows
            offset = worker.inputs.alloc(row_bytes * capacity)
            if offset is None:
                for b in blocks:
                    worker.inputs.free(b)
                return None
            slots.append((offset, row_bytes))
            blocks.append(offset)
        idle = worker.idle
        job = _Job(worker, key=call.key, capacity=capacity, slots=slots, blocks=blocks)
        worker.jobs[job.id] = job
        self._open[call.key] = job
        # Nothing running on the worker: waiting would only add latency (Note [Batching]).
        if seal_idle and (idle or not self._batch_delay):
            self._seal(job)
        return job

    def _join(self, job: _Job, call: _Call) -> None:
        call.state = _CallState.PLACED
        call.job = job
        if call.dispatched is None:
            call.dispatched = time.monotonic()
        job.members.append(call)
        job.starts.append(job.rows)
        job.rows += call.rows
        job.writers += 1

    def _seal(self, job: _Job) -> None:
        job.sealed = True
        if job.key is not None and self._open.get(job.key) is job:
            del self._open[job.key]

    def _write(self, job: _Job, call: _Call) -> None:
        """Copy *call*'s inputs into *job*'s arena blocks; the last writer of a sealed job sends it.
        Runs outside the lock, in the thread that placed the call, so copies run in parallel."""
        worker, arena = job.worker, job.worker.arena
        error: BaseException | None = None
        placer = None
        try:
            if arena is None:
                pass  # the worker died meanwhile; its death requeued the call
            elif job.key is None:
                assert worker.inputs is not None
                placer = shm.Placer(arena, worker.inputs)
                job.refs = tuple(placer.place(t) for t in call.tensors)
            else:
                start = job.starts[job.members.index(call)]
                for t, (offset, row_bytes) in zip(call.tensors, job.slots):
                    shm.copy_into(arena.view(offset + start * row_bytes, row_bytes * call.rows, t.dtype,
                                            tuple(t.shape)), t)
        except BaseException as exc:
            error = exc
        with self._lock:
            if placer is not None:
                job.blocks.extend(placer.blocks)
                job.fds.extend(placer.fds)
            job.writers -= 1
            if error is not None and call.state is not _CallState.DONE:
                self._finish(call, exc=_write_error(error, self.config.retry_after))
            self._maybe_send(job)
        self._flush()

    def _maybe_send(self, job: _Job) -> None:
        """Under the lock: if *job* is sealed and written, claim it for :meth:`_flush` to send. Drops a
        job nobody waits for any more."""
        if job.sent or not job.sealed or job.writers or not job.members:
            return
        if job.worker.jobs.get(job.id) is not job:
            return  # its worker died; the members were requeued
        if not job.alive():
            self._drop(job)
            return
        job.sent = True
        job.sent_at = time.monotonic()
        self._outbox.append(job)

    def _drop(self, job: _Job) -> None:
        """Under the lock: forget an unsent job (its members are done) and free its blocks."""
        job.worker.jobs.pop(job.id, None)
        if job.key is not None and self._open.get(job.key) is job:
            del self._open[job.key]
        if job.worker.inputs is not None:
            for offset in job.blocks:
                job.worker.inputs.free(offset)
        job.blocks = []
        for fd in job.fds:
            os.close(fd)
        job.fds = []

    def _send(self, job: _Job) -> None:
        """Send a claimed job's header to its worker."""
        first = job.members[0]
        if job.key is None:
            refs = job.refs
        else:
            refs = tuple(shm.TensorRef(-1, offset, row_bytes * job.rows, str(t.dtype),
                                      (job.rows, *t.shape[1:]))
                         for t, (offset, row_bytes) in zip(first.tensors, job.slots))
            self.counters["batches"] += 1
            self.metrics.record_batch(job.rows, len(job.members))
        msg = messages.Call(job.id, first.args, first.kwargs, refs, job.worker.releases.drain())
        channel = job.worker.channel
        try:
            if channel is None:
                raise OSError("no channel")
            channel.send(msg, tuple(job.fds))
        except OSError:
            pass  # the worker died; the manager sees its sentinel and deals with its jobs
        finally:
            for fd in job.fds:
                os.close(fd)
            job.fds = []

    def _dispatch(self) -> None:
        """Place queued calls (FIFO) while workers have room."""
        todo: list[tuple[_Job, _Call]] = []
        with self._lock:
            while self._queue:
                call = self._queue[0]
                if call.state is _CallState.DONE:
                    self._queue.popleft()
                    continue
                job = self._place(call, seal_idle=False)
                if job is None:
                    break
                self._queue.popleft()
                todo.append((job, call))
            for job in {id(j): j for j, _ in todo}.values():
                if not job.sealed and (not self._batch_delay or all(
                        j is job or not (j.sent or j.sealed) or j.expired for j in job.worker.jobs.values())):
                    self._seal(job)
        for job, call in todo:
            self._write(job, call)

    def _finish(self, call: _Call, result: Any = None, exc: BaseException | None = None) -> None:
        """Complete *call* once (under the lock). Later completions of the same call are ignored."""
        if call.state is _CallState.DONE:
            return
        call.state = _CallState.DONE
        call.tensors = []
        self.counters["ok" if exc is None else "errors"] += 1
        now = time.monotonic()
        self.metrics.record_call(outcome_of(exc), now - call.enqueued,
                                 None if call.dispatched is None else call.dispatched - call.enqueued)
        # The call may linger (the deadline heap drops finished calls lazily): it must not keep the
        # future, and so the result, alive, or zero-copy outputs would never go back to the worker.
        future, call.future = call.future, None
        if future is not None:
            self._done.append((future, result, exc))

    def _flush(self) -> None:
        """Send the jobs :meth:`_maybe_send` claimed and resolve the futures :meth:`_finish` queued.
        Call without the lock held."""
        while True:
            try:
                job = self._outbox.popleft()
            except IndexError:
                break
            self._send(job)
        while True:
            try:
                future, result, exc = self._done.popleft()
            except IndexError:
                return
            if exc is None:
                future.set_result(result)
            else:
                future.set_exception(exc)

    # --- the manager thread ---------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wakeup_w.send_bytes(b"")
        except OSError:
            pass

    def _manage(self) -> None:
        try:
            for worker in self.workers:
                self._spawn(worker)
            self._loop()
        except BaseException:
            log.critical("%s: the manager thread failed; stopping the pool\n%s", self.name,
                         traceback.format_exc())
            with self._lock:
                self._closing = True
                if not self._started.is_set():
                    self._startup_error = WorkerStartupError("the pool's manager thread failed: "
                                                             f"{traceback.format_exc(limit=1)}")
        finally:
            self._stop_all()
            self._started.set()
            self._stopped.set()

    def _loop(self) -> None:
        # One epoll set for the pool's life, changed only when a worker's process or socket changes:
        # building a selector per wait costs more than the whole round trip of a small call.
        with selectors.DefaultSelector() as selector:
            selector.register(self._wakeup_r, selectors.EVENT_READ, None)
            registered: dict[int, Any] = {}
            timers_due = 0.0
            while True:
                now = time.monotonic()
                if now >= timers_due or self._closing:
                    self._expire(now)
                    self._seal_due(now)
                    self._respawn_due(now)
                    if self._closing and self._drained(now):
                        return
                    timers_due = self._next_timer(now)
                if self._workers_changed:
                    self._workers_changed = False
                    self._sync_selector(selector, registered)
                events = selector.select(max(0.0, timers_due - time.monotonic()))
                # Output first: what a worker logged before it answered is logged before the caller
                # gets the answer (both are ready in the same wake-up, as the log was written first).
                for key, _ in events:
                    owner = key.data
                    if owner is not None and owner[1] == "output" and not owner[2].read():
                        self._workers_changed = True  # its end: stop waiting on it
                dead = []
                for key, _ in events:
                    owner = key.data
                    if owner is None:
                        while self._wakeup_r.poll():
                            self._wakeup_r.recv_bytes()
                        timers_due = 0.0  # a new, earlier deadline or a shutdown: recompute
                    elif owner[1] == "conn":
                        self._receive(owner[0])
                    elif owner[1] == "sentinel":
                        dead.append(owner[0])
                for worker in dead:
                    if worker.process is not None:
                        self._on_death(worker)
                if dead:
                    timers_due = 0.0
                self._flush()
                if self._queue:
                    self._dispatch()

    def _sync_selector(self, selector: selectors.BaseSelector, registered: dict[int, Any]) -> None:
        wanted: dict[int, Any] = {}
        for w in self.workers:
            if w.channel is not None:
                wanted[w.channel.fileno()] = (w, "conn", w.channel)
            if w.process is not None:
                wanted[w.process.sentinel] = (w, "sentinel", w.process)
            for out in w.output:
                if out.fd is not None and not out.eof:
                    wanted[out.fd] = (w, "output", out)
        for fd, owner in list(registered.items()):
            if wanted.get(fd, (None, None, None))[2] is not owner[2]:
                try:
                    selector.unregister(fd)
                except (KeyError, ValueError):
                    pass
                del registered[fd]
        for fd, owner in wanted.items():
            if fd not in registered:
                selector.register(fd, selectors.EVENT_READ, owner)
                registered[fd] = owner

    def _next_timer(self, now: float) -> float:
        """When the manager must next look at deadlines, batches, respawns or the drain. With nothing
        pending it still wakes one ``TORCHPOOL_TIMEOUT`` from now, so that a new call with the default
        timeout never needs to wake it (see :meth:`submit`)."""
        with self._lock:
            while self._deadlines and self._deadlines[0][2].state is _CallState.DONE:
                heapq.heappop(self._deadlines)
            times = [self._deadlines[0][0]] if self._deadlines else []
            times += [job.opened + self._batch_delay for job in self._open.values()]
            times += [w.respawn_at for w in self.workers if w.respawn_at is not None]
            if self._closing and self._drain_deadline is not None:
                times.append(self._drain_deadline)
            times.append(now + (self.config.timeout or 3600.0))
            self._next_wake = min(times)
            return self._next_wake

    def _seal_due(self, now: float, worker: _Worker | None = None) -> None:
        """Send open batches whose delay passed (or, with *worker*, the ones on that now idle worker)."""
        with self._lock:
            for job in list(self._open.values()):
                if (worker is not None and job.worker is worker) or job.opened + self._batch_delay <= now \
                        or self._closing:
                    self._seal(job)
                    self._maybe_send(job)
        self._flush()

    def _receive(self, worker: _Worker) -> None:
        channel = worker.channel
        assert channel is not None
        try:
            while channel.poll(0):
                msg, fds = channel.recv()
                self._on_message(worker, msg, fds)
        except (EOFError, OSError):
            # The worker is gone; its sentinel reports the death. Stop waiting on the closed socket.
            channel.close()
            worker.channel = None
            self._workers_changed = True

    def _on_message(self, worker: _Worker, msg: Any, fds: list[int]) -> None:
        kind = type(msg)
        worker.last_reply = time.monotonic()
        if kind is messages.Result or kind is messages.Failure:
            with self._lock:
                job = worker.jobs.pop(msg.id, None)
                members = [m for m in job.members if m.state is not _CallState.DONE] if job else []
            if not members:
                if kind is messages.Result:  # nobody wants it: hand the output blocks straight back
                    for fd in fds:
                        os.close(fd)
                    for ref in msg.refs:
                        if ref.seg == -1 and ref.nbytes:
                            worker.releases(ref.offset)
                self._free_inputs(worker, job)
            else:
                assert job is not None
                worker.calls += len(members)
                if kind is messages.Result:
                    results = self._split(job, msg, fds, worker)
                else:
                    worker.errors += 1
                    err = self._failure_error(msg)
                    results = [(None, err)] * len(job.members)
                # Only now: outputs that are inputs were read from these blocks (Note [Outputs that
                # are inputs], worker.py); the ones zero-copy views still use stay allocated.
                self._free_inputs(worker, job)
                with self._lock:
                    for member, (value, exc) in zip(job.members, results):
                        self._finish(member, value, exc)
                self._flush()
            if job is not None and job.key is not None or worker.idle:
                # The worker may now be idle: an open batch on it should not wait (Note [Batching]).
                self._seal_due(time.monotonic(), worker)
        elif kind is messages.Loaded:
            self._on_loaded(worker, msg)
        elif kind is messages.Ready:
            if worker is self._weights_filler:
                self._weights_filled = True
                self._weights_filler = None
                for waiting in self._weights_waiting:
                    self._adopt(waiting, fill=False)
                self._weights_waiting.clear()
            with self._lock:
                worker.state = WorkerState.READY
                worker.pid = msg.pid
                if worker.restarts:
                    log.warning("%s: worker %d is back (pid %d)", self.name, worker.index, msg.pid)
                if not self._started.is_set() and all(w.state is WorkerState.READY for w in self.workers):
                    log.info("%s: %d worker(s) ready", self.name, len(self.workers))
                    self._started.set()
        elif kind is messages.StartupFailed:
            err = WorkerStartupError(f"worker {worker.index} could not load the model "
                                     f"({self.config.model!r}): {msg.message}")
            err.__cause__ = RemoteTraceback(msg.tb)
            with self._lock:
                if not self._started.is_set():
                    self._startup_error = err
                    self._closing = True
                    self._drain_deadline = time.monotonic()
                    self._started.set()
                    return
            # The worker logged its traceback itself, just before this, unless its level hides it.
            tb = f"\n{msg.tb}" if self.config.worker_log_level > logging.ERROR else ""
            log.error("%s: worker %d failed to load the model on restart: %s%s", self.name,
                      worker.index, msg.message, tb)
            worker.killed_for = "its model failed to load"

    def _on_loaded(self, worker: _Worker, msg: messages.Loaded) -> None:
        """A worker built its model: hand it the shared weights (Note [Shared weights])."""
        if self._weights is None:
            self._weights = (msg.fingerprint, msg.nbytes)
            self._weights_fd = shm.create_memfd(msg.nbytes, "torchpool-weights")
        if self._weights != (msg.fingerprint, msg.nbytes):
            log.warning("%s: worker %d built a model with another layout than the shared weights; it "
                        "keeps its own copy (does the factory build different models?)", self.name,
                        worker.index)
            self._send_adopt(worker, share=False, fill=False)
        elif self._weights_filled:
            self._adopt(worker, fill=False)
        elif self._weights_filler is None:
            self._weights_filler = worker
            self._adopt(worker, fill=True)
        else:
            self._weights_waiting.append(worker)

    def _adopt(self, worker: _Worker, fill: bool) -> None:
        self._send_adopt(worker, share=True, fill=fill)

    def _send_adopt(self, worker: _Worker, share: bool, fill: bool) -> None:
        if worker.channel is None:
            return
        try:
            fds = (self._weights_fd,) if share and self._weights_fd is not None else ()
            worker.channel.send(messages.Adopt(share, fill), fds)
        except OSError:
            pass  # it died; its sentinel says so

    def _free_inputs(self, worker: _Worker, job: _Job | None) -> None:
        """Free a finished job's input blocks, except those kept for zero-copy outputs."""
        if job is None or worker.inputs is None:
            return
        for offset in job.blocks:
            if offset not in job.kept:
                worker.inputs.free(offset)
        job.blocks = []

    def _input_releaser(self, job: _Job, refs: tuple[shm.TensorRef, ...],
                        worker: _Worker) -> Callable[[int], None] | None:
        """For outputs that are views of *job*'s input blocks: mark those blocks kept, and return the
        callback that frees each block once every view of it is collected."""
        aliases = [r for r in refs if r.seg == shm.INPUT_ALIAS and r.nbytes >= shm.ZERO_COPY_MIN_BYTES]
        if not aliases or worker.inputs is None:
            return None
        allocator = worker.inputs
        blocks = sorted(job.blocks)

        def block_of(offset: int) -> int:
            return blocks[bisect.bisect_right(blocks, offset) - 1]

        counts: dict[int, int] = {}
        for ref in aliases:
            block = block_of(ref.offset)
            counts[block] = counts.get(block, 0) + 1
        job.kept = set(counts)
        lock = threading.Lock()

        def release(offset: int) -> None:
            block = block_of(offset)
            with lock:  # a leaf lock: garbage collection may call this from any thread
                counts[block] -= 1
                last = counts[block] == 0
            if last:
                allocator.free_later(block)

        return release

    def _split(self, job: _Job, msg: messages.Result, fds: list[int],
               worker: _Worker) -> list[tuple[Any, BaseException | None]]:
        """The result of each member of *job* (a plain call has one member)."""
        try:
            assert worker.arena is not None
            tensors = shm.read_refs(worker.arena, msg.refs, fds, worker.releases,
                                   self._input_releaser(job, msg.refs, worker))
        except Exception as err:  # a malformed reply is a worker bug; the calls must not hang
            return [(None, OutputError(f"cannot read the model's output: {err}"))] * len(job.members)
        if job.key is None:
            return [(codec.unflatten(msg.value, tensors), None)]
        for t in tensors:
            if t.dim() == 0 or t.shape[0] != job.rows:
                mismatch = OutputError(
                    f"the model returned a tensor of shape {tuple(t.shape)} for a batch of {job.rows} "
                    "rows; batched outputs must keep dim 0 aligned with the inputs. Turn batching off "
                    "for this view (@pool.infer(batch=False)) or return per-row outputs")
                return [(None, mismatch)] * len(job.members)
        out: list[tuple[Any, BaseException | None]] = []
        for member, start in zip(job.members, job.starts):
            part = [t[start:start + member.rows] for t in tensors]
            out.append((codec.unflatten(msg.value, part), None))
        return out

    def _failure_error(self, msg: messages.Failure) -> TorchPoolError:
        if msg.kind == "output":
            err: TorchPoolError = OutputError(msg.message, remote_type=msg.type_name)
        elif msg.kind == "input":
            err = InvalidInputError(f"the worker could not read the inputs: {msg.type_name}: {msg.message}")
        elif msg.kind == "cancelled":
            err = InferenceTimeoutError("the call was cancelled before it ran")
        else:
            err = InferenceError(f"the model raised {msg.type_name}: {msg.message}",
                                 remote_type=msg.type_name)
        if msg.tb:
            err.__cause__ = RemoteTraceback(msg.tb)
        return err

    def _expire(self, now: float) -> None:
        """Fail calls whose deadline passed; kill a worker still running a job nobody waits for."""
        kill: list[_Worker] = []
        cancel: list[tuple[_Worker, int]] = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, call = heapq.heappop(self._deadlines)
                if call.state is _CallState.DONE:
                    continue
                self.counters["timeouts"] += 1
                waited = now - call.enqueued
                queued = call.state is _CallState.QUEUED
                job = call.job
                self._finish(call, exc=InferenceTimeoutError(
                    f"the call did not finish within its deadline ({waited:.3g}s; it was "
                    f"{'waiting for a worker' if queued else 'in a worker'}). Raise TORCHPOOL_TIMEOUT "
                    "or the view's timeout, or add workers"))
                if queued:
                    self._queue.remove(call)
                    continue
                if job is None or job.alive() or not job.sent:
                    continue  # others still want the job, or it was never sent (dropped when sealed)
                job.expired = True
                worker = job.worker
                if worker.arena is None or worker.jobs.get(job.id) is not job:
                    continue
                running = worker.arena.running
                other = worker.jobs.get(running)
                # The control word may still show a job whose result was just read (the worker clears
                # it after replying): only this job, or another expired one, proves the worker stuck.
                stuck = running and (running == job.id or (other is not None and other.expired))
                # A job that never started on a worker that has not said a word since it was sent,
                # for the whole deadline, while running nothing: the worker is frozen (SIGSTOP, a
                # hang outside a call), not busy.
                frozen = (not running and worker.last_reply < job.sent_at
                          and not (worker.channel is not None and worker.channel.poll(0)))
                if stuck or frozen:
                    if worker not in kill:
                        kill.append(worker)
                        worker.killed_for = (
                            f"the pool killed it: a call ran past its deadline ({waited:.3g}s) while "
                            + ("the worker was running it" if stuck else
                               "the worker neither started it nor answered (frozen?)"))
                else:
                    cancel.append((worker, job.id))
        self._flush()
        for worker, job_id in cancel:
            try:
                if worker.channel is not None:
                    worker.channel.send(messages.Cancel(job_id))
            except OSError:
                pass
        for worker in kill:
            log.warning("%s: killing worker %d (pid %s): %s", self.name, worker.index, worker.pid,
                        worker.killed_for)
            _kill(worker.process)

    def _drained(self, now: float) -> bool:
        try:
            return self._drained_locked(now)
        finally:
            self._flush()

    def _drained_locked(self, now: float) -> bool:
        with self._lock:
            busy = bool(self._queue) or any(j.alive() for w in self.workers for j in w.jobs.values())
            if not busy:
                return True
            if self._queue and not any(w.state is WorkerState.READY for w in self.workers):
                # Draining with no worker left to run what is queued (they died meanwhile, and are not
                # respawned while closing): waiting for the drain deadline would change nothing.
                for call in list(self._queue):
                    self._finish(call, exc=PoolClosedError(
                        "the pool shut down before this call ran (no worker was left to run it)",
                        retry_after=self.config.retry_after))
                self._queue.clear()
                return not any(j.alive() for w in self.workers for j in w.jobs.values())
            if self._drain_deadline is not None and now >= self._drain_deadline:
                for call in list(self._queue):
                    self._finish(call, exc=PoolClosedError("the pool shut down before this call ran",
                                                      retry_after=self.config.retry_after))
                self._queue.clear()
                for w in self.workers:
                    for job in list(w.jobs.values()):
                        for call in job.members:
                            self._finish(call, exc=PoolClosedError(
                                "the pool shut down before this call finished (TORCHPOOL_DRAIN_TIMEOUT)",
                                retry_after=self.config.retry_after))
                return True
        return False

    # --- worker processes -----------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        size = self.config.arena_bytes
        fd = shm.create_memfd(size, f"torchpool-w{worker.index}")
        pipes: list[tuple[int, int]] = []
        try:
            arena = shm.Arena(fd, size)
            for _ in ("stdout", "stderr"):
                pipes.append(os.pipe())
            parent_end, child_end = _SPAWN.Pipe(duplex=True)
            from .worker import worker_main

            name = f"{self.name}-worker-{worker.index}"
            process = _SPAWN.Process(
                target=worker_main, name=name, daemon=True,
                args=(worker.placement, self.config.model, child_end, _InheritedFd(fd), size,
                      os.getpid(), self.config.share_weights,
                      tuple(_InheritedFd(w) for _, w in pipes), self.config.worker_log_level))
            process.start()
        except BaseException:
            for r, _ in pipes:
                os.close(r)
            raise
        finally:
            os.close(fd)
            for _, w in pipes:
                os.close(w)  # the worker's copies are the only writers left: its death ends the streams
        child_end.close()
        assert process.pid is not None
        output = [WorkerOutput(r, stream, self.logger_name, worker.index, process.pid, name)
                  for (r, _), stream in zip(pipes, ("stdout", "stderr"))]
        with self._lock:
            worker.process = process
            worker.pid = process.pid
            worker.channel = messages.Channel(parent_end, messages.WORKER_PROTOCOL)
            worker.output = output
            worker.arena = arena
            worker.inputs = shm.Allocator(*arena.inputs)
            worker.releases = shm.ReleaseQueue()
            worker.state = WorkerState.STARTING
            worker.killed_for = None
            worker.respawn_at = None
            self._workers_changed = True
        log.debug("%s: spawned worker %d (pid %d): %s", self.name, worker.index, process.pid,
                  worker.placement.describe())

    def _on_death(self, worker: _Worker) -> None:
        process = worker.process
        # The sentinel closes while the process exits, a moment before it can be reaped.
        process.join(5.0)
        # What it wrote last (the line before os._exit, a traceback, a native crash's stack) is logged
        # before its death is, and before the callers hear of it.
        self._close_output(worker)
        exitcode = process.exitcode
        cause = worker.killed_for or _likely_cause(exitcode)
        signame = _signal_name(exitcode)
        worker.last_exit = f"exit code {exitcode}" + (f" ({signame})" if signame else "") + f": {cause}"
        if worker.channel is not None:
            self._receive(worker)  # results it sent before dying still count
        if worker.channel is not None:
            worker.channel.close()
        if worker in self._weights_waiting:
            self._weights_waiting.remove(worker)
        if worker is self._weights_filler:
            # It died while filling the shared weights: the next waiting worker fills them afresh.
            self._weights_filler = None
            if self._weights_waiting:
                self._weights_filler = self._weights_waiting.pop(0)
                self._adopt(self._weights_filler, fill=True)
        with self._lock:
            running = worker.arena.running if worker.arena is not None else 0
            jobs = list(worker.jobs.values())
            worker.jobs.clear()
            for job in jobs:
                if job.key is not None and self._open.get(job.key) is job:
                    del self._open[job.key]
                for fd in job.fds:
                    os.close(fd)
                job.fds = []
            worker.process = None
            worker.channel = None
            worker.arena = None  # outputs still referenced by callers keep their own mapping alive
            worker.inputs = None
            self._workers_changed = True
            was_ready = worker.state is WorkerState.READY
            starting_up = not self._started.is_set()
            requeue = []
            affected = 0
            for job in jobs:
                ran = job.id == running
                for call in job.members:
                    if call.state is _CallState.DONE:
                        continue
                    affected += 1
                    call.job = None
                    if not ran:
                        requeue.append(call)  # it never started: safe to run elsewhere, no retry used
                    elif call.retries > 0 and not self._closing:
                        call.retries -= 1
                        self.counters["retries"] += 1
                        requeue.append(call)
                    else:
                        self.counters["crashes"] += 1
                        self._finish(call, exc=WorkerCrashedError(
                            f"worker {worker.index} (pid {worker.pid}) died while running this call: "
                            f"{worker.last_exit}", retry_after=self.config.retry_after, pid=worker.pid,
                            exitcode=exitcode, signal=signame))
            for call in sorted(requeue, key=lambda c: c.enqueued, reverse=True):
                call.state = _CallState.QUEUED
                self._queue.appendleft(call)
            if starting_up:
                if self._startup_error is None:
                    self._startup_error = WorkerStartupError(
                        f"worker {worker.index} (pid {worker.pid}) died while loading the model: "
                        f"{worker.last_exit}")
                self._closing = True
                self._drain_deadline = time.monotonic()
                worker.state = WorkerState.STOPPED
                self._started.set()
            elif self._closing:
                worker.state = WorkerState.STOPPED
            else:
                self._schedule_respawn(worker)
        self._flush()
        if worker.state is WorkerState.STOPPED:
            return
        level = logging.ERROR if was_ready else logging.WARNING
        log.log(level, "%s: worker %d (pid %s) died, %s; %d call(s) affected; %s", self.name,
                worker.index, worker.pid, worker.last_exit, affected,
                f"respawning in {(worker.respawn_at or time.monotonic()) - time.monotonic():.2g}s"
                if worker.state is WorkerState.DEAD else
                f"restart budget spent, retrying in {self.config.restart_window:g}s")
        if all(w.state is WorkerState.FAILED for w in self.workers):
            self._fail_queue(PoolClosedError("no worker is left to serve (crash loop); see the log",
                                             retry_after=int(self.config.restart_window)))

    def _close_output(self, worker: _Worker) -> None:
        """Forward what is left in a gone worker's pipes and close them."""
        output, worker.output = worker.output, []
        for out in output:
            try:
                out.close()
            except Exception:  # a failing log handler must not keep the pool from handling a death
                log.exception("%s: cannot forward the output of worker %d", self.name, worker.index)
        if output:
            self._workers_changed = True

    def _wait_exits(self, deadline: float) -> None:
        """Wait until every worker process has exited or *deadline* passed, forwarding their output
        meanwhile: a worker that logs while it stops could otherwise block on a full pipe."""
        with selectors.DefaultSelector() as selector:
            alive = 0
            for worker in self.workers:
                if worker.process is None:
                    continue
                selector.register(worker.process.sentinel, selectors.EVENT_READ, None)
                alive += 1
                for out in worker.output:
                    if out.fd is not None and not out.eof:
                        selector.register(out, selectors.EVENT_READ, out)
            while alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                for key, _ in selector.select(left):
                    if key.data is None:
                        alive -= 1
                        selector.unregister(key.fileobj)
                    elif not key.data.read():
                        selector.unregister(key.fileobj)

    def _schedule_respawn(self, worker: _Worker) -> None:
        now = time.monotonic()
        while worker.restarts and worker.restarts[0] < now - self.config.restart_window:
            worker.restarts.popleft()
        worker.restarts.append(now)
        worker.total_restarts += 1
        n = len(worker.restarts)
        if n > self.config.max_restarts:
            worker.state = WorkerState.FAILED
            worker.restarts.clear()
            worker.respawn_at = now + self.config.restart_window
        else:
            worker.state = WorkerState.DEAD
            worker.respawn_at = now + min(0.1 * 2 ** (n - 1), 10.0)

    def _fail_queue(self, err: TorchPoolError) -> None:
        with self._lock:
            for call in list(self._queue):
                self._finish(call, exc=err)
            self._queue.clear()
        self._flush()

    def _respawn_due(self, now: float) -> None:
        for worker in self.workers:
            if worker.respawn_at is not None and worker.respawn_at <= now and not self._closing:
                try:
                    self._spawn(worker)
                except Exception:
                    log.exception("%s: cannot respawn worker %d", self.name, worker.index)
                    with self._lock:
                        self._schedule_respawn(worker)

    def _stop_all(self) -> None:
        """Fixed order: Stop message, join with timeout, SIGTERM, SIGKILL. Runs in the manager thread."""
        for worker in self.workers:
            if worker.channel is not None:
                try:
                    worker.channel.send(messages.Stop())
                except OSError:
                    pass
        deadline = time.monotonic() + 2.0
        self._wait_exits(deadline)
        for worker in self.workers:
            if worker.process is not None:
                worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(1.0)
            if worker.process is not None and worker.process.is_alive():
                _kill(worker.process)
                worker.process.join(1.0)
        for worker in self.workers:
            self._close_output(worker)
        with self._lock:
            for worker in self.workers:
                for job in worker.jobs.values():
                    for call in job.members:
                        self._finish(call, exc=PoolClosedError(
                            "the pool shut down before this call finished",
                            retry_after=self.config.retry_after))
                    for fd in job.fds:
                        os.close(fd)
                worker.jobs.clear()
                if worker.channel is not None:
                    worker.channel.close()
                if worker.process is not None:
                    try:
                        worker.process.close()
                    except ValueError:  # still running after SIGKILL + join: nothing more to do
                        pass
                worker.channel = worker.process = worker.arena = worker.inputs = None
                worker.state = WorkerState.STOPPED
            for call in self._queue:
                self._finish(call, exc=PoolClosedError("the pool shut down before this call ran",
                                                      retry_after=self.config.retry_after))
            self._queue.clear()
            self._open.clear()
            self._closing = True
        self._flush()
        if self._weights_fd is not None:
            os.close(self._weights_fd)
            self._weights_fd = None
        self._wakeup_r.close()
        self._wakeup_w.close()
        log.info("%s: stopped", self.name)

    # --- state ----------------------------------------------------------------------------------------

    def status(self) -> ModelStatus:
        with self._lock:
            workers = [worker_status(w.placement, _STATES[w.state], pid=w.pid, inflight=w.load, calls=w.calls,
                                     errors=w.errors, restarts=w.total_restarts, last_exit=w.last_exit)
                       for w in self.workers]
            snapshot = self.metrics.snapshot()
            snapshot["submitted"] = self.counters["calls"]
            snapshot["retries"] = self.counters["retries"]
            return model_status(
                mode="embedded", started=self.started, closed=self._closing, queued=len(self._queue),
                busy_workers=sum(1 for w in self.workers if w.jobs),
                arena_bytes=sum(self.config.arena_bytes for w in self.workers if w.arena is not None),
                shared_weight_bytes=self._weights[1] if self._weights and self._weights_filled else 0,
                metrics=snapshot, workers=workers, plan=self.placements)


_STATES = {s: StatusState(s.value) for s in WorkerState}


def _write_error(error: BaseException, retry_after: int) -> TorchPoolError:
    """What a caller gets when its inputs could not be written into the arena."""
    if isinstance(error, OSError):
        hint = (" (the open-file limit: raise it with ulimit -n)" if error.errno == 24 else "")
        return PoolOverloadedError(f"cannot place the inputs in shared memory: {error}{hint}",
                                   retry_after=retry_after)
    return InvalidInputError(f"cannot write the inputs: {type(error).__name__}: {error}")


def _batch_key(call: _Call) -> tuple[Any, int]:
    """(key, rows) of a batchable call, or (None, 0): see Note [Batching]."""
    if not call.tensors:
        return None, 0
    rows = None
    shapes = []
    for t in call.tensors:
        if t.dim() == 0:
            return None, 0
        if rows is None:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            return None, 0
        shapes.append((t.dtype, tuple(t.shape[1:])))
    if not rows:
        return None, 0
    try:
        structure = pickle.dumps((call.args, call.kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # pragma: no cover - flatten only lets picklable values through
        return None, 0
    return (structure, tuple(shapes)), rows


class _InheritedFd:
    """A descriptor for a spawned child, duplicated only while ``Process.start()`` pickles it.

    ``reduction.DupFd`` called any earlier finds no spawning process and falls back to
    multiprocessing's resource sharer, which listens on a Unix socket in a temp directory; while
    pickling, it adds the descriptor to the ones the child inherits instead."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_passthrough, (reduction.DupFd(self.fd),))


def _passthrough(value: Any) -> Any:
    return value


def _kill(process: Any) -> None:
    if process is not None and process.pid is not None:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return None


def _likely_cause(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown"
    if exitcode == -signal.SIGKILL:
        return ("killed by SIGKILL: probably the out-of-memory killer (check `dmesg` or the container's "
                "OOM events and the worker's memory), or someone ran kill -9")
    if exitcode in (-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGILL, -signal.SIGFPE, -signal.SIGABRT):
        return "a native crash in the model or one of its extensions"
    if exitcode < 0:
        return f"killed by {_signal_name(exitcode)}"
    if exitcode == 70:
        return "its parent process changed before it started"
    return "the worker process exited (sys.exit or os._exit in the model?)"


def _shutdown_running_pools() -> None:
    # Every running pool, including those whose app was garbage-collected (an app factory's app): this
    # runs before multiprocessing's own exit hook (registered earlier), which would SIGTERM the workers
    # under them.
    for pool in list(_running_pools):
        try:
            pool.shutdown(wait=True)
        except TorchPoolError:  # pragma: no cover
            pass


atexit.register(_shutdown_running_pools)
