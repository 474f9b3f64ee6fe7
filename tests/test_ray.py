"""The Ray backend (``TORCHPOOL_BACKEND = "ray"``, flask_torchpool/ray_backend): what the conformance tests
(tests/test_conformance.py, the ``ray`` backend) do not cover: its config keys, a factory that fails on
the actor, batching and overload through Ray, an actor SIGKILLed mid-call, a two-node cluster with a node
removed under load, no orphan actors when the owning process is SIGKILLed, shutdown that kills only our
actors, and attach mode with the pool server on Ray.

Every test runs on the session's one Ray cluster (``ray_cluster`` in conftest: a head node with 2 CPUs);
the two-node test adds a second node and removes it. Each test makes its own pool and shuts it down.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from flask import Flask

from flask_torchpool import (
    ConfigError,
    InferenceError,
    PoolOverloadedError,
    ReloadError,
    RemoteTraceback,
    TorchPool,
    WorkerCrashedError,
    WorkerStartupError,
)

from .conftest import RAY_LEAKS_OK, Gate, make_app, pid_alive, wait_until
from .servers import pool_server

pytestmark = [pytest.mark.timeout(180), RAY_LEAKS_OK]
ROOT = Path(__file__).resolve().parent.parent


def ray_app(**config: Any) -> tuple[Flask, TorchPool]:
    app = make_app(TORCHPOOL_BACKEND="ray", TORCHPOOL_DEVICES="auto", **config)
    return app, TorchPool(app)


@pytest.fixture
def make_ray_pool(ray_cluster: Any) -> Iterator[Callable[..., tuple[Flask, TorchPool]]]:
    """Make an app whose model runs on Ray actors; shut down (actors killed) on the way out."""
    made: list[tuple[Flask, TorchPool]] = []

    def factory(**config: Any) -> tuple[Flask, TorchPool]:
        app, pool = ray_app(**config)
        made.append((app, pool))
        return app, pool

    yield factory
    for app, pool in made:
        pool.shutdown(app=app, drain_timeout=0)


# --- configuration (no cluster needed) ----------------------------------------------------------------------


def test_backend_ray_without_ray_is_a_config_error_that_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as without the package
    app = make_app(TORCHPOOL_BACKEND="ray", TORCHPOOL_DEVICES="auto", TORCHPOOL_START="lazy")
    with pytest.raises(ConfigError) as info:
        TorchPool(app)
    assert "TORCHPOOL_BACKEND" in str(info.value)
    assert 'pip install "flask_torchpool[ray]"' in str(info.value)


@pytest.mark.parametrize(("config", "key", "words"), [
    ({"TORCHPOOL_BACKEND": "rays"}, "TORCHPOOL_BACKEND", "'process', 'ray'"),
    ({"TORCHPOOL_DEVICES": "cuda"}, "TORCHPOOL_DEVICES", "Ray places the actors"),
    ({"TORCHPOOL_DEVICES": "cpu", "TORCHPOOL_RAY_ACTOR_OPTIONS": {"num_gpus": 1}},
     "TORCHPOOL_RAY_ACTOR_OPTIONS", "num_gpus=1"),
    ({"TORCHPOOL_RAY_ACTOR_OPTIONS": [("num_cpus", 1)]}, "TORCHPOOL_RAY_ACTOR_OPTIONS", "dict of Ray actor"),
    ({"TORCHPOOL_RAY_ACTOR_OPTIONS": {"max_restarts": 3}}, "TORCHPOOL_RAY_ACTOR_OPTIONS", "sets itself"),
    ({"TORCHPOOL_RAY_ACTOR_OPTIONS": {"lifetime": "detached"}}, "TORCHPOOL_RAY_ACTOR_OPTIONS", "owns them"),
    ({"TORCHPOOL_RAY_ACTOR_OPTIONS": {"num_cpus": -1}}, "TORCHPOOL_RAY_ACTOR_OPTIONS", ">= 0"),
    ({"TORCHPOOL_RAY_ADDRESS": ""}, "TORCHPOOL_RAY_ADDRESS", "ray://head:10001"),
    ({"TORCHPOOL_MODELS": {"m": {"model": "tests.models:echo", "backend": "ray", "devices": "cuda:0"}},
      "TORCHPOOL_MODEL": None}, 'TORCHPOOL_MODELS["m"]["devices"]', "Ray places the actors"),
])
def test_bad_ray_config_fails_at_init_app_naming_the_key(config: dict[str, Any], key: str,
                                                        words: str) -> None:
    app = make_app(TORCHPOOL_START="lazy", **{"TORCHPOOL_BACKEND": "ray", "TORCHPOOL_DEVICES": "auto",
                                              **config})
    with pytest.raises(ConfigError) as info:
        TorchPool(app)
    assert key in str(info.value) and words in str(info.value), str(info.value)


def test_the_package_imports_and_serves_without_ray() -> None:
    """Ray is imported only when a Ray pool starts: a process backend app never imports it."""
    code = textwrap.dedent("""
        import sys
        sys.modules["ray"] = None
        import torch
        from flask_torchpool import TorchPool
        from flask_torchpool.ray_backend import RayPool
        from tests.conftest import make_app
        app = make_app(TORCHPOOL_INLINE=True)
        pool = TorchPool(app)
        with app.app_context():
            assert torch.equal(pool(torch.ones(2)), torch.ones(2))
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_per_model_backend_override(ray_cluster: Any) -> None:
    """One app, one model on worker processes and one on Ray actors (``TORCHPOOL_MODELS`` overrides)."""
    app = make_app(TORCHPOOL_MODEL=None, TORCHPOOL_DEVICES="auto", TORCHPOOL_MODELS={
        "local": "tests.models:echo",
        "remote": {"model": "tests.models:echo", "backend": "ray", "ray_actor_options": {"num_cpus": 0.5}}})
    pool = TorchPool(app)
    try:
        with app.app_context():
            assert pool.model("local")(torch.ones(1), action="pid") != pool.model("remote")(torch.ones(1),
                                                                                          action="pid")
        status = pool.status(app)["models"]
        assert status["local"]["mode"] == "embedded" and status["remote"]["mode"] == "ray", status
        assert status["remote"]["workers"][0]["resources"] == {"CPU": 0.5}
    finally:
        pool.shutdown(app=app)


