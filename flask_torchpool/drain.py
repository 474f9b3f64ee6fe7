"""Draining: what a closing backend does with the calls it still has, the same on every backend that
schedules with :class:`~flask_torchpool.batching.Scheduler` (the process pool and the Ray pool)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .batching import Scheduler
from .errors import PoolClosedError
from .status import WorkerState


def drained(sched: Scheduler[Any], workers: Iterable[Any], deadline: float | None, now: float,
            retry_after: int, worker: str = "worker") -> bool:
    """While closing: whether every call is done. Queued calls fail at once when no *worker* is ready
    to run them (they are not replaced while closing); past *deadline* (``TORCHPOOL_DRAIN_TIMEOUT``)
    everything left fails with :class:`PoolClosedError`."""
    try:
        with sched.lock:
            if not sched.busy():
                return True
            if sched.queue and not any(w.state is WorkerState.READY for w in workers):
                # Waiting for the drain deadline would change nothing.
                sched.fail_queue(lambda: PoolClosedError.before_run(
                    retry_after, f" (no {worker} was left to run it)"))
                return not sched.busy()
            if deadline is not None and now >= deadline:
                sched.fail_queue(lambda: PoolClosedError.before_run(retry_after))
                sched.fail_running(lambda: PoolClosedError.before_finish(
                    retry_after, " (TORCHPOOL_DRAIN_TIMEOUT)"))
                return True
            return False
    finally:
        sched.flush()
