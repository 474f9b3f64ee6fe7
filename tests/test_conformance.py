"""Backend conformance: the same tests against every way of running a model, through the public API.

Backends (the module-scoped ``backend`` fixture, one shared pool each, like CPython's
``test_concurrent_futures`` runs one body under several executors):

``embedded``
    ``TORCHPOOL_MODE = "embedded"``: the app's own spawned workers.
``inline``
    ``TORCHPOOL_INLINE = True``: the model runs in the calling thread (flask_torchpool/inline.py).
``attach``
    ``TORCHPOOL_MODE = "attach"``: the app attaches to a pool server (:func:`tests.servers.pool_server`,
    in this process, so that its workers are children of the test process).
``ray``
    ``TORCHPOOL_BACKEND = "ray"``: the workers are Ray actors on the session's Ray cluster
    (``ray_cluster`` in conftest; flask_torchpool/ray_backend).

Where the backends rightly differ, the :class:`Backend` says so as a capability (deadlines, who owns the
worker processes) and the tests assert each backend's documented behaviour; nothing is skipped, and no
backend has an expected failure (the last two, attach's restart and status after shutdown, are fixed).
The tests use only ``TorchPool``, ``pool.model``, ``@pool.infer`` views through ``app.test_client()``,
``pool.status``, ``pool.shutdown`` and the exceptions of ``flask_torchpool``. Shutdown tests make their
own backend (``fresh_backend``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from flask import Flask, request

from flask_torchpool import (
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    ModelProxy,
    OutputError,
    PayloadTooLargeError,
    PoolClosedError,
    RemoteTraceback,
    TorchPool,
    TorchPoolError,
)
from flask_torchpool.attach.server import PoolServer

from . import models
from .conftest import RAY_LEAKS_OK, child_pids, make_app, pid_alive, shm_entries, wait_until
from .servers import pool_server

pytestmark = pytest.mark.timeout(120)

BACKENDS = ["embedded", "inline", "attach", "ray"]
#: TORCHPOOL_MAX_INPUT_BYTES of every backend.
LIMIT = 1 << 20
#: The deadline of the ``/slow`` view and of the deadline tests, in seconds.
DEADLINE = 0.25
#: How long a call that outlives DEADLINE sleeps in the model: long enough that only a deadline ends it
#: on backends that enforce deadlines; on the others (inline) it completes, so it is short there.
SLEEP_PAST_DEADLINE = {True: 60.0, False: 2 * DEADLINE}
HEALTH_URL = "/torchpool"


# --- the backends ----------------------------------------------------------------------------------------


@dataclass
class Backend:
    kind: str
    app: Flask
    pool: TorchPool
    #: A call still running at its deadline fails with InferenceTimeoutError (and its worker is
    #: replaced). Inline mode cannot interrupt the calling thread: the call completes (inline.py).
    enforces_deadlines: bool
    #: Who runs the model, which decides what ``shutdown`` stops: ``"children"`` (worker processes of
    #: this app, stopped with it), ``"actors"`` (this app's Ray actors, killed with it), ``"server"`` (the
    #: pool server's workers, which go on serving the other attached web processes) or ``"none"`` (the
    #: web process itself, inline).
    workers: str
    #: The pool server an attached app talks to.
    server: PoolServer | None = None

    def proxy(self, **kwargs: Any) -> ModelProxy:
        return self.pool.model(app=self.app, **kwargs)

    def status(self) -> dict[str, Any]:
        return self.pool.status(self.app)

    def wait_replaced(self, before: dict[str, Any], timeout: float = 60.0) -> None:
        """After a deadline killed a worker: wait (with a deadline) until it was respawned and every worker
        is ready, from a status taken *before* the call. ``ready`` alone is no proof: the call fails at
        its deadline and the worker is killed just after, so for a moment the status still shows it
        ready, with its old pid."""
        restarts = sum(w["restarts"] for w in before["workers"])

        def replaced() -> bool:
            status = self.status()
            return status["ready"] and sum(w["restarts"] for w in status["workers"]) > restarts

        assert wait_until(replaced, timeout=timeout), self.status()


def _add_views(app: Flask, pool: TorchPool) -> None:
    @app.post("/echo")
    @pool.infer
    def echo(model: ModelProxy) -> Any:
        return {"y": model(torch.tensor(request.json["x"])).tolist()}

    @app.post("/raise")
    @pool.infer
    def raises(model: ModelProxy) -> Any:
        return model(torch.ones(1), action="raise")

    @app.post("/invalid")
    @pool.infer
    def invalid(model: ModelProxy) -> Any:
        return model(object())

    @app.post("/large")
    @pool.infer
    def large(model: ModelProxy) -> Any:
        return model(torch.zeros(LIMIT // 4 + 1))

    @app.post("/slow")
    @pool.infer(timeout=DEADLINE)
    def slow(model: ModelProxy) -> Any:
        return {"y": model(torch.ones(1), action="sleep", seconds=request.json["seconds"]).tolist()}


def attached_app(server: PoolServer) -> tuple[Flask, TorchPool]:
    """A web app attached to *server*, with the conformance views."""
    app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=server.path, TORCHPOOL_ARENA_BYTES=4 << 20,
                   TORCHPOOL_MAX_INPUT_BYTES=LIMIT, TORCHPOOL_HEALTH_URL=HEALTH_URL)
    pool = TorchPool(app)
    _add_views(app, pool)
    return app, pool


@contextmanager
def running_backend(kind: str, tmp: Path) -> Iterator[Backend]:
    """An app of *kind* with the conformance views, warmed up by one call (so that lazily made
    resources, such as an attached app's connection and arena, exist before any test looks)."""
    with ExitStack() as stack:
        server = None
        if kind == "attach":
            run = tmp / "run"
            run.mkdir(mode=0o700)
            server = stack.enter_context(pool_server(run / "pool.sock", TORCHPOOL_ARENA_BYTES=8 << 20))
            app, pool = attached_app(server)
        else:
            mode = {"TORCHPOOL_INLINE": True} if kind == "inline" else {"TORCHPOOL_MODE": "embedded"}
            if kind == "ray":
                mode["TORCHPOOL_BACKEND"] = "ray"
                mode["TORCHPOOL_DEVICES"] = "auto"
            app = make_app(TORCHPOOL_ARENA_BYTES=8 << 20, TORCHPOOL_MAX_INPUT_BYTES=LIMIT,
                           TORCHPOOL_HEALTH_URL=HEALTH_URL, **mode)
            pool = TorchPool(app)
            _add_views(app, pool)
        stack.callback(pool.shutdown, app=app)  # before the server stops (ExitStack unwinds backwards)
        backend = Backend(kind, app, pool, enforces_deadlines=kind != "inline",
                          workers={"embedded": "children", "inline": "none", "attach": "server",
                                   "ray": "actors"}[kind],
                          server=server)
        assert torch.equal(backend.proxy()(torch.ones(1)), torch.ones(1))
        yield backend


@pytest.fixture(scope="module", params=[pytest.param(kind, marks=RAY_LEAKS_OK) if kind == "ray" else kind
                                        for kind in BACKENDS])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def backend(kind: str, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The shared, started backend of *kind* for this module."""
    if kind == "ray":
        request.getfixturevalue("ray_cluster")
    with running_backend(kind, tmp_path_factory.mktemp(kind)) as started:
        yield started


@pytest.fixture
def fresh_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A backend of the test's own (for shutdown tests); no process and no /dev/shm entry outlives it."""
    if kind == "ray":
        request.getfixturevalue("ray_cluster")
    before_children, before_shm = child_pids(), shm_entries()
    with running_backend(kind, tmp_path) as started:
        yield started
    assert wait_until(lambda: not (child_pids() - before_children), timeout=10), \
        f"processes outlived the backend: {child_pids() - before_children}"
    assert shm_entries() <= before_shm, f"/dev/shm entries leaked: {shm_entries() - before_shm}"


# --- round trips -----------------------------------------------------------------------------------------


def _matrix() -> torch.Tensor:
    return torch.arange(6.0).reshape(2, 3)


ROUND_TRIPS: dict[str, Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]] = {
    "tensor": lambda: ((_matrix(),), {}),
    "zero-copy-sized": lambda: ((torch.arange(256 * 256, dtype=torch.float32).reshape(256, 256),), {}),
    "non-contiguous": lambda: ((_matrix().t(),), {}),
    "0-d": lambda: ((torch.tensor(3.5),), {}),
    "empty": lambda: ((torch.empty(0, 3),), {}),
    "dtypes": lambda: (tuple(torch.arange(4).to(dtype) for dtype in (
        torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
        torch.uint8, torch.bool, torch.complex64)), {}),
    "nested": lambda: (({"a": [_matrix(), 2.5, "s", None, b"raw", True, 7, 1 + 2j],
                         "b": (_matrix() + 1, (_matrix() + 2,)), 3: []},),
                       {"key": (1, torch.zeros(2, dtype=torch.int64)), "none": None}),
    "kwargs-only": lambda: ((), {"x": _matrix(), "flag": False}),
    "int": lambda: ((3,), {}),
    "float": lambda: ((2.5,), {}),
    "complex": lambda: ((1 - 1j,), {}),
    "str": lambda: (("text",), {}),
    "bytes": lambda: ((b"\x00\xff",), {}),
    "none": lambda: ((None,), {}),
    "no-arguments": lambda: ((), {}),
}


def assert_same(got: Any, want: Any, path: str = "output") -> None:
    """*got* is *want*: the same types (tuples stay tuples), dict keys in the same order, tensors of the
    same dtype, shape, device and values, and ordinary tensors (no grad, not inference tensors); numpy
    arrays of the same dtype, shape and values."""
    assert type(got) is type(want), f"{path}: {type(got).__name__} instead of {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape, got.device) == (want.dtype, want.shape, want.device), path
        assert torch.equal(got, want), f"{path}: {got} != {want}"
        assert not got.requires_grad and not got.is_inference(), path
    elif isinstance(want, np.ndarray):
        assert (got.dtype, got.shape) == (want.dtype, want.shape), f"{path}: {got!r} != {want!r}"
        assert np.array_equal(got, want), f"{path}: {got} != {want}"
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)} instead of {list(want)}"
        for key in want:
            assert_same(got[key], want[key], f"{path}[{key!r}]")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def _clone(value: Any) -> Any:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.clone() if isinstance(value, torch.Tensor) else value.copy()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_round_trip_matches_the_model_run_locally(backend: Backend, case: str) -> None:
    args, kwargs = ROUND_TRIPS[case]()
    want = models.echo()(*_clone(args), **_clone(kwargs))
    sent = _clone((args, kwargs))
    got = backend.proxy()(*args, **kwargs)
    assert_same(got, want)
    assert_same((args, kwargs), sent, "the caller's arguments")  # not modified, and not aliased
    if isinstance(got, torch.Tensor) and got.numel():
        got.add_(1)  # the result is the caller's own: writing it changes nothing the caller sent
        assert_same((args, kwargs), sent, "the caller's arguments after writing the result")


