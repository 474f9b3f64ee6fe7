"""Calls, jobs and the scheduler: which worker slot runs what, and how batches form and split.

A caller's :class:`Call` becomes a member of a :class:`Job` on a worker slot with room (least loaded
first, ``TORCHPOOL_PIPELINE_DEPTH`` jobs at most), or waits in the queue (FIFO) until a slot frees. The
:class:`Scheduler` places calls, opens, joins, seals and sends batches (Note [Batching]), drops jobs nobody
waits for, splits a batch's outputs back to its members and completes every call once. It sees a worker
only through :class:`JobSlot` (state, jobs, arena, input allocator, channel), so it runs, and is tested,
without any process (``tests/test_scheduling.py``); :mod:`flask_torchpool.workers` provides the real slots
and :mod:`flask_torchpool.pool` drives it. Copying a call's inputs into the arena happens outside the lock,
in the caller's thread; futures are resolved outside the lock too (a done-callback may submit again).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, Protocol, TypeVar

from . import codec, messages, outputs, shm, sizing
from .errors import TorchPoolError, WireError, from_wire, placing_failed
from .metrics import Metrics, outcome_of
from .sizing import batch_key as batch_key
from .status import WorkerState

if TYPE_CHECKING:
    import numpy
    import torch

_ids = itertools.count(1)

#: An open batch waits for more calls at most this share of the time the last batch took to run (and at
#: most TORCHPOOL_MAX_BATCH_DELAY_MS): Note [Batching].
WAIT_SHARE = 0.25

# Note [Batching]
# ~~~~~~~~~~~~~~~
# A call is batchable when batching is on (TORCHPOOL_MAX_BATCH_SIZE > 1, and the view did not opt out),
# it carries at least one tensor, and all its tensors have the same size n >= 1 along dim 0. Its *key* is
# its structure with the non-tensor values, plus (dtype, shape[1:]) of every tensor: calls with the same
# key can run as one forward pass on their inputs stacked along dim 0.
#
# A batch is a job opened on a worker with nothing else to do (no job sent, queued or open there): while
# every worker is busy, batchable calls wait in the pool's queue, and the first worker to finish takes the
# queue's calls (FIFO, as many rows as fit) as its next batch. So a batch holds everything that arrived
# while the workers ran, instead of being split between batches pipelined behind each running job (with
# two workers and a pipeline depth of 2, eight callers made four batches of two; on a model whose cost
# per batch hardly grows with its size, that is half the throughput). TORCHPOOL_PIPELINE_DEPTH applies to
# calls that are not batched.
#
# The batch reserves, for every tensor of the key, one block of max_batch_size rows in that worker's
# arena; each member copies its rows straight into its slice (no staging copy, no torch.cat), in its own
# thread, or in the manager's for calls taken from the queue. The size limit counts rows, not calls, and
# is strict: a call that does not fit starts the next batch. A batch is sent when it is full; at once
# when the pool is quiet (no job on any worker, nothing queued, and the last batch held one call: light
# traffic adds no delay); otherwise when TORCHPOOL_MAX_BATCH_DELAY_MS has passed since it opened, so that
# under load the callers whose answers just went out can join it (in a closed loop of N callers, the next
# batch is otherwise only what arrived during the last one), but at most WAIT_SHARE of the time the last
# batch ran: a fast model must not sit idle waiting for calls. The worker runs a batch like any call;
# the web process splits every output tensor along dim 0 back to the members, and an error reaches the
# members of that batch only.
#
# Note [A failed batch]
# ~~~~~~~~~~~~~~~~~~~~~
# The model's error for a batch of several calls may quote any row, another caller's data: no member
# gets it. Each goes back to the front of the queue unbatched (no retry used) and gets its own result or
# error. A failed batch costs one more forward pass per member; a bad input fails only its own caller.


class CallState(enum.Enum):
    QUEUED = "queued"
    PLACED = "placed"      # a member of a job on a worker
    DONE = "done"


@dataclass(eq=False)
class Call:
    """One caller's call."""

    args: Any
    kwargs: Any
    tensors: list[torch.Tensor | numpy.ndarray]   # numpy arrays stay arrays: no torch needed to place them
    future: Future[Any] | None  # None once finished
    deadline: float | None
    retries: int
    key: Any = None        # batch key, None when not batchable
    rows: int = 0          # size along dim 0 when batchable
    id: int = field(default_factory=lambda: next(_ids))
    state: CallState = CallState.QUEUED
    job: Job[Any] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    dispatched: float | None = None
    target: tuple[str | None, int] = (None, 0)  # messages.Call's (method, window): Note [Streams]
    numpy: bool = False    # the caller passed numpy arrays: its outputs go back as numpy arrays


