"""The Flask extension: ``TorchPool(app)`` / ``init_app``, ``@pool.infer``, ``submit``, ``shutdown``.

Flask glue only. Configuration is read once in :meth:`TorchPool.init_app`; the running pool for an app
lives in ``app.extensions["torchpool"]`` (a :class:`_AppState`), never on the extension object, so one
``TorchPool`` can serve several apps in an app factory.

When the workers start (``TORCHPOOL_START``):

* never in a process that is being spawned (a worker re-importing the user's ``__main__`` script) or in a
  worker itself: ``TorchPool(app)`` there only records the config;
* ``"eager"``: in ``init_app``;
* ``"lazy"``: on first use (a view, ``submit``, ``start()``);
* ``"auto"`` (default): eager, except in the Werkzeug reloader's watcher process (``flask run --debug``)
  and a gunicorn master (``--preload``), which never serve requests and must not hold threads or CUDA
  before forking: there the pool starts on first use, i.e. in the serving child / forked worker.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, TypeVar, overload

from flask import Flask, current_app, has_app_context

from .config import DEFAULTS, PoolConfig
from .errors import InferenceTimeoutError, PoolClosedError, TorchPoolError, WorkerStartupError
from .placement import Placement
from .placement import plan as compute_plan
from .pool import Pool

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

EXTENSION_KEY = "torchpool"
# Extra seconds a caller waits beyond its deadline for the manager to report the timeout itself.
_DEADLINE_GRACE = 5.0

_states: weakref.WeakSet[_AppState] = weakref.WeakSet()
_states_lock = threading.Lock()


class ModelProxy:
    """What a ``@pool.infer`` view receives: calling it runs the model in a worker process.

    ``proxy(*args, **kwargs)`` blocks the calling thread (without holding the GIL) until the worker
    answers; :meth:`submit` returns a :class:`concurrent.futures.Future`; :meth:`acall` is awaitable.
    Arguments and results may be tensors, ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
    ``bytes`` and tuples, lists and dicts of them.
    """

    __slots__ = ("_state", "timeout")

    def __init__(self, state: _AppState, timeout: float | None = None) -> None:
        self._state = state
        #: Deadline of each call in seconds (queueing plus execution); None means ``TORCHPOOL_TIMEOUT``.
        self.timeout = timeout

    def submit(self, *args: Any, **kwargs: Any) -> Future:
        """Start a call and return its future. Invalid input raises here, in the calling thread."""
        return self._state.pool_for_call().submit(args, kwargs, self.timeout)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        future = self.submit(*args, **kwargs)
        timeout = self.timeout if self.timeout is not None else self._state.config.timeout
        try:
            return future.result(None if timeout is None else timeout + _DEADLINE_GRACE)
        except FutureTimeout:
            # The manager fails calls at their deadline; reaching this means it could not.
            log.error("torchpool: a call outlived its deadline by %ss without an answer", _DEADLINE_GRACE)
            raise InferenceTimeoutError(f"the call did not finish within {timeout:g}s") from None

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """Awaitable form of a call, for ``async def`` views."""
        return await asyncio.wrap_future(self.submit(*args, **kwargs))

    def __repr__(self) -> str:
        return f"<ModelProxy {self._state.config.model!r} timeout={self.timeout}>"


class _AppState:
    """Everything one app's pool needs; stored in ``app.extensions["torchpool"]``."""

    def __init__(self, extension: TorchPool, app: Flask, config: PoolConfig, inert: bool) -> None:
        self.extension = extension
        self.app_name = app.import_name
        self.config = config
        self.inert = inert
        self.pool: Pool | None = None
        self.lock = threading.Lock()
        self.start_error: WorkerStartupError | None = None
        self.active_views = 0
        self.views_idle = threading.Condition(self.lock)

    @property
    def plan(self) -> list[Placement]:
        if self.pool is not None:
            return [w.placement for w in self.pool.workers]
        return compute_plan(self.config)

    def start(self) -> Pool:
        with self.lock:
            if self.inert:
                raise RuntimeError(
                    "this process is a flask_torchpool worker, or is being spawned as one, and cannot "
                    "start a pool. Spawned workers re-import your main script: put code that calls the "
                    "model at import time under `if __name__ == '__main__':`")
            if self.pool is not None and not self.pool.closed:
                pool = self.pool
            else:
                if self.pool is not None and self.start_error is None:
                    raise PoolClosedError("the pool was shut down; call TorchPool.start() to start "
                                          "a new one")
                placements = compute_plan(self.config)
                for placement in placements:
                    log.info("torchpool %s: %s", self.app_name, placement.describe())
                _check_resources(self.config, len(placements))
                pool = self.pool = Pool(self.config, placements, name=f"torchpool[{self.app_name}]")
                self.start_error = None
        try:
            pool.start()
        except WorkerStartupError as exc:
            self.start_error = exc
            raise
        return pool

    def pool_for_call(self) -> Pool:
        pool = self.pool
        if pool is not None and pool.started:
            return pool
        if self.start_error is not None:
            raise self.start_error  # don't respawn a failing model on every request; start() retries
        if pool is not None and pool.closed:
            raise PoolClosedError("the pool is shut down")
        return self.start()

    def shutdown(self, wait: bool = True, drain_timeout: float | None = None) -> None:
        pool = self.pool
        if pool is not None:
            pool.shutdown(wait=wait, drain_timeout=drain_timeout)

    def _after_fork_in_child(self) -> None:
        # The parent's workers, threads and locks are not ours: start afresh on first use.
        self.lock = threading.Lock()
        self.views_idle = threading.Condition(self.lock)
        self.active_views = 0
        self.pool = None
        self.start_error = None


