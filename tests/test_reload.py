"""Rolling reload (Note [Rolling reload]): a new model version takes over a running pool, worker by
worker, without a failed call; a version that fails never takes over.

The versions are modules written to the test's directory (``tests.reload_models``): every answer is the
version that computed it. Processes are real; the tests wait on gates, futures and polls with deadlines.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from flask import Flask
from werkzeug.serving import make_server

from flask_torchpool import ConfigError, ReloadError, TorchPool
from flask_torchpool.forkserver import PROCESS_NAME as FORK_SERVER_NAME

from .conftest import Gate, child_pids, pid_alive, wait_until
from .reload_models import write_file_model, write_model
from .servers import comm, is_pool_worker

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory on the workers' sys.path (the fork server is spawned with this process's)."""
    directory = tmp_path / "models"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    return directory


def workers_of_this_process() -> set[int]:
    return {p for p in child_pids() if is_pool_worker(p)}


def fork_servers() -> set[int]:
    return {p for p in child_pids() if comm(p) == FORK_SERVER_NAME}


def answer(pool: TorchPool, name: str | None = None) -> float:
    out = pool.model(name)(torch.zeros(2))
    values = set(out.tolist())
    assert len(values) == 1, f"one answer from several versions: {out}"
    return values.pop()


def worker_generations(app: Flask, name: str = "default") -> list[tuple[int, str, bool]]:
    status = app.extensions["torchpool"].extension.status(app=app)["models"][name]
    return [(w["generation"], w["state"], w["incoming"]) for w in status["workers"]]


def release_until_done(gate: Gate, thread: threading.Thread, timeout: float = 60.0) -> None:
    """Open *gate* for every caller that comes to it until *thread* ends. (One opening may release
    several waiting callers, or none that arrives while it closes: so open it until done.)"""
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(AssertionError):
            gate.open(timeout=0.5)
    thread.join(1)
    assert not thread.is_alive(), "the reload did not finish"


# --- the happy path -------------------------------------------------------------------------------------


def test_reload_imports_the_module_again(make_pool: Any, models_dir: Path) -> None:
    spec = write_model(models_dir, 1)
    app, pool = make_pool(TORCHPOOL_MODEL=spec, TORCHPOOL_WORKERS=2, TORCHPOOL_MODEL_VERSION="first")
    pool.start(app=app)
    assert answer(pool) == 1.0
    old_workers, old_servers = workers_of_this_process(), fork_servers()
    assert len(old_workers) == 2
    before = pool.status(app=app)
    assert before["version"]["generation"] == 1 and before["version"]["version"] == "first"

    write_model(models_dir, 2)
    versions = pool.reload(app=app)

    assert versions["default"]["generation"] == 2
    assert versions["default"]["model"] == spec
    assert versions["default"]["version"] == "first"  # the configured label, the model unchanged
    assert all(answer(pool) == 2.0 for _ in range(10))
    # Every old worker is gone once reload() returned, and so is the old version's fork server.
    assert not any(pid_alive(p) for p in old_workers)
    new_workers = workers_of_this_process()
    assert len(new_workers) == 2 and not new_workers & old_workers
    assert wait_until(lambda: not (fork_servers() & old_servers), timeout=10)
    status = pool.status(app=app)
    assert status["version"]["generation"] == 2 and status["reloading"] is False
    assert status["reloads"] == {"ok": 1, "failed": 0}
    assert worker_generations(app) == [(2, "ready", False)] * 2
    assert status["ready"] is True
    # The new version's shared weights: one copy of 4096 float32.
    assert status["shared_weight_bytes"] == 4096 * 4


def test_a_finished_reload_forgets_the_batch_times(make_pool: Any, models_dir: Path) -> None:
    """Note [Batch splitting]: the new model's batches take their own times; a failed reload keeps them."""
    app, pool = make_pool(TORCHPOOL_MODEL=write_model(models_dir, 1), TORCHPOOL_WORKERS=1,
                          TORCHPOOL_MAX_BATCH_SIZE=4)
    pool.start(app=app)
    sched = app.extensions["torchpool"].pool._sched
    for _ in range(3):
        sched.costs.record(2, 0.05)
    assert sched.costs.seconds(2) == pytest.approx(0.05)
    with pytest.raises(ReloadError):
        pool.reload(model="reloadable:build_failing", app=app)
    assert sched.costs.seconds(2) == pytest.approx(0.05)
    write_model(models_dir, 2)
    pool.reload(app=app)
    assert sched.costs.seconds(2) is None
    assert answer(pool) == 2.0


