"""Scheduling without processes: batch keys, how batches fill, seal and split, which worker gets a job,
the queue, deadlines and dropped jobs (Note [Batching]).

The scheduler works on fake worker slots: a real memfd arena (so that inputs are copied and outputs read
as in a pool) and a channel that records what would be sent to the worker. Nothing is spawned.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from flask_torchpool import InferenceTimeoutError, OutputError, codec, messages, shm
from flask_torchpool.batching import Call, CallState, Job, Scheduler, batch_key, load
from flask_torchpool.config import PoolConfig
from flask_torchpool.metrics import Metrics
from flask_torchpool.pool import _Deadlines
from flask_torchpool.sizing import EXPLORE_EVERY, MIN_SAMPLES, BatchCosts
from flask_torchpool.status import WorkerState
from flask_torchpool.streaming import StreamBook

pytestmark = pytest.mark.timeout(30)

ARENA_BYTES = 1 << 20


class FakeChannel:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any, fds: tuple[int, ...] = ()) -> None:
        self.sent.append(msg)


@dataclass(eq=False)
class FakeSlot:
    """What the scheduler needs of a worker slot, with a real arena and no process."""

    arena: shm.Arena | None
    state: WorkerState = WorkerState.READY
    jobs: dict[int, Job[Any]] = field(default_factory=dict)
    releases: shm.ReleaseQueue = field(default_factory=shm.ReleaseQueue)
    channel: FakeChannel = field(default_factory=FakeChannel)
    calls: int = 0
    errors: int = 0
    streams: bool = False
    inputs: shm.Allocator | None = None
    outputs: shm.Allocator | None = None

    def __post_init__(self) -> None:
        assert self.arena is not None
        self.inputs = shm.Allocator(*self.arena.inputs)
        self.outputs = shm.Allocator(*self.arena.outputs)

    def sent_calls(self) -> list[messages.Call]:
        return [m for m in self.channel.sent if type(m) is messages.Call]


def _arena() -> shm.Arena:
    fd = shm.create_memfd(ARENA_BYTES, "torchpool-test")
    try:
        return shm.Arena(fd, ARENA_BYTES)
    finally:
        os.close(fd)


def _test_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("torchpool-test" in line for line in f)


@pytest.fixture
def make() -> Iterator[Any]:
    """make(workers=1, **settings) -> (scheduler, [slots]); the arenas are unmapped afterwards."""
    made: list[Scheduler[FakeSlot]] = []
    before = _test_mappings()

    def factory(workers: int = 1, *, max_batch_size: int = 8, batch_delay: float = 5.0,
                pipeline_depth: int = 4, batch_buckets: tuple[int, ...] = (), split_batches: bool = False
                ) -> tuple[Scheduler[FakeSlot], list[FakeSlot]]:
        slots = [FakeSlot(_arena()) for _ in range(workers)]
        sched = Scheduler(slots, Metrics(), max_batch_size=max_batch_size, batch_delay=batch_delay,
                          pipeline_depth=pipeline_depth, retry_after=1, batch_buckets=batch_buckets,
                          split_batches=split_batches)
        made.append(sched)
        return sched, slots

    yield factory
    for sched in made:   # jobs and slots refer to each other: cut that, and the arenas go at once
        for slot in sched.slots:
            slot.jobs.clear()
            slot.arena = slot.inputs = slot.outputs = None
    made.clear()
    assert _test_mappings() == before, "an arena outlived its test"


def call(*args: Any, batch: bool = True, timeout: float | None = None, **kwargs: Any) -> Call:
    skel_args, skel_kwargs, tensors, _ = codec.flatten_call(args, kwargs, 1 << 30)
    c = Call(skel_args, skel_kwargs, tensors, Future(),
             None if timeout is None else time.monotonic() + timeout, retries=1)
    if batch:
        c.key, c.rows = batch_key(c)
    return c


def submit(sched: Scheduler[FakeSlot], c: Call) -> Job[FakeSlot] | None:
    """What Pool.submit does: place *c* (or queue it), then copy its inputs in, outside the lock."""
    with sched.lock:
        job = sched.place(c)
        if job is None:
            sched.queue.append(c)
    if job is not None:
        sched.write(job, c)
    return job


def hold(sched: Scheduler[FakeSlot]) -> Job[FakeSlot]:
    """A call without tensors (never batched) that keeps a worker busy."""
    job = submit(sched, call(action="sleep"))
    assert job is not None and job.sent
    return job


def reply(slot: FakeSlot, job: Job[Any], out: Any) -> messages.Result:
    """The worker's answer to *job*: *out* written into the arena's output half."""
    assert slot.arena is not None and slot.outputs is not None
    produced: list[torch.Tensor] = []
    value = codec.flatten(out, produced, "output")
    placer = shm.Placer(slot.arena, slot.outputs)
    return messages.Result(job.id, value, placer.place_all(produced))


# --- batch keys -------------------------------------------------------------------------------------------


def test_same_key_only_for_same_structure_dtype_and_trailing_shape() -> None:
    base = call(torch.zeros(2, 3), scale=2)
    assert base.key is not None and base.rows == 2
    assert call(torch.ones(5, 3), scale=2).key == base.key          # rows may differ
    assert call(torch.zeros(2, 4), scale=2).key != base.key         # trailing shape
    assert call(torch.zeros(2, 3, dtype=torch.float64), scale=2).key != base.key  # dtype
    assert call(torch.zeros(2, 3), scale=3).key != base.key         # a non-tensor value
    assert call(torch.zeros(2, 3), torch.zeros(2, 3), scale=2).key != base.key   # structure
    two = call(torch.zeros(2, 3), torch.zeros(2, 7))
    assert two.key is not None and two.rows == 2


@pytest.mark.parametrize("args", [
    pytest.param((), id="no tensor"),
    pytest.param((torch.tensor(1.0),), id="0-dim"),
    pytest.param((torch.zeros(2, 3), torch.zeros(3, 3)), id="dim 0 differs"),
    pytest.param((torch.zeros(0, 3),), id="no rows"),
])
def test_not_batchable(args: tuple[Any, ...]) -> None:
    c = call(*args, flag=True)
    assert (c.key, c.rows) == (None, 0)


# --- how batches form -------------------------------------------------------------------------------------


def test_batches_fill_strictly_up_to_max_rows(make: Any) -> None:
    sched, [_, slot] = make(2, max_batch_size=8, pipeline_depth=4)
    hold(sched)   # worker 0 is busy: the pool is not quiet, so a batch on worker 1 waits to fill
    a1, a2, b1 = call(torch.ones(3, 2)), call(torch.ones(3, 2)), call(torch.ones(3, 2))
    job_a = submit(sched, a1)
    assert job_a is not None and job_a.slot is slot and job_a.capacity == 8 and not job_a.sealed
    assert submit(sched, a2) is job_a
    # 9 rows would not fit: the full batch goes; b1 waits for a free worker (none: both are busy).
    assert submit(sched, b1) is None and list(sched.queue) == [b1]
    assert (job_a.rows, job_a.starts, job_a.sealed, job_a.sent) == (6, [0, 3], True, True)
    sched.complete(slot, reply(slot, job_a, torch.zeros(6, 2)), [])
    sched.dispatch()   # worker 1 is free again: the queued call opens its next batch
    [job_b] = slot.jobs.values()
    assert (job_b.rows, job_b.sealed, job_b.sent) == (3, False, False)
    exact = [call(torch.ones(1, 2)) for _ in range(5)]
    jobs = [submit(sched, c) for c in exact]
    assert jobs == [job_b] * 5 and job_b.rows == 8 and job_b.sealed and job_b.sent  # full: sent at once
    header = slot.sent_calls()[-1]
    assert header.id == job_b.id and [r.shape for r in header.refs] == [(8, 2)]
    assert sched.metrics.snapshot()["batch_rows"]["count"] == 2


def test_a_call_larger_than_the_limit_runs_alone(make: Any) -> None:
    sched, _ = make(2, max_batch_size=4)
    hold(sched)
    job = submit(sched, call(torch.ones(6, 2)))
    assert job is not None and job.capacity == 6 and job.rows == 6 and job.sent


def test_a_batch_in_a_quiet_pool_is_sent_at_once(make: Any) -> None:
    sched, [slot] = make(batch_delay=5.0)
    assert sched.quiet()
    job = submit(sched, call(torch.ones(1, 2)))
    assert job is not None and job.sealed and job.sent and len(slot.sent_calls()) == 1
    sched.complete(slot, reply(slot, job, torch.zeros(1, 2)), [])
    again = submit(sched, call(torch.ones(1, 2)))   # the last batch held one call: still quiet
    assert again is not None and again.sent


def test_after_a_batch_of_several_calls_the_next_batch_waits_for_their_callers(make: Any) -> None:
    """In a closed loop the callers of a batch come back together: the first must not leave alone."""
    sched, [slot] = make(batch_delay=5.0)
    sched.queue.extend(call(torch.ones(1, 2)) for _ in range(3))
    sched.dispatch()   # a batch formed from the queue waits for its delay
    [job] = slot.jobs.values()
    assert not job.sent and sched.next_seal() == pytest.approx(job.opened + 5.0)
    assert sched.wake_for_seal(job.opened + 60) == pytest.approx(job.opened + 5.0)
    sched.seal_due(job.opened + 5.0)
    [header] = slot.sent_calls()
    assert header.refs[0].shape == (3, 2)
    sched.complete(slot, reply(slot, job, torch.zeros(3, 2)), [])
    first_back = submit(sched, call(torch.ones(1, 2)))
    assert first_back is not None and not first_back.sent   # the pool is empty, but not quiet
    assert submit(sched, call(torch.ones(1, 2))) is first_back
    sched.seal_due(first_back.opened + 5.0)
    assert first_back.sent and first_back.rows == 2


def test_a_batch_waits_at_most_a_share_of_the_last_batch_s_run(make: Any) -> None:
    """A fast model never idles waiting for calls: the wait is capped by how long its batches take."""
    sched, [slot] = make(batch_delay=5.0)
    assert sched.batch_wait == 5.0   # nothing measured yet
    sched.queue.extend(call(torch.ones(1, 2)) for _ in range(2))
    sched.dispatch()
    [job] = slot.jobs.values()
    sched.seal_due(job.opened + 5.0)
    job.sent_at = time.monotonic() - 0.04   # the worker took 40 ms
    sched.complete(slot, reply(slot, job, torch.zeros(2, 2)), [])
    assert sched.batch_wait == pytest.approx(0.01, abs=0.005)   # a quarter of it, under the delay
    waiting = submit(sched, call(torch.ones(1, 2)))   # after a batch of two: not quiet
    assert waiting is not None and not waiting.sent
    assert sched.next_seal() == pytest.approx(waiting.opened + sched.batch_wait)
    sched.seal_due(waiting.opened + sched.batch_wait)
    assert waiting.sent


def test_without_a_delay_a_batch_never_waits(make: Any) -> None:
    sched, _ = make(2, batch_delay=0.0)
    hold(sched)
    job = submit(sched, call(torch.ones(1, 2)))
    assert job is not None and job.sealed and job.sent
    sched2, [slot2] = make(batch_delay=0.0)
    sched2.queue.extend(call(torch.ones(1, 2)) for _ in range(2))
    sched2.dispatch()
    assert [m.refs[0].shape for m in slot2.sent_calls()] == [(2, 2)]


def test_no_batch_waits_behind_a_running_job(make: Any) -> None:
    """Note [Batching]: while every worker is busy batchable calls queue, and the first worker to finish
    takes them all as one batch; none is split into batches pipelined behind each running job."""
    sched, slots = make(2, batch_delay=5.0, pipeline_depth=4)
    busy = [hold(sched), hold(sched)]
    assert [j.slot for j in busy] == slots
    queued = [call(torch.ones(1, 2)) for _ in range(6)]
    assert all(submit(sched, c) is None for c in queued) and list(sched.queue) == queued
    assert all(len(s.jobs) == 1 for s in slots)
    sched.complete(slots[1], reply(slots[1], busy[1], "slept"), [])
    sched.dispatch()
    [job] = slots[1].jobs.values()
    assert job.rows == 6 and not sched.queue and all(c.state is CallState.PLACED for c in queued)
    sched.seal_due(job.opened + 5.0)
    assert job.sent and slots[1].sent_calls()[-1].refs[0].shape == (6, 2)


# --- which worker -----------------------------------------------------------------------------------------


def test_pipeline_depth_counts_jobs_not_calls(make: Any) -> None:
    sched, [busy_slot, slot] = make(2, pipeline_depth=2, max_batch_size=64)
    hold(sched)
    batch = [call(torch.ones(1, 2)) for _ in range(10)]
    jobs = {id(submit(sched, c)) for c in batch}
    assert len(jobs) == 1 and len(slot.jobs) == 1   # ten calls, one job: the depth does not cap a batch
    other = call(torch.ones(1, 3))   # another key needs a worker of its own: both are busy
    assert submit(sched, other) is None and list(sched.queue) == [other]
    plain = call(n=1)                # a call that is not batched may queue behind a running job
    job = submit(sched, plain)
    assert job is not None and job.slot is busy_slot and len(busy_slot.jobs) == 2


def test_a_workers_busy_time_counts_its_jobs_in_turn_once(make: Any) -> None:
    """worker_busy_seconds: a worker's time from sending each job to its answer. Jobs pipelined on one
    worker run in turn, so the time they overlap counts once."""
    sched, [slot] = make(pipeline_depth=2)
    first, second = hold(sched), hold(sched)
    assert first.slot is slot and second.slot is slot
    start = time.monotonic() - 1.0
    first.sent_at = second.sent_at = start   # both sent a second ago
    sched.complete(slot, reply(slot, first, None), [])
    ran_first = sched.metrics.snapshot()["worker_busy_seconds"]
    sched.complete(slot, reply(slot, second, None), [])
    end = time.monotonic()
    busy = sched.metrics.snapshot()["worker_busy_seconds"]
    assert 1.0 <= ran_first <= busy <= end - start   # 2 s if each job counted from its sending


def test_the_busy_time_keeps_no_record_of_a_worker_slot_that_is_gone() -> None:
    """A rolling reload replaces every slot: the last-answer time of a replaced one must not stay behind
    (one entry per worker per reload, for ever)."""
    metrics = Metrics()

    class Slot:
        pass

    slot = Slot()
    metrics.record_answer(slot, time.monotonic() - 0.5)
    assert len(metrics._answered) == 1
    del slot
    gc.collect()
    assert len(metrics._answered) == 0
    assert metrics.snapshot()["worker_busy_seconds"] >= 0.5   # what it counted stays counted


def test_least_loaded_ready_worker_first(make: Any) -> None:
    sched, slots = make(3, pipeline_depth=4)
    slots[2].state = WorkerState.STARTING
    picked = [submit(sched, call(n=i)) for i in range(4)]
    assert [j.slot for j in picked if j] == [slots[0], slots[1], slots[0], slots[1]]
    assert [load(s) for s in slots] == [2, 2, 0]
    picked[0].expired = True   # nobody waits for it any more: it does not count
    assert load(slots[0]) == 1
    assert sched.pick_slot() is slots[0]


def test_queued_calls_go_fifo_when_a_worker_frees(make: Any) -> None:
    sched, [slot] = make(pipeline_depth=1)
    first = call(n=0)
    job = submit(sched, first)
    assert job is not None
    queued = [call(n=i) for i in range(1, 4)]
    assert all(submit(sched, c) is None for c in queued)
    with sched.lock:
        sched.finish(queued[0], exc=InferenceTimeoutError("gave up"))   # a caller gave up meanwhile
    sched.flush()
    sched.complete(slot, reply(slot, job, "zero"), [])
    assert first.state is CallState.DONE and slot.calls == 1
    sched.dispatch()
    assert [c.state for c in queued] == [CallState.DONE, CallState.PLACED, CallState.QUEUED]
    assert list(sched.queue) == queued[2:] and slot.sent_calls()[-1].kwargs == {"n": 2}


# --- results ----------------------------------------------------------------------------------------------


def test_outputs_split_back_to_members(make: Any) -> None:
    sched, [busy_slot, slot] = make(2, max_batch_size=4)
    busy = hold(sched)
    members = [call(torch.full((r, 2), float(i))) for i, r in enumerate((1, 2, 1))]
    futures = [c.future for c in members]
    [job] = {id(j): j for j in (submit(sched, c) for c in members) if j}.values()
    assert job.rows == 4 and job.sent
    # The worker reads the stacked inputs from the arena and answers one tensor of 4 rows.
    assert slot.arena is not None
    x = slot.arena.view(job.regions[0][0], 4 * 2 * 4, torch.float32, (4, 2))
    assert x[:, 0].tolist() == [0.0, 1.0, 1.0, 2.0]
    sched.complete(slot, reply(slot, job, {"y": x + 10, "note": "ok"}), [])
    outs = [f.result(0) for f in futures if f is not None]
    assert [o["y"][:, 0].tolist() for o in outs] == [[10.0], [11.0, 11.0], [12.0]]
    assert all(o["note"] == "ok" for o in outs)
    assert slot.inputs is not None and slot.inputs.used == 0   # the batch's input block is free
    sched.complete(busy_slot, reply(busy_slot, busy, None), [])


def test_dim0_mismatch_fails_every_member(make: Any) -> None:
    sched, [_, slot] = make(2, max_batch_size=4)
    hold(sched)
    members = [call(torch.ones(1, 2)) for _ in range(3)]
    futures = [c.future for c in members]
    jobs = [submit(sched, c) for c in members]
    job = jobs[0]
    assert job is not None and jobs == [job] * 3 and not job.sent
    sched.seal_due(time.monotonic() + 10)
    assert job.sent
    sched.complete(slot, reply(slot, job, torch.zeros(2, 2)), [])   # 2 rows for a batch of 3
    for future in futures:
        assert future is not None
        with pytest.raises(OutputError, match="for a batch of 3 rows; batched outputs must keep dim 0"):
            future.result(0)
    assert sched.metrics.snapshot()["calls"]["output_error"] == 3
    assert (slot.calls, slot.errors) == (3, 0)


def test_a_batch_runs_padded_to_its_bucket_with_copies_of_its_last_row(make: Any) -> None:
    """Note [Batch buckets]: three rows run as four; the fourth is the third again, never stale arena
    bytes, and its output goes to nobody."""
    sched, [_, slot] = make(2, max_batch_size=8, batch_buckets=(1, 4, 8))
    assert slot.arena is not None
    slot.arena.bytes.fill_(0xFF)   # stale bytes (NaNs) wherever padding that is not written would be
    hold(sched)
    members = [call(torch.full((1, 2), float(i))) for i in range(3)]
    futures = [c.future for c in members]
    jobs = [submit(sched, c) for c in members]
    job = jobs[0]
    assert job is not None and jobs == [job] * 3 and not job.sent
    sched.seal_due(time.monotonic() + 10)
    [header] = slot.sent_calls()
    assert header.refs[0].shape == (4, 2) and header.refs[0].nbytes == 4 * 2 * 4
    x = slot.arena.view(job.regions[0][0], 4 * 2 * 4, torch.float32, (4, 2))
    assert x[:, 0].tolist() == [0.0, 1.0, 2.0, 2.0]
    sched.complete(slot, reply(slot, job, {"y": x + 10}), [])
    assert [f.result(0)["y"].tolist() for f in futures if f is not None] == [[[10.0] * 2], [[11.0] * 2],
                                                                            [[12.0] * 2]]
    metrics = sched.metrics.snapshot()
    assert metrics["batch_rows"]["sum"] == 3 and metrics["batch_padding_rows"] == 1


@pytest.mark.parametrize(("rows", "runs_as"), [(1, 1), (2, 4), (4, 4), (5, 8), (8, 8), (9, 9)])
def test_the_smallest_bucket_that_holds_the_rows(make: Any, rows: int, runs_as: int) -> None:
    sched, [slot] = make(max_batch_size=8, batch_buckets=(1, 4, 8))
    job = submit(sched, call(torch.ones(rows, 3)))   # a quiet pool: sent at once
    assert job is not None and job.sent and job.padded == runs_as - rows
    [header] = slot.sent_calls()
    assert header.refs[0].shape == (runs_as, 3)   # 9 rows: more than any bucket, run as they are
    sched.complete(slot, reply(slot, job, torch.zeros(runs_as, 3)), [])
    assert job.members[0].future is None and slot.calls == 1


def test_a_padded_batch_whose_output_drops_rows_fails_every_member(make: Any) -> None:
    sched, [slot] = make(max_batch_size=8, batch_buckets=(4,))
    lone = call(torch.ones(1, 2))
    future = lone.future
    job = submit(sched, lone)
    assert job is not None and job.sent and job.padded == 3
    sched.complete(slot, reply(slot, job, torch.zeros(1, 2)), [])   # the model kept only the real row
    assert future is not None
    with pytest.raises(OutputError, match="shape \\(1, 2\\) for a batch of 4 rows"):
        future.result(0)


def test_a_batch_whose_first_member_finished_before_it_was_sent_keeps_its_layout(make: Any) -> None:
    """The tensors' layout comes from the batch key: a member past its deadline holds no tensors."""
    sched, [_, slot] = make(2, batch_delay=5.0)
    hold(sched)
    first, second = call(torch.ones(1, 2), timeout=0.01), call(torch.full((1, 2), 5.0))
    future = second.future
    job = submit(sched, first)
    assert job is not None and submit(sched, second) is job and not job.sent
    deadlines = _deadlines(sched)
    with sched.lock:
        deadlines.add(first)
    deadlines.expire(time.monotonic() + 1)
    assert first.state is CallState.DONE and first.tensors == []
    sched.seal_due(time.monotonic() + 10)
    [header] = slot.sent_calls()
    assert [r.shape for r in header.refs] == [(2, 2)]
    assert slot.arena is not None
    x = slot.arena.view(job.regions[0][0], 2 * 2 * 4, torch.float32, (2, 2))
    sched.complete(slot, reply(slot, job, x + 1), [])
    assert future is not None and future.result(0).tolist() == [[6.0, 6.0]]


