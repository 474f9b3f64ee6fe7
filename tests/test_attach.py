"""One pool per host: a pool server and the web processes that attach to it (TORCHPOOL_MODE).

The first half runs a pool server in this process (a started pool plus :class:`PoolServer` on a socket
in a temp dir) and an app in ``"attach"`` mode beside it. The second half runs real gunicorn masters
with several web workers, ``flask torchpool serve`` and the gunicorn.conf.py hook, over real HTTP, and
kills web workers and the pool server with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import torch
from flask import Flask

from flask_torchpool import (
    ConfigError,
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    PoolUnavailableError,
    RemoteTraceback,
    TorchPool,
    TorchPoolError,
    codec,
    messages,
    shm,
)
from flask_torchpool.attach import rendezvous
from flask_torchpool.attach.client import PoolConnection, _Pending
from flask_torchpool.attach.server import PoolServer

from .conftest import make_app, shm_entries, wait_until
from .servers import (
    ROOT,
    Server,
    all_children,
    cmdline,
    connectable,
    free_port,
    new_shm_entries,
    nice_of,
    pid_alive,
    pool_server,
    pool_workers_below,
    running,
    server_env,
    wait_gone,
)

pytestmark = pytest.mark.timeout(120)


# --- a pool server in this process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def socket_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("attach") / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture(scope="module")
def served(socket_dir: Path) -> Iterator[PoolServer]:
    """A one-worker echo pool served on a socket, as ``flask torchpool serve`` would."""
    with pool_server(socket_dir / "pool.sock", TORCHPOOL_WORKERS=1, TORCHPOOL_ARENA_BYTES=8 << 20) as server:
        yield server


@pytest.fixture(scope="module")
def web(served: PoolServer) -> Iterator[tuple[Flask, TorchPool]]:
    """An app attached to the server: the same views as an embedded one."""
    app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=served.path, TORCHPOOL_ARENA_BYTES=4 << 20,
                   TORCHPOOL_HEALTH_URL="/torchpool")
    pool = TorchPool(app)

    @app.post("/echo")
    @pool.infer
    def echo(model):  # type: ignore[no-untyped-def]
        out = model(torch.arange(6.0).reshape(2, 3), tag="x")
        return {"args": [a.tolist() for a in out["args"]], "kwargs": out["kwargs"]}

    @app.post("/raise")
    @pool.infer
    def fails(model):  # type: ignore[no-untyped-def]
        return {"out": model(torch.ones(1), action="raise")}

    @app.post("/sleep")
    @pool.infer(timeout=0.5)
    def sleeps(model):  # type: ignore[no-untyped-def]
        return {"out": model(torch.ones(1), action="sleep", seconds=30)}

    @app.post("/bad")
    @pool.infer
    def bad(model):  # type: ignore[no-untyped-def]
        return {"out": model(object())}

    yield app, pool
    pool.shutdown(app=app)


def test_attached_app_serves_through_the_server(web: tuple[Flask, TorchPool], served: PoolServer) -> None:
    app, pool = web
    resp = app.test_client().post("/echo")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.json == {"args": [[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]], "kwargs": {"tag": "x"}}
    with app.app_context():
        big = torch.randn(512, 1024)          # 2 MiB: comes back as a zero-copy view of our arena
        assert torch.equal(pool(big), big)
        nested = pool({"a": [torch.ones(3), 2.5, "s", None]}, key=(1, torch.zeros(2, dtype=torch.int64)))
        assert torch.equal(nested["args"][0]["a"][0], torch.ones(3))
        assert nested["kwargs"]["key"][0] == 1
        status = pool.status()
    assert status["mode"] == "attach" and status["ready"] is True, status
    assert status["server"]["pid"] == os.getpid()
    assert [w["state"] for w in status["workers"]] == ["ready"]
    assert served.clients >= 1


def test_health_and_metrics_report_the_servers_pool(web: tuple[Flask, TorchPool],
                                                     served: PoolServer) -> None:
    app, pool = web
    client = app.test_client()
    with app.app_context():
        pool(torch.ones(1))
    ready = client.get("/torchpool/ready")
    assert ready.status_code == 200, ready.json
    status = client.get("/torchpool/status").json
    assert status["mode"] == "attach" and status["server"]["pid"] == os.getpid()
    assert status["workers"][0]["pid"] == served.pools["default"].workers[0].pid
    metrics = client.get("/torchpool/metrics").get_data(as_text=True)
    calls = [line for line in metrics.splitlines()
             if line.startswith("torchpool_calls_total{") and 'outcome="ok"' in line]
    assert calls and float(calls[0].rsplit(" ", 1)[1]) >= 1, metrics


def test_errors_cross_with_their_class_status_and_traceback(web: tuple[Flask, TorchPool]) -> None:
    app, pool = web
    client = app.test_client()
    resp = client.post("/raise")
    assert resp.status_code == 500 and resp.json["type"] == "InferenceError", resp.json
    assert "bad shape" in resp.json["error"]
    with app.app_context(), pytest.raises(InferenceError) as info:
        pool(torch.ones(1), action="raise")
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "ValueError" in info.value.__cause__.tb
    resp = client.post("/sleep")
    assert resp.status_code == 504 and resp.json["type"] == "InferenceTimeoutError", resp.json
    resp = client.post("/bad")  # refused in this process: nothing is sent
    assert resp.status_code == 400 and resp.json["type"] == "InvalidInputError", resp.json
    with app.app_context():
        with pytest.raises(InferenceTimeoutError):
            pool.model(timeout=0.2)(torch.ones(1), action="sleep", seconds=30)
        assert torch.equal(pool(torch.ones(2)), torch.ones(2))  # still serving


def test_a_forged_header_cannot_reach_outside_its_arena(served: PoolServer) -> None:
    conn = PoolConnection(served.path, 1 << 20)
    conn.connect()
    link = conn._link
    assert link is not None
    outside = shm.TensorRef(-1, 64 << 20, 4096, "torch.uint8", (4096,))   # past the end of the arena
    mismatch = shm.TensorRef(-1, link.arena.inputs[0], 4096, "torch.float32", (4096,))
    for call_id, ref in enumerate((outside, mismatch), start=10**9):
        forged: Future = Future()
        forged.set_running_or_notify_cancel()
        with conn._lock:
            conn._pending[call_id] = _Pending(forged, [])
        link.channel.send(messages.RemoteCall(call_id, None, (codec.Slot(0),), {}, (ref,), 5.0, False, ()))
        with pytest.raises(InvalidInputError, match="outside|does not match"):
            forged.result(10)
    assert torch.equal(conn.submit(None, (torch.ones(3),), {}, 5.0, False, 1 << 20).result(10),
                       torch.ones(3))
    conn.close()


def _client_arenas() -> dict[str, int]:
    """Inode of each client arena mapped in this process -> how many mappings of it."""
    found: dict[str, int] = {}
    with open("/proc/self/maps") as f:
        for line in f:
            if "memfd:torchpool-client" in line:
                inode = line.split()[4]
                found[inode] = found.get(inode, 0) + 1
    return found


def test_a_client_that_goes_away_loses_only_its_calls_and_its_arena_is_unmapped(
        served: PoolServer, web: tuple[Flask, TorchPool]) -> None:
    app, pool = web
    with app.app_context():
        pool(torch.ones(1))  # the shared web app is attached
    before, before_clients = _client_arenas(), served.clients
    conn = PoolConnection(served.path, 1 << 20)
    slow = conn.submit(None, (torch.ones(1),), {"action": "sleep", "seconds": 1.0}, 10.0, False, 1 << 20)
    wait_until(lambda: served.clients == before_clients + 1, timeout=10)
    (arena,) = set(_client_arenas()) - set(before)
    assert _client_arenas()[arena] == 2     # mapped here by the client and by the server, by no one else
    conn.close()                            # goes away with a call in flight
    with pytest.raises(PoolUnavailableError):
        slow.result(10)
    with app.app_context():
        assert torch.equal(pool(torch.ones(2)), torch.ones(2))   # the others are served meanwhile
    assert wait_until(lambda: served.clients == before_clients, timeout=10)
    del slow
    assert wait_until(lambda: arena not in _client_arenas(), timeout=15), "the arena stayed mapped"


def test_batches_mix_calls_from_different_web_processes(socket_dir: Path) -> None:
    app = make_app(TORCHPOOL_MODEL="tests.models:batch_probe", TORCHPOOL_MAX_BATCH_SIZE=8,
                   TORCHPOOL_MAX_BATCH_DELAY_MS=10_000, TORCHPOOL_ARENA_BYTES=8 << 20,
                   TORCHPOOL_SPLIT_BATCHES=False)   # one batch, whole (batch splitting: test_batching.py)
    pool = TorchPool(app)
    server = PoolServer({"default": app.extensions["torchpool"].pool}, str(socket_dir / "batch.sock"))
    server.start()
    a, b = PoolConnection(server.path, 1 << 20), PoolConnection(server.path, 1 << 20)
    try:
        hold = a.submit(None, (), {"action": "sleep", "seconds": 1.0}, 30.0, True, 1 << 20)
        # The worker must be busy before the others arrive (each connection has its own reader thread
        # in the server, so nothing orders calls from different connections).
        assert wait_until(lambda: app.extensions["torchpool"].pool.status()["busy_workers"] == 1,
                          timeout=10, interval=0.005)
        futures = [conn.submit(None, (torch.full((1, 3), float(i)),), {}, 30.0, True, 1 << 20)
                   for i in range(4) for conn in (a, b)]
        hold.result(30)
        results = [f.result(30) for f in futures]
        # One batch of 8 rows: four from each connection, split back to the right callers.
        assert [int(r["n"][0]) for r in results] == [8] * 8
        for i, r in enumerate(results):
            assert torch.equal(r["y"], torch.full((1, 3), float(i // 2) + 1))
    finally:
        a.close()
        b.close()
        server.stop(drain_timeout=5)
        pool.shutdown(app=app)


def test_several_models_are_served_by_name(socket_dir: Path) -> None:
    models = {"echo": {"model": "tests.models:echo", "workers": 1},
              "linear": {"model": "tests.models:linear", "workers": 1}}
    app = make_app(TORCHPOOL_MODEL=None, TORCHPOOL_MODELS=models, TORCHPOOL_ARENA_BYTES=8 << 20)
    TorchPool(app)
    server = PoolServer(app.extensions["torchpool"].start(), str(socket_dir / "models.sock"))
    server.start()
    web = make_app(TORCHPOOL_MODEL=None, TORCHPOOL_MODELS=models, TORCHPOOL_MODE="attach",
                   TORCHPOOL_SOCKET=server.path, TORCHPOOL_ARENA_BYTES=4 << 20)
    web_pool = TorchPool(web)
    try:
        x = torch.randn(2, 4)
        with web.app_context():
            assert torch.equal(web_pool.model("echo")(x), x)
            from .models import linear

            assert torch.allclose(web_pool.model("linear")(x), linear()(x))
            status = web_pool.status()
        assert set(status["models"]) == {"echo", "linear"}
        assert status["ready"] is True, status
        assert {w["model"] for w in status["workers"]} == {"echo", "linear"}
    finally:
        web_pool.shutdown(app=web)
        server.stop(drain_timeout=5)


def test_a_second_server_for_the_same_socket_is_refused(served: PoolServer) -> None:
    with pytest.raises(TorchPoolError, match="already serves"):
        PoolServer(served.pools, served.path).start()


def test_the_socket_directory_must_be_private(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=str(shared / "p.sock"),
                   TORCHPOOL_START="lazy")
    pool = TorchPool(app)
    with app.app_context(), pytest.raises(ConfigError, match="TORCHPOOL_SOCKET.*accessible"):
        pool.start()
    created = tmp_path / "new" / "p.sock"
    app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=str(created), TORCHPOOL_START="lazy",
                   TORCHPOOL_START_TIMEOUT=1)
    pool = TorchPool(app)
    with app.app_context():
        pool.start()   # no server there yet: starts detached and answers 503
    assert stat.S_IMODE(os.stat(created.parent).st_mode) == 0o700


def test_without_a_server_calls_answer_503_at_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=str(run / "none.sock"),
                   TORCHPOOL_HEALTH_URL="/torchpool")
    pool = TorchPool(app)  # starts (attaches) now: no server, so it stays detached

    @app.post("/p")
    @pool.infer
    def predict(model):  # type: ignore[no-untyped-def]
        return {"out": model(torch.ones(1)).tolist()}

    resp = app.test_client().post("/p")
    assert resp.status_code == 503, resp.get_data(as_text=True)
    assert resp.json["type"] == "PoolUnavailableError" and "not running" in resp.json["error"]
    assert resp.headers["Retry-After"] == "1"
    ready = app.test_client().get("/torchpool/ready")
    assert ready.status_code == 503 and "no pool server serves this app" in ready.json["reason"], ready.json
    with app.app_context():
        assert pool.status()["ready"] is False


@pytest.mark.parametrize("key, value", [("TORCHPOOL_MODE", "shared"), ("TORCHPOOL_SOCKET", 3),
                                        ("TORCHPOOL_SOCKET", "/" + "x" * 200)])
def test_bad_mode_settings_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        TorchPool(make_app(**{key: value, "TORCHPOOL_START": "lazy"}))


# --- real servers --------------------------------------------------------------------------------------

WORKERS = 2

APP_SOURCE = f'''\
import os

import torch
from flask import Flask, request

from flask_torchpool import TorchPool

app = Flask(__name__)
app.config["TORCHPOOL_MODEL"] = "tests.models:echo"
app.config["TORCHPOOL_WORKERS"] = {WORKERS}
app.config["TORCHPOOL_DEVICES"] = "cpu"
app.config["TORCHPOOL_ARENA_BYTES"] = 8 << 20
app.config["TORCHPOOL_MODE"] = os.environ.get("APP_MODE", "auto")
app.config["TORCHPOOL_SOCKET"] = os.environ["APP_SOCKET"]
app.config["TORCHPOOL_HEALTH_URL"] = "/torchpool"
pool = TorchPool(app)


@app.get("/pid")
@pool.infer
def pid(model):
    return {{"web": os.getpid(), "worker": model(action="pid")}}


@app.get("/sleep")
@pool.infer
def sleep(model):
    return {{"out": model(torch.ones(1), action="sleep", seconds=60).tolist()}}


@app.post("/sum")
@pool.infer
def total(model):
    x = pool.tensor_from_stream(request.stream, torch.float32, (-1,))
    return {{"n": x.numel(), "sum": float(model(x).double().sum())}}
'''


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "attach_app.py").write_text(APP_SOURCE)
    (tmp_path / "run").mkdir(mode=0o700)
    before = shm_entries()
    yield tmp_path
    assert not new_shm_entries(before), f"/dev/shm entries leaked: {new_shm_entries(before)}"


def _env(project: Path, mode: str) -> dict[str, str]:
    return server_env(project, APP_MODE=mode, APP_SOCKET=str(project / "run" / "pool.sock"))


def _gunicorn(port: int, workers: int, *extra: str) -> list[str]:
    pytest.importorskip("gunicorn", reason="gunicorn is in the test extra: pip install -e '.[test]'")
    return [sys.executable, "-m", "gunicorn", "-k", "sync", "-w", str(workers), "-b", f"127.0.0.1:{port}",
            "--graceful-timeout", "10", *extra, "attach_app:app"]


def _pool_servers(project: Path) -> set[int]:
    """The pool servers of *project*'s app: servers started for another test run's ``attach_app`` on
    this machine (a session running the suite beside this one) are not ours."""
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and pid_alive(int(p))
            and "flask_torchpool.server" in cmdline(int(p)) and "--app attach_app" in cmdline(int(p))
            and _started_for(int(p), project)}


def _started_for(pid: int, project: Path) -> bool:
    """Whether process *pid* inherited *project*'s environment (APP_SOCKET names a file in it)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"APP_SOCKET={project}/".encode() in f.read()
    except OSError:
        return False


