"""The models of one app: one backend per model, started and stopped together, one status for all.

A :class:`ModelGroup` lives in ``app.extensions["torchpool"]`` (never on the extension object, so one
``TorchPool`` can serve several apps in an app factory). It decides which backend runs each model:

* ``TORCHPOOL_INLINE``: :class:`~flask_torchpool.inline.InlinePool`, the model in the calling thread;
* ``TORCHPOOL_MODE = "attach"`` (or ``"auto"`` with a server running, or under gunicorn): one
  :class:`~flask_torchpool.attach.remote.RemotePool` per model over this process's one connection to the
  host's pool server, which auto mode starts when it finds none;
* otherwise :class:`~flask_torchpool.pool.Pool`: workers spawned by this process (embedded).

Several models (``TORCHPOOL_MODELS``) get one backend each, with its own workers, queue, batching and
restart budget; they start and stop together, and a call goes to the backend of the model it names, or
to the default model's. Everything else speaks to the backends through
:class:`~flask_torchpool.backend.Backend` only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from .attach import rendezvous
from .backend import Backend
from .config import DEFAULT_MODEL, AppConfig, ModelConfig
from .errors import (
    ConfigError,
    PoolClosedError,
    PoolUnavailableError,
    RemoteTraceback,
    TorchPoolError,
    WorkerStartupError,
)
from .metrics import Metrics
from .placement import Placement, plan_models, worker_nice
from .startup import check_resources
from .status import AppStatus, ModelStatus, ModelVersion, app_status, not_started

if TYPE_CHECKING:
    from .attach.client import PoolConnection
    from .extension import TorchPool

log = logging.getLogger(__name__)

#: Every group of this process (for an extension without an app context, SIGTERM and forks).
_groups: weakref.WeakSet[ModelGroup] = weakref.WeakSet()
_groups_lock = threading.Lock()


class ModelGroup:
    """Everything one app's models need (one backend per model); ``app.extensions["torchpool"]``."""

    def __init__(self, extension: TorchPool, app_name: str, logger_name: str, app_config: AppConfig,
                 configs: dict[str, ModelConfig], inert: bool) -> None:
        self.extension = extension
        self.app_name = app_name
        #: The app's own configuration (start, mode, socket, health URL, inline).
        self.app_config = app_config
        #: Every model's configuration, by name, in order (``"default"`` first when it is configured).
        self.configs = configs
        #: The model of calls that name none: ``"default"``, or the only model; None when there are
        #: several and none is named ``"default"``.
        self.default_model = (DEFAULT_MODEL if DEFAULT_MODEL in configs
                              else next(iter(configs)) if len(configs) == 1 else None)
        self.logger_name = logger_name  # app.logger's name: the workers' logs go there
        self.inert = inert
        #: The backend of every model, once started (closed ones stay until the next start).
        self.pools: dict[str, Backend] = {}
        #: How to import the app again, when gunicorn loaded it ("module:app"): auto mode starts a pool
        #: server with it.
        self.app_import: str | None = None
        #: The web tier is gunicorn sync workers: this process is one (TORCHPOOL_WEB_AFFINITY "auto" pins
        #: it: Note [Web affinity]), or, in a pool server, one started the server (``serve --sync-web``).
        #: TORCHPOOL_WORKER_NICE "auto" then keeps the workers at the web processes' priority.
        self.sync_web_worker = False
        self.connection: PoolConnection | None = None
        self.background_start: threading.Thread | None = None
        self.lock = threading.Lock()
        self.start_error: WorkerStartupError | None = None
        self.active_views = 0
        self.views_idle = threading.Condition(self.lock)

    # --- the registry ------------------------------------------------------------------------------------

    def register(self) -> None:
        with _groups_lock:
            _groups.add(self)

    @staticmethod
    def of(extension: TorchPool | None = None) -> list[ModelGroup]:
        """The registered groups of *extension* (every group with None)."""
        with _groups_lock:
            return [g for g in _groups if extension is None or g.extension is extension]

    # --- models --------------------------------------------------------------------------------------

    @property
    def pool(self) -> Backend | None:
        """The default model's backend (or the first model's); None before the first start."""
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
            return [p for pool in self.pools.values() for p in pool.placements]
        return self._compute_plan()

    def _compute_plan(self) -> list[Placement]:
        # The inline and Ray modules load torch: imported only when in use, so that neither an attached
        # web process nor the pool server loads it (Note [Arrays without torch] in codec.py).
        if self.app_config.inline:
            from .inline import plan as inline_plan

            return [p for config in self.configs.values() for p in inline_plan(config)]
        process = {n: c for n, c in self.configs.items() if c.backend == "process"}
        local = plan_models(process) if process else []
        if len(process) == len(self.configs):
            return local
        from .ray_backend import plan as ray_plan

        return [p for name, config in self.configs.items()
                for p in (ray_plan(config) if config.backend == "ray" else
                          [q for q in local if q.model == name])]

    def _create_backend(self, name: str, config: ModelConfig, placements: list[Placement],
                        attach: bool = False) -> Backend:
        """Make (not start) the backend of model *name*: the one place where backends are made."""
        label = f"torchpool[{self.app_name if name == DEFAULT_MODEL else f'{self.app_name}:{name}'}]"
        if attach:
            from .attach.remote import RemotePool

            assert self.connection is not None
            return RemotePool(config, self.connection, name, name=label)
        if self.app_config.inline:
            from .inline import InlinePool

            return InlinePool(config, placements, name=label)
        if config.backend == "ray":
            from .ray_backend import RayPool

            return RayPool(config, placements, name=label, address=self.app_config.ray_address)
        from .pool import Pool

        if config.worker_nice == "auto":  # "auto" needs to know the web tier: this object does
            config = dataclasses.replace(config, worker_nice=worker_nice(config, self.sync_web_worker))
        return Pool(config, placements, name=label, logger_name=self.logger_name)

    # --- starting ------------------------------------------------------------------------------------

    def start(self, restart: bool = False, embedded: bool = False) -> dict[str, Backend]:
        """Start this app's backends; with *restart* (``TorchPool.start()``), backends that were shut down
        are replaced by new ones. Calls never restart a backend that was shut down. With *embedded* (the
        pool server), the workers start here whatever ``TORCHPOOL_MODE`` says."""
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
                if not self.app_config.inline and not embedded and self._attaches():
                    log.info("torchpool %s: attached mode, pool server socket %s", self.app_name,
                             self.socket_path())
                    pools = self.pools = {name: self._create_backend(name, config, [], attach=True)
                                          for name, config in self.configs.items()}
                else:
                    placements = self._compute_plan()
                    for placement in placements:
                        log.info("torchpool %s: %s", self.app_name, placement.describe())
                    check_resources(len(placements))
                    pools = self.pools = {
                        name: self._create_backend(name, config, [p for p in placements if p.model == name])
                        for name, config in self.configs.items()}
                self.start_error = None
        try:
            self._start_all(pools)
        except WorkerStartupError as exc:
            self.start_error = exc
            raise
        return pools

    def socket_path(self) -> str:
        return rendezvous.socket_path_for(self.app_config.socket, self.app_name)

    def _attaches(self) -> bool:
        """``TORCHPOOL_MODE``: attach to a pool server (starting one in auto mode under gunicorn)?"""
        mode = self.app_config.mode
        if mode == "embedded":
            return False
        from .attach import client

        path = self.socket_path()
        if mode == "auto" and self.app_import is None and not rendezvous.server_running(path):
            return False  # no server, and not a pre-fork server: embedded
        rendezvous.ensure_private_dir(path)
        first = next(iter(self.configs.values()))
        if self.connection is None or self.connection.path != path or self.connection.closed:
            pin = self.app_config.web_affinity
            if pin == "auto":
                pin = "worker" if self.sync_web_worker else "off"
            self.connection = client.PoolConnection(path, first.arena_bytes, first.retry_after, pin)
        if mode == "auto" and self.app_import is not None:
            # The gunicorn master owns the server: it outlives any one web worker (max_requests). A
            # server that died is started again by the first web worker that misses it.
            connection = self.connection
            app_import = self.app_import
            min_interval = first.restart_window / max(first.max_restarts, 1)
            last_spawn = [float("-inf")]
            master = os.getppid()   # this web worker's gunicorn master, while it lives

            def start_server() -> None:
                # At most one start every TORCHPOOL_RESTART_WINDOW / MAX_RESTARTS seconds from this
                # process: a server that cannot load its model must not be started on every request.
                now = time.monotonic()
                if now - last_spawn[0] < min_interval:
                    return
                if os.getppid() != master:
                    # The master died (kill -9): its server stops, and one started now would be owned by
                    # init (or a subreaper) and never stop, serving this deployment's models to the next.
                    raise PoolUnavailableError(
                        f"the gunicorn master (pid {master}) that owned the pool server is gone; this web "
                        "worker starts no server without it", retry_after=first.retry_after)
                spawner = rendezvous.ensure_server(app_import, path, owner_pid=master,
                                                   sync_web=self.sync_web_worker)
                if spawner is not None:
                    last_spawn[0] = now
                    connection.spawner = spawner

            connection.on_missing = start_server
            start_server()
        return True

    def _start_all(self, pools: dict[str, Backend]) -> None:
        """Start every model's backend at once, so that starting takes as long as the slowest model. When
        one fails, the others are stopped and its error is raised, naming the model."""
        if len(pools) == 1:
            next(iter(pools.values())).start()
            return
        results: queue.SimpleQueue[tuple[str, BaseException | None]] = queue.SimpleQueue()

        def start(name: str, pool: Backend) -> None:
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

    def pool_for_call(self, name: str) -> Backend:
        """The started backend of model *name* (a name :meth:`model_name` returned), starting the
        backends on first use."""
        pool = self.pools.get(name)
        if pool is not None and pool.started and not pool.closed:
            return pool
        if self.start_error is not None:
            self._count_refusal(name)
            raise self.start_error  # don't respawn a failing model on every request; start() retries
        if pool is not None and pool.closed:
            raise PoolClosedError("the pool is shut down, or draining before it stops; call "
                                  "TorchPool.start() to start a new one",
                                  retry_after=self.configs[name].retry_after)
        try:
            return self.start()[name]
        except WorkerStartupError:
            self._count_refusal(name)
            raise

    def _count_refusal(self, name: str) -> None:
        """Count a call refused because the models failed to start, as ``startup_failed``."""
        metrics = getattr(self.pools.get(name), "metrics", None)  # the backends that count calls here
        if isinstance(metrics, Metrics):
            metrics.record_call("startup_failed")

    def reload(self, name: str | None = None, model: Any = None,
               version: str | None = None) -> dict[str, ModelVersion]:
        """See :meth:`TorchPool.reload`."""
        names = list(self.configs) if name is None and model is None else [self.model_name(name)]
        from .versions import reload_models

        return reload_models(self.pools, names, model, version)

    def start_in_background(self) -> bool:
        """Start backends that are waiting for first use, in a thread (for the readiness probe). Does
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

    # --- state ---------------------------------------------------------------------------------------

    def status(self) -> AppStatus:
        """See :meth:`TorchPool.status`."""
        pools = self.pools
        plan = self.plan
        # Before the start, "auto" may yet attach or embed: it reads as embedded until it has decided.
        mode = ("inline" if self.app_config.inline else
                "attach" if self.app_config.mode == "attach" else "embedded")
        models: dict[str, ModelStatus] = {}
        for name in self.configs:
            pool = pools.get(name)
            models[name] = pool.status() if pool is not None else not_started(
                mode, Metrics(name).snapshot(), [p for p in plan if p.model == name])
        return app_status(models, inline=self.app_config.inline,
                          error=None if self.start_error is None else str(self.start_error))

    # --- stopping ------------------------------------------------------------------------------------

    def shutdown(self, wait: bool = True, drain_timeout: float | None = None) -> None:
        pools = list(self.pools.values())
        # Every model stops taking calls and drains at once; then wait for each to stop.
        for pool in pools:
            pool.shutdown(wait=False, drain_timeout=drain_timeout)
        if wait:
            for pool in pools:
                pool.shutdown(wait=True, drain_timeout=drain_timeout)

    def stop_for_watcher(self) -> bool:
        """Stop this process's backends before it becomes the reloader's watcher; True if it had any."""
        if not self.pools:
            return False
        self.shutdown(wait=True, drain_timeout=0)
        self.pools = {}  # a later start (in this process) starts afresh
        return True

    @contextmanager
    def view(self) -> Iterator[None]:
        """Counts a view in progress, so that a SIGTERM drain can wait for its answer."""
        with self.lock:
            self.active_views += 1
        try:
            yield
        finally:
            with self.lock:
                self.active_views -= 1
                if self.active_views == 0:
                    self.views_idle.notify_all()

    def wait_views_idle(self, timeout: float) -> bool:
        with self.lock:
            return self.views_idle.wait_for(lambda: self.active_views == 0, timeout)

    def _after_fork_in_child(self) -> None:
        # The parent's workers, threads and locks are not ours: start afresh on first use.
        self.lock = threading.Lock()
        self.views_idle = threading.Condition(self.lock)
        self.active_views = 0
        self.pools = {}
        self.connection = None
        self.start_error = None
        self.background_start = None


def drain_all() -> None:
    """SIGTERM: every group stops taking calls, then each waits for its calls and the views that made
    them (``TORCHPOOL_DRAIN_TIMEOUT``)."""
    groups = ModelGroup.of()
    for group in groups:
        group.shutdown(wait=False)
    for group in groups:
        group.shutdown(wait=True)
        drain = max(config.drain_timeout for config in group.configs.values())
        group.wait_views_idle(drain)


def reload_all() -> None:
    """SIGHUP: reload every model whose workers this process owns (embedded; the pool server's in attach
    mode), one after the other; a failure is logged (the old version serves on) and the others go on."""
    pools = sys.modules.get("flask_torchpool.pool")  # not loaded: no embedded pool in this process
    for group in ModelGroup.of():
        for name, pool in list(group.pools.items()):
            if pools is None or not isinstance(pool, pools.Pool) or not pool.started or pool.closed:
                continue
            try:
                version = pool.reload()
            except TorchPoolError as exc:
                log.error("torchpool %s: SIGHUP: %s", group.app_name, exc)
            else:
                log.warning("torchpool %s: SIGHUP: model %r now serves version %d", group.app_name, name,
                            version["generation"])


def _after_fork_in_child() -> None:
    global _groups_lock
    _groups_lock = threading.Lock()
    for group in list(_groups):
        group._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
