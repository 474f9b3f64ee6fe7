"""Actor slots and the Ray flavour of the scheduler: how a job reaches an actor, and what comes back.

An :class:`ActorSlot` is one worker of the plan; a replacement actor keeps the slot and bumps its
``generation``, so that an answer of the actor it replaced is recognised and dropped. The scheduler is the
process pool's (:class:`flask_torchpool.batching.Scheduler`): it places calls, forms batches and completes
calls exactly as there. :class:`RayScheduler` changes only the transport: a call's tensors are not copied
into an arena by its caller (there is none); when a job is sent, its live members' tensors go to the actor
as the arguments of one ``run`` task, and Ray carries them (Note [Tensors on Ray]). The answer is split
back to the members here (:meth:`RayScheduler.answer`), with the process pool's rules for failed batches.

Note [Tensors on Ray]
~~~~~~~~~~~~~~~~~~~~~
Ray pickles a task's arguments: a torch tensor is serialised by torch's own reducer, which copies its
bytes (Ray reads torch tensors zero-copy only with ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS``, and then
read-only, which a model that writes its inputs in place cannot use). Arguments under Ray's inline
threshold (100 KiB) travel inside the task itself; larger ones go through the object store of the
caller's node (plasma shared memory) and are fetched by the actor's node. So an input is copied once on
the way in (pickling) plus once on the actor (unpickling), and a remote node adds one network transfer;
outputs likewise on the way back. A batch is sent as its members' tensors, unstacked: the actor
concatenates them (one copy, on the actor, instead of a staging copy in the web process).
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .. import shm
from ..batching import Call, CallState, Job, Scheduler, free_inputs, idle
from ..config import PoolConfig
from ..deadlines import DeadlineHeap
from ..errors import InferenceTimeoutError, WireError, from_wire
from ..outputs import bucket, split_rows
from ..placement import Placement
from ..status import WorkerState
from ..workers import BACKOFF_CAP, BACKOFF_FIRST

#: The rows budget of a slot's batches: Ray has no arena to run out of, so the scheduler's input
#: allocator (which reserves max_batch_size rows per tensor of a batch) never refuses.
_NO_ARENA_LIMIT = 1 << 62


@dataclass(eq=False)
class ActorSlot:
    """One worker: the Ray actor that runs it now, and what the slot keeps across replacements."""

    placement: Placement
    state: WorkerState = WorkerState.NOT_STARTED
    jobs: dict[int, Job[Any]] = field(default_factory=dict)   # opened, sent or running
    arena: shm.Arena | None = None                             # none: Ray carries the tensors
    inputs: shm.Allocator | None = field(default_factory=lambda: shm.Allocator(0, _NO_ARENA_LIMIT))
    releases: shm.ReleaseQueue = field(default_factory=shm.ReleaseQueue)
    calls: int = 0
    errors: int = 0
    handle: Any = None                 # the actor (None while it has none)
    generation: int = 0                # bumped when the actor is replaced
    sent: deque[int] = field(default_factory=deque)           # job ids sent to the actor, in order
    refs: dict[int, Any] = field(default_factory=dict)        # job id -> the ObjectRef of its answer
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    info: dict[str, Any] = field(default_factory=dict)        # what the actor reported when ready
    pid: int | None = None
    total_restarts: int = 0
    early_deaths: deque[float] = field(default_factory=deque)
    respawn_at: float | None = None
    ready_at: float | None = None
    last_exit: str | None = None
    killed_for: str | None = None

    @property
    def index(self) -> int:
        return self.placement.worker

    @property
    def channel(self) -> None:
        return None

    @property
    def streams(self) -> bool:
        return False  # the Ray backend runs no streams (RayPool.stream)

    def schedule_respawn(self, config: PoolConfig, served: bool, now: float) -> None:
        """Under the pool's lock: Note [Restart policy] (flask_torchpool.workers), for an actor. An actor
        that served is replaced at once; one that died loading (or just after) after a backoff, and after
        ``TORCHPOOL_MAX_RESTARTS`` such deaths within ``TORCHPOOL_RESTART_WINDOW``, when the window ends."""
        self.state = WorkerState.DEAD
        self.total_restarts += 1
        if served:
            self.early_deaths.clear()
            self.respawn_at = now
            return
        window = config.restart_window
        while self.early_deaths and now - self.early_deaths[0] > window:
            self.early_deaths.popleft()
        self.early_deaths.append(now)
        if len(self.early_deaths) > config.max_restarts:
            self.state = WorkerState.FAILED
            self.respawn_at = now + window
        else:
            self.respawn_at = now + min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (len(self.early_deaths) - 1))

    def actor_keys(self) -> dict[str, Any]:
        """The status keys only a Ray actor has (docs/operating.rst)."""
        info = self.info
        return {"actor_id": info.get("actor_id"), "node_id": info.get("node_id"),
                "node_ip": info.get("node_ip"), "resources": dict(info.get("resources") or {})}


class RayScheduler(Scheduler[ActorSlot]):
    """:class:`~flask_torchpool.batching.Scheduler` over actor slots: sends jobs with *sender*."""

    def __init__(self, slots: list[ActorSlot], events: queue.SimpleQueue[tuple[Any, ...]],
                 **kwargs: Any) -> None:
        super().__init__(slots, **kwargs)
        #: Where answers go, as ("answer" or "loaded", slot, generation, job, reply, exception), for the
        #: pool's supervisor thread.
        self.events = events

    def write(self, job: Job[ActorSlot], call: Call) -> None:
        """Nothing to copy: the call keeps its tensors until its job is sent. The last member of a sealed
        job sends it."""
        with self.lock:
            job.writers -= 1
            self.maybe_send(job)
        self.flush()

    def send(self, job: Job[ActorSlot]) -> None:
        """Send a claimed job to its slot's actor (any thread, outside the lock). The slot's send lock
        keeps the order of ``slot.sent`` that of the actor's queue (Note [Ray actors])."""
        slot = job.slot
        with slot.send_lock:
            with self.lock:
                parts = self.take_members(job)
                handle, generation = slot.handle, slot.generation
            if parts is None or handle is None:
                return
            if not parts:  # every member finished (deadline) before it could go
                self.answer(slot, job, ("ok", None, []))
                return
            first = job.members[0]
            try:
                ref = handle.run.remote(first.args, first.kwargs, parts, first.target[0], job.padded)
            except Exception as exc:  # cannot even submit: Ray is gone, or the actor handle is
                self.events.put(("answer", slot, generation, job, None, exc))
                return
            with self.lock:
                if slot.generation == generation and slot.jobs.get(job.id) is job:
                    slot.sent.append(job.id)
                    slot.refs[job.id] = ref
        ref.future().add_done_callback(functools.partial(self.on_future, "answer", slot, generation, job))

    def on_future(self, kind: str, slot: ActorSlot, generation: int, job: Job[ActorSlot] | None,
                  future: Future[Any]) -> None:
        """Runs in Ray's callback thread: hands the answer over, never works there."""
        try:
            self.events.put((kind, slot, generation, job, future.result(), None))
        except BaseException as exc:
            self.events.put((kind, slot, generation, job, None, exc))

    def take_members(self, job: Job[ActorSlot]) -> list[list[Any]] | None:
        """Under the lock: the job's members still waiting, with their rows; the job keeps only those,
        so that its answer is split among them. None when its slot dropped it (the actor died)."""
        if job.slot.jobs.get(job.id) is not job:
            return None
        members = [m for m in job.members if m.state is not CallState.DONE and m.tensors is not None]
        job.members, job.starts, job.rows = members, [], 0
        for member in members:
            job.starts.append(job.rows)
            job.rows += member.rows
        if job.key is not None and members:
            job.padded = bucket(job, self.batch_buckets) - job.rows
            self.metrics.record_batch(job.rows, len(members), job.padded)
        return [m.tensors for m in members]

    def answer(self, slot: ActorSlot, job: Job[ActorSlot], reply: tuple[Any, ...]) -> None:
        """*slot*'s actor answered *job* with *reply* (see :mod:`flask_torchpool.ray_backend.actor`): give
        each member its part, or the error (Note [A failed batch] in :mod:`flask_torchpool.batching`)."""
        with self.lock:
            if slot.jobs.pop(job.id, None) is None:
                return  # the actor was replaced meanwhile; its death dealt with the job
            self.returned(job)
            if job.id in slot.sent:
                slot.sent.remove(job.id)
            slot.refs.pop(job.id, None)
            free_inputs(slot, job)
            members = [m for m in job.members if m.state is not CallState.DONE]
        if members:
            failed = reply[0] != "ok"
            alone = failed and job.key is not None and len(members) > 1
            if not failed:
                results = split_rows(job, reply[1], reply[2])
            else:
                results = [(None, None if alone else from_wire(WireError(*reply[1]))) for _ in job.members]
            with self.lock:
                slot.calls += len(members)
                slot.errors += failed
                for member in sorted(members, key=lambda c: c.enqueued, reverse=True) if alone else ():
                    member.key, member.job, member.state = None, None, CallState.QUEUED
                    self.queue.appendleft(member)  # run alone by the next dispatch, no retry used
                for member, (value, exc) in zip(job.members, () if alone else results):
                    self.finish(member, value, exc)
            self.flush()
        if job.key is not None or idle(slot):
            self.seal_due(time.monotonic(), slot)


