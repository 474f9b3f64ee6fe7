"""Configuration: the ``TORCHPOOL_*`` keys, their defaults, one frozen :class:`AppConfig` for the app and
one frozen :class:`ModelConfig` per model.

``init_app`` reads the keys once, with :func:`load`, and validates them here; a bad value raises
:class:`ConfigError` naming the key and what is allowed. Nothing is imported or started while validating: a
model import path is only checked for its form (the worker imports it, and reports a failure as
``WorkerStartupError``).

The app's own keys (how and when it starts, its mode, socket and health URL) are in :class:`AppConfig`.
An app serves one model (``TORCHPOOL_MODEL``, named ``"default"``) or several (``TORCHPOOL_MODELS``, a
dict of names to models); every model gets its own complete :class:`ModelConfig`: the top-level keys,
with the per-model overrides of its ``TORCHPOOL_MODELS`` entry. Every default is written once, in
:data:`DEFAULTS`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from . import checks
from .checks import MiB
from .errors import ConfigError

ModelSpec = Union[str, Callable[[], Any]]


#: Every key with its default. ``init_app`` applies them with ``app.config.setdefault``.
DEFAULTS: dict[str, Any] = {
    "TORCHPOOL_MODEL": None,
    "TORCHPOOL_MODELS": None,
    "TORCHPOOL_WORKERS": "auto",
    "TORCHPOOL_DEVICES": "auto",
    "TORCHPOOL_THREADS_PER_WORKER": None,
    "TORCHPOOL_ARENA_BYTES": 256 * MiB,
    "TORCHPOOL_PIPELINE_DEPTH": 2,
    "TORCHPOOL_TIMEOUT": 60.0,
    "TORCHPOOL_START_TIMEOUT": 300.0,
    "TORCHPOOL_MAX_QUEUE": 128,
    "TORCHPOOL_MAX_INPUT_BYTES": 256 * MiB,
    "TORCHPOOL_RETRIES": 1,
    "TORCHPOOL_MAX_RESTARTS": 5,
    "TORCHPOOL_RESTART_WINDOW": 60.0,
    "TORCHPOOL_DRAIN_TIMEOUT": 30.0,
    "TORCHPOOL_START": "auto",
    "TORCHPOOL_HANDLE_SIGTERM": True,
    "TORCHPOOL_HANDLE_SIGHUP": True,
    "TORCHPOOL_RETRY_AFTER": 1,
    "TORCHPOOL_HEALTH_URL": None,
    "TORCHPOOL_INLINE": False,
    "TORCHPOOL_EXAMPLE_INPUT": None,
    "TORCHPOOL_MAX_BATCH_SIZE": 1,
    "TORCHPOOL_MAX_BATCH_DELAY_MS": 5.0,
    "TORCHPOOL_BATCH_BUCKETS": None,
    "TORCHPOOL_SPLIT_BATCHES": True,
    "TORCHPOOL_SHARE_WEIGHTS": True,
    "TORCHPOOL_MODE": "embedded",
    "TORCHPOOL_SOCKET": None,
    "TORCHPOOL_WORKER_LOG_LEVEL": "INFO",
    "TORCHPOOL_ERROR_DETAILS": False,
    "TORCHPOOL_MODEL_SHA256": None,
    "TORCHPOOL_START_METHOD": "forkserver",
    "TORCHPOOL_WORKER_NICE": "auto",
    "TORCHPOOL_RELOAD_SURGE": 1,
    "TORCHPOOL_MODEL_VERSION": None,
    "TORCHPOOL_BACKEND": "process",
    "TORCHPOOL_RAY_ADDRESS": None,
    "TORCHPOOL_RAY_ACTOR_OPTIONS": None,
    "TORCHPOOL_STREAM_BUFFER": 4,
    "TORCHPOOL_STREAM_TIMEOUT": None,
    "TORCHPOOL_DIRECT_CALLS": True,
    "TORCHPOOL_WEB_AFFINITY": "auto",
}

#: The name of the model of ``TORCHPOOL_MODEL``, and of the model ``@pool.infer`` uses without a name.
DEFAULT_MODEL = "default"
#: Set in a worker process (and so in whatever it starts) to "<pool name> worker <index>": a TorchPool
#: created there (by a model module that imports the app) stays inert instead of starting a pool of its
#: own. An environment variable rather than a module flag: the reader needs no import of the worker.
WORKER_ENV = "FLASK_TORCHPOOL_WORKER"

#: The keys a ``TORCHPOOL_MODELS`` entry may set besides ``model``: the lowercase suffixes of the
#: ``TORCHPOOL_*`` keys that make sense per model. The others are the app's (start, shutdown, health).
MODEL_OVERRIDES = ("workers", "devices", "threads_per_worker", "arena_bytes", "pipeline_depth", "timeout",
                   "start_timeout", "max_queue", "max_input_bytes", "retries", "max_batch_size",
                   "max_batch_delay_ms", "batch_buckets", "split_batches", "share_weights", "example_input",
                   "model_sha256", "stream_buffer", "stream_timeout", "reload_surge", "model_version",
                   "backend", "ray_actor_options", "direct_calls")

# \Z, not $: $ also matches before a final newline ("tagger\n" would pass).
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*\Z")
_MODEL_FILE_SUFFIXES = (".pt", ".pt2", ".pth", ".ts", ".jit")


@dataclass(frozen=True)
class AppConfig:
    """The app's own keys, the same for every model. Build it with :meth:`from_mapping` or :func:`load`."""

    #: ``TORCHPOOL_START``: "auto", "eager" or "lazy".
    start: str = DEFAULTS["TORCHPOOL_START"]
    handle_sigterm: bool = DEFAULTS["TORCHPOOL_HANDLE_SIGTERM"]
    #: ``TORCHPOOL_HANDLE_SIGHUP``: SIGHUP reloads every model this process's workers run.
    handle_sighup: bool = DEFAULTS["TORCHPOOL_HANDLE_SIGHUP"]
    health_url: str | None = DEFAULTS["TORCHPOOL_HEALTH_URL"]
    inline: bool = DEFAULTS["TORCHPOOL_INLINE"]
    #: "embedded" (workers are children of this process), "attach" (use a pool server's) or "auto".
    mode: str = DEFAULTS["TORCHPOOL_MODE"]
    #: The pool server's Unix socket; None: a per-user private directory (attach.rendezvous).
    socket: str | None = DEFAULTS["TORCHPOOL_SOCKET"]
    #: ``TORCHPOOL_ERROR_DETAILS``: 5xx bodies carry the full message and fields (also when app.debug).
    error_details: bool = DEFAULTS["TORCHPOOL_ERROR_DETAILS"]
    #: ``TORCHPOOL_RAY_ADDRESS``: the Ray cluster of models whose backend is "ray" ("auto", "ray://host:port",
    #: "host:port"); None: start a local Ray in this process (unless it is connected already).
    ray_address: str | None = DEFAULTS["TORCHPOOL_RAY_ADDRESS"]
    #: ``TORCHPOOL_WEB_AFFINITY``: "worker" pins an attached web process to the cores of the worker the
    #: pool server pairs it with (Note [Web affinity] in ``attach/affinity.py``); "off" pins nothing;
    #: "auto" pins gunicorn sync workers only.
    web_affinity: str = DEFAULTS["TORCHPOOL_WEB_AFFINITY"]

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> AppConfig:
        """Validate every ``TORCHPOOL_*`` key of *config* and return the app's own."""
        return load(config)[0]


