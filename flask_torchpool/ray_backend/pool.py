"""RayPool: a model's workers as Ray actors, behind the same :class:`~flask_torchpool.backend.Backend`.

How a call travels::

    caller thread                      Ray                                  supervisor thread
    -------------                      ---                                  -----------------
    submit(args) --flatten/validate
      | actor free? --> place in a job (scheduler, batching)
      |   job sealed --> actor.run.remote(skeleton, tensors) --> ModelActor.run (its node)
      | else: queue (TORCHPOOL_MAX_QUEUE)                          |
      v                                                    answer ready: Ray's callback
    Future <------ set result <-- scheduler.answer <-- events queue <--+
                                  (splits a batch, dispatches queued calls)

One supervisor thread per pool waits on one queue of events, with a timeout that is the next deadline,
batch delay, respawn or the drain; it never polls. Ray reports each answer through the answer's future
(``ObjectRef.future()``, a callback in Ray's own thread that only puts the answer on the queue), so no
thread waits per call. The supervisor completes calls, fails calls past their deadline, replaces dead
actors and runs the shutdown; it is the only thread that creates or kills actors.

Note [Ray actors]
~~~~~~~~~~~~~~~~~
Each worker is a non-detached actor created by this process with ``max_restarts=0``,
``max_task_retries=0`` and ``max_concurrency=1``: Ray runs its calls one at a time in the order they were
sent, so the first job sent and not answered is the one running, and this pool, not Ray, decides what a
death means for each call (the process pool's rules: a call that never started is requeued, the running
one is retried while it has ``TORCHPOOL_RETRIES``, else fails with WorkerCrashedError) and when to replace
the actor (Note [Restart policy] in :mod:`flask_torchpool.workers`). An actor past a call's deadline is
killed with ``ray.kill`` (``ray.cancel`` cannot interrupt a running call on a sync actor) and replaced; a
job that has not started is cancelled instead. The actors are owned by this process: when it dies, Ray
kills them (no orphans); shutdown kills ours and nothing else.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import queue
import threading
import time
import traceback
import weakref
from concurrent.futures import Future
from typing import Any

from .. import admission
from ..batching import Job, load
from ..config import PoolConfig
from ..errors import (
    InferenceError,
    InferenceTimeoutError,
    PoolClosedError,
    TorchPoolError,
    WorkerCrashedError,
    WorkerStartupError,
    to_wire,
)
from ..metrics import Metrics
from ..outputs import NumpyFuture
from ..placement import Placement
from ..status import ModelStatus, WorkerState, model_status, worker_status
from ..streaming import Stream, check_method, new_call
from ..workers import SETTLED
from . import cluster
from .actor import ModelActor
from .slots import ActorSlot, Deadlines, RayScheduler

log = logging.getLogger(__name__)

_WAKE = "wake"


def plan(config: PoolConfig) -> list[Placement]:
    """The placements of a model's actors before Ray placed them: ``TORCHPOOL_WORKERS`` actors ("auto":
    one), on a GPU when the actor options ask for one, each running as many torch threads as the CPUs it
    asks for (``num_cpus``, default 1) or ``TORCHPOOL_THREADS_PER_WORKER``. The cores and the concrete
    device are the actor's own once it is ready."""
    count = config.workers if isinstance(config.workers, int) else 1
    options = config.ray_actor_options
    threads = config.threads_per_worker or max(1, int(options.get("num_cpus", 1)))
    device = "cuda" if options.get("num_gpus") else "cpu"
    return [Placement(worker=i, device=device, cores=(), threads=threads, model=config.name)
            for i in range(count)]


