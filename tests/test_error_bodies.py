"""What HTTP clients see of server errors (issue 11, items 7 and 8), with a real pool.

A 5xx body says what kind of failure it was and carries an ``error_id``; the message, the fields (pids,
exit codes) and the remote traceback are in the ERROR log line with that id, and in the body only when
the operator asks (``TORCHPOOL_ERROR_DETAILS`` or ``app.debug``). A 4xx body keeps saying what was wrong
with the input. A model error raised for a whole dynamic batch reaches no other caller: the members run
again one by one (Note [A failed batch]). ``/live`` shows no pid.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import torch
from flask import Flask, request

from flask_torchpool import InferenceError, TorchPool

from .conftest import Gate, make_app
from .crash_models import jsonable, wait_ready

pytestmark = pytest.mark.timeout(180)

BATCH_DELAY_S = 30.0  # batches are sent because they are full or their worker idle, never by the clock
ERROR_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def leaky_app() -> Iterator[Flask]:
    app = make_app(TORCHPOOL_MODEL="tests.storm_models:leaky", TORCHPOOL_ERROR_DETAILS=False,
                   TORCHPOOL_MAX_BATCH_SIZE=4, TORCHPOOL_MAX_BATCH_DELAY_MS=BATCH_DELAY_S * 1000,
                   TORCHPOOL_RETRIES=0, TORCHPOOL_HEALTH_URL="/tp")
    pool = TorchPool(app)

    @app.post("/score")
    @pool.infer
    def score(model: Any) -> Any:
        body = dict(request.get_json())
        x = torch.tensor(body.pop("x", [1.0]))
        return {"out": jsonable(model(x, **body))}

    @app.post("/object")
    @pool.infer
    def send_object(model: Any) -> Any:
        return {"out": model(object())}

    yield app
    pool.shutdown(app=app)


@pytest.fixture
def client(leaky_app: Flask) -> Any:
    wait_ready(leaky_app.extensions["torchpool"].extension, leaky_app)
    return leaky_app.test_client()


def _error_lines(caplog: Any, error_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and error_id in r.getMessage()]


def test_a_model_error_body_tells_no_secrets(client: Any, caplog: Any) -> None:
    caplog.set_level(logging.ERROR)
    resp = client.post("/score", json={"x": [1.0], "action": "raise"})
    assert resp.status_code == 500
    body = resp.get_json()
    assert set(body) == {"error", "type", "error_id"}, body
    assert body["type"] == "InferenceError" and body["error"] == "the model failed on this call"
    assert ERROR_ID.match(body["error_id"])
    text = resp.get_data(as_text=True)
    for secret in ("bad shape", "Traceback", "ValueError", ".py", "/"):
        assert secret not in text, text
    [line] = _error_lines(caplog, body["error_id"])
    logged = line.getMessage()
    assert "InferenceError 500: the model raised ValueError: bad shape: expected 4 features" in logged
    assert "remote_type='ValueError'" in logged
    assert "Traceback (most recent call last)" in logged and "storm_models.py" in logged


def test_a_crash_body_shows_no_pid(client: Any, leaky_app: Flask, caplog: Any) -> None:
    caplog.set_level(logging.ERROR)
    pool = leaky_app.extensions["torchpool"].extension
    [pid] = wait_ready(pool, leaky_app)
    resp = client.post("/score", json={"x": [1.0], "action": "exit"})
    assert resp.status_code == 503 and resp.headers.get("Retry-After") == "1"
    body = resp.get_json()
    assert set(body) == {"error", "type", "error_id"} and body["type"] == "WorkerCrashedError", body
    assert str(pid) not in resp.get_data(as_text=True) and "exit code" not in body["error"]
    [line] = _error_lines(caplog, body["error_id"])
    assert f"pid={pid}" in line.getMessage() and "exitcode=7" in line.getMessage()
    wait_ready(pool, leaky_app, exclude={pid})


@pytest.mark.parametrize("opt_in", ["TORCHPOOL_ERROR_DETAILS", "debug"])
def test_details_when_the_operator_asks(opt_in: str, caplog: Any) -> None:
    """Without starting a pool: the error is rendered by Flask as any HTTPException."""
    config = {"TORCHPOOL_START": "lazy"}
    if opt_in == "TORCHPOOL_ERROR_DETAILS":
        config["TORCHPOOL_ERROR_DETAILS"] = True
    app = make_app(**config)
    if opt_in == "debug":
        app.config["TORCHPOOL_ERROR_DETAILS"] = False
        app.debug = True
    TorchPool(app)

    @app.get("/fail")
    def fail() -> Any:
        raise InferenceError.model_raised("KeyError", "'secret-row-17'", "Traceback ...\nKeyError\n")

    caplog.set_level(logging.ERROR)
    body = app.test_client().get("/fail").get_json()
    assert body["error"] == "the model raised KeyError: 'secret-row-17'"
    assert body["remote_type"] == "KeyError" and ERROR_ID.match(body["error_id"])
    assert _error_lines(caplog, body["error_id"])


def test_a_4xx_body_keeps_its_message(client: Any) -> None:
    resp = client.post("/object", json={})
    assert resp.status_code == 400
    body = resp.get_json()
    assert body["type"] == "InvalidInputError" and "object" in body["error"], body
    assert "error_id" not in body


def test_a_failed_batch_shows_no_caller_another_callers_data(leaky_app: Flask, gate: Gate) -> None:
    """Four calls form one batch (the worker is held at a gate meanwhile); the model's error for it
    quotes every row. Each member runs again alone: the good ones get their results, the bad one an
    error that quotes its own rows only."""
    pool = leaky_app.extensions["torchpool"].extension
    with leaky_app.app_context():
        hold = pool.submit(action="gate", gate=str(gate))
        rows = [torch.tensor([[10.0 * i + 1]]) for i in range(4)]
        rows[2] = torch.tensor([[-777.0]])
        futures: list[Future[Any]] = [pool.submit(r) for r in rows]
        gate.open()
        assert hold.result(60) == 0
        for i, f in enumerate(futures):
            if i == 2:
                with pytest.raises(InferenceError) as info:
                    f.result(60)
                assert "cannot score rows [-777.0]" in str(info.value)
                assert "11.0" not in str(info.value) and "31.0" not in str(info.value)
            else:
                out = f.result(60)
                assert torch.equal(out["y"], rows[i] + 1)
                assert int(out["n"][0]) == 1  # it ran alone, after the batch of 4 failed
        status = pool.status(leaky_app)
    calls_per_batch = status["metrics"]["batch_calls"]["cumulative"]  # buckets 1, 2, 4, ...
    assert calls_per_batch[2] - calls_per_batch[1] >= 1, "the four calls did not run as one batch"

def test_live_shows_no_pid(client: Any) -> None:
    resp = client.get("/tp/live")
    assert resp.status_code == 200 and resp.get_json() == {"status": "alive"}


def test_the_operator_port_check_of_the_deploying_docs() -> None:
    """docs/deploying.rst: /status and /metrics answer only on the operator's port, read from the socket
    the request came in on (two real listeners, one app), never from a header."""
    import threading
    import urllib.error
    import urllib.request

    from flask import abort
    from werkzeug.serving import make_server

    app = make_app(TORCHPOOL_START="lazy", TORCHPOOL_HEALTH_URL="/torchpool")
    TorchPool(app)
    public = make_server("127.0.0.1", 0, app, threaded=True)
    operator = make_server("127.0.0.1", 0, app, threaded=True)
    operator_port = operator.server_address[1]

    @app.before_request
    def operator_only() -> None:
        if request.path.startswith(("/torchpool/status", "/torchpool/metrics")):
            sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
            if sock is None or sock.getsockname()[1] != operator_port:
                abort(404)

    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (public, operator)]
    for t in threads:
        t.start()

    def get(server: Any, path: str, host: str | None = None) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}{path}")
        if host:
            req.add_header("Host", host)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    try:
        assert get(public, "/torchpool/status") == 404
        assert get(public, "/torchpool/status", host=f"127.0.0.1:{operator_port}") == 404
        assert get(public, "/torchpool/live") == 200
        assert get(operator, "/torchpool/status") == 200
    finally:
        for s in (public, operator):
            s.shutdown()
            s.server_close()
        for t in threads:
            t.join(10)