class Deadlines:
    """The calls' deadlines, earliest first (Note [Finished deadlines]). Under the pool's lock."""

    def __init__(self) -> None:
        self._heap: DeadlineHeap[Call] = DeadlineHeap(lambda _, call: call.state is CallState.DONE)

    def add(self, call: Call) -> None:
        assert call.deadline is not None
        self._heap.push(call.deadline, call.id, call)

    def next(self) -> float | None:
        return self._heap.next()

    def expire(self, now: float, sched: RayScheduler) -> tuple[list[tuple[ActorSlot, int]], list[Any]]:
        """Fail the calls whose deadline passed with InferenceTimeoutError. Returns the actors to kill
        (running a job nobody waits for, marked DEAD with the reason; with their generation) and the
        answers to cancel (jobs nobody waits for that have not started), Note [Ray actors]."""
        kill: list[tuple[ActorSlot, int]] = []
        cancel: list[Any] = []
        while (entry := self._heap.pop_due(now)) is not None:
            call = entry[2]
            queued, job = call.state is CallState.QUEUED, call.job
            sched.finish(call, exc=InferenceTimeoutError.past_deadline(now - call.enqueued, queued))
            if queued:
                sched.queue.remove(call)
                continue
            if job is None or job.alive() or not job.sent:
                continue
            job.expired = True
            slot = job.slot
            if slot.jobs.get(job.id) is not job:
                continue
            if slot.sent and slot.sent[0] == job.id:
                if slot.state is WorkerState.READY:
                    slot.state = WorkerState.DEAD
                    slot.killed_for = (f"the pool killed it: a call ran past its deadline "
                                       f"({now - call.enqueued:.3g}s) while the actor was running it")
                    kill.append((slot, slot.generation))
            elif job.id in slot.refs:
                cancel.append(slot.refs[job.id])
        return kill, cancel