@dataclass(frozen=True)
class ModelConfig:
    """The validated configuration of one model (one backend). Build it with :meth:`from_mapping` or
    :func:`load`."""

    model: ModelSpec
    workers: int | str = DEFAULTS["TORCHPOOL_WORKERS"]
    devices: tuple[str, ...] | str = DEFAULTS["TORCHPOOL_DEVICES"]
    threads_per_worker: int | None = DEFAULTS["TORCHPOOL_THREADS_PER_WORKER"]
    arena_bytes: int = DEFAULTS["TORCHPOOL_ARENA_BYTES"]
    pipeline_depth: int = DEFAULTS["TORCHPOOL_PIPELINE_DEPTH"]
    timeout: float | None = DEFAULTS["TORCHPOOL_TIMEOUT"]
    start_timeout: float = DEFAULTS["TORCHPOOL_START_TIMEOUT"]
    max_queue: int = DEFAULTS["TORCHPOOL_MAX_QUEUE"]
    max_input_bytes: int = DEFAULTS["TORCHPOOL_MAX_INPUT_BYTES"]
    retries: int = DEFAULTS["TORCHPOOL_RETRIES"]
    max_restarts: int = DEFAULTS["TORCHPOOL_MAX_RESTARTS"]
    restart_window: float = DEFAULTS["TORCHPOOL_RESTART_WINDOW"]
    drain_timeout: float = DEFAULTS["TORCHPOOL_DRAIN_TIMEOUT"]
    retry_after: int = DEFAULTS["TORCHPOOL_RETRY_AFTER"]
    #: A value (or a zero-argument callable returning one) for the CLI to call the model with: a tuple
    #: is spread as positional arguments, anything else is the single argument.
    example_input: Any = field(default=None, compare=False, hash=False)
    max_batch_size: int = DEFAULTS["TORCHPOOL_MAX_BATCH_SIZE"]
    #: ``TORCHPOOL_DIRECT_CALLS``: attached web processes call the workers of this (unbatched) model
    #: directly, over lanes the pool server hands out (Note [Lanes]), instead of through the server.
    direct_calls: bool = DEFAULTS["TORCHPOOL_DIRECT_CALLS"]
    max_batch_delay_ms: float = DEFAULTS["TORCHPOOL_MAX_BATCH_DELAY_MS"]
    #: ``TORCHPOOL_BATCH_BUCKETS``: the batch sizes a batch is padded up to (ascending; empty: none).
    batch_buckets: tuple[int, ...] = ()
    #: ``TORCHPOOL_SPLIT_BATCHES``: a batch may leave calls for the next one (Note [Batch splitting]).
    split_batches: bool = DEFAULTS["TORCHPOOL_SPLIT_BATCHES"]
    share_weights: bool = DEFAULTS["TORCHPOOL_SHARE_WEIGHTS"]
    #: ``TORCHPOOL_MODEL_SHA256``: the SHA-256 (hex) a model file must have; None: not checked.
    model_sha256: str | None = DEFAULTS["TORCHPOOL_MODEL_SHA256"]
    #: The level (a number) below which the workers' log records are not sent to the web process.
    worker_log_level: int = logging.INFO
    #: ``TORCHPOOL_START_METHOD``: "forkserver" (workers forked from a preloaded fork server) or "spawn".
    start_method: str = DEFAULTS["TORCHPOOL_START_METHOD"]
    #: ``TORCHPOOL_WORKER_NICE``: how much lower than the web process's the workers' CPU priority is;
    #: ``"auto"``: resolved by :func:`flask_torchpool.placement.worker_nice`.
    worker_nice: int | str = DEFAULTS["TORCHPOOL_WORKER_NICE"]
    #: ``TORCHPOOL_RELOAD_SURGE``: how many workers a reload may run beyond ``workers`` (0: take one out,
    #: then replace it).
    reload_surge: int = DEFAULTS["TORCHPOOL_RELOAD_SURGE"]
    #: ``TORCHPOOL_MODEL_VERSION``: a label for the model's version, shown in status, metrics and logs.
    model_version: str | None = DEFAULTS["TORCHPOOL_MODEL_VERSION"]
    #: ``TORCHPOOL_BACKEND``: "process" (worker processes of this host) or "ray" (Ray actors).
    backend: str = DEFAULTS["TORCHPOOL_BACKEND"]
    #: ``TORCHPOOL_RAY_ACTOR_OPTIONS``: passed to Ray's ``.options()`` for every actor of the model.
    ray_actor_options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: ``TORCHPOOL_STREAM_BUFFER``: chunks of a stream that may wait in shared memory for its reader.
    stream_buffer: int = DEFAULTS["TORCHPOOL_STREAM_BUFFER"]
    #: ``TORCHPOOL_STREAM_TIMEOUT``: seconds a whole stream may take; None: no bound but the per-chunk one.
    stream_timeout: float | None = DEFAULTS["TORCHPOOL_STREAM_TIMEOUT"]

    #: The model's name: ``"default"`` for ``TORCHPOOL_MODEL``, else its key in ``TORCHPOOL_MODELS``.
    name: str = DEFAULT_MODEL
    #: The key of the model's entry (``TORCHPOOL_MODEL`` or ``TORCHPOOL_MODELS["name"]``) and the fields
    #: that entry set, so that errors found later (e.g. a missing GPU) name the key the value came from.
    source: str = field(default="TORCHPOOL_MODEL", compare=False, repr=False)
    overrides: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_sha256 is not None and not (
                isinstance(self.model, str) and self.model.endswith(_MODEL_FILE_SUFFIXES)):
            raise ConfigError(self.key("model_sha256"), f"pins the SHA-256 of a model file, but the model "
                                                        f"{self.model!r} is not a file; remove the pin")
        if self.backend == "ray":
            _check_ray(self)
        if self.batch_buckets and self.batch_buckets[-1] > self.max_batch_size:
            raise ConfigError(self.key("batch_buckets"), f"{list(self.batch_buckets)} has sizes above "
                                                         f"{self.key('max_batch_size')} "
                                                         f"({self.max_batch_size}); no batch grows that big")

    @property
    def spec(self) -> ModelSpec | PinnedFile:
        """What a worker loads: :attr:`model`, or a :class:`PinnedFile` when the file is pinned."""
        if self.model_sha256 is not None and isinstance(self.model, str):
            return PinnedFile(self.model, self.model_sha256, self.key("model_sha256"))
        return self.model

    def key(self, setting: str) -> str:
        """The config key this model's *setting* (a field name) came from, e.g. ``TORCHPOOL_WORKERS`` or
        ``TORCHPOOL_MODELS["resnet"]["workers"]``."""
        if setting in self.overrides:
            return f'{self.source}["{setting}"]'
        if setting == "model":
            return self.source
        return f"TORCHPOOL_{setting.upper()}"

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Validate the ``TORCHPOOL_*`` keys of *config* (missing keys take their defaults) and return the
        configuration of the default model: ``TORCHPOOL_MODEL``'s, or the first of ``TORCHPOOL_MODELS``.
        See :func:`load` for every model's."""
        return next(iter(load(config)[1].values()))

    @classmethod
    def models_from_mapping(cls, config: Mapping[str, Any]) -> dict[str, ModelConfig]:
        """Validate the ``TORCHPOOL_*`` keys of *config* and return every model's configuration by name
        (see :func:`load`)."""
        return load(config)[1]


