"""How the app is being run, and the process-level hooks: what decides when (and whether) a pool starts.

``TORCHPOOL_START = "auto"`` starts the workers in ``init_app``, except where the process will not serve:

* a process that is being spawned (a worker re-importing the user's ``__main__`` script) or a worker
  itself (:func:`in_spawned_child`): ``TorchPool(app)`` there only records the config;
* the Werkzeug reloader's watcher (``flask run --debug``), a gunicorn master (``--preload``) and the
  ``flask`` command loading the app for a command other than ``flask run`` (:func:`defer_start`): there
  the pool starts on first use, i.e. in the serving child or forked worker, or when a command uses it;
* the pool server loading the app to serve it (:func:`loading_to_serve`): it starts the workers itself.

``app.run(debug=True)`` in a script turns the process that made the pool into the reloader's watcher:
:func:`guard_reloader_watcher` stops its pool then.

SIGTERM (:class:`SigtermDrain`): the handler only sets an event that a drain thread waits on; that
thread drains the pools, then ends the process by SIGTERM as a process manager expects. Nothing runs in
the handler that could need a lock the interrupted code holds.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable

import click
from flask import Flask

from .config import WORKER_ENV

log = logging.getLogger(__name__)

#: ``click.Context.meta`` key set while the pool server (``flask torchpool serve``) loads the app.
SERVING_META = "flask_torchpool.serving"


def in_spawned_child() -> bool:
    """True inside our own workers, and while a spawned process re-imports ``__main__``."""
    if os.environ.get(WORKER_ENV):
        return True
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def loading_to_serve() -> bool:
    """True while the pool server's command loads the app (the command starts the workers itself)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(SERVING_META))


def defer_start() -> bool:
    """``TORCHPOOL_START='auto'``: should this process wait for first use instead of starting now?"""
    # `flask torchpool plan`, `flask routes`, `flask shell`, users' own commands: the `flask` command
    # loads the app for a command that is not `flask run`; it starts the pool if and when it needs one.
    if _loaded_by_flask_command():
        return True
    # flask run --debug: the watcher process loads the app too, but only the child it spawns (which has
    # WERKZEUG_RUN_MAIN=true) serves. FLASK_RUN_FROM_CLI is set by `flask run`.
    if os.environ.get("FLASK_RUN_FROM_CLI") == "true" and os.environ.get("WERKZEUG_RUN_MAIN") != "true":
        if _flask_run_reloads():
            return True
    # gunicorn --preload imports the app in the master, which forks workers later.
    if "gunicorn" in sys.modules and gunicorn_loader() == "master":
        return True
    return False


def _loaded_by_flask_command() -> bool:
    """True while the ``flask`` command line loads the app for a command other than ``flask run``."""
    from flask.cli import ScriptInfo

    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.find_object(ScriptInfo) is None:
        return False
    return ctx.command.name != "run"


def _flask_run_reloads() -> bool:
    argv = sys.argv[1:]
    if "--no-reload" in argv:
        return False
    if "--reload" in argv or "--debug" in argv:
        return True
    return os.environ.get("FLASK_DEBUG", "").lower() in ("1", "true", "yes")


def gunicorn_loader() -> str | None:
    """Who is loading the app: ``"worker"`` (a gunicorn worker, after the fork: ``init_process`` /
    ``load_wsgi`` in ``gunicorn.workers.*``), ``"master"`` (``--preload``: gunicorn code, no worker),
    or None (not gunicorn; merely importing gunicorn somewhere proves nothing). Command lines prove
    nothing either: a shell that starts gunicorn has "gunicorn" in its own."""
    seen_gunicorn = False
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if name.startswith("gunicorn.workers"):
            return "worker"
        if name == "gunicorn" or name.startswith("gunicorn."):
            seen_gunicorn = True
        frame = frame.f_back
    return "master" if seen_gunicorn else None


