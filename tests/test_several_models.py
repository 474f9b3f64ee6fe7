"""Several models in one app (TORCHPOOL_MODELS): configuration and its errors, the plan, calls by name,
per-model batching, status, readiness and metrics by model, a crash in one model, inline mode, the CLI.

The happy-path tests share one started app with two models of one worker each (a Linear(4, 2) named
"linear" and the batch probe named "probe", batching on for it alone); tests that crash, gate or fail a
model make their own pool."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from flask_torchpool import ConfigError, ModelProxy, TorchPool, WorkerStartupError
from flask_torchpool.config import PoolConfig
from flask_torchpool.placement import plan_models

from .conftest import child_pids, make_app, wait_until
from .models import linear

pytestmark = pytest.mark.timeout(120)

URL = "/torchpool"
TWO_MODELS = {
    "linear": "tests.models:linear",
    "probe": {"model": "tests.models:batch_probe", "max_batch_size": 4, "max_batch_delay_ms": 5000.0,
              "split_batches": False},   # full batches, whole (batch splitting: test_batching.py)
}


def _models_app(models: dict[str, Any] = TWO_MODELS, **config: Any) -> Flask:
    """An app of *models* only (make_app's TORCHPOOL_MODEL removed), one worker per model."""
    return make_app(TORCHPOOL_MODEL=None, TORCHPOOL_MODELS=models, **config)


def _lazy(models: dict[str, Any] = TWO_MODELS, **config: Any) -> tuple[Flask, TorchPool]:
    app = _models_app(models, TORCHPOOL_START="lazy", **config)
    return app, TorchPool(app)


@pytest.fixture(scope="module")
def models_app() -> Iterator[Flask]:
    app = _models_app(TORCHPOOL_HEALTH_URL=URL)
    pool = TorchPool(app)

    @app.post("/linear")
    @pool.infer("linear")
    def call_linear(model: ModelProxy) -> Any:
        return {"y": model(torch.ones(1, 4)).tolist(), "name": model.name}

    @app.post("/probe")
    @pool.infer(model="probe", timeout=30, batch=False)
    def call_probe(model: ModelProxy) -> Any:
        out = model(torch.zeros(2, 1))
        return {"y": out["y"].tolist(), "name": model.name, "timeout": model.timeout, "batch": model.batch}

    yield app
    pool.shutdown(app=app)


@pytest.fixture
def mpool(models_app: Flask) -> Iterator[TorchPool]:
    with models_app.app_context():
        yield models_app.extensions["torchpool"].extension


# --- configuration (no processes) -------------------------------------------------------------------


def test_models_get_their_overrides_and_the_top_level_values() -> None:
    configs = PoolConfig.models_from_mapping({
        "TORCHPOOL_MODEL": "tests.models:echo", "TORCHPOOL_WORKERS": 3, "TORCHPOOL_TIMEOUT": 9,
        "TORCHPOOL_MODELS": {"linear": "tests.models:linear",
                             "probe": {"model": "tests.models:batch_probe", "workers": 1,
                                       "max_batch_size": 4, "timeout": None, "devices": "cpu"}}})
    assert list(configs) == ["default", "linear", "probe"]
    assert [c.name for c in configs.values()] == ["default", "linear", "probe"]
    assert configs["default"].model == "tests.models:echo"
    lin, probe = configs["linear"], configs["probe"]
    assert (lin.workers, lin.timeout, lin.max_batch_size) == (3, 9, 1)
    assert (probe.workers, probe.timeout, probe.max_batch_size) == (1, None, 4)
    assert configs["probe"].devices == ("cpu",) and configs["linear"].devices == "auto"
    assert configs["probe"].key("workers") == 'TORCHPOOL_MODELS["probe"]["workers"]'
    assert configs["linear"].key("workers") == "TORCHPOOL_WORKERS"
    assert configs["linear"].key("model") == 'TORCHPOOL_MODELS["linear"]'
    # The single model alone is unchanged, and from_mapping still gives it.
    single = PoolConfig.from_mapping({"TORCHPOOL_MODEL": "tests.models:echo"})
    assert single.name == "default" and single.key("model") == "TORCHPOOL_MODEL"
    only = PoolConfig.from_mapping({"TORCHPOOL_MODELS": {"a": "tests.models:echo"}})
    assert only.name == "a"


@pytest.mark.parametrize("config, key, fragment", [
    ({"TORCHPOOL_MODELS": ["tests.models:echo"]}, "TORCHPOOL_MODELS", "a dict of model names"),
    ({"TORCHPOOL_MODELS": {"": "tests.models:echo"}}, "TORCHPOOL_MODELS", "the name '' is not allowed"),
    ({"TORCHPOOL_MODELS": {"a b": "tests.models:echo"}}, "TORCHPOOL_MODELS", "letters, digits"),
    ({"TORCHPOOL_MODELS": {"a": "no colon"}}, 'TORCHPOOL_MODELS["a"]', "neither 'package.module:callable'"),
    ({"TORCHPOOL_MODELS": {"a": {"workers": 1}}}, 'TORCHPOOL_MODELS["a"]["model"]', "is not set"),
    ({"TORCHPOOL_MODELS": {"a": {"model": "tests.models:echo", "workers": 0}}},
     'TORCHPOOL_MODELS["a"]["workers"]', "integer >= 1 or 'auto'"),
    ({"TORCHPOOL_MODELS": {"a": {"model": "tests.models:echo", "devices": "tpu"}}},
     'TORCHPOOL_MODELS["a"]["devices"]', "'cpu', 'cuda'"),
    ({"TORCHPOOL_MODELS": {"a": {"model": "tests.models:echo", "max_batch_size": 1.5}}},
     'TORCHPOOL_MODELS["a"]["max_batch_size"]', "integer >= 1"),
    ({"TORCHPOOL_MODELS": {"a": {"model": "tests.models:echo", "timeout": 0}}},
     'TORCHPOOL_MODELS["a"]["timeout"]', "> 0 and at most 1000000 or None"),
    ({"TORCHPOOL_MODELS": {"a": {"model": "tests.models:echo", "start": "eager"}}},
     'TORCHPOOL_MODELS["a"]["start"]', "is not a per-model setting"),
    ({"TORCHPOOL_MODEL": "tests.models:echo", "TORCHPOOL_MODELS": {"default": "tests.models:linear"}},
     'TORCHPOOL_MODELS["default"]', "'default' is the name of the model of TORCHPOOL_MODEL"),
    ({"TORCHPOOL_MODEL": None, "TORCHPOOL_MODELS": None}, "TORCHPOOL_MODEL", "is not set"),
    ({"TORCHPOOL_MODEL": None, "TORCHPOOL_MODELS": {}}, "TORCHPOOL_MODEL", "TORCHPOOL_MODELS"),
])
def test_bad_models_name_the_exact_key(config: dict[str, Any], key: str, fragment: str) -> None:
    app = make_app(TORCHPOOL_MODEL=None, TORCHPOOL_START="lazy")
    app.config.update(config)
    with pytest.raises(ConfigError) as info:
        TorchPool(app)
    assert info.value.key == key and str(info.value).startswith(f"{key}: ")
    assert fragment in str(info.value)
    assert "torchpool" not in app.extensions


def test_plan_splits_the_cores_across_every_model() -> None:
    configs = PoolConfig.models_from_mapping({
        "TORCHPOOL_WORKERS": 1, "TORCHPOOL_DEVICES": "cpu",
        "TORCHPOOL_MODELS": {"a": {"model": "tests.models:echo", "workers": 2},
                             "b": {"model": "tests.models:echo", "threads_per_worker": 3}}})
    placements = plan_models(configs, cores=[0, 1, 2, 3, 4, 5])
    assert [(p.model, p.worker, p.cores, p.threads) for p in placements] == [
        ("a", 0, (0, 1), 2), ("a", 1, (2, 3), 2), ("b", 0, (4, 5), 3)]
    assert placements[2].describe() == "model b worker 0: device=cpu cores=4-5 threads=3"
    # Models on 'auto' workers share the automatic count (4 on 8 cores): 2 each.
    auto = PoolConfig.models_from_mapping({"TORCHPOOL_DEVICES": "cpu", "TORCHPOOL_MODELS": {
        "a": "tests.models:echo", "b": "tests.models:echo"}})
    assert [p.model for p in plan_models(auto, cores=list(range(8)))] == ["a", "a", "b", "b"]


def test_each_model_follows_its_own_devices() -> None:
    configs = PoolConfig.models_from_mapping({
        "TORCHPOOL_MODEL": "tests.models:echo", "TORCHPOOL_DEVICES": "cpu", "TORCHPOOL_WORKERS": 1,
        "TORCHPOOL_MODELS": {"big": {"model": "tests.models:echo", "devices": "cuda", "workers": 3}}})
    placements = plan_models(configs, cores=[0, 1, 2, 3], gpu_count=2)
    assert [(p.model, p.worker, p.device) for p in placements] == [
        ("default", 0, "cpu"), ("big", 0, "cuda:0"), ("big", 1, "cuda:1"), ("big", 2, "cuda:0")]
    assert placements[0].describe().startswith("worker 0: device=cpu")  # the default model's, unchanged
    missing = PoolConfig.models_from_mapping({"TORCHPOOL_DEVICES": "cpu", "TORCHPOOL_MODELS": {
        "big": {"model": "tests.models:echo", "devices": "cuda:5"}}})
    with pytest.raises(ConfigError, match="cuda:5 does not exist") as info:
        plan_models(missing, cores=[0], gpu_count=2)
    assert info.value.key == 'TORCHPOOL_MODELS["big"]["devices"]'


def test_plan_and_status_before_start_show_every_model() -> None:
    before = child_pids()
    app, pool = _lazy({"a": {"model": "tests.models:echo", "workers": 2}, "b": "tests.models:linear"})
    with app.app_context():
        assert [(p.model, p.worker) for p in pool.plan] == [("a", 0), ("a", 1), ("b", 0)]
        status = pool.status()
    assert status["started"] is False and status["ready"] is False and set(status["models"]) == {"a", "b"}
    assert [(w["model"], w["worker"], w["state"]) for w in status["workers"]] == [
        ("a", 0, "not started"), ("a", 1, "not started"), ("b", 0, "not started")]
    assert [len(status["models"][m]["workers"]) for m in ("a", "b")] == [2, 1]
    assert child_pids() == before and app.extensions["torchpool"].pools == {}


def test_the_default_model_and_unknown_names() -> None:
    app, pool = _lazy()
    with app.app_context():
        # Two models, none named "default": a call without a name says which names exist.
        with pytest.raises(ConfigError, match=r"names several models \('linear', 'probe'\)"):
            pool(torch.ones(1, 4))
        with pytest.raises(ConfigError, match=r"no model named 'nope'; this app's models are 'linear', "
                                              r"'probe'"):
            pool.model("nope")
        assert pool.model("linear", timeout=2.0).timeout == 2.0
        assert pool.model("probe").name == "probe"
    # Decoration knows the app's models already: an unknown name fails there, not at the first call.
    with pytest.raises(ConfigError, match="no model named 'nope'"):
        pool.infer("nope")(lambda model: None)
    with pytest.raises(ConfigError, match="names several models"):
        pool.infer(lambda model: None)
    with pytest.raises(TypeError, match="two model names"):
        pool.infer("linear", model="probe")
    # One model in TORCHPOOL_MODELS is the default; TORCHPOOL_MODEL beside others is "default".
    app, pool = _lazy({"only": "tests.models:linear"})
    with app.app_context():
        assert pool.model().name == "only" and pool.model(5.0).timeout == 5.0  # a number: the timeout
    app = make_app(TORCHPOOL_START="lazy", TORCHPOOL_MODELS={"linear": "tests.models:linear"})
    pool = TorchPool(app)
    with app.app_context():
        assert pool.model().name == "default" and pool.model("linear").name == "linear"
        assert [p.model for p in pool.plan] == ["default", "linear"]


def test_an_unknown_name_fails_at_the_first_call_when_no_app_is_known() -> None:
    pool = TorchPool()

    def view(model: ModelProxy) -> Any:
        return "never"

    wrapped = pool.infer("nope")(view)  # no app registered yet: nothing to check against
    app = _models_app(TORCHPOOL_START="lazy")
    pool.init_app(app)
    app.add_url_rule("/nope", view_func=wrapped)
    with pytest.raises(ConfigError, match="no model named 'nope'; this app's models are 'linear', 'probe'"):
        app.test_client().get("/nope")  # TESTING propagates it; in production a 500 that says why


# --- a started two-model pool --------------------------------------------------------------------------


def test_calls_reach_their_model(mpool: TorchPool, models_app: Flask) -> None:
    x = torch.randn(3, 4)
    expected = linear()(x)
    assert torch.allclose(mpool.model("linear")(x), expected)
    out = mpool.model("probe")(torch.zeros(2, 1))
    assert torch.equal(out["y"], torch.ones(2, 1)) and out["pid"] != os.getpid()
    assert mpool.model("probe").submit(torch.ones(1, 1)).result(30)["y"].item() == 2.0
    client = models_app.test_client()
    body = client.post("/linear").json
    assert body["name"] == "linear" and torch.allclose(torch.tensor(body["y"]), linear()(torch.ones(1, 4)))
    assert client.post("/probe").json == {"y": [[1.0], [1.0]], "name": "probe", "timeout": 30, "batch": False}
    pids = {w["model"]: w["pid"] for w in mpool.status()["workers"]}
    assert set(pids) == {"linear", "probe"} and pids["linear"] != pids["probe"]


def test_batching_is_on_for_its_model_only(mpool: TorchPool) -> None:
    probe, lin = mpool.model("probe"), mpool.model("linear")
    hold = probe.submit(action="sleep", seconds=1.0)  # holds probe's only worker; no tensor: not batched
    futures = [probe.submit(torch.full((1, 1), float(i))) for i in range(8)]
    # The other model has its own worker: it answers while probe's is busy.
    assert lin(torch.ones(2, 4)).shape == (2, 2)
    results = [f.result(60) for f in futures]
    hold.result(60)
    assert [int(r["n"][0]) for r in results] == [4] * 8  # two full batches of max_batch_size=4
    assert [r["y"].item() for r in results] == [float(i) + 1 for i in range(8)]
    lin_futures = [lin.submit(torch.ones(1, 4)) for _ in range(6)]
    assert all(f.result(60).shape == (1, 2) for f in lin_futures)
    models = mpool.status()["models"]
    assert models["probe"]["counters"]["batches"] >= 2
    assert models["linear"]["counters"]["batches"] == 0  # TORCHPOOL_MAX_BATCH_SIZE stays 1 there


def test_status_and_ready_by_model(mpool: TorchPool, models_app: Flask) -> None:
    client = models_app.test_client()
    response = client.get(f"{URL}/ready")
    assert response.status_code == 200, response.json
    assert sorted((w["model"], w["worker"], w["state"]) for w in response.json["workers"]) == [
        ("linear", 0, "ready"), ("probe", 0, "ready")]
    body = client.get(f"{URL}/status").json
    assert body["ready"] is True and body["started"] is True and body["closed"] is False
    assert list(body["models"]) == ["linear", "probe"]
    for name, model in body["models"].items():
        assert model["ready"] is True and model["metrics"]["model"] == name
        assert [w["model"] for w in model["workers"]] == [name]
        assert [p["model"] for p in model["plan"]] == [name]
    assert [w["model"] for w in body["workers"]] == ["linear", "probe"]
    assert [p["model"] for p in body["plan"]] == ["linear", "probe"]
    if len(os.sched_getaffinity(0)) >= 2:  # the cores are split across the two models' workers
        linear_cores, probe_cores = (set(p["cores"]) for p in body["plan"])
        assert linear_cores and probe_cores and not linear_cores & probe_cores
    for key in ("queued", "busy_workers", "arena_bytes"):
        assert body[key] == sum(m[key] for m in body["models"].values())
    for key in ("calls", "ok", "errors"):
        assert body["counters"][key] == sum(m["counters"][key] for m in body["models"].values())
    count = body["metrics"]["latency_seconds"]["count"]
    assert count == sum(m["metrics"]["latency_seconds"]["count"] for m in body["models"].values()) > 0
    assert body["latency_quantiles"] == body["metrics"]["latency_quantiles"]


def test_prometheus_samples_by_model(mpool: TorchPool, models_app: Flask) -> None:
    with models_app.app_context():
        mpool.model("linear")(torch.ones(1, 4))
    status = mpool.status()
    text = models_app.test_client().get(f"{URL}/metrics").get_data(as_text=True)
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name: str, suffix: str = "", **labels: str) -> float:
        family = families[name]
        (v,) = [s.value for s in family.samples if s.name == name + suffix
                and all(s.labels.get(k) == val for k, val in labels.items())]
        return v

    for name in ("linear", "probe"):
        ok = status["models"][name]["metrics"]["calls"]["ok"]
        assert ok > 0
        assert value("torchpool_calls", "_total", model=name, outcome="ok") == ok
        assert value("torchpool_workers", model=name, state="ready") == 1
        assert value("torchpool_ready", model=name) == 1
        assert value("torchpool_call_latency_seconds", "_count", model=name) == \
            status["models"][name]["metrics"]["latency_seconds"]["count"]
    assert {s.labels["model"] for s in families["torchpool_calls"].samples} == {"linear", "probe"}


