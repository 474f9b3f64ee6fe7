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

One manager thread per pool blocks in a selector on every worker's socket, every worker's process
sentinel and a wakeup pipe, with a timeout that is the next deadline or respawn time; it never polls. It
receives results, fails calls whose deadline passed, handles deaths (fail or retry the calls that were on
the worker, respawn: Note [Restart policy] in :mod:`flask_torchpool.workers`) and runs the shutdown
sequence. It is also the only thread that spawns processes (see :mod:`flask_torchpool.workers`). The
same selector holds each worker's stdout and stderr pipes: the manager forwards what workers log and
print to the app's logger (:mod:`flask_torchpool.logs`).

What a worker runs is a *job*: one call, or a batch of calls (``TORCHPOOL_MAX_BATCH_SIZE``) whose inputs
agree on everything but dim 0. Callers place their own call when a worker has room
(``TORCHPOOL_PIPELINE_DEPTH`` jobs outstanding per worker, least outstanding first), so copying tensors into
the arena happens in parallel in the callers' threads; a queued call is placed by whichever thread frees a
worker. :mod:`flask_torchpool.batching` holds the calls, jobs and that scheduling (Note [Batching]),
:mod:`flask_torchpool.workers` the processes, :mod:`flask_torchpool.weights` Note [Shared weights].
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import multiprocessing
import os
import selectors
import threading
import time
import traceback
import weakref
from concurrent.futures import Future
from typing import Any, Callable

from . import admission, messages
from .admission import drained
from .batching import Call, CallState, Scheduler, batch_key
from .config import PoolConfig
from .deadlines import MAX_TIMEOUT, DeadlineHeap
from .errors import (
    InferenceTimeoutError,
    PoolClosedError,
    TorchPoolError,
    WireError,
    WorkerCrashedError,
    WorkerStartupError,
    from_wire,
)
from .exits import process_stopped
from .metrics import Metrics
from .placement import Placement
from .status import ModelStatus, ModelVersion, WorkerState, model_status, worker_status
from .streaming import Stream, StreamBook, new_call
from .versions import Versions
from .workers import ChannelReady, OutputReady, ProcessEnded, Registration, WorkerSet, WorkerSlot

log = logging.getLogger(__name__)

#: While draining, how often (seconds) the manager looks whether the workers' lanes have closed.
LANE_DRAIN_POLL = 0.05

#: Pools whose manager thread runs (it holds them alive), for the exit hook in extension.py.
_running_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


class _Wakeup:
    """The selector registration of the pool's wakeup pipe."""