def _server_status(server: Server) -> dict:
    return server.get("/torchpool/status").json()


def _wait_ok(server: Server, path: str = "/pid", timeout: float = 90.0, also: Server | None = None) -> dict:
    def ok() -> dict | None:
        try:
            resp = server.get(path, timeout=30)
        except requests.RequestException:
            return None
        return resp.json() if resp.status_code == 200 else None

    answer = wait_until(ok, timeout=timeout, interval=0.1)
    assert answer, f"{path} never answered 200:\n{server.log()}\n{also.log() if also else ''}"
    return answer


def _web_workers(server: Server) -> set[int]:
    return {p for p in all_children(server.pid) if "gunicorn" in cmdline(p)}


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(300)
def test_gunicorn_w3_auto_mode_shares_one_pool(project: Path) -> None:
    port = free_port()
    with running(_gunicorn(port, 3), port, project / "server.log", _env(project, "auto")) as server:
        _wait_ok(server)
        servers = _pool_servers(project)
        assert len(servers) == 1, f"expected one pool server, found {servers}:\n{server.log()}"
        (pool_server,) = servers
        try:
            workers = pool_workers_below(pool_server)
            assert len(workers) == WORKERS, server.log()
            # TORCHPOOL_WORKER_NICE "auto" behind gunicorn sync workers (the first one said so when it
            # started the server): the workers keep the web processes' priority.
            assert "--sync-web" in cmdline(pool_server), cmdline(pool_server)
            assert {nice_of(w) for w in workers} == {0}, server.log()
            # One set of model workers on the host: none below gunicorn, none elsewhere for this app.
            assert not pool_workers_below(server.pid) - workers, "a web worker started its own pool"
            webs = wait_until(lambda: len(_web_workers(server)) == 3 and _web_workers(server), timeout=30)
            assert wait_until(lambda: _server_status(server)["server"]["clients"] == 3, timeout=60), \
                _server_status(server)
            # TORCHPOOL_WEB_AFFINITY "auto": each sync web worker is on the cores of one model worker,
            # and the three are spread over both model workers (Note [Web affinity]).
            model_cores = {frozenset(os.sched_getaffinity(w)) for w in workers}
            web_cores = [frozenset(os.sched_getaffinity(w)) for w in webs]
            assert set(web_cores) <= model_cores and len(set(web_cores)) == len(model_cores), \
                (web_cores, model_cores)
            with ThreadPoolExecutor(6) as ex:
                answers = list(ex.map(lambda _: server.get("/pid").json(), range(60)))
            assert {a["worker"] for a in answers} <= workers
            assert {a["web"] for a in answers} <= webs

            # Raw bodies under gunicorn (request.stream is its own reader: -1 from Content-Length),
            # small and big (a body buffer sent to the worker): right answers, and a 400 for a bad one.
            url = f"http://127.0.0.1:{port}/sum"
            for n in (3, 3 << 18):
                x = torch.arange(n, dtype=torch.float32)
                got = requests.post(url, data=x.numpy().tobytes(), timeout=60)
                assert got.status_code == 200 and got.json() == {"n": n, "sum": float(x.double().sum())}, \
                    got.text
            got = requests.post(url, data=b"\0" * 6, timeout=60)
            assert got.status_code == 400 and got.json()["type"] == "InvalidInputError", got.text

            # kill -9 of one web worker: gunicorn replaces it, the server forgets it and serves on.
            fds_before = _fds(pool_server)
            victim = next(iter(webs))
            os.kill(victim, signal.SIGKILL)
            assert wait_until(lambda: victim not in _web_workers(server)
                              and len(_web_workers(server)) == 3, timeout=60), server.log()
            _wait_ok(server)
            assert wait_until(lambda: _server_status(server)["server"]["clients"] == 3, timeout=60)
            assert wait_until(lambda: _fds(pool_server) == fds_before, timeout=30), \
                "the dead web worker's connection or arena was not reclaimed"
            assert pool_workers_below(pool_server) == workers, "the model workers were disturbed"

            # kill -9 of the pool server: a call in flight fails at once with 503, and the next call
            # starts a new server (auto mode) and is served by it.
            with ThreadPoolExecutor(1) as ex:
                slow = ex.submit(server.get, "/sleep")
                assert wait_until(lambda: any(w["inflight"] for w in _server_status(server)["workers"]),
                                  timeout=30)
                os.kill(pool_server, signal.SIGKILL)
                resp = slow.result(30)
            assert resp.status_code == 503, resp.text
            assert resp.json()["type"] == "PoolUnavailableError" and resp.headers["Retry-After"]
            assert not wait_gone(workers), "the dead server's model workers outlived it"
            answer = _wait_ok(server)
            (new_server,) = wait_until(lambda: len(_pool_servers(project)) == 1 and _pool_servers(project),
                                       timeout=30)
            assert new_server != pool_server
            assert answer["worker"] in pool_workers_below(new_server)
            pool_server = new_server
            workers = pool_workers_below(new_server)
        finally:
            server.proc.send_signal(signal.SIGTERM)
            server.wait_exit(60)
        # The server is owned by the master: it drains and exits with it, workers and all.
        assert not wait_gone({pool_server} | workers, timeout=60), f"outlived gunicorn:\n{server.log()}"