def test_reload_to_another_factory_with_a_label(make_pool: Any, models_dir: Path) -> None:
    spec = write_model(models_dir, 1)
    app, pool = make_pool(TORCHPOOL_MODEL=spec, TORCHPOOL_WORKERS=1)
    pool.start(app=app)
    versions = pool.reload(model="reloadable:build_other", version="v-other", app=app)
    assert versions["default"]["model"] == "reloadable:build_other"
    assert versions["default"]["version"] == "v-other"
    assert answer(pool) == 101.0
    with pytest.raises(ConfigError, match="reload"):
        pool.reload(model="not a spec", app=app)
    assert answer(pool) == 101.0


def test_file_model_version_is_its_sha256(make_pool: Any, tmp_path: Path) -> None:
    path = Path(write_file_model(tmp_path / "model.pt", 1))
    app, pool = make_pool(TORCHPOOL_MODEL=str(path), TORCHPOOL_WORKERS=1)
    pool.start(app=app)
    first = pool.status(app=app)["version"]
    assert first["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first["mtime"] == os.stat(path).st_mtime
    write_file_model(path, 2)
    versions = pool.reload(app=app)
    assert versions["default"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() != first["sha256"]
    assert answer(pool) == 2.0

    # The file gone: the reload fails, the old version serves on.
    path.unlink()
    with pytest.raises(ReloadError) as info:
        pool.reload(app=app)
    assert "'default' version 3" in str(info.value) and "model.pt" in str(info.value)
    assert info.value.model == "default" and info.value.version == 3
    assert answer(pool) == 2.0
    assert pool.status(app=app)["version"]["generation"] == 2


# --- a version that fails never takes over --------------------------------------------------------------


@pytest.mark.parametrize("surge", [1, 0])
@pytest.mark.parametrize("failure", ["build", "warmup"])
def test_failed_reload_keeps_the_old_version(make_pool: Any, models_dir: Path, failure: str,
                                             surge: int) -> None:
    spec = write_model(models_dir, 1)
    app, pool = make_pool(TORCHPOOL_MODEL=spec, TORCHPOOL_WORKERS=2, TORCHPOOL_RELOAD_SURGE=surge,
                          TORCHPOOL_EXAMPLE_INPUT=(torch.zeros(3),))
    pool.start(app=app)
    old_workers = workers_of_this_process()

    with pytest.raises(ReloadError) as info:
        pool.reload(model=f"reloadable:build_{'failing' if failure == 'build' else 'refusing'}", app=app)

    message = str(info.value)
    assert "model 'default' version 2" in message and "keeps serving" in message
    assert ("cannot be built" if failure == "build" else "warm-up") in message
    assert info.value.cause and info.value.version == 2
    assert all(answer(pool) == 1.0 for _ in range(6))
    status = pool.status(app=app)
    assert status["version"]["generation"] == 1 and status["reloads"] == {"ok": 0, "failed": 1}
    assert [g for g, _, _ in worker_generations(app)] == [1, 1]
    assert status["ready"] is True
    # No worker of the failed version is left; with surge 0 the emptied slot got the old version back.
    assert wait_until(lambda: len(workers_of_this_process()) == 2, timeout=20)
    if surge:
        assert workers_of_this_process() == old_workers


def test_failed_reload_of_changed_code(make_pool: Any, models_dir: Path) -> None:
    """The module on disk broken: the new version never takes over (surge 1: no old worker stops)."""
    spec = write_model(models_dir, 1)
    app, pool = make_pool(TORCHPOOL_MODEL=spec, TORCHPOOL_WORKERS=2)
    pool.start(app=app)
    old_workers = workers_of_this_process()
    write_model(models_dir, 2, fail="build")
    with pytest.raises(ReloadError, match="version 2 cannot be built"):
        pool.reload(app=app)
    assert all(answer(pool) == 1.0 for _ in range(6))
    assert workers_of_this_process() == old_workers

    # A good version afterwards goes through.
    write_model(models_dir, 3)
    assert pool.reload(app=app)["default"]["generation"] == 3
    assert answer(pool) == 3.0


def test_hash_pin_mismatch_aborts(make_pool: Any, tmp_path: Path) -> None:
    path = Path(write_file_model(tmp_path / "pinned.pt", 1))
    pin = hashlib.sha256(path.read_bytes()).hexdigest()
    app, pool = make_pool(TORCHPOOL_MODEL=str(path), TORCHPOOL_MODEL_SHA256=pin, TORCHPOOL_WORKERS=1)
    pool.start(app=app)
    assert pool.status(app=app)["version"]["sha256"] == pin
    write_file_model(path, 2)
    with pytest.raises(ReloadError, match="SHA-256"):
        pool.reload(app=app)
    assert answer(pool) == 1.0


def test_a_second_reload_is_refused(make_pool: Any, models_dir: Path, gate: Gate) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL=write_model(models_dir, 1), TORCHPOOL_WORKERS=1)
    pool.start(app=app)
    write_model(models_dir, 2, gate=gate)
    outcome: dict[str, Any] = {}
    first = threading.Thread(target=lambda: outcome.update(first=pool.reload(app=app)))
    first.start()
    assert wait_until(lambda: pool.status(app=app)["reloading"], timeout=10)
    with pytest.raises(ReloadError, match="in progress"):
        pool.reload(app=app)
    assert answer(pool) == 1.0   # the old version serves while the new one loads
    release_until_done(gate, first)
    assert outcome["first"]["default"]["generation"] == 2
    assert answer(pool) == 2.0


# --- crashes and shutdown during a reload --------------------------------------------------------------


def test_old_worker_that_dies_mid_reload_is_replaced_by_the_new_version(
        make_pool: Any, models_dir: Path, gate: Gate) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL=write_model(models_dir, 1), TORCHPOOL_WORKERS=2)
    pool.start(app=app)
    write_model(models_dir, 2, gate=gate)
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(v=pool.reload(app=app)))
    thread.start()
    # One new worker loads (surge 1) while both old ones serve; kill the old worker not being replaced.
    assert wait_until(lambda: sum(1 for g, _, inc in worker_generations(app) if inc) == 1, timeout=20)
    status = pool.status(app=app)["workers"]
    victim = [w["pid"] for w in status if w["generation"] == 1][-1]
    os.kill(victim, signal.SIGKILL)
    # Its slot is not respawned with the old version: a second new worker starts at once.
    assert wait_until(lambda: sum(1 for g, _, inc in worker_generations(app) if inc) == 2, timeout=20)
    assert all(g == 2 for g, _, inc in worker_generations(app) if inc)
    release_until_done(gate, thread)   # both new workers wait at the gate
    assert outcome["v"]["default"]["generation"] == 2
    assert worker_generations(app) == [(2, "ready", False)] * 2
    assert answer(pool) == 2.0