@dataclass(frozen=True)
class PinnedFile:
    """A model file and the SHA-256 it must have (the worker refuses it otherwise, naming *key*).
    Model files are code: TorchScript runs what it holds, and ``torch.export.load`` may unpickle."""

    path: str
    sha256: str
    key: str

    def __repr__(self) -> str:
        return repr(self.path)


#: The name the per-model configuration had in 0.1.
PoolConfig = ModelConfig


def load(config: Mapping[str, Any]) -> tuple[AppConfig, dict[str, ModelConfig]]:
    """Validate every ``TORCHPOOL_*`` key of *config* (missing keys take their :data:`DEFAULTS`): the app's
    configuration, and every model's by name, in order: ``"default"`` (``TORCHPOOL_MODEL``) first, then
    ``TORCHPOOL_MODELS`` in its order. Raises :class:`ConfigError` naming the first bad key."""

    def get(key: str) -> Any:
        return config.get(key, DEFAULTS[key])

    app = AppConfig(**{name: check(f"TORCHPOOL_{name.upper()}", get(f"TORCHPOOL_{name.upper()}"))
                       for name, check in _APP_FIELDS.items()})
    common = {name: check(f"TORCHPOOL_{name.upper()}", get(f"TORCHPOOL_{name.upper()}"))
              for name, check in _FIELDS.items()}
    single, several = get("TORCHPOOL_MODEL"), get("TORCHPOOL_MODELS")
    if several is not None and not isinstance(several, Mapping):
        raise ConfigError("TORCHPOOL_MODELS", f"{several!r} is not allowed; use None or a dict of "
                                              "model names to models")
    models: dict[str, ModelConfig] = {}
    if single is not None or not several:
        models[DEFAULT_MODEL] = ModelConfig(model=_model("TORCHPOOL_MODEL", single), **common)
    for name, entry in (several or {}).items():
        if not isinstance(name, str) or not _MODEL_NAME.match(name):
            raise ConfigError("TORCHPOOL_MODELS", f"the name {name!r} is not allowed; use a non-empty "
                                                  "string of letters, digits, '_', '.' and '-'")
        source = f'TORCHPOOL_MODELS["{name}"]'
        if name in models:
            raise ConfigError(source, "'default' is the name of the model of TORCHPOOL_MODEL; "
                                      "rename this one, or move TORCHPOOL_MODEL into TORCHPOOL_MODELS "
                                      "as 'default'")
        models[name] = _model_entry(ModelConfig, name, source, entry, common)
    return app, models


