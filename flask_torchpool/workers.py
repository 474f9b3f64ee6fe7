"""Worker processes: the slots, spawning, reaping, exit causes, the restart budget, stopping.

A :class:`WorkerSlot` is one entry of the pool's plan (a :class:`~flask_torchpool.placement.Placement`);
a respawn replaces its process, channel, arena and output pipes and keeps the slot. :class:`WorkerSet`
starts a slot's process (:func:`flask_torchpool.worker.worker_main`): forked in milliseconds by the pool's
fork server (Note [Fork server] in :mod:`flask_torchpool.forkserver`), or spawned (GPU workers,
``TORCHPOOL_START_METHOD="spawn"``, a fork server that cannot start). It reaps it and names its exit
cause, schedules respawns (Note [Restart policy]), and stops every process (and the fork server) in a
fixed order. All of it runs in the pool's manager thread: ``PR_SET_PDEATHSIG`` fires
when the *thread* that forked exits, so workers must be children of a thread that lives as long as the
pool. The manager's selector waits on what :meth:`WorkerSet.registrations` lists, as small typed
objects: each worker's channel, its process sentinel and its stdout and stderr pipes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import selectors
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import reduction
from typing import Any, Callable, Union

from . import batching, lanes, messages, shm, spawning
from .batching import Job
from .channel import Channel
from .config import PoolConfig
from .exits import likely_cause, signal_name
from .forkserver import ForkServer, ForkServerError, PassedFd, run_worker
from .logs import WorkerOutput
from .placement import Placement, worker_nice
from .status import WorkerState

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")


# Note [Restart policy]
# ~~~~~~~~~~~~~~~~~~~~~
# A worker that loaded its model and then served (answered a call, or stayed ready SETTLED seconds) is
# respawned at once when it dies, however often that happens: the OOM killer under memory pressure, a
# deadline kill of a stuck call or an operator's kill -9 says nothing about the next worker, and giving up
# would turn a slow pool into a dead one. Only *early* deaths count against the restart budget: dying
# while loading (or not loading within TORCHPOOL_START_TIMEOUT) or right after, before serving. They are
# respawned after an exponential backoff (BACKOFF_FIRST doubling, at most BACKOFF_CAP). When the death
# past TORCHPOOL_MAX_RESTARTS early deaths within TORCHPOOL_RESTART_WINDOW is a failure to load, the slot
# is FAILED (a crash loop: callers get a 503 at once when every slot is) and tried again when the window
# is over. So no slot is given up for good, a worker that loads is never FAILED, and a factory that
# always fails costs one start per window, not a busy loop.
# Calls wait in the queue, within their own deadline, while no worker is ready.

#: Seconds a worker must stay ready (without answering a call) for its death to count as a late one.
SETTLED = 10.0
#: Backoff of early deaths: the first respawn waits BACKOFF_FIRST seconds, doubling up to BACKOFF_CAP.
BACKOFF_FIRST = 0.1
BACKOFF_CAP = 30.0


@dataclass(eq=False)
class WorkerSlot:
    """One worker slot. A respawn replaces the process, channel and arena, and keeps the slot."""

    placement: Placement
    state: WorkerState = WorkerState.STOPPED
    process: Any = None
    channel: Channel | None = None
    output: list[WorkerOutput] = field(default_factory=list)   # its stdout and stderr pipes
    arena: shm.Arena | None = None
    inputs: shm.Allocator | None = None
    releases: shm.ReleaseQueue = field(default_factory=shm.ReleaseQueue)
    jobs: dict[int, Job[Any]] = field(default_factory=dict)   # opened, sent or running
    pid: int | None = None
    restarts: deque[float] = field(default_factory=deque[float])   # monotonic times of recent restarts
    total_restarts: int = 0
    calls: int = 0
    errors: int = 0
    killed_for: str | None = None   # why the pool killed it, for the crash message
    stop_sent: bool = False         # the pool told it to stop (shutdown, a reload retiring it)
    last_reply: float = 0.0         # monotonic time of its last message
    last_exit: str | None = None
    respawn_at: float | None = None
    spawned_at: float = 0.0         # monotonic time of its current process's start
    ready_at: float | None = None   # when that process said Ready (None: still loading)
    calls_at_spawn: int = 0         # :attr:`calls` when it was spawned: it served if they grew
    # Note [Rolling reload] in flask_torchpool.reload: what it loads, which version that is, and whether
    # it is a reload's new worker that takes no call until the reload puts it in rotation.
    spec: Any = None
    generation: int = 1
    incoming: bool = False
    load_error: str | None = None   # why its model failed to load (StartupFailed), for a reload's error

    @property
    def index(self) -> int:
        return self.placement.worker

    @property
    def streams(self) -> bool:
        """Whether it was sent a stream not ended yet: it takes no other job meanwhile (Note [Streams]
        in :mod:`flask_torchpool.streaming`)."""
        return any(job.members and job.members[0].target[1] for job in self.jobs.values())

    @property
    def load(self) -> int:
        return batching.load(self)

    @property
    def lane_calls(self) -> int:
        """Calls from attached web processes' lanes it holds (Note [Lanes]), as it last wrote them."""
        arena = self.arena
        return int(arena.control[lanes.CTRL_LOAD]) if arena is not None else 0

    @property
    def lanes_open(self) -> int:
        """Lanes its process has open (Note [Lanes]), as it last wrote them."""
        arena = self.arena
        return int(arena.control[lanes.CTRL_LANES]) if arena is not None else 0

    def counts(self) -> tuple[int, int]:
        """Calls it answered and how many failed, lane calls (Note [Lanes]) included."""
        arena = self.arena
        if arena is None:
            return self.calls, self.errors
        control = arena.control
        return (self.calls + int(control[lanes.CTRL_LANE_CALLS]),
                self.errors + int(control[lanes.CTRL_LANE_ERRORS]))

    def stalled(self, job: Job[Any]) -> str | None:
        """*job* was sent to this worker and every caller of it gave up (deadline): why the worker is not
        worth waiting for ("running" it, or "frozen"), or None when cancelling the job is enough."""
        if self.arena is None:  # no process: nothing to wait for or to kill
            return None
        running = self.arena.running
        other = self.jobs.get(running)
        # The control word may still show a job whose result was just read (the worker clears it after
        # replying): only this job, or another expired one, proves the worker stuck.
        if running and (running == job.id or (other is not None and other.expired)):
            return "running"
        # A job that never started on a worker that has not said a word since it was sent, for the
        # whole deadline, while running nothing: the worker is frozen (SIGSTOP, a hang outside a call),
        # not busy.
        if not running and self.last_reply < job.sent_at and not (
                self.channel is not None and self.channel.poll(0)):
            return "frozen"
        return None