def test_shutdown_during_a_reload_stops_both_versions(make_pool: Any, models_dir: Path, gate: Gate) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL=write_model(models_dir, 1), TORCHPOOL_WORKERS=1)
    pool.start(app=app)
    write_model(models_dir, 2, gate=gate)
    errors: list[BaseException] = []

    def reload() -> None:
        try:
            pool.reload(app=app)
        except ReloadError as exc:
            errors.append(exc)

    thread = threading.Thread(target=reload)
    thread.start()
    assert wait_until(lambda: len(workers_of_this_process()) == 2, timeout=20)   # old + new loading
    pool.shutdown(app=app, drain_timeout=0)
    thread.join(60)
    assert errors and "shut down during the reload" in str(errors[0])
    gate.opened = True   # nobody waits at it any more
    assert wait_until(lambda: not workers_of_this_process() and not fork_servers(), timeout=20)


# --- several models -------------------------------------------------------------------------------------


def test_reloading_one_model_leaves_the_others(make_pool: Any, models_dir: Path) -> None:
    write_model(models_dir, 1, name="model_a")
    write_model(models_dir, 1, name="model_b")
    app, pool = make_pool(TORCHPOOL_MODEL=None, TORCHPOOL_MODELS={"a": "model_a:build", "b": "model_b:build"})
    pool.start(app=app)
    pids_b = {w["pid"] for w in pool.status(app=app)["models"]["b"]["workers"]}
    write_model(models_dir, 2, name="model_a")
    write_model(models_dir, 2, name="model_b")   # on disk, but b is not reloaded
    versions = pool.reload("a", app=app)
    assert list(versions) == ["a"] and versions["a"]["generation"] == 2
    assert answer(pool, "a") == 2.0 and answer(pool, "b") == 1.0
    assert {w["pid"] for w in pool.status(app=app)["models"]["b"]["workers"]} == pids_b
    assert pool.status(app=app)["models"]["b"]["version"]["generation"] == 1
    # No name: every model.
    versions = pool.reload(app=app)
    assert list(versions) == ["a", "b"] and answer(pool, "b") == 2.0
    with pytest.raises(ConfigError, match="no model named"):
        pool.reload("c", app=app)