class Sender(Protocol):
    def send(self, msg: Any, fds: tuple[int, ...] = ...) -> None: ...


class JobSlot(Protocol):
    """A worker slot as the scheduler sees it (:class:`flask_torchpool.workers.WorkerSlot`, or a fake)."""

    state: WorkerState
    jobs: dict[int, Job[Any]]         # opened, sent or running
    arena: shm.Arena | None           # None while it has no process
    inputs: shm.Allocator | None      # the arena's input half
    releases: shm.ReleaseQueue        # output blocks to hand back with its next call
    calls: int                        # calls it answered
    errors: int                       # of those, failures

    @property
    def channel(self) -> Sender | None: ...
    @property
    def streams(self) -> bool: ...    # runs a stream: takes no other job meanwhile (Note [Streams])


S = TypeVar("S", bound=JobSlot)
T = TypeVar("T")


@dataclass(eq=False)
class Job(Generic[S]):
    """What a worker runs: one call, or a batch of calls stacked along dim 0."""

    slot: S
    key: Any = None                  # None: a single unbatched call
    id: int = field(default_factory=lambda: next(_ids))
    members: list[Call] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)   # first row of each member
    rows: int = 0
    padded: int = 0        # rows added to reach a batch bucket (Note [Batch buckets])
    capacity: int = 0
    regions: list[tuple[int, int]] = field(default_factory=list)  # batch: (offset, row bytes) a tensor
    blocks: list[int] = field(default_factory=list)   # input blocks to free when the worker is done
    kept: set[int] = field(default_factory=set)       # of those, blocks zero-copy outputs still use
    fds: list[int] = field(default_factory=list)      # one-off segments of a single call
    refs: tuple[shm.TensorRef, ...] = ()
    writers: int = 0       # members still copying their inputs in
    sealed: bool = False   # takes no more members
    sent: bool = False
    expired: bool = False  # every member finished without it (deadline) while the worker may run it
    opened: float = field(default_factory=time.monotonic)
    sent_at: float = 0.0

    def alive(self) -> bool:
        return any(m.state is not CallState.DONE for m in self.members)

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def load(slot: JobSlot) -> int:
    """Jobs on *slot* that someone still waits for (a batch counts once)."""
    return sum(1 for j in slot.jobs.values() if not j.expired)


def idle(slot: JobSlot) -> bool:
    """Nothing sent or ready to send (open batches still taking members do not count)."""
    return not any((j.sent or j.sealed) and not j.expired for j in slot.jobs.values())