# --- what the manager's selector waits on ------------------------------------------------------------------


# Each names the slot and the object whose descriptor is registered (the *source*): a registration is
# replaced when its fd now belongs to another object (a respawned worker's channel, say).


@dataclass(frozen=True, eq=False)
class ChannelReady:
    """A message (or the end) waits on a worker's channel."""

    slot: WorkerSlot
    source: Channel


@dataclass(frozen=True, eq=False)
class ProcessEnded:
    """A worker process's sentinel: ready once the process has ended."""

    slot: WorkerSlot
    source: Any   # the multiprocessing Process


@dataclass(frozen=True, eq=False)
class OutputReady:
    """A worker wrote to its stdout or stderr (forwarded to the app's logger)."""

    slot: WorkerSlot
    source: WorkerOutput


Registration = Union[ChannelReady, ProcessEnded, OutputReady]


class WorkerSet:
    """The worker processes of one pool. Used by its manager thread; *lock* is the pool's lock, which
    guards the slots' states and what the other threads read of them."""

    def __init__(self, placements: list[Placement], config: PoolConfig, name: str, logger_name: str,
                 lock: threading.Lock) -> None:
        self.slots = [WorkerSlot(p, spec=config.spec) for p in placements]
        self.config = config
        self.name = name
        self.logger_name = logger_name
        self.lock = lock
        #: A channel, process or pipe changed: the manager must re-register them (:meth:`sync`).
        self.changed = True
        # One per model generation: a reload's workers fork from a server that has not imported the
        # old version's code (it re-imports ``__main__``); see Note [Rolling reload].
        self._fork_servers: dict[int, ForkServer] = {}
        self._fork_server_failed = config.start_method != "forkserver"

    # --- the selector ---------------------------------------------------------------------------------------

    def registrations(self) -> dict[int, Registration]:
        wanted: dict[int, Registration] = {}
        for slot in self.slots:
            if slot.channel is not None:
                wanted[slot.channel.fileno()] = ChannelReady(slot, slot.channel)
            if slot.process is not None:
                wanted[slot.process.sentinel] = ProcessEnded(slot, slot.process)
            for out in slot.output:
                if out.fd is not None and not out.eof:
                    wanted[out.fd] = OutputReady(slot, out)
        return wanted

    def sync(self, selector: selectors.BaseSelector, registered: dict[int, Registration]) -> None:
        """Make *selector* (and *registered*, what it holds) wait on :meth:`registrations`."""
        self.changed = False
        wanted = self.registrations()
        for fd, reg in list(registered.items()):
            new = wanted.get(fd)
            if new is None or new.source is not reg.source:
                try:
                    selector.unregister(fd)
                except (KeyError, ValueError):
                    pass
                del registered[fd]
        for fd, reg in wanted.items():
            if fd not in registered:
                selector.register(fd, selectors.EVENT_READ, reg)
                registered[fd] = reg

    # --- spawning and reaping -------------------------------------------------------------------------------

    def spawn(self, slot: WorkerSlot) -> None:
        """Start *slot*'s process with a fresh arena and output pipes; it is STARTING until it says Ready.
        If starting fails, every descriptor and mapping made for it is closed again, and it raises."""
        size = self.config.arena_bytes
        fd = shm.create_memfd(size, f"torchpool-w{slot.index}")
        pipes: list[tuple[int, int]] = []
        ends: list[Any] = []
        arena: shm.Arena | None = None
        try:
            arena = shm.Arena(fd, size)
            for _ in ("stdout", "stderr"):
                pipes.append(os.pipe())
            parent_end, child_end = _SPAWN.Pipe(duplex=True)
            ends = [parent_end, child_end]
            name = f"{self.name}-worker-{slot.index}"
            process = self._start(slot, name, fd, size, [w for _, w in pipes], child_end)
        except BaseException:
            for r, _ in pipes:
                os.close(r)
            for end in ends:
                end.close()
            del arena  # its mapping goes with the last reference (no close(): torch views may share it)
            raise
        finally:
            os.close(fd)
            for _, w in pipes:
                os.close(w)  # the worker's copies are the only writers left: its death ends the streams
        child_end.close()
        assert process.pid is not None
        output = [WorkerOutput(r, stream, self.logger_name, slot.index, process.pid, name)
                  for (r, _), stream in zip(pipes, ("stdout", "stderr"))]
        with self.lock:
            slot.process = process
            slot.pid = process.pid
            slot.channel = Channel(parent_end, messages.WORKER_PROTOCOL)
            slot.output = output
            slot.arena = arena
            slot.inputs = shm.Allocator(*arena.inputs)
            slot.releases = shm.ReleaseQueue()
            slot.state = WorkerState.STARTING
            slot.killed_for = None
            slot.stop_sent = False
            slot.respawn_at = None
            slot.spawned_at = time.monotonic()
            slot.ready_at = None
            slot.calls_at_spawn = slot.calls
            self.changed = True
        log.debug("%s: spawned worker %d (pid %d): %s", self.name, slot.index, process.pid,
                  slot.placement.describe())

    def _start(self, slot: WorkerSlot, name: str, arena_fd: int, size: int, out_fds: list[int],
               child_end: Any) -> Any:
        """Start *slot*'s worker process: forked by the fork server when there is one, else spawned."""
        server = self._fork_server_for(slot)
        if server is not None:
            try:
                return server.start_process(
                    run_worker, self._args(slot, PassedFd(3, connection=True), PassedFd(0), size,
                                            (PassedFd(1), PassedFd(2))),
                    [arena_fd, *out_fds, child_end.fileno()], name)
            except ForkServerError as exc:
                # Gone (OOM-killed, say): spawn this one; the next start tries a fresh fork server.
                log.warning("%s: %s; spawning worker %d instead", self.name, exc, slot.index)
                self._stop_fork_server(slot.generation)
        process = spawning.Process(
            target=run_worker, name=name, daemon=True,
            args=self._args(slot, child_end, _InheritedFd(arena_fd), size,
                            tuple(_InheritedFd(w) for w in out_fds)))
        process.start()
        return process

    def _args(self, slot: WorkerSlot, conn: Any, arena_fd: Any, size: int,
              out_fds: Any) -> tuple[Any, ...]:
        """``worker_main``'s arguments."""
        return (slot.placement, slot.spec, conn, arena_fd, size, os.getpid(),
                self.config.share_weights, out_fds, self.config.worker_log_level, self.name,
                worker_nice(self.config))

    def _fork_server_for(self, slot: WorkerSlot) -> ForkServer | None:
        """The pool's fork server, started on first use; None when workers are spawned: by
        configuration, on a GPU (see docs/design.rst, Workers), or because it cannot start here."""
        if self._fork_server_failed or slot.placement.device != "cpu":
            return None
        server = self._fork_servers.get(slot.generation)
        if server is not None and server.settled.is_set() and not server.ready:   # prepare()'s failed
            log.warning("%s: the new version's fork server cannot fork workers; spawning them instead",
                        self.name)
            self._stop_fork_server(slot.generation)
            self._fork_server_failed = True
            return None
        if slot.generation not in self._fork_servers:
            with self.lock:
                # Importing torch in the fork server is part of starting these workers.
                for other in self.slots:
                    if other is slot or (other.process is None and other.state is WorkerState.STOPPED):
                        other.state = WorkerState.STARTING
                        other.spawned_at = time.monotonic()
            server = ForkServer(self.name, self.config.start_timeout)
            try:
                server.start()
            except ForkServerError as exc:
                log.warning("%s: %s; spawning workers instead (TORCHPOOL_START_METHOD='spawn' says so "
                            "without trying)", self.name, exc)
                self._fork_server_failed = True
                return None
            self._fork_servers[slot.generation] = server
        return self._fork_servers[slot.generation]

    def _stop_fork_server(self, generation: int | None = None) -> None:
        """Stop the fork server of *generation* (None: every one)."""
        for gen in [generation] if generation is not None else list(self._fork_servers):
            server = self._fork_servers.pop(gen, None)
            if server is not None:
                server.stop()

    def prepare(self, generation: int, wake: Callable[[], None]) -> bool:
        """A reload's new *generation*: launch its fork server (in this, the manager thread) and wait
        for it in another thread, which calls *wake* when it is ready; True once workers of the
        generation can be started without the manager waiting for their fork server."""
        if self._fork_server_failed or not any(s.placement.device == "cpu" for s in self.slots):
            return True
        server = self._fork_servers.get(generation)
        if server is None:
            server = ForkServer(self.name, self.config.start_timeout)
            try:
                server.launch()
            except ForkServerError as exc:
                log.warning("%s: %s; spawning the new version's workers instead", self.name, exc)
                self._fork_server_failed = True
                return True
            self._fork_servers[generation] = server

            def wait() -> None:
                with contextlib.suppress(ForkServerError):
                    server.wait_ready()
                wake()

            threading.Thread(target=wait, name=f"{self.name}-forkserver-{generation}", daemon=True).start()
        return server.settled.is_set()

    def stop_unused_fork_servers(self) -> None:
        """Stop the fork servers of the generations no slot runs any more (after a reload)."""
        for gen in set(self._fork_servers) - {s.generation for s in self.slots}:
            self._stop_fork_server(gen)

    def add_slot(self, placement: Placement, spec: Any, generation: int, incoming: bool,
                 after: WorkerSlot | None) -> WorkerSlot:
        """A new slot (for a reload), placed after *after* in :attr:`slots`; the caller spawns it."""
        slot = WorkerSlot(placement, spec=spec, generation=generation, incoming=incoming)
        with self.lock:
            at = self.slots.index(after) + 1 if after is not None and after in self.slots else len(self.slots)
            self.slots.insert(at, slot)
            self.changed = True
        return slot

    def remove_slot(self, slot: WorkerSlot) -> None:
        """Under the lock: forget a stopped slot (a reload replaced it)."""
        if slot in self.slots:
            self.slots.remove(slot)
        self.changed = True

    def _retire_idle_fork_server(self) -> None:
        """Under the lock: with every slot failed (a crash loop, waiting out its window), let the fork
        server go, not to hold its memory, and no process, meanwhile; the next respawn starts another.
        It exits as soon as it reads the end of its socket (milliseconds, in a rare path)."""
        if self._fork_servers and all(s.state is WorkerState.FAILED for s in self.slots):
            self._stop_fork_server()

    def reap(self, slot: WorkerSlot) -> tuple[int | None, str | None]:
        """*slot*'s process ended: reap it, forward its last output, and set :attr:`~WorkerSlot.last_exit`
        (exit code, signal, likely cause). Returns (exit code, signal name)."""
        process = slot.process
        # The sentinel closes while the process exits, a moment before it can be reaped.
        process.join(5.0)
        # What it wrote last (the line before os._exit, a traceback, a native crash's stack) is logged
        # before its death is, and before the callers hear of it.
        self.close_output(slot)
        exitcode = process.exitcode
        cause = slot.killed_for or ("it stopped when the pool told it to" if exitcode == 0 and slot.stop_sent
                                    else likely_cause(exitcode))
        signame = signal_name(exitcode)
        slot.last_exit = f"exit code {exitcode}" + (f" ({signame})" if signame else "") + f": {cause}"
        return exitcode, signame

    def clear(self, slot: WorkerSlot) -> None:
        """Under the lock: *slot* has no process any more (its arena stays mapped by the outputs that
        callers still hold)."""
        slot.calls, slot.errors = slot.counts()  # its lane calls too: the arena goes
        slot.process = None
        slot.channel = None
        slot.arena = None
        slot.inputs = None
        self.changed = True

    def close_output(self, slot: WorkerSlot) -> None:
        """Forward what is left in a gone worker's pipes and close them."""
        output, slot.output = slot.output, []
        for out in output:
            try:
                out.close()
            except Exception:  # a failing log handler must not keep the pool from handling a death
                log.exception("%s: cannot forward the output of worker %d", self.name, slot.index)
        if output:
            self.changed = True

    def kill(self, slot: WorkerSlot) -> None:
        log.warning("%s: killing worker %d (pid %s): %s", self.name, slot.index, slot.pid, slot.killed_for)
        _kill(slot.process)

    # --- the restart budget ---------------------------------------------------------------------------------

    def schedule_respawn(self, slot: WorkerSlot) -> None:
        """Under the lock: *slot* died. See Note [Restart policy]."""
        now = time.monotonic()
        slot.total_restarts += 1
        served = slot.counts()[0] > slot.calls_at_spawn
        if slot.ready_at is not None and (served or now - slot.ready_at >= SETTLED):
            # It loaded and served: whatever killed it (the OOM killer, a deadline kill, kill -9) is no
            # reason to wait, nor to hold its slot's earlier failures against it.
            slot.restarts.clear()
            slot.state = WorkerState.DEAD
            slot.respawn_at = now
            return
        while slot.restarts and slot.restarts[0] < now - self.config.restart_window:
            slot.restarts.popleft()
        slot.restarts.append(now)
        n = len(slot.restarts)
        if n > self.config.max_restarts and slot.ready_at is None:  # it could not even load: a crash loop
            slot.state = WorkerState.FAILED
            slot.restarts.clear()
            slot.respawn_at = now + self.config.restart_window
        else:
            slot.state = WorkerState.DEAD
            slot.respawn_at = now + min(BACKOFF_FIRST * 2 ** (n - 1), BACKOFF_CAP)
        self._retire_idle_fork_server()

    def start_deadlines(self) -> list[float]:
        """Under the lock: when each (re)starting worker must have loaded its model."""
        return [s.spawned_at + self.config.start_timeout for s in self.slots
                if s.state is WorkerState.STARTING and s.killed_for is None]

    def kill_overdue(self, now: float) -> None:
        """Kill the workers still loading their model TORCHPOOL_START_TIMEOUT after they were spawned
        (a respawn that hangs); their death is handled like any other early death (a backoff)."""
        overdue = []
        with self.lock:
            for slot in self.slots:
                if slot.state is WorkerState.STARTING and slot.killed_for is None \
                        and now >= slot.spawned_at + self.config.start_timeout:
                    slot.killed_for = (f"the pool killed it: it did not load the model within "
                                       f"{self.config.key('start_timeout')}={self.config.start_timeout:g}s")
                    overdue.append(slot)
        for slot in overdue:
            self.kill(slot)

    def respawn_times(self) -> list[float]:
        return [s.respawn_at for s in self.slots if s.respawn_at is not None]

    def respawn_due(self, now: float) -> None:
        for slot in self.slots:
            if slot.respawn_at is not None and slot.respawn_at <= now:
                try:
                    self.spawn(slot)
                except Exception:
                    log.exception("%s: cannot respawn worker %d", self.name, slot.index)
                    with self.lock:
                        slot.ready_at = None  # an early death, whatever the last process did: back off
                        self.schedule_respawn(slot)

    # --- stopping -------------------------------------------------------------------------------------------

    def stop_all(self) -> None:
        """Fixed order: Stop message, join with timeout, SIGTERM, SIGKILL; then every slot is STOPPED."""
        for slot in self.slots:
            if slot.channel is not None:
                slot.stop_sent = True
                try:
                    slot.channel.send(messages.Stop())
                except OSError:
                    pass
        deadline = time.monotonic() + 2.0
        self._wait_exits(deadline)
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(max(0.0, deadline - time.monotonic()))
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.terminate()
                slot.process.join(1.0)
            if slot.process is not None and slot.process.is_alive():
                _kill(slot.process)
                slot.process.join(1.0)
        for slot in self.slots:
            self.close_output(slot)
        self._stop_fork_server()
        with self.lock:
            for slot in self.slots:
                if slot.channel is not None:
                    slot.channel.close()
                if slot.process is not None:
                    try:
                        slot.process.close()
                    except ValueError:  # still running after SIGKILL + join: nothing more to do
                        pass
                self.clear(slot)
                slot.state = WorkerState.STOPPED

    def _wait_exits(self, deadline: float) -> None:
        """Wait until every worker process has exited or *deadline* passed, forwarding their output
        meanwhile: a worker that logs while it stops could otherwise block on a full pipe."""
        with selectors.DefaultSelector() as selector:
            alive = 0
            for slot in self.slots:
                if slot.process is None:
                    continue
                selector.register(slot.process.sentinel, selectors.EVENT_READ, None)
                alive += 1
                for out in slot.output:
                    if out.fd is not None and not out.eof:
                        selector.register(out, selectors.EVENT_READ, out)
            while alive:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                for key, _ in selector.select(left):
                    if key.data is None:
                        alive -= 1
                        selector.unregister(key.fileobj)
                    elif not key.data.read():
                        selector.unregister(key.fileobj)


class _InheritedFd:
    """A descriptor for a spawned child, duplicated only while ``Process.start()`` pickles it.

    ``reduction.DupFd`` called any earlier finds no spawning process and falls back to
    multiprocessing's resource sharer, which listens on a Unix socket in a temp directory; while
    pickling, it adds the descriptor to the ones the child inherits instead."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_passthrough, (reduction.DupFd(self.fd),))


def _passthrough(value: Any) -> Any:
    return value


def _kill(process: Any) -> None:
    if process is not None and process.pid is not None:
        try:
            os.kill(process.pid, signal.SIGKILL)
        except (ProcessLookupError, OSError):
            pass
