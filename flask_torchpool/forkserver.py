"""The fork server: workers forked from a clean process that imported torch once.

Note [Fork server]
~~~~~~~~~~~~~~~~~~
Spawning a worker runs a new interpreter that imports torch (1-2 s, and each worker's own copy of
torch's heap). Instead, each pool's manager thread *spawns* one fork server (``spawn``, so it inherits
nothing of the web process: no threads, locks or CUDA, and it re-imports ``__main__`` as a spawned child
does). The fork server imports torch and :mod:`flask_torchpool.worker`, stops the thread pool numpy's
OpenBLAS starts at import (``blas_thread_shutdown_``, what OpenBLAS's own fork handler does; it starts
again on first use) and then forks a worker for each request, in milliseconds. It never runs a model,
a tensor op or CUDA; a GPU worker selects its device after the fork.

The fork is a raw ``clone(CLONE_PARENT)``: the worker's parent is not the fork server but the fork
server's parent, the web process's manager thread, exactly as with ``spawn``. So the worker's
``PR_SET_PDEATHSIG`` and its "parent changed" check (exit 70) still watch the web process, the web
process reaps it and reads its exit code itself (its sentinel is a pidfd), and ``ps`` shows it below
the web process. ``CLONE_CHILD_SETTID`` updates glibc's cached thread id, as glibc's ``fork`` does;
``PyOS_BeforeFork``/``PyOS_AfterFork_Child`` run Python's own fork hooks. Before every fork the server
checks that it is single-threaded; if it is not, or the platform lacks what this needs (Linux with
glibc, ``pidfd_open``), :class:`ForkServer` reports it unusable and the pool spawns its workers instead.

Requests travel from the web process to its own child over a ``SOCK_SEQPACKET`` pair: a pickled
(target, args, name) with the descriptors the worker needs; the reply is a struct (a pid, or an error
text) that the web process parses without unpickling anything.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import pickle
import platform
import select
import signal
import socket
import struct
import sys
import threading
import time
import weakref
from multiprocessing import connection
from typing import Any, Callable

from . import spawning

log = logging.getLogger(__name__)

_CLONE_PARENT = 0x00008000
_CLONE_CHILD_SETTID = 0x01000000
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
_PR_SET_PDEATHSIG = 1
_MAX_REQUEST = 1 << 20
_PID = struct.Struct("!q")

#: The fork server's process name (``/proc/PID/comm``, what ``ps -o comm`` and ``top`` show); its workers
#: get back the name a spawned process has.
PROCESS_NAME = "torchpool-fork"
_PR_SET_NAME = 15

#: What the fork server imports before it forks anything: the pages all its workers share.
PRELOAD = ("torch", "flask_torchpool.worker")


class ForkServerError(OSError):
    """The fork server cannot start a worker (gone, not clean, or the platform lacks what it needs)."""


def supported() -> str | None:
    """Why this platform cannot fork workers from a fork server, or None when it can."""
    if not sys.platform.startswith("linux") or _SYS_CLONE is None:
        return f"not supported on {sys.platform}/{platform.machine()} (Linux x86_64 and aarch64 only)"
    if not hasattr(os, "pidfd_open"):
        return "os.pidfd_open is missing (Python >= 3.9 on Linux >= 5.3)"
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        glibc = None
    if not glibc:
        return "not glibc (the fork updates glibc's cached thread id)"
    return None


class PassedFd:
    """In a request's args: the descriptor at *index* of the request's descriptors, given to the worker
    as an int, or as a :class:`multiprocessing.connection.Connection` when *connection* is set."""

    def __init__(self, index: int, connection: bool = False) -> None:
        self.index = index
        self.connection = connection


class ForkServer:
    """One pool's fork server. Used by the pool's manager thread only (the thread its workers' deaths
    are tied to, see :mod:`flask_torchpool.workers`)."""

    def __init__(self, name: str, start_timeout: float = 120.0) -> None:
        self.name = name
        self.start_timeout = start_timeout
        self._process: Any = None
        self._sock: socket.socket | None = None
        #: Set once :meth:`wait_ready` returned (``ready`` says how); see :meth:`launch`.
        self.settled = threading.Event()
        self.ready = False

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Spawn the fork server and wait until it has imported torch. Raises :class:`ForkServerError`
        when it cannot fork workers safely (the pool then spawns them)."""
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Spawn the fork server, without waiting for it (:meth:`wait_ready`, which may run in another
        thread: a reload starts the new version's server while the manager thread serves)."""
        reason = supported()
        if reason:
            raise ForkServerError(reason)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = spawning.Process(target=_serve, args=(theirs, os.getpid(), PRELOAD, self.name),
                                       name=f"{self.name}-forkserver", daemon=True)
            process.start()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._process, self._sock = process, ours

    def wait_ready(self) -> None:
        """Wait until the launched server has imported torch; raises :class:`ForkServerError` (and
        stops it) when it cannot fork workers."""
        process, ours = self._process, self._sock
        try:
            if process is None or ours is None:
                raise ForkServerError("the fork server cannot fork workers: it was stopped")
            try:
                ready = connection.wait([ours, process.sentinel], self.start_timeout)
                hello = ours.recv(4096) if ours in ready else b""
            except (OSError, ValueError) as exc:   # stopped meanwhile (another thread)
                raise ForkServerError(f"the fork server cannot fork workers: {exc}") from None
            if not hello.startswith(b"R"):
                why = hello[1:].decode(errors="replace") if hello else (
                    f"it exited with code {process.exitcode} (see its traceback above)"
                    if process.exitcode is not None else f"no answer within {self.start_timeout:g}s")
                self.close()
                raise ForkServerError(f"the fork server cannot fork workers: {why}")
            self.ready = True
            log.debug("%s: fork server ready (pid %d)", self.name, process.pid)
        finally:
            self.settled.set()

    def start_process(self, target: Callable[..., Any], args: tuple[Any, ...], fds: list[int],
                      name: str) -> ForkedProcess:
        """Fork a worker that runs ``target(*args)``; :class:`PassedFd` in *args* (at the top level or in
        a tuple there) name descriptors of *fds*, which the worker gets copies of."""
        if self._sock is None:
            raise ForkServerError("the fork server is not running")
        payload = pickle.dumps((target, args, name), pickle.HIGHEST_PROTOCOL)
        if len(payload) > _MAX_REQUEST:
            raise ForkServerError(f"the worker's arguments pickle to {len(payload)} bytes, more than "
                                  f"{_MAX_REQUEST} (a model factory by reference is a few hundred)")
        try:
            socket.send_fds(self._sock, [payload], fds)
            ready = connection.wait([self._sock], self.start_timeout)
            reply = self._sock.recv(4096) if ready else b""
        except OSError as exc:
            raise ForkServerError(f"the fork server is gone: {exc}") from exc
        if reply[:1] == b"P" and len(reply) == 1 + _PID.size:
            return ForkedProcess(_PID.unpack_from(reply, 1)[0], name)
        why = reply[1:].decode(errors="replace") if reply[:1] == b"E" else "it did not answer"
        raise ForkServerError(f"the fork server could not start {name}: {why}")

    def close(self) -> None:
        """Close the request socket: the server exits when it reads its end. Does not wait."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def stop(self) -> None:
        """:meth:`close`, then join; kill if it does not go."""
        self.close()
        process, self._process = self._process, None
        if process is None:
            return
        process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
        try:
            process.close()
        except ValueError:  # still running after SIGKILL + join: nothing more to do
            pass


class ForkedProcess:
    """A worker forked by a :class:`ForkServer`, a child of this process: the part of
    ``multiprocessing.Process`` the worker set uses (pid, sentinel, join, exitcode, terminate, close)."""

    def __init__(self, pid: int, name: str) -> None:
        self.pid: int | None = pid
        self.name = name
        self.exitcode: int | None = None
        # The worker is our child and nobody else may reap it: its pid cannot be reused before we do.
        self._pidfd: int | None = os.pidfd_open(pid)
        # As multiprocessing's sentinels: closed by close(), or when the handle is collected; not at
        # interpreter exit, where finalize's own exit hook may run before the pool's, which still
        # waits on it while it stops the workers.
        self._finalizer = weakref.finalize(self, os.close, self._pidfd)
        self._finalizer.atexit = False

    @property
    def sentinel(self) -> int:
        if self._pidfd is None:
            raise ValueError("process object is closed")
        return self._pidfd

    def _poll(self, block: bool) -> int | None:
        if self.exitcode is None and self.pid is not None:
            try:
                pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): the code is lost
                pid, status = self.pid, 255 << 8
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)
        return self.exitcode

    def join(self, timeout: float | None = None) -> None:
        if self.exitcode is not None or self._pidfd is None:
            return
        if select.select([self._pidfd], [], [], timeout)[0]:
            self._poll(block=True)

    def is_alive(self) -> bool:
        return self._poll(block=False) is None

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.exitcode is None and self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, sig)

    def close(self) -> None:
        if self._pidfd is None:
            return
        if self.is_alive():
            raise ValueError(f"cannot close {self.name} (pid {self.pid}): it is still running")
        self._finalizer()
        self._pidfd = None


# --- the fork server process -------------------------------------------------------------------------------


def run_worker(*args: Any) -> None:
    """A worker process's entry point, forked by a fork server or spawned: it runs
    :func:`flask_torchpool.worker.worker_main`, imported here, in the worker (preloaded by the fork
    server), so that the process running the pool need not load torch (Note [A pool server without
    torch] in :mod:`flask_torchpool.codec`). It lives in this module, which the fork server has
    imported already: an entry point elsewhere would import its module, and all that module imports,
    in every worker after the fork, copying pages the fork server shares with it."""
    from .worker import worker_main

    worker_main(*args)


def _serve(sock: socket.socket, parent_pid: int, preload: tuple[str, ...], pool_name: str) -> None:
    """Entry point of the fork server (spawned): preload, then fork a worker per request until the
    web process closes its end."""
    from .config import WORKER_ENV

    # A TorchPool built by what the server imports stays inert; the worker overwrites this.
    os.environ[WORKER_ENV] = f"{pool_name} fork server"
    libc = ctypes.PyDLL(None, use_errno=True)   # PyDLL: the GIL stays held across clone, as in os.fork
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(70)
    with open("/proc/self/comm", "rb") as f:
        spawned_name = f.read().strip()
    libc.prctl(_PR_SET_NAME, PROCESS_NAME.encode(), 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        for name in preload:
            __import__(name)
        _stop_blas_threads()
        # A collection in a worker would write to every object the fork server made (its GC header),
        # copying the pages they share; frozen, collections skip them (see gc.freeze's docs).
        gc.collect()
        gc.freeze()
        tid_address = _tid_address(libc)
        if tid_address is None:
            raise ForkServerError("cannot find glibc's cached thread id to update in the worker")
        threads = _threads()
        if threads != 1:
            raise ForkServerError(f"{threads} threads after importing {', '.join(preload)}")
    except Exception as exc:
        sock.send(b"E" + f"{type(exc).__name__}: {exc}".encode())
        os._exit(0)
    sock.send(b"R")
    while True:
        try:
            payload, fds, _, _ = socket.recv_fds(sock, _MAX_REQUEST, 64)
        except (ConnectionError, InterruptedError):
            os._exit(0)
        if not payload:
            os._exit(0)   # the web process closed its end: the pool stopped
        try:
            pid = _fork(libc, tid_address, sock, payload, fds, spawned_name)
        except Exception as exc:
            reply = b"E" + f"{type(exc).__name__}: {exc}".encode()[:4000]
        else:
            reply = b"P" + _PID.pack(pid)
        finally:
            for fd in fds:
                os.close(fd)
        sock.send(reply)


def _fork(libc: Any, tid_address: int, sock: socket.socket, payload: bytes, fds: list[int],
          spawned_name: bytes) -> int:
    threads = _threads()
    if threads != 1:
        raise ForkServerError(f"the fork server has {threads} threads; forking it is not safe")
    flags = _CLONE_PARENT | _CLONE_CHILD_SETTID | signal.SIGCHLD
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = libc.syscall(_SYS_CLONE, ctypes.c_ulong(flags), None, None, ctypes.c_void_p(tid_address), None)
    if pid != 0:
        ctypes.pythonapi.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(ctypes.get_errno(), f"clone: {os.strerror(ctypes.get_errno())}")
        return int(pid)
    ctypes.pythonapi.PyOS_AfterFork_Child()
    code = 1
    try:
        libc.prctl(_PR_SET_NAME, spawned_name, 0, 0, 0)
        sock.close()
        # Unpickled after the fork (it comes from our own parent, the web process): a model factory
        # given by reference imports its module in the worker, never in the fork server.
        target, args, name = pickle.loads(payload)
        resolved = tuple(_resolve(a, fds) for a in args)
        code = _run_child(target, resolved, name)
    finally:
        os._exit(code)


def _run_child(target: Callable[..., Any], args: tuple[Any, ...], name: str) -> int:
    """Run *target* as multiprocessing runs a forked Process: its own current_process (named, a child
    of the web process), finalizers and after-fork hooks reset; returns the exit code."""
    import multiprocessing.process as mpp

    import torch.multiprocessing as tmp  # preloaded here (PRELOAD); the pool's own process never loads it

    parent = mpp.parent_process()
    process = tmp.get_context("spawn").Process(target=target, args=args, name=name, daemon=True)
    if parent is not None:
        process._parent_pid = parent.pid               # type: ignore[attr-defined]
        process._parent_name = parent.name             # type: ignore[attr-defined]
    sentinel = getattr(parent, "_sentinel", None)
    return int(process._bootstrap(parent_sentinel=sentinel))   # type: ignore[attr-defined]


def _resolve(value: Any, fds: list[int]) -> Any:
    if isinstance(value, PassedFd):
        fd = fds[value.index]   # the worker's own copy: the fork server closes its copies
        return connection.Connection(fd) if value.connection else fd
    if isinstance(value, tuple) and any(isinstance(v, PassedFd) for v in value):
        return tuple(_resolve(v, fds) for v in value)
    return value


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _tid_address(libc: Any) -> int | None:
    """Where glibc keeps this thread's id (``struct pthread``'s ``tid``), found by its value: the main
    thread's id is the pid, and exactly one aligned word of the first 2 KiB holds it."""
    libc.pthread_self.restype = ctypes.c_void_p
    base = libc.pthread_self()
    if not base:
        return None
    words = (ctypes.c_int32 * 512).from_address(base)
    hits = [i for i in range(512) if words[i] == os.getpid()]
    return base + 4 * hits[0] if len(hits) == 1 else None


def _stop_blas_threads() -> None:
    """Stop the thread pools of the OpenBLAS libraries loaded so far (numpy's starts at import); each
    restarts on its first use in a worker."""
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    for path in sorted(libs):
        try:
            shutdown = ctypes.CDLL(path).blas_thread_shutdown_
        except (OSError, AttributeError):
            continue
        shutdown()
    deadline = time.monotonic() + 2.0
    while _threads() > 1 and time.monotonic() < deadline:   # threads leave the task list as they exit
        time.sleep(0.005)
