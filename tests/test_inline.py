"""Inline mode (TORCHPOOL_INLINE): the model runs in the web process with the pool's API, results and
errors. Every behaviour is compared with the real pool (the shared two-worker echo pool)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import torch
from flask import Flask, request

from flask_torchpool import (
    ConfigError,
    InferenceError,
    InvalidInputError,
    ModelProxy,
    OutputError,
    PayloadTooLargeError,
    PoolClosedError,
    RemoteTraceback,
    TorchPool,
    TorchPoolError,
    WorkerStartupError,
)
from flask_torchpool.config import PoolConfig

from .conftest import child_pids, make_app

pytestmark = pytest.mark.timeout(120)


def _inline_app(**config: Any) -> tuple[Flask, TorchPool]:
    app = make_app(TORCHPOOL_INLINE=True, **config)
    pool = TorchPool(app)

    @app.post("/echo")
    @pool.infer
    def echo(model: ModelProxy) -> Any:
        return {"y": model(torch.tensor(request.json["x"])).tolist()}

    @app.post("/raise")
    @pool.infer
    def raises(model: ModelProxy) -> Any:
        return model(action="raise")

    @app.post("/object")
    @pool.infer
    def obj(model: ModelProxy) -> Any:
        return model(object())

    @app.post("/async")
    @pool.infer
    async def in_async(model: ModelProxy) -> Any:
        a, b = await asyncio.gather(model.acall(1), model.acall(2))
        return {"sum": a + b}

    return app, pool


@pytest.fixture(scope="module")
def inline_app() -> Iterator[Flask]:
    app, pool = _inline_app()
    yield app
    pool.shutdown(app=app)


def _call(app: Flask, *args: Any, **kwargs: Any) -> Any:
    with app.app_context():
        return app.extensions["torchpool"].extension(*args, **kwargs)


def _error(app: Flask, *args: Any, **kwargs: Any) -> TorchPoolError:
    with pytest.raises(TorchPoolError) as info:
        _call(app, *args, **kwargs)
    return info.value


RESULTS: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("tensor", (torch.arange(6, dtype=torch.float32).reshape(2, 3),), {}),
    ("non-contiguous", (torch.arange(12).reshape(3, 4).t(),), {}),
    ("scalars", (None, True, 3, 2.5, "s", b"b"), {"k": 1j}),
    ("structures", ([torch.ones(2), (torch.zeros(1), "x")], {"a": torch.eye(2)}), {}),
    ("empty", (torch.empty(0, 3),), {}),
]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.is_contiguous() == b.is_contiguous() and bool(torch.equal(a, b)))
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(("args", "kwargs"), [r[1:] for r in RESULTS], ids=[r[0] for r in RESULTS])
def test_same_results_as_the_pool(inline_app: Flask, echo_app: Flask, args: tuple, kwargs: dict) -> None:
    inline, pooled = _call(inline_app, *args, **kwargs), _call(echo_app, *args, **kwargs)
    assert _same(inline, pooled), (inline, pooled)


ERRORS: list[tuple[str, Callable[[], tuple[tuple, dict]], type[TorchPoolError]]] = [
    ("model raises", lambda: ((), {"action": "raise"}), InferenceError),
    ("unsupported output", lambda: ((), {"action": "unpicklable"}), OutputError),
    ("unsupported input", lambda: ((object(),), {}), InvalidInputError),
    ("set input", lambda: (({1, 2},), {}), InvalidInputError),
    ("input requires grad", lambda: ((torch.ones(2, requires_grad=True),), {}), InvalidInputError),
    ("sparse input", lambda: ((torch.eye(2).to_sparse(),), {}), InvalidInputError),
]


@pytest.mark.parametrize(("make", "cls"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_same_errors_as_the_pool(inline_app: Flask, echo_app: Flask, make: Callable[[], tuple[tuple, dict]],
                                 cls: type[TorchPoolError]) -> None:
    args, kwargs = make()
    inline, pooled = _error(inline_app, *args, **kwargs), _error(echo_app, *args, **kwargs)
    assert type(inline) is type(pooled) is cls
    assert str(inline) == str(pooled)
    assert getattr(inline, "code", None) == getattr(pooled, "code", None)
    assert getattr(inline, "extra", None) == getattr(pooled, "extra", None)
    assert type(inline.__cause__) is type(pooled.__cause__)


def test_model_error_carries_the_traceback(inline_app: Flask) -> None:
    err = _error(inline_app, action="raise")
    assert isinstance(err, InferenceError) and err.remote_type == "ValueError"
    assert "bad shape: expected 4 features, got 3" in str(err)
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "ValueError: bad shape" in err.__cause__.tb and "tests/models.py" in err.__cause__.tb
    assert err.__context__ is None  # no frames of the model kept alive


def test_inputs_and_outputs_are_copies(inline_app: Flask) -> None:
    x = torch.arange(4.0)
    y = _call(inline_app, x)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
    y += 1
    assert torch.equal(x, torch.arange(4.0))
    # Ordinary tensors, as the pool's are: usable with autograd outside inference_mode.
    assert not torch.is_inference(y) and not y.requires_grad
    (y.clone().requires_grad_() * 2).sum().backward()


def test_payload_limit(inline_app: Flask) -> None:
    app, pool = _inline_app(TORCHPOOL_MAX_INPUT_BYTES=1024)
    with app.app_context(), pytest.raises(PayloadTooLargeError, match="TORCHPOOL_MAX_INPUT_BYTES=1024"):
        pool(torch.zeros(1025, dtype=torch.uint8))
    pool.shutdown(app=app)


def test_views_and_http_errors(inline_app: Flask) -> None:
    client = inline_app.test_client()
    assert client.post("/echo", json={"x": [1, 2]}).json == {"y": [1, 2]}
    response = client.post("/raise")
    assert response.status_code == 500 and response.json["type"] == "InferenceError"
    response = client.post("/object")
    assert response.status_code == 400 and response.json["type"] == "InvalidInputError"
    assert client.post("/async").json == {"sum": 3}


def test_submit_returns_a_done_future(inline_app: Flask) -> None:
    with inline_app.app_context():
        pool = inline_app.extensions["torchpool"].extension
        future = pool.submit(torch.ones(3))
        assert future.done() and torch.equal(future.result(), torch.ones(3))
        failed = pool.submit(action="raise")
        assert isinstance(failed.exception(), InferenceError)
        with pytest.raises(InvalidInputError):  # refused in the calling thread, as by the pool
            pool.submit(object())


def test_only_a_proxy_call_promises_to_wait_for_its_result(inline_app: Flask,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Note [Claimed lanes]: ModelProxy.__call__ calls result() right after submit, so it says so (the
    # attached client then reads the answer in that thread); submit() and acall() leave it to others.
    backend = inline_app.extensions["torchpool"].pool_for_call("default")
    waiters: list[bool] = []
    real_submit = backend.submit

    def submit(*args: Any, waiter: bool = False, **kwargs: Any) -> Any:
        waiters.append(waiter)
        return real_submit(*args, waiter=waiter, **kwargs)

    monkeypatch.setattr(backend, "submit", submit)
    with inline_app.app_context():
        model = inline_app.extensions["torchpool"].extension.model()
        assert torch.equal(model(torch.ones(2)), torch.ones(2))
        assert torch.equal(model.submit(torch.ones(2)).result(), torch.ones(2))
        assert torch.equal(asyncio.run(model.acall(torch.ones(2))), torch.ones(2))
    assert waiters == [True, False, False]


def test_no_subprocess_and_calls_run_one_at_a_time(inline_app: Flask) -> None:
    before = child_pids()
    results: list[dict[str, float]] = []

    def call() -> None:
        results.append(_call(inline_app, action="spin", seconds=0.2))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and child_pids() == before
    spans = sorted((r["start"], r["end"]) for r in results)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert {r["pid"] for r in results} == {os.getpid()}


def test_timeouts_are_not_enforced(inline_app: Flask) -> None:
    with inline_app.app_context():
        pool = inline_app.extensions["torchpool"].extension
        assert pool.model(timeout=0.01)(action="sleep", seconds=0.1) == {"args": (), "kwargs": {}}


def test_model_builds_on_first_use_and_status() -> None:
    app, pool = _inline_app()
    with app.app_context():
        status = pool.status()
        assert status["inline"] is True and status["started"] is False
        assert [w["state"] for w in status["workers"]] == ["not started"]
        assert len(pool.plan) == 1 and pool.plan[0].device == "cpu"
        assert torch.equal(pool(torch.ones(1)), torch.ones(1))
        status = pool.status()
    assert status["ready"] is True and status["queued"] == 0 and status["arena_bytes"] == 0
    (worker,) = status["workers"]
    assert worker["state"] == "ready" and worker["pid"] == os.getpid()
    assert worker["calls"] == 1 and worker["errors"] == 0
    assert status["metrics"]["calls"]["ok"] == 1 and status["counters"]["ok"] == 1
    pool.shutdown(app=app)
    with app.app_context():
        assert pool.status()["workers"][0]["state"] == "stopped"
        with pytest.raises(PoolClosedError):
            pool(torch.ones(1))


def test_eager_start_builds_the_model_in_init_app() -> None:
    app, pool = _inline_app(TORCHPOOL_START="eager")
    with app.app_context():
        assert pool.status()["ready"] is True
    pool.shutdown(app=app)


def test_startup_failure_is_a_worker_startup_error() -> None:
    app, pool = _inline_app(TORCHPOOL_MODEL="tests.models:failing")
    with app.app_context():
        with pytest.raises(WorkerStartupError, match="the weights file is corrupt") as info:
            pool(torch.ones(1))
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "RuntimeError: the weights file is corrupt" in info.value.__cause__.tb
        with pytest.raises(WorkerStartupError):  # not rebuilt on every call
            pool(torch.ones(1))
        assert "the weights file is corrupt" in pool.status()["error"]
        with pytest.raises(WorkerStartupError):  # an explicit start() tries again
            pool.start()
    response = app.test_client().post("/echo", json={"x": [1]})
    assert response.status_code == 503 and response.json["type"] == "WorkerStartupError"


def test_inline_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="TORCHPOOL_INLINE"):
        PoolConfig.from_mapping({"TORCHPOOL_MODEL": "tests.models:echo", "TORCHPOOL_INLINE": "yes"})