# --- deadlines and dropped jobs ---------------------------------------------------------------------------


def test_a_call_past_its_deadline_is_dropped(make: Any) -> None:
    sched, [slot] = make(pipeline_depth=1)
    deadlines = _deadlines(sched)  # nothing to kill: the call is queued
    hold(sched)
    late = call(n=1, timeout=0.01)
    future = late.future
    assert submit(sched, late) is None
    with sched.lock:
        deadlines.add(late)
        assert deadlines.next() == late.deadline
    assert late.deadline is not None
    deadlines.expire(late.deadline + 0.001)
    assert future is not None
    with pytest.raises(InferenceTimeoutError, match="it was waiting for a worker"):
        future.result(0)
    assert not sched.queue
    with sched.lock:
        assert deadlines.next() is None
    assert sched.metrics.snapshot()["calls"]["timeout"] == 1


def test_an_unsent_job_whose_members_are_done_is_dropped(make: Any) -> None:
    sched, [busy_slot, slot] = make(2, batch_delay=5.0)
    busy = hold(sched)
    members = [call(torch.ones(2, 8), timeout=0.01) for _ in range(2)]
    jobs = [submit(sched, c) for c in members]
    job = jobs[0]
    assert job is not None and jobs[1] is job and not job.sent
    assert slot.inputs is not None and slot.inputs.used > 0
    deadlines = _deadlines(sched)  # nothing to kill: the job was never sent
    with sched.lock:
        for c in members:
            deadlines.add(c)
    deadlines.expire(time.monotonic() + 1)
    assert all(c.state is CallState.DONE for c in members)
    sched.seal_due(time.monotonic() + 10)   # sealing it finds nobody waiting: dropped, never sent
    assert not job.sent and job.id not in slot.jobs and not sched.open
    assert slot.inputs.used == 0 and not slot.sent_calls() and not slot.jobs
    assert [m.id for m in busy_slot.sent_calls()] == [busy.id] and list(busy_slot.jobs) == [busy.id]


