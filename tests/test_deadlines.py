"""Note [Finished deadlines]: the deadline heap lets finished calls go, and a busy pool holds no finished
call for its deadline's sake.

The unit tests drive :class:`DeadlineHeap` alone; the last test sends calls through this module's
shared echo pool (a real worker process) and counts the calls still alive afterwards.
"""

from __future__ import annotations

import gc

import pytest
import torch

from flask_torchpool import TorchPool
from flask_torchpool.batching import Call
from flask_torchpool.deadlines import SLACK, DeadlineHeap

pytestmark = pytest.mark.timeout(120)


def test_entries_come_out_earliest_first_and_finished_ones_never() -> None:
    done: set[int] = set()
    heap: DeadlineHeap[str] = DeadlineHeap(lambda key, _: key in done)
    for key, deadline in enumerate([5.0, 1.0, 3.0, 2.0, 4.0]):
        heap.push(deadline, key, f"call {key}")
    done.update({1, 4})     # deadlines 1.0 and 4.0 finished
    assert heap.next() == 2.0
    assert heap.pop_due(1.5) is None
    assert heap.pop_due(3.0) == (2.0, 3, "call 3")
    assert heap.pop_due(3.0) == (3.0, 2, "call 2")
    assert heap.pop_due(10.0) == (5.0, 0, "call 0")
    assert heap.pop_due(10.0) is None and heap.next() is None and len(heap) == 0


def test_the_heap_stays_within_twice_its_live_entries() -> None:
    done: set[int] = set()
    heap: DeadlineHeap[None] = DeadlineHeap(lambda key, _: key in done)
    live = list(range(100))     # calls that never finish, with the latest deadlines
    for key in live:
        heap.push(1e9 + key, key, None)
    # 20,000 calls that finish at once, with deadlines far later than now: none ever reaches the top.
    for key in range(1000, 21000):
        heap.push(100.0 + key, key, None)
        done.add(key)
        assert len(heap) <= max(SLACK, 2 * len(live)) + 1
    assert [heap.pop_due(2e9) for _ in live] == [(1e9 + key, key, None) for key in live]


def test_entries_of_an_item_let_go_of_leave_at_once_finished_or_not() -> None:
    # A lane that ended: its arena must not stay mapped until its calls' deadlines.
    heap: DeadlineHeap[str] = DeadlineHeap(lambda key, _: False)
    for key, item in enumerate(["lane a", "lane b", "lane a", "lane b"]):
        heap.push(10.0 + key, key, item)
    heap.drop_where(lambda item: item == "lane a")
    assert len(heap) == 2
    assert [heap.pop_due(100.0) for _ in range(3)] == [(11.0, 1, "lane b"), (13.0, 3, "lane b"), None]


def test_a_busy_pool_keeps_no_finished_call(pool: TorchPool) -> None:
    x = torch.ones(4)
    for _ in range(50):   # warm up: lanes, arenas, caches
        pool.submit(x).result(30)

    def calls_alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is Call)

    before = calls_alive()
    for _ in range(3 * SLACK):   # every call has the default deadline, TORCHPOOL_TIMEOUT from now
        assert torch.equal(pool.submit(x).result(30), x)
    assert calls_alive() - before <= 2 * SLACK, "finished calls are held until their deadline"