# --- start, calls, batching, overload -----------------------------------------------------------------------


def test_a_factory_that_fails_on_the_actor_is_a_startup_error_with_its_traceback(
        make_ray_pool: Callable[..., tuple[Flask, TorchPool]]) -> None:
    with pytest.raises(WorkerStartupError, match="the weights file is corrupt") as info:
        make_ray_pool(TORCHPOOL_MODEL="tests.models:failing")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "in failing" in cause.tb, cause


def test_batches_form_on_a_busy_actor_and_a_failed_batch_fails_only_its_bad_member(
        make_ray_pool: Callable[..., tuple[Flask, TorchPool]], gate: Gate) -> None:
    app, pool = make_ray_pool(TORCHPOOL_MODEL="tests.models:batch_probe", TORCHPOOL_MAX_BATCH_SIZE=8,
                              TORCHPOOL_PIPELINE_DEPTH=1, TORCHPOOL_SPLIT_BATCHES=False)
    with app.app_context():
        held = pool.submit(action="gate", gate=str(gate))
        assert wait_until(lambda: pool.status(app)["busy_workers"] == 1)
        good = [pool.submit(torch.full((1, 2), float(i))) for i in range(3)]
        bad = pool.submit(torch.full((1, 2), -1.0))
        gate.open()
        assert held.result(60) == 0
        for i, future in enumerate(good):
            out = future.result(60)
            assert torch.equal(out["y"], torch.full((1, 2), i + 1.0)), out
        with pytest.raises(InferenceError, match="negative input"):
            bad.result(60)
        # The four ran as one batch first (Note [A failed batch]: then each good one alone).
        assert pool.status(app)["counters"]["batches"] >= 1
        again = [pool.submit(torch.full((2, 2), 1.0)) for _ in range(2)]
        assert all(torch.equal(f.result(60)["y"], torch.full((2, 2), 2.0)) for f in again)