def _deadlines(sched: Scheduler[Any]) -> _Deadlines:
    """The pool's deadlines over *sched*, with no worker set (nothing to kill) and no stream."""
    streams = StreamBook(PoolConfig(model="tests.models:echo"), sched, None, sched.metrics, lambda: None)  # type: ignore[arg-type]
    return _Deadlines(sched, None, streams)  # type: ignore[arg-type]


# --- batch splitting (Note [Batch splitting]) ---------------------------------------------------------


def staircase(costs: BatchCosts, times_ms: dict[int, float], samples: int = MIN_SAMPLES) -> BatchCosts:
    """*costs* with each size's time measured *samples* times."""
    for rows, ms in times_ms.items():
        for _ in range(samples):
            costs.record(rows, ms / 1000)
    return costs


#: The wide MLP's curve on one core (docs/benchmarks.rst, bench-tuned): 1-3 rows cost one, 4 cost two.
STEP = {1: 10.0, 2: 10.0, 3: 10.0, 4: 20.0}


def test_a_batch_runs_the_first_calls_that_give_the_most_rows_per_second() -> None:
    one_by_one = [0, 1, 2, 3]   # the first rows of four calls of one row
    assert BatchCosts().keep(one_by_one, 4) == 4   # nothing measured: run whole
    costs = staircase(BatchCosts(), STEP)
    assert costs.keep(one_by_one, 4) == 3           # 3 rows a 10 ms against 4 a 20 ms
    assert costs.keep(one_by_one[:3], 3) == 3       # nothing to gain
    assert costs.keep([0, 3], 4) == 1               # whole calls: the first call's 3 rows
    assert costs.keep([0, 1, 3], 4) == 2            # calls of 1, 2 and 1 rows: the first two
    assert costs.keep([0, 2], 4) == 2               # 2 rows a 10 ms: no faster than the whole
    # The other worker free: the rest runs beside the first part (4 rows in 10 ms); on a tie the first
    # part is the longer one.
    assert costs.keep(one_by_one, 4, parallel=True) == 3
    # Padded to a bucket of 4, 3 rows cost what 4 do: no split.
    assert costs.keep(one_by_one, 4, lambda n: 4 if n > 1 else n) == 4


