"""Lanes: calls that go straight from an attached web process to a model worker (the worker's half).

Note [Lanes]
~~~~~~~~~~~~
In attach mode the pool server *brokers* and the calls travel without it. For every attached web process
and every worker of a model that is not batched, the server makes a *lane*: a socketpair and an arena of
the worker's size (a sealed memfd, :func:`flask_torchpool.shm.create_memfd`), shared by that web process
and that worker only. It hands the worker its ends with :class:`~flask_torchpool.messages.OpenLane` and the
web process its ends with :class:`~flask_torchpool.messages.LaneOffer`, and closes its own copies. From
then on a call is one :class:`~flask_torchpool.messages.Call` header from the web process to the worker
(its tensors already in the lane's input half) and one :class:`~flask_torchpool.messages.Result` or
:class:`~flask_torchpool.messages.Failure` back (the outputs in the lane's output half): two hops fewer
than through the server, and no copy in the server.

The lane protocol (:data:`~flask_torchpool.messages.LANE_PROTOCOL`) carries ``Call`` and ``Cancel`` to the
worker, ``Result`` and ``Failure`` back, and ``Stop`` both ways: a worker told to stop (shutdown, a
rolling reload retiring it) sends ``Stop`` on each lane and keeps serving that lane until the web process
answers ``Stop`` (it sends nothing after it), so no call sent before is lost. A pool that drains
(``TORCHPOOL_DRAIN_TIMEOUT``) sends its workers :class:`~flask_torchpool.messages.CloseLanes` first: each
worker stops its lanes the same way but keeps serving its pool, and writes how many lanes it still has
open into control word :data:`CTRL_LANES` of its own arena; the pool stops its workers once that is 0
everywhere (or at the drain deadline), so the lanes' calls are drained like its own. The web processes
send their new calls through the server meanwhile, which refuses them (it is draining).

A lane that ends under a call it was running (its worker died) sends that call again through the server
when ``TORCHPOOL_RETRIES`` allows, flagged :attr:`~flask_torchpool.messages.RemoteCall.retried`: the
server's pool runs it with one retry fewer, so a call that kills every worker costs 1 + RETRIES deaths as
in embedded mode, and any further death's details (pid, exit code) come from the server.

The worker serves its pool's channel and its lanes in arrival order, one call at a time. It writes how many
calls it holds (queued plus running) into control word :data:`CTRL_LOAD` of every lane's arena, so that a
web process sends to the least loaded worker, and the id of the lane call it runs into :data:`CTRL_RUNNING`
of that lane's arena. While it runs a stream it shows :data:`FULL_LOAD` instead, so that no lane call
waits behind the stream; and it writes its new load before it sends an answer, so that whoever reads
the answer reads the load without it.

Deadlines: a lane call carries its absolute deadline (``CLOCK_MONOTONIC``). The web process fails the call
at its deadline by itself; the worker arms ``ITIMER_REAL`` for the rest of the time before running it. A
call still running when it fires ends the worker by ``SIGALRM`` (its default action, taken by the kernel
even while the model holds the GIL in C code); the pool server reaps and replaces it as for any crash.
The two clocks race: when the lane ends under a running call whose deadline has passed, the web process
fails it with the timeout too (the timer never fires early: ``setitimer`` rounds up), not as a crash.

Threat model: a web process is a peer of the same user (checked at attach). It can read and write only its
own lanes' arenas; every reference it sends is checked against its lane's arena or the sealed segments it
sends along (:func:`flask_torchpool.shm.read_refs`); a message outside the lane protocol, a bad frame or
more than :data:`MAX_LANE_CALLS` queued calls closes that lane only. What it can still do is what any
caller can: keep the worker busy with calls it is allowed to make.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from multiprocessing.connection import Connection

from . import messages, shm
from .channel import Channel
from .deadlines import MAX_TIMEOUT

#: Control words of a lane's arena (int64 indexes): the lane call the worker runs, and its load.
CTRL_RUNNING = shm.CTRL_RUNNING
CTRL_LOAD = 1
#: Control words of the worker's own arena, for its pool: lane calls it answered, and how many failed.
CTRL_LANE_CALLS = 2
CTRL_LANE_ERRORS = 3
#: Control word of the worker's own arena: the lanes it has open (a draining pool waits for 0).
CTRL_LANES = 4
#: Calls one lane may have queued in its worker; past this the worker closes the lane.
MAX_LANE_CALLS = 4096
#: The load a worker running a stream shows its lanes: more than any web process sends to (the calls go
#: through the pool server, where any worker that frees up can take them) until the stream ends.
FULL_LOAD = MAX_LANE_CALLS
#: How long a stopping worker waits for its lanes' web processes to answer Stop.
STOP_GRACE = 5.0


class Peer:
    """Where a worker's call came from and its answer goes: the pool (lane 0) or one lane."""

    __slots__ = ("lane", "channel", "fd", "arena", "outputs", "words", "queued", "acked")

    def __init__(self, lane: int, channel: Channel, arena: shm.Arena) -> None:
        self.lane = lane
        self.channel = channel
        self.fd = channel.fileno()
        self.arena = arena
        self.outputs = shm.Allocator(*arena.outputs)
        #: The arena's control words (None once the lane is closed).
        self.words: memoryview | None = arena.control
        self.queued = 0
        self.acked = False


def map_lane(fds: list[int], min_bytes: int, max_bytes: int) -> tuple[Channel, shm.Arena]:
    """One end of a lane from the two descriptors that carry it (its socket, its arena, which must be a
    sealed memfd of at least *min_bytes*); closes *fds*, whatever happens. Both the worker
    (:func:`open_lane`) and the web process (``attach.lanes.Lane``) take their ends this way."""
    try:
        if len(fds) != 2:
            raise ValueError(f"a lane needs a socket and an arena, got {len(fds)} descriptors")
        size = shm.check_sealed(fds[1], min_bytes)
        arena = shm.Arena(fds[1], size)
        sock_fd = os.dup(fds[0])
    finally:
        for fd in fds:
            os.close(fd)
    return Channel(Connection(sock_fd), messages.LANE_PROTOCOL, max_bytes), arena


def open_lane(msg: messages.OpenLane, fds: list[int]) -> Peer:
    """The worker's end of the lane the pool server sent (closes *fds*, whatever happens)."""
    channel, arena = map_lane(fds, shm.CONTROL_BYTES + 2 * shm.ALIGN, msg.max_bytes)
    return Peer(msg.lane, channel, arena)


def publish_load(lanes: Iterable[Peer], load: int) -> None:
    """Write *load* (calls held: queued and running) into every lane's control words."""
    for peer in lanes:
        words = peer.words
        if words is not None:
            words[CTRL_LOAD] = load


class Alarm:
    """Note [Lanes] deadlines: ``ITIMER_REAL`` armed for a lane call's remaining time (the default action of
    SIGALRM ends the process)."""

    def __init__(self) -> None:
        # Nothing in a worker may have set a handler: make sure the default (terminate) applies.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        self.armed = False

    def arm(self, deadline: float) -> bool:
        """Arm for *deadline*; False when it has passed already (the call must not run)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        # A web process sends deadlines at most MAX_TIMEOUT ahead; a peer's far-off one must not overflow
        # setitimer (which would end this worker, and every other lane's call on it, by an exception).
        signal.setitimer(signal.ITIMER_REAL, min(remaining, MAX_TIMEOUT))
        self.armed = True
        return True

    def disarm(self) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.armed = False