class Pool:
    """A pool of model workers, the process backend (:class:`~flask_torchpool.backend.Backend`).
    Thread-safe; one per model (see :class:`~flask_torchpool.TorchPool`)."""

    #: A call past its deadline fails, and a worker still running it is replaced.
    enforces_deadlines = True

    def __init__(self, config: PoolConfig, placements: list[Placement], name: str = "torchpool",
                 logger_name: str = "flask_torchpool.worker") -> None:
        self.config = config
        self.name = name
        #: The logger that what the workers log and print goes to (the Flask app's logger).
        self.logger_name = logger_name
        self.metrics = Metrics(config.name)
        #: Called in the manager thread with each worker that said Ready (the pool server's lanes).
        self.on_ready: list[Callable[[WorkerSlot], None]] = []
        # Guards the scheduler's queue and jobs, the workers' states and the pool's own state below.
        self._lock = threading.Lock()
        self._workers = WorkerSet(placements, config, name, logger_name, self._lock)
        self.workers = self._workers.slots
        self._sched = Scheduler(self.workers, self.metrics, lock=self._lock,
                                max_batch_size=config.max_batch_size,
                                batch_delay=config.max_batch_delay_ms / 1000.0,
                                pipeline_depth=config.pipeline_depth, retry_after=config.retry_after,
                                batch_buckets=config.batch_buckets, split_batches=config.split_batches)
        self._versions = Versions(name, config, self._workers, self._sched, self._wake,
                                  lambda new: setattr(self, "config", new))
        self._next_wake = float("inf")
        self._wakeup_r, self._wakeup_w = multiprocessing.Pipe(duplex=False)
        self._streams = StreamBook(config, self._sched, self._workers, self.metrics, self._wake)
        self._deadlines = _Deadlines(self._sched, self._workers, self._streams)
        self._manager: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: WorkerStartupError | None = None
        self._drain_deadline: float | None = None
        self._stopped = threading.Event()
        self._start_lock = threading.Lock()
        self._owner_pid = os.getpid()

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._started.is_set() and self._startup_error is None

    @property
    def closed(self) -> bool:
        return self._sched.closing

    @property
    def placements(self) -> list[Placement]:
        return [w.placement for w in self.workers]

    def start(self) -> None:
        """Spawn every worker and return once each has loaded its model.

        Raises :class:`WorkerStartupError` (with the worker's traceback as ``__cause__``) if one fails,
        dies or does not load within ``TORCHPOOL_START_TIMEOUT``; the other workers are stopped then.
        """
        with self._start_lock:
            if self._sched.closing:
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
            self._sched.closing = True
            if drain == 0:
                self._sched.fail_queue(lambda: PoolClosedError.before_run(self.config.retry_after))
            channels = [w.channel for w in self.workers if w.channel is not None]
        for channel in channels:   # no new call on a lane; the calls the lanes queued still run
            with contextlib.suppress(OSError):
                channel.send(messages.CloseLanes())
        self._sched.flush()
        manager = self._manager
        if manager is None:
            self._stopped.set()
            return
        self._wake()
        if wait and manager is not threading.current_thread():
            manager.join()

    # --- calls ----------------------------------------------------------------------------------------

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               batch: bool = True, method: str | None = None, waiter: bool = False,
               retries: int | None = None) -> Future[Any]:
        """Queue one call; the returned future holds the model's output or a :class:`TorchPoolError`.
        Cancelling the future drops the call if it has not started. Input that cannot travel is
        refused here, in the calling thread, before anything is queued.
        """
        call = new_call(self.config, args, kwargs, timeout, method, arrays=True, retries=retries)
        if batch and self.config.max_batch_size > 1 and method is None:
            call.key, call.rows = batch_key(call)
        future = self._streams.cancellable(call)
        self._enqueue(call)
        return future

    def stream(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               method: str | None = None) -> Stream:
        """Start a streaming call (Note [Streams] in :mod:`flask_torchpool.streaming`): an iterator over
        what the model (or its *method*) yields. *timeout* bounds the time to each chunk."""
        return self._streams.start(new_call(self.config, args, kwargs, timeout, method, arrays=True),
                                   self._enqueue)

    def _enqueue(self, call: Call) -> None:
        admission.admit(self._sched, self.config, call, check_open=self._check_open,
                        add_deadline=self._deadlines.add, next_wake=lambda: self._next_wake, wake=self._wake)

    def _check_open(self) -> None:
        if self._startup_error is not None:  # first: a pool whose start failed is closed too
            raise self._startup_error
        if self._sched.closing:
            raise PoolClosedError.closing(self.config.retry_after)
        if self.workers and all(w.state is WorkerState.FAILED for w in self.workers):
            raise PoolClosedError(
                "no worker is left to serve: every worker crashed more than TORCHPOOL_MAX_RESTARTS="
                f"{self.config.max_restarts} times within {self.config.restart_window:g}s; they are "
                "retried after TORCHPOOL_RESTART_WINDOW (see the log for their exit causes)",
                retry_after=math.ceil(self.config.restart_window))

    # --- the manager thread ---------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wakeup_w.send_bytes(b"")
        except OSError:
            pass

    def _manage(self) -> None:
        try:
            for worker in self.workers:
                self._workers.spawn(worker)
            self._loop()
        except BaseException:
            log.critical("%s: the manager thread failed; stopping the pool\n%s", self.name,
                         traceback.format_exc())
            with self._lock:
                self._sched.closing = True
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
            selector.register(self._wakeup_r, selectors.EVENT_READ, _Wakeup())
            registered: dict[int, Registration] = {}
            timers_due = 0.0
            while True:
                now = time.monotonic()
                if now >= timers_due or self._sched.closing:
                    self._deadlines.expire(now)
                    self._sched.seal_due(now)
                    if not self._sched.closing:
                        self._workers.respawn_due(now)
                        if self._started.is_set():  # the first start has its own limit (start())
                            self._workers.kill_overdue(now)
                    self._streams.kill_due(now)
                    if self._sched.closing and drained(self._sched, self.workers, self._drain_deadline, now,
                                                       self.config.retry_after) and self._lanes_drained(now):
                        return
                    timers_due = self._next_timer(now)
                if self._workers.changed:
                    self._workers.sync(selector, registered)
                events = selector.select(min(max(0.0, timers_due - time.monotonic()), MAX_TIMEOUT))
                # Output first: what a worker logged before it answered is logged before the caller
                # gets the answer (both are ready in the same wake-up, as the log was written first).
                for key, _ in events:
                    if isinstance(key.data, OutputReady) and not key.data.source.read():
                        self._workers.changed = True  # its end: stop waiting on it
                dead = []
                for key, _ in events:
                    data = key.data
                    if isinstance(data, _Wakeup):
                        while self._wakeup_r.poll():
                            self._wakeup_r.recv_bytes()
                        timers_due = 0.0  # a new, earlier deadline or a shutdown: recompute
                    elif isinstance(data, ChannelReady):
                        self._receive(data.slot)
                    elif isinstance(data, ProcessEnded):
                        dead.append(data.slot)
                for worker in dead:
                    if worker.process is not None:
                        self._on_death(worker)
                if dead:
                    timers_due = 0.0
                self._sched.flush()
                if self._sched.queue:
                    self._sched.dispatch()
                self._versions.step(self._sched.closing)   # a reload in progress: Note [Rolling reload]
                timers_due = self._sched.wake_for_seal(timers_due)

    def _lanes_drained(self, now: float) -> bool:
        """While closing: whether the workers closed their lanes (Note [Lanes]: a lane closes once its web
        process agreed to Stop and its calls are done), or the drain deadline passed."""
        deadline = self._drain_deadline
        return (deadline is not None and now >= deadline) or not any(w.lanes_open for w in self.workers)

    def _next_timer(self, now: float) -> float:
        """When the manager must next look at deadlines, batches, respawns or the drain. With nothing
        pending it still wakes one ``TORCHPOOL_TIMEOUT`` from now, so that a new call with the default
        timeout never needs to wake it (see :meth:`submit`)."""
        with self._lock:
            times = [t for t in (self._deadlines.next(), self._sched.next_seal(), self._streams.next_kill())
                     if t is not None]
            times += self._workers.respawn_times()
            if self._started.is_set():
                times += self._workers.start_deadlines()
            if self._sched.closing and self._drain_deadline is not None:
                times.append(self._drain_deadline)
                if not self._lanes_drained(now):  # nothing tells the manager when a lane closes: look
                    times.append(now + LANE_DRAIN_POLL)
            times += [t for t in (self._versions.next_timer(),) if t is not None]
            times.append(now + (self.config.timeout or 3600.0))
            self._next_wake = min(times)
            return self._next_wake

    def _receive(self, worker: WorkerSlot) -> None:
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
            self._workers.changed = True

    def _on_message(self, worker: WorkerSlot, msg: Any, fds: list[int]) -> None:
        kind = type(msg)
        worker.last_reply = time.monotonic()
        if kind is messages.Result or kind is messages.Failure:
            self._sched.complete(worker, msg, fds)
        elif kind is messages.StreamChunk or kind is messages.StreamEnd:
            self._streams.on_message(worker, msg, fds)
        elif kind is messages.Loaded:
            self._versions.weights_of(worker).on_loaded(worker, msg)
        elif kind is messages.Ready:
            self._versions.weights_of(worker).on_ready(worker)
            with self._lock:
                if worker.state is not WorkerState.RETIRING:   # a reload's new worker: not in rotation yet
                    worker.state = WorkerState.STARTING if worker.incoming else WorkerState.READY
                worker.pid = msg.pid
                worker.ready_at = time.monotonic()
                if worker.total_restarts:
                    log.warning("%s: worker %d is back (pid %d)", self.name, worker.index, msg.pid)
                if not self._started.is_set() and all(w.state is WorkerState.READY for w in self.workers):
                    log.info("%s: %d worker(s) ready", self.name, len(self.workers))
                    self._started.set()
            for hook in self.on_ready:
                hook(worker)
        elif kind is messages.StartupFailed:
            err = from_wire(WireError(*msg))
            if not isinstance(err, WorkerStartupError):  # not what a worker sends
                err = WorkerStartupError.load_failed(worker.index, self.config.model, str(err), msg.tb)
            with self._lock:
                if not self._started.is_set():
                    self._fail_start(err, replace=True)
                    return
            # The worker logged its traceback itself, just before this, unless its level hides it.
            tb = f"\n{msg.tb}" if msg.tb and self.config.worker_log_level > logging.ERROR else ""
            log.error("%s: on restart, %s%s", self.name, err, tb)
            worker.killed_for = "its model failed to load"
            worker.load_error = str(err)

    def _fail_start(self, err: WorkerStartupError, replace: bool = False) -> None:
        """Under the lock: the pool cannot start; :meth:`start` raises *err* (or the error already
        there, unless *replace*) once the workers stopped."""
        if self._startup_error is None or replace:
            self._startup_error = err
        self._sched.closing = True
        self._drain_deadline = time.monotonic()
        self._started.set()

    def _on_death(self, worker: WorkerSlot) -> None:
        exitcode, signame = self._workers.reap(worker)
        if worker.channel is not None:
            self._receive(worker)  # results it sent before dying still count
        if worker.channel is not None:
            worker.channel.close()
        self._versions.weights_of(worker).on_death(worker)

        def crashed() -> TorchPoolError:
            return WorkerCrashedError(
                f"worker {worker.index} (pid {worker.pid}) died while running this call: "
                f"{worker.last_exit}", retry_after=self.config.retry_after, pid=worker.pid,
                exitcode=exitcode, signal=signame)

        with self._lock:
            self._versions.on_death(worker)   # a reload's worker: forgotten (STOPPED), not respawned
            running = worker.arena.running if worker.arena is not None else 0
            affected = self._sched.evacuate(worker, running, crashed)
            self._workers.clear(worker)
            was_ready = worker.ready_at is not None  # also when a deadline kill marked it dead already
            if not self._started.is_set():
                self._fail_start(WorkerStartupError(f"worker {worker.index} (pid {worker.pid}) died while "
                                                    f"loading the model: {worker.last_exit}"))
                worker.state = WorkerState.STOPPED
            elif self._sched.closing or worker.state is WorkerState.STOPPED:
                worker.state = WorkerState.STOPPED
            else:
                self._workers.schedule_respawn(worker)
        self._sched.flush()
        if worker.state is WorkerState.STOPPED:
            return
        level = logging.ERROR if was_ready else logging.WARNING
        log.log(level, "%s: worker %d (pid %s) died, %s; %d call(s) affected; %s", self.name,
                worker.index, worker.pid, worker.last_exit, affected,
                f"respawning in {max(0.0, (worker.respawn_at or 0.0) - time.monotonic()):.2g}s"
                if worker.state is WorkerState.DEAD else
                f"restart budget spent, retrying in {self.config.restart_window:g}s")
        if all(w.state is WorkerState.FAILED for w in self.workers):
            with self._lock:
                self._sched.fail_queue(lambda: PoolClosedError(
                    "no worker is left to serve (crash loop); see the log",
                    retry_after=math.ceil(self.config.restart_window)))
            self._sched.flush()

    def _stop_all(self) -> None:
        """Stop every worker (:meth:`WorkerSet.stop_all`), then fail what is left. Runs in the manager
        thread."""
        self._workers.stop_all()
        self._versions.step(closing=True)   # a reload in progress fails: shut down during it
        retry_after = self.config.retry_after
        with self._lock:
            self._sched.abandon(lambda: PoolClosedError.before_finish(retry_after),
                                lambda: PoolClosedError.before_run(retry_after))
        self._sched.flush()
        self._versions.close()
        self._wakeup_r.close()
        self._wakeup_w.close()
        log.info("%s: stopped", self.name)

    # --- state ----------------------------------------------------------------------------------------

    def status(self) -> ModelStatus:
        with self._lock:
            return _status(self, self._sched, self._versions)

    def kill_frozen(self, why: str) -> None:
        """A direct call timed out (Note [Lanes]): kill the workers that are stopped (SIGSTOP), which
        their own alarm cannot end, as :class:`_Deadlines` kills one frozen on a call of the pool's."""
        with self._lock:
            frozen = [w for w in self.workers if w.state is WorkerState.READY and w.pid is not None
                      and w.process is not None and process_stopped(w.pid)]
            for worker in frozen:
                worker.state = WorkerState.DEAD
                worker.killed_for = f"the pool killed it: it was stopped (SIGSTOP?) when {why}"
        for worker in frozen:
            self._workers.kill(worker)

    def reload(self, model: Any = None, *, version: str | None = None) -> ModelVersion:
        """:meth:`TorchPool.reload <flask_torchpool.TorchPool.reload>` of this model (see there)."""
        return self._versions.reload(self.config, model, version, lambda: self.started and not self.closed)