def _model_entry(cls: type[ModelConfig], name: str, source: str, entry: Any,
                 common: dict[str, Any]) -> ModelConfig:
    """One ``TORCHPOOL_MODELS`` entry: a model spec, or a dict of ``model`` and per-model overrides."""
    if not isinstance(entry, Mapping):
        return cls(model=_model(source, entry), name=name, source=source, **common)
    values = dict(common)
    for field_name in entry:
        if field_name != "model" and field_name not in MODEL_OVERRIDES:
            key = f'{source}["{field_name}"]' if isinstance(field_name, str) else source
            raise ConfigError(key, f"{field_name!r} is not a per-model setting; use 'model' and any of "
                                   f"{', '.join(map(repr, MODEL_OVERRIDES))}")
    for field_name in MODEL_OVERRIDES:
        if field_name in entry:
            values[field_name] = _FIELDS[field_name](f'{source}["{field_name}"]', entry[field_name])
    model = _model(f'{source}["model"]', entry.get("model"))
    return cls(model=model, name=name, source=source, overrides=frozenset(entry), **values)


def example_args(config: ModelConfig) -> tuple[Any, ...]:
    """The positional arguments of ``TORCHPOOL_EXAMPLE_INPUT`` (a tuple is spread, anything else is one
    argument; a callable is called first)."""
    import torch

    example = config.example_input
    if example is None:
        raise ConfigError(config.key("example_input"), "is not set; give a value the model accepts (a "
                                                       "tuple is spread as arguments) or a function "
                                                       "returning one")
    value = example() if callable(example) and not isinstance(example, torch.Tensor) else example
    return value if isinstance(value, tuple) else (value,)


