"""Rendezvous: where a host's pool server listens, who may talk to it, and starting one.

Shared by the attached client (:mod:`.client`), the server (:mod:`.server`) and the gunicorn hook
(:mod:`flask_torchpool.gunicorn`), so that each of these is written once:

* the socket's path (``TORCHPOOL_SOCKET``, else one per app in a private per-user directory under
  ``$RUNTIME_DIRECTORY``, ``$XDG_RUNTIME_DIR`` or the temp dir) and the check that its directory is
  ours, private (mode 0700) and not a symbolic link (opened with ``O_NOFOLLOW`` and checked with
  ``fstat``, so that another user cannot plant a link or squat the name under /tmp);
* the server lock beside the socket (``<socket>.lock``, ``flock``), held for the server's whole life: a
  second server refuses to start, and a web process can tell "a server is loading its models" (locked,
  not yet listening) from "no server" (unlocked);
* the peer check: both ends of a connection must run as the same user (``SO_PEERCRED``);
* launching ``python -m flask_torchpool.server`` as its own process (its own session, so that signals for
  the web workers' process group do not reach it);
* shutting a socket down so that the thread reading it sees end-of-file.

Imports neither torch nor Flask: the gunicorn master uses it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

from .. import errors
from ..errors import ConfigError, TorchPoolError
from ..exits import process_stopped

log = logging.getLogger(__name__)

# --- the socket's path, directory and lock ---------------------------------------------------------------


def runtime_base() -> str:
    """Where the default socket directory goes: systemd's ``$RUNTIME_DIRECTORY`` (the first, when it
    lists several), else ``$XDG_RUNTIME_DIR``, else the temp dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return runtime or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()


def default_socket_path(app_name: str) -> str:
    """Where the socket of *app_name*'s pool server is by default: a per-user private directory in
    :func:`runtime_base`, one socket per app."""
    base = runtime_base()
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in app_name) or "app"
    return os.path.join(base, f"flask_torchpool-{os.getuid()}", f"{safe}.sock")


def socket_path_for(socket_setting: str | None, app_name: str) -> str:
    """The socket of *app_name*'s server: ``TORCHPOOL_SOCKET`` (*socket_setting*) or the default."""
    return socket_setting if socket_setting else default_socket_path(app_name)