def _read_only(a: np.ndarray) -> np.ndarray:
    a = np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)  # as np.frombuffer(request.data)
    assert not a.flags.writeable
    return a


NUMPY_TRIPS: dict[str, Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]] = {
    "array": lambda: ((np.arange(6.0, dtype=np.float32).reshape(2, 3),), {}),
    "zero-copy-sized": lambda: ((np.arange(256 * 256, dtype=np.float32).reshape(256, 256),), {}),
    "non-contiguous": lambda: ((np.arange(6.0).reshape(2, 3).T,), {}),
    "read-only": lambda: ((_read_only(np.arange(12, dtype=np.int64).reshape(3, 4)),), {}),
    "0-d": lambda: ((np.array(3.5),), {}),
    "empty": lambda: ((np.empty((0, 3), dtype=np.float32),), {}),
    "dtypes": lambda: (tuple(np.arange(4).astype(d) for d in (
        np.float32, np.float64, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_,
        np.complex64, np.complex128)), {}),
    "nested": lambda: (({"a": [np.ones((2, 2), np.float32), 2.5, "s", None]},),
                       {"key": (1, np.zeros(2, dtype=np.int64))}),
}


@pytest.mark.parametrize("case", list(NUMPY_TRIPS))
def test_numpy_arrays_come_back_as_numpy_arrays(backend: Backend, case: str) -> None:
    args, kwargs = NUMPY_TRIPS[case]()
    sent = _clone((args, kwargs))
    want = _clone(args[0] if len(args) == 1 and not kwargs else {"args": args, "kwargs": kwargs})
    got = backend.proxy()(*args, **kwargs)
    assert_same(got, want)
    assert_same(backend.proxy().submit(*args, **kwargs).result(60), want)
    assert_same(asyncio.run(backend.proxy().acall(*args, **kwargs)), want)
    if isinstance(got, np.ndarray) and got.size:
        got += 1  # the result is the caller's own: writing it changes nothing the caller sent
        assert_same((args, kwargs), sent, "the caller's arguments after writing the result")


