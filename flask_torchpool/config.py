"""Configuration: the ``TORCHPOOL_*`` keys, their defaults, and one frozen :class:`PoolConfig`.

``init_app`` reads the keys once and validates them here; a bad value raises :class:`ConfigError` naming
the key and what is allowed. Nothing is imported or started while validating: a model import path is only
checked for its form (the worker imports it, and reports a failure as ``WorkerStartupError``).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from .errors import ConfigError

ModelSpec = Union[str, Callable[[], Any]]

MiB = 1 << 20

#: Every key with its default. ``init_app`` applies them with ``app.config.setdefault``.
DEFAULTS: dict[str, Any] = {
    "TORCHPOOL_MODEL": None,
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
    "TORCHPOOL_RETRY_AFTER": 1,
    "TORCHPOOL_HEALTH_URL": None,
    "TORCHPOOL_INLINE": False,
    "TORCHPOOL_EXAMPLE_INPUT": None,
    "TORCHPOOL_MAX_BATCH_SIZE": 1,
    "TORCHPOOL_MAX_BATCH_DELAY_MS": 5.0,
    "TORCHPOOL_SHARE_WEIGHTS": True,
    "TORCHPOOL_WORKER_LOG_LEVEL": "INFO",
}

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|auto)$")
_MODEL_FILE_SUFFIXES = (".pt", ".pt2", ".pth", ".ts", ".jit")


@dataclass(frozen=True)
class PoolConfig:
    """The validated configuration of one pool. Build it with :meth:`from_mapping`."""

    model: ModelSpec
    workers: int | str = "auto"
    devices: tuple[str, ...] | str = "auto"
    threads_per_worker: int | None = None
    arena_bytes: int = 256 * MiB
    pipeline_depth: int = 2
    timeout: float | None = 60.0
    start_timeout: float = 300.0
    max_queue: int = 128
    max_input_bytes: int = 256 * MiB
    retries: int = 1
    max_restarts: int = 5
    restart_window: float = 60.0
    drain_timeout: float = 30.0
    start: str = "auto"
    handle_sigterm: bool = True
    retry_after: int = 1
    health_url: str | None = None
    inline: bool = False
    #: A value (or a zero-argument callable returning one) for the CLI to call the model with: a tuple
    #: is spread as positional arguments, anything else is the single argument.
    example_input: Any = field(default=None, compare=False, hash=False)
    max_batch_size: int = 1
    max_batch_delay_ms: float = 5.0
    share_weights: bool = True
    #: The level (a number) below which the workers' log records are not sent to the web process.
    worker_log_level: int = logging.INFO

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> PoolConfig:
        """Validate the ``TORCHPOOL_*`` keys of *config* (missing keys take their defaults)."""

        def get(key: str) -> Any:
            return config.get(key, DEFAULTS[key])

        return cls(
            model=_model(get("TORCHPOOL_MODEL")),
            workers=_workers(get("TORCHPOOL_WORKERS")),
            devices=_devices(get("TORCHPOOL_DEVICES")),
            threads_per_worker=_int("TORCHPOOL_THREADS_PER_WORKER", get("TORCHPOOL_THREADS_PER_WORKER"),
                                    minimum=1, allow_none=True),
            arena_bytes=_int("TORCHPOOL_ARENA_BYTES", get("TORCHPOOL_ARENA_BYTES"), minimum=1 * MiB),
            pipeline_depth=_int("TORCHPOOL_PIPELINE_DEPTH", get("TORCHPOOL_PIPELINE_DEPTH"), minimum=1),
            timeout=_seconds("TORCHPOOL_TIMEOUT", get("TORCHPOOL_TIMEOUT"), allow_none=True),
            start_timeout=_seconds("TORCHPOOL_START_TIMEOUT", get("TORCHPOOL_START_TIMEOUT")),
            max_queue=_int("TORCHPOOL_MAX_QUEUE", get("TORCHPOOL_MAX_QUEUE"), minimum=0),
            max_input_bytes=_int("TORCHPOOL_MAX_INPUT_BYTES", get("TORCHPOOL_MAX_INPUT_BYTES"), minimum=1),
            retries=_int("TORCHPOOL_RETRIES", get("TORCHPOOL_RETRIES"), minimum=0),
            max_restarts=_int("TORCHPOOL_MAX_RESTARTS", get("TORCHPOOL_MAX_RESTARTS"), minimum=0),
            restart_window=_seconds("TORCHPOOL_RESTART_WINDOW", get("TORCHPOOL_RESTART_WINDOW")),
            drain_timeout=_seconds("TORCHPOOL_DRAIN_TIMEOUT", get("TORCHPOOL_DRAIN_TIMEOUT"), zero=True),
            start=_choice("TORCHPOOL_START", get("TORCHPOOL_START"), ("auto", "eager", "lazy")),
            handle_sigterm=_bool("TORCHPOOL_HANDLE_SIGTERM", get("TORCHPOOL_HANDLE_SIGTERM")),
            retry_after=_int("TORCHPOOL_RETRY_AFTER", get("TORCHPOOL_RETRY_AFTER"), minimum=0),
            health_url=_url_prefix("TORCHPOOL_HEALTH_URL", get("TORCHPOOL_HEALTH_URL")),
            inline=_bool("TORCHPOOL_INLINE", get("TORCHPOOL_INLINE")),
            example_input=get("TORCHPOOL_EXAMPLE_INPUT"),
            max_batch_size=_int("TORCHPOOL_MAX_BATCH_SIZE", get("TORCHPOOL_MAX_BATCH_SIZE"), minimum=1),
            max_batch_delay_ms=_seconds("TORCHPOOL_MAX_BATCH_DELAY_MS", get("TORCHPOOL_MAX_BATCH_DELAY_MS"),
                                        zero=True, unit="milliseconds"),
            share_weights=_bool("TORCHPOOL_SHARE_WEIGHTS", get("TORCHPOOL_SHARE_WEIGHTS")),
            worker_log_level=_log_level("TORCHPOOL_WORKER_LOG_LEVEL", get("TORCHPOOL_WORKER_LOG_LEVEL")),
        )


def _model(value: Any) -> ModelSpec:
    key = "TORCHPOOL_MODEL"
    if value is None:
        raise ConfigError(key, "is not set; give a factory as 'package.module:callable', a top-level "
                               "callable, or a path to a TorchScript .pt / torch.export .pt2 file")
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
    try:
        import torch.nn

        if isinstance(value, torch.nn.Module):
            raise ConfigError(key, "is a model instance; give the function that builds it instead "
                                   "(each worker builds its own copy), e.g. 'myapp.model:build'")
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if not callable(value):
        raise ConfigError(key, f"{value!r} is not callable; give a factory that returns the model")
    try:
        pickle.dumps(value)
    except Exception as exc:
        raise ConfigError(key, f"{value!r} cannot be sent to a worker process ({exc}); use a function "
                               "defined at the top level of a module, or 'package.module:callable'"
                          ) from None
    return value


def _workers(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    return _int("TORCHPOOL_WORKERS", value, minimum=1, extra="or 'auto'")


def _devices(value: Any) -> tuple[str, ...] | str:
    key = "TORCHPOOL_DEVICES"
    allowed = "'cpu', 'cuda', 'cuda:N', a comma-separated list or list of those, or 'auto'"
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise ConfigError(key, f"{value!r} is not allowed; use {allowed}")
    if not items or any(not _DEVICE.match(v) for v in items):
        raise ConfigError(key, f"{value!r} is not allowed; use {allowed}")
    if "auto" in items:
        if len(items) > 1:
            raise ConfigError(key, "'auto' cannot be combined with other devices")
        return "auto"
    if "cpu" in items and len(items) > 1:
        raise ConfigError(key, "'cpu' cannot be combined with GPU devices")
    return tuple(items)


def _int(key: str, value: Any, *, minimum: int, allow_none: bool = False, extra: str = "") -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an integer >= {minimum}" + (" or None" if allow_none else "") + (f" {extra}" if extra
                                                                                 else "")
        raise ConfigError(key, f"{value!r} is not allowed; use {what}")
    return value


def _seconds(key: str, value: Any, *, allow_none: bool = False, zero: bool = False,
             unit: str = "seconds") -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if zero else value > 0)
    if not ok:
        what = f"a number of {unit} " + (">= 0" if zero else "> 0") + (" or None" if allow_none else "")
        raise ConfigError(key, f"{value!r} is not allowed; use {what}")
    return float(value)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
    return str(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not allowed; use True or False")
    return value


def _log_level(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        level = logging.getLevelName(value.strip().upper())  # a number for a known level name
        if isinstance(level, int):
            return level
    raise ConfigError(key, f"{value!r} is not allowed; use a logging level: a name such as 'INFO' or "
                           "'WARNING', or a number >= 0 such as logging.DEBUG")


def _url_prefix(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/") or value == "/" or "<" in value:
        raise ConfigError(key, f"{value!r} is not allowed; use None (off) or a URL path such as "
                               "'/torchpool'")
    return value.rstrip("/")