def ensure_private_dir(path: str) -> None:
    """Create the socket's directory with mode 0700, or check that an existing one is a directory (not
    a symbolic link), ours and private. Raises :class:`ConfigError` naming ``TORCHPOOL_SOCKET``
    otherwise."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError("TORCHPOOL_SOCKET", f"cannot create the socket's directory {directory}: "
                                              f"{exc.strerror}") from None
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ConfigError("TORCHPOOL_SOCKET", f"the socket's directory {directory} is a symbolic link "
                                                  "or not a directory (another user may have planted it); "
                                                  "remove it or set TORCHPOOL_SOCKET to a path in a "
                                                  "directory of your own") from None
        raise ConfigError("TORCHPOOL_SOCKET", f"cannot open the socket's directory {directory}: "
                                              f"{exc.strerror}") from None
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    if info.st_uid != os.getuid():
        raise ConfigError("TORCHPOOL_SOCKET", f"the socket's directory {directory} belongs to uid "
                                              f"{info.st_uid}, not to this user ({os.getuid()}); use a "
                                              "directory of your own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError("TORCHPOOL_SOCKET", f"the socket's directory {directory} is accessible to other "
                                              f"users (mode {stat.S_IMODE(info.st_mode):o}); chmod 700 it "
                                              "or use a private directory")


def lock_path(path: str) -> str:
    return path + ".lock"


def try_lock(path: str) -> int | None:
    """Take the server lock of socket *path*; the descriptor holding it, or None when a server holds it."""
    try:
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError("TORCHPOOL_SOCKET", f"the server lock {lock_path(path)} is a symbolic link; "
                                                  "remove it or set TORCHPOOL_SOCKET to a path in a "
                                                  "directory of your own") from None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def take_lock(path: str) -> int:
    """The server lock of socket *path*, for a server about to serve it (its directory is made private
    first). Raises :class:`TorchPoolError` when another server holds it."""
    ensure_private_dir(path)
    fd = try_lock(path)
    if fd is None:
        raise TorchPoolError(f"another pool server already serves {path} (its lock {lock_path(path)} is "
                             "held); stop it or set another TORCHPOOL_SOCKET")
    return fd


def server_running(path: str) -> bool:
    """True when a pool server holds the lock of socket *path* (listening, or still loading)."""
    if not os.path.exists(lock_path(path)):
        return False
    fd = try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


# --- connections ---------------------------------------------------------------------------------------


def peer_of(sock: socket.socket) -> tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of the Unix socket *sock* (``SO_PEERCRED``: the
    kernel's word, not the peer's)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


def check_same_user(sock: socket.socket, what: str) -> int:
    """The pid of *sock*'s peer; raises ``PermissionError`` (an ``OSError``) when it runs as another
    user. *what* names the peer in the message ("the process serving PATH", "web process")."""
    pid, uid = peer_of(sock)
    if uid != os.getuid():
        raise PermissionError(errno.EPERM, f"{what} (pid {pid}) runs as uid {uid}, not as this user")
    return pid


def stopped_message(pid: int) -> str:
    return (f"the pool server (pid {pid}) is stopped (SIGSTOP, or held by a debugger): calls fail "
            "until it is continued (SIGCONT)")


def wait_for_hello(channel: Any, server_pid: int, interval: float, timeout: float = 30.0) -> None:
    """Wait until *channel* (the server's answer to a hello) is readable; ``OSError`` when the server
    is stopped (it would never answer) or has not answered within *timeout*."""
    deadline = time.monotonic() + timeout
    while not channel.poll(interval):
        if process_stopped(server_pid):
            raise OSError(errno.EAGAIN, stopped_message(server_pid))
        if time.monotonic() > deadline:
            raise OSError(errno.ETIMEDOUT, "the pool server did not answer the hello")


_closing_at_exit: weakref.WeakSet[Any] = weakref.WeakSet()


def close_at_exit(connection: Any) -> None:
    """Close *connection* (``close()``) when the interpreter exits, before it finalizes: a daemon reader
    thread that wakes up during finalization is ended by ``pthread_exit``, which aborts a process that
    loaded libstdc++ (torch) with "terminate called without an active exception"."""
    _closing_at_exit.add(connection)


@atexit.register
def _close_all_at_exit() -> None:
    for connection in list(_closing_at_exit):
        with contextlib.suppress(Exception):
            connection.close()


def shutdown_socket(fd: int) -> None:
    """Shut the socket *fd* down both ways, so that a thread blocked reading it sees end-of-file (the
    descriptor stays open: only that thread closes it, so that its number cannot be reused meanwhile)."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def set_send_timeout(fd: int, seconds: float) -> None:
    """A send timeout on a blocking socket: a send that cannot progress for *seconds* fails
    (``BlockingIOError``) instead of blocking for ever on a peer that does not read."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))


def set_recv_timeout(fd: int, seconds: float) -> None:
    """A receive timeout on a blocking socket (0: none). Not ``settimeout``, which would make the
    descriptor non-blocking under the :class:`~multiprocessing.connection.Connection` reading it."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))


# --- starting a server process --------------------------------------------------------------------------


def launch_server(app_import: str, *, owner_pid: int, socket_path: str | None = None,
                  lock_fd: int | None = None, ready_fd: int | None = None,
                  cwd: str | None = None, sync_web: bool = False) -> subprocess.Popen[bytes]:
    """Start ``python -m flask_torchpool.server`` for the app *app_import* in its own session, with this
    process's import path. It stops when process *owner_pid* exits; *lock_fd* (the server lock, taken
    by the caller) and *ready_fd* (written once it listens) pass to it. *sync_web*: the web processes
    are gunicorn sync workers (``--sync-web``: ``TORCHPOOL_WORKER_NICE="auto"`` is then 0)."""
    argv = [sys.executable, "-m", "flask_torchpool.server", "--app", app_import, "--owner-pid",
            str(owner_pid)]
    if socket_path is not None:
        argv += ["--socket", socket_path]
    if lock_fd is not None:
        argv += ["--lock-fd", str(lock_fd)]
    if ready_fd is not None:
        argv += ["--ready-fd", str(ready_fd)]
    if sync_web:
        argv.append("--sync-web")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.Popen(argv, pass_fds=tuple(fd for fd in (lock_fd, ready_fd) if fd is not None),
                            start_new_session=True, env=env, stdin=subprocess.DEVNULL, cwd=cwd)


def exit_now(code: int) -> None:
    """End a pool server process once it has stopped, without the interpreter's teardown: daemon
    threads (connections, the owner watch) may still be inside torch, and torch's static destructors
    then abort the process ("terminate called without an active exception", exit by SIGABRT) instead
    of letting it exit with *code*. Workers end the same way (worker.py)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# --- auto mode: the first web process starts the server ------------------------------------------------


class ServerSpawner:
    """Starts ``python -m flask_torchpool.server`` as its own process (its own session, so that signals
    for the web workers' process group do not reach it), owned by *owner_pid*: the server stops when
    that process exits. Only the process that wins the server lock spawns; the lock passes to the
    server."""

    def __init__(self, app_import: str, path: str, owner_pid: int, sync_web: bool = False) -> None:
        self.app_import = app_import
        self.path = path
        self.owner_pid = owner_pid
        self.sync_web = sync_web  # the web tier is gunicorn sync workers (launch_server)
        self.process: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn_if_needed(self) -> bool:
        """Spawn a server unless one holds the lock; True if this call spawned one."""
        ensure_private_dir(self.path)
        fd = try_lock(self.path)
        if fd is None:
            return False
        try:
            self.process = launch_server(self.app_import, owner_pid=self.owner_pid, socket_path=self.path,
                                         lock_fd=fd, sync_web=self.sync_web)
        finally:
            os.close(fd)  # the server holds the lock now (same open file description)
        log.info("torchpool: started the pool server (pid %d) for %s on %s", self.process.pid,
                 self.app_import, self.path)
        # Reap it when it exits, so that it does not linger as a zombie of this web process.
        threading.Thread(target=self.process.wait, name="torchpool-server-reaper", daemon=True).start()
        return True


def ensure_server(app_import: str | None, path: str, owner_pid: int,
                  sync_web: bool = False) -> ServerSpawner | None:
    """Auto mode: make sure a pool server for *path* runs, starting one (owned by *owner_pid*) if no
    process holds its lock. Returns the spawner when this process started it. *sync_web*: the web tier
    is gunicorn sync workers (:func:`launch_server`)."""
    if server_running(path):
        return None
    if app_import is None:
        raise errors.ConfigError(
            "TORCHPOOL_MODE", "'auto' found no pool server and cannot tell how to import this app to "
            "start one (it was not loaded by gunicorn from an import string); start it yourself with "
            "`flask --app IMPORT torchpool serve`, or use the gunicorn.conf.py hook "
            "(flask_torchpool.gunicorn)")
    spawner = ServerSpawner(app_import, path, owner_pid, sync_web)
    return spawner if spawner.spawn_if_needed() else None
