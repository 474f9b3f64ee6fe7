"""Fault injection against real worker processes: what the caller sees, and that the pool serves on.

A loky-style matrix: the model raises, exits, is killed (from inside and from outside), segfaults, is
frozen, hangs, returns something that cannot travel, fails to load (at start and on respawn); the input
cannot travel or is too large; the queue is full. Every case checks the exception class and message, the
HTTP answer of a ``@pool.infer`` view (status, JSON body, ``Retry-After``) and that the next call works.

Calls are steered with :class:`tests.crash_models.Probe`: ``mark=`` tells the test that a call is running
and in which worker, ``hold=`` keeps it running until the test opens the gate, so no test guesses with a
sleep. Destructive cases make their own pool (``make_pool`` checks that no process or /dev/shm entry
outlives it); the non-destructive ones share one module-scoped pool.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from flask import Flask

from flask_torchpool import (
    ConfigError,
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    OutputError,
    PayloadTooLargeError,
    PoolClosedError,
    PoolOverloadedError,
    RemoteTraceback,
    TorchPool,
    WorkerCrashedError,
    WorkerStartupError,
)
from tests.conftest import child_pids, make_app, pid_alive, shm_entries, wait_until
from tests.crash_models import (
    PROBE,
    add_views,
    assert_http_error,
    jsonable,
    leaked_shm,
    open_gate,
    started,
    wait_ready,
    wait_started,
)

X = [1.0, 2.0]


def x() -> torch.Tensor:
    return torch.tensor(X)


# --- one shared pool for the cases that leave the worker running --------------------------------------

MAX_INPUT_BYTES = 1024


def bad_input(kind: str) -> Any:
    if kind == "too_large":
        return torch.zeros(MAX_INPUT_BYTES // 4 + 1)  # float32: 4 bytes over the limit
    if kind == "requires_grad":
        return torch.ones(2, requires_grad=True)
    if kind == "sparse":
        return torch.eye(2).to_sparse()
    if kind == "meta":
        return torch.empty(2, device="meta")
    if kind == "object":
        return object()
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def quiet() -> Iterator[tuple[Flask, TorchPool]]:
    """One worker, one call at a time, at most two calls queued, 1 KiB of input per call."""
    before_children, before_shm = child_pids(), shm_entries()
    app = make_app(TORCHPOOL_MODEL=PROBE, TORCHPOOL_PIPELINE_DEPTH=1, TORCHPOOL_MAX_QUEUE=2,
                   TORCHPOOL_MAX_INPUT_BYTES=MAX_INPUT_BYTES)
    pool = TorchPool(app)
    add_views(app, pool, short_timeout=0.5)

    @app.post("/bad/<kind>")
    @pool.infer
    def bad(model: Any, kind: str) -> dict[str, Any]:
        return {"out": jsonable(model(bad_input(kind)))}

    yield app, pool
    pool.shutdown(app=app)
    assert wait_until(lambda: not (child_pids() - before_children), timeout=10), \
        f"worker processes outlived their pool: {child_pids() - before_children}"
    assert not leaked_shm(before_shm), f"/dev/shm entries leaked: {leaked_shm(before_shm)}"


@pytest.fixture
def idle(quiet: tuple[Flask, TorchPool]) -> tuple[Flask, TorchPool, int]:
    """The shared pool, checked idle and unharmed by earlier tests; with its worker's pid."""
    app, pool = quiet

    def is_idle() -> bool:
        st = pool.status(app)
        return st["queued"] == 0 and all(w["inflight"] == 0 for w in st["workers"])

    assert wait_until(is_idle, timeout=30), pool.status(app)
    [pid] = wait_ready(pool, app)
    return app, pool, pid


def assert_same_worker_serves(app: Flask, pool: TorchPool, pid: int) -> None:
    with app.app_context():
        assert pool(x(), action="pid") == pid
    assert app.test_client().post("/run", json={"action": "pid"}).get_json() == {"out": pid}
    [worker] = pool.status(app)["workers"]
    assert (worker["pid"], worker["state"], worker["restarts"]) == (pid, "ready", 0)