def test_a_split_must_gain_a_fifth_on_a_batch_slow_enough_to_measure() -> None:
    one_by_one = [0, 1, 2, 3]
    assert staircase(BatchCosts(), {2: 10.0, 3: 10.0, 4: 15.0}).keep(one_by_one, 4) == 4   # 12.5% faster
    assert staircase(BatchCosts(), {2: 10.0, 3: 10.0, 4: 17.5}).keep(one_by_one, 4) == 3   # 31% faster
    fast = staircase(BatchCosts(), {k: v / 10 for k, v in STEP.items()})         # 1 and 2 ms a batch
    assert fast.keep(one_by_one, 4) == 4 and fast.keep(one_by_one, 4, parallel=True) == 4
    assert staircase(BatchCosts(), STEP, samples=MIN_SAMPLES - 1).keep(one_by_one, 4) == 4


def test_every_sixteenth_batch_that_would_split_runs_whole_to_measure_its_size_again() -> None:
    costs = staircase(BatchCosts(), STEP)
    kept = [costs.keep([0, 1, 2, 3], 4) for _ in range(2 * EXPLORE_EVERY)]
    assert [i for i, k in enumerate(kept) if k == 4] == [EXPLORE_EVERY - 1, 2 * EXPLORE_EVERY - 1]
    assert set(kept) == {3, 4}