def _status(pool: Pool, sched: Scheduler[WorkerSlot], versions: Versions) -> ModelStatus:
    """Under the pool's lock: :meth:`Pool.status`."""
    workers = pool.workers
    return model_status(
        mode="embedded", started=pool.started, closed=sched.closing, queued=len(sched.queue),
        busy_workers=sum(1 for w in workers if w.jobs or w.lane_calls),
        arena_bytes=sum(pool.config.arena_bytes for w in workers if w.arena is not None),
        shared_weight_bytes=versions.shared_bytes, metrics=pool.metrics.snapshot(),
        workers=[worker_status(w.placement, w.state, pid=w.pid, inflight=w.load + w.lane_calls,
                               calls=calls, errors=errors, restarts=w.total_restarts,
                               last_exit=w.last_exit, generation=w.generation, incoming=w.incoming)
                 for w in workers for calls, errors in (w.counts(),)],
        plan=pool.placements, **versions.status())


class _Deadlines:
    """The calls' deadlines, earliest first. A call past its deadline fails with
    :class:`InferenceTimeoutError`, queued or not; a job nobody waits for any more is cancelled, or, when
    its worker is running it or frozen, the worker is killed (and replaced)."""

    def __init__(self, sched: Scheduler[WorkerSlot], workers: WorkerSet, streams: StreamBook) -> None:
        self._sched = sched
        self._workers = workers
        self._streams = streams
        self._heap: DeadlineHeap[Call] = DeadlineHeap(
            lambda _, call: call.state is CallState.DONE)   # Note [Finished deadlines] in deadlines.py

    def add(self, call: Call) -> None:
        """Under the lock."""
        assert call.deadline is not None
        self._heap.push(call.deadline, call.id, call)

    def next(self) -> float | None:
        """Under the lock: the earliest deadline of a call not finished yet."""
        return self._heap.next()

    def expire(self, now: float) -> None:
        """Fail calls whose deadline passed; kill a worker still running a job nobody waits for."""
        sched = self._sched
        kill: list[WorkerSlot] = []
        cancel: list[tuple[WorkerSlot, int]] = []
        with sched.lock:
            while (entry := self._heap.pop_due(now)) is not None:
                call = entry[2]
                if call.deadline is not None and call.deadline > now:  # a stream's, moved by its progress
                    self._heap.push(call.deadline, call.id, call)
                    continue
                waited = now - call.enqueued
                queued = call.state is CallState.QUEUED
                job = call.job
                sched.finish(call, exc=self._streams.timeout_error(call, waited) or InferenceTimeoutError(
                    f"the call did not finish within its deadline ({waited:.3g}s; it was "
                    f"{'waiting for a worker' if queued else 'in a worker'}). Raise TORCHPOOL_TIMEOUT "
                    "or the view's timeout, or add workers"))
                if queued:
                    sched.queue.remove(call)
                    continue
                if job is None or job.alive() or not job.sent:
                    continue  # others still want the job, or it was never sent (dropped when sealed)
                job.expired = True
                worker: WorkerSlot = job.slot
                if worker.arena is None or worker.jobs.get(job.id) is not job:
                    continue  # its worker died meanwhile
                stalled = worker.stalled(job)
                if stalled is None or call.target[1]:
                    cancel.append((worker, job.id))
                    if stalled is not None:  # a stream: its worker may stop it (Note [Streams])
                        self._streams.stop_later(worker, job.id)
                elif worker not in kill:
                    kill.append(worker)
                    # Status must not show it ready (and no call may be placed on it) until it is reaped.
                    worker.state = WorkerState.DEAD
                    worker.killed_for = (
                        f"the pool killed it: a call ran past its deadline ({waited:.3g}s) while "
                        + ("the worker was running it" if stalled == "running" else
                           "the worker neither started it nor answered (frozen?)"))
        sched.flush()
        for worker, job_id in cancel:
            try:
                if worker.channel is not None:
                    worker.channel.send(messages.Cancel(job_id))
            except OSError:
                pass
        for worker in kill:
            self._workers.kill(worker)


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