@pytest.mark.timeout(120)
def test_model_raises(idle: tuple[Flask, TorchPool, int]) -> None:
    app, pool, pid = idle
    with app.app_context():
        with pytest.raises(InferenceError) as info:
            pool(x(), action="raise")
    err = info.value
    assert type(err) is InferenceError
    assert str(err) == "the model raised ValueError: bad shape: expected 4 features, got 3"
    assert err.remote_type == "ValueError"
    assert isinstance(err.__cause__, RemoteTraceback)
    tb = err.__cause__.tb
    assert tb.startswith("Traceback (most recent call last):")
    assert os.path.join("tests", "models.py") in tb
    assert 'raise ValueError("bad shape: expected 4 features, got 3")' in tb
    assert tb.rstrip().endswith("ValueError: bad shape: expected 4 features, got 3")

    body = assert_http_error(app.test_client().post("/run", json={"action": "raise"}), 500, InferenceError,
                             "ValueError: bad shape: expected 4 features, got 3")
    assert body["remote_type"] == "ValueError"
    assert_same_worker_serves(app, pool, pid)


@pytest.mark.timeout(120)
def test_unpicklable_output(idle: tuple[Flask, TorchPool, int]) -> None:
    app, pool, pid = idle
    with app.app_context():
        with pytest.raises(OutputError) as info:
            pool(x(), action="unpicklable")
    assert isinstance(info.value, InferenceError)
    message = str(info.value)
    assert "the model returned a builtins.object, which cannot travel back" in message
    assert "allowed are tensors" in message

    assert_http_error(app.test_client().post("/run", json={"action": "unpicklable"}), 500, OutputError,
                      "builtins.object")
    assert_same_worker_serves(app, pool, pid)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, exc_type, status, fragments", [
    ("too_large", PayloadTooLargeError, 413,
     (f"{MAX_INPUT_BYTES + 4} bytes of tensors", f"TORCHPOOL_MAX_INPUT_BYTES={MAX_INPUT_BYTES}")),
    ("requires_grad", InvalidInputError, 400, ("args[0]", "requires grad", "tensor.detach()")),
    ("sparse", InvalidInputError, 400, ("args[0]", "sparse_coo tensor cannot travel", ".to_dense()")),
    ("meta", InvalidInputError, 400, ("args[0]", "a meta tensor has no data to send")),
    ("object", InvalidInputError, 400, ("args[0]", "builtins.object cannot travel")),
])
def test_input_refused_in_calling_thread(idle: tuple[Flask, TorchPool, int], kind: str, exc_type: type,
                                         status: int, fragments: tuple[str, ...]) -> None:
    app, pool, pid = idle
    before = pool.status(app)
    with app.app_context():
        with pytest.raises(exc_type) as info:
            pool.submit(bad_input(kind))  # raises here: no future, nothing queued
    assert type(info.value) is exc_type
    for fragment in fragments:
        assert fragment in str(info.value)
    assert_http_error(app.test_client().post(f"/bad/{kind}"), status, exc_type, *fragments)

    after = pool.status(app)
    assert after["counters"]["calls"] == before["counters"]["calls"], "a refused call reached the pool"
    assert after["workers"][0]["calls"] == before["workers"][0]["calls"]
    assert_same_worker_serves(app, pool, pid)


@pytest.mark.timeout(120)
def test_overload_refuses_at_once(idle: tuple[Flask, TorchPool, int], tmp_path: Any) -> None:
    app, pool, pid = idle
    client = app.test_client()
    with app.app_context():
        running = pool.submit(x(), mark=str(tmp_path), hold=str(tmp_path))
        queued = [pool.submit(x(), action="pid") for _ in range(2)]
        try:
            with pytest.raises(PoolOverloadedError) as info:
                pool.submit(x())
            assert "2 calls are already waiting (TORCHPOOL_MAX_QUEUE=2)" in str(info.value)
            assert info.value.retry_after == 1
            assert_http_error(client.post("/run", json={}), 503, PoolOverloadedError,
                              "TORCHPOOL_MAX_QUEUE=2", retry_after=1)
            st = pool.status(app)
            assert st["queued"] == 2
            assert st["counters"]["overloaded"] >= 2
        finally:
            open_gate(tmp_path)
        assert running.result(timeout=60)["pid"] == pid
        assert [f.result(timeout=60) for f in queued] == [pid, pid]
    assert_same_worker_serves(app, pool, pid)


@pytest.mark.timeout(120)
def test_timeout_while_queued_spares_the_busy_worker(idle: tuple[Flask, TorchPool, int],
                                                     tmp_path: Any) -> None:
    app, pool, pid = idle
    with app.app_context():
        running = pool.submit(x(), mark=str(tmp_path), hold=str(tmp_path))
        try:
            with pytest.raises(InferenceTimeoutError) as info:
                pool.model(timeout=0.5)(x())
            assert "it was waiting for a worker" in str(info.value)
            assert_http_error(app.test_client().post("/short", json={}), 504, InferenceTimeoutError,
                              "it was waiting for a worker")
            # The worker is busy with a call that is within its deadline: it must not be killed.
            assert wait_started(tmp_path) == {pid}
            assert not running.done()
            assert pid_alive(pid)
        finally:
            open_gate(tmp_path)
        assert running.result(timeout=60)["pid"] == pid
    assert_same_worker_serves(app, pool, pid)


