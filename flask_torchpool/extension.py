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
  before forking: there the pool starts on first use, i.e. in the serving child / forked worker. The
  same holds when the ``flask`` command loads the app for a command other than ``flask run``
  (``flask torchpool plan``, ``flask routes``, ``flask shell``): those start the pool only if they use it.

With ``TORCHPOOL_INLINE`` the "pool" is an :class:`~flask_torchpool.inline.InlinePool` that runs the
model in this process (for tests); ``"auto"`` then builds the model on first use.

Several models (``TORCHPOOL_MODELS``) get one pool each, with its own workers, queue, batching and
restart budget; they start and stop together, and a call goes to the pool of the model it names
(``@pool.infer("name")``, ``pool.model("name")``), or to the default model's.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, TypeVar, overload

from flask import Flask, current_app, has_app_context

from .config import DEFAULT_MODEL, DEFAULTS, PoolConfig
from .errors import (
    ConfigError,
    InferenceTimeoutError,
    PoolClosedError,
    RemoteTraceback,
    TorchPoolError,
    WorkerStartupError,
)
from .inline import InlinePool
from .inline import plan as inline_plan
from .metrics import Metrics, merge
from .placement import Placement, plan_models
from .pool import Pool, _running_pools

if TYPE_CHECKING:
    from .client import PoolConnection, RemotePool

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

EXTENSION_KEY = "torchpool"
# Extra seconds a caller waits beyond its deadline for the manager to report the timeout itself.
_DEADLINE_GRACE = 5.0

_states: weakref.WeakSet[_AppState] = weakref.WeakSet()
_states_lock = threading.Lock()
#: True in a pool server process (``flask torchpool serve``): loading the app starts nothing, and the
#: server then starts the app's pool embedded, whatever ``TORCHPOOL_MODE`` says.
SERVING = False