def test_numpy_and_torch_in_one_call_give_torch_tensors(backend: Backend) -> None:
    got = backend.proxy()(np.ones(2, dtype=np.float32), torch.zeros(1))
    assert_same(got, {"args": (torch.ones(2), torch.zeros(1)), "kwargs": {}})


def test_a_numpy_call_whose_output_numpy_lacks_gets_an_output_error(backend: Backend) -> None:
    with pytest.raises(OutputError, match="bfloat16 tensor has no numpy dtype"):
        backend.proxy()(np.ones(2, dtype=np.float32), action="cast", dtype="bfloat16")
    assert_same(backend.proxy()(torch.ones(2), action="cast", dtype="bfloat16"),
                torch.ones(2, dtype=torch.bfloat16))  # torch callers get it; the pool serves on


def test_submit_and_acall_give_the_same_results(backend: Backend) -> None:
    proxy = backend.proxy()
    x = _matrix()
    assert_same(proxy.submit(x, k=1).result(60), {"args": (x,), "kwargs": {"k": 1}})
    assert_same(asyncio.run(proxy.acall(x)), x)


def test_concurrent_callers_each_get_their_own_result(backend: Backend) -> None:
    proxy = backend.proxy()

    def call(i: int) -> None:
        for j in range(5):
            x = torch.full((3, 4), float(i * 100 + j))
            assert_same(proxy(x, caller=i), {"args": (x,), "kwargs": {"caller": i}})

    with ThreadPoolExecutor(4) as threads:
        for future in [threads.submit(call, i) for i in range(4)]:
            future.result(60)


