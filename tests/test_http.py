"""The pool behind a real HTTP server: Werkzeug's threaded server on 127.0.0.1, real sockets, real clients.

The test client runs a view in the test's own thread; here requests arrive on the server's threads, so
two of them can wait on the pool at once. What is checked is measured inside the workers (their pids
and the times their calls ran), never the wall-clock time seen by the client.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import torch
from flask import Flask, request
from werkzeug.serving import BaseWSGIServer, make_server

from flask_torchpool import ModelProxy, TorchPool

from .conftest import child_pids, make_app, shm_entries, wait_until
from .servers import new_shm_entries

pytestmark = pytest.mark.timeout(120)

#: How long each of the two concurrent calls holds its worker. The calls are sent together, so the
#: second reaches its worker long before the first is done; the overlap itself is measured, not assumed.
SPIN_SECONDS = 3.0


def _build_app() -> tuple[Flask, TorchPool]:
    # TESTING off: errors must render as they would in production, not propagate.
    app = make_app(TORCHPOOL_WORKERS=2, TESTING=False)
    pool = TorchPool(app)

    @app.get("/spin")
    @pool.infer
    def spin(model: ModelProxy) -> Any:
        return model(action="spin", seconds=float(request.args["seconds"]))

    @app.post("/echo")
    @pool.infer
    def echo(model: ModelProxy) -> Any:
        body = request.get_json()
        x = torch.tensor(body["x"], dtype=torch.float32, requires_grad=body.get("requires_grad", False))
        return {"x": model(x).tolist()}

    @app.get("/raise")
    @pool.infer
    def fail(model: ModelProxy) -> Any:
        return model(action="raise")

    @app.get("/pid")
    @pool.infer
    def pid(model: ModelProxy) -> Any:
        return {"pid": model(action="pid")}

    @app.get("/status")
    def status() -> Any:
        return pool.status()

    return app, pool


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """A two-worker pool behind Werkzeug's threaded server on a free port; all stopped afterwards."""
    before_children, before_shm = child_pids(), shm_entries()
    app, pool = _build_app()
    server: BaseWSGIServer | None = None
    thread: threading.Thread | None = None
    try:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, name="test-http-server", daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(10)
        pool.shutdown(app=app)
    assert thread is None or not thread.is_alive(), "the HTTP server thread did not stop"
    assert wait_until(lambda: not (child_pids() - before_children), timeout=10), (
        f"worker processes outlived the server: {child_pids() - before_children}")
    assert not new_shm_entries(before_shm), f"/dev/shm entries leaked: {new_shm_entries(before_shm)}"


def _worker_pids(base_url: str) -> set[int]:
    status = requests.get(f"{base_url}/status", timeout=30).json()
    assert [w["state"] for w in status["workers"]] == ["ready", "ready"], status
    return {w["pid"] for w in status["workers"]}


def test_two_requests_run_at_the_same_time_in_two_workers(base_url: str) -> None:
    workers = _worker_pids(base_url)
    both_sent = threading.Barrier(2, timeout=30)
    answers: list[requests.Response | BaseException] = [None, None]  # type: ignore[list-item]

    def client(i: int) -> None:
        try:
            with requests.Session() as session:
                both_sent.wait()
                answers[i] = session.get(f"{base_url}/spin", params={"seconds": SPIN_SECONDS}, timeout=60)
        except BaseException as exc:  # reported by the main thread
            answers[i] = exc

    clients = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(90)
    assert not any(t.is_alive() for t in clients), "a client got no answer"
    for answer in answers:
        assert isinstance(answer, requests.Response), answer
        assert answer.status_code == 200, answer.text
    runs = [answer.json() for answer in answers]  # type: ignore[union-attr]

    pids = {run["pid"] for run in runs}
    assert pids == workers, f"the two calls ran in {pids}, not in the two workers {workers}"
    # Times taken inside the workers: each interval is when a worker was running that call.
    assert max(r["start"] for r in runs) < min(r["end"] for r in runs), (
        f"the two calls did not overlap: {runs}")


def test_echo_round_trip_over_http(base_url: str) -> None:
    answer = requests.post(f"{base_url}/echo", json={"x": [1.5, -2.0, 3.25]}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"x": [1.5, -2.0, 3.25]}


def test_bad_input_is_a_json_400_and_the_model_raising_a_json_500(base_url: str) -> None:
    workers = _worker_pids(base_url)

    bad = requests.post(f"{base_url}/echo", json={"x": [1.0, 2.0], "requires_grad": True}, timeout=30)
    assert bad.status_code == 400, bad.text
    assert bad.headers["Content-Type"] == "application/json"
    body = bad.json()
    assert body["type"] == "InvalidInputError"
    assert "requires grad" in body["error"] and "detach()" in body["error"], body

    failed = requests.get(f"{base_url}/raise", timeout=30)
    assert failed.status_code == 500, failed.text
    assert failed.headers["Content-Type"] == "application/json"
    body = failed.json()
    assert body["type"] == "InferenceError"
    assert body["remote_type"] == "ValueError"
    assert "bad shape: expected 4 features, got 3" in body["error"], body
    assert "Traceback" not in failed.text, "the worker's traceback must stay in the log"

    # The server and the same two workers go on serving.
    for _ in range(4):
        answer = requests.get(f"{base_url}/pid", timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["pid"] in workers
    ok = requests.post(f"{base_url}/echo", json={"x": [4.0]}, timeout=30)
    assert ok.status_code == 200 and ok.json() == {"x": [4.0]}, ok.text
    status = requests.get(f"{base_url}/status", timeout=30).json()
    assert {w["pid"] for w in status["workers"]} == workers, status
    assert all(w["restarts"] == 0 and w["state"] == "ready" for w in status["workers"]), status