class ModelProxy:
    """What a ``@pool.infer`` view receives: calling it runs the model in a worker process.

    ``proxy(*args, **kwargs)`` blocks the calling thread (without holding the GIL) until the worker
    answers; :meth:`submit` returns a :class:`concurrent.futures.Future`; :meth:`acall` is awaitable.
    Arguments and results may be tensors, ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
    ``bytes`` and tuples, lists and dicts of them.
    """

    __slots__ = ("_state", "timeout", "batch", "name")

    def __init__(self, state: _AppState, timeout: float | None = None, batch: bool = True,
                 name: str | None = None) -> None:
        self._state = state
        #: Deadline of each call in seconds (queueing plus execution); None means the model's
        #: ``TORCHPOOL_TIMEOUT``.
        self.timeout = timeout
        #: Whether calls may be batched with other callers' (``TORCHPOOL_MAX_BATCH_SIZE``).
        self.batch = batch
        #: The name of the model its calls go to (``"default"`` for ``TORCHPOOL_MODEL``).
        self.name = state.model_name(name)

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Start a call and return its future. Invalid input raises here, in the calling thread."""
        return self._state.pool_for_call(self.name).submit(args, kwargs, self.timeout, self.batch)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        future = self.submit(*args, **kwargs)
        timeout = self.timeout if self.timeout is not None else self._state.configs[self.name].timeout
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
        return (f"<ModelProxy {self.name!r}: {self._state.configs[self.name].model!r} "
                f"timeout={self.timeout}>")


class _AppState:
    """Everything one app's pools need (one pool per model); stored in ``app.extensions["torchpool"]``."""

    def __init__(self, extension: TorchPool, app: Flask, configs: dict[str, PoolConfig],
                 inert: bool) -> None:
        self.extension = extension
        self.app_name = app.import_name
        #: Every model's configuration, by name, in order (``"default"`` first when it is configured).
        self.configs = configs
        #: The model of calls that name none: ``"default"``, or the only model; None when there are
        #: several and none is named ``"default"``.
        self.default_model = (DEFAULT_MODEL if DEFAULT_MODEL in configs
                              else next(iter(configs)) if len(configs) == 1 else None)
        #: The app's own keys (start, shutdown, health, inline) are the same in every model's
        #: configuration: this is the default model's (or the first model's).
        self.config = configs[self.default_model or next(iter(configs))]
        self.logger_name = app.name  # app.logger's name: the workers' logs go there
        self.inert = inert
        #: The pool of every model, once started (closed pools stay until the next start); in attach
        #: mode, RemotePools of the pool server's models.
        self.pools: dict[str, Pool | InlinePool | RemotePool] = {}
        #: How to import the app again, when gunicorn loaded it ("module:app"): auto mode starts a pool
        #: server with it.
        self.app_import: str | None = None
        self.connection: PoolConnection | None = None
        self.background_start: threading.Thread | None = None
        self.lock = threading.Lock()
        self.start_error: WorkerStartupError | None = None
        self.active_views = 0
        self.views_idle = threading.Condition(self.lock)

    @property
    def pool(self) -> Pool | InlinePool | RemotePool | None:
        """The default model's pool (or the first model's); None before the first start."""
        return self.pools.get(self.default_model or next(iter(self.configs)))

    def model_name(self, name: str | None) -> str:
        """The model that a call for *name* (None: no name given) goes to. Raises :class:`ConfigError`,
        listing the models, for a name that is not configured, or for no name when there are several
        models and none is named ``"default"``."""
        names = ", ".join(map(repr, self.configs))
        if name is None:
            if self.default_model is None:
                first = next(iter(self.configs))
                raise ConfigError("TORCHPOOL_MODELS", f"names several models ({names}) and none is "
                                                      f"'default': name the model to call, e.g. "
                                                      f"@pool.infer({first!r}) or pool.model({first!r})")
            return self.default_model
        if name not in self.configs:
            raise ConfigError("TORCHPOOL_MODELS", f"has no model named {name!r}; this app's models are "
                                                  f"{names}")
        return name

    @property
    def plan(self) -> list[Placement]:
        if self.pools:
            return [w.placement for pool in self.pools.values() for w in pool.workers]
        return self._compute_plan()

    def _compute_plan(self) -> list[Placement]:
        if self.config.inline:
            return [p for config in self.configs.values() for p in inline_plan(config)]
        return plan_models(self.configs)

    def _create_pool(self, name: str, config: PoolConfig, placements: list[Placement],
                     attach: bool = False) -> Pool | InlinePool | RemotePool:
        """Make (not start) the pool of model *name*: the one place where pools are made. With
        *attach*, a :class:`~flask_torchpool.client.RemotePool` of the pool server's model *name*."""
        label = self.app_name if name == DEFAULT_MODEL else f"{self.app_name}:{name}"
        if attach:
            from .client import RemotePool

            assert self.connection is not None
            return RemotePool(config, self.connection, name, name=f"torchpool[{label}]")
        if config.inline:
            return InlinePool(config, placements, name=f"torchpool[{label}]")
        return Pool(config, placements, name=f"torchpool[{label}]", logger_name=self.logger_name)

    def start(self, restart: bool = False,
              embedded: bool = False) -> dict[str, Pool | InlinePool | RemotePool]:
        """Start this app's pools; with *restart* (``TorchPool.start()``), pools that were shut down are
        replaced by new ones. Calls never restart a pool that was shut down. With *embedded* (the pool
        server), the workers start here whatever ``TORCHPOOL_MODE`` says."""
        with self.lock:
            if self.inert:
                raise RuntimeError(
                    "this process is a flask_torchpool worker, or is being spawned as one, and cannot "
                    "start a pool. Spawned workers re-import your main script: put code that calls the "
                    "model at import time under `if __name__ == '__main__':`")
            pools = self.pools
            if not pools or any(pool.closed for pool in pools.values()):
                if pools and self.start_error is None and not restart:
                    raise PoolClosedError("the pool was shut down; call TorchPool.start() to start "
                                          "a new one")
                for pool in pools.values():  # the models all start and stop together
                    pool.shutdown(wait=False, drain_timeout=0)
                if not self.config.inline and not (embedded or SERVING) and self._attaches():
                    log.info("torchpool %s: attached mode, pool server socket %s", self.app_name,
                             self.socket_path())
                    pools = self.pools = {name: self._create_pool(name, config, [], attach=True)
                                          for name, config in self.configs.items()}
                else:
                    placements = self._compute_plan()
                    for placement in placements:
                        log.info("torchpool %s: %s", self.app_name, placement.describe())
                    _check_resources(self.config, len(placements))
                    pools = self.pools = {
                        name: self._create_pool(name, config, [p for p in placements if p.model == name])
                        for name, config in self.configs.items()}
                self.start_error = None
        try:
            self._start_pools(pools)
        except WorkerStartupError as exc:
            self.start_error = exc
            raise
        return pools

    def socket_path(self) -> str:
        from .client import socket_path_for

        return socket_path_for(self.config, self.app_name)

    def _attaches(self) -> bool:
        """``TORCHPOOL_MODE``: attach to a pool server (starting one in auto mode under gunicorn)?"""
        mode = self.config.mode
        if mode == "embedded":
            return False
        from . import client, server

        path = self.socket_path()
        if mode == "auto" and self.app_import is None and not server.server_running(path):
            return False  # no server, and not a pre-fork server: embedded
        server.ensure_private_dir(path)
        if self.connection is None or self.connection.path != path:
            self.connection = client.PoolConnection(path, self.config.arena_bytes, self.config.retry_after)
        if mode == "auto" and self.app_import is not None:
            # The gunicorn master owns the server: it outlives any one web worker (max_requests). A
            # server that died is started again by the first web worker that misses it.
            connection = self.connection
            app_import = self.app_import

            last_spawn = [float("-inf")]

            def start_server() -> None:
                # At most one start every TORCHPOOL_RESTART_WINDOW / MAX_RESTARTS seconds from this
                # process: a server that cannot load its model must not be started on every request.
                now = time.monotonic()
                if now - last_spawn[0] < self.config.restart_window / max(self.config.max_restarts, 1):
                    return
                spawner = client.ensure_server(app_import, path, owner_pid=os.getppid())
                if spawner is not None:
                    last_spawn[0] = now
                    connection.spawner = spawner

            connection.on_missing = start_server
            start_server()
        return True

    def _start_pools(self, pools: dict[str, Pool | InlinePool | RemotePool]) -> None:
        """Start every model's pool at once, so that starting takes as long as the slowest model. When
        one fails, the others are stopped and its error is raised, naming the model."""
        if len(pools) == 1:
            next(iter(pools.values())).start()
            return
        results: queue.SimpleQueue[tuple[str, BaseException | None]] = queue.SimpleQueue()

        def start(name: str, pool: Pool | InlinePool | RemotePool) -> None:
            try:
                pool.start()
            except BaseException as exc:  # reported to the starting thread below
                results.put((name, exc))
            else:
                results.put((name, None))

        for name, pool in pools.items():
            threading.Thread(target=start, args=(name, pool), daemon=True,
                             name=f"torchpool[{self.app_name}]-start-{name}").start()
        failed: tuple[str, BaseException] | None = None
        for _ in pools:
            name, exc = results.get()
            if exc is not None and failed is None:
                failed = (name, exc)
                # The other models stop loading at once: their start() returns, or fails, promptly.
                for pool in pools.values():
                    pool.shutdown(wait=False, drain_timeout=0)
        if failed is None:
            return
        for pool in pools.values():
            pool.shutdown(wait=True, drain_timeout=0)
        name, exc = failed
        if not isinstance(exc, WorkerStartupError):
            raise exc
        err = WorkerStartupError(f"model {name!r} did not start: {exc}; the workers of the other models "
                                 "were stopped")
        err.__cause__ = exc.__cause__ if isinstance(exc.__cause__, RemoteTraceback) else exc
        raise err

    def pool_for_call(self, name: str) -> Pool | InlinePool | RemotePool:
        """The started pool of model *name* (a name :meth:`model_name` returned), starting the pools on
        first use."""
        pool = self.pools.get(name)
        if pool is not None and pool.started and not pool.closed:
            return pool
        if self.start_error is not None:
            raise self.start_error  # don't respawn a failing model on every request; start() retries
        if pool is not None and pool.closed:
            raise PoolClosedError("the pool is shut down, or draining before it stops; call "
                                  "TorchPool.start() to start a new one",
                                  retry_after=self.config.retry_after)
        return self.start()[name]

    def start_in_background(self) -> bool:
        """Start pools that are waiting for first use, in a thread (for the readiness probe). Does
        nothing after a shutdown or a failed start, or when a start is already under way."""
        with self.lock:
            if (self.inert or self.pools or self.start_error is not None
                    or self.background_start is not None):
                return False

            def start() -> None:
                try:
                    self.start()
                except TorchPoolError as exc:  # recorded in start_error, reported by /ready
                    log.error("torchpool %s: background start failed: %s", self.app_name, exc)
                finally:
                    self.background_start = None

            self.background_start = threading.Thread(target=start, name=f"torchpool[{self.app_name}]-start",
                                                     daemon=True)
            self.background_start.start()
        return True

    def status(self) -> dict[str, Any]:
        """See :meth:`TorchPool.status`."""
        pools = self.pools
        plan = self.plan
        models = {name: self._model_status(name, pools.get(name), [p for p in plan if p.model == name])
                  for name in self.configs}
        status = dict(next(iter(models.values()))) if len(models) == 1 else _aggregate(models)
        status["inline"] = self.config.inline
        status["models"] = models
        if self.start_error is not None:
            status["error"] = str(self.start_error)
        return status

    def _model_status(self, name: str, pool: Pool | InlinePool | RemotePool | None,
                      plan: list[Placement]) -> dict[str, Any]:
        if pool is None:
            status: dict[str, Any] = {
                "started": False, "closed": False, "queued": 0, "busy_workers": 0, "arena_bytes": 0,
                "counters": {}, "metrics": Metrics(name).snapshot(),
                "workers": [{"worker": p.worker, "pid": None, "state": "not started", "device": p.device,
                             "cores": list(p.cores), "threads": p.threads, "inflight": 0, "calls": 0,
                             "errors": 0, "restarts": 0, "last_exit": None} for p in plan]}
        else:
            status = pool.status()
        for worker in status["workers"]:
            worker["model"] = name
        status["ready"] = bool(status["started"] and not status["closed"] and status["workers"]
                               and all(w["state"] == "ready" for w in status["workers"]))
        status["latency_quantiles"] = status.get("metrics", {}).get("latency_quantiles", {})
        status["plan"] = [{"worker": p.worker, "device": p.device, "cores": list(p.cores),
                           "threads": p.threads, "model": p.model} for p in plan]
        return status

    def shutdown(self, wait: bool = True, drain_timeout: float | None = None) -> None:
        pools = list(self.pools.values())
        # Every model stops taking calls and drains at once; then wait for each to stop.
        for pool in pools:
            pool.shutdown(wait=False, drain_timeout=drain_timeout)
        if wait:
            for pool in pools:
                pool.shutdown(wait=True, drain_timeout=drain_timeout)

    def _after_fork_in_child(self) -> None:
        # The parent's workers, threads and locks are not ours: start afresh on first use.
        self.lock = threading.Lock()
        self.views_idle = threading.Condition(self.lock)
        self.active_views = 0
        self.pools = {}
        self.connection = None
        self.start_error = None
        self.background_start = None