def test_a_web_worker_whose_master_died_starts_no_server(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """deploying.rst: the server stops with the master, even after kill -9. A web worker still alive then
    missed it and started another, owned by its new parent (init): that one never stopped, and the next
    deployment on the socket attached to it and got its models. Once this process's parent is no longer
    the master it had, missing the server starts none and fails the call."""
    app = make_app(TORCHPOOL_MODE="auto", TORCHPOOL_START="lazy", TORCHPOOL_RESTART_WINDOW=0.001,
                   TORCHPOOL_SOCKET=str(tmp_path / "run" / "pool.sock"))
    TorchPool(app)
    state = app.extensions["torchpool"]
    state.app_import = "attach_app:app"   # as gunicorn's app loading sets it
    owners: list[int] = []
    monkeypatch.setattr(rendezvous, "ensure_server",
                        lambda app_import, path, owner_pid, sync_web=False: owners.append(owner_pid))
    assert state._attaches()
    master = os.getppid()
    assert owners == [master]
    monkeypatch.setattr(os, "getppid", lambda: 1)   # the master died: this process was reparented
    with pytest.raises(PoolUnavailableError, match=rf"the gunicorn master \(pid {master}\) .* is gone"):
        state.connection.on_missing()
    assert owners == [master]


def test_auto_modes_missing_server_error_says_where_its_error_is() -> None:
    """It told users of auto mode to use auto mode; in the web worker whose server exited it names it."""
    from flask_torchpool.attach.client import _missing_hint

    assert "flask torchpool serve" in _missing_hint(False, None)
    assert "the web server's log has the server's error" in _missing_hint(True, None)
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    failed.wait(30)
    hint = _missing_hint(True, SimpleNamespace(process=failed))  # type: ignore[arg-type]
    assert f"(pid {failed.pid}) exited with code 3 before it served" in hint, hint


GUNICORN_CONF = "from flask_torchpool.gunicorn import on_exit, on_starting  # noqa: F401\n"


@pytest.mark.timeout(300)
def test_gunicorn_hook_starts_the_server_in_the_master_before_fork(project: Path) -> None:
    (project / "gunicorn.conf.py").write_text(GUNICORN_CONF)
    port = free_port()
    argv = _gunicorn(port, 2, "-c", str(project / "gunicorn.conf.py"))
    with running(argv, port, project / "server.log", _env(project, "attach"), cwd=project) as server:
        _wait_ok(server)
        (pool_server,) = _pool_servers(project)
        try:
            children = all_children(server.pid)
            assert pool_server in children, "the hook's server is not the master's child"
            assert len(children - {pool_server}) == 2, children
            # The master loaded neither torch nor the app: nothing to break across fork.
            with open(f"/proc/{server.pid}/maps") as f:
                assert "libtorch" not in f.read(), "the gunicorn master mapped torch"
            assert len(pool_workers_below(pool_server)) == WORKERS
            assert not pool_workers_below(server.pid) - pool_workers_below(pool_server)
            # The hook saw gunicorn's sync workers: TORCHPOOL_WORKER_NICE "auto" is 0.
            assert {nice_of(w) for w in pool_workers_below(pool_server)} == {0}, cmdline(pool_server)
            assert wait_until(lambda: _server_status(server)["server"]["clients"] == 2, timeout=60), \
                _server_status(server)
            workers = pool_workers_below(pool_server)
        finally:
            server.proc.send_signal(signal.SIGTERM)
            code = server.wait_exit(60)
        assert code == 0, server.log()
        assert not wait_gone({pool_server} | workers, timeout=30), server.log()
        assert "serves" in server.log()


@pytest.mark.timeout(300)
def test_flask_torchpool_serve_restart_and_reconnect(project: Path) -> None:
    env = _env(project, "attach")
    port = free_port()
    serve = [sys.executable, "-m", "flask", "--app", "attach_app", "torchpool", "serve"]
    sock = project / "run" / "pool.sock"
    with running(serve, 0, project / "serve.log", env, cwd=project) as pool_proc, \
            running(_gunicorn(port, 2), port, project / "server.log", env, cwd=project) as web:
        wait_until(lambda: connectable(sock) or pool_proc.proc.poll() is not None, timeout=90)
        assert pool_proc.proc.poll() is None, pool_proc.log()
        first = _wait_ok(web, also=pool_proc)
        workers = pool_workers_below(pool_proc.pid)
        assert first["worker"] in workers and len(workers) == WORKERS
        assert not pool_workers_below(web.pid), "a web worker started its own pool"
        # operating.rst: it logs (at INFO, the app configuring no logging) what it serves and who attaches.
        assert wait_until(lambda: "web process" in pool_proc.log(), timeout=10), pool_proc.log()
        assert f"serving default on {sock}" in pool_proc.log() and " attached" in pool_proc.log()

        os.kill(pool_proc.pid, signal.SIGKILL)
        assert not wait_gone(workers), "model workers outlived their server"
        resp = web.get("/pid")
        assert resp.status_code == 503 and resp.json()["type"] == "PoolUnavailableError", resp.text
        assert resp.headers["Retry-After"] == "1"

        with running(serve, 0, project / "serve2.log", env, cwd=project) as again:
            answer = _wait_ok(web)
            assert answer["worker"] in pool_workers_below(again.pid)
            again.proc.send_signal(signal.SIGTERM)
            assert again.wait_exit(60) == 0, again.log()
        assert not sock.exists(), "the server left its socket behind"
        web.proc.send_signal(signal.SIGTERM)
        assert web.wait_exit(60) == 0, web.log()


def test_the_gunicorn_hook_module_imports_no_torch() -> None:
    code = "import sys, flask_torchpool.gunicorn; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("options", "sync"), [({}, True), ({"threads": 4}, False),
                                                ({"worker_class": "gthread"}, False)])