class Scheduler(Generic[S]):
    """The queue and the jobs of one pool's worker slots. Thread-safe through :attr:`lock`.

    Methods documented "under the lock" must be called with :attr:`lock` held; they may complete calls
    and claim jobs for sending, which :meth:`flush` then does once the lock is released.
    """

    def __init__(self, slots: Sequence[S], metrics: Metrics, *, max_batch_size: int, batch_delay: float,
                 pipeline_depth: int, retry_after: int, lock: threading.Lock | None = None,
                 batch_buckets: tuple[int, ...] = (), split_batches: bool = False) -> None:
        self.slots = slots
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.batch_buckets = batch_buckets  # ascending, as ModelConfig keeps them
        self.batch_delay = batch_delay
        self.costs = sizing.BatchCosts() if split_batches else None   # Note [Batch splitting]
        self.pipeline_depth = pipeline_depth
        self.retry_after = retry_after
        #: Calls in the last batch sent (see :meth:`quiet`).
        self.last_batch_calls = 0
        #: How long an open batch waits for more calls now: ``batch_delay``, but at most WAIT_SHARE of
        #: the time the last batch took (Note [Batching]).
        self.batch_wait = batch_delay
        #: Guards the queue, the jobs of every slot, the slots' states and :attr:`closing`.
        self.lock = lock if lock is not None else threading.Lock()
        self.queue: deque[Call] = deque()
        self.open: dict[Any, Job[S]] = {}   # batch key -> the batch taking members
        #: Takes no new calls; open batches are sent at once and no crashed call is retried.
        self.closing = False
        # Futures are resolved outside the lock: finish() queues them here and flush() resolves them.
        self._done: deque[tuple[Future[Any], Any, BaseException | None]] = deque()
        self._outbox: deque[Job[S]] = deque()  # jobs claimed for sending, sent by flush() likewise
        self._run_rest = False   # flush() dispatches the calls a split batch left for a free worker

    # --- placing calls (under the lock) ------------------------------------------------------------------

    def free_slot(self) -> S | None:
        """A ready slot with no job at all (none sent, queued, open or expired but still running): where a
        batch may open (Note [Batching])."""
        for s in self.slots:
            if s.state is WorkerState.READY and not s.jobs and not s.streams:
                return s
        return None

    def quiet(self) -> bool:
        """Light traffic, a new batch goes at once: no job on any worker, no call queued, and the last
        batch sent held one call (after a batch of several, their callers are on their way back)."""
        return self.last_batch_calls <= 1 and not self.queue and not any(s.jobs for s in self.slots)

    def pick_slot(self) -> S | None:
        """The ready slot with room and the fewest outstanding jobs."""
        best = None
        for s in self.slots:
            if s.state is WorkerState.READY and len(s.jobs) < self.pipeline_depth and not s.streams:
                if best is None or load(s) < load(best):
                    best = s
        return best

    def place(self, call: Call, seal_idle: bool = True) -> Job[S] | None:
        """Under the lock: put *call* in an open batch or a new job, or return None (no room).

        The caller must then :meth:`write` the call's inputs (outside the lock). A batchable call that
        finds no open batch of its key opens one only on a :meth:`free_slot`. With *seal_idle*, a batch
        opened while the pool is :meth:`quiet` is sealed at once; :meth:`dispatch` passes False and
        decides once every queued call that fits has joined."""
        if call.key is not None:
            job = self.open.get(call.key)
            if job is not None and job.rows + call.rows > job.capacity:
                self.seal(job)
                self.maybe_send(job)
                job = None
            if job is None:
                slot = self.free_slot()
                if slot is None:
                    return None   # every worker is busy: wait in the queue (Note [Batching])
                job = self.open_batch(slot, call, seal_idle)
            if job is not None:
                self.join(job, call)
                if job.rows >= job.capacity:
                    self.seal(job)
                return job
        slot = self.pick_slot()
        if slot is None:
            return None
        job = Job(slot, sealed=True)
        slot.jobs[job.id] = job
        self.join(job, call)
        return job

    def open_batch(self, slot: S, call: Call, seal_idle: bool = True) -> Job[S] | None:
        """Under the lock: a batch for *call*'s key on *slot*, with max_batch_size rows reserved per
        tensor; None when the arena has no room for that (the call then runs alone)."""
        capacity = max(self.max_batch_size, call.rows)
        inputs = slot.inputs
        if inputs is None:
            return None
        regions: list[tuple[int, int]] = []
        blocks: list[int] = []
        for t in call.tensors:
            row_bytes = codec.tensor_nbytes(t) // call.rows
            offset = inputs.alloc(row_bytes * capacity)
            if offset is None:
                for b in blocks:
                    inputs.free(b)
                return None
            regions.append((offset, row_bytes))
            blocks.append(offset)
        quiet = self.quiet()
        job = Job(slot, key=call.key, capacity=capacity, regions=regions, blocks=blocks)
        slot.jobs[job.id] = job
        self.open[call.key] = job
        # Nothing else in the pool: waiting would only add latency (Note [Batching]).
        if seal_idle and (quiet or not self.batch_delay):
            self.seal(job)
        return job

    def join(self, job: Job[S], call: Call) -> None:
        call.state = CallState.PLACED
        call.job = job
        if call.dispatched is None:
            call.dispatched = time.monotonic()
        job.members.append(call)
        job.starts.append(job.rows)
        job.rows += call.rows
        job.writers += 1

    def seal(self, job: Job[S]) -> None:
        """Under the lock: *job* takes no more members."""
        job.sealed = True
        if job.key is not None and self.open.get(job.key) is job:
            del self.open[job.key]

    def maybe_send(self, job: Job[S]) -> None:
        """Under the lock: if *job* is sealed and written, claim it for :meth:`flush` to send. Drops a
        job nobody waits for any more."""
        if job.sent or not job.sealed or job.writers or not job.members:
            return
        if job.slot.jobs.get(job.id) is not job:
            return  # its worker died; the members were requeued
        if self.costs is not None and job.key is not None and len(job.members) > 1:
            free = self.free_slot() is not None   # Note [Batch splitting]
            rest = [c for c in self.costs.split(job, self.batch_buckets, free)
                    if c.state is not CallState.DONE]
            if rest:
                requeue(self.queue, rest)
                self.metrics.record_split(len(rest))
                self._run_rest = self._run_rest or free
        if not job.alive():
            self.drop(job)
            return
        job.sent = True
        job.sent_at = time.monotonic()
        self._outbox.append(job)

    def drop(self, job: Job[S]) -> None:
        """Under the lock: forget an unsent job (its members are done) and free its blocks."""
        job.slot.jobs.pop(job.id, None)
        self.seal(job)
        inputs = job.slot.inputs
        if inputs is not None:
            for offset in job.blocks:
                inputs.free(offset)
        job.blocks = []
        job.close_fds()

    def next_seal(self) -> float | None:
        """Under the lock: when the oldest open batch must be sent (None: no open batch)."""
        return min((job.opened + self.batch_wait for job in self.open.values()), default=None)

    def wake_for_seal(self, timers_due: float) -> float:
        """*timers_due*, or earlier if an open batch must be sent before: the manager's loop calls this
        after each round, since a dispatch (or a reload) may have opened a batch that waits."""
        if not self.open:
            return timers_due
        with self.lock:
            seal = self.next_seal()
        return timers_due if seal is None else min(timers_due, seal)

    # --- outside the lock ---------------------------------------------------------------------------------

    def write(self, job: Job[S], call: Call) -> None:
        """Copy *call*'s inputs into *job*'s arena blocks; the last writer of a sealed job sends it.
        Runs outside the lock, in the thread that placed the call, so copies run in parallel."""
        slot, arena = job.slot, job.slot.arena
        error: BaseException | None = None
        placer = None
        try:
            if arena is None or slot.inputs is None:
                pass  # the worker died meanwhile; its death requeued the call
            elif job.key is None:
                placer = shm.Placer(arena, slot.inputs)
                job.refs = tuple(placer.place(t) for t in call.tensors)
            else:
                start = job.starts[job.members.index(call)]
                for t, (offset, row_bytes) in zip(call.tensors, job.regions):
                    shm.write(arena, offset + start * row_bytes, t)
        except BaseException as exc:
            error = exc
        with self.lock:
            if placer is not None:
                job.blocks.extend(placer.blocks)
                job.fds.extend(placer.fds)
            job.writers -= 1
            if error is not None and call.state is not CallState.DONE:
                self.finish(call, exc=placing_failed(error, self.retry_after))
            self.maybe_send(job)
        self.flush()

    def dispatch(self, seal: bool = False) -> None:
        """Place queued calls (FIFO) while workers have room; *seal*: send their batches at once."""
        todo: list[tuple[Job[S], Call]] = []
        with self.lock:
            while self.queue:
                call = self.queue.popleft()   # before place: a batch it seals may put calls back in front
                if call.state is CallState.DONE:
                    continue
                behind = len(self.queue)
                job = self.place(call, seal_idle=False)
                if job is None:   # back in line, behind any calls a split just put back (they came first)
                    self.queue.insert(len(self.queue) - behind, call)
                    break
                todo.append((job, call))
            if seal or not self.batch_delay:
                for job in {id(j): j for j, _ in todo}.values():
                    self.seal(job)   # else a batch formed from the queue waits for the callers coming back
        for job, call in todo:
            self.write(job, call)
        if not todo:
            self.flush()   # a call that found no room may still have sealed a batch: send it now

    def seal_due(self, now: float, slot: S | None = None) -> None:
        """Send open batches whose delay passed (or, with *slot*, the ones on that now idle slot); all
        of them while closing."""
        with self.lock:
            for job in list(self.open.values()):
                if (slot is not None and job.slot is slot) or job.opened + self.batch_wait <= now \
                        or self.closing:
                    self.seal(job)
                    self.maybe_send(job)
        self.flush()

    def send(self, job: Job[S]) -> None:
        """Send a claimed job's header to its worker."""
        first = job.members[0]
        if job.key is None:
            refs = job.refs
        else:
            # The layout comes from the key: a member that finished (deadline) holds no tensors.
            rows = outputs.pad(job, self.batch_buckets)
            refs = tuple(shm.TensorRef(-1, offset, row_bytes * rows, dtype, (rows, *shape))
                         for (dtype, shape), (offset, row_bytes) in zip(job.key[1], job.regions))
            self.metrics.record_batch(job.rows, len(job.members), job.padded)
            self.last_batch_calls = len(job.members)
        msg = messages.Call(job.id, first.args, first.kwargs, refs, job.slot.releases.drain(), *first.target)
        channel = job.slot.channel
        try:
            if channel is None:
                raise OSError("no channel")
            channel.send(msg, tuple(job.fds))
        except OSError:
            pass  # the worker died; the manager sees its sentinel and deals with its jobs
        finally:
            job.close_fds()

    def flush(self) -> None:
        """Send the jobs :meth:`maybe_send` claimed and resolve the futures :meth:`finish` queued.
        Call without the lock held."""
        for job in _take_all(self._outbox):
            self.send(job)
        for future, result, exc in _take_all(self._done):
            with contextlib.suppress(InvalidStateError):  # its caller cancelled it (Pool.submit)
                future.set_result(result) if exc is None else future.set_exception(exc)
        if self._run_rest:   # a batch split for a free worker: its other calls go there now
            self._run_rest = False
            self.dispatch(seal=True)

    # --- completing calls ---------------------------------------------------------------------------------

    def finish(self, call: Call, result: Any = None, exc: BaseException | None = None) -> None:
        """Under the lock: complete *call* once. Later completions of the same call are ignored."""
        if call.state is CallState.DONE:
            return
        call.state = CallState.DONE
        call.tensors, call.job = [], None   # no Call <-> Job cycle (Note [Finished deadlines])
        now = time.monotonic()
        self.metrics.record_call(outcome_of(exc), now - call.enqueued,
                                 None if call.dispatched is None else call.dispatched - call.enqueued)
        # The call may linger (the deadline heap drops finished calls lazily): it must not keep the
        # future, and so the result, alive, or zero-copy outputs would never go back to the worker.
        future, call.future = call.future, None
        if future is not None:
            self._done.append((future, result, exc))

    def fail_queue(self, error: Callable[[], TorchPoolError]) -> None:
        """Under the lock: fail every queued call with a fresh ``error()`` each."""
        for call in self.queue:
            self.finish(call, exc=error())
        self.queue.clear()

    def complete(self, slot: S, msg: messages.Result | messages.Failure, fds: list[int]) -> None:
        """*slot* answered job ``msg.id``: give each member its part of the result (or the error), free
        the inputs, and send an open batch on the slot if it is now idle (Note [Batching])."""
        with self.lock:
            job = slot.jobs.pop(msg.id, None)
            members = [m for m in job.members if m.state is not CallState.DONE] if job else []
            if job is not None:
                self.returned(job)
        if not members:
            if isinstance(msg, messages.Result):  # nobody wants it: hand the output blocks straight back
                for fd in fds:
                    os.close(fd)
                for ref in msg.refs:
                    if ref.seg == -1 and ref.nbytes:
                        slot.releases(ref.offset)
            free_inputs(slot, job)
        else:
            assert job is not None
            # Note [A failed batch]: its error may quote any member's input; each member runs again alone.
            alone = isinstance(msg, messages.Failure) and job.key is not None and len(members) > 1
            if isinstance(msg, messages.Result):
                results = outputs.split(job, msg, fds, arrays=all(m.numpy for m in members))
            else:
                results = [(None, None if alone else from_wire(WireError(*msg[1:]))) for _ in job.members]
            # Only now: outputs that are inputs were read from these blocks (Note [Outputs that
            # are inputs], worker.py); the ones zero-copy views still use stay allocated.
            free_inputs(slot, job)
            with self.lock:
                slot.calls += len(members)
                if isinstance(msg, messages.Failure):
                    slot.errors += 1
                if alone:
                    for member in members:
                        member.key = None
                    requeue(self.queue, members)  # run by the next dispatch, no retry used
                for member, (value, exc) in zip(job.members, () if alone else results):
                    self.finish(member, value, exc)
            self.flush()
        if job is not None and job.key is not None or idle(slot):
            self.seal_due(time.monotonic(), slot)

    def returned(self, job: Job[S]) -> None:
        """Under the lock: *job* came back from its worker (:meth:`Metrics.record_answer` counts the
        worker's busy time); a batch sets :attr:`batch_wait` from the time it took (Note [Batching])."""
        if job.sent:
            took = self.metrics.record_answer(job.slot, job.sent_at)
            if job.key is not None:
                self.batch_wait = min(self.batch_delay, WAIT_SHARE * took)
                if self.costs is not None:
                    self.costs.record(job.rows + job.padded, took)

    # --- a slot's jobs when its process ends (under the lock) ---------------------------------------------

    def evacuate(self, slot: S, running: int, crashed: Callable[[], TorchPoolError]) -> int:
        """Under the lock: take every job off *slot*, whose worker died while running job *running*.
        Calls that never started go back to the front of the queue in their order; a member of the job
        that ran is retried while it has retries (and the pool is not closing), else fails with
        ``crashed()``. Returns how many calls were waiting on the slot."""
        jobs = list(slot.jobs.values())
        slot.jobs.clear()
        for job in jobs:
            self.seal(job)
            job.close_fds()
        calls = []
        affected = 0
        for job in jobs:
            ran = job.id == running
            for call in job.members:
                if call.state is CallState.DONE:
                    continue
                affected += 1
                call.job = None
                if not ran:
                    calls.append(call)  # it never started: safe to run elsewhere, no retry used
                elif call.retries > 0 and not self.closing:
                    call.retries -= 1
                    self.metrics.record_retry()
                    calls.append(call)
                else:
                    self.finish(call, exc=crashed())
        requeue(self.queue, calls)
        return affected

    def fail_running(self, error: Callable[[], TorchPoolError]) -> None:
        """Under the lock: fail every call in a job (sent or not) with a fresh ``error()`` each."""
        for slot in self.slots:
            for job in slot.jobs.values():
                for call in job.members:
                    self.finish(call, exc=error())

    def abandon(self, running: Callable[[], TorchPoolError], queued: Callable[[], TorchPoolError]) -> None:
        """Under the lock: the workers are gone for good. Fail every call in a job with ``running()`` and
        every queued call with ``queued()``, forget every job and take no new calls."""
        self.fail_running(running)
        for slot in self.slots:
            for job in slot.jobs.values():
                job.close_fds()
            slot.jobs.clear()
        self.fail_queue(queued)
        self.open.clear()
        self.closing = True


def requeue(queue: deque[Call], calls: list[Call]) -> None:
    """Put *calls* back at the front of *queue*, in the order they came in (under the scheduler's lock)."""
    for call in sorted(calls, key=lambda c: c.enqueued, reverse=True):
        call.job, call.state = None, CallState.QUEUED
        queue.appendleft(call)


def free_inputs(slot: JobSlot, job: Job[Any] | None) -> None:
    """Free a finished job's input blocks, except those kept for zero-copy outputs."""
    if job is None or slot.inputs is None:
        return
    for offset in job.blocks:
        if offset not in job.kept:
            slot.inputs.free(offset)
    job.blocks = []


def _take_all(items: deque[T]) -> Iterator[T]:
    """Take items off the front of *items* until it is empty, while other threads may take too."""
    while True:
        try:
            yield items.popleft()
        except IndexError:
            return