def _aggregate(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The app-wide status of several models: counts added up, workers and plans one after another."""
    parts = list(models.values())
    counters: dict[str, int] = {}
    for part in parts:
        for key, n in part["counters"].items():
            counters[key] = counters.get(key, 0) + n
    metrics = merge([part["metrics"] for part in parts])
    status: dict[str, Any] = {
        "started": all(part["started"] for part in parts),
        "closed": any(part["closed"] for part in parts),
        "queued": sum(part["queued"] for part in parts),
        "busy_workers": sum(part["busy_workers"] for part in parts),
        "arena_bytes": sum(part["arena_bytes"] for part in parts),
    }
    if any("shared_weight_bytes" in part for part in parts):
        status["shared_weight_bytes"] = sum(part.get("shared_weight_bytes", 0) for part in parts)
    status.update({
        "counters": counters,
        "metrics": metrics,
        "workers": [worker for part in parts for worker in part["workers"]],
        "ready": all(part["ready"] for part in parts),
        "latency_quantiles": metrics["latency_quantiles"],
        "plan": [entry for part in parts for entry in part["plan"]],
    })
    return status


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
        configs = PoolConfig.models_from_mapping(app.config)
        inert = _in_spawned_child()
        state = _AppState(self, app, configs, inert)
        state.app_import = _gunicorn_app_import()
        config = state.config
        app.extensions[EXTENSION_KEY] = state
        _register_operations(app, config)
        if inert:
            return
        with _states_lock:
            _states.add(state)
        if config.handle_sigterm:
            _install_sigterm_handler()
        # Inline mode builds the model on first use unless told "eager" (see TORCHPOOL_INLINE).
        _guard_reloader_watcher(app, state)
        if SERVING:
            return  # serve() starts the pool, embedded
        if config.start == "eager" or (config.start == "auto" and not config.inline and not _defer_start()):
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
            return state  # type: ignore[no-any-return]
        with _states_lock:
            mine = [s for s in _states if s.extension is self]
        if len(mine) == 1:
            return mine[0]
        raise RuntimeError("no app context: use 'with app.app_context():' (this TorchPool is "
                           f"registered on {len(mine)} apps)" if mine else
                           "this TorchPool is not registered on any app; call pool.init_app(app)")

    # --- public API -----------------------------------------------------------------------------------

    def start(self, app: Flask | None = None) -> None:
        """Start the workers of every model now (if they are not running) and return once every one has
        loaded its model. Raises :class:`WorkerStartupError` with the worker's traceback when one fails
        (naming the model when there are several; the other models' workers are stopped then)."""
        # Keep start_error: it is what lets _AppState.start() replace a pool whose start failed.
        self._state(app).start(restart=True)

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

    def model(self, name: str | None = None, *, timeout: float | None = None, app: Flask | None = None,
              batch: bool = True) -> ModelProxy:
        """A :class:`ModelProxy` of the model *name* (default: the default model, see :meth:`infer`)
        whose calls have deadline *timeout* (default: the model's ``TORCHPOOL_TIMEOUT``);
        ``batch=False`` keeps its calls out of dynamic batches. An unknown name raises
        :class:`ConfigError`, listing the models."""
        if isinstance(name, (int, float)) and not isinstance(name, bool) and timeout is None:
            name, timeout = None, name  # pool.model(5.0): the timeout, as before names existed
        return ModelProxy(self._state(app), timeout, batch, name)

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``model(*args, **kwargs)`` in a worker of the default model; returns a
        :class:`~concurrent.futures.Future`. ``pool.model("name").submit(...)`` calls another model."""
        return self.model().submit(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``model(*args, **kwargs)`` in a worker of the default model and return its output
        (blocking). ``pool.model("name")(...)`` calls another model."""
        return self.model()(*args, **kwargs)

    @property
    def plan(self) -> list[Placement]:
        """Where each worker of each model runs (model, device, cores, threads); computed without
        starting anything."""
        return self._state().plan

    def status(self, app: Flask | None = None) -> dict[str, Any]:
        """A JSON-ready snapshot, computed without starting anything: ``started``, ``closed``,
        ``ready`` (started and every worker of every model ready), ``inline``, ``queued`` (calls waiting
        for a worker), ``busy_workers``, ``arena_bytes``, ``counters``, ``workers`` (per worker: model,
        pid, state, device, cores, threads, inflight, calls, errors, restarts, last exit), ``metrics``
        (the call metrics, histograms included), ``latency_quantiles`` and ``plan``, all of them for
        every model together; ``models``: the same keys for each model, by name; ``error`` after a
        failed start. This is what ``<TORCHPOOL_HEALTH_URL>/status`` answers."""
        return self._state(app).status()

    def serve(self, app: Flask | None = None, *, socket_path: str | None = None,
              owner_pid: int | None = None, lock_fd: int | None = None,
              ready_fd: int | None = None) -> None:
        """Run this app's pool as a pool server (what ``flask torchpool serve`` does): start the workers
        here, embedded, and serve web processes that attach (``TORCHPOOL_MODE = "attach"`` or
        ``"auto"``) on the Unix socket *socket_path* (default ``TORCHPOOL_SOCKET``). Blocks until
        SIGTERM or SIGINT (call it from the main thread) or until process *owner_pid* exits, then
        drains (``TORCHPOOL_DRAIN_TIMEOUT``) and stops. Raises :class:`TorchPoolError` when another
        server already holds the socket, :class:`WorkerStartupError` when the model fails to load."""
        from . import server

        state = self._state(app)
        path = os.path.abspath(socket_path) if socket_path else state.socket_path()
        if lock_fd is None:
            lock_fd = server.take_lock(path)
        if any(not isinstance(p, (Pool, InlinePool)) for p in state.pools.values()):
            state.shutdown(wait=True, drain_timeout=0)  # attached at load (TORCHPOOL_START="eager")
            state.pools = {}
        try:
            pools = state.start(restart=True, embedded=True)
        except BaseException:
            os.close(lock_fd)
            raise
        pool_server = server.PoolServer(pools, path, default_model=state.default_model, lock_fd=lock_fd,
                                        drain_timeout=state.config.drain_timeout)
        server.serve_forever(pool_server, owner_pid, ready_fd)

    def prometheus_collector(self, app: Flask | None = None) -> Any:
        """A ``prometheus_client`` collector of this app's pool metrics, read at scrape time, to mount
        in an existing registry: ``prometheus_client.REGISTRY.register(pool.prometheus_collector())``.
        Needs ``pip install flask_torchpool[metrics]``; see the metrics docs for every metric."""
        from .prometheus import TorchPoolCollector

        return TorchPoolCollector(self._state(app))

    @overload
    def infer(self, view: F) -> F: ...

    @overload
    def infer(self, view: str | None = None, /, *, model: str | None = None, timeout: float | None = None,
              batch: bool = True) -> Callable[[F], F]: ...

    def infer(self, view: F | str | None = None, *, model: str | None = None, timeout: float | None = None,
              batch: bool = True) -> Any:
        """Decorate a view so that it receives a :class:`ModelProxy` as its first argument.

        Use as ``@pool.infer``, ``@pool.infer("name")`` or ``@pool.infer(model="name", timeout=2.0,
        batch=False)``. Without a name the view calls the default model: the one named ``"default"``
        (:data:`TORCHPOOL_MODEL`), or the only model of :data:`TORCHPOOL_MODELS`. An unknown name raises
        :class:`ConfigError` here when the app's configuration is known (the pool was registered on an
        app), else at the view's first call. URL variables follow the proxy; ``batch=False`` keeps the
        view's calls out of dynamic batches. Pool errors raised in the view become JSON answers (see
        the errors docs); override them with ``app.errorhandler``.
        """
        if isinstance(view, str):
            if model is not None and model != view:
                raise TypeError(f"infer() got two model names, {view!r} and model={model!r}")
            view, model = None, view
        if view is None:
            return functools.partial(self.infer, model=model, timeout=timeout, batch=batch)
        if not callable(view):
            raise TypeError(f"@pool.infer takes a view function or a model's name, not {view!r}")
        self._check_model_name(model)
        if inspect.iscoroutinefunction(view):
            @functools.wraps(view)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                state = self._state()
                proxy = ModelProxy(state, timeout, batch, model)
                with _ActiveView(state):
                    return await view(proxy, *args, **kwargs)

            _hide_first_parameter(async_wrapper, view)
            return async_wrapper

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            state = self._state()
            proxy = ModelProxy(state, timeout, batch, model)
            with _ActiveView(state):
                return view(proxy, *args, **kwargs)

        _hide_first_parameter(wrapper, view)
        return wrapper

    def _check_model_name(self, name: str | None) -> None:
        """At decoration: raise :class:`ConfigError` if no app this pool is registered on (or the
        current app) has the model *name*. Says nothing when no app is registered yet."""
        current = current_app.extensions.get(EXTENSION_KEY) if has_app_context() else None
        if isinstance(current, _AppState) and current.extension is self:
            states = [current]
        else:
            with _states_lock:
                states = [s for s in _states if s.extension is self]
        errors = []
        for state in states:
            try:
                state.model_name(name)
                return
            except ConfigError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


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


def _register_operations(app: Flask, config: PoolConfig) -> None:
    """The ``flask torchpool`` commands and, with ``TORCHPOOL_HEALTH_URL``, the health blueprint."""
    from . import cli, health

    app.cli.add_command(cli.torchpool)
    if config.health_url is not None:
        app.register_blueprint(health.blueprint, url_prefix=config.health_url)


def _guard_reloader_watcher(app: Flask, state: _AppState) -> None:
    """``app.run(debug=True)`` in a script: the process that ran ``TorchPool(app)`` becomes the Werkzeug
    reloader's watcher, which never serves; its child (``WERKZEUG_RUN_MAIN=true``) does. Nothing says so
    before ``app.run``, so ``app.run`` stops this process's pool when it is about to become a watcher,
    leaving one pool, in the serving child."""
    run = app.run

    @functools.wraps(run)
    def run_guarded(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", args[2] if len(args) > 2 else None)
        debug = app.debug if debug is None else bool(debug)
        reloads = kwargs.get("use_reloader", debug)
        if reloads and os.environ.get("WERKZEUG_RUN_MAIN") != "true" and state.pools:
            log.info("torchpool %s: this process becomes the reloader's watcher; its pool stops and "
                     "the serving child starts its own", state.app_name)
            state.shutdown(wait=True, drain_timeout=0)
            state.pools = {}  # a later start (in this process) starts afresh
        return run(*args, **kwargs)

    app.run = run_guarded  # type: ignore[method-assign]


def _defer_start() -> bool:
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
    if "gunicorn" in sys.modules and _gunicorn_loader() == "master":
        return True
    return False


def _loaded_by_flask_command() -> bool:
    """True while the ``flask`` command line loads the app for a command other than ``flask run``."""
    import click
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


def _gunicorn_loader() -> str | None:
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


def _gunicorn_app_import() -> str | None:
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


def extension_of(app: Flask) -> TorchPool:
    """The :class:`TorchPool` registered on *app*."""
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise RuntimeError(f"app {app.import_name!r} has no TorchPool: create it with TorchPool(app) or "
                           "pool.init_app(app) in the app's module or factory")
    extension: TorchPool = state.extension
    return extension


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
        state.shutdown(wait=False)
    for state in states:
        state.shutdown(wait=True)
        with state.lock:
            state.views_idle.wait_for(functools.partial(_views_done, state), state.config.drain_timeout)
    # Die of SIGTERM, as a process manager expects, now that the pools are stopped.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _views_done(state: _AppState) -> bool:
    return state.active_views == 0


def _shutdown_all_at_exit() -> None:
    # Every running pool, including those whose app was garbage-collected (an app factory's app):
    # this runs before multiprocessing's own exit hook, which would SIGTERM the workers under them.
    for pool in list(_running_pools):
        try:
            pool.shutdown(wait=True)
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
