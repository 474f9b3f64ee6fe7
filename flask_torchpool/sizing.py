"""Batch shapes: which calls batch together (:func:`batch_key`), and how many of them a batch runs.

With ``TORCHPOOL_SPLIT_BATCHES`` a batch runs fewer of the queued rows when that is faster per row.

Note [Batch splitting]
~~~~~~~~~~~~~~~~~~~~~~
A batch takes every call that arrives while it is open. In a closed loop of callers that means one
worker runs them all while the others wait: their answers come back together, so their next calls form
one batch again (8 callers of the benchmarks' wide MLP on 2 workers: batches of 6-8 rows, 216-224 rows/s,
the other worker idle; docs/benchmarks.rst, "Batch splitting"). And a model's time per batch need not
grow evenly with its rows: with MKL on one core that MLP ran 1 to 3 rows in 9-12 ms and 4 to 6 rows in
17-23 ms, a curve that also moved with the machine (2 and 3 rows had cost 2-3 times one row earlier that
day). ``TORCHPOOL_BATCH_BUCKETS`` only pads up, and a smaller ``TORCHPOOL_MAX_BATCH_SIZE`` would also cap
the large batches that heavier load forms. So the scheduler measures the curve as it goes and splits.

:class:`BatchCosts` keeps, per number of rows a batch ran (its padding included), a moving average of the
time from sending the batch to its answer (a batch opens only on a worker with no other job, so that is
the worker's time for it, transport included). When a batch is about to be sent, sealed, with every
member's rows written, :meth:`BatchCosts.keep` compares the whole batch with each split of its members
(whole calls, in arrival order) into a first part, sent now, and the rest:

* another worker is free: the rest runs there at once, so the split takes the slower part's time;
* every other worker is busy: the rest goes back to the front of the queue for the next worker that
  frees up, so the split is worth the rows per second of its first part.

It splits when the best split beats the whole batch by more than :data:`SPLIT_GAIN` in rows per
second, the whole batch takes at least :data:`MIN_SPLIT_SECONDS` (below that, noise is larger than any
gain; with its time unknown, some size measured must) and every size compared has :data:`MIN_SAMPLES`
measurements. To get them, a batch whose first half (near the middle, in whole calls) has not been timed
yet, nor, with a free worker, its rest, is split there: a few batches per size. Every
:data:`EXPLORE_EVERY`-th batch that would be split runs whole instead, so that its size is timed again
and a curve that moved is seen. The members put back keep their deadlines (one past it is not put
back); their rows in this batch's blocks are not sent.
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

    def keep(self, starts: Sequence[int], rows: int, bucket: Callable[[int], int] = lambda n: n,
             parallel: bool = False) -> int:
        """How many of a batch's members to run now: all of them (``len(starts)``) or the first ones of
        the fastest split. *starts* are the members' first rows, *rows* the batch's, ``bucket(n)`` the
        rows a batch of *n* rows runs as (its batch bucket); with *parallel* another worker is free and
        runs the rest at the same time, else the rest waits for the next batch."""
        whole = self.seconds(bucket(rows))
        if len(starts) < 2 or not self._slow(whole):
            return len(starts)
        # Explore: split near the middle until the first half's time is known (and the rest's, when
        # it would run beside it).
        mid = min(range(1, len(starts)), key=lambda i: abs(2 * starts[i] - rows))
        n = starts[mid]
        if self.seconds(bucket(n)) is None or parallel and self.seconds(bucket(rows - n)) is None:
            return mid
        if whole is None:
            return len(starts)
        best, best_rate = len(starts), rows / whole
        for members in range(len(starts) - 1, 0, -1):   # on a tie, the longer first part
            n = starts[members]
            took = self.seconds(bucket(n))
            rest = self.seconds(bucket(rows - n)) if parallel else 0.0
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