def test_a_batch_runs_padded_to_its_bucket_on_the_actor(
        make_ray_pool: Callable[..., tuple[Flask, TorchPool]], gate: Gate) -> None:
    """Note [Batch buckets]: the actor stacks the members' rows and adds copies of the last one."""
    app, pool = make_ray_pool(TORCHPOOL_MODEL="tests.models:batch_probe", TORCHPOOL_MAX_BATCH_SIZE=8,
                              TORCHPOOL_BATCH_BUCKETS=[2, 8], TORCHPOOL_PIPELINE_DEPTH=1,
                              TORCHPOOL_SPLIT_BATCHES=False)
    with app.app_context():
        out = pool(torch.full((1, 2), 3.0))   # alone: one row runs as two
        assert int(out["n"][0]) == 2 and torch.equal(out["y"], torch.full((1, 2), 4.0))
        held = pool.submit(action="gate", gate=str(gate))
        assert wait_until(lambda: pool.status(app)["busy_workers"] == 1)
        futures = [pool.submit(torch.full((1, 2), float(i))) for i in range(3)]
        gate.open()
        assert held.result(60) == 0
        for i, future in enumerate(futures):   # queued behind the gate: one batch of 3, run as 8
            out = future.result(60)
            assert int(out["n"][0]) == 8 and torch.equal(out["y"], torch.full((1, 2), i + 1.0)), out


def test_a_full_queue_is_overloaded_with_retry_after(make_ray_pool: Callable[..., tuple[Flask, TorchPool]],
                                                     gate: Gate) -> None:
    # The batch probe model can hold its actor at a gate.
    app, pool = make_ray_pool(TORCHPOOL_MODEL="tests.models:batch_probe", TORCHPOOL_MAX_QUEUE=1,
                              TORCHPOOL_PIPELINE_DEPTH=1, TORCHPOOL_RETRY_AFTER=3)
    with app.app_context():
        held = pool.submit(action="gate", gate=str(gate))
        assert wait_until(lambda: pool.status(app)["busy_workers"] == 1)
        queued = pool.submit(torch.ones(1, 1))
        with pytest.raises(PoolOverloadedError) as info:
            pool.submit(torch.ones(1, 1))
        assert info.value.code == 503 and info.value.retry_after == 3
        gate.open()
        assert held.result(60) == 0 and torch.equal(queued.result(60)["y"], torch.full((1, 1), 2.0))
        assert pool.status(app)["counters"]["overloaded"] == 1


def test_reload_is_refused_on_ray_and_the_actors_keep_serving(
        make_ray_pool: Callable[..., tuple[Flask, TorchPool]]) -> None:
    """Rolling reload (issue 14) is the process backend's: on Ray it is a clear ReloadError (documented in
    docs/configuration.rst, "The Ray backend"), and nothing changes."""
    app, pool = make_ray_pool(TORCHPOOL_MODEL="tests.models:echo")
    with app.app_context():
        with pytest.raises(ReloadError, match="cannot reload") as info:
            pool.reload()
        assert info.value.model == "default"
        assert torch.equal(pool(torch.ones(2)), torch.ones(2))


# --- crashes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 1])
def test_an_actor_sigkilled_mid_call_is_replaced_and_its_call_retried_or_failed(
        make_ray_pool: Callable[..., tuple[Flask, TorchPool]], gate: Gate, retries: int) -> None:
    app, pool = make_ray_pool(TORCHPOOL_MODEL="tests.models:batch_probe", TORCHPOOL_RETRIES=retries)
    with app.app_context():
        before = pool.status(app)["workers"][0]
        held = pool.submit(action="gate", gate=str(gate))
        assert wait_until(lambda: pool.status(app)["busy_workers"] == 1)
        os.kill(before["pid"], signal.SIGKILL)
        if retries:
            gate.open()  # the retry, on the replacement actor, waits at the gate again
            assert held.result(60) == 0
        else:
            with pytest.raises(WorkerCrashedError) as info:
                held.result(60)
            assert info.value.code == 503 and info.value.pid == before["pid"]
            assert "died while running this call" in str(info.value) and "its process died" in str(info.value)
        assert wait_until(lambda: pool.status(app)["ready"], timeout=60), pool.status(app)
        after = pool.status(app)
        worker = after["workers"][0]
        assert worker["pid"] != before["pid"] and worker["restarts"] == 1 and "died" in worker["last_exit"]
        assert after["counters"]["retries"] == retries and after["counters"]["crashes"] == 1 - retries
        assert torch.equal(pool(torch.ones(1, 1))["y"], torch.full((1, 1), 2.0))


