"""Batch shapes: which calls batch together (:func:`batch_key`), and how many of them a batch runs.

With ``TORCHPOOL_SPLIT_BATCHES`` a batch runs fewer of the queued rows when that is faster per row.

Note [Batch splitting]
~~~~~~~~~~~~~~~~~~~~~~
A model's time per batch need not grow with the batch's rows, nor grow evenly. On the benchmarks' wide
MLP with MKL on one core, 1, 2 and 3 rows took 11-12 ms and 4 rows 23 ms (docs/benchmarks.rst, "The wide
MLP at the batch size tune picks"): a batch of the 4 calls queued runs 0.17 rows a millisecond, one of 3
of them 0.25, and the fourth joins the next batch. ``TORCHPOOL_BATCH_BUCKETS`` pads up, which cannot help
there; a fixed ``TORCHPOOL_MAX_BATCH_SIZE`` of 3 would, but it caps the batches that load above 4 calls
would form (16 rows took 36 ms), and the curve moves with the machine (the same model had run 2 and 3
rows at 2-3 times one row's time earlier that day). So the scheduler measures it as it goes.

:class:`BatchCosts` keeps, per number of rows a batch ran (its padding included), a moving average of the
time from sending the batch to its answer (a batch opens only on a worker with no other job, so that is
the worker's time for it, transport included). When a batch is about to be sent, sealed, with every
member's rows written, and every other worker is busy (a worker that is free would run the rest at
once: nothing to gain), :meth:`BatchCosts.keep` compares the rows per second of the whole batch with that
of each shorter run of its first members (whole calls, in arrival order), using the times measured for
those sizes. It keeps the fastest prefix when it beats the whole batch by more than :data:`SPLIT_GAIN`,
the whole batch took at least :data:`MIN_SPLIT_SECONDS` (below that, transport noise is larger than any
gain) and each size compared has :data:`MIN_SAMPLES` measurements; otherwise the batch runs whole. The
members left out go back to the front of the queue in their order, with their deadlines, and the next
worker to free up takes them first; their rows in this batch's blocks are not sent. Every
:data:`EXPLORE_EVERY`-th batch that would be split runs whole instead, so that the time of its size is
measured again, and a curve that moved is seen.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import codec
from .outputs import runs_as

if TYPE_CHECKING:
    from .batching import Call, Job

#: Weight of a new measurement in a size's moving average.
EWMA_WEIGHT = 0.25
#: Measurements a size needs before its time is used.
MIN_SAMPLES = 3
#: A prefix must run this much more rows per second than the whole batch to be run alone.
SPLIT_GAIN = 0.2
#: The whole batch must take at least this long (seconds) to be split.
MIN_SPLIT_SECONDS = 0.005
#: Of the batches that would be split, every EXPLORE_EVERY-th runs whole (Note [Batch splitting]).
EXPLORE_EVERY = 16


def batch_key(call: Call) -> tuple[Any, int]:
    """(key, rows) of a batchable call, or (None, 0): see Note [Batching]."""
    if not call.tensors:
        return None, 0
    rows = None
    shapes = []
    for t in call.tensors:
        shape = tuple(t.shape)
        if not shape:
            return None, 0
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            return None, 0
        shapes.append((codec.wire_dtype(t), shape[1:]))  # a tensor and an array of one dtype batch together
    if not rows:
        return None, 0
    try:
        structure = pickle.dumps((call.args, call.kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # pragma: no cover - flatten only lets picklable values through
        return None, 0
    return (structure, tuple(shapes)), rows


class BatchCosts:
    """Moving averages of the time a batch took, by the rows it ran (Note [Batch splitting]). Used under
    the scheduler's lock."""

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}
        self._samples: dict[int, int] = {}
        self._would_split = 0

    def record(self, rows: int, seconds: float) -> None:
        """A batch that ran *rows* rows took *seconds* from sending to its answer."""
        if rows < 1 or seconds < 0:
            return
        old = self._seconds.get(rows)
        self._seconds[rows] = seconds if old is None else old + EWMA_WEIGHT * (seconds - old)
        self._samples[rows] = self._samples.get(rows, 0) + 1

    def seconds(self, rows: int) -> float | None:
        """The time a batch of *rows* rows takes, None until it has :data:`MIN_SAMPLES` measurements."""
        return self._seconds[rows] if self._samples.get(rows, 0) >= MIN_SAMPLES else None

    def keep(self, starts: Sequence[int], rows: int, runs_as: Callable[[int], int] = lambda n: n,
             parallel: bool = False) -> int:
        """How many of a batch's members to run now: all of them (``len(starts)``) or the first ones of
        the fastest split. *starts* are the members' first rows, *rows* the batch's, ``runs_as(n)`` the
        rows a batch of *n* rows runs as (its bucket); with *parallel* another worker is free and runs
        the rest at the same time, else the rest waits for the next batch."""
        whole = self.seconds(runs_as(rows))
        if len(starts) < 2 or not self._slow(whole):
            return len(starts)
        if parallel:   # explore: split near the middle until both halves' times are known
            mid = min(range(1, len(starts)), key=lambda i: abs(2 * starts[i] - rows))
            n = starts[mid]
            if self.seconds(runs_as(n)) is None or self.seconds(runs_as(rows - n)) is None:
                return mid
        if whole is None:
            return len(starts)
        best, best_rate = len(starts), rows / whole
        for members in range(len(starts) - 1, 0, -1):   # on a tie, the longer first part
            n = starts[members]
            took = self.seconds(runs_as(n))
            rest = self.seconds(runs_as(rows - n)) if parallel else 0.0
            if took is None or rest is None:
                continue
            rate = rows / max(took, rest) if parallel else n / took
            if rate > best_rate:
                best, best_rate = members, rate
        if best == len(starts) or best_rate <= (1 + SPLIT_GAIN) * rows / whole:
            return len(starts)
        self._would_split += 1
        return len(starts) if self._would_split % EXPLORE_EVERY == 0 else best

    def _slow(self, whole: float | None) -> bool:
        """Worth splitting: the whole batch takes MIN_SPLIT_SECONDS or more (its time unknown: some size
        measured does)."""
        if whole is not None:
            return whole >= MIN_SPLIT_SECONDS
        return any((self.seconds(n) or 0.0) >= MIN_SPLIT_SECONDS for n in self._seconds)

    def split(self, job: Job[Any], buckets: tuple[int, ...], parallel: bool) -> list[Call]:
        """Take off a sealed, written batch *job* the members it runs faster without (:meth:`keep`) and
        return them; *buckets*: ``TORCHPOOL_BATCH_BUCKETS``."""
        keep = self.keep(job.starts, job.rows, lambda n: runs_as(n, job.capacity, buckets), parallel)
        rest = job.members[keep:]
        if rest:
            job.rows = job.starts[keep]
            del job.members[keep:], job.starts[keep:]
        for call in rest:
            call.dispatched = None   # its wait in the queue goes on
        return rest
