"""Web affinity (Note [Web affinity] in ``flask_torchpool/attach/affinity.py``): the pool server pairs
attached web processes with workers evenly, and a web process with ``TORCHPOOL_WEB_AFFINITY = "worker"``
pins itself to its worker's cores and prefers that worker's lane.

One pool server in this process (two echo workers) for the module. The pinning runs in a child process,
so that this one stays on every core.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from flask_torchpool.attach import affinity
from flask_torchpool.attach.client import PoolConnection
from flask_torchpool.attach.server import PoolServer

from .conftest import wait_until
from .servers import ROOT, pool_server, server_env

pytestmark = pytest.mark.timeout(120)

#: Attaches to the socket of argv[1] with TORCHPOOL_WEB_AFFINITY argv[2], starts a thread, and prints
#: the server's pairing, every thread's cores and the lane it would send a call to.
CHILD = textwrap.dedent("""
    import json, os, sys, threading
    from flask_torchpool.attach.client import PoolConnection

    before = sorted(os.sched_getaffinity(0))
    conn = PoolConnection(sys.argv[1], 1 << 20, 1, sys.argv[2])
    conn.connect()
    gate = threading.Event()
    later = threading.Thread(target=gate.wait)  # started after the pinning: inherits it
    later.start()
    later_cores = sorted(os.sched_getaffinity(later.native_id))
    gate.set()
    later.join()
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            threads[tid] = sorted(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:  # a thread that ended (the joined one leaves a moment later)
            pass
    info = conn.welcome.models["default"]
    lane = conn.lanes.pick("default")
    print(json.dumps({
        "pair": info["pair"], "workers": info["workers"], "before": before,
        "threads": threads,
        "later": later_cores,
        "lane_worker": None if lane is None else lane.worker,
        "home": sorted(l.worker for ls in conn.lanes._by_model.values() for l in ls if l.home)}))
    conn.close()
""")


#: Attaches with TORCHPOOL_WEB_AFFINITY "worker" to the socket of argv[1], makes UNPIN_SAMPLE direct calls
#: to the echo model that sleep argv[2] seconds each (0: plain echoes), and prints every thread's cores
#: before and after, and the lanes it prefers after.
CALLS_CHILD = "UNPIN_ABOVE_S = 0.015\n" + textwrap.dedent("""
    import json, logging, os, sys
    import torch
    from flask_torchpool.attach import affinity

    logging.basicConfig(level=logging.INFO)
    affinity.UNPIN_ABOVE_S = UNPIN_ABOVE_S   # well between an echo's time and the slow calls', on a busy CI
    from flask_torchpool.attach.client import PoolConnection

    before = sorted(os.sched_getaffinity(0))
    conn = PoolConnection(sys.argv[1], 1 << 20, 1, "worker")
    conn.connect()
    pinned = sorted(os.sched_getaffinity(0))
    sleep = float(sys.argv[2])
    kwargs = {"action": "sleep", "seconds": sleep} if sleep else {}
    for _ in range(affinity.UNPIN_SAMPLE):
        out = conn.submit(None, (torch.ones(4),), kwargs, 30.0, False, 1 << 20).result(30)
    conn.lanes.flush()   # what the lane reader thread does every REPORT_INTERVAL
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            threads[tid] = sorted(os.sched_getaffinity(int(tid)))
        except ProcessLookupError:
            pass
    print(json.dumps({
        "before": before, "pinned": pinned, "threads": threads,
        "home": sorted(l.worker for ls in conn.lanes._by_model.values() for l in ls if l.home)}))
    conn.close()
""")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolServer]:
    path = tmp_path_factory.mktemp("affinity") / "run"
    path.mkdir(mode=0o700)
    with pool_server(path / "pool.sock", TORCHPOOL_WORKERS=2) as server:
        yield server


def _child(served: PoolServer, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, served.path, mode], env=server_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_web_processes_are_paired_with_the_workers_evenly(served: PoolServer) -> None:
    assert served.pairs.counts() in ({}, {0: 0, 1: 0}, {0: 0}, {1: 0})
    conns = [PoolConnection(served.path, 1 << 20) for _ in range(3)]
    try:
        for c in conns:
            c.connect()
        pairs = [c.welcome.models["default"]["pair"] for c in conns]  # type: ignore[union-attr]
        assert pairs == [0, 1, 0]
        conns[1].close()
        assert wait_until(lambda: served.pairs.counts().get(1) == 0, timeout=10)
        again = PoolConnection(served.path, 1 << 20)
        conns.append(again)
        again.connect()
        assert again.welcome.models["default"]["pair"] == 1  # type: ignore[union-attr]
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: not any(served.pairs.counts().values()), timeout=10)


def test_worker_affinity_pins_every_thread_to_the_paired_workers_cores(served: PoolServer) -> None:
    seen = _child(served, "worker")
    home = sorted(seen["workers"][seen["pair"]][2])
    assert seen["threads"] == dict.fromkeys(seen["threads"], home)
    assert seen["later"] == home
    # An idle pool: the call goes to the paired worker (or one on the same cores).
    lane_cores = sorted(seen["workers"][seen["lane_worker"]][2])
    assert set(lane_cores) <= set(home), seen
    assert seen["pair"] in seen["home"], seen


@pytest.mark.parametrize(("sleep", "stays"), [(0.0, True), (0.03, False)])
def test_a_web_process_whose_calls_are_long_unpins_itself(served: PoolServer, sleep: float,
                                                           stays: bool) -> None:
    """Note [Web affinity]: sharing a core pays for short calls only. After UNPIN_SAMPLE direct calls of
    30 ms each (over a bound of 15 ms here) the web process is back on its own cores and prefers no
    lane; echoes stay pinned."""
    out = subprocess.run([sys.executable, "-c", CALLS_CHILD, served.path, str(sleep)], env=server_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["pinned"] != seen["before"] or len(seen["before"]) == 1, seen
    if stays:
        assert all(cores == seen["pinned"] for cores in seen["threads"].values()), seen
        assert seen["home"], seen
    else:
        assert all(cores == seen["before"] for cores in seen["threads"].values()), seen
        assert seen["home"] == [], seen
        assert "unpinned: its direct calls take" in out.stderr


def test_pinning_decides_once_from_the_paired_model_s_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    moved: list[tuple[set[int], str]] = []
    monkeypatch.setattr(affinity, "set_cores", lambda cores, what: moved.append((cores, what)) or True)
    unpreferred: list[bool] = []
    pinning = affinity.Pinning("default", lambda: unpreferred.append(True))
    pinning.observe("other", [1.0] * affinity.UNPIN_SAMPLE)   # another model's calls: not counted
    pinning.observe("default", [0.01] * (affinity.UNPIN_SAMPLE - 1))
    assert not pinning.decided and not moved
    pinning.observe("default", [0.01, 0.0, 0.0])
    assert pinning.decided and len(pinning.samples) == affinity.UNPIN_SAMPLE
    assert [what for _, what in moved] == ["unpinned: its direct calls take 10.0 ms at the median"]
    assert moved[0][0] == affinity.own_cores() and unpreferred == [True]
    pinning.observe("default", [1.0] * affinity.UNPIN_SAMPLE)   # decided: nothing more
    assert len(moved) == 1
    fast = affinity.Pinning("default", lambda: unpreferred.append(True))
    fast.observe("default", [0.0001] * affinity.UNPIN_SAMPLE)
    assert fast.decided and len(moved) == 1 and unpreferred == [True]   # short calls: stays pinned


#: Pins itself as three Welcomes in turn say: paired with worker 0, then (the server restarted) with
#: worker 1, then with none; prints its cores after each.
REPAIR_CHILD = textwrap.dedent("""
    import json, os
    from flask_torchpool.attach import affinity

    before = sorted(os.sched_getaffinity(0))
    cores = before[:2]
    workers = [(i, "cpu", (core,), 1, "default") for i, core in enumerate(cores)]
    seen = []
    for models in ({"default": {"pair": 0, "workers": workers}}, {"default": {"pair": 1, "workers": workers}},
                   {"default": {"workers": workers}}):
        pinning = affinity.Pinning.start(models, lambda home: None)
        seen.append([sorted(os.sched_getaffinity(0)), pinning is not None])
    print(json.dumps({"cores": cores, "before": before, "seen": seen}))
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_web_process_that_attaches_again_is_pinned_from_its_own_cores() -> None:
    """After the pool server restarted, the new pairing may name another worker's cores: they are
    taken from the cores the process had before any pinning (the old pinning would refuse them), and a
    pairing with no worker puts it back on those."""
    out = subprocess.run([sys.executable, "-c", REPAIR_CHILD], env=server_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    first, second = seen["cores"]
    assert seen["seen"] == [[[first], True], [[second], True], [seen["before"], False]], seen


def test_without_web_affinity_nothing_is_pinned(served: PoolServer) -> None:
    seen = _child(served, "off")
    assert all(cores == seen["before"] for cores in seen["threads"].values()), seen
    assert seen["home"] == []


def test_cores_this_process_may_not_use_are_not_taken(caplog: pytest.LogCaptureFixture) -> None:
    before = os.sched_getaffinity(0)
    outside = max(before) + 1
    with caplog.at_level(logging.WARNING, logger="flask_torchpool.attach.affinity"):
        assert not affinity.pin_process({outside})
    assert os.sched_getaffinity(0) == before
    assert "TORCHPOOL_WEB_AFFINITY" in caplog.text and "not pinned" in caplog.text


def test_a_lane_is_on_the_home_cores_only_when_its_worker_is() -> None:
    models = {"default": {"workers": [(0, "cpu", (0,), 1, "default"), (1, "cpu", (1, 2), 2, "default")],
                          "pair": 1}}
    model, home = affinity.paired(models)
    assert model == "default" and home == frozenset({1, 2})
    on = affinity.on_cores(models, home)

    class L:
        def __init__(self, model: str, worker: int) -> None:
            self.model, self.worker = model, worker

    assert on(L("default", 1)) and not on(L("default", 0)) and not on(L("default", 7))
    assert not on(L("other", 1))
    assert affinity.paired({"default": {"workers": [], "pair": 0}})[1] == frozenset()
    assert affinity.paired({"default": {"workers": [(0, "cpu", (0,), 1, "default")]}})[1] == frozenset()


def test_auto_means_a_gunicorn_sync_worker() -> None:
    gunicorn_sync = pytest.importorskip("gunicorn.workers.sync")
    gthread = pytest.importorskip("gunicorn.workers.gthread")
    from flask_torchpool import startup

    # The app is loaded from Worker.load_wsgi (module gunicorn.workers.base), with the worker as self.
    scope: dict = {"__name__": "gunicorn.workers.base", "startup": startup}
    exec("def load_wsgi(self):\n    return startup.gunicorn_sync_worker()\n", scope)
    assert scope["load_wsgi"](object.__new__(gunicorn_sync.SyncWorker)) is True
    assert scope["load_wsgi"](object.__new__(gthread.ThreadWorker)) is False
    assert startup.gunicorn_sync_worker() is False  # not loaded by gunicorn


def test_a_model_without_lanes_pairs_nobody(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    with pool_server(run / "p.sock", TORCHPOOL_WORKERS=1, TORCHPOOL_DIRECT_CALLS=False) as server:
        c = PoolConnection(server.path, 1 << 20, 1, "worker")
        try:
            c.connect()
            assert "pair" not in c.welcome.models["default"]  # type: ignore[union-attr]
            assert server.pairs.counts() == {}
        finally:
            c.close()