# --- two nodes ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_two_nodes_serve_and_a_lost_node_s_actors_are_replaced_on_the_other(
        make_ray_pool: Callable[..., tuple[Flask, TorchPool]], ray_cluster: Any) -> None:
    node = ray_cluster.add_node(num_cpus=2)
    try:
        ray_cluster.wait_for_nodes()
        # SPREAD: one actor per node while both are there; half a CPU each, so that the head node alone
        # can host all four once the other node is gone.
        app, pool = make_ray_pool(TORCHPOOL_WORKERS=4, TORCHPOOL_RAY_ACTOR_OPTIONS={
            "num_cpus": 0.5, "scheduling_strategy": "SPREAD"})
        with app.app_context():
            status = pool.status(app)
            nodes = {w["node_id"] for w in status["workers"]}
            assert len(nodes) == 2, status["workers"]
            lost = node.node_id
            with ThreadPoolExecutor(8) as threads:
                for f in [threads.submit(pool, torch.full((2,), float(i))) for i in range(32)]:
                    f.result(60)
            status = pool.status(app)
            assert all(w["calls"] > 0 for w in status["workers"]), status["workers"]  # both nodes served

            outcomes: list[str] = []
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    try:
                        x = torch.ones(3)
                        assert torch.equal(pool(x), x)
                        outcomes.append("ok")
                    except WorkerCrashedError:
                        outcomes.append("crashed")

            def back_on_one_node() -> bool:
                status = pool.status(app)
                return status["ready"] and len({w["node_id"] for w in status["workers"]}) == 1

            with ThreadPoolExecutor(4) as threads:
                loaders = [threads.submit(load) for _ in range(4)]
                try:
                    assert wait_until(lambda: len(outcomes) >= 20, timeout=60)
                    ray_cluster.remove_node(node, allow_graceful=False)
                    # Every actor is back, all on the head node, and serving. (A replacement that Ray
                    # placed on the dying node before it was declared dead dies too, and is replaced.)
                    assert wait_until(back_on_one_node, timeout=120), pool.status(app)["workers"]
                    served = len(outcomes)
                    assert wait_until(lambda: len(outcomes) >= served + 20, timeout=60)
                finally:
                    stop.set()
                for f in loaders:
                    f.result(60)  # no error but the documented WorkerCrashedError reached a caller
            status = pool.status(app)
            replaced = [w for w in status["workers"] if w["restarts"]]
            assert len(replaced) == 2 and all(w["last_exit"] for w in replaced), status["workers"]
            assert {w["node_id"] for w in status["workers"]} <= nodes - {lost}
            assert status["counters"]["crashes"] == outcomes.count("crashed")
    finally:
        if node in ray_cluster.worker_nodes:
            ray_cluster.remove_node(node)


# --- ownership: shutdown, orphans ---------------------------------------------------------------------------


def test_shutdown_kills_our_actors_and_nothing_else(make_ray_pool: Callable[..., tuple[Flask, TorchPool]],
                                                    ray_cluster: Any) -> None:
    import ray

    @ray.remote(num_cpus=0)
    class Bystander:
        def pid(self) -> int:
            return os.getpid()

    bystander = Bystander.remote()  # type: ignore[attr-defined]
    bystander_pid = ray.get(bystander.pid.remote(), timeout=60)
    app, pool = make_ray_pool(TORCHPOOL_WORKERS=2, TORCHPOOL_RAY_ACTOR_OPTIONS={"num_cpus": 0.5})
    pids = {w["pid"] for w in pool.status(app)["workers"]}
    pool.shutdown(app=app)
    assert {w["state"] for w in pool.status(app)["workers"]} == {"stopped"}
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30)
    assert ray.get(bystander.pid.remote(), timeout=60) == bystander_pid and pid_alive(bystander_pid)
    ray.kill(bystander)