def test_the_gunicorn_hook_tells_the_server_whether_the_web_workers_are_sync(options: dict,
                                                                           sync: bool) -> None:
    # TORCHPOOL_WORKER_NICE "auto" (flask torchpool serve --sync-web): -k sync without --threads only.
    config = pytest.importorskip("gunicorn.config")
    from flask_torchpool.gunicorn import _sync_workers

    cfg = config.Config()
    for key, value in options.items():
        cfg.set(key, value)
    assert _sync_workers(SimpleNamespace(cfg=cfg)) is sync


NUMPY_WEB = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from flask import Flask, request
from flask_torchpool import OutputError, TorchPool

app = Flask("numpy_web")
app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=sys.argv[1],
                  TORCHPOOL_ARENA_BYTES=4 << 20, TORCHPOOL_HEALTH_URL="/torchpool",
                  TORCHPOOL_HANDLE_SIGTERM=False, TORCHPOOL_HANDLE_SIGHUP=False, TORCHPOOL_ERROR_DETAILS=True)
pool = TorchPool(app)


@app.post("/predict")
@pool.infer
def predict(model):
    x = np.frombuffer(request.get_data(), dtype=np.float32).reshape(-1, 4)
    y = model(x)
    return {"type": type(y).__name__, "dtype": str(y.dtype), "rows": y.tolist()}


