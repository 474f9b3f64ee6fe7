"""Fixtures: apps with tiny models, pools that always shut down, and leak checks.

Spawning a worker imports torch (1-2 s), so happy-path tests share module-scoped pools; tests that crash,
hang or kill workers make their own with ``make_pool``. After every test that made its own pool, and at
the end of the session, no child process and no new /dev/shm entry may remain.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from flask import Flask

from flask_torchpool import TorchPool


def child_pids(parent: int | None = None) -> set[int]:
    """Live (non-zombie) children of *parent* (default: this process), from /proc.

    multiprocessing's resource tracker is left out: the spawn context starts one per parent process
    for its whole life (it exits when the parent does), it is not a worker."""
    parent = os.getpid() if parent is None else parent
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"resource_tracker" in f.read():
                        continue
            except OSError:
                continue
            pids.add(int(entry))
    return pids


def shm_entries() -> set[str]:
    """/dev/shm entries that torch or this package could leave (torch_*, psm_*). Arenas are memfd and
    never appear there; other processes' semaphores (sem.mp-*) are not ours to judge."""
    try:
        return {name for name in os.listdir("/dev/shm") if "torch" in name or name.startswith("psm_")}
    except OSError:
        return set()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll *predicate* until it is truthy or *timeout* passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Gate:
    """A gate a model call waits at (``tests.models.wait_at_gate``) until the test opens it: a FIFO in
    *directory*. The call blocks opening it for reading; :meth:`open` opens it for writing, which
    fails at once while nobody waits, so it polls (with a deadline) until the call is there, then
    closes it, and the call reads end-of-file and goes on. One gate lets one waiting call through."""

    def __init__(self, directory: os.PathLike[str] | str) -> None:
        self.path = os.path.join(os.fspath(directory), "gate")
        os.mkfifo(self.path, 0o600)
        self.opened = False

    def __str__(self) -> str:
        return self.path

    def open(self, timeout: float = 60.0) -> None:
        """Let the waiting call through; fails if no call waits at the gate within *timeout*."""
        def try_open() -> bool:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                return False
            os.close(fd)
            return True

        assert wait_until(try_open, timeout=timeout), f"no call waited at the gate {self.path} " \
                                                      f"within {timeout:g}s"
        self.opened = True


@pytest.fixture
def gate(tmp_path: Any) -> Iterator[Gate]:
    """A :class:`Gate`; opened on the way out if the test did not (a failed test must not leave a worker
    of a shared pool waiting at it for ever)."""
    made = Gate(tmp_path)
    yield made
    if not made.opened:
        with contextlib.suppress(AssertionError):
            made.open(timeout=5)


def make_app(**config: Any) -> Flask:
    app = Flask("tests")
    app.config.update(TESTING=True, TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_WORKERS=1,
                      TORCHPOOL_DEVICES="cpu", TORCHPOOL_ARENA_BYTES=32 << 20,
                      TORCHPOOL_HANDLE_SIGTERM=False)
    app.config.update(config)
    return app


@pytest.fixture(scope="session", autouse=True)
def _no_leaks_at_exit() -> Iterator[None]:
    before_children, before_shm = child_pids(), shm_entries()
    yield
    left = wait_until(lambda: not (child_pids() - before_children), timeout=15)
    assert left, f"child processes outlived the test session: {child_pids() - before_children}"
    assert shm_entries() <= before_shm, f"/dev/shm entries leaked: {shm_entries() - before_shm}"


@pytest.fixture
def make_pool() -> Iterator[Callable[..., tuple[Flask, TorchPool]]]:
    """Make an app with its own started pool; shuts it down and checks that nothing leaked."""
    made: list[tuple[Flask, TorchPool]] = []
    before_children, before_shm = child_pids(), shm_entries()

    def factory(**config: Any) -> tuple[Flask, TorchPool]:
        app = make_app(**config)
        pool = TorchPool(app)
        made.append((app, pool))
        return app, pool

    yield factory
    for app, pool in made:
        pool.shutdown(app=app, drain_timeout=0)
    leaked = wait_until(lambda: not (child_pids() - before_children), timeout=10)
    assert leaked, f"worker processes outlived their pool: {child_pids() - before_children}"
    assert shm_entries() <= before_shm, f"/dev/shm entries leaked: {shm_entries() - before_shm}"


@pytest.fixture(scope="module")
def echo_app() -> Iterator[Flask]:
    """A started two-worker echo pool shared by a test module."""
    app = make_app(TORCHPOOL_WORKERS=2)
    pool = TorchPool(app)
    yield app
    pool.shutdown(app=app)


@pytest.fixture
def app(echo_app: Flask) -> Flask:
    """pytest-flask's fixture name: the shared echo app."""
    return echo_app


@pytest.fixture
def pool(echo_app: Flask) -> TorchPool:
    return echo_app.extensions["torchpool"].extension
