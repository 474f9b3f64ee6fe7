"""flask_torchpool: run PyTorch models in a pool of spawned, pinned worker processes from Flask views.

Tensors travel through pre-allocated shared memory; the web process never runs the model and never
pickles tensor data. See :class:`TorchPool`.

The public names are imported on first use (PEP 562), so that importing a submodule that needs neither
torch nor Flask (``flask_torchpool.gunicorn``, loaded by a gunicorn master) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "TorchPool": "extension",
    "ModelProxy": "extension",
    "Stream": "streaming",
    "Placement": "placement",
    "TorchPoolError": "errors",
    "ConfigError": "errors",
    "WorkerStartupError": "errors",
    "WorkerCrashedError": "errors",
    "InferenceError": "errors",
    "OutputError": "errors",
    "InvalidInputError": "errors",
    "PayloadTooLargeError": "errors",
    "InferenceTimeoutError": "errors",
    "PoolOverloadedError": "errors",
    "PoolClosedError": "errors",
    "PoolUnavailableError": "errors",
    "RemoteTraceback": "errors",
    "ReloadError": "errors",
    "tensor_from_stream": "bodies",
}

__all__ = [
    "TorchPool",
    "ModelProxy",
    "Stream",
    "Placement",
    "TorchPoolError",
    "ConfigError",
    "WorkerStartupError",
    "WorkerCrashedError",
    "InferenceError",
    "OutputError",
    "InvalidInputError",
    "PayloadTooLargeError",
    "InferenceTimeoutError",
    "PoolOverloadedError",
    "PoolClosedError",
    "PoolUnavailableError",
    "RemoteTraceback",
    "ReloadError",
    "tensor_from_stream",
]

if TYPE_CHECKING:
    from .bodies import tensor_from_stream
    from .errors import (
        ConfigError,
        InferenceError,
        InferenceTimeoutError,
        InvalidInputError,
        OutputError,
        PayloadTooLargeError,
        PoolClosedError,
        PoolOverloadedError,
        PoolUnavailableError,
        ReloadError,
        RemoteTraceback,
        TorchPoolError,
        WorkerCrashedError,
        WorkerStartupError,
    )
    from .extension import ModelProxy, TorchPool
    from .placement import Placement
    from .streaming import Stream


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flask_torchpool' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