@app.post("/body")
@pool.infer
def body(model):
    x = pool.tensor_from_stream(request.stream, np.float32, (-1,))   # 3 MiB: a body buffer, no torch
    y = model(x)
    same = bool(np.array_equal(y, x))
    return {"type": type(x).__name__, "same": same, "sum": float(y.sum(dtype=np.float64))}


client = app.test_client()
out = {"predict": client.post("/predict", data=np.arange(8, dtype=np.float32).tobytes()).get_json()}
out["body"] = client.post("/body", data=np.ones(3 << 18, dtype=np.float32).tobytes()).get_json()
with app.app_context():
    proxy = pool.model()
    big = np.arange(1 << 20, dtype=np.float32)         # 4 MiB: more than the arena holds, a one-off memfd
    wide = np.ones((512, 256), dtype=np.float64)         # 1 MiB: a zero-copy output
    back = proxy(big, wide[:, ::2], tag="x")
    out["big"] = [type(back["args"][0]).__name__, bool(np.array_equal(back["args"][0], big))]
    out["wide"] = bool(np.array_equal(back["args"][1], wide[:, ::2])) and back["kwargs"] == {"tag": "x"}
    chunks = list(proxy.stream(np.zeros(1, np.float32), action="yield", n=3))
    out["stream"] = [type(c).__name__ for c in chunks]
    try:
        proxy(np.ones(2, np.float32), action="cast", dtype="bfloat16")
    except OutputError as exc:
        out["bf16"] = str(exc)
    rows = [np.full((1, 4), i, np.float32) for i in range(16)]   # batched, when the server batches
    with ThreadPoolExecutor(8) as threads:
        backs = list(threads.map(lambda x: pool.submit(x).result(60), rows))
    out["rows"] = all(type(b).__name__ == "ndarray" and np.array_equal(b, x) for b, x in zip(backs, rows))
