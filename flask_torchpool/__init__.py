"""flask_torchpool: run PyTorch models in a pool of spawned, pinned worker processes from Flask views.

Tensors travel through pre-allocated shared memory; the web process never runs the model and never
pickles tensor data. See :class:`TorchPool`.
"""

from __future__ import annotations

from .errors import (
    ConfigError,
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    OutputError,
    PayloadTooLargeError,
    PoolClosedError,
    PoolOverloadedError,
    RemoteTraceback,
    TorchPoolError,
    WorkerCrashedError,
    WorkerStartupError,
)
from .extension import ModelProxy, TorchPool
from .placement import Placement

__version__ = "0.1.0"

__all__ = [
    "TorchPool",
    "ModelProxy",
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
    "RemoteTraceback",
]