def test_an_unmeasured_batch_splits_at_its_middle_until_its_halves_are_timed() -> None:
    costs = staircase(BatchCosts(), {8: 30.0})
    starts = list(range(8))
    for _ in range(MIN_SAMPLES):
        assert costs.keep(starts, 8) == 4             # every other worker busy: the first half
        costs.record(4, 0.012)
    assert costs.keep(starts, 8) == 4                  # 4 rows in 12 ms: faster a row than 8 in 30
    costs = staircase(BatchCosts(), {8: 30.0, 3: 12.0})
    assert costs.keep([0, 3], 8, parallel=True) == 1   # the first half timed, not the rest (5 rows)
    costs = staircase(BatchCosts(), {8: 30.0})
    for _ in range(MIN_SAMPLES):
        assert costs.keep(starts, 8, parallel=True) == 4   # a free worker: both halves
        costs.record(4, 0.012)
    assert costs.keep(starts, 8, parallel=True) == 4   # measured now: 8 rows in 12 against 30 ms
    for _ in range(20):   # the moving average follows the new times
        costs.record(4, 0.029)
    assert costs.keep(starts, 8, parallel=True) == 8   # two halves in about the time of the whole
    assert BatchCosts().keep(starts, 8, parallel=True) == 8   # no size measured slow: no exploring


