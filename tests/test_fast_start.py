"""Workers forked from the pool's fork server (Note [Fork server]), and their CPU priority.

What must hold as with ``spawn``: a worker is a child of the web process (so ``PR_SET_PDEATHSIG`` and the
"parent changed" check watch it), its exit code reaches the pool, it dies with a SIGKILLed web process,
and nothing is left after shutdown (``make_pool`` checks children and /dev/shm; the autouse fixture
descriptors). What is new: one fork server per pool, single-threaded and without CUDA, which a respawn
reuses; ``TORCHPOOL_START_METHOD="spawn"`` starts none; ``TORCHPOOL_WORKER_NICE`` lowers the workers'
priority.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from flask_torchpool import ConfigError, TorchPool, WorkerCrashedError
from flask_torchpool.config import DEFAULTS, PoolConfig
from flask_torchpool.forkserver import PROCESS_NAME
from flask_torchpool.placement import worker_nice
from tests.conftest import child_pids, make_app, pid_alive, wait_until
from tests.crash_models import wait_ready
from tests.servers import all_children

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def fork_servers(parent: int | None = None) -> set[int]:
    return {p for p in child_pids(parent) if _comm(p) == PROCESS_NAME}


def test_defaults() -> None:
    assert DEFAULTS["TORCHPOOL_START_METHOD"] == "forkserver"
    assert DEFAULTS["TORCHPOOL_WORKER_NICE"] == "auto"


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("TORCHPOOL_START_METHOD", "fork", "use one of 'forkserver', 'spawn'"),
    ("TORCHPOOL_WORKER_NICE", 20, 'use "auto" or an integer from 0'),
    ("TORCHPOOL_WORKER_NICE", -1, 'use "auto" or an integer from 0'),
    ("TORCHPOOL_WORKER_NICE", True, 'use "auto" or an integer from 0'),
    ("TORCHPOOL_WORKER_NICE", "10", 'use "auto" or an integer from 0'),
])
def test_bad_values_name_the_key(key: str, value: Any, allowed: str) -> None:
    app = make_app(TORCHPOOL_START="lazy", **{key: value})
    with pytest.raises(ConfigError) as info:
        TorchPool(app)
    assert info.value.key == key
    assert allowed in str(info.value)


def test_auto_nice_depends_on_whether_the_web_tier_is_gunicorn_sync_workers() -> None:
    # TORCHPOOL_WORKER_NICE "auto": 0 behind sync web workers (each waits for its own call), else 10.
    auto = PoolConfig.from_mapping({"TORCHPOOL_MODEL": "tests.models:echo"})
    assert auto.worker_nice == "auto"
    assert worker_nice(auto, sync_web=True) == 0 and worker_nice(auto, sync_web=False) == 10
    fixed = PoolConfig.from_mapping({"TORCHPOOL_MODEL": "tests.models:echo", "TORCHPOOL_WORKER_NICE": 7})
    assert worker_nice(fixed, sync_web=True) == 7 and worker_nice(fixed) == 7


def test_workers_are_forked_children_of_the_web_process(make_pool: Any) -> None:
    app, pool = make_pool(TORCHPOOL_WORKERS=2, TORCHPOOL_RETRIES=0, TORCHPOOL_WORKER_NICE=5)
    pids = wait_ready(pool, app)
    [server] = fork_servers()
    # One clean fork server: one thread, no CUDA, a child of this process like the workers.
    assert len(os.listdir(f"/proc/{server}/task")) == 1
    with open(f"/proc/{server}/maps") as f:
        assert "libcuda" not in f.read()
    for pid in pids:
        fields = _stat(pid)
        assert int(fields[1]) == os.getpid(), "a worker must be a child of the web process"
        assert int(fields[16]) == 5, "TORCHPOOL_WORKER_NICE"
        assert _comm(pid) != PROCESS_NAME
    assert int(_stat(server)[16]) == 0, "the fork server keeps the web process's priority"
    with app.app_context():
        assert pool(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]
        # A worker copies as few of the fork server's pages as it can: the server froze its heap (no
        # collection in the worker touches it), and the worker's entry point imported nothing new
        # (the pool's own modules, such as flask_torchpool.workers, stay out of it).
        inherited = pool(action="process")
        assert inherited["frozen"] > 10_000, inherited["frozen"]
        assert not {"flask_torchpool.workers", "flask_torchpool.batching", "flask_torchpool.pool"} \
            & set(inherited["modules"]), inherited["modules"]
        # The exit code reaches the pool; the respawn comes from the same fork server.
        with pytest.raises(WorkerCrashedError, match="exit code 7"):
            pool(torch.ones(1), action="exit")
    new = wait_until(lambda: (w := wait_ready(pool, app)) != pids and w, timeout=90)
    assert new and len(set(new) - set(pids)) == 1, (pids, new)
    assert fork_servers() == {server}
    assert all(int(_stat(p)[1]) == os.getpid() for p in new)
    with app.app_context():
        assert pool(torch.ones(2)).tolist() == [1.0, 1.0]
    pool.shutdown(app=app, drain_timeout=0)
    assert not pid_alive(server), "the fork server outlived its pool"


def test_spawn_starts_no_fork_server(make_pool: Any) -> None:
    app, pool = make_pool(TORCHPOOL_START_METHOD="spawn")
    [pid] = wait_ready(pool, app)
    assert not fork_servers()
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"spawn_main" in f.read()
    with app.app_context():
        assert pool(torch.ones(1)).tolist() == [1.0]


def test_worker_killed_with_sigkill_is_reported_and_respawned(make_pool: Any) -> None:
    app, pool = make_pool(TORCHPOOL_RETRIES=0)
    [pid] = wait_ready(pool, app)
    os.kill(pid, signal.SIGKILL)
    [new] = wait_ready(pool, app, exclude={pid})
    assert "SIGKILL" in pool.status(app)["workers"][0]["last_exit"]
    with app.app_context():
        assert pool(action="pid") == new


PARENT = textwrap.dedent('''\
    import os, sys, time
    sys.path.insert(0, {root!r})
    from flask import Flask
    from flask_torchpool import TorchPool

    app = Flask("fork_parent")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_WORKERS=2, TORCHPOOL_DEVICES="cpu",
                      TORCHPOOL_ARENA_BYTES=8 << 20, TORCHPOOL_HANDLE_SIGTERM=False)
    pool = TorchPool(app)

    if __name__ == "__main__":
        with app.app_context():
            pool.start()
            pids = [w["pid"] for w in pool.status()["workers"]]
        print(" ".join(map(str, pids)), flush=True)
        time.sleep(600)
''')


def test_workers_and_fork_server_die_with_a_sigkilled_web_process(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        workers = {int(p) for p in proc.stdout.readline().split()}
        assert len(workers) == 2
        servers = fork_servers(proc.pid)
        assert len(servers) == 1
        assert all(int(_stat(p)[1]) == proc.pid for p in workers)
        proc.kill()
        proc.wait(30)
        left = workers | servers
        assert wait_until(lambda: not any(pid_alive(p) for p in left), timeout=30), (
            f"outlived their SIGKILLed parent: {[p for p in left if pid_alive(p)]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)


TRACKER_PARENT = textwrap.dedent('''\
    import json, os, sys
    sys.path.insert(0, {root!r})
    from flask import Flask
    from flask_torchpool import TorchPool

    app = Flask("tracker_parent")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_WORKERS=1, TORCHPOOL_DEVICES="cpu",
                      TORCHPOOL_ARENA_BYTES=8 << 20, TORCHPOOL_HANDLE_SIGTERM=False,
                      TORCHPOOL_START_METHOD={method!r})
    pool = TorchPool(app)

    if __name__ == "__main__":
        with app.app_context():
            pool.start()
            print(json.dumps(pool(action="semaphore")), flush=True)
            sys.stdin.readline()
            pool.shutdown()
''')


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_the_pool_starts_no_resource_tracker_and_a_worker_can_still_use_one(tmp_path: Path,
                                                                            method: str) -> None:
    # Note [No resource tracker]: neither the fork server nor a spawned worker gets multiprocessing's
    # resource tracker; a worker that creates a named semaphore starts its own.
    script = tmp_path / "parent.py"
    script.write_text(TRACKER_PARENT.format(root=str(ROOT), method=method))
    proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        answer = json.loads(proc.stdout.readline())
        assert answer["pid"] != proc.pid and answer["tracker"] is not None
        trackers = [p for p in all_children(proc.pid) if b"resource_tracker" in _cmdline(p)]
        assert trackers == [], "the web process started multiprocessing's resource tracker"
        assert answer["tracker"] in all_children(answer["pid"])  # the worker's own
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""

