"""Shutdown and the death of the web process, against real worker processes.

``shutdown()`` drains (or, with ``drain_timeout=0``, fails) the calls in flight, refuses new ones with
503, is idempotent and leaves no worker and no /dev/shm entry behind. When the web process itself goes
(SIGKILL, SIGTERM, a normal interpreter exit) its workers go with it: those cases run a small script in
a subprocess that starts a pool, prints the worker pids and then dies in the way under test.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flask_torchpool import PoolClosedError
from tests.conftest import pid_alive, shm_entries, wait_until
from tests.crash_models import (
    PROBE,
    add_views,
    assert_http_error,
    leaked_shm,
    open_gate,
    wait_ready,
    wait_started,
)

ROOT = Path(__file__).resolve().parent.parent


def assert_closed(app: Any, pool: Any, fragment: str) -> None:
    with app.app_context():
        with pytest.raises(PoolClosedError) as info:
            pool(torch.ones(2))
    assert fragment in str(info.value)
    assert info.value.retry_after == 1
    assert_http_error(app.test_client().post("/run", json={}), 503, PoolClosedError, fragment,
                      retry_after=1)


@pytest.mark.timeout(120)
def test_shutdown_drains_call_in_flight(make_pool: Any, tmp_path: Path) -> None:
    before_shm = shm_entries()
    app, pool = make_pool(TORCHPOOL_MODEL=PROBE, TORCHPOOL_WORKERS=2)
    add_views(app, pool)
    pids = wait_ready(pool, app)

    with app.app_context():
        future = pool.submit(torch.ones(2), mark=str(tmp_path), hold=str(tmp_path))
    [runner] = wait_started(tmp_path)
    stopper = threading.Thread(target=pool.shutdown, kwargs={"app": app, "drain_timeout": 60})
    stopper.start()
    try:
        assert wait_until(lambda: pool.status(app)["closed"], timeout=10)
        # Draining: new calls are refused, the call in flight carries on.
        assert_closed(app, pool, "the pool is shut")
        assert not future.done()
        assert stopper.is_alive()
    finally:
        open_gate(tmp_path)
    result = future.result(timeout=60)
    assert result["pid"] == runner and torch.equal(result["out"], torch.ones(2))
    stopper.join(timeout=30)
    assert not stopper.is_alive(), "shutdown() did not return after the drain"

    # shutdown(wait=True) returned: every worker has exited and been reaped.
    assert not [pid for pid in pids if pid_alive(pid)]
    assert all(w["state"] == "stopped" for w in pool.status(app)["workers"])
    assert_closed(app, pool, "the pool is shut")
    pool.shutdown(app=app)  # idempotent, also without draining and from other threads
    pool.shutdown(app=app, drain_timeout=0)
    again = [threading.Thread(target=pool.shutdown, kwargs={"app": app}) for _ in range(3)]
    for t in again:
        t.start()
    for t in again:
        t.join(timeout=10)
        assert not t.is_alive()
    assert_closed(app, pool, "the pool is shut")
    assert not leaked_shm(before_shm)


@pytest.mark.timeout(120)
def test_shutdown_without_drain_fails_calls(make_pool: Any, tmp_path: Path) -> None:
    before_shm = shm_entries()
    app, pool = make_pool(TORCHPOOL_MODEL=PROBE, TORCHPOOL_PIPELINE_DEPTH=1)
    add_views(app, pool)
    [pid] = wait_ready(pool, app)

    with app.app_context():
        running = pool.submit(torch.ones(2), mark=str(tmp_path), hold=str(tmp_path))
        queued = pool.submit(torch.ones(2))
    wait_started(tmp_path)
    try:
        pool.shutdown(app=app, drain_timeout=0)
    finally:
        open_gate(tmp_path)
    # shutdown(wait=True) has returned: both calls are settled, the held worker was stopped.
    assert running.done() and queued.done()
    err = running.exception(timeout=0)
    assert isinstance(err, PoolClosedError) and "before this call finished" in str(err)
    err = queued.exception(timeout=0)
    assert isinstance(err, PoolClosedError) and "before this call ran" in str(err)
    assert not pid_alive(pid)
    assert_closed(app, pool, "the pool is shut")
    pool.shutdown(app=app)
    assert not leaked_shm(before_shm)


# --- the web process dies -------------------------------------------------------------------------------

SCRIPT = textwrap.dedent('''
    """Start a 2-worker pool, print the worker pids as JSON, then end as argv[1] says."""
    import gc
    import json
    import logging
    import os
    import signal
    import sys

    import torch
    from flask import Flask

    from flask_torchpool import TorchPool


    def main():
        mode, workdir = sys.argv[1], sys.argv[2]
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        app = Flask("parent_death")
        app.config.update(TORCHPOOL_MODEL="tests.crash_models:probe", TORCHPOOL_WORKERS=2,
                          TORCHPOOL_DEVICES="cpu", TORCHPOOL_ARENA_BYTES=32 << 20,
                          TORCHPOOL_HANDLE_SIGTERM=(mode == "sigterm"))
        pool = TorchPool(app)
        pids = [w["pid"] for w in pool.status(app)["workers"]]
        if mode == "sigterm":
            with app.app_context():
                future = pool.submit(torch.ones(2), mark=workdir, hold=workdir)

            def record(f):
                exc = f.exception()
                result = ({"error": repr(exc)} if exc is not None else
                          {"pid": f.result()["pid"], "closed": pool.status(app)["closed"]})
                path = os.path.join(workdir, "result.json")
                with open(path + ".tmp", "w") as out:
                    json.dump(result, out)
                os.replace(path + ".tmp", path)

            future.add_done_callback(record)
        print(json.dumps({"pids": pids}), flush=True)
        if mode.startswith("exit"):
            return app  # no shutdown(): the atexit hook must stop the workers
        while True:
            signal.pause()


    if __name__ == "__main__":
        app = main()
        if sys.argv[1] == "exit_app_collected":
            # An app factory's app, gone before the interpreter exits; its pool still runs.
            del app
            gc.collect()
''')


class Parent:
    """The subprocess that owns the pool, leader of its own process group."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        script = tmp_path / "parent.py"
        script.write_text(SCRIPT)
        self.stderr_path = tmp_path / "stderr.txt"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FLASK_", "WERKZEUG_", "TORCHPOOL_"))}
        env["PYTHONPATH"] = str(ROOT)
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen([sys.executable, str(script), mode, str(tmp_path)], cwd=ROOT,
                                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True, start_new_session=True)
        self.pids: list[int] = []

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def read_pids(self, timeout: float = 90.0, alive: bool = True) -> list[int]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout)
        line = self.proc.stdout.readline() if ready else ""
        assert line, f"the parent printed no pids (exit {self.proc.poll()}); stderr:\n{self.stderr()}"
        self.pids = json.loads(line)["pids"]
        assert len(self.pids) == 2, self.pids
        # A parent that exits right after printing may already have stopped its workers.
        assert not alive or all(pid_alive(p) for p in self.pids), self.pids
        return self.pids

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the parent did not exit; stderr:\n{self.stderr()}") from None

    def cleanup(self) -> None:
        """Whatever the test did: SIGKILL the parent's process group (its workers are in it)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def parent(tmp_path: Path) -> Iterator[Any]:
    made: list[Parent] = []
    before_shm = shm_entries()

    def start(mode: str) -> Parent:
        made.append(Parent(tmp_path, mode))
        return made[-1]

    yield start
    for p in made:
        p.cleanup()
    assert not leaked_shm(before_shm), f"/dev/shm entries leaked: {leaked_shm(before_shm)}"


def all_gone(pids: list[int], timeout: float) -> bool:
    return wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=timeout)


@pytest.mark.timeout(120)
def test_workers_die_with_sigkilled_parent(parent: Any) -> None:
    p = parent("kill")
    pids = p.read_pids()
    os.kill(p.proc.pid, signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert all_gone(pids, timeout=2.0), \
        f"workers outlived their SIGKILLed parent: {[q for q in pids if pid_alive(q)]}"


@pytest.mark.timeout(120)
def test_sigterm_drains_the_call_in_flight(parent: Any, tmp_path: Path) -> None:
    p = parent("sigterm")
    pids = p.read_pids()
    [runner] = wait_started(tmp_path)
    assert runner in pids
    os.kill(p.proc.pid, signal.SIGTERM)
    try:
        # The handler is draining (the pool is closed to new calls) while the call still runs.
        assert wait_until(lambda: "SIGTERM: draining" in p.stderr(), timeout=30), p.stderr()
        assert p.proc.poll() is None
        assert not (tmp_path / "result.json").exists()
    finally:
        open_gate(tmp_path)
    assert p.wait() == -signal.SIGTERM, p.stderr()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result == {"pid": runner, "closed": True}, result
    assert all_gone(pids, timeout=2.0), \
        f"workers outlived their SIGTERMed parent: {[q for q in pids if pid_alive(q)]}"
    assert "torchpool[parent_death]: stopped" in p.stderr()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["exit", "exit_app_collected"])
def test_interpreter_exit_stops_workers(parent: Any, mode: str) -> None:
    """The script returns without shutdown(): the atexit hook stops the pool, whether the app is still
    referenced at exit (a module-level app) or was garbage-collected (an app factory's app)."""
    p = parent(mode)
    pids = p.read_pids(alive=False)
    assert p.wait() == 0, p.stderr()
    assert all_gone(pids, timeout=2.0), \
        f"workers outlived their parent's exit: {[q for q in pids if pid_alive(q)]}"
    # A clean stop by the pool, not multiprocessing's exit hook SIGTERMing the workers under it.
    assert "torchpool[parent_death]: stopped" in p.stderr(), p.stderr()
    assert " died, " not in p.stderr(), p.stderr()


STREAM_OPEN_AT_EXIT = textwrap.dedent('''
    import torch
    from flask import Flask

    from flask_torchpool import TorchPool

    if __name__ == "__main__":
        app = Flask("stream_at_exit")
        app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_WORKERS=1, TORCHPOOL_DEVICES="cpu",
                          TORCHPOOL_ARENA_BYTES=4 << 20, TORCHPOOL_DRAIN_TIMEOUT=0.5)
        pool = TorchPool(app)
        with app.app_context():
            stream = pool.model().stream(torch.zeros(1), action="yield", n=1000)
            print(next(iter(stream)).tolist(), flush=True)
        # The stream stays open, unread, into the interpreter's exit (a module global).
''')


@pytest.mark.timeout(120)
def test_an_interpreter_exit_with_a_stream_open_ends(tmp_path: Path) -> None:
    """The pool's exit hook drains (TORCHPOOL_DRAIN_TIMEOUT) and stops the pool; then the interpreter
    collects the open stream, whose finalizer started a thread to close it: a thread cannot start that
    late, and the process waited for it forever."""
    script = tmp_path / "stream_at_exit.py"
    script.write_text(STREAM_OPEN_AT_EXIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "WERKZEUG_", "TORCHPOOL_"))}
    env["PYTHONPATH"] = str(ROOT)
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the interpreter did not exit; stderr:\n{exc.stderr}") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "[0]", done.stdout
    assert "Traceback" not in done.stderr, done.stderr
