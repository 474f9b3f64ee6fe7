"""The health blueprint (TORCHPOOL_HEALTH_URL): /live, /ready, /status and the Prometheus /metrics, before
start, while serving, after a worker restart and after shutdown; and the mountable collector."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from flask_torchpool import ConfigError, InferenceError, TorchPool, WorkerStartupError
from flask_torchpool.config import AppConfig
from flask_torchpool.metrics import OUTCOMES

from .conftest import make_app, wait_until

pytestmark = pytest.mark.timeout(120)

URL = "/torchpool"


@pytest.fixture(scope="module")
def health_app() -> Iterator[Flask]:
    """A started one-worker echo pool with the health blueprint, shared by the read-only tests."""
    app = make_app(TORCHPOOL_HEALTH_URL=URL, TORCHPOOL_ARENA_BYTES=4 << 20)
    pool = TorchPool(app)
    with app.app_context():
        for i in range(3):
            pool(torch.full((2,), float(i)))
        with pytest.raises(InferenceError):  # counted as model_error
            pool(action="raise")
    yield app
    pool.shutdown(app=app)


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(family: Any, suffix: str = "", **labels: str) -> float:
    matches = [s.value for s in family.samples
               if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (family.name, suffix, labels, family.samples)
    return matches[0]


def test_live(health_app: Flask) -> None:
    response = health_app.test_client().get(f"{URL}/live")
    assert response.status_code == 200 and response.json["status"] == "alive"
    assert response.headers["Cache-Control"] == "no-store"


def test_ready_when_every_worker_is_ready(health_app: Flask) -> None:
    response = health_app.test_client().get(f"{URL}/ready")
    assert response.status_code == 200, response.json
    assert response.json["status"] == "ready"
    assert [w["state"] for w in response.json["workers"]] == ["ready"]


def test_status_json(health_app: Flask) -> None:
    body = health_app.test_client().get(f"{URL}/status").json
    assert body["started"] is True and body["ready"] is True and body["closed"] is False
    assert body["inline"] is False and body["queued"] == 0 and body["busy_workers"] == 0
    assert body["arena_bytes"] == 4 << 20
    assert body["counters"]["ok"] == 3 and body["counters"]["errors"] == 1
    (worker,) = body["workers"]
    assert worker["pid"] != os.getpid() and worker["state"] == "ready" and worker["device"] == "cpu"
    assert worker["cores"] and worker["threads"] >= 1
    assert (worker["calls"], worker["errors"], worker["restarts"], worker["inflight"]) == (4, 1, 0, 0)
    assert set(body["latency_quantiles"]) == {"0.5", "0.9", "0.99"}
    assert all(v is not None and v > 0 for v in body["latency_quantiles"].values())
    assert body["plan"] == [{"worker": 0, "device": "cpu", "cores": worker["cores"],
                             "threads": worker["threads"], "model": "default"}]
    assert body["metrics"]["latency_seconds"]["count"] == 4


def test_prometheus_exposition(health_app: Flask) -> None:
    response = health_app.test_client().get(f"{URL}/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    families = _families(response.get_data(as_text=True))
    types = {name: f.type for name, f in families.items()}
    assert types == {
        "torchpool_calls": "counter", "torchpool_call_latency_seconds": "histogram",
        "torchpool_queue_seconds": "histogram", "torchpool_batch_rows": "histogram",
        "torchpool_batch_calls": "histogram", "torchpool_batch_padding_rows": "counter",
        "torchpool_batch_split_calls": "counter", "torchpool_worker_busy_seconds": "counter",
        "torchpool_queue_depth": "gauge",
        "torchpool_inflight_calls": "gauge", "torchpool_busy_workers": "gauge", "torchpool_workers": "gauge",
        "torchpool_ready": "gauge", "torchpool_worker_restarts": "counter",
        "torchpool_shared_memory_bytes": "gauge", "torchpool_streams": "counter",
        "torchpool_stream_chunks": "counter", "torchpool_streams_open": "gauge",
        "torchpool_stream_first_chunk_seconds": "histogram", "torchpool_model_generation": "gauge",
        "torchpool_model_info": "gauge", "torchpool_reloading": "gauge", "torchpool_reloads": "counter",
    }
    calls = families["torchpool_calls"]
    assert {s.labels["outcome"] for s in calls.samples} == set(OUTCOMES)
    assert _value(calls, "_total", model="default", outcome="ok") == 3
    assert _value(calls, "_total", outcome="model_error") == 1
    latency = families["torchpool_call_latency_seconds"]
    assert _value(latency, "_count") == 4 and _value(latency, "_bucket", le="+Inf") == 4
    assert _value(latency, "_sum") > 0
    buckets = [s.value for s in latency.samples if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets)  # cumulative
    assert _value(families["torchpool_queue_seconds"], "_count") == 4
    assert _value(families["torchpool_workers"], state="ready") == 1
    assert _value(families["torchpool_workers"], state="starting") == 0
    assert _value(families["torchpool_ready"]) == 1
    assert _value(families["torchpool_queue_depth"]) == 0
    assert _value(families["torchpool_busy_workers"]) == 0
    assert _value(families["torchpool_worker_restarts"], "_total") == 0
    assert _value(families["torchpool_shared_memory_bytes"]) == 4 << 20
    assert _value(families["torchpool_model_generation"]) == 1
    assert _value(families["torchpool_model_info"], generation="1", version="", sha256="") == 1
    assert _value(families["torchpool_reloading"]) == 0
    assert _value(families["torchpool_reloads"], "_total", outcome="ok") == 0


def test_busy_worker_gauges(health_app: Flask) -> None:
    pool = health_app.extensions["torchpool"].extension
    with health_app.app_context():
        future = pool.submit(action="sleep", seconds=1.5)
        try:
            client = health_app.test_client()
            assert wait_until(lambda: client.get(f"{URL}/status").json["busy_workers"] == 1)
            families = _families(client.get(f"{URL}/metrics").get_data(as_text=True))
            assert _value(families["torchpool_busy_workers"]) == 1
            assert _value(families["torchpool_inflight_calls"]) == 1
        finally:
            future.result(30)


def test_worker_busy_seconds_count_the_time_a_worker_ran_calls(health_app: Flask) -> None:
    pool = health_app.extensions["torchpool"].extension
    client = health_app.test_client()

    def busy() -> float:
        seconds: float = client.get(f"{URL}/status").json["metrics"]["worker_busy_seconds"]
        return seconds

    before = busy()
    with health_app.app_context():
        start = time.monotonic()
        pool(action="sleep", seconds=0.3)
        took = time.monotonic() - start
    after = busy()
    assert 0.3 <= after - before <= took
    families = _families(client.get(f"{URL}/metrics").get_data(as_text=True))
    assert _value(families["torchpool_worker_busy_seconds"], "_total") == pytest.approx(after)


def test_openmetrics_on_request(health_app: Flask) -> None:
    response = health_app.test_client().get(
        f"{URL}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.mimetype == "application/openmetrics-text"
    assert response.get_data(as_text=True).rstrip().endswith("# EOF")


def test_metrics_without_prometheus_client(health_app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    response = health_app.test_client().get(f"{URL}/metrics")
    assert response.status_code == 501
    assert "pip install flask_torchpool[metrics]" in response.json["error"]
    with health_app.app_context(), pytest.raises(ImportError, match=r"flask_torchpool\[metrics\]"):
        health_app.extensions["torchpool"].extension.prometheus_collector()


def test_collector_mounts_in_an_existing_registry(health_app: Flask) -> None:
    pool = health_app.extensions["torchpool"].extension
    registry = CollectorRegistry()
    registry.register(pool.prometheus_collector(health_app))
    ok = pool.status(health_app)["metrics"]["calls"]["ok"]
    assert ok >= 3
    assert registry.get_sample_value("torchpool_calls_total", {"model": "default", "outcome": "ok"}) == ok
    assert registry.get_sample_value("torchpool_workers", {"model": "default", "state": "ready"}) == 1
    families = _families(generate_latest(registry).decode())
    assert "torchpool_call_latency_seconds" in families
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # describe() names every metric
        registry.register(pool.prometheus_collector(health_app))


def test_health_is_off_by_default() -> None:
    app = make_app(TORCHPOOL_START="lazy")
    TorchPool(app)
    assert app.test_client().get(f"{URL}/live").status_code == 404
    assert not any(rule.rule.startswith(URL) for rule in app.url_map.iter_rules())


@pytest.mark.parametrize("value", ["torchpool", "/", 5, "/a/<int:x>"])
def test_health_url_is_validated(value: Any) -> None:
    with pytest.raises(ConfigError, match="TORCHPOOL_HEALTH_URL"):
        AppConfig.from_mapping({"TORCHPOOL_MODEL": "tests.models:echo", "TORCHPOOL_HEALTH_URL": value})
    config = AppConfig.from_mapping({"TORCHPOOL_MODEL": "tests.models:echo",
                                     "TORCHPOOL_HEALTH_URL": "/ops/pool/"})
    assert config.health_url == "/ops/pool"


@pytest.mark.timeout(90)
def test_ready_before_a_lazy_start_and_after_shutdown(make_pool: Any) -> None:
    app, pool = make_pool(TORCHPOOL_START="lazy", TORCHPOOL_HEALTH_URL=URL)
    client = app.test_client()
    assert client.get(f"{URL}/live").status_code == 200
    families = _families(client.get(f"{URL}/metrics").get_data(as_text=True))
    assert _value(families["torchpool_workers"], state="not started") == 1
    assert _value(families["torchpool_ready"]) == 0
    status = client.get(f"{URL}/status").json
    assert status["started"] is False and status["workers"][0]["state"] == "not started"
    response = client.get(f"{URL}/ready")
    assert response.status_code == 503
    assert response.json["status"] == "not ready" and response.json["reason"] == "the pool is starting"
    assert response.json["workers"] == [{"model": "default", "worker": 0, "pid": None,
                                         "state": "not started"}]
    # The probe started the pool in the background: it becomes ready without any call.
    assert wait_until(lambda: client.get(f"{URL}/ready").status_code == 200, timeout=60)
    pool.shutdown(app=app)
    response = client.get(f"{URL}/ready")
    assert response.status_code == 503 and response.json["reason"] == "the pool is shut down"
    assert [w["state"] for w in response.json["workers"]] == ["stopped"]
    assert client.get(f"{URL}/status").json["closed"] is True
    families = _families(client.get(f"{URL}/metrics").get_data(as_text=True))
    assert _value(families["torchpool_workers"], state="stopped") == 1
    assert _value(families["torchpool_shared_memory_bytes"]) == 0
    # A probe never restarts a pool that was shut down.
    assert client.get(f"{URL}/ready").status_code == 503
    assert app.extensions["torchpool"].background_start is None


@pytest.mark.timeout(90)
def test_ready_reports_a_failed_start(make_pool: Any) -> None:
    app, pool = make_pool(TORCHPOOL_START="lazy", TORCHPOOL_HEALTH_URL=URL,
                          TORCHPOOL_MODEL="tests.models:failing")
    client = app.test_client()
    assert client.get(f"{URL}/ready").status_code == 503
    assert wait_until(lambda: "failed to start" in client.get(f"{URL}/ready").json["reason"], timeout=60)
    response = client.get(f"{URL}/ready")
    assert response.status_code == 503 and "the weights file is corrupt" in response.json["reason"]
    assert "the weights file is corrupt" in client.get(f"{URL}/status").json["error"]
    with pytest.raises(WorkerStartupError, match="the weights file is corrupt"):  # start() retries
        pool.start(app)


@pytest.mark.timeout(90)
def test_a_restart_shows_in_status_and_metrics(make_pool: Any) -> None:
    app, pool = make_pool(TORCHPOOL_HEALTH_URL=URL)
    client = app.test_client()
    pid = client.get(f"{URL}/status").json["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        (worker,) = client.get(f"{URL}/status").json["workers"]
        return worker["restarts"] == 1 and worker["state"] == "ready" and worker["pid"] != pid

    assert wait_until(restarted, timeout=60)
    assert "SIGKILL" in (client.get(f"{URL}/status").json["workers"][0]["last_exit"] or "")
    families = _families(client.get(f"{URL}/metrics").get_data(as_text=True))
    assert _value(families["torchpool_worker_restarts"], "_total") == 1
    assert client.get(f"{URL}/ready").status_code == 200


def test_inline_pool_has_the_same_endpoints() -> None:
    app = make_app(TORCHPOOL_INLINE=True, TORCHPOOL_HEALTH_URL=URL)
    pool = TorchPool(app)
    client = app.test_client()
    assert client.get(f"{URL}/ready").status_code == 503  # builds on first use (or on this probe)
    assert wait_until(lambda: client.get(f"{URL}/ready").status_code == 200)
    with app.app_context():
        pool(torch.ones(1))
    body = client.get(f"{URL}/status").json
    assert body["inline"] is True and body["workers"][0]["pid"] == os.getpid()
    families = _families(client.get(f"{URL}/metrics").get_data(as_text=True))
    assert _value(families["torchpool_calls"], "_total", outcome="ok") == 1
    pool.shutdown(app=app)
    assert client.get(f"{URL}/ready").status_code == 503


def test_health_endpoints_are_thread_safe(health_app: Flask) -> None:
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            for _ in range(20):
                assert health_app.test_client().get(f"{URL}/metrics").status_code == 200
        except BaseException as exc:  # reported below, from the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    with health_app.app_context():
        pool = health_app.extensions["torchpool"].extension
        for t in threads:
            t.start()
        for _ in range(20):
            pool(torch.ones(1))
        for t in threads:
            t.join(60)
    assert not errors