# --- errors ----------------------------------------------------------------------------------------------


def test_a_model_error_is_an_inference_error_and_the_pool_keeps_serving(backend: Backend) -> None:
    before = backend.status()
    with pytest.raises(InferenceError) as info:
        backend.proxy()(torch.ones(1), action="raise")
    err = info.value
    assert type(err) is InferenceError and err.code == 500
    assert err.remote_type == "ValueError", err.extra
    assert "ValueError" in str(err) and "bad shape: expected 4 features, got 3" in str(err)
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "Traceback" in err.__cause__.tb and "in forward" in err.__cause__.tb
    assert "ValueError: bad shape" in err.__cause__.tb

    future = backend.proxy().submit(torch.ones(1), action="raise")  # the same through a future
    assert type(future.exception(60)) is InferenceError

    assert_same(backend.proxy()(torch.ones(2)), torch.ones(2))
    after = backend.status()
    assert [(w["pid"], w["restarts"]) for w in after["workers"]] == \
        [(w["pid"], w["restarts"]) for w in before["workers"]], "a model error must not cost a worker"
    assert after["counters"]["errors"] == before["counters"]["errors"] + 2
    assert after["counters"]["ok"] == before["counters"]["ok"] + 1


INVALID: dict[str, Callable[[], tuple[tuple[Any, ...], dict[str, Any]]]] = {
    "numpy-object-array": lambda: ((np.array([object(), 1]),), {}),
    "numpy-strings": lambda: ((np.array(["a", "b"]),), {}),
    "numpy-big-endian": lambda: ((np.zeros(3, dtype=">f4"),), {}),
    "numpy-scalar": lambda: ((np.float32(1.0),), {}),
    "object": lambda: ((object(),), {}),
    "set": lambda: (({1, 2},), {}),
    "nested-object": lambda: (({"a": [torch.ones(1), object()]},), {}),
    "kwarg-object": lambda: ((torch.ones(1),), {"extra": object()}),
    "tuple-dict-key": lambda: (({(1, 2): torch.ones(1)},), {}),
    "requires-grad": lambda: ((torch.ones(2, requires_grad=True),), {}),
    "sparse": lambda: ((torch.eye(3).to_sparse(),), {}),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_input_is_refused_in_the_calling_thread(backend: Backend, case: str) -> None:
    args, kwargs = INVALID[case]()
    calls = backend.status()["counters"]["calls"]
    with pytest.raises(InvalidInputError, match="cannot send") as info:
        backend.proxy().submit(*args, **kwargs)  # raises here: no future is made
    assert info.value.code == 400
    with pytest.raises(InvalidInputError):
        backend.proxy()(*args, **kwargs)
    assert backend.status()["counters"]["calls"] == calls, "an invalid call was counted as sent"


def test_input_over_the_limit_is_refused_in_the_calling_thread(backend: Backend) -> None:
    calls = backend.status()["counters"]["calls"]
    for args in [(torch.zeros(LIMIT + 1, dtype=torch.uint8),),
                 (torch.zeros(LIMIT // 2, dtype=torch.uint8), {"b": [torch.ones(LIMIT // 2 + 1,
                                                                               dtype=torch.uint8)]})]:
        with pytest.raises(PayloadTooLargeError, match="TORCHPOOL_MAX_INPUT_BYTES") as info:
            backend.proxy().submit(*args)
        assert info.value.code == 413
    assert backend.status()["counters"]["calls"] == calls
    at_limit = torch.arange(LIMIT, dtype=torch.int64).to(torch.uint8)  # exactly LIMIT bytes: accepted
    assert_same(backend.proxy()(at_limit), at_limit)


