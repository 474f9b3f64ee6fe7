"""Reload from outside the process: SIGHUP to the web process (embedded) or to the pool server (attach
mode), and ``flask torchpool reload`` over the pool server's socket. Real servers in subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from flask_torchpool import TorchPool
from flask_torchpool.attach.client import PoolConnection

from .conftest import make_app, wait_until
from .reload_models import write_model
from .servers import ROOT, connectable, free_port, running, server_env

pytestmark = pytest.mark.timeout(300)

_APP = '''\
import os
import sys

import torch
from flask import Flask

from flask_torchpool import TorchPool

app = Flask(__name__)
app.config.update(TORCHPOOL_MODEL="reloadable:build", TORCHPOOL_WORKERS=1, TORCHPOOL_DEVICES="cpu",
                  TORCHPOOL_ARENA_BYTES=32 << 20, TORCHPOOL_HEALTH_URL="/tp",
                  TORCHPOOL_MODE=os.environ.get("APP_MODE", "embedded"),
                  TORCHPOOL_SOCKET=os.environ.get("APP_SOCKET"), TORCHPOOL_START="lazy")
pool = TorchPool(app)


@app.get("/v")
def v():
    return {"y": pool(torch.zeros(2)).tolist()}


if __name__ == "__main__":
    app.run("127.0.0.1", int(sys.argv[1]), threaded=True)
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "reload_app.py").write_text(_APP)
    write_model(tmp_path, 1)
    return tmp_path


def _answer(server: Any) -> float:
    r = server.get("/v")
    assert r.status_code == 200, r.text
    return float(r.json()["y"][0])


def test_sighup_reloads_the_web_process_models(project: Path) -> None:
    port = free_port()
    env = server_env(project)
    with running([sys.executable, "reload_app.py", str(port)], port, project / "web.log", env,
                 cwd=project) as web:
        web.wait_answers("/v")
        assert _answer(web) == 1.0
        write_model(project, 2)
        os.kill(web.pid, signal.SIGHUP)
        assert wait_until(lambda: web.get("/tp/status").json()["version"]["generation"] == 2, timeout=120), \
            web.log()
        assert _answer(web) == 2.0
        assert web.proc.poll() is None, "SIGHUP ended the process"
        # A version that fails: logged, the old one serves on, the process lives.
        write_model(project, 3, fail="build")
        os.kill(web.pid, signal.SIGHUP)
        assert wait_until(lambda: web.get("/tp/status").json()["reloads"]["failed"] == 1, timeout=120), \
            web.log()
        assert _answer(web) == 2.0 and "version 3 cannot be built" in web.log()


def test_sighup_and_cli_reload_the_pool_server(project: Path) -> None:
    sock = project / "pool.sock"
    env = server_env(project, APP_MODE="attach", APP_SOCKET=str(sock))
    serve = [sys.executable, "-m", "flask", "--app", "reload_app", "torchpool", "serve"]
    with running(serve, 0, project / "serve.log", env, cwd=project) as server:
        assert wait_until(lambda: connectable(sock) or server.proc.poll() is not None, timeout=120)
        assert server.proc.poll() is None, server.log()
        connection = PoolConnection(str(sock), 1 << 20)
        try:
            def generation() -> int:
                return int(connection.status()["models"]["default"]["version"]["generation"])

            assert generation() == 1
            write_model(project, 2)
            server.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: generation() == 2, timeout=120), server.log()

            # flask torchpool reload: over the socket, prints the new version.
            write_model(project, 3)
            cli = [sys.executable, "-m", "flask", "--app", "reload_app", "torchpool", "reload", "--version",
                   "v3"]
            out = subprocess.run(cli, cwd=project, env=env, capture_output=True, text=True, timeout=240)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "default: version 3 (v3) [reloadable:build]" in out.stdout
            assert generation() == 3

            # A failing version: exit 1, the message names the model, version and cause; old one serves.
            write_model(project, 4, fail="build")
            out = subprocess.run(cli[:-2], cwd=project, env=env, capture_output=True, text=True, timeout=240)
            assert out.returncode == 1
            assert "model 'default' version 4" in out.stderr and "cannot be built" in out.stderr
            assert generation() == 3
            out = subprocess.run([*cli[:-2], "--model", "nope"], cwd=project, env=env, capture_output=True,
                                 text=True, timeout=240)
            assert out.returncode == 1 and "no model named 'nope'" in out.stderr

            # An attached app's pool.reload() asks the server too.
            write_model(project, 5)
            app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=str(sock), TORCHPOOL_START="lazy",
                           TORCHPOOL_MODEL="reloadable:build")
            web = TorchPool(app)
            try:
                assert web.model(app=app)(torch.zeros(2)).tolist() == [3.0, 3.0]
                assert web.reload(app=app, version="v5")["default"]["generation"] == 5
                assert web.model(app=app)(torch.zeros(2)).tolist() == [5.0, 5.0]
            finally:
                web.shutdown(app=app)
        finally:
            connection.close()
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit(60) == 0, server.log()


def test_cli_reload_without_a_pool_server_says_what_to_do(project: Path) -> None:
    env = server_env(project, APP_MODE="attach", APP_SOCKET=str(project / "none.sock"))
    out = subprocess.run([sys.executable, "-m", "flask", "--app", "reload_app", "torchpool", "reload"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1 and "SIGHUP" in out.stderr, out.stderr
    assert ROOT.exists()
