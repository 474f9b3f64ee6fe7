"""The public API: init_app, @pool.infer (both forms), URL variables, submit/Future, async views,
error responses and their overrides, lazy start, pools on two apps."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
import torch
from flask import Flask, jsonify, request

from flask_torchpool import InferenceTimeoutError, ModelProxy, TorchPool, WorkerStartupError

from .conftest import make_app

pytestmark = pytest.mark.timeout(120)

api = TorchPool()


def create_app() -> Flask:
    """An app factory, as users write it."""
    app = make_app(TORCHPOOL_WORKERS=2)

    @app.post("/echo")
    @api.infer
    def echo(model: ModelProxy):
        return {"y": model(torch.tensor(request.json["x"])).tolist()}

    @app.get("/items/<int:item>/<name>")
    @api.infer(timeout=30)
    def item(model: ModelProxy, item: int, name: str):
        assert model.timeout == 30
        return {"out": model(item, name=name)}

    @app.post("/raise")
    @api.infer
    def raises(model: ModelProxy):
        return model(action="raise")

    @app.post("/slow")
    @api.infer(timeout=0.5)
    def slow(model: ModelProxy):
        return model(action="sleep", seconds=float(request.args.get("s", 0.01)))

    @app.post("/object")
    @api.infer
    def obj(model: ModelProxy):
        return model(object())

    @app.post("/async")
    @api.infer
    async def in_async(model: ModelProxy):
        a, b = await asyncio.gather(model.acall(1), model.acall(2))
        return {"sum": a + b}

    api.init_app(app)
    return app


@pytest.fixture(scope="module")
def app() -> Iterator[Flask]:
    app = create_app()
    yield app
    api.shutdown(app=app)


def test_state_lives_in_app_extensions(app: Flask) -> None:
    state = app.extensions["torchpool"]
    assert state.extension is api
    assert not hasattr(api, "app")


def test_view_gets_a_proxy_and_json(client) -> None:
    r = client.post("/echo", json={"x": [1.0, 2.0]})
    assert r.status_code == 200 and r.json == {"y": [1.0, 2.0]}


def test_url_variables_follow_the_proxy(client) -> None:
    r = client.get("/items/7/bob")
    assert r.status_code == 200
    assert r.json == {"out": {"args": [7], "kwargs": {"name": "bob"}}}


def test_decorator_keeps_name_and_hides_proxy_in_signature(app: Flask) -> None:
    view = app.view_functions["item"]
    assert view.__name__ == "item"
    assert list(inspect.signature(view).parameters) == ["item", "name"]


def test_model_error_is_json_500_and_worker_survives(client) -> None:
    r = client.post("/raise")
    assert r.status_code == 500
    assert r.json["type"] == "InferenceError"
    assert "bad shape: expected 4 features, got 3" in r.json["error"]
    assert r.json["remote_type"] == "ValueError"
    assert client.post("/echo", json={"x": [3.0]}).json == {"y": [3.0]}


def test_bad_input_is_json_400(client) -> None:
    r = client.post("/object")
    assert r.status_code == 400
    assert r.json["type"] == "InvalidInputError" and "builtins.object" in r.json["error"]


def test_async_view(client) -> None:
    r = client.post("/async")
    assert r.status_code == 200 and r.json == {"sum": 3}


def test_submit_returns_future_and_blocking_call(app: Flask) -> None:
    with app.app_context():
        fut = api.submit(torch.ones(3))
        assert isinstance(fut, Future)
        assert torch.equal(fut.result(30), torch.ones(3))
        assert api(5) == 5
        assert api.model(timeout=10)("a") == "a"
    # Outside an app context the only registered app is used.
    assert api("outside") == "outside"


def test_futures_from_many_threads(app: Flask) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with app.app_context():
        proxy = api.model()
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: proxy(torch.full((10,), float(i))), range(64)))
    assert all(bool((r == i).all()) for i, r in enumerate(results))


def test_errorhandler_overrides_json(app: Flask) -> None:
    # A separate app: handlers must be registered before the first request.
    other = TorchPool()
    app2 = make_app(TORCHPOOL_START="lazy")

    @app2.errorhandler(InferenceTimeoutError)
    def on_timeout(exc: InferenceTimeoutError):
        return jsonify(custom=True, why=str(exc)), 599

    @app2.post("/slow")
    @other.infer(timeout=0.3)
    def slow(model: ModelProxy):
        return model(action="sleep", seconds=0.01)

    other.init_app(app2)
    with app2.test_client() as c:
        # the mapping is by class: trigger by raising the error directly in a view
        @app2.get("/raise-timeout")
        def raise_timeout():
            raise InferenceTimeoutError("too slow")

        r = c.get("/raise-timeout")
        assert r.status_code == 599 and r.json == {"custom": True, "why": "too slow"}
    other.shutdown(app=app2)


def test_timeout_error_renders_504_with_json_by_default() -> None:
    app = Flask("render")
    app.config["TORCHPOOL_ERROR_DETAILS"] = True  # issue 11: a 5xx body shows its message on request

    @app.get("/t")
    def t():
        raise InferenceTimeoutError("deadline passed")

    r = app.test_client().get("/t")
    assert r.status_code == 504
    body = dict(r.json)
    assert len(body.pop("error_id")) == 32  # issue 11: every 5xx body carries the id of its log line
    assert body == {"error": "deadline passed", "type": "InferenceTimeoutError"}


def test_lazy_start_and_start_failure_is_remembered(make_pool) -> None:
    app, pool = make_pool(TORCHPOOL_START="lazy", TORCHPOOL_MODEL="tests.models:failing")
    assert app.extensions["torchpool"].pool is None  # nothing started yet
    with app.app_context():
        with pytest.raises(WorkerStartupError, match="the weights file is corrupt") as first:
            pool(1)
        assert "the weights file is corrupt" in str(first.value.__cause__)
        with pytest.raises(WorkerStartupError) as second:  # not respawned on every call
            pool(1)
        assert second.value is first.value
        # Issue 11, item 6: both calls the failed start refused are counted, as startup_failed.
        assert pool.status()["models"]["default"]["metrics"]["calls"]["startup_failed"] == 2


def test_lazy_start_on_first_request(make_pool) -> None:
    app, pool = make_pool(TORCHPOOL_START="lazy")

    @app.get("/pid")
    @pool.infer
    def pid(model: ModelProxy):
        return {"pid": model(action="pid")}

    r = app.test_client().get("/pid")
    assert r.status_code == 200 and isinstance(r.json["pid"], int)


def test_one_extension_two_apps(make_pool) -> None:
    ext = TorchPool()
    a, b = make_app(TORCHPOOL_START="lazy"), make_app(TORCHPOOL_START="lazy")
    ext.init_app(a)
    ext.init_app(b)
    try:
        with a.app_context():
            pid_a = ext(action="pid")
        with b.app_context():
            pid_b = ext(action="pid")
        assert pid_a != pid_b
        with pytest.raises(RuntimeError, match="registered on 2 apps"):
            ext(1)
    finally:
        ext.shutdown()


def test_start_after_shutdown_makes_a_new_pool(make_pool) -> None:
    from flask_torchpool import PoolClosedError

    app, pool = make_pool()
    with app.app_context():
        first = pool(action="pid")
        pool.shutdown()
        with pytest.raises(PoolClosedError, match="call TorchPool.start"):
            pool(1)
        pool.start()
        assert pool(action="pid") != first


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_model_from_a_file(make_pool, tmp_path, kind: str) -> None:
    from tests.models import linear

    model = linear().eval()
    x = torch.randn(3, 4)
    if kind == "torchscript":
        path = tmp_path / "model.pt"
        torch.jit.script(model).save(str(path))
    else:
        path = tmp_path / "model.pt2"
        torch.export.save(torch.export.export(model, (x,)), str(path))
    app, pool = make_pool(TORCHPOOL_MODEL=str(path), TORCHPOOL_WORKERS=2)
    with app.app_context():
        y = pool(x)
    assert torch.allclose(y, model(x), atol=1e-6)