def test_deadlines(backend: Backend) -> None:
    """Past its deadline a call fails with InferenceTimeoutError where deadlines are enforced; inline,
    where nothing can interrupt the calling thread, it completes (its documented behaviour)."""
    before = backend.status()
    seconds = SLEEP_PAST_DEADLINE[backend.enforces_deadlines]
    start = time.monotonic()
    if backend.enforces_deadlines:
        with pytest.raises(InferenceTimeoutError) as info:
            backend.proxy(timeout=DEADLINE)(torch.ones(1), action="sleep", seconds=seconds)
        assert info.value.code == 504
        assert time.monotonic() - start < seconds / 2
        backend.wait_replaced(before)  # the wedged worker is killed and respawned
    else:
        out = backend.proxy(timeout=DEADLINE)(torch.ones(1), action="sleep", seconds=seconds)
        assert_same(out, torch.ones(1))
        assert time.monotonic() - start >= seconds
    after = backend.status()["counters"]
    assert after["timeouts"] == before["counters"]["timeouts"] + backend.enforces_deadlines
    assert_same(backend.proxy()(torch.ones(2)), torch.ones(2))


# --- errors over HTTP ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "code", "error", "words"), [
    ("/raise", 500, InferenceError, "bad shape"),
    ("/invalid", 400, InvalidInputError, "cannot send args[0]"),
    ("/large", 413, PayloadTooLargeError, "TORCHPOOL_MAX_INPUT_BYTES"),
])
def test_http_errors_have_their_status_and_json_body(backend: Backend, path: str, code: int,
                                                     error: type[TorchPoolError], words: str) -> None:
    resp = backend.app.test_client().post(path)
    assert resp.status_code == code, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.json
    assert body["type"] == error.__name__ and words in body["error"], body
    if error is InferenceError:
        assert body["remote_type"] == "ValueError", body
    assert "Retry-After" not in resp.headers


def test_http_success_and_deadline(backend: Backend) -> None:
    client = backend.app.test_client()
    before = backend.status()
    resp = client.post("/echo", json={"x": [[1.0, 2.0], [3.0, 4.0]]})
    assert resp.status_code == 200 and resp.json == {"y": [[1.0, 2.0], [3.0, 4.0]]}, resp.json
    resp = client.post("/slow", json={"seconds": SLEEP_PAST_DEADLINE[backend.enforces_deadlines]})
    if backend.enforces_deadlines:
        assert resp.status_code == 504, resp.get_data(as_text=True)
        assert resp.mimetype == "application/json" and resp.json["type"] == "InferenceTimeoutError"
        backend.wait_replaced(before)
    else:
        assert resp.status_code == 200 and resp.json == {"y": [1.0]}, resp.get_data(as_text=True)