# --- under HTTP load ------------------------------------------------------------------------------------


class _Load:
    """Threads that POST to the server until told to stop, recording every answer."""

    def __init__(self, url: str, threads: int) -> None:
        self.url = url
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, float, list[float]]] = []   # (sent, received, values)
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        with requests.Session() as session:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = session.post(self.url, json={"x": [0.0, 0.0, 0.0]}, timeout=60)
                    ok = r.status_code == 200
                    values = r.json()["y"] if ok else []
                    text = "" if ok else f"{r.status_code} {r.text[:300]}"
                except requests.RequestException as exc:
                    ok, values, text = False, [], repr(exc)
                with self.lock:
                    if ok:
                        self.answers.append((sent, time.monotonic(), values))
                    else:
                        self.failures.append(text)

    def count(self) -> int:
        with self.lock:
            return len(self.answers)


@pytest.fixture
def http_app(make_pool: Any, models_dir: Path,
             request: pytest.FixtureRequest) -> Iterator[tuple[Flask, str]]:
    surge = request.param
    from flask import request as flask_request
    app, pool = make_pool(TORCHPOOL_MODEL=write_model(models_dir, 1), TORCHPOOL_WORKERS=2, TESTING=False,
                          TORCHPOOL_RELOAD_SURGE=surge, TORCHPOOL_MAX_BATCH_SIZE=4,
                          TORCHPOOL_EXAMPLE_INPUT=(torch.zeros(3),))

    @app.post("/v")
    @pool.infer
    def predict(model: Any) -> Any:
        return {"y": model(torch.tensor(flask_request.get_json()["x"])).tolist()}

    pool.start(app=app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield app, f"http://127.0.0.1:{server.server_port}/v"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


@pytest.mark.parametrize("http_app", [1, 0], indirect=True, ids=["surge1", "surge0"])
def test_no_failed_call_during_a_reload_under_http_load(http_app: tuple[Flask, str], models_dir: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flask_torchpool")
    app, url = http_app
    pool = app.extensions["torchpool"].extension
    surge = app.extensions["torchpool"].configs["default"].reload_surge
    load = _Load(url, threads=4)
    for t in load.threads:
        t.start()
    assert wait_until(lambda: load.count() >= 20, timeout=30)

    # Count the worker processes while the reload runs (those of the pool's slots: the new version's
    # fork server, while it starts, looks like a worker to /proc).
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            pids = {w["pid"] for w in pool.status(app=app)["workers"] if w["pid"] is not None}
            peak[0] = max(peak[0], len(pids & workers_of_this_process()))
            sampling.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    write_model(models_dir, 2)
    pool.reload(app=app)
    returned = time.monotonic()
    seen = load.count()
    assert wait_until(lambda: load.count() >= seen + 40, timeout=60)
    load.stop.set()
    sampling.set()
    for t in [*load.threads, sampler]:
        t.join(60)

    assert load.failures == []
    for _, _, values in load.answers:
        assert len(set(values)) == 1, f"an answer from several versions: {values}"
    assert {v[0] for _, _, v in load.answers} == {1.0, 2.0}
    late = [v[0] for sent, _, v in load.answers if sent > returned]
    assert late and set(late) == {2.0}, "an answer from the old version after reload() returned"
    assert peak[0] <= 2 + surge
    # The order of the swap, from the log: surge 1 starts a new worker before an old one stops;
    # surge 0 stops an old one first.
    events = [r.getMessage() for r in caplog.records if r.name.startswith("flask_torchpool")]
    serving = next(i for i, m in enumerate(events) if "is serving" in m)
    stopped = next(i for i, m in enumerate(events) if "stopped for the reload" in m)
    assert (serving < stopped) if surge else (stopped < serving), events
    # Why it exited: because it was told to, not "sys.exit or os._exit in the model?".
    assert events[stopped].endswith("exit code 0: it stopped when the pool told it to"), events[stopped]
