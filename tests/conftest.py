"""Fixtures: apps with tiny models, pools that always shut down, and leak checks.

Spawning a worker imports torch (1-2 s), so happy-path tests share module-scoped pools; tests that crash,
hang or kill workers make their own with ``make_pool``. After every test that made its own pool, and at
the end of the session, no child process and no new /dev/shm entry may remain.
"""

from __future__ import annotations

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
