"""The Flask extension: ``TorchPool(app)``, ``init_app``, ``@pool.infer``, ``submit``, ``shutdown``.

Flask glue only. Configuration is read once in :meth:`TorchPool.init_app`; the models of an app live in
``app.extensions["torchpool"]`` (a :class:`~flask_torchpool.group.ModelGroup`), never on the extension
object, so one ``TorchPool`` can serve several apps in an app factory. When the workers start
(``TORCHPOOL_START``) is decided by :mod:`flask_torchpool.startup`; which backend runs each model by the
group.

How a call travels::

    view --> ModelProxy --> group.pool_for_call(model) --> Backend.submit --> Future --> view
                                                           (pool.py: workers of this process,
                                                            inline.py: this thread,
                                                            attach/remote.py: the host's pool server)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Callable, TypeVar, overload

from flask import Flask, current_app, has_app_context

from . import startup
from .config import DEFAULTS, load
from .deadlines import MAX_TIMEOUT, seconds_ok
from .errors import ConfigError, InferenceTimeoutError
from .group import ModelGroup, drain_all, reload_all
from .placement import Placement
from .status import AppStatus, ModelVersion
from .streaming import Stream, check_method

if TYPE_CHECKING:
    import numpy
    import torch
    from typing_extensions import Concatenate, ParamSpec

    P = ParamSpec("P")

log = logging.getLogger(__name__)

R = TypeVar("R")

EXTENSION_KEY = "torchpool"
# Extra seconds a caller waits beyond its deadline for the manager to report the timeout itself.
_DEADLINE_GRACE = 5.0


class ModelProxy:
    """What a ``@pool.infer`` view receives: calling it runs the model in a worker process.

    ``proxy(*args, **kwargs)`` blocks the calling thread (without holding the GIL) until the worker
    answers; :meth:`submit` returns a :class:`concurrent.futures.Future`; :meth:`acall` is awaitable;
    :meth:`stream` iterates what a model that yields produces. Arguments and results may be tensors,
    ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes`` and tuples, lists and dicts of
    them. ``proxy.method("generate")`` is the same proxy for another method of the model.
    """

    __slots__ = ("_state", "timeout", "batch", "name", "_method")

    def __init__(self, state: ModelGroup, timeout: float | None = None, batch: bool = True,
                 name: str | None = None, method: str | None = None) -> None:
        self._state = state
        #: Deadline of each call in seconds (queueing plus execution); None means the model's
        #: ``TORCHPOOL_TIMEOUT``.
        self.timeout = timeout
        #: Whether calls may be batched with other callers' (``TORCHPOOL_MAX_BATCH_SIZE``).
        self.batch = batch
        #: The name of the model its calls go to (``"default"`` for ``TORCHPOOL_MODEL``).
        self.name = state.model_name(name)
        check_method(method)
        self._method = method

    def method(self, name: str) -> ModelProxy:
        """This proxy for the model's method *name* instead of the model itself (``forward``):
        ``model.method("generate").stream(prompt)``. A name that is not a public method of the model
        fails the call with :class:`InferenceError`."""
        return ModelProxy(self._state, self.timeout, self.batch, self.name, name)

    def submit(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """Start a call and return its future. Invalid input raises here, in the calling thread.
        Cancelling the future drops the call if it has not started yet (a started one runs to its end and
        its result is discarded)."""
        return self._start(args, kwargs)

    def _start(self, args: tuple[Any, ...], kwargs: dict[str, Any], waiter: bool = False) -> Future[Any]:
        return self._state.pool_for_call(self.name).submit(args, kwargs, self.timeout, self.batch,
                                                            method=self._method, waiter=waiter)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        timeout = self.timeout if self.timeout is not None else self._state.configs[self.name].timeout
        # waiter: this thread calls result() next, with nothing in between (Note [Claimed lanes])
        future = self._start(args, kwargs, waiter=True)
        try:
            return future.result(None if timeout is None else timeout + _DEADLINE_GRACE)
        except FutureTimeout:
            # The manager fails calls at their deadline; reaching this means it could not.
            future.cancel()
            log.error("torchpool: a call outlived its deadline by %ss without an answer", _DEADLINE_GRACE)
            raise InferenceTimeoutError(f"the call did not finish within {timeout:g}s") from None
        except BaseException:
            future.cancel()  # interrupted while waiting: nobody wants the result any more
            raise

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run the model's method *method* (e.g. ``"generate"``) in a worker and return its output."""
        return self.method(method)(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Stream:
        """Run the model (or the method of :meth:`method`), which must yield its outputs (return a
        generator or an iterator), and iterate them as they come: ``for chunk in model.stream(x)``, or
        ``async for``. Closing the iterator (or dropping it) stops the model's generator in its worker;
        see the Streaming docs for backpressure, deadlines and errors. Streams are not batched."""
        stream = self._state.pool_for_call(self.name).stream(args, kwargs, self.timeout, self._method)
        # A view in progress until its reader is done (the response is written after the view returned):
        # a SIGTERM drain waits for it (group.wait_views_idle).
        reading = contextlib.ExitStack()
        reading.enter_context(self._state.view())
        stream.on_end(reading.close)
        return stream

    @overload
    def tensor_from_stream(self, stream: Any, dtype: torch.dtype, shape: Sequence[int], *,
                           length: int | None = None) -> torch.Tensor: ...

    @overload
    def tensor_from_stream(self, stream: Any, dtype: numpy.dtype[Any] | type[numpy.generic],
                           shape: Sequence[int], *, length: int | None = None) -> numpy.ndarray: ...

    def tensor_from_stream(self, stream: Any, dtype: Any, shape: Sequence[int], *,
                           length: int | None = None) -> Any:
        """The raw bytes of *stream* (``request.stream``) as a tensor of *dtype* and *shape*, read in
        bounded chunks straight into the tensor, for a call to this model: the fast way to take a big
        body (see :func:`flask_torchpool.bodies.tensor_from_stream`, which this calls with the model's
        ``TORCHPOOL_MAX_INPUT_BYTES``). One dimension may be ``-1``. With a numpy dtype
        (``numpy.float32``) it is a numpy array, and torch is not loaded. A body of the wrong size raises
        :class:`InvalidInputError` (400), one over the limit :class:`PayloadTooLargeError` (413)."""
        from . import bodies

        return bodies.tensor_from_stream(stream, dtype, shape, length=length,
                                         max_bytes=self._state.configs[self.name].max_input_bytes)

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """Awaitable form of a call, for ``async def`` views."""
        import asyncio  # here: a web process without async views never loads it (2 MiB of its memory)

        return await asyncio.wrap_future(self.submit(*args, **kwargs))

    def __repr__(self) -> str:
        method = f".{self._method}" if self._method else ""
        return (f"<ModelProxy {self.name!r}: {self._state.configs[self.name].model!r}{method} "
                f"timeout={self.timeout}>")


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
        app_config, configs = load(app.config)
        inert = startup.in_spawned_child()
        group = ModelGroup(self, app.import_name, app.name, app_config, configs, inert)
        group.app_import = startup.gunicorn_app_import()
        group.sync_web_worker = startup.gunicorn_sync_worker()
        app.extensions[EXTENSION_KEY] = group
        _register_operations(app, app_config.health_url)
        if inert:
            return
        group.register()
        if app_config.handle_sigterm:
            _install_sigterm_drain()
        if app_config.handle_sighup and not _sighup:
            _sighup.append(startup.SighupReload.install(reload_all))
        startup.guard_reloader_watcher(app, group.stop_for_watcher)
        if startup.loading_to_serve():
            return  # the pool server's command starts the workers itself, embedded
        # Inline mode builds the model on first use unless told "eager" (see TORCHPOOL_INLINE).
        if app_config.start == "eager" or (app_config.start == "auto" and not app_config.inline
                                           and not startup.defer_start()):
            group.start()

    # --- state lookup ---------------------------------------------------------------------------------

    def _state(self, app: Flask | None = None) -> ModelGroup:
        if app is None and has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        if app is not None:
            state = app.extensions.get(EXTENSION_KEY)
            if state is None or state.extension is not self:
                raise RuntimeError(f"this TorchPool is not registered on app {app.import_name!r}; "
                                   "call pool.init_app(app) first")
            return state  # type: ignore[no-any-return]
        mine = ModelGroup.of(self)
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
        # Keep start_error: it is what lets ModelGroup.start() replace a pool whose start failed.
        self._state(app).start(restart=True)

    def shutdown(self, wait: bool = True, app: Flask | None = None,
                 drain_timeout: float | None = None) -> None:
        """Stop taking calls, let calls in flight finish (``TORCHPOOL_DRAIN_TIMEOUT``), stop the workers.
        Idempotent. Without *app* and outside an app context, shuts down the pools of every app.
        *drain_timeout*: None or a number of seconds >= 0 and at most 1,000,000 (else ValueError)."""
        if drain_timeout is not None and not seconds_ok(drain_timeout, zero=True):
            raise ValueError(f"drain_timeout must be None or a number of seconds >= 0 and at most "
                             f"{MAX_TIMEOUT:.0f}, not {drain_timeout!r}")
        if app is None and not has_app_context():
            states = ModelGroup.of(self)
        else:
            states = [self._state(app)]
        for state in states:
            state.shutdown(wait=wait, drain_timeout=drain_timeout)

    def reload(self, name: str | None = None, *, model: Any = None, version: str | None = None,
               app: Flask | None = None) -> dict[str, ModelVersion]:
        """Put a new version of model *name* in service, worker by worker, without failing a call
        (docs/operating.rst, "Reloading a model"): its recipe again (the factory's module imported
        afresh, the file read again), or *model* instead (validated like ``TORCHPOOL_MODEL``); *version*
        labels it. Without *name* and *model*: every model, one after the other. Returns each reloaded
        model's :class:`~flask_torchpool.status.ModelVersion` once it serves every new call. Raises
        :class:`ReloadError` when the new version fails to load or to warm up (the old one keeps
        serving), when another reload of the model runs, or when the model is not serving."""
        return self._state(app).reload(name, model, version)

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

    def stream(self, *args: Any, **kwargs: Any) -> Stream:
        """Iterate what the default model yields for ``(*args, **kwargs)`` (see
        :meth:`ModelProxy.stream`); ``pool.model("name").stream(...)`` streams another model."""
        return self.model().stream(*args, **kwargs)

    @overload
    def tensor_from_stream(self, stream: Any, dtype: torch.dtype, shape: Sequence[int], *,
                           length: int | None = None, model: str | None = None) -> torch.Tensor: ...

    @overload
    def tensor_from_stream(self, stream: Any, dtype: numpy.dtype[Any] | type[numpy.generic],
                           shape: Sequence[int], *, length: int | None = None,
                           model: str | None = None) -> numpy.ndarray: ...

    def tensor_from_stream(self, stream: Any, dtype: Any, shape: Sequence[int], *,
                           length: int | None = None, model: str | None = None) -> Any:
        """The raw bytes of *stream* (``request.stream``) as a tensor for a call to *model* (default: the
        default model): ``x = pool.tensor_from_stream(request.stream, torch.float32, (1, -1))``, or a
        numpy array with a numpy dtype (``numpy.float32``). See :meth:`ModelProxy.tensor_from_stream`."""
        return self.model(model).tensor_from_stream(stream, dtype, shape, length=length)

    @property
    def plan(self) -> list[Placement]:
        """Where each worker of each model runs (model, device, cores, threads); computed without
        starting anything."""
        return self._state().plan

    def status(self, app: Flask | None = None) -> AppStatus:
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
        from .attach import rendezvous, server

        group = self._state(app)
        path = os.path.abspath(socket_path) if socket_path else group.socket_path()
        if lock_fd is None:
            lock_fd = rendezvous.take_lock(path)
        if group.connection is not None:
            group.shutdown(wait=True, drain_timeout=0)  # attached at load (TORCHPOOL_START="eager")
            group.pools = {}
        try:
            pools = group.start(restart=True, embedded=True)
        except BaseException:
            os.close(lock_fd)
            raise
        drain = max(config.drain_timeout for config in group.configs.values())
        pool_server = server.PoolServer(pools, path, default_model=group.default_model, lock_fd=lock_fd,
                                        drain_timeout=drain)
        server.serve_forever(pool_server, owner_pid, ready_fd)

    def prometheus_collector(self, app: Flask | None = None) -> Any:
        """A ``prometheus_client`` collector of this app's pool metrics, read at scrape time, to mount
        in an existing registry: ``prometheus_client.REGISTRY.register(pool.prometheus_collector())``.
        Needs ``pip install flask_torchpool[metrics]``; see the metrics docs for every metric."""
        from .prometheus import TorchPoolCollector

        return TorchPoolCollector(self._state(app))

    @overload
    def infer(self, view: Callable[Concatenate[ModelProxy, P], R], /) -> Callable[P, R]: ...

    @overload
    def infer(self, view: str | None = None, /, *, model: str | None = None, timeout: float | None = None,
              batch: bool = True
              ) -> Callable[[Callable[Concatenate[ModelProxy, P], R]], Callable[P, R]]: ...

    def infer(self, view: Callable[..., Any] | str | None = None, /, *, model: str | None = None,
              timeout: float | None = None, batch: bool = True) -> Any:
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
                group = self._state()
                with group.view():
                    return await view(ModelProxy(group, timeout, batch, model), *args, **kwargs)

            _hide_first_parameter(async_wrapper, view)
            return async_wrapper

        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            group = self._state()
            with group.view():
                return view(ModelProxy(group, timeout, batch, model), *args, **kwargs)

        _hide_first_parameter(wrapper, view)
        return wrapper

    def _check_model_name(self, name: str | None) -> None:
        """At decoration: raise :class:`ConfigError` if no app this pool is registered on (or the
        current app) has the model *name*. Says nothing when no app is registered yet."""
        current = current_app.extensions.get(EXTENSION_KEY) if has_app_context() else None
        if isinstance(current, ModelGroup) and current.extension is self:
            states = [current]
        else:
            states = ModelGroup.of(self)
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


def _register_operations(app: Flask, health_url: str | None) -> None:
    """The ``flask torchpool`` commands and, with ``TORCHPOOL_HEALTH_URL``, the health blueprint."""
    from . import cli, health

    app.cli.add_command(cli.torchpool)
    if health_url is not None:
        app.register_blueprint(health.blueprint, url_prefix=health_url)


def extension_of(app: Flask) -> TorchPool:
    """The :class:`TorchPool` registered on *app*."""
    group = app.extensions.get(EXTENSION_KEY)
    if group is None:
        raise RuntimeError(f"app {app.import_name!r} has no TorchPool: create it with TorchPool(app) or "
                           "pool.init_app(app) in the app's module or factory")
    extension: TorchPool = group.extension
    return extension


_sigterm: list[startup.SigtermDrain] = []
_sighup: list[startup.SighupReload | None] = []   # installed (or not) once per process


def _install_sigterm_drain() -> None:
    """One SIGTERM drain per process, for every app's models (see :class:`startup.SigtermDrain`)."""
    if not _sigterm:
        hook = startup.SigtermDrain.install(drain_all)
        if hook is not None:
            _sigterm.append(hook)