# --- crashes: each with its own pool --------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("action, exitcode, signame, cause", [
    pytest.param("exit", 7, None, "the worker process exited (sys.exit or os._exit in the model?)",
                 id="os._exit"),
    pytest.param("sigkill", -9, "SIGKILL", "probably the out-of-memory killer", id="SIGKILL"),
    pytest.param("segv", -11, "SIGSEGV", "a native crash in the model", id="SIGSEGV"),
])
def test_crash_without_retries(make_pool: Any, action: str, exitcode: int, signame: str | None,
                               cause: str) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL=PROBE, TORCHPOOL_RETRIES=0)
    add_views(app, pool)
    client = app.test_client()
    [pid] = wait_ready(pool, app)

    with app.app_context():
        with pytest.raises(WorkerCrashedError) as info:
            pool(x(), action=action)
    err = info.value
    assert (err.pid, err.exitcode, err.signal, err.retry_after) == (pid, exitcode, signame, 1)
    message = str(err)
    assert f"worker 0 (pid {pid}) died while running this call" in message
    assert f"exit code {exitcode}" + (f" ({signame})" if signame else "") in message
    assert cause in message
    assert wait_until(lambda: not pid_alive(pid), timeout=30)

    [pid2] = wait_ready(pool, app, exclude={pid})
    with app.app_context():
        assert pool(x(), action="pid") == pid2

    body = assert_http_error(client.post("/run", json={"action": action}), 503, WorkerCrashedError,
                             f"(pid {pid2})", f"exit code {exitcode}", cause, retry_after=1)
    assert (body["pid"], body["exitcode"], body["signal"]) == (pid2, exitcode, signame)
    [pid3] = wait_ready(pool, app, exclude={pid, pid2})
    assert client.post("/run", json={"action": "pid"}).get_json() == {"out": pid3}

    st = pool.status(app)
    assert st["counters"]["crashes"] == 2
    assert st["workers"][0]["restarts"] == 2
    assert cause in st["workers"][0]["last_exit"]


@pytest.mark.timeout(180)
def test_poison_call_fails_after_one_retry(make_pool: Any) -> None:
    """TORCHPOOL_RETRIES=1, 2 workers: a call that kills every worker fails after exactly 2 deaths."""
    app, pool = make_pool(TORCHPOOL_MODEL=PROBE, TORCHPOOL_WORKERS=2, TORCHPOOL_RETRIES=1)
    add_views(app, pool)
    pids = wait_ready(pool, app)

    with app.app_context():
        with pytest.raises(WorkerCrashedError) as info:
            pool(x(), action="sigkill")
    assert info.value.signal == "SIGKILL"
    assert info.value.pid in pids
    assert "probably the out-of-memory killer" in str(info.value)
    for pid in pids:  # the retry ran on the other worker, which died too
        assert wait_until(lambda pid=pid: not pid_alive(pid), timeout=30), pid
    pids2 = wait_ready(pool, app, exclude=set(pids))
    st = pool.status(app)
    assert [w["restarts"] for w in st["workers"]] == [1, 1]
    assert (st["counters"]["retries"], st["counters"]["crashes"]) == (1, 1)

    assert_http_error(app.test_client().post("/run", json={"action": "sigkill"}), 503, WorkerCrashedError,
                      "(SIGKILL)", retry_after=1)
    pids3 = wait_ready(pool, app, exclude=set(pids) | set(pids2))
    st = pool.status(app)
    assert [w["restarts"] for w in st["workers"]] == [2, 2]
    assert (st["counters"]["retries"], st["counters"]["crashes"]) == (2, 2)
    with app.app_context():
        assert pool(x(), action="pid") in pids3


