"""Helpers for the tests that run real servers: free ports, server subprocesses waited on with a
deadline and always killed with their process group, and the process tree read from /proc.

Every server is started with ``start_new_session=True``, so it leads a process group that holds the
server, any process it forks or spawns (gunicorn workers, the reloader's serving child, pool workers)
and nothing else; :func:`running` kills that group whatever the test did.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from flask_torchpool import TorchPool
from flask_torchpool.forkserver import PROCESS_NAME as FORK_SERVER_NAME

from .conftest import child_pids, make_app, pid_alive, shm_entries, wait_until

if TYPE_CHECKING:
    from flask_torchpool.attach.server import PoolServer

ROOT = Path(__file__).resolve().parent.parent

#: Seconds a server gets to answer its first request: importing torch and spawning the pool's
#: workers takes a few seconds, more on a loaded machine.
START_DEADLINE = 90.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(*pythonpath: os.PathLike[str] | str, **extra: str) -> dict[str, str]:
    """This environment without Flask/Werkzeug/gunicorn settings, with *pythonpath* and the repository
    importable (``flask_torchpool``, ``tests.models``) and unbuffered output."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLASK_", "WERKZEUG_", "GUNICORN_", "TORCHPOOL_")) and k != "PORT"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(ROOT)])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Server:
    """A server subprocess: the process we started, its base URL and its combined output."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 60.0) -> requests.Response:
        return requests.get(self.base_url + path, timeout=timeout)

    def wait_answers(self, path: str, deadline: float = START_DEADLINE) -> requests.Response:
        """GET *path* until the server answers it (any status), failing with the server's output if it
        exits or *deadline* seconds pass first."""
        end = time.monotonic() + deadline
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited with {self.proc.returncode} before answering "
                                     f"{path}; its output:\n{self.log()}")
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the server did not answer {path} within {deadline:g}s; its "
                                     f"output:\n{self.log()}")
            try:
                return requests.get(self.base_url + path, timeout=max(left, 0.1))
            except requests.ConnectionError:
                time.sleep(0.05)  # not listening yet: poll again, within the deadline
            except requests.Timeout:
                continue  # the loop reports the deadline with the server's output

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit within {timeout:g}s; its output:\n"
                                 f"{self.log()}") from None


@contextmanager
def running(argv: Sequence[str], port: int, log_path: Path, env: dict[str, str],
            cwd: os.PathLike[str] | str = ROOT) -> Iterator[Server]:
    """Start *argv* as the leader of a new process group; on the way out, SIGKILL the whole group
    (a no-op if the test already stopped it) and reap the leader."""
    with open(log_path, "wb") as log, _sigint_not_ignored():
        proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield Server(proc, f"http://127.0.0.1:{port}", log_path)
    finally:
        kill_group(proc.pid)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass


@contextmanager
def _sigint_not_ignored() -> Iterator[None]:
    """Start servers with SIGINT deliverable, as from a terminal.

    A child inherits an *ignored* signal across exec, and a shell ignores SIGINT in the commands it
    runs in the background (``for ...; do pytest; done &``): the server would then ignore Ctrl-C, and
    Python would not even install its KeyboardInterrupt handler. A handled signal is reset to the
    default across exec, so handling SIGINT here while the server starts is enough."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def private_socket(base: Path, name: str = "pool.sock") -> Path:
    """A socket path in a new private (0700) directory ``base/run``, as a pool server requires."""
    run = base / "run"
    run.mkdir(mode=0o700)
    return run / name


@contextmanager
def pool_server(socket_path: os.PathLike[str] | str, **config: Any) -> Iterator[PoolServer]:
    """A started pool of ``make_app(**config)`` served on *socket_path* by a :class:`PoolServer` in
    this process, as ``flask torchpool serve`` would; stopped (its workers too) on the way out. Its
    workers are children of this process, so the tests' child-process checks see them."""
    # Imported here: pool workers import this module (through tests.crash_models) and need no server.
    from flask_torchpool.attach.server import PoolServer

    app = make_app(**config)
    TorchPool(app)
    pools = app.extensions["torchpool"].start()
    server = PoolServer(pools, str(socket_path), default_model="default")
    try:
        server.start()
    except BaseException:
        for pool in pools.values():
            pool.shutdown(drain_timeout=0)
        raise
    try:
        yield server
    finally:
        server.stop(drain_timeout=5)


def connectable(path: os.PathLike[str] | str) -> bool:
    """Whether something accepts connections on the Unix socket at *path*."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def kill_group(pgid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def nice_of(pid: int) -> int:
    """Process *pid*'s nice value (``/proc/PID/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def all_children(parent: int) -> set[int]:
    """Live children of *parent*, multiprocessing's resource tracker included."""
    return {int(e) for e in os.listdir("/proc") if e.isdigit() and ppid(int(e)) == parent
            and pid_alive(int(e))}


def descendants(pid: int) -> set[int]:
    """Every live process below *pid* (multiprocessing resource trackers left out)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        children = child_pids(todo.pop()) - found
        found |= children
        todo.extend(children)
    return found


def is_pool_worker(pid: int) -> bool:
    """A process started by multiprocessing's spawn method, or forked by a pool's fork server (which was
    spawned: its workers have its command line), but not the fork server itself: a pool worker, in
    these tests."""
    return "multiprocessing.spawn import spawn_main" in cmdline(pid) and comm(pid) != FORK_SERVER_NAME


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def pool_workers_below(pid: int) -> set[int]:
    return {p for p in descendants(pid) if is_pool_worker(p)}


def wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    """Wait until none of *pids* is alive; returns those still alive at the deadline."""
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=timeout, interval=0.05)
    return {p for p in pids if pid_alive(p)}


def _mapped_shm_names(exclude: set[int]) -> set[str]:
    """Names under /dev/shm that processes other than *exclude* have mapped."""
    names: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        names.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        except OSError:
            continue
    return names


def new_shm_entries(before: set[str], ours: set[int] = frozenset()) -> set[str]:
    """/dev/shm entries created since *before* that no other program holds.

    /dev/shm is shared by everything on the machine; an entry another program (say a benchmark run
    beside the tests) still has mapped is theirs, not a leak of ours. *ours* are pids of processes
    from this test that may still be alive; this process is always ours."""
    new = shm_entries() - before
    if not new:
        return new
    return new - _mapped_shm_names({os.getpid(), *ours})