def test_a_split_batch_sends_its_first_calls_and_the_next_batch_takes_the_rest_first(make: Any) -> None:
    sched, [busy_slot, slot] = make(2, max_batch_size=8, split_batches=True)
    assert sched.costs is not None
    staircase(sched.costs, STEP)
    busy = hold(sched)   # every other worker is busy: the rest waits for the next batch
    members = [call(torch.full((1, 2), float(i))) for i in range(4)]
    futures = [c.future for c in members]
    late = call(torch.full((1, 2), 9.0))
    jobs = [submit(sched, c) for c in members]
    job = jobs[0]
    assert job is not None and jobs == [job] * 4 and not job.sent
    sched.seal_due(time.monotonic() + 10)
    [header] = slot.sent_calls()
    assert header.refs[0].shape == (3, 2) and job.members == members[:3] and job.rows == 3
    assert list(sched.queue) == [members[3]] and members[3].state is CallState.QUEUED
    assert members[3].job is None and members[3].dispatched is None
    assert sched.metrics.snapshot()["batch_split_calls"] == 1
    with sched.lock:
        sched.queue.append(late)   # came in meanwhile: behind the call the batch left
    assert slot.arena is not None
    x = slot.arena.view(job.regions[0][0], 3 * 2 * 4, torch.float32, (3, 2))
    sched.complete(slot, reply(slot, job, x + 10), [])
    assert [f.result(0)[:, 0].tolist() for f in futures[:3] if f is not None] == [[10.0], [11.0], [12.0]]
    sched.dispatch()
    nxt = members[3].job
    assert nxt is not None and nxt.slot is slot and nxt.members == [members[3], late]
    sched.seal_due(time.monotonic() + 10)   # two rows: run whole
    y = slot.arena.view(nxt.regions[0][0], 2 * 2 * 4, torch.float32, (2, 2))
    sched.complete(slot, reply(slot, nxt, y + 10), [])
    assert futures[3] is not None and futures[3].result(0)[:, 0].tolist() == [13.0]
    sched.complete(busy_slot, reply(busy_slot, busy, None), [])
    metrics = sched.metrics.snapshot()
    assert metrics["batch_split_calls"] == 1 and metrics["batch_rows"]["sum"] == 5


