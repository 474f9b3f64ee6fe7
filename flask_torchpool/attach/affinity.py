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

Sharing a core pays for short calls only. The wake-ups it saves (0.1-0.5 ms a call) are a few percent of
a call that computes for milliseconds, while the web process then parses its next request on the one
core the model keeps busy, and shares that core's caches with it. The conv net of the benchmarks (~9 ms
a call) ran at 0.84x, 0.89x and 1.03x the requests/s pinned (``python -m benchmarks.hops --workload conv
--setups direct,direct:off``), within the noise of that run (the same setting twice: 0.88-1.12x), so
no gain was seen either way. So a pinned web process watches its first :data:`UNPIN_SAMPLE`
direct calls to the model it is paired on (their times, as it reports them to the server: Note
[Lanes]); if their median is above :data:`UNPIN_ABOVE_S` it puts every thread back on the cores it had
and stops preferring the paired worker (:class:`Pinning`). It decides once per attachment.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: A pinned web process unpins itself when the median of its first UNPIN_SAMPLE direct calls to the
#: model it is paired on took longer than this (seconds): Note [Web affinity].
UNPIN_ABOVE_S = 0.002
UNPIN_SAMPLE = 64

_own_cores: set[int] | None = None   # this process's cores before it was first pinned


def own_cores() -> set[int]:
    """The cores this process had before any pinning: a web process that attaches again (the pool
    server restarted) may be paired with another worker, and one that unpins goes back to them."""
    global _own_cores
    if _own_cores is None:
        _own_cores = os.sched_getaffinity(0)
    return _own_cores


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


def paired(models: Mapping[str, Any]) -> tuple[str | None, frozenset[int]]:
    """The model the server paired this web process on (the model of its Welcome's ``models`` that has
    a ``"pair"``) and that worker's cores; None and empty when it named none."""
    for name, info in models.items():
        if isinstance(info, dict) and isinstance(info.get("pair"), int):
            workers = info.get("workers") or []
            if 0 <= info["pair"] < len(workers):
                return name, frozenset(int(core) for core in workers[info["pair"]][2])
    return None, frozenset()


def on_cores(models: Mapping[str, Any], home: frozenset[int]) -> Callable[[Any], bool]:
    """Whether a lane's worker (``lane.model``, ``lane.worker``) runs on *home* only, by the placements of
    a Welcome's ``models``."""
    cores = {(name, int(placement[0])): frozenset(int(core) for core in placement[2])
             for name, info in models.items() for placement in info.get("workers", [])}

    def home_lane(lane: Any) -> bool:
        worker = cores.get((lane.model, lane.worker))
        return bool(worker) and worker is not None and worker <= home

    return home_lane


class Pinning:
    """A pinned web process: undone when its direct calls turn out to be long (Note [Web affinity])."""

    def __init__(self, model: str, unprefer: Callable[[], None]) -> None:
        self.model = model
        self.unprefer = unprefer
        self.samples: list[float] = []
        self.decided = False
        self._lock = threading.Lock()

    @classmethod
    def start(cls, models: Mapping[str, Any], prefer: Callable[[Callable[[Any], bool] | None], None]
              ) -> Pinning | None:
        """Pin this process to the paired worker's cores and prefer that worker's lanes; None when the
        Welcome pairs it with none or the kernel refused."""
        model, home = paired(models)
        if model is None or not home:
            if _own_cores is not None and os.sched_getaffinity(0) != _own_cores:  # pinned by an earlier
                set_cores(_own_cores, "unpinned: the pool server paired it with no worker")  # attachment
            return None
        if not pin_process(home):
            return None
        prefer(on_cores(models, home))
        return cls(model, lambda: prefer(None))

    def observe(self, model: str, seconds: Sequence[float]) -> None:
        """The times of direct calls to *model* that ended (any thread): decide once enough came."""
        if model != self.model or self.decided:
            return
        with self._lock:
            if self.decided:
                return
            self.samples.extend(seconds[:UNPIN_SAMPLE - len(self.samples)])
            if len(self.samples) < UNPIN_SAMPLE:
                return
            self.decided = True
            median = statistics.median(self.samples)
        if median > UNPIN_ABOVE_S and set_cores(own_cores(), "unpinned: its direct calls take "
                                                             f"{median * 1000:.1f} ms at the median"):
            self.unprefer()


def pin_process(cores: Iterable[int]) -> bool:
    """Pin every thread of this process to *cores*; False (logged) when the kernel refused."""
    cores = set(cores)
    usable = own_cores()
    if not cores or not cores <= usable:  # not ours to take (a cgroup or taskset narrowed this process)
        log.warning("torchpool: TORCHPOOL_WEB_AFFINITY: cores %s are not all usable by this process (%s); "
                    "not pinned", sorted(cores), sorted(usable))
        return False
    return set_cores(cores, "pinned")


def set_cores(cores: set[int], what: str) -> bool:
    """Put every thread of this process on *cores* (logged as *what*); False (logged) when refused."""
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), cores)
            except ProcessLookupError:  # the thread ended meanwhile
                pass
    except OSError as exc:
        log.warning("torchpool: TORCHPOOL_WEB_AFFINITY: cannot put this web process on cores %s: %s",
                    sorted(cores), exc)
        return False
    log.info("torchpool: web process %d %s, on cores %s (TORCHPOOL_WEB_AFFINITY)", os.getpid(), what,
             sorted(cores))
    return True