class RayPool:
    """The Ray backend (:class:`~flask_torchpool.backend.Backend`). Thread-safe; one per model."""

    #: A call past its deadline fails, and an actor still running it is killed and replaced.
    enforces_deadlines = True

    def __init__(self, config: PoolConfig, placements: list[Placement] | None = None,
                 name: str = "torchpool", address: str | None = None) -> None:
        self.config = config
        self.name = name
        self.address = address
        self.metrics = Metrics(config.name)
        self._lock = threading.Lock()
        self.workers = [ActorSlot(p) for p in (placements or plan(config))]
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._sched = RayScheduler(self.workers, self._events, metrics=self.metrics, lock=self._lock,
                                   max_batch_size=config.max_batch_size,
                                   batch_delay=config.max_batch_delay_ms / 1000.0,
                                   pipeline_depth=config.pipeline_depth, retry_after=config.retry_after,
                                   batch_buckets=config.batch_buckets, split_batches=config.split_batches)
        self._deadlines = Deadlines()
        self._next_wake = float("inf")
        self._timers_changed = False   # a respawn was scheduled: recompute the supervisor's timeout
        self._ray: Any = None
        self._actor_class: Any = None
        self._supervisor: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._startup_error: WorkerStartupError | None = None
        self._drain_deadline: float | None = None
        self._start_lock = threading.Lock()
        self._owner_pid = os.getpid()

    # --- lifecycle ----------------------------------------------------------------------------------------

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
        """Connect to Ray, create every actor and return once each has loaded its model. Raises
        :class:`WorkerStartupError` (the actor's traceback as ``__cause__``) when one cannot, or is not
        ready within ``TORCHPOOL_START_TIMEOUT`` (Ray may lack the resources the actors ask for)."""
        with self._start_lock:
            if self._sched.closing:
                raise PoolClosedError("the pool is shut down; create a new TorchPool to serve again")
            if self._supervisor is None:
                self._ray = cluster.connect(self.address)
                # Registered after ray.init, so it runs before Ray's own exit hook disconnects us: the
                # calls in flight drain (TORCHPOOL_DRAIN_TIMEOUT) and the actors are killed.
                atexit.register(_shutdown_at_exit, weakref.ref(self))
                self._actor_class = self._ray.remote(ModelActor)
                self._supervisor = threading.Thread(target=self._supervise, name=f"{self.name}-ray",
                                                    daemon=True)
                self._supervisor.start()
            if not self._started.wait(self.config.start_timeout):
                with self._lock:
                    missing = [w.index for w in self.workers if w.state is not WorkerState.READY]
                    self._startup_error = WorkerStartupError(
                        f"actor(s) {missing} did not load the model within TORCHPOOL_START_TIMEOUT="
                        f"{self.config.start_timeout:g}s: Ray may lack the resources they ask for "
                        f"(TORCHPOOL_RAY_ACTOR_OPTIONS={self.config.ray_actor_options!r}; see `ray status`), "
                        "or the model is slow to build")
                self.shutdown(wait=True, drain_timeout=0)
            if self._startup_error is not None:
                self._stopped.wait(self.config.drain_timeout + 30)
                raise self._startup_error

    def shutdown(self, wait: bool = True, drain_timeout: float | None = None) -> None:
        """Take no new calls, let calls in flight finish (up to *drain_timeout*, default
        ``TORCHPOOL_DRAIN_TIMEOUT``), then kill this pool's actors. Idempotent; safe from any thread."""
        if os.getpid() != self._owner_pid:
            return
        drain = self.config.drain_timeout if drain_timeout is None else drain_timeout
        with self._lock:
            deadline = time.monotonic() + drain
            if self._drain_deadline is None or deadline < self._drain_deadline:
                self._drain_deadline = deadline
            self._sched.closing = True
            if drain == 0:
                self._sched.fail_queue(lambda: PoolClosedError.before_run(self.config.retry_after))
        self._sched.flush()
        supervisor = self._supervisor
        if supervisor is None:
            for slot in self.workers:
                slot.state = WorkerState.STOPPED
            self._stopped.set()
            return
        self._events.put((_WAKE,))
        if wait and supervisor is not threading.current_thread():
            supervisor.join()

    # --- calls --------------------------------------------------------------------------------------------

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               batch: bool = True, method: str | None = None, waiter: bool = False,
               retries: int | None = None) -> Future[Any]:
        """Queue one call (see :meth:`flask_torchpool.backend.Backend.submit`); *method* runs that
        method of the model on the actor. Cancelling the future does not drop the call on this backend
        (the call runs; its result is discarded)."""
        call = new_call(self.config, args, kwargs, timeout, method, retries=retries)
        future = admission.submit(self._sched, self.config, call, batch, check_open=self._check_open,
                                  add_deadline=self._deadlines.add, next_wake=self._wake_time,
                                  wake=self._wake)
        return NumpyFuture(future) if call.numpy else future

    def stream(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               method: str | None = None) -> Stream:
        """Not supported on the Ray backend: raises :class:`InferenceError` (501-free: the call never
        starts) saying so. See docs/configuration.rst, "The Ray backend"."""
        check_method(method)
        raise InferenceError("streaming calls (model.stream) are not supported by the Ray backend "
                             "(TORCHPOOL_BACKEND='ray') yet; call the model without .stream, or serve "
                             "this model with the process backend", remote_type="NotSupported")

    def _wake(self) -> None:
        self._events.put((_WAKE,))

    def _wake_time(self) -> float:
        return self._next_wake

    def _check_open(self) -> None:
        if self._startup_error is not None:
            raise self._startup_error
        if self._sched.closing:
            raise PoolClosedError.closing(self.config.retry_after)
        if self.workers and all(w.state is WorkerState.FAILED for w in self.workers):
            raise PoolClosedError(
                "no actor is left to serve: every actor failed to load its model more than "
                f"TORCHPOOL_MAX_RESTARTS={self.config.max_restarts} times within "
                f"{self.config.restart_window:g}s; they are retried after TORCHPOOL_RESTART_WINDOW",
                retry_after=math.ceil(self.config.restart_window))

    # --- the supervisor thread -----------------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            for slot in self.workers:
                self._spawn(slot)
            self._loop()
        except BaseException:
            log.critical("%s: the supervisor thread failed; stopping the pool\n%s", self.name,
                         traceback.format_exc())
            with self._lock:
                self._sched.closing = True
                if not self._started.is_set():
                    self._startup_error = WorkerStartupError("the Ray pool's supervisor failed: "
                                                             f"{traceback.format_exc(limit=1)}")
        finally:
            self._stop_all()
            self._started.set()
            self._stopped.set()

    def _loop(self) -> None:
        timers_due = 0.0
        while True:
            now = time.monotonic()
            if now >= timers_due or self._sched.closing:
                self._expire(now)
                self._sched.seal_due(now)
                if not self._sched.closing:
                    self._respawn_due(now)
                if self._sched.closing and admission.drained(
                        self._sched, self.workers, self._drain_deadline, now, self.config.retry_after,
                        "actor"):
                    return
                timers_due = self._next_timer(now)
            try:
                event = self._events.get(timeout=max(0.0, timers_due - time.monotonic()))
            except queue.Empty:
                continue
            while True:
                if event[0] == _WAKE:
                    timers_due = 0.0
                else:
                    self._on_event(*event)
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    break
            if self._timers_changed:
                self._timers_changed, timers_due = False, 0.0
            self._sched.flush()
            if self._sched.queue:
                self._sched.dispatch()
            timers_due = self._sched.wake_for_seal(timers_due)

    def _next_timer(self, now: float) -> float:
        with self._lock:
            times = [t for t in (self._deadlines.next(), self._sched.next_seal()) if t is not None]
            times += [w.respawn_at for w in self.workers if w.respawn_at is not None]
            if self._sched.closing and self._drain_deadline is not None:
                times.append(self._drain_deadline)
            times.append(now + (self.config.timeout or 3600.0))
            self._next_wake = min(times)
            return self._next_wake

    def _on_event(self, kind: str, slot: ActorSlot, generation: int, job: Job[ActorSlot] | None, reply: Any,
                  exc: BaseException | None) -> None:
        if slot.generation != generation:
            return  # an answer of an actor that was replaced
        cause = None if exc is None else cluster.death_cause(exc)
        if cause is not None:
            self._on_death(slot, generation, cause)
        elif kind == "loaded":
            self._on_loaded(slot, generation, reply, exc)
        else:
            assert job is not None
            if exc is not None:
                ray_exc = self._ray.exceptions
                err = (InferenceTimeoutError("the call was cancelled before it ran")
                       if isinstance(exc, ray_exc.TaskCancelledError) else
                       InferenceError(f"Ray could not run the call: {type(exc).__name__}: "
                                      f"{cluster.first_line(str(exc))}"))
                reply = ("error", tuple(to_wire(err)))
            self._sched.answer(slot, job, reply)

    def _spawn(self, slot: ActorSlot) -> None:
        """Create the slot's actor and ask it to load the model (supervisor thread)."""
        options = {"num_cpus": 1, **self.config.ray_actor_options,
                   "max_restarts": 0, "max_task_retries": 0, "max_concurrency": 1}
        with self._lock:
            slot.generation += 1
            slot.state, slot.respawn_at, slot.ready_at, slot.info = WorkerState.STARTING, None, None, {}
            slot.pid = None
            generation = slot.generation
        try:
            handle = self._actor_class.options(**options).remote(self.name, slot.index)
            ref = handle.load.remote(self.config.spec, self.config.threads_per_worker)
        except Exception as exc:  # Ray refused the options, or is gone
            self._on_loaded(slot, generation, ("failed", f"{type(exc).__name__}: {exc}",
                                               traceback.format_exc()), None)
            return
        with self._lock:
            slot.handle = handle
        ref.future().add_done_callback(functools.partial(self._sched.on_future, "loaded", slot, generation,
                                                         None))

    def _on_loaded(self, slot: ActorSlot, generation: int, reply: Any, exc: BaseException | None) -> None:
        if reply is None or reply[0] != "ready":
            message, tb = ((reply[1], reply[2]) if reply is not None else
                           (f"{type(exc).__name__}: {exc}", None))
            err = WorkerStartupError.load_failed(slot.index, self.config.model, message, tb)
            with self._lock:
                if not self._started.is_set():
                    self._fail_start(err, replace=True)
                    return
            log.error("%s: on restart, %s%s", self.name, err, f"\n{tb}" if tb else "")
            slot.killed_for = "its model failed to load"
            self._on_death(slot, generation, "its model failed to load")
            return
        info = reply[1]
        with self._lock:
            slot.info, slot.pid = info, info["pid"]
            slot.placement = slot.placement._replace(device=info["device"], cores=tuple(info["cores"]),
                                                     threads=info["threads"])
            slot.state, slot.ready_at = WorkerState.READY, time.monotonic()
            if slot.total_restarts:
                log.warning("%s: actor %d is back (pid %d on %s)", self.name, slot.index, slot.pid,
                            info["node_ip"])
            if not self._started.is_set() and all(w.state is WorkerState.READY for w in self.workers):
                log.info("%s: %d Ray actor(s) ready", self.name, len(self.workers))
                self._started.set()

    def _fail_start(self, err: WorkerStartupError, replace: bool = False) -> None:
        """Under the lock: the pool cannot start; :meth:`start` raises *err* once the actors are gone."""
        if self._startup_error is None or replace:
            self._startup_error = err
        self._sched.closing = True
        self._drain_deadline = time.monotonic()
        self._started.set()

    def _on_death(self, slot: ActorSlot, generation: int, cause: str) -> None:
        """The slot's actor is gone: deal with its calls (Note [Ray actors]) and replace it."""
        with self._lock:
            if slot.generation != generation:
                return
            handle, pid, where = slot.handle, slot.pid, slot.info.get("node_ip", "its node")
            exit_cause = slot.killed_for or cause
            running = slot.sent[0] if slot.sent else 0

            def crashed() -> TorchPoolError:
                return WorkerCrashedError(
                    f"worker {slot.index} (Ray actor, pid {pid} on {where}) died while running this call: "
                    f"{exit_cause}", retry_after=self.config.retry_after, pid=pid, exitcode=None, signal=None)

            affected = self._sched.evacuate(slot, running, crashed)
            slot.handle, slot.killed_for, slot.last_exit = None, None, exit_cause
            slot.generation += 1
            slot.sent.clear()
            slot.refs.clear()
            now = time.monotonic()
            served = slot.ready_at is not None and (slot.calls > 0 or now - slot.ready_at >= SETTLED)
            if not self._started.is_set():
                self._fail_start(WorkerStartupError(f"worker {slot.index} (Ray actor) died while loading the "
                                                    f"model: {exit_cause}"))
                slot.state = WorkerState.STOPPED
            elif self._sched.closing:
                slot.state = WorkerState.STOPPED
            else:
                slot.schedule_respawn(self.config, served, now)
                self._timers_changed = True
        self._sched.flush()
        cluster.kill(self._ray, handle)
        if slot.state is not WorkerState.STOPPED:
            log.log(logging.ERROR if served else logging.WARNING,
                    "%s: actor %d (pid %s on %s) is gone: %s; %d call(s) affected; %s", self.name, slot.index,
                    pid, where, exit_cause, affected,
                    "replacing it" if slot.state is WorkerState.DEAD else
                    f"restart budget spent, retrying in {self.config.restart_window:g}s")

    def _respawn_due(self, now: float) -> None:
        for slot in self.workers:
            if slot.respawn_at is not None and slot.respawn_at <= now and slot.handle is None:
                self._spawn(slot)

    def _expire(self, now: float) -> None:
        """Fail calls past their deadline (:class:`Deadlines`); kill or cancel what nobody waits for."""
        with self._lock:
            kill, cancel = self._deadlines.expire(now, self._sched)
        self._sched.flush()
        for ref in cancel:
            try:
                self._ray.cancel(ref)
            except Exception as exc:  # it finished meanwhile
                log.debug("%s: ray.cancel: %s", self.name, exc)
        for slot, generation in kill:
            # The actor's death would reach the supervisor as the failure of its running call; deal with
            # it now, so that the slot is replaced at once.
            self._on_death(slot, generation, slot.killed_for or "killed")

    def _stop_all(self) -> None:
        """Kill this pool's actors and wait until Ray reports them dead; fail what is left."""
        handles = [w.handle for w in self.workers if w.handle is not None]
        for handle in handles:
            cluster.kill(self._ray, handle)
        if handles and self._ray is not None:
            try:  # a call to a killed actor fails once Ray has seen it die
                self._ray.wait([h.ping.remote() for h in handles], num_returns=len(handles), timeout=30)
            except Exception as exc:
                log.debug("%s: waiting for the actors to stop: %s", self.name, exc)
        retry_after = self.config.retry_after
        with self._lock:
            for slot in self.workers:
                slot.handle, slot.state, slot.respawn_at = None, WorkerState.STOPPED, None
                slot.generation += 1
                slot.sent.clear()
                slot.refs.clear()
            self._sched.abandon(lambda: PoolClosedError.before_finish(retry_after),
                                lambda: PoolClosedError.before_run(retry_after))
        self._sched.flush()
        log.info("%s: stopped", self.name)

    # --- state --------------------------------------------------------------------------------------------

    def status(self) -> ModelStatus:
        with self._lock:
            workers = []
            for w in self.workers:
                workers.append(worker_status(
                    w.placement, w.state, pid=w.pid, inflight=load(w), calls=w.calls, errors=w.errors,
                    restarts=w.total_restarts, last_exit=w.last_exit, actor=w.actor_keys()))
            return model_status(mode="ray", started=self.started, closed=self._sched.closing,
                                queued=len(self._sched.queue),
                                busy_workers=sum(1 for w in self.workers if w.jobs),
                                arena_bytes=0, metrics=self.metrics.snapshot(), workers=workers,
                                plan=self.placements)


def _shutdown_at_exit(ref: weakref.ReferenceType[RayPool]) -> None:
    pool = ref()
    if pool is not None:
        try:
            pool.shutdown(wait=True)
        except TorchPoolError:  # pragma: no cover
            pass