def replace_model(config: ModelConfig, model: Any, key: str) -> ModelConfig:
    """*config* with another *model*, validated as *key* (a reload's new model)."""
    return dataclasses.replace(config, model=_model(key, model))


def _model(key: str, value: Any) -> ModelSpec:
    if value is None:
        several = " (or name several models in TORCHPOOL_MODELS)" if key == "TORCHPOOL_MODEL" else ""
        raise ConfigError(key, "is not set; give a factory as 'package.module:callable', a top-level "
                               "callable, or a path to a TorchScript .pt / torch.export .pt2 file" + several)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if value.endswith(_MODEL_FILE_SUFFIXES):
            if not os.path.isfile(value):
                raise ConfigError(key, f"model file {value!r} does not exist (working directory "
                                       f"{os.getcwd()!r})")
            return os.path.abspath(value)
        if not _IMPORT_PATH.match(value):
            raise ConfigError(key, f"{value!r} is neither 'package.module:callable' nor a path to a "
                                   f"{'/'.join(_MODEL_FILE_SUFFIXES)} file")
        return value
    # Only a loaded torch can have made a module: a pool server that moves numpy arrays never loads it.
    nn = getattr(sys.modules.get("torch"), "nn", None)
    if nn is not None and isinstance(value, nn.Module):
        raise ConfigError(key, "is a model instance; give the function that builds it instead "
                               "(each worker builds its own copy), e.g. 'myapp.model:build'")
    if not callable(value):
        raise ConfigError(key, f"{value!r} is not callable; give a factory that returns the model")
    try:
        pickle.dumps(value)
    except Exception as exc:
        raise ConfigError(key, f"{value!r} cannot be sent to a worker process ({exc}); use a function "
                               "defined at the top level of a module, or 'package.module:callable'"
                          ) from None
    factory: Callable[[], Any] = value
    return factory


