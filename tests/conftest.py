"""Fixtures: apps with tiny models, pools that always shut down, and leak checks.

Spawning a worker imports torch (1-2 s), so happy-path tests share module-scoped pools; tests that crash,
hang or kill workers make their own with ``make_pool``. After every test that made its own pool, and at
the end of the session, no child process and no new /dev/shm entry may remain. After *every* test, no
extra file descriptor and no extra memfd or /dev/shm mapping may remain in this process
(:func:`_no_leaked_descriptors`); a test that rightly leaves one for later tests (say it starts a
module-scoped pool lazily) says so with ``@pytest.mark.leaks_ok(reason=...)``.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import gc
import multiprocessing.resource_tracker
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from flask import Flask

from flask_torchpool import TorchPool


def child_pids(parent: int | None = None) -> set[int]:
    """Live (non-zombie) children of *parent* (default: this process), from /proc.

    multiprocessing's resource tracker is left out: a spawn through multiprocessing starts one per
    parent process for its whole life (it exits when the parent does; the pool's own spawns start
    none, Note [No resource tracker], but tests and Ray spawn too), it is not a worker."""
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
                      TORCHPOOL_HANDLE_SIGTERM=False, TORCHPOOL_HANDLE_SIGHUP=False,
                      # The tests read server errors' messages: the documented opt-in (docs/errors.rst).
                      TORCHPOOL_ERROR_DETAILS=True)
    app.config.update(config)
    return app


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "leaks_ok(reason, only=None): the test may leave file descriptors or memfd mappings "
                   "open in the test process on purpose (for later tests, or in a library's process-wide "
                   "cache): with only=[glob, ...], those whose target matches a glob; else any (the "
                   "per-test leak check is skipped)")


# --- descriptors and mappings of this process ------------------------------------------------------------

#: Seconds a test's descriptors and mappings get to go away after it (and its fixtures) ended: zero-copy
#: outputs are unmapped when they are garbage-collected, and a respawned worker's pipes and arena are
#: replaced by the pool's manager thread, asynchronously.
LEAK_DEADLINE = 5.0


def open_fds() -> dict[int, str]:
    """This process's descriptors: fd -> what it is (its /proc/self/fd link: a path, ``pipe:[ino]``,
    ``socket:[ino]``, ``anon_inode:[eventpoll]``, ``/memfd:name (deleted)``)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile, such as the descriptor listdir itself used
            continue
    return fds


def shared_mappings() -> dict[tuple[str, str], str]:
    """This process's memfd and /dev/shm mappings: (address range, inode) -> path."""
    found = {}
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(("/memfd:", "/dev/shm/")):
                found[(fields[0], fields[4])] = fields[5].rstrip("\n")
    return found


def _kind(target: str) -> str:
    """What a descriptor or mapping is, without the identity of the object: ``pipe``, ``socket``,
    ``anon_inode:[eventfd]``, ``/memfd:torchpool-arena``, or a path. A respawned worker gets a new pipe
    and a new socketpair for the old ones, so the check counts kinds, not objects."""
    target = target.removesuffix(" (deleted)")
    if target.startswith(("pipe:", "socket:")):
        return target.split(":", 1)[0]
    return target


def _extra(before: dict[Any, str], after: dict[Any, str]) -> list[str]:
    """The entries of *after* of every kind that has more entries than in *before* (for each such kind,
    the entries that are new), as ``"key -> target"``."""
    grown = Counter(map(_kind, after.values()))
    grown.subtract(Counter(map(_kind, before.values())))
    return [f"{key} -> {target}" for key, target in sorted(after.items())
            if grown[_kind(target)] > 0 and before.get(key) != target]


_call_failed = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_call_failed] = report.failed
    return report


def _allow(extra: list[str], globs: list[str]) -> list[str]:
    return [entry for entry in extra
            if not any(fnmatch.fnmatchcase(entry.split(" -> ", 1)[1], glob) for glob in globs)]


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker() -> None:
    """Start multiprocessing's resource tracker now: the first spawn through multiprocessing's own
    context (a test's, Ray's; not the pool's) starts it and it keeps a pipe to it open for the rest of
    the session, which is not the leak of whichever test spawned first."""
    multiprocessing.resource_tracker.ensure_running()


@pytest.fixture(autouse=True)
def _no_leaked_descriptors(request: pytest.FixtureRequest, _resource_tracker: None) -> Iterator[None]:
    """No extra descriptor and no extra memfd or /dev/shm mapping after each test.

    Function-scoped, so set up after the module- and session-scoped fixtures of the test (their pools are
    in the snapshot), and autouse, so set up before (and torn down after) the test's other function
    fixtures: what ``make_pool`` and the like close is closed by the time this looks."""
    allowed: list[str] = []
    marker = request.node.get_closest_marker("leaks_ok")
    if marker is not None:
        if not marker.kwargs.get("reason"):
            pytest.fail("@pytest.mark.leaks_ok needs a reason=", pytrace=False)
        if marker.kwargs.get("only") is None:
            yield
            return
        allowed = list(marker.kwargs["only"])
    fds, maps = open_fds(), shared_mappings()
    yield
    if request.node.stash.get(_call_failed, False):
        return  # already reported; its traceback (sys.last_traceback) keeps the test's objects alive
    extra_fds: list[str] = []
    extra_maps: list[str] = []

    def settled() -> bool:
        nonlocal extra_fds, extra_maps
        gc.collect()
        extra_fds = _allow(_extra(fds, open_fds()), allowed)
        extra_maps = _allow(_extra(maps, shared_mappings()), allowed)
        return not extra_fds and not extra_maps

    if not wait_until(settled, timeout=LEAK_DEADLINE, interval=0.05):
        pytest.fail(f"the test left {len(extra_fds)} file descriptor(s) and {len(extra_maps)} shared "
                    f"mapping(s) open in the test process {LEAK_DEADLINE:g}s after it ended:\n  "
                    + "\n  ".join(["fd " + fd for fd in extra_fds] + ["mapping " + m for m in extra_maps])
                    + "\n(if a later test or a library's process-wide cache owns them, say so with "
                      "@pytest.mark.leaks_ok(reason=..., only=[glob of their targets, ...]))",
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _no_leaks_at_exit() -> Iterator[None]:
    before_children, before_shm = child_pids(), shm_entries()
    yield
    left = wait_until(lambda: not (child_pids() - before_children), timeout=15)
    assert left, f"child processes outlived the test session: {child_pids() - before_children}"
    assert shm_entries() <= before_shm, f"/dev/shm entries leaked: {shm_entries() - before_shm}"


#: The mark of tests that call a Ray backend: this process, Ray's driver, opens gRPC connections (sockets,
#: with their eventfd/epoll descriptors) to Ray's nodes and workers on first need and keeps them for the
#: connection's life. The Ray backend itself opens no descriptor (Ray carries everything), so only
#: those kinds are let through; a leaked arena (memfd), pipe or file still fails the test.
RAY_LEAKS_OK = pytest.mark.leaks_ok(reason="Ray's driver keeps the gRPC connections it opens lazily",
                                    only=["socket:*", "anon_inode:*"])


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """One Ray cluster for the whole session, made on first use: a head node with 2 CPUs
    (``ray.cluster_utils.Cluster``, so that a test can add and remove a second node), and this process
    connected to it as the driver. Ray's processes are children of this process until the session ends
    (when they are stopped, before the session's leak check)."""
    pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no network from the tests
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")      # a private test cluster on 127.0.0.1
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


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