class TorchPool:
    """Run a PyTorch model in a pool of spawned worker processes, from Flask views.

    ::

        app.config["TORCHPOOL_MODEL"] = "myapp.model:build"
        pool = TorchPool(app)           # or: pool = TorchPool(); pool.init_app(app)

        @app.post("/predict")
        @pool.infer
        def predict(model):
            return {"label": int(model(decode(request)).argmax())}

    Configuration is read once, in :meth:`init_app` (see the configuration docs for every key).
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read and validate the ``TORCHPOOL_*`` config of *app* and, depending on ``TORCHPOOL_START``,
        start its workers. Raises :class:`ConfigError` for a bad value and :class:`WorkerStartupError`
        when an eager start fails."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("a TorchPool is already registered on this app; use that instance "
                               "(app.extensions['torchpool'].extension) instead of creating another")
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        config = PoolConfig.from_mapping(app.config)
        inert = _in_spawned_child()
        state = _AppState(self, app, config, inert)
        app.extensions[EXTENSION_KEY] = state
        if inert:
            return
        with _states_lock:
            _states.add(state)
        if config.handle_sigterm:
            _install_sigterm_handler()
        if config.start == "eager" or (config.start == "auto" and not _defer_start()):
            state.start()

    # --- state lookup ---------------------------------------------------------------------------------

    def _state(self, app: Flask | None = None) -> _AppState:
        if app is None and has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        if app is not None:
            state = app.extensions.get(EXTENSION_KEY)
            if state is None or state.extension is not self:
                raise RuntimeError(f"this TorchPool is not registered on app {app.import_name!r}; "
                                   "call pool.init_app(app) first")
            return state
        with _states_lock:
            mine = [s for s in _states if s.extension is self]
        if len(mine) == 1:
            return mine[0]
        raise RuntimeError("no app context: use 'with app.app_context():' (this TorchPool is "
                           f"registered on {len(mine)} apps)" if mine else
                           "this TorchPool is not registered on any app; call pool.init_app(app)")

    # --- public API -----------------------------------------------------------------------------------

    def start(self, app: Flask | None = None) -> None:
        """Start the workers now (if they are not running) and return once every one has loaded its
        model. Raises :class:`WorkerStartupError` with the worker's traceback when one fails."""
        state = self._state(app)
        state.start_error = None
        state.start()

    def shutdown(self, wait: bool = True, app: Flask | None = None,
                 drain_timeout: float | None = None) -> None:
        """Stop taking calls, let calls in flight finish (``TORCHPOOL_DRAIN_TIMEOUT``), stop the workers.
        Idempotent. Without *app* and outside an app context, shuts down the pools of every app."""
        if app is None and not has_app_context():
            with _states_lock:
                states = [s for s in _states if s.extension is self]
        else:
            states = [self._state(app)]
        for state in states:
            state.shutdown(wait=wait, drain_timeout=drain_timeout)

    def model(self, timeout: float | None = None, app: Flask | None = None) -> ModelProxy:
        """A :class:`ModelProxy` whose calls have deadline *timeout* (default ``TORCHPOOL_TIMEOUT``)."""
        return ModelProxy(self._state(app), timeout)

    def submit(self, *args: Any, **kwargs: Any) -> Future:
        """Run ``model(*args, **kwargs)`` in a worker; returns a :class:`~concurrent.futures.Future`."""
        return self.model().submit(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``model(*args, **kwargs)`` in a worker and return its output (blocking)."""
        return self.model()(*args, **kwargs)

    @property
    def plan(self) -> list[Placement]:
        """Where each worker runs (device, cores, threads); computed without starting anything."""
        return self._state().plan

    def status(self, app: Flask | None = None) -> dict[str, Any]:
        """A JSON-ready snapshot: workers (pid, state, device, cores, calls, errors, restarts), queue
        depth and counters."""
        state = self._state(app)
        if state.pool is None:
            return {"started": False, "closed": False, "queued": 0, "counters": {},
                    "workers": [dict(p._asdict(), state="not started") for p in state.plan]}
        return state.pool.status()

    @overload
    def infer(self, view: F) -> F: ...

    @overload
    def infer(self, view: None = None, *, timeout: float | None = None) -> Callable[[F], F]: ...

    def infer(self, view: F | None = None, *, timeout: float | None = None) -> Any:
        """Decorate a view so that it receives a :class:`ModelProxy` as its first argument.

        Use as ``@pool.infer`` or ``@pool.infer(timeout=2.0)``. URL variables follow the proxy. Pool
        errors raised in the view become JSON answers (see the errors docs); override them with
        ``app.errorhandler``.
        """
        if view is None:
            return functools.partial(self.infer, timeout=timeout)
        if inspect.iscoroutinefunction(view):
            @functools.wraps(view)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                state = self._state()
                with _ActiveView(state):
                    return await view(ModelProxy(state, timeout), *args, **kwargs)

            _hide_first_parameter(async_wrapper, view)
            return async_wrapper

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            state = self._state()
            with _ActiveView(state):
                return view(ModelProxy(state, timeout), *args, **kwargs)

        _hide_first_parameter(wrapper, view)
        return wrapper


def _hide_first_parameter(wrapper: Callable[..., Any], view: Callable[..., Any]) -> None:
    try:
        sig = inspect.signature(view)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    params = list(sig.parameters.values())[1:]
    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]


class _ActiveView:
    """Counts views in progress, so that a SIGTERM drain can wait for their answers."""

    __slots__ = ("state",)

    def __init__(self, state: _AppState) -> None:
        self.state = state

    def __enter__(self) -> None:
        with self.state.lock:
            self.state.active_views += 1

    def __exit__(self, *exc: object) -> None:
        with self.state.lock:
            self.state.active_views -= 1
            if self.state.active_views == 0:
                self.state.views_idle.notify_all()


# --- process-level plumbing ---------------------------------------------------------------------------


def _in_spawned_child() -> bool:
    """True while a spawned process re-imports ``__main__`` and inside our own workers."""
    from . import worker

    if worker.IN_WORKER:
        return True
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _defer_start() -> bool:
    """``TORCHPOOL_START='auto'``: should this process wait for first use instead of starting now?"""
    # flask run --debug: the watcher process loads the app too, but only the child it spawns (which has
    # WERKZEUG_RUN_MAIN=true) serves. FLASK_RUN_FROM_CLI is set by `flask run`.
    if os.environ.get("FLASK_RUN_FROM_CLI") == "true" and os.environ.get("WERKZEUG_RUN_MAIN") != "true":
        if _flask_run_reloads():
            return True
    # gunicorn --preload imports the app in the master, which forks workers later.
    if "gunicorn" in sys.modules and not _parent_is_gunicorn():
        return True
    return False


def _flask_run_reloads() -> bool:
    argv = sys.argv[1:]
    if "--no-reload" in argv:
        return False
    if "--reload" in argv or "--debug" in argv:
        return True
    return os.environ.get("FLASK_DEBUG", "").lower() in ("1", "true", "yes")


def _parent_is_gunicorn() -> bool:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return b"gunicorn" in f.read()
    except OSError:
        return False


def _check_resources(config: PoolConfig, workers: int) -> None:
    """Warn, with the fix, when limits are too tight for this pool."""
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


_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """Drain pools on SIGTERM, when nobody else handles it (gunicorn installs its own before loading
    the app; its graceful shutdown ends in our atexit hook)."""
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    _sigterm_installed = True


def _on_sigterm(signum: int, frame: Any) -> None:
    log.warning("torchpool: SIGTERM: draining")
    with _states_lock:
        states = list(_states)
    # Stop taking calls everywhere first, then wait for the calls and the views that made them.
    for state in states:
        if state.pool is not None:
            state.pool.shutdown(wait=False)
    for state in states:
        state.shutdown(wait=True)
        with state.lock:
            state.views_idle.wait_for(lambda s=state: s.active_views == 0, state.config.drain_timeout)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _shutdown_all_at_exit() -> None:
    with _states_lock:
        states = list(_states)
    for state in states:
        try:
            state.shutdown(wait=True)
        except TorchPoolError:  # pragma: no cover
            pass


def _after_fork_in_child() -> None:
    global _states_lock
    _states_lock = threading.Lock()
    for state in list(_states):
        state._after_fork_in_child()


atexit.register(_shutdown_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
