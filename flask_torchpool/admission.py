"""Admitting and draining calls for the pools that schedule with
:class:`~flask_torchpool.batching.Scheduler`. :func:`drained` serves both the process pool
(:mod:`flask_torchpool.pool`) and the Ray pool (:mod:`flask_torchpool.ray_backend.pool`), and so does
:func:`admit`, so that both refuse, queue and time out the same way; :func:`submit` is the Ray pool's."""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, Callable

from .batching import Call, Scheduler, batch_key
from .config import PoolConfig
from .errors import PoolClosedError, PoolOverloadedError, WorkerStartupError
from .status import WorkerState


def submit(sched: Scheduler[Any], config: PoolConfig, call: Call, batch: bool, *,
           check_open: Callable[[], None], add_deadline: Callable[[Call], None],
           next_wake: Callable[[], float], wake: Callable[[], None]) -> Future[Any]:
    """Queue *call* (made by :func:`flask_torchpool.streaming.new_call`, which refuses input that cannot
    travel in the calling thread); the future holds the model's output or a :class:`TorchPoolError`.

    *check_open* raises when the backend takes no calls (under the lock); *add_deadline* registers a
    call's deadline (under the lock); *next_wake* is when the backend's supervisor next wakes, and
    *wake* wakes it, for a deadline or a batch delay that ends sooner."""
    if batch and config.max_batch_size > 1 and call.target[0] is None:
        call.key, call.rows = batch_key(call)
    future = call.future
    assert future is not None
    future.set_running_or_notify_cancel()
    admit(sched, config, call, check_open=check_open, add_deadline=add_deadline, next_wake=next_wake,
          wake=wake)
    return future


def admit(sched: Scheduler[Any], config: PoolConfig, call: Call, *, check_open: Callable[[], None],
          add_deadline: Callable[[Call], None], next_wake: Callable[[], float],
          wake: Callable[[], None]) -> None:
    """Place *call* on a worker, or queue it; refuse it (:class:`PoolOverloadedError`) when the queue is
    full (``TORCHPOOL_MAX_QUEUE``), or when *check_open* raises. The arguments are :func:`submit`'s."""
    metrics = sched.metrics
    with sched.lock:
        try:
            check_open()
        except WorkerStartupError:
            metrics.record_call("startup_failed")
            raise
        job = sched.place(call)
        if job is None:
            if len(sched.queue) >= config.max_queue:
                metrics.record_call("overloaded")
                raise PoolOverloadedError(
                    f"{len(sched.queue)} calls are already waiting (TORCHPOOL_MAX_QUEUE="
                    f"{config.max_queue}); try again shortly", retry_after=config.retry_after)
            sched.queue.append(call)
        metrics.record_submit()
        due = next_wake()
        must_wake = False
        if call.deadline is not None:
            add_deadline(call)
            must_wake = call.deadline < due
        if job is not None and job.key is not None and not job.sealed and sched.batch_delay:
            must_wake = must_wake or job.opened + sched.batch_wait < due
    if job is not None:
        sched.write(job, call)
    else:
        sched.flush()
    if must_wake:
        wake()


def drained(sched: Scheduler[Any], workers: Iterable[Any], deadline: float | None, now: float,
            retry_after: int, worker: str = "worker") -> bool:
    """While closing: whether every call is done. Queued calls fail at once when no *worker* is ready
    to run them (they are not replaced while closing); past *deadline* (``TORCHPOOL_DRAIN_TIMEOUT``)
    everything left fails with :class:`PoolClosedError`."""
    try:
        with sched.lock:
            if not _busy(sched):
                return True
            if sched.queue and not any(w.state is WorkerState.READY for w in workers):
                # Waiting for the drain deadline would change nothing.
                sched.fail_queue(lambda: PoolClosedError.before_run(
                    retry_after, f" (no {worker} was left to run it)"))
                return not _busy(sched)
            if deadline is not None and now >= deadline:
                sched.fail_queue(lambda: PoolClosedError.before_run(retry_after))
                sched.fail_running(lambda: PoolClosedError.before_finish(
                    retry_after, " (TORCHPOOL_DRAIN_TIMEOUT)"))
                return True
            return False
    finally:
        sched.flush()


def _busy(sched: Scheduler[Any]) -> bool:
    """Under the scheduler's lock: a call waits in the queue or in a job."""
    return bool(sched.queue) or any(j.alive() for s in sched.slots for j in s.jobs.values())