out["status"] = client.get("/torchpool/status").status_code
out["metrics"] = client.get("/torchpool/metrics").status_code
out["torch"] = "torch" in sys.modules
pool.shutdown(app=app)
print(json.dumps(out))
"""


def test_a_web_process_that_passes_numpy_arrays_never_imports_torch(served: PoolServer) -> None:
    """Note [Arrays without torch]: an attached web process whose views pass numpy arrays gets numpy
    arrays back, on lanes, through the server (streams) and over one-off segments, and never loads
    torch (~150 MiB of private memory a process)."""
    done = subprocess.run([sys.executable, "-c", NUMPY_WEB, served.path], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["predict"] == {"type": "ndarray", "dtype": "float32", "rows": [[0, 1, 2, 3], [4, 5, 6, 7]]}
    assert out["body"] == {"type": "ndarray", "same": True, "sum": float(3 << 18)}, out
    assert out["big"] == ["ndarray", True] and out["wide"] is True, out
    assert out["stream"] == ["ndarray", "dict", "ndarray"], out
    assert "bfloat16 tensor has no numpy dtype" in out["bf16"], out
    assert (out["status"], out["metrics"]) == (200, 200), out
    assert out["rows"] is True, out
    assert out["torch"] is False, "the web process imported torch"


NUMPY_SERVE = """
import os
from flask import Flask
from flask_torchpool import TorchPool