def _check_ray(config: ModelConfig) -> None:
    """The keys that conflict with ``TORCHPOOL_BACKEND = "ray"``: on Ray, placement is Ray's."""
    gpus = config.ray_actor_options.get("num_gpus", 0)
    if config.devices not in ("auto", ("cpu",)):
        raise ConfigError(config.key("devices"), f"is {config.devices!r}, but with TORCHPOOL_BACKEND='ray' "
                                                 "Ray places the actors: leave it 'auto' and ask for GPUs "
                                                 'with TORCHPOOL_RAY_ACTOR_OPTIONS={"num_gpus": 1}')
    if config.devices == ("cpu",) and gpus:
        raise ConfigError(config.key("ray_actor_options"), f"asks for num_gpus={gpus!r}, but "
                                                           f"{config.key('devices')} is 'cpu'; use 'auto'")


#: Every field of :class:`AppConfig`, with its validator ``(key, value)``.
_APP_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "start": lambda k, v: checks.choice(k, v, ("auto", "eager", "lazy")),
    "handle_sigterm": checks.boolean,
    "handle_sighup": checks.boolean,
    "health_url": checks.url_prefix,
    "inline": checks.boolean,
    "mode": lambda k, v: checks.choice(k, v, ("embedded", "attach", "auto")),
    "socket": checks.socket_path,
    "error_details": checks.boolean,
    "ray_address": checks.ray_address,
    "web_affinity": lambda k, v: checks.choice(k, v, ("auto", "off", "worker")),
}

#: Every field of :class:`ModelConfig` but ``model`` and the name, with its validator ``(key, value)``.
_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "workers": checks.workers,
    "devices": checks.devices,
    "threads_per_worker": lambda k, v: checks.integer(k, v, minimum=1, allow_none=True),
    "arena_bytes": checks.arena_bytes,
    "pipeline_depth": lambda k, v: checks.integer(k, v, minimum=1),
    "timeout": lambda k, v: checks.seconds(k, v, allow_none=True),
    "start_timeout": checks.seconds,
    "max_queue": lambda k, v: checks.integer(k, v, minimum=0),
    "max_input_bytes": lambda k, v: checks.integer(k, v, minimum=1),
    "retries": lambda k, v: checks.integer(k, v, minimum=0),
    "max_restarts": lambda k, v: checks.integer(k, v, minimum=0),
    "restart_window": checks.seconds,
    "drain_timeout": lambda k, v: checks.seconds(k, v, zero=True),
    "retry_after": lambda k, v: checks.integer(k, v, minimum=0),
    "example_input": checks.passthrough,
    "max_batch_size": lambda k, v: checks.integer(k, v, minimum=1),
    "direct_calls": checks.boolean,
    "max_batch_delay_ms": lambda k, v: checks.seconds(k, v, zero=True, unit="milliseconds"),
    "batch_buckets": checks.buckets,
    "split_batches": checks.boolean,
    "share_weights": checks.boolean,
    "worker_log_level": checks.log_level,
    "model_sha256": checks.sha256,
    "start_method": lambda k, v: checks.choice(k, v, ("forkserver", "spawn")),
    "worker_nice": checks.nice,
    "reload_surge": lambda k, v: checks.integer(k, v, minimum=0),
    "model_version": checks.label,
    "backend": checks.backend,
    "ray_actor_options": checks.actor_options,
    "stream_buffer": lambda k, v: checks.integer(k, v, minimum=1),
    "stream_timeout": lambda k, v: checks.seconds(k, v, allow_none=True),
}
