"""The blocks of an arena half: :class:`Allocator` hands them out, :class:`ReleaseQueue` carries the
output blocks a web process is done with back to their worker (both re-exported by
:mod:`flask_torchpool.shm`, which places tensors in them)."""

from __future__ import annotations

import threading
from collections import deque

#: Blocks are aligned to this many bytes.
ALIGN = 64


class Allocator:
    """First-fit allocation of aligned blocks in ``[start, start+size)``. Thread-safe.

    Few blocks are live at a time (a worker has a handful of calls outstanding), so a sorted free list
    is fast enough and simple to trust.
    """

    def __init__(self, start: int, size: int) -> None:
        self._free: list[tuple[int, int]] = [(start, size)] if size > 0 else []
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()
        self._later: deque[int] = deque()
        self.capacity = size

    def free_later(self, offset: int) -> None:
        """Free *offset* at the next allocation. Safe from a garbage-collection callback, which may run
        in a thread that holds this allocator's lock."""
        self._later.append(offset)

    def _drain_later(self) -> None:
        while self._later:
            try:
                self._free_locked(self._later.popleft())
            except IndexError:  # pragma: no cover - drained by another thread
                break

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a block of at least *nbytes*, or None when no free block is large enough."""
        size = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        with self._lock:
            self._drain_later()
            for i, (off, length) in enumerate(self._free):
                if length >= size:
                    if length == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, length - size)
                    self._used[off] = size
                    return off
        return None

    def free(self, offset: int) -> None:
        with self._lock:
            self._free_locked(offset)

    def _free_locked(self, offset: int) -> None:
        size = self._used.pop(offset, None)
        if size is None:
            return
        free = self._free
        lo, hi = 0, len(free)
        while lo < hi:
            mid = (lo + hi) // 2
            if free[mid][0] < offset:
                lo = mid + 1
            else:
                hi = mid
        free.insert(lo, (offset, size))
        # merge with the neighbours
        if lo + 1 < len(free) and free[lo][0] + free[lo][1] == free[lo + 1][0]:
            free[lo] = (free[lo][0], free[lo][1] + free[lo + 1][1])
            del free[lo + 1]
        if lo > 0 and free[lo - 1][0] + free[lo - 1][1] == free[lo][0]:
            free[lo - 1] = (free[lo - 1][0], free[lo - 1][1] + free[lo][1])
            del free[lo]

    @property
    def used(self) -> int:
        with self._lock:
            self._drain_later()
            return sum(self._used.values())


class ReleaseQueue:
    """Output blocks the web process no longer needs, sent to the worker with its next call.

    Appends come from garbage collection (any thread, possibly while a lock is held), so this is a
    lock-free deque rather than anything that could deadlock."""

    def __init__(self) -> None:
        self._items: deque[int] = deque()

    def __call__(self, offset: int) -> None:
        self._items.append(offset)

    def drain(self) -> tuple[int, ...]:
        items = []
        try:
            while True:
                items.append(self._items.popleft())
        except IndexError:
            pass
        return tuple(items)