@pytest.mark.timeout(180)
def test_call_on_worker_killed_from_outside_is_retried(make_pool: Any, tmp_path: Any) -> None:
    """TORCHPOOL_RETRIES=1: kill -9 the worker running a call; the call runs again on the other worker
    (from the start: it waits at the gate again) and succeeds there."""
    app, pool = make_pool(TORCHPOOL_MODEL=PROBE, TORCHPOOL_WORKERS=2, TORCHPOOL_RETRIES=1)
    add_views(app, pool)
    pids = wait_ready(pool, app)

    with app.app_context():
        future = pool.submit(x(), mark=str(tmp_path), hold=str(tmp_path))
    try:
        [victim] = wait_started(tmp_path)
        assert victim in pids
        [other] = set(pids) - {victim}
        os.kill(victim, signal.SIGKILL)
        # The retry starts on the healthy worker, not on the victim's replacement.
        assert wait_until(lambda: other in started(tmp_path), timeout=60), started(tmp_path)
        assert started(tmp_path) == {victim, other}
        assert not future.done()
    finally:
        open_gate(tmp_path)
    result = future.result(timeout=60)
    assert result["pid"] == other
    assert torch.equal(result["out"], x())

    st = pool.status(app)
    assert (st["counters"]["retries"], st["counters"]["crashes"], st["counters"]["errors"]) == (1, 0, 0)
    assert wait_until(lambda: not pid_alive(victim), timeout=30)
    new = wait_ready(pool, app, exclude={victim})
    assert other in new
    assert sum(w["restarts"] for w in pool.status(app)["workers"]) == 1
    resp = app.test_client().post("/run", json={"x": [3.0]})
    assert resp.status_code == 200 and resp.get_json() == {"out": [3.0]}


# --- frozen and hung workers ----------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("when", ["mid_call", "idle"])
def test_frozen_worker_times_out_and_is_replaced(make_pool: Any, tmp_path: Any, when: str) -> None:
    """SIGSTOP the worker (while it runs a call, or while it waits for one): the call fails with 504 at
    its deadline, the frozen worker is killed and replaced, the next call is served."""
    app, pool = make_pool(TORCHPOOL_MODEL=PROBE, TORCHPOOL_TIMEOUT=3.0)
    add_views(app, pool)
    client = app.test_client()
    [pid] = wait_ready(pool, app)

    with ThreadPoolExecutor(1) as executor:
        if when == "mid_call":
            answer = executor.submit(client.post, "/run", json={"mark": str(tmp_path),
                                                                "hold": str(tmp_path)})
            assert wait_started(tmp_path) == {pid}
            os.kill(pid, signal.SIGSTOP)
        else:
            os.kill(pid, signal.SIGSTOP)
            answer = executor.submit(client.post, "/run", json={})
        # The manager fails the call at its 3 s deadline; the view would give up 5 s after that.
        resp = answer.result(timeout=60)
    assert_http_error(resp, 504, InferenceTimeoutError, "did not finish within its deadline",
                      "it was in a worker")

    assert wait_until(lambda: not pid_alive(pid), timeout=30), \
        f"the frozen worker {pid} was not killed: {pool.status(app)['workers']}"
    [new] = wait_ready(pool, app, exclude={pid})
    with app.app_context():
        assert pool(x(), action="pid") == new
    assert "ran past its deadline" in pool.status(app)["workers"][0]["last_exit"]


@pytest.mark.timeout(180)
def test_hung_model_with_view_timeout(make_pool: Any) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL=PROBE)
    add_views(app, pool, short_timeout=2.0)
    client = app.test_client()
    [pid] = wait_ready(pool, app)

    resp = client.post("/short", json={"action": "sleep", "seconds": 3600})
    assert_http_error(resp, 504, InferenceTimeoutError, "did not finish within its deadline",
                      "it was in a worker")
    assert wait_until(lambda: not pid_alive(pid), timeout=30), "the hung worker was not killed"
    [new] = wait_ready(pool, app, exclude={pid})
    assert "ran past its deadline" in pool.status(app)["workers"][0]["last_exit"]
    assert client.post("/short", json={"action": "pid"}).get_json() == {"out": new}