# --- status ----------------------------------------------------------------------------------------------

#: Every backend's status: docs/operating.rst ("The status"), TorchPool.status, and the status types
#: (ModelStatus, AppStatus in flask_torchpool/status.py), which report "mode", "shared_weight_bytes" and
#: the "batches" counter on every backend.
STATUS_KEYS = {"started", "closed", "ready", "inline", "mode", "queued", "busy_workers", "arena_bytes",
               "shared_weight_bytes", "counters", "workers", "latency_quantiles", "plan", "metrics",
               "models"}
#: "error": why it is not serving (after a failed start); attached apps add "socket" and "server" (the
#: pool server's pid and client count); a backend that reloads adds "version", "reloading", "reloads".
STATUS_KEYS_OPTIONAL = {"error", "socket", "server", "version", "reloading", "reloads"}
COUNTER_KEYS = {"calls", "ok", "errors", "timeouts", "crashes", "overloaded", "retries", "batches"}
WORKER_KEYS = {"worker", "model", "pid", "state", "device", "cores", "threads", "inflight", "calls",
               "errors", "restarts", "last_exit", "generation", "incoming"}
#: A Ray actor's status adds where Ray placed it (docs/operating.rst).
RAY_WORKER_KEYS = {"actor_id", "node_id", "node_ip", "resources"}
WORKER_STATES = {"not started", "starting", "ready", "retiring", "dead", "failed", "stopped"}
PLAN_KEYS = {"worker", "device", "cores", "threads", "model"}


def _check_status_shape(status: dict[str, Any], backend: Backend) -> None:
    known = STATUS_KEYS | STATUS_KEYS_OPTIONAL
    assert STATUS_KEYS <= status.keys() <= known, \
        f"missing {STATUS_KEYS - status.keys()}, undocumented {status.keys() - known}"
    assert status["inline"] is (backend.kind == "inline") and status["mode"] == backend.kind, status
    assert status["counters"].keys() == COUNTER_KEYS, status["counters"]
    assert status["workers"] and len(status["workers"]) == len(status["plan"])
    for worker, placement in zip(status["workers"], status["plan"]):
        assert worker.keys() == WORKER_KEYS | (RAY_WORKER_KEYS if backend.kind == "ray" else set()), worker
        assert worker["state"] in WORKER_STATES, worker
        assert worker["model"] == "default"
        assert placement.keys() == PLAN_KEYS, placement
        assert {k: worker[k] for k in PLAN_KEYS} == placement
    assert list(status["models"]) == ["default"]
    json.dumps(status)  # JSON-ready


def test_status_has_the_documented_keys_and_worker_states(backend: Backend) -> None:
    status = backend.status()
    _check_status_shape(status, backend)
    assert status["started"] is True and status["closed"] is False and status["ready"] is True, status
    # The same keys on every backend; an attached app adds where its pool server is; a backend that
    # reloads (the process pool, and so the pool server) its version.
    attached = {"socket", "server"} if backend.kind == "attach" else set()
    versioned = {"version", "reloading", "reloads"} if backend.kind in ("embedded", "attach") else set()
    assert status.keys() & STATUS_KEYS_OPTIONAL == attached | versioned
    assert {w["state"] for w in status["workers"]} == {"ready"}
    resp = backend.app.test_client().get(f"{HEALTH_URL}/status")
    assert resp.status_code == 200 and resp.json.keys() == status.keys()
    assert backend.app.test_client().get(f"{HEALTH_URL}/ready").status_code == 200


def test_a_models_status_is_the_top_level_less_inline_and_models(backend: Backend) -> None:
    """docs/operating.rst, ``models``: "The same keys (but inline, models and error) for each model
    [...] with one model a copy of the top level"."""
    status = backend.status()
    assert status["models"]["default"] == {k: v for k, v in status.items() if k not in ("inline", "models")}


