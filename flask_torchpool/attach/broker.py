"""Lanes (Note [Lanes] in :mod:`flask_torchpool.lanes`): the pool server's half. :class:`LaneBroker` makes a
lane for each (web process, worker) pair and hands its ends out; :func:`record_observed` counts the lane
calls a web process reports in the model's metrics. The web process's half is
:mod:`flask_torchpool.attach.lanes`.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from .. import messages, shm
from ..metrics import OUTCOMES
from ..status import WorkerState
from .lanes import MAX_OBSERVED

if TYPE_CHECKING:
    from .server import PoolServer, _Client

log = logging.getLogger(__name__)


class LaneBroker:
    """Makes lanes between the server's clients and the workers of its models that take direct calls."""

    def __init__(self, server: PoolServer) -> None:
        self.server = server
        self._ids = itertools.count(1)

    def hook(self) -> None:
        """Offer every new worker (a respawn, a reload's) to every client as it becomes ready."""
        pools: dict[str, Any] = self.server.pools
        for name, pool in pools.items():
            if self.eligible(pool):
                pool.on_ready.append(lambda slot, name=name, pool=pool: self.worker_ready(name, pool, slot))

    @staticmethod
    def eligible(pool: Any) -> bool:
        """Whether *pool*'s workers take direct calls: a process pool, direct calls on, no batching."""
        return getattr(pool, "on_ready", None) is not None and pool.config.direct_calls \
            and pool.config.max_batch_size <= 1

    def offer_all(self, client: _Client) -> None:
        """Lanes to every ready worker of every eligible model, for a client that just attached."""
        pools: dict[str, Any] = self.server.pools
        for name, pool in pools.items():
            if self.eligible(pool):
                for slot in list(pool.workers):
                    if slot.state is WorkerState.READY:
                        self._open(client, name, pool, slot)

    def worker_ready(self, name: str, pool: Any, slot: Any) -> None:
        for client in self.server.client_list():
            self._open(client, name, pool, slot)

    def _open(self, client: _Client, name: str, pool: Any, slot: Any) -> None:
        channel = slot.channel
        if channel is None or client.closed:
            return
        size = pool.config.arena_bytes
        lane = next(self._ids)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = -1
        try:
            fd = shm.create_memfd(size, "torchpool-lane")
            channel.send(messages.OpenLane(lane, self.server.max_message_bytes), (theirs.fileno(), fd))
            client._send(messages.LaneOffer(name, slot.index, lane, size), (ours.fileno(), fd))
        except OSError as exc:  # the worker or the client went away: the other end sees end-of-file
            log.debug("torchpool server: lane %d not opened: %s", lane, exc)
        finally:
            ours.close()
            theirs.close()
            if fd >= 0:
                os.close(fd)


def record_observed(pool: Any, msg: messages.Observed) -> bool:
    """Count a client's lane calls in *pool*'s metrics; False when the message is malformed."""
    if len(msg.outcomes) != len(msg.seconds) or len(msg.outcomes) > MAX_OBSERVED:
        return False
    for outcome, seconds in zip(msg.outcomes, msg.seconds):
        if outcome not in OUTCOMES or type(seconds) is not float or not 0 <= seconds < 1e9:
            return False
    metrics = pool.metrics
    for outcome, seconds in zip(msg.outcomes, msg.seconds):
        metrics.record_submit()
        metrics.record_call(outcome, seconds, 0.0)
    if "timeout" in msg.outcomes:  # a worker frozen on a direct call: its alarm cannot end it
        pool.kill_frozen("a direct call to it timed out")
    return True
