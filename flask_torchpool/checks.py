"""The validators of single ``TORCHPOOL_*`` values (:mod:`flask_torchpool.config` applies them): each takes
``(key, value)`` and returns the value to keep, or raises :class:`ConfigError` naming the key, in the form
``KEY: <value> is not allowed; use <what>``, where ``<what>`` is the key's "Allowed" line in
docs/configuration.rst."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from .deadlines import MAX_TIMEOUT, seconds_ok
from .errors import ConfigError

MiB = 1 << 20

# \Z, not $: $ also matches before a final newline.
_DEVICE = re.compile(r"(cpu|cuda(:\d+)?|auto)\Z")
#: A URL path prefix: segments of the characters a path may hold unescaped (RFC 3986 pchar), no empty one.
_URL_PATH = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+/?\Z")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}\Z")


def workers(key: str, value: Any) -> int | str:
    if value == "auto":
        return "auto"
    count: int = integer(key, value, minimum=1, extra="or 'auto'")
    return count


def devices(key: str, value: Any) -> tuple[str, ...] | str:
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


def integer(key: str, value: Any, *, minimum: int, allow_none: bool = False, extra: str = "") -> Any:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an integer >= {minimum}" + (" or None" if allow_none else "") + (f" {extra}" if extra
                                                                                 else "")
        raise ConfigError(key, f"{value!r} is not allowed; use {what}")
    return value


def arena_bytes(key: str, value: Any) -> int:
    """At least 1 MiB, at most this machine's memory: a larger arena could never be filled, and one
    past what the system can map failed only in the worker, as an ENOMEM without the key's name."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if isinstance(value, bool) or not isinstance(value, int) or not MiB <= value <= memory:
        raise ConfigError(key, f"{value!r} is not allowed; use an integer >= 1048576 (1 MiB) and at most "
                               f"this machine's memory ({memory} bytes)")
    return value


def buckets(key: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ConfigError(key, f"{value!r} is not allowed; use None or a list of batch sizes (integers "
                               ">= 1), e.g. [4, 8, 16]")
    return tuple(sorted(set(value)))


def seconds(key: str, value: Any, *, allow_none: bool = False, zero: bool = False,
             unit: str = "seconds") -> Any:
    if value is None and allow_none:
        return None
    if not seconds_ok(value, zero):
        what = (f"a number of {unit} " + (">= 0" if zero else "> 0") + f" and at most {MAX_TIMEOUT:.0f}"
                + (" or None" if allow_none else ""))
        raise ConfigError(key, f"{value!r} is not allowed; use {what}")
    return float(value)


def choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(key, f"{value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
    return str(value)


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"{value!r} is not allowed; use True or False")
    return value


def log_level(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        level = logging.getLevelName(value.strip().upper())  # a number for a known level name
        if isinstance(level, int):
            return level
    raise ConfigError(key, f"{value!r} is not allowed; use a logging level: a name such as 'INFO' or "
                           "'WARNING', or a number >= 0 such as logging.DEBUG")


def nice(key: str, value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 19:
        raise ConfigError(key, f"{value!r} is not allowed; use \"auto\" or an integer from 0 (the web "
                               "process's CPU priority) to 19 (the lowest)")
    return value


def url_prefix(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _URL_PATH.match(value):
        raise ConfigError(key, f"{value!r} is not allowed; use None (off) or a URL path such as "
                               "'/torchpool'")
    return value.rstrip("/")


def socket_path(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\0" in value \
            or len(os.fsencode(os.path.abspath(value))) > 107:  # sun_path's size, with its final NUL
        raise ConfigError(key, f"{value!r} is not allowed; use a path of at most 107 bytes, or None")
    return os.path.abspath(value)
def sha256(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.match(value.strip()):
        raise ConfigError(key, f"{value!r} is not allowed; use None or 64 hex digits (what `sha256sum "
                               "MODEL_FILE` prints)")
    return value.strip().lower()


def label(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 200 or not value.isprintable():
        raise ConfigError(key, f"{value!r} is not allowed; use None or a short printable string such as "
                               "'2026-12-02' or 'v7'")
    return value.strip()


def backend(key: str, value: Any) -> str:
    backend = choice(key, value, ("process", "ray"))
    if backend == "ray" and not installed("ray"):
        raise ConfigError(key, "is 'ray', but Ray is not installed in this environment; install it with "
                               'pip install "flask_torchpool[ray]", or use the process backend')
    return backend


def installed(module: str) -> bool:
    """Whether *module* can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def ray_address(key: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return None if value is None else value.strip()
    raise ConfigError(key, f"{value!r} is not allowed; use None (start a local Ray here), 'auto' (the "
                           "cluster this node belongs to), 'ray://head:10001' or 'head:6379'")


#: Actor options the Ray backend sets itself: it replaces dead actors (so Ray must not restart them or
#: retry their calls), runs one call at a time per actor, and owns its actors (Note [Ray actors]).
RAY_OWN_OPTIONS = ("max_restarts", "max_task_retries", "max_concurrency", "concurrency_groups", "lifetime",
                    "name", "namespace", "get_if_exists")


def actor_options(key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigError(key, f"{value!r} is not allowed; use None or a dict of Ray actor options, e.g. "
                               '{"num_gpus": 1, "num_cpus": 2}')
    for option in RAY_OWN_OPTIONS:
        if option in value:
            raise ConfigError(key, f"sets {option!r}, which flask_torchpool sets itself (it replaces dead "
                                   "actors, runs one call at a time on each and owns them); remove it")
    for option in ("num_cpus", "num_gpus"):
        amount = value.get(option, 0)
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < float("inf"):
            raise ConfigError(key, f"{option}={amount!r} is not allowed; use a number >= 0")
    return dict(value)


def passthrough(key: str, value: Any) -> Any:
    return value