app = Flask("numpy_serve")
app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_SOCKET=os.environ["APP_SOCKET"],
                  TORCHPOOL_WORKERS=1, TORCHPOOL_MAX_BATCH_SIZE=8, TORCHPOOL_ARENA_BYTES=4 << 20,
                  TORCHPOOL_ERROR_DETAILS=True)
pool = TorchPool(app)
"""


@pytest.mark.timeout(240)
def test_a_pool_server_serving_numpy_callers_never_loads_torch(tmp_path: Path) -> None:
    """Note [A pool server without torch]: a pool server whose app imports no torch, serving web processes
    that pass numpy arrays (batched through the server, streamed, over one-off segments, with a dtype
    numpy lacks refused), never maps libtorch: only its model workers do. A torch caller is served too
    (the server loads torch for it)."""
    (tmp_path / "numpy_serve.py").write_text(NUMPY_SERVE)
    (tmp_path / "run").mkdir(mode=0o700)
    sock = tmp_path / "run" / "pool.sock"
    serve = [sys.executable, "-m", "flask", "--app", "numpy_serve", "torchpool", "serve"]
    env = server_env(tmp_path, APP_SOCKET=str(sock))
    with running(serve, 0, tmp_path / "serve.log", env, cwd=tmp_path) as server:
        assert wait_until(lambda: connectable(sock) or server.proc.poll() is not None, timeout=90)
        assert server.proc.poll() is None, server.log()
        done = subprocess.run([sys.executable, "-c", NUMPY_WEB, str(sock)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert out["predict"] == {"type": "ndarray", "dtype": "float32", "rows": [[0, 1, 2, 3], [4, 5, 6, 7]]}
        assert out["body"] == {"type": "ndarray", "same": True, "sum": float(3 << 18)}, out
        assert out["big"] == ["ndarray", True] and out["wide"] is True and out["rows"] is True, out
        assert out["stream"] == ["ndarray", "dict", "ndarray"], out
        assert "bfloat16 tensor has no numpy dtype" in out["bf16"], out
        assert "libtorch" not in Path(f"/proc/{server.pid}/maps").read_text(), "the pool server loaded torch"
        app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=str(sock))
        pool = TorchPool(app)
        try:
            with app.app_context():
                counters = pool.status()["counters"]
                assert counters["batches"] >= 1, counters  # the calls went through the server's batches
                assert "libtorch" not in Path(f"/proc/{server.pid}/maps").read_text()
                back = pool(torch.arange(4.0).reshape(1, 4))
            assert isinstance(back, torch.Tensor) and torch.equal(back, torch.arange(4.0).reshape(1, 4))
        finally:
            pool.shutdown(app=app)
        assert "libtorch" in Path(f"/proc/{server.pid}/maps").read_text()


@pytest.mark.timeout(240)
def test_a_stopped_pool_server_fails_calls_at_once_and_serves_again_when_continued(project: Path) -> None:
    """Issue 11, item 6: a frozen (SIGSTOPped) pool server was noticed only by call deadlines, and a call
    without one waited for ever. Now new calls fail with 503 within about a second (a direct call already
    in flight is answered by its worker),
    /ready says why, and once the server is continued the next call attaches again and is served."""
    env = _env(project, "attach")
    serve = [sys.executable, "-m", "flask", "--app", "attach_app", "torchpool", "serve"]
    sock = project / "run" / "pool.sock"
    with running(serve, 0, project / "serve.log", env, cwd=project) as pool_proc:
        wait_until(lambda: connectable(sock) or pool_proc.proc.poll() is not None, timeout=90)
        assert pool_proc.proc.poll() is None, pool_proc.log()
        # No deadline at all: before the fix, a call to a stopped server waited for ever.
        app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=str(sock), TORCHPOOL_TIMEOUT=None,
                       TORCHPOOL_HEALTH_URL="/torchpool")
        pool = TorchPool(app)

        @app.post("/p")
        @pool.infer
        def predict(model):  # type: ignore[no-untyped-def]
            return {"out": model(torch.ones(2)).tolist()}

        @app.post("/hold")
        @pool.infer
        def hold(model):  # type: ignore[no-untyped-def]
            return {"out": model(torch.ones(1), action="sleep", seconds=10).tolist()}

        def busy() -> int:
            with app.app_context():
                return int(pool.status()["models"]["default"]["busy_workers"])

        client = app.test_client()
        try:
            assert client.post("/p").status_code == 200
            in_flight = ThreadPoolExecutor(1).submit(app.test_client().post, "/hold")
            assert wait_until(lambda: busy() == 1, timeout=30), "the held call never started"
            os.kill(pool_proc.pid, signal.SIGSTOP)
            try:
                # The call in flight went straight to its worker (Note [Lanes]), which is not stopped: it
                # is answered. New calls need the server (to attach, to be counted): they fail at once.
                resp = in_flight.result(60)
                assert resp.status_code == 200, resp.get_data(as_text=True)
                again = client.post("/p")  # a new call does not wait for the hello of a stopped server
                assert again.status_code == 503 and "stopped" in again.json["error"], again.json
                ready = client.get("/torchpool/ready")
                assert ready.status_code == 503 and "stopped" in ready.json["reason"], ready.json
            finally:
                os.kill(pool_proc.pid, signal.SIGCONT)
            served = wait_until(lambda: client.post("/p").status_code == 200, timeout=60)
            assert served, pool_proc.log()
        finally:
            pool.shutdown(app=app)
        pool_proc.proc.send_signal(signal.SIGTERM)
        assert pool_proc.wait_exit(60) == 0, pool_proc.log()
