"""Rolling reload: a new version of a model takes over a running pool, one worker at a time.

Note [Rolling reload]
~~~~~~~~~~~~~~~~~~~~~
Every worker slot runs one *generation* of the model (1 at start, +1 per successful reload).
:meth:`Pool.reload <flask_torchpool.pool.Pool.reload>` hands a :class:`Reload` to the pool's manager
thread, which steps it after every wake-up (:meth:`Reload.step`) and tells it of every death
(:meth:`Reload.on_death`). For each old worker (a *swap*), in order::

    surge >= 1:  start new (incoming) -> Ready -> warm-up call -> in rotation -> old RETIRING -> idle -> Stop
    surge == 0:  old RETIRING -> idle -> Stop -> start new (incoming) -> Ready -> warm-up -> in rotation

A new worker is *incoming* until it is put in rotation: it said Ready but takes no call but the warm-up
(``TORCHPOOL_EXAMPLE_INPUT``, sent to that worker alone). A RETIRING worker takes no new call (its open
batches are sealed; the scheduler only places calls on READY workers) and gets ``Stop`` once its jobs
are done, so a call that started on the old version ends on it, and a batch, bound to one worker, never
mixes versions. At most ``TORCHPOOL_RELOAD_SURGE`` swaps run at once (each holds one extra process);
with 0, one at a time, and the slot is emptied first. An old worker that dies during the reload is not
respawned: its swap starts at once (its memory is free) and a new worker takes its place.

The new generation forks from a fork server of its own, started for it, which re-imports ``__main__``
(and what it imports) from disk; the worker imports the factory's module or reads the file after the
fork. Its shared CPU weights are a new segment (the pool keeps one per generation). When every swap is
done, the old generation's fork server stops and its weights segment is closed (freed with the last
mapping, which left with the last old worker): :meth:`Reload.step` returns True and the version changes.

A new worker that fails (its model does not load, it dies, its warm-up call fails or does not finish
within ``TORCHPOOL_START_TIMEOUT``) aborts the reload: every new worker not yet in rotation is killed,
every RETIRING old worker goes back in rotation, and the workers of the new version already in rotation
are replaced by the old version again with the same machinery (a *rollback*: no warm-up, failures left
to the restart policy); then the caller gets a :class:`ReloadError` naming the model, the version and
the cause. A second reload while one runs is refused (:class:`ReloadError`), not queued: the caller
decides whether to retry. Shutdown during a reload stops both generations like any worker.
"""

from __future__ import annotations

import enum
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from . import codec, messages
from .batching import Call, Job, Scheduler, idle
from .config import ModelConfig, example_args
from .errors import ReloadError
from .sizing import BatchCosts
from .status import ModelVersion, WorkerState
from .workers import WorkerSet, WorkerSlot

log = logging.getLogger(__name__)


class _Phase(enum.Enum):
    WAITING = "waiting"     # not started; the old worker serves
    DRAINING = "draining"   # surge 0: the old worker finishes its calls, then stops
    STARTING = "starting"   # the new worker loads
    WARMING = "warming"     # the new worker runs the warm-up call
    RETIRING = "retiring"   # the new worker serves; the old one finishes its calls, then stops
    DONE = "done"


@dataclass(eq=False)
class _Swap:
    """One worker's replacement: *old* (None once it is gone) by *new*."""

    old: WorkerSlot | None
    placement: Any
    phase: _Phase = _Phase.WAITING
    new: WorkerSlot | None = None
    stop_sent: bool = False
    warmup: Future[Any] | None = None
    warmup_call: Call | None = None
    deadline: float = float("inf")
    after: WorkerSlot | None = field(default=None, repr=False)   # where the new slot goes in the list