def test_cli_status_shows_every_model(models_app: Flask) -> None:
    result = models_app.test_cli_runner().invoke(args=["torchpool", "status"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("pool: ready") and "busy workers: 0/2" in lines[0]
    assert any(line.startswith("model linear: ready") for line in lines)
    assert any(line.startswith("model probe: ready") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["model", "worker", "pid"])
    assert [line.split()[:2] for line in lines[header + 1:header + 3]] == [["linear", "0"], ["probe", "0"]]


# --- pools of their own ---------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_killed_worker_of_one_model_leaves_the_other_serving(make_pool: Any) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL=None, TORCHPOOL_MODELS=TWO_MODELS, TORCHPOOL_HEALTH_URL=URL)
    client = app.test_client()

    def workers() -> dict[str, dict[str, Any]]:
        return {w["model"]: w for w in pool.status(app)["workers"]}

    probe_pid, linear_pid = workers()["probe"]["pid"], workers()["linear"]["pid"]
    os.kill(probe_pid, signal.SIGKILL)
    with app.app_context():
        assert pool.model("linear")(torch.ones(1, 4)).shape == (1, 2)  # served while probe respawns

    def respawned() -> bool:
        w = workers()["probe"]
        return w["restarts"] == 1 and w["state"] == "ready" and w["pid"] != probe_pid

    assert wait_until(respawned, timeout=60), workers()
    assert "SIGKILL" in (workers()["probe"]["last_exit"] or "")
    assert workers()["linear"]["pid"] == linear_pid and workers()["linear"]["restarts"] == 0
    with app.app_context():
        assert pool.model("probe")(torch.zeros(1, 1))["y"].item() == 1.0
    assert client.get(f"{URL}/ready").status_code == 200
    text = client.get(f"{URL}/metrics").get_data(as_text=True)
    assert 'torchpool_worker_restarts_total{model="probe"} 1.0' in text
    assert 'torchpool_worker_restarts_total{model="linear"} 0.0' in text


@pytest.mark.timeout(150)
def test_ready_waits_for_every_model_which_start_together(make_pool: Any, monkeypatch: Any,
                                                          tmp_path: Path) -> None:
    """The gated model loads only when the test lets it. The models start in parallel, so "linear" is
    ready meanwhile, and /ready answers 503, naming the model, until the gated one is ready too."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    monkeypatch.setenv("TORCHPOOL_TEST_GATE", str(gate))
    app, pool = make_pool(TORCHPOOL_MODEL=None, TORCHPOOL_START="lazy", TORCHPOOL_HEALTH_URL=URL,
                          TORCHPOOL_MODELS={"gated": "tests.models:gated", "linear": "tests.models:linear"})
    client = app.test_client()
    response = client.get(f"{URL}/ready")  # starts both models in the background
    assert response.status_code == 503 and response.json["reason"] == "the pool is starting"

    def models() -> dict[str, Any]:
        return pool.status(app)["models"]

    assert wait_until(lambda: models()["linear"]["ready"], timeout=60), models()
    assert not models()["gated"]["ready"]
    response = client.get(f"{URL}/ready")
    assert response.status_code == 503
    assert {w["model"]: w["state"] for w in response.json["workers"]} == {"gated": "starting",
                                                                          "linear": "ready"}
    with app.app_context():  # the ready model serves already
        assert pool.model("linear")(torch.ones(1, 4)).shape == (1, 2)
    with open(gate, "w") as f:
        f.write("go")
    assert wait_until(lambda: client.get(f"{URL}/ready").status_code == 200, timeout=60)
    with app.app_context():
        assert torch.equal(pool.model("gated")(torch.ones(1, 4)), pool.model("linear")(torch.ones(1, 4)))


@pytest.mark.timeout(150)
def test_a_model_that_fails_to_start_names_itself_and_stops_the_others(make_pool: Any) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL=None, TORCHPOOL_START="lazy",
                          TORCHPOOL_MODELS={"linear": "tests.models:linear",
                                            "broken": "tests.models:failing"})
    with pytest.raises(WorkerStartupError, match="model 'broken' did not start") as info:
        pool.start(app)
    assert "the weights file is corrupt" in str(info.value)
    assert "the weights file is corrupt" in str(info.value.__cause__)  # the worker's traceback
    models = pool.status(app)["models"]
    assert models["linear"]["closed"] and models["broken"]["closed"]
    assert "model 'broken' did not start" in pool.status(app)["error"]
    with app.app_context(), pytest.raises(WorkerStartupError, match="model 'broken'"):
        pool.model("linear")(torch.ones(1, 4))  # the app failed to start: remembered, not retried
    assert wait_until(lambda: not any(w["pid"] and w["state"] != "stopped"
                                      for w in pool.status(app)["workers"]))


def test_inline_mode_serves_several_models() -> None:
    before = child_pids()
    app = _models_app(TORCHPOOL_INLINE=True)
    pool = TorchPool(app)
    with app.app_context():
        assert torch.allclose(pool.model("linear")(torch.ones(2, 4)), linear()(torch.ones(2, 4)))
        assert pool.model("probe")(torch.zeros(3, 1))["n"].tolist() == [3, 3, 3]
        assert [(p.model, p.worker) for p in pool.plan] == [("linear", 0), ("probe", 0)]
        status = pool.status()
    assert status["inline"] is True and status["ready"] is True
    assert [(w["model"], w["pid"]) for w in status["workers"]] == [("linear", os.getpid()),
                                                                   ("probe", os.getpid())]
    assert status["models"]["probe"]["counters"]["ok"] == 1 and status["counters"]["ok"] == 2
    pool.shutdown(app=app)
    assert child_pids() == before


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_plan_shows_the_model_of_each_worker() -> None:
    before = child_pids()
    app, pool = _lazy({"linear": {"model": "tests.models:linear", "workers": 2},
                       "probe": TWO_MODELS["probe"]}, TORCHPOOL_THREADS_PER_WORKER=1)
    result = app.test_cli_runner().invoke(args=["torchpool", "plan"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[:3] == ["model linear: 'tests.models:linear'", "model probe: 'tests.models:batch_probe'",
                         "3 worker(s), spawned processes"]
    assert lines[3].split() == ["model", "worker", "device", "cores", "threads"]
    assert [(r[0], r[1], r[2], r[4]) for r in (line.split() for line in lines[4:])] == [
        ("linear", "0", "cpu", "1"), ("linear", "1", "cpu", "1"), ("probe", "0", "cpu", "1")]
    result = app.test_cli_runner().invoke(args=["torchpool", "plan", "--json"])
    with app.app_context():
        assert json.loads(result.output) == [
            {"worker": p.worker, "device": p.device, "cores": list(p.cores), "threads": p.threads,
             "model": p.model} for p in pool.plan]
    assert app.extensions["torchpool"].pools == {} and child_pids() == before


@pytest.mark.timeout(120)
def test_cli_tune_one_model_by_name() -> None:
    before = child_pids()
    app, _ = _lazy({"linear": "tests.models:linear",
                    "probe": {"model": "tests.models:batch_probe", "example_input": (torch.ones(2, 1),)}})
    runner = app.test_cli_runner()
    result = runner.invoke(args=["torchpool", "tune", "--model", "nope"])
    assert result.exit_code == 2 and "no model named 'nope'" in result.output and "'probe'" in result.output
    result = runner.invoke(args=["torchpool", "tune"])  # no default model among two
    assert result.exit_code == 2 and "names several models" in result.output
    result = runner.invoke(args=["torchpool", "tune", "--model", "linear"])
    assert result.exit_code == 2 and "TORCHPOOL_EXAMPLE_INPUT" in result.output
    result = runner.invoke(args=[
        "torchpool", "tune", "--model", "probe", "--workers", "1", "--batch-sizes", "4", "--duration", "0.3",
        "--warmup", "0", "--plot", "", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    (row,) = body["results"]
    assert (row["workers"], row["batch_size"], row["errors"], row["error"]) == (1, 4, 0, None)
    assert body["recommended"] == {'TORCHPOOL_MODELS["probe"]["workers"]': 1,
                                   'TORCHPOOL_MODELS["probe"]["max_batch_size"]': 4}
    assert app.extensions["torchpool"].pools == {} and child_pids() <= before