def test_a_batch_split_for_a_free_worker_runs_its_rest_there_at_once(make: Any) -> None:
    sched, [first, second] = make(2, max_batch_size=8, split_batches=True)
    assert sched.costs is not None
    staircase(sched.costs, STEP)
    sched.last_batch_calls = 2   # not quiet: the first call waits for the others (Note [Batching])
    members = [call(torch.full((1, 2), float(i))) for i in range(4)]
    futures = [c.future for c in members]
    jobs = [submit(sched, c) for c in members]
    job = jobs[0]
    assert job is not None and jobs == [job] * 4 and job.slot is first and not job.sent
    sched.seal_due(time.monotonic() + 10)
    [a], [b] = first.sent_calls(), second.sent_calls()   # both run now
    assert a.refs[0].shape == (3, 2) and b.refs[0].shape == (1, 2) and not sched.queue
    rest = members[3].job
    assert rest is not None and rest.slot is second and rest.sent
    for slot, part, rows in ((first, job, 3), (second, rest, 1)):
        assert slot.arena is not None
        x = slot.arena.view(part.regions[0][0], rows * 2 * 4, torch.float32, (rows, 2))
        sched.complete(slot, reply(slot, part, x + 10), [])
    assert [f.result(0)[:, 0].tolist() for f in futures if f is not None] == [[10.0], [11.0], [12.0], [13.0]]
    assert sched.metrics.snapshot()["batch_split_calls"] == 1