def test_status_counts_calls_by_outcome(backend: Backend) -> None:
    before = backend.status()
    proxy = backend.proxy()
    proxy(torch.ones(1))
    with pytest.raises(InferenceError):
        proxy(torch.ones(1), action="raise")
    after = backend.status()
    grew = {k: after["counters"][k] - before["counters"][k] for k in ("calls", "ok", "errors")}
    assert grew == {"calls": 2, "ok": 1, "errors": 1}, (before["counters"], after["counters"])
    assert sum(w["calls"] for w in after["workers"]) - sum(w["calls"] for w in before["workers"]) == 2
    assert sum(w["errors"] for w in after["workers"]) - sum(w["errors"] for w in before["workers"]) == 1


# --- shutdown (own backends) -----------------------------------------------------------------------------


def test_shutdown_is_idempotent_and_later_calls_raise_pool_closed(fresh_backend: Backend) -> None:
    backend = fresh_backend
    app, pool = backend.app, backend.pool
    pids = {w["pid"] for w in backend.status()["workers"]}
    pool.shutdown(app=app)
    pool.shutdown(app=app)
    pool.shutdown(wait=False, app=app)

    with app.app_context():
        for call in (lambda: pool(torch.ones(1)), lambda: pool.submit(torch.ones(1)),
                     lambda: pool.model()(torch.ones(1))):
            with pytest.raises(PoolClosedError) as info:
                call()
            assert info.value.code == 503 and info.value.retry_after is not None
    resp = app.test_client().post("/echo", json={"x": [1.0]})
    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert resp.json["type"] == "PoolClosedError" and resp.headers.get("Retry-After"), resp.json

    status = backend.status()
    assert status["closed"] is True and status["ready"] is False, status
    assert all(w["state"] in WORKER_STATES for w in status["workers"]), status["workers"]

    if backend.workers == "children":
        # shutdown(wait=True) returns once the workers are stopped (and reaped): no polling needed.
        assert not any(pid_alive(p) for p in pids), f"workers {pids} outlived shutdown"
        assert {w["state"] for w in status["workers"]} == {"stopped"}, status["workers"]
    elif backend.workers == "actors":
        # shutdown(wait=True) returns once Ray reports the actors dead; their processes (children of the
        # raylet, on this machine here) exit just after.
        assert {w["state"] for w in status["workers"]} == {"stopped"}, status["workers"]
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=30), \
            f"actors {pids} outlived shutdown"
    elif backend.workers == "server":
        # The server's workers are not this app's: they go on serving the other attached apps.
        assert backend.server is not None
        assert all(pid_alive(p) for p in pids), "shutting an attached app down stopped the server's workers"
        other_app, other = attached_app(backend.server)
        try:
            with other_app.app_context():
                assert_same(other(torch.ones(2)), torch.ones(2))
        finally:
            other.shutdown(app=other_app)
    else:
        assert backend.workers == "none" and pids == {os.getpid()}


def test_status_after_shutdown_keeps_the_documented_keys(fresh_backend: Backend) -> None:
    backend = fresh_backend
    backend.pool.shutdown(app=backend.app)
    status = backend.status()
    assert status["closed"] is True and status["ready"] is False
    assert "error" not in status, status["error"]
    _check_status_shape(status, backend)
    assert {w["state"] for w in status["workers"]} == {"stopped"}, status["workers"]


def test_start_after_shutdown_serves_again(fresh_backend: Backend) -> None:
    """PoolClosedError says "call TorchPool.start() to start a new one"; TorchPool.start() does."""
    backend = fresh_backend
    backend.pool.shutdown(app=backend.app)
    with pytest.raises(PoolClosedError, match=r"TorchPool\.start\(\)"):
        backend.proxy()(torch.ones(1))
    backend.pool.start(app=backend.app)
    assert backend.status()["ready"] is True
    assert_same(backend.proxy()(torch.ones(3)), torch.ones(3))


