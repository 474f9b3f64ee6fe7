"""gunicorn hooks: the gunicorn master starts the host's pool server before it forks any web worker.

In ``gunicorn.conf.py``::

    from flask_torchpool.gunicorn import on_exit, on_starting  # noqa: F401

and ``TORCHPOOL_MODE = "attach"`` (or ``"auto"``) in the app's config. ``on_starting`` runs in the
master before it forks: it starts ``python -m flask_torchpool.server`` for the app gunicorn serves as its
own process (a fresh interpreter: the master imports neither torch nor CUDA, and holds no thread), and
waits until the server listens, so the web workers find it ready. ``on_exit`` stops it with SIGTERM
(it drains first). Should the master die without ``on_exit``, the server notices and stops by itself.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
from typing import Any

from .attach.rendezvous import launch_server

log = logging.getLogger(__name__)

#: Seconds the master waits for the server to load its models and listen.
START_TIMEOUT = float(os.environ.get("TORCHPOOL_GUNICORN_START_TIMEOUT", "300"))

_server: subprocess.Popen[bytes] | None = None


def on_starting(server: Any) -> None:
    """gunicorn hook: start the pool server for ``server.app``'s import string and wait until it serves."""
    global _server
    app_uri = getattr(server.app, "app_uri", None) or server.cfg.wsgi_app
    if not app_uri:
        raise RuntimeError("flask_torchpool.gunicorn: gunicorn was given no app import string")
    read_fd, write_fd = os.pipe()
    try:
        _server = launch_server(app_uri, owner_pid=os.getpid(), ready_fd=write_fd,
                                cwd=server.cfg.chdir or None, sync_web=_sync_workers(server))
    finally:
        os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], START_TIMEOUT)
        line = os.read(read_fd, 4096).decode(errors="replace").strip() if ready else ""
    finally:
        os.close(read_fd)
    if not line:
        code = _server.poll()
        _stop()
        raise RuntimeError(f"flask_torchpool.gunicorn: the pool server for {app_uri} did not start "
                           f"({'it exited with ' + str(code) if code is not None else 'timed out'}); "
                           "see its output above")
    log.info("flask_torchpool: pool server pid %d serves %s", _server.pid, line)
    server.log.info("flask_torchpool: pool server pid %d serves %s", _server.pid, line)


def _sync_workers(server: Any) -> bool:
    """Whether gunicorn runs sync workers, one request at a time each (``-k sync`` without ``--threads``:
    with threads gunicorn runs gthread workers instead)."""
    worker_class = getattr(server.cfg, "worker_class", None)   # loads the worker class's module
    sync = sys.modules.get("gunicorn.workers.sync")
    return sync is not None and isinstance(worker_class, type) and issubclass(worker_class, sync.SyncWorker)


def on_exit(server: Any) -> None:
    """gunicorn hook: stop the pool server (it drains calls in flight first)."""
    _stop()


def _stop(timeout: float = 60.0) -> None:
    global _server
    proc, _server = _server, None
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
