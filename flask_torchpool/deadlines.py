"""Deadlines, earliest first: :class:`DeadlineHeap`, the heap every backend keeps its calls' deadlines in.

Note [Finished deadlines]: a call nearly always finishes long before its deadline (milliseconds against a
30 s ``TORCHPOOL_TIMEOUT``), and taking an entry out of the middle of a heap costs O(n), so the entries of
finished calls stay where they are and are skipped when they reach the top. Left at that, a busy pool
holds on to every call of the last ``TORCHPOOL_TIMEOUT`` seconds (3,000 calls/s: 90,000 calls and what
they refer to). That is memory, and work for Python's cyclic garbage collector: those objects outlive
the young generations, so full collections come often, and each walks every object of the process
(100-200 ms with torch imported). Measured before this heap: 22-25 us of the web process's CPU per
call went to collections, and one call in 10,000 waited 178-196 ms (``benchmarks/gc_pauses.py``; one
caller, ``torch.nn.Identity``, 4 KiB, ``TORCHPOOL_TIMEOUT`` 1 s). So :meth:`DeadlineHeap.next` drops
finished entries at the top, and :meth:`DeadlineHeap.push` keeps only the live entries whenever the heap
has doubled since it last did: it never holds more than twice the live entries plus :data:`SLACK`, at
amortised O(1) a push.
"""

from __future__ import annotations

import heapq
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

#: Entries a heap may hold before it first drops its finished ones.
SLACK = 256

#: The longest timeout (seconds) a key, a call or a peer may ask for: about 11.6 days. The system's waits
#: (``epoll_wait``, ``poll``) take at most 2**31 - 1 milliseconds (24.8 days); a longer one raised
#: OverflowError in whichever thread waited (the pool's manager thread: the whole pool). Every wait bounded
#: by a deadline is clamped to it too. For no deadline at all, a timeout is ``None``.
MAX_TIMEOUT = 1_000_000.0


def seconds_ok(value: object, zero: bool = False) -> bool:
    """Whether *value* is a number of seconds (an int or a float, not a bool) > 0 (>= 0 with *zero*) and
    at most :data:`MAX_TIMEOUT`: the one rule of config keys, calls, ``shutdown`` and the command line
    (NaN fails every comparison)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return 0 <= value <= MAX_TIMEOUT if zero else 0 < value <= MAX_TIMEOUT


class DeadlineHeap(Generic[T]):
    """Entries ``(deadline, key, item)``, earliest deadline first. *finished(key, item)* says whether an
    entry's call has finished (it then leaves the heap without being returned). Not thread-safe: its
    owner holds its own lock around every method."""

    def __init__(self, finished: Callable[[int, T], bool]) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._finished = finished
        self._limit = SLACK

    def __len__(self) -> int:
        """Entries held, finished ones not dropped yet included."""
        return len(self._heap)

    def push(self, deadline: float, key: int, item: T) -> None:
        heap = self._heap
        if len(heap) >= self._limit:
            finished = self._finished
            heap[:] = [entry for entry in heap if not finished(entry[1], entry[2])]
            heapq.heapify(heap)
            self._limit = max(SLACK, 2 * len(heap))
        heapq.heappush(heap, (deadline, key, item))

    def drop_where(self, gone: Callable[[T], bool]) -> None:
        """Drop every entry whose item is *gone* now, finished or not (what they refer to is being let
        go of: a lane that ended, whose mapping must not wait for these entries' deadlines)."""
        heap = self._heap
        if any(gone(entry[2]) for entry in heap):
            heap[:] = [entry for entry in heap if not gone(entry[2])]
            heapq.heapify(heap)

    def next(self) -> float | None:
        """The earliest deadline of an entry not finished yet; None when there is none."""
        heap, finished = self._heap, self._finished
        while heap and finished(heap[0][1], heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> tuple[float, int, T] | None:
        """Take the earliest entry not finished whose deadline is at or before *now*; None when none is."""
        due = self.next()
        if due is None or due > now:
            return None
        return heapq.heappop(self._heap)