# --- models that fail to load ---------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_factory_failing_on_respawn_is_throttled(make_pool: Any, monkeypatch: Any, tmp_path: Any) -> None:
    """The model loads once, then every respawn fails. With TORCHPOOL_MAX_RESTARTS=1 the slot gives up
    after 2 deaths (the crash and one failed respawn), is 'failed' for TORCHPOOL_RESTART_WINDOW, then
    tries once more with the same budget: no busy respawn loop, and callers get a clear 503."""
    # Longer than two spawns on a loaded 2-core machine, else deaths fall out of the window; not whole, so
    # that Retry-After shows it rounded up (int() made a window of 0.5 s a 'Retry-After: 0').
    window = 10.5
    monkeypatch.setenv("TORCHPOOL_TEST_MARKER", str(tmp_path / "loaded-once"))
    before_children = child_pids()
    app, pool = make_pool(TORCHPOOL_MODEL="tests.models:fail_in_worker_after_first",
                          TORCHPOOL_RETRIES=0, TORCHPOOL_MAX_RESTARTS=1,
                          TORCHPOOL_RESTART_WINDOW=window)
    add_views(app, pool)
    client = app.test_client()
    [pid] = wait_ready(pool, app)

    with app.app_context():
        with pytest.raises(WorkerCrashedError, match="exit code 7"):
            pool(x(), action="exit")
        # Queued while the slot respawns; failed (not left to its 60 s deadline) once the budget is spent.
        waiting = pool.submit(x())

    def worker() -> dict[str, Any]:
        return pool.status(app)["workers"][0]

    assert wait_until(lambda: worker()["state"] == "failed", timeout=90), worker()
    failed_at = time.monotonic()
    w = worker()
    assert w["restarts"] == 2
    assert "exit code 3" in w["last_exit"] and "its model failed to load" in w["last_exit"]
    assert not (child_pids() - before_children), "a worker process runs while the slot is failed"

    err = waiting.exception(timeout=60)
    assert isinstance(err, PoolClosedError) and "no worker is left to serve" in str(err)
    with app.app_context():
        with pytest.raises(PoolClosedError) as info:
            pool(x())
    assert f"more than TORCHPOOL_MAX_RESTARTS=1 times within {window:g}s" in str(info.value)
    assert_http_error(client.post("/run", json={}), 503, PoolClosedError, "no worker is left to serve",
                      f"TORCHPOOL_MAX_RESTARTS=1 times within {window:g}s", retry_after=math.ceil(window))

    # No respawn before the window is over; then one more round within the same budget, failed again.
    assert wait_until(lambda: worker()["restarts"] >= 3, timeout=window + 90), worker()
    assert time.monotonic() - failed_at >= window - 0.5, "respawned before TORCHPOOL_RESTART_WINDOW"
    assert wait_until(lambda: worker()["state"] == "failed" and worker()["restarts"] >= 4,
                      timeout=90), worker()
    assert worker()["restarts"] == 4
    assert not (child_pids() - before_children)
    assert_http_error(client.post("/run", json={}), 503, PoolClosedError, "no worker is left to serve",
                      retry_after=math.ceil(window))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("model, workers, fragments, tb_fragments", [
    pytest.param("tests.models:failing", 2,
                 ("could not load the model ('tests.models:failing')",
                  "RuntimeError: the weights file is corrupt"),
                 ("Traceback (most recent call last):", "in failing",
                  'raise RuntimeError("the weights file is corrupt")'),
                 id="factory-raises"),
    pytest.param("nope.nothing:x", 1,
                 ("could not load the model ('nope.nothing:x')", "ModuleNotFoundError",
                  "No module named 'nope'"),
                 ("Traceback (most recent call last):", "ModuleNotFoundError: No module named 'nope'"),
                 id="bad-import-path"),
])
def test_startup_failure(model: str, workers: int, fragments: tuple[str, ...],
                         tb_fragments: tuple[str, ...]) -> None:
    before_children, before_shm = child_pids(), shm_entries()
    app = make_app(TORCHPOOL_MODEL=model, TORCHPOOL_WORKERS=workers)
    pool = TorchPool()
    add_views(app, pool)
    try:
        with pytest.raises(WorkerStartupError) as info:
            pool.init_app(app)
        for fragment in fragments:
            assert fragment in str(info.value)
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        for fragment in tb_fragments:
            assert fragment in cause.tb
        assert wait_until(lambda: not (child_pids() - before_children), timeout=10), \
            f"workers outlived the failed start: {child_pids() - before_children}"

        # Calls get the start-up error (without spawning again), as a 503.
        assert_http_error(app.test_client().post("/run", json={}), 503, WorkerStartupError, *fragments)
        with app.app_context():
            with pytest.raises(WorkerStartupError):
                pool(x())
        assert not (child_pids() - before_children)
    finally:
        pool.shutdown(app=app)
    assert not leaked_shm(before_shm)


@pytest.mark.timeout(30)
def test_missing_model_file(make_pool: Any, tmp_path: Any) -> None:
    before_children = child_pids()
    missing = tmp_path / "missing.pt"
    with pytest.raises(ConfigError) as info:
        make_pool(TORCHPOOL_MODEL=str(missing))
    assert isinstance(info.value, ValueError)
    assert info.value.key == "TORCHPOOL_MODEL"
    assert str(info.value).startswith("TORCHPOOL_MODEL: ")
    assert f"model file {str(missing)!r} does not exist" in str(info.value)
    assert not (child_pids() - before_children)