def test_streams_yield_in_order_and_end_with_the_models_error(backend: Backend) -> None:
    """Issue 13 on every backend: ``model.stream`` (and a named method), async iteration, errors after the
    chunks, ``model(...)`` of a model that yields refused, and closing the iterator closes the generator."""
    want = [torch.tensor([0]), {"i": 1, "text": "t1"}, torch.tensor([2])]
    if backend.kind == "ray":  # documented: the Ray backend does not stream (docs/configuration.rst)
        for start in (lambda: backend.proxy().stream(torch.ones(1), action="yield", n=3),
                      lambda: backend.proxy().method("count").stream(3)):
            with pytest.raises(InferenceError, match="not supported by the Ray backend"):
                start()
        with pytest.raises(InferenceError, match=r"model\.stream"):
            backend.proxy()(torch.ones(1), action="yield", n=3)
        with pytest.raises(InferenceError, match="no method 'nope'"):
            backend.proxy().call("nope")
        return
    assert_same(list(backend.proxy().stream(torch.ones(1), action="yield", n=3)), want)
    assert_same(list(backend.proxy().method("count").stream(3)), want)

    async def collect() -> list[Any]:
        return [chunk async for chunk in backend.proxy().method("count").stream(3)]

    assert_same(asyncio.run(collect()), want)
    got = []
    with pytest.raises(InferenceError, match="bad token at step 2"):
        for chunk in backend.proxy().method("count").stream(5, fail_at=2):
            got.append(chunk)
    assert_same(got, want[:2])
    with pytest.raises(InferenceError, match=r"model\.stream"):
        backend.proxy()(torch.ones(1), action="yield", n=3)
    with pytest.raises(InferenceError, match="no method 'nope'"):
        backend.proxy().call("nope")


def test_a_zero_copy_numpy_output_keeps_its_memory_while_later_calls_run(backend: Backend) -> None:
    """A large numpy output is a view of the worker's (or the server's) shared memory: its block must
    not go back to be reused while the array, or any view of it, lives. (numpy.frombuffer keeps a
    buffer of its own, so a finalizer on the memoryview slice freed the block at once, and the next
    output overwrote an array its caller still held.)"""
    proxy = backend.proxy()
    first = proxy(np.full((256, 256), 1.0, np.float32))   # 256 KiB: a zero-copy output
    row = first[3]
    del first
    gc.collect()
    later = [proxy(np.full((256, 256), float(i), np.float32)) for i in range(2, 6)]
    assert (row == 1.0).all(), f"a held output was overwritten with {row[:4]}"
    assert all((out == i).all() for out, i in zip(later, range(2, 6)))


def test_a_stream_started_with_numpy_arrays_yields_numpy_arrays(backend: Backend) -> None:
    if backend.kind == "ray":  # documented: the Ray backend does not stream
        with pytest.raises(InferenceError, match="not supported by the Ray backend"):
            backend.proxy().stream(np.ones(1, np.float32), action="yield", n=3)
        return
    got = list(backend.proxy().stream(np.ones(1, np.float32), action="yield", n=3))
    assert_same(got, [np.array([0]), {"i": 1, "text": "t1"}, np.array([2])])


def test_closing_a_stream_closes_the_generator(backend: Backend, tmp_path: Path) -> None:
    log = tmp_path / "log"
    if backend.kind == "ray":  # documented: the Ray backend does not stream; nothing starts
        with pytest.raises(InferenceError, match="not supported by the Ray backend"):
            backend.proxy().method("count").stream(10**9, log=str(log))
        assert not log.exists()
        return
    stream = backend.proxy().method("count").stream(10**9, log=str(log))
    assert_same(next(stream), torch.tensor([0]))
    stream.close()
    assert wait_until(lambda: log.exists() and log.read_text() == "finally\n"), backend.kind
    assert_same(backend.proxy()(torch.ones(2)), torch.ones(2))


def test_every_backend_implements_the_contract(backend: Backend) -> None:
    """The one contract (flask_torchpool.backend.Backend): what the group, health, the CLI, Prometheus
    and the pool server rely on, and the capability the deadline tests read."""
    from flask_torchpool.backend import Backend as Contract

    backend.proxy()(torch.ones(1))  # started
    for implementation in backend.app.extensions["torchpool"].pools.values():
        assert isinstance(implementation, Contract), type(implementation)
        assert implementation.enforces_deadlines is backend.enforces_deadlines
        assert implementation.placements and implementation.started and not implementation.closed
        assert implementation.status()["mode"] == backend.kind