ORPHAN_SCRIPT = """
import json, sys
from tests.conftest import make_app
from flask_torchpool import TorchPool
app = make_app(TORCHPOOL_BACKEND="ray", TORCHPOOL_DEVICES="auto", TORCHPOOL_WORKERS=2,
               TORCHPOOL_RAY_ADDRESS=sys.argv[1], TORCHPOOL_RAY_ACTOR_OPTIONS={"num_cpus": 0.25})
pool = TorchPool(app)
print(json.dumps([w["pid"] for w in pool.status(app)["workers"]]), flush=True)
sys.stdin.read()  # until the test kills this process
"""


def test_a_web_process_sigkilled_leaves_no_orphan_actors(ray_cluster: Any, tmp_path: Path) -> None:
    """The actors are owned by the process that created them: Ray kills them when it dies."""
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, ray_cluster.address], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "err", "wb"), env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, (tmp_path / "err").read_text()
        pids = json.loads(line)
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        proc.kill()
        proc.wait(30)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=90), \
            f"actors {pids} outlived the process that owned them"
    finally:
        proc.kill()
        proc.wait(30)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.stdout.close()


# --- attach mode --------------------------------------------------------------------------------------------


def test_attach_mode_the_pool_server_schedules_onto_ray_actors(ray_cluster: Any, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    with pool_server(run / "pool.sock", TORCHPOOL_BACKEND="ray", TORCHPOOL_DEVICES="auto",
                     TORCHPOOL_WORKERS=2, TORCHPOOL_RAY_ACTOR_OPTIONS={"num_cpus": 0.5},
                     TORCHPOOL_MAX_BATCH_SIZE=4) as server:
        app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=server.path)
        pool = TorchPool(app)
        try:
            with app.app_context():
                x = torch.arange(6.0).reshape(2, 3)
                assert torch.equal(pool(x), x)
                with ThreadPoolExecutor(4) as threads:
                    for i, f in enumerate([threads.submit(pool, torch.full((1, 3), float(i)))
                                           for i in range(16)]):
                        assert torch.equal(f.result(60), torch.full((1, 3), float(i)))
                status = pool.status(app)
            assert status["mode"] == "attach" and status["ready"], status
            assert {w["state"] for w in status["workers"]} == {"ready"}
            assert all(w["node_id"] and w["resources"] == {"CPU": 0.5} for w in status["workers"]), status
            pids = {w["pid"] for w in status["workers"]}
        finally:
            pool.shutdown(app=app)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30), \
        "the server's actors outlived it"


# --- status, /ready, metrics, the CLI ----------------------------------------------------------------------


def test_status_ready_metrics_and_the_cli_list_the_actors(
        make_ray_pool: Callable[..., tuple[Flask, TorchPool]]) -> None:
    app, pool = make_ray_pool(TORCHPOOL_WORKERS=2, TORCHPOOL_RAY_ACTOR_OPTIONS={"num_cpus": 0.5},
                              TORCHPOOL_HEALTH_URL="/torchpool")
    status = pool.status(app)
    assert status["mode"] == "ray" and status["ready"] and status["arena_bytes"] == 0
    for w in status["workers"]:
        assert w["state"] == "ready" and pid_alive(w["pid"]) and w["resources"] == {"CPU": 0.5}, w
        assert w["node_id"] and w["node_ip"] and w["actor_id"] and w["threads"] == 1, w
    client = app.test_client()
    ready = client.get("/torchpool/ready")
    assert ready.status_code == 200 and {w["pid"] for w in ready.json["workers"]} == \
        {w["pid"] for w in status["workers"]}
    metrics = client.get("/torchpool/metrics")
    assert metrics.status_code == 200 and b"torchpool" in metrics.data
    result = app.test_cli_runner().invoke(args=["torchpool", "status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("worker"))
    assert lines[header].split()[-2:] == ["node", "resources"], lines[header]
    row = lines[header + 1].split()
    assert row[-2:] == [status["workers"][0]["node_ip"], "CPU=0.5"], row
