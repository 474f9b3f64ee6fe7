"""Web affinity (``TORCHPOOL_WEB_AFFINITY``): an attached web process on the cores of one worker.

Note [Web affinity]
~~~~~~~~~~~~~~~~~~~
A direct call (Note [Lanes]) is a ping-pong: the web process writes the call and sleeps, the worker
wakes, runs the model, writes the answer and sleeps, the web process wakes. When the two processes are
on different cores, each of those wake-ups is an interrupt to another core; on a virtual machine whose
other vCPU is idle it goes through the host, and costs both sides far more than the call's own work
(``python -m benchmarks.wakeups``: a socket round trip 5-7x slower across two cores than on one; a lane
call 1.3-2.3x). On one core it is a context switch.

With ``TORCHPOOL_WEB_AFFINITY = "worker"`` the pool server pairs each attached web process with one
worker of its default model (of its first model when it has no default), when that model takes direct
calls (it has lanes; nothing to gain without): the worker with the fewest
web processes paired with it, so that web processes spread evenly over the workers (:class:`Pairs`).
Its Welcome says which (``"pair"``, an index into that model's ``"workers"``). The web process pins
every one of its threads to that worker's cores (:func:`pin_process`; threads started later inherit
it), and its lanes prefer the workers on those cores when they hold no more calls than the others
(:func:`on_cores`). A sync web worker (one request at a time) and its model worker then take turns on
one core, as a model in the web process would; calls still go to the other workers when the paired one
is busier.

``"auto"`` (the default) pins gunicorn sync workers (``-k sync`` without ``--threads``; they load the
app themselves, so not with ``--preload``), which serve one request at a time, and nothing else: a
threaded web process pinned to one worker's cores could parse requests on those cores only. ``"off"``
pins nothing. Tiny model, ``gunicorn -w 2 -k sync`` attached, four rounds of ``python -m
benchmarks.hops --setups direct:pin,direct``: 1.40-1.53x the requests/s with it, and 0.82-1.20 ms of CPU
per request against 1.04-1.60.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)


class Pairs:
    """The pool server's count of the web processes paired with each worker of its default model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count: dict[int, int] = {}

    def take(self, workers: int) -> int:
        """Pair a web process with the worker (an index below *workers*) that has the fewest web
        processes paired with it, the lowest index on ties."""
        with self._lock:
            pair = min(range(workers), key=lambda i: (self._count.get(i, 0), i))
            self._count[pair] = self._count.get(pair, 0) + 1
            return pair

    def give_back(self, client: Any) -> None:
        """*client* (its ``pair``: the index :meth:`take` gave, or None) detached: unpair it."""
        pair, client.pair = client.pair, None
        if pair is not None:
            with self._lock:
                self._count[pair] -= 1

    def counts(self) -> dict[int, int]:
        with self._lock:
            return dict(self._count)


def home_cores(models: Mapping[str, Any]) -> frozenset[int]:
    """The cores of the worker the server paired this web process with (the model of its Welcome's
    ``models`` that has a ``"pair"``); empty when it named none."""
    for info in models.values():
        if isinstance(info, dict) and isinstance(info.get("pair"), int):
            workers = info.get("workers") or []
            if 0 <= info["pair"] < len(workers):
                return frozenset(int(core) for core in workers[info["pair"]][2])
    return frozenset()


def on_cores(models: Mapping[str, Any], home: frozenset[int]) -> Callable[[Any], bool]:
    """Whether a lane's worker (``lane.model``, ``lane.worker``) runs on *home* only, by the placements of
    a Welcome's ``models``."""
    cores = {(name, int(placement[0])): frozenset(int(core) for core in placement[2])
             for name, info in models.items() for placement in info.get("workers", [])}

    def home_lane(lane: Any) -> bool:
        worker = cores.get((lane.model, lane.worker))
        return bool(worker) and worker is not None and worker <= home

    return home_lane


def pin_process(cores: Iterable[int]) -> bool:
    """Pin every thread of this process to *cores*; False (logged) when the kernel refused."""
    cores = set(cores)
    usable = os.sched_getaffinity(0)
    if not cores or not cores <= usable:  # not ours to take (a cgroup or taskset narrowed this process)
        log.warning("torchpool: TORCHPOOL_WEB_AFFINITY: cores %s are not all usable by this process (%s); "
                    "not pinned", sorted(cores), sorted(usable))
        return False
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
    except OSError as exc:
        log.warning("torchpool: TORCHPOOL_WEB_AFFINITY: cannot pin this web process to cores %s: %s",
                    sorted(cores), exc)
        return False
    log.info("torchpool: web process %d pinned to cores %s (TORCHPOOL_WEB_AFFINITY)", os.getpid(),
             sorted(cores))
    return True