def test_a_member_past_its_deadline_is_not_put_back(make: Any) -> None:
    sched, [_, slot] = make(2, max_batch_size=8, split_batches=True)
    assert sched.costs is not None
    staircase(sched.costs, STEP)
    hold(sched)
    members = [call(torch.ones(1, 2)) for _ in range(3)] + [call(torch.ones(1, 2), timeout=0.01)]
    for c in members:
        submit(sched, c)
    deadlines = _deadlines(sched)
    with sched.lock:
        deadlines.add(members[3])
    deadlines.expire(time.monotonic() + 1)
    assert members[3].state is CallState.DONE
    sched.seal_due(time.monotonic() + 10)
    [header] = slot.sent_calls()
    assert header.refs[0].shape == (3, 2) and not sched.queue
    assert sched.metrics.snapshot()["batch_split_calls"] == 0


def test_split_batches_off_runs_every_batch_whole(make: Any) -> None:
    sched, [_, slot] = make(2, max_batch_size=8)
    assert sched.costs is None
    hold(sched)
    for _ in range(4):
        submit(sched, call(torch.ones(1, 2)))
    sched.seal_due(time.monotonic() + 10)
    [header] = slot.sent_calls()
    assert header.refs[0].shape == (4, 2) and not sched.queue


def split_while_dispatched(make: Any, workers: int
                           ) -> tuple[Any, list[Any], list[Job[Any]], list[Call], Call]:
    """*workers* slots, all but the last held busy; three 1-row calls open a batch of 4 rows on the last,
    and a 2-row call that does not fit waits in the queue. The times make a 3-row batch run its first 2
    rows alone. Returns (scheduler, slots, held jobs, the batch's members, the late call)."""
    sched, slots = make(workers, max_batch_size=4, split_batches=True)
    assert sched.costs is not None
    staircase(sched.costs, {1: 10.0, 2: 10.0, 3: 30.0})
    held = [hold(sched) for _ in slots[:-1]]
    assert [j.slot for j in held] == slots[:-1]
    members = [call(torch.full((1, 2), float(i))) for i in range(3)]
    for c in members:
        submit(sched, c)
    batch = members[0].job
    assert batch is not None and batch.slot is slots[-1] and not batch.sent
    late = call(torch.full((2, 2), 7.0))   # 3 + 2 rows: more than the batch holds
    with sched.lock:
        sched.queue.append(late)
    return sched, slots, held, members, late


def test_a_batch_split_while_the_queue_is_dispatched_loses_no_call(make: Any) -> None:
    """A queued call that does not fit an open batch seals it; that batch splits (Note [Batch splitting])
    and puts calls back at the front of the queue while the dispatch loop is placing that very call."""
    sched, [_, second, third], held, members, late = split_while_dispatched(make, 3)
    batch = members[0].job
    sched.complete(second, reply(second, held[1], None), [])   # a worker frees up: dispatch
    sched.dispatch()
    assert not sched.queue
    [sent] = third.sent_calls()
    assert batch is not None and sent.refs[0].shape == (2, 2) and batch.members == members[:2]
    nxt = late.job
    assert nxt is not None and nxt.slot is second and nxt.members == [late, members[2]]
    assert members[2].job is nxt and members[2].state is CallState.PLACED


def test_a_queued_call_with_no_room_goes_back_behind_the_calls_a_split_put_back(make: Any) -> None:
    """The dispatch loop takes a call off the queue; it does not fit the open batch, which seals and
    splits (Note [Batch splitting]) while no worker is free. The batch is sent at once (it waited for the
    manager's next wake-up), and the call goes back behind the calls the split put back, which arrived
    before it (FIFO; it went in front of them)."""
    sched, [_, second], _, members, late = split_while_dispatched(make, 2)
    batch = members[0].job
    sched.dispatch()
    [sent] = second.sent_calls()
    assert batch is not None and sent.refs[0].shape == (2, 2) and batch.members == members[:2]
    assert list(sched.queue) == [members[2], late]