class Reload:
    """One reload (or rollback) of one pool's workers to *config*'s model as *generation*. Used by the
    pool's manager thread only, but for :attr:`future`."""

    def __init__(self, *, name: str, config: ModelConfig, version: ModelVersion, workers: WorkerSet,
                 sched: Scheduler[WorkerSlot], old_config: ModelConfig, old_version: ModelVersion,
                 future: Future[ModelVersion] | None = None, rollback_of: ReloadError | None = None,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.name = name
        self.config = config
        self.version = version
        self.old_config = old_config
        self.old_version = old_version
        self.future: Future[ModelVersion] = future if future is not None else Future()
        #: Set on a rollback: why the reload it undoes failed.
        self.rollback_of = rollback_of
        self._workers = workers
        self._sched = sched
        self._wake = wake   # wakes the manager thread (the new fork server is ready)
        self._surge = config.reload_surge
        self._swaps: list[_Swap] = []
        self._doomed: set[WorkerSlot] = set()   # slots to forget, not respawn, when they die
        self._error: str | None = None
        self._aborted: ReloadError | None = None
        self._killed: list[WorkerSlot] = []   # new workers an abort stopped: done once they are gone
        self._started = False
        self.began = time.monotonic()
        #: The new version once it serves, or the :class:`ReloadError`; None while it runs.
        self.outcome: ModelVersion | ReloadError | None = None

    @property
    def generation(self) -> int:
        return self.version["generation"]

    # --- the manager thread's hooks ---------------------------------------------------------------------

    def step(self, closing: bool) -> tuple[bool, Reload | None]:
        """Advance every swap. Returns (finished, the rollback to run next, if any)."""
        if closing:
            self._finish(ReloadError(f"{self._label()}: the pool shut down during the reload",
                                     self.config.name, self.generation, "shutdown"))
            return True, None
        if self._aborted is not None:   # waiting for the new workers it killed to be gone
            if self._gone():
                self._finish(self._aborted)
                return True, None
            return False, None
        if not self._started:
            self._begin()
        now = time.monotonic()
        while True:   # until nothing moves: a step may enable the next (promote, then stop the old one)
            before = [(s.phase, s.old, s.stop_sent) for s in self._swaps]
            for swap in self._swaps:
                if self._error is None:
                    self._advance(swap, now)
            if self._error is None:
                self._start_more()
            if self._error is not None or before == [(s.phase, s.old, s.stop_sent) for s in self._swaps]:
                break
        if self._error is not None:
            rollback = self._abort()
            if rollback is not None:
                return True, rollback
            return self.step(closing)
        if all(s.phase is _Phase.DONE for s in self._swaps) and self._gone():
            self._finish(None)
            return True, None
        return False, None

    def next_timer(self) -> float | None:
        """When a warm-up call times out."""
        return min((s.deadline for s in self._swaps if s.phase is _Phase.WARMING), default=None)

    def on_death(self, slot: WorkerSlot) -> bool:
        """Under the lock, before the dead worker's calls are requeued: whether *slot* is this reload's
        to forget (True) rather than to respawn."""
        for swap in self._swaps:
            if slot is swap.old:
                swap.old = None
                return True
            if slot is swap.new and swap.phase in (_Phase.STARTING, _Phase.WARMING) \
                    and not self._rolling_back():
                cause = slot.load_error or f"the new worker {slot.index} died: {slot.last_exit}"
                self._fail(cause)
                self._doomed.add(slot)
        if slot in self._doomed:
            self._doomed.discard(slot)
            return True
        return False

    # --- the swaps --------------------------------------------------------------------------------------

    def _begin(self) -> None:
        self._started = True
        old = [s for s in self._workers.slots if s.generation != self.generation]
        self._swaps = [_Swap(s, s.placement, after=s) for s in old]
        with self._sched.lock:
            for swap in self._swaps:
                slot = swap.old
                if slot is not None and slot.process is None:
                    # Dead and waiting for its respawn, or failed (a crash loop): the new version takes
                    # its place at once.
                    slot.respawn_at = None
                    slot.state = WorkerState.STOPPED
                    self._workers.remove_slot(slot)
                    swap.old = None
        if self.rollback_of is None:
            log.info("%s: reloading %s: %d worker(s), at most %d extra at a time", self.name, self._label(),
                     len(old), self._surge)

    def _start_more(self) -> None:
        if not self._workers.prepare(self.generation, self._wake):
            return   # the new version's fork server is still importing torch: the old workers serve
        # Each swap whose old worker still runs holds one extra process; with surge 0, one swap at a time.
        active = sum(1 for s in self._swaps if s.phase not in (_Phase.WAITING, _Phase.DONE)
                     and (s.old is not None or self._surge == 0))
        for swap in self._swaps:
            if swap.phase is not _Phase.WAITING:
                continue
            old = swap.old
            if old is None and self._surge > 0:   # its old worker died: no memory held
                self._spawn_new(swap)
            elif active < max(self._surge, 1):
                active += 1
                if old is not None and self._surge == 0:
                    self._retire(old)
                    swap.phase = _Phase.DRAINING
                else:
                    self._spawn_new(swap)

    def _advance(self, swap: _Swap, now: float) -> None:
        if swap.phase is _Phase.DRAINING:
            if swap.old is None:
                self._spawn_new(swap)
            else:
                self._stop_when_idle(swap)
        elif swap.phase is _Phase.STARTING:
            new = swap.new
            assert new is not None
            if self._rolling_back() and new.state is WorkerState.FAILED:
                self._give_up(swap)
            elif new.ready_at is not None and new.process is not None:
                if new.incoming and self.config.example_input is not None:
                    self._warm_up(swap, now)
                else:
                    self._promote(swap)
        elif swap.phase is _Phase.WARMING:
            assert swap.warmup is not None
            if swap.warmup.done():
                exc = swap.warmup.exception()
                if exc is not None:
                    self._fail(f"the warm-up call ({self.config.key('example_input')}) failed on worker "
                               f"{swap.placement.worker}: {type(exc).__name__}: {exc}")
                else:
                    self._promote(swap)
            elif now >= swap.deadline:
                self._fail(f"the warm-up call ({self.config.key('example_input')}) did not finish within "
                           f"{self.config.key('start_timeout')}={self.config.start_timeout:g}s")
        elif swap.phase is _Phase.RETIRING:
            if swap.old is None:
                swap.phase = _Phase.DONE
            else:
                self._stop_when_idle(swap)

    def _spawn_new(self, swap: _Swap) -> None:
        incoming = not self._rolling_back()
        slot = self._workers.add_slot(swap.placement, self.config.spec, self.generation, incoming,
                                      after=swap.after)
        swap.new = slot
        swap.phase = _Phase.STARTING
        try:
            self._workers.spawn(slot)
        except Exception as exc:
            with self._workers.lock:
                self._workers.remove_slot(slot)
            swap.new = None
            if incoming:
                self._fail(f"cannot start a worker: {type(exc).__name__}: {exc}")
            else:
                log.exception("%s: cannot start worker %d of the old version", self.name, slot.index)
                swap.phase = _Phase.DONE

    def _warm_up(self, swap: _Swap, now: float) -> None:
        """Send ``TORCHPOOL_EXAMPLE_INPUT`` to the new worker alone (it takes no other call yet)."""
        new = swap.new
        assert new is not None
        try:
            args = example_args(self.config)
            skel_args, skel_kwargs, tensors, _ = codec.flatten_call(args, {}, self.config.max_input_bytes)
        except Exception as exc:
            self._fail(f"cannot build the warm-up call from {self.config.key('example_input')}: "
                       f"{type(exc).__name__}: {exc}")
            return
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        call = Call(skel_args, skel_kwargs, tensors, future, None, retries=0)
        with self._sched.lock:
            job: Job[WorkerSlot] = Job(new, sealed=True)
            new.jobs[job.id] = job
            self._sched.join(job, call)
        swap.warmup, swap.warmup_call = future, call
        swap.deadline = now + self.config.start_timeout
        swap.phase = _Phase.WARMING
        self._sched.write(job, call)

    def _promote(self, swap: _Swap) -> None:
        new = swap.new
        assert new is not None
        with self._sched.lock:
            new.incoming = False
            if new.state is WorkerState.STARTING:
                new.state = WorkerState.READY
        if swap.old is not None:
            self._retire(swap.old)
            swap.phase = _Phase.RETIRING
        else:
            swap.phase = _Phase.DONE
        log.info("%s: worker %d (pid %s) of %s is serving", self.name, new.index, new.pid, self._label())
        self._sched.dispatch()   # calls queued while no worker was ready

    def _retire(self, slot: WorkerSlot) -> None:
        """Take *slot* out of rotation: no new call, its open batches sealed (and sent)."""
        sched = self._sched
        with sched.lock:
            if slot.state is WorkerState.READY or slot.state is WorkerState.STARTING:
                slot.state = WorkerState.RETIRING
            for job in list(slot.jobs.values()):
                if not job.sealed:
                    sched.seal(job)
                    sched.maybe_send(job)
        sched.flush()

    def _stop_when_idle(self, swap: _Swap) -> None:
        old = swap.old
        assert old is not None
        with self._sched.lock:
            ready = not swap.stop_sent and idle(old)
        if ready:
            swap.stop_sent = True
            self._doomed.add(old)
            if old.process is None:   # no process (dead, waiting for a respawn): nothing to stop
                with self._sched.lock:
                    old.respawn_at = None
                    old.state = WorkerState.STOPPED
                    self._workers.remove_slot(old)
                self._doomed.discard(old)
                swap.old = None
                return
            if old.channel is None:
                return   # dying already
            old.stop_sent = True
            try:
                old.channel.send(messages.Stop())
            except OSError:
                pass   # it died; its sentinel says so

    def _give_up(self, swap: _Swap) -> None:
        """Rollback: the old version no longer loads on this slot; the restart policy keeps trying it."""
        log.error("%s: %s: worker %d of the old version does not load again (see its log); the restart "
                  "policy keeps retrying it", self.name, self._label(), swap.placement.worker)
        swap.phase = _Phase.DONE

    # --- ending -----------------------------------------------------------------------------------------

    def _gone(self) -> bool:
        return not any(s in self._workers.slots for s in self._killed)

    def _rolling_back(self) -> bool:
        return self.rollback_of is not None

    def _fail(self, cause: str) -> None:
        if self._error is None:
            self._error = cause
            log.error("%s: reload of %s failed: %s", self.name, self._label(), cause)

    def _abort(self) -> Reload | None:
        """Stop the new workers not in rotation, put RETIRING old ones back; returns the rollback of those
        already in rotation (None when there are none)."""
        assert self._error is not None
        back: list[_Swap] = []
        sched = self._sched
        with sched.lock:
            for swap in self._swaps:
                new, old = swap.new, swap.old
                if swap.warmup_call is not None:
                    sched.finish(swap.warmup_call, exc=ReloadError("the reload was aborted"))
                if new is not None and swap.phase in (_Phase.STARTING, _Phase.WARMING):
                    self._doomed.add(new)
                    self._killed.append(new)
                    new.killed_for = "the pool stopped it: the reload was aborted"
                    new.state = WorkerState.RETIRING
                    if new.process is None:
                        self._workers.remove_slot(new)
                    else:
                        self._workers.kill(new)
                if old is not None and swap.phase is not _Phase.WAITING:
                    if old in self._doomed and swap.stop_sent:
                        back.append(_Swap(None, swap.placement, after=old))   # stopping: refill it
                    elif old.state is WorkerState.RETIRING:
                        old.state = WorkerState.READY
                if swap.phase is _Phase.RETIRING and new is not None:
                    back.append(_Swap(new, new.placement, phase=_Phase.RETIRING))
                    new.state = WorkerState.RETIRING
                elif swap.phase is _Phase.DONE and new is not None:
                    back.append(_Swap(new, new.placement, after=new))
                elif old is None and swap.phase in (_Phase.WAITING, _Phase.DRAINING, _Phase.STARTING,
                                                    _Phase.WARMING):
                    back.append(_Swap(None, swap.placement, after=swap.after))
        sched.flush()
        error = ReloadError(
            f"{self._label()} did not take over: {self._error}. The old version "
            f"(generation {self.old_version['generation']}) keeps serving", self.config.name, self.generation,
            self._error)
        if self._rolling_back() or not back:
            self._aborted = self.rollback_of or error
            return None
        log.warning("%s: rolling %d worker(s) back to generation %d", self.name, len(back),
                    self.old_version["generation"])
        rollback = Reload(name=self.name, config=self.old_config, version=self.old_version,
                          workers=self._workers, sched=self._sched, old_config=self.config,
                          old_version=self.version, future=self.future, rollback_of=error,
                          wake=self._wake)
        rollback.began = self.began
        rollback._started = True
        rollback._swaps = back
        rollback._doomed = self._doomed
        rollback._killed = self._killed
        rollback._surge = self.config.reload_surge
        return rollback

    def _finish(self, error: ReloadError | None) -> None:
        """Record the outcome; the pool resolves :attr:`future` once it has adopted it."""
        if self.outcome is not None:
            return
        if error is None and self.rollback_of is not None:
            error = self.rollback_of
        if error is None:
            log.info("%s: %s serves every call (%.3gs)", self.name, self._label(),
                     time.monotonic() - self.began)
            if self._sched.costs is not None:  # the new model's batches take their own times
                self._sched.costs = BatchCosts()  # (Note [Batch splitting])
        self.outcome = error if error is not None else self.version

    def resolve(self) -> None:
        """Resolve :attr:`future` with the outcome (after the pool adopted it)."""
        if isinstance(self.outcome, BaseException):
            self.future.set_exception(self.outcome)
        else:
            self.future.set_result(self.version)

    def _label(self) -> str:
        label = self.version["version"]
        return (f"model {self.config.name!r} version {self.generation}"
                + (f" ({label})" if label else "") + f" [{self.version['model']}]")