def gunicorn_app_import() -> str | None:
    """The import string gunicorn loads the app from (``gunicorn module:app``), read from the loading
    stack; None when gunicorn is not loading it."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "load_wsgiapp" and \
                str(frame.f_globals.get("__name__", "")).startswith("gunicorn."):
            uri = getattr(frame.f_locals.get("self"), "app_uri", None)
            return uri if isinstance(uri, str) else None
        frame = frame.f_back
    return None


def gunicorn_sync_worker() -> bool:
    """Whether a gunicorn sync worker (``-k sync`` without ``--threads``: one request at a time) is
    loading the app, read from the loading stack (``Worker.load_wsgi``'s ``self``)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if str(frame.f_globals.get("__name__", "")).startswith("gunicorn.workers."):
            sync = sys.modules.get("gunicorn.workers.sync")
            return sync is not None and isinstance(frame.f_locals.get("self"), sync.SyncWorker)
        frame = frame.f_back
    return False


def guard_reloader_watcher(app: Flask, stop_pools: Callable[[], bool]) -> None:
    """``app.run(debug=True)`` in a script: the process that ran ``TorchPool(app)`` becomes the Werkzeug
    reloader's watcher, which never serves; its child (``WERKZEUG_RUN_MAIN=true``) does. Nothing says so
    before ``app.run``, so ``app.run`` calls *stop_pools* (which stops this process's pools, and says
    whether there were any) when it is about to become a watcher, leaving one pool, in the serving
    child."""
    run = app.run

    @functools.wraps(run)
    def run_guarded(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", args[2] if len(args) > 2 else None)
        debug = app.debug if debug is None else bool(debug)
        reloads = kwargs.get("use_reloader", debug)
        if reloads and os.environ.get("WERKZEUG_RUN_MAIN") != "true" and stop_pools():
            log.info("torchpool %s: this process becomes the reloader's watcher; its pool stopped and "
                     "the serving child starts its own", app.import_name)
        return run(*args, **kwargs)

    app.run = run_guarded  # type: ignore[method-assign]


def check_resources(workers: int) -> None:
    """Warn, with the fix, when the process's limits are too tight for *workers* workers."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = 64 + 8 * workers
        if soft != resource.RLIM_INFINITY and soft < needed:
            log.warning("torchpool: the open-file limit is %d, below the %d this pool may need; raise it "
                        "(ulimit -n 4096, LimitNOFILE= in systemd, --ulimit nofile= in Docker)",
                        soft, needed)
    except (ImportError, ValueError, OSError):  # pragma: no cover - not POSIX
        pass
    if os.path.isdir("/dev/shm"):
        try:
            total = shutil.disk_usage("/dev/shm").total
        except OSError:  # pragma: no cover
            return
        # Arenas are memfd (not /dev/shm), but torch.multiprocessing and user code share through it.
        if total < 256 << 20:
            log.warning("torchpool: /dev/shm is only %d MiB (Docker's default is 64 MiB); torch shares "
                        "tensors through it. Raise it: docker run --shm-size=1g, or on Kubernetes mount an "
                        "emptyDir with medium: Memory at /dev/shm", total >> 20)


class SighupReload:
    """Reload every model on SIGHUP (Note [Rolling reload] in :mod:`flask_torchpool.reload`), as
    gunicorn's master replaces its workers on HUP. Installed when SIGHUP still has its default action
    (which would end the process): the handler sets an event, a daemon thread runs *reload*."""

    def __init__(self, reload: Callable[[], None]) -> None:
        self._reload = reload
        self._requested = threading.Event()
        self._start_thread()

    def _start_thread(self) -> None:
        threading.Thread(target=self._run, args=(self._requested,), name="torchpool-sighup",
                         daemon=True).start()

    def _after_fork_in_child(self) -> None:
        self._requested = threading.Event()
        self._start_thread()

    @classmethod
    def install(cls, reload: Callable[[], None]) -> SighupReload | None:
        """Install the handler (from the main thread, when SIGHUP has its default action); None when it
        was not installed."""
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL:
            return None
        hook = cls(reload)
        signal.signal(signal.SIGHUP, hook._on_signal)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=hook._after_fork_in_child)
        return hook

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._requested.set()

    def _run(self, requested: threading.Event) -> None:
        while True:
            requested.wait()
            requested.clear()   # a HUP during the reload asks for one more after it
            log.warning("torchpool: SIGHUP: reloading every model")
            try:
                self._reload()
            except Exception:  # noqa: BLE001 - the next HUP must still work
                log.exception("torchpool: reloading on SIGHUP failed")


class SigtermDrain:
    """Drain on SIGTERM, when nobody else handles it (gunicorn installs its own before loading the app;
    its graceful shutdown ends in the exit hooks).

    The handler restores SIGTERM's default action and sets an event. Python runs it in the main thread
    between two bytecodes; the only lock it takes is the event's own, which no other code of the main
    thread ever holds (so, unlike the drain itself, it cannot wait for a lock the interrupted code
    holds). A daemon thread waiting on the event runs *drain*, then sends SIGTERM to the process again,
    which now ends it, by SIGTERM, as its manager expects. A second SIGTERM during the drain ends the
    process at once."""

    def __init__(self, drain: Callable[[], None]) -> None:
        self._drain = drain
        self._requested = threading.Event()
        self._start_thread()

    def _start_thread(self) -> None:
        threading.Thread(target=self._run, args=(self._requested,), name="torchpool-sigterm",
                         daemon=True).start()

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork (gunicorn without --preload forks before loading the
        # app, but a user's own fork may come later): a child drains its own pools with its own thread.
        self._requested = threading.Event()
        self._start_thread()

    @classmethod
    def install(cls, drain: Callable[[], None]) -> SigtermDrain | None:
        """Install the handler (from the main thread, when SIGTERM still has its default action); None
        when it was not installed."""
        if threading.current_thread() is not threading.main_thread():
            return None
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return None
        hook = cls(drain)
        signal.signal(signal.SIGTERM, hook._on_signal)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=hook._after_fork_in_child)
        return hook

    def _on_signal(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self._requested.set()

    def _run(self, requested: threading.Event) -> None:
        requested.wait()
        log.warning("torchpool: SIGTERM: draining")
        try:
            self._drain()
        except Exception:  # noqa: BLE001 - the process must still end
            log.exception("torchpool: draining on SIGTERM failed")
        finally:
            # The default action is back (the handler restored it): this ends the process.
            os.kill(os.getpid(), signal.SIGTERM)
