"""The backend contract: what every way of running one model implements.

A *backend* runs one model's calls and reports its state. The app's models (:mod:`flask_torchpool.group`),
the pool server, health, the CLI and Prometheus speak to backends only through :class:`Backend`:

* :class:`~flask_torchpool.pool.Pool`: the process backend, workers spawned by this process (embedded);
* :class:`~flask_torchpool.inline.InlinePool`: the model in the calling thread (``TORCHPOOL_INLINE``);
* :class:`~flask_torchpool.attach.remote.RemotePool`: one model of the host's pool server (attach mode).

Every backend accepts and refuses the same arguments (:func:`flask_torchpool.codec.flatten_call`), raises
the same error classes (:mod:`flask_torchpool.errors`) and reports a
:class:`~flask_torchpool.status.ModelStatus` built by :mod:`flask_torchpool.status`. What a backend cannot
do is said by its capability flags, not by raising: inline mode, for one, cannot interrupt a call, so it
has ``enforces_deadlines = False``. ``tests/test_conformance.py`` runs the same tests against every
backend. A backend that can put a new model version in service without failing a call also has
``reload(model=None, *, version=None)`` (the process pool and the attached client; Note [Rolling
reload] in :mod:`flask_torchpool.reload`); :meth:`TorchPool.reload` refuses the others.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

from .config import PoolConfig
from .placement import Placement
from .status import ModelStatus
from .streaming import Stream


@runtime_checkable
class Backend(Protocol):
    """One model's calls, run somewhere. Thread-safe; :meth:`shutdown` is idempotent."""

    #: The model's validated configuration.
    config: PoolConfig
    #: A label for logs and thread names, e.g. ``torchpool[myapp:resnet]``.
    name: str
    #: Whether a call past its deadline fails with :class:`~flask_torchpool.InferenceTimeoutError`
    #: (and a worker still running it is replaced). False for inline mode.
    enforces_deadlines: bool

    @property
    def started(self) -> bool:
        """Serving (or, attached, able to reach the server on demand)."""

    @property
    def closed(self) -> bool:
        """Shut down or draining: takes no new calls."""

    @property
    def placements(self) -> list[Placement]:
        """Where each worker runs (empty while an attached server is unknown)."""

    def start(self) -> None:
        """Start serving; return once the model is loaded. Raises
        :class:`~flask_torchpool.WorkerStartupError` when it cannot be."""

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               batch: bool = True, method: str | None = None, waiter: bool = False,
               retries: int | None = None) -> Future[Any]:
        """Start one call; the future holds the model's output or a
        :class:`~flask_torchpool.TorchPoolError`. Arguments that cannot travel raise here, in the calling
        thread. *timeout* is the call's deadline in seconds (None: ``TORCHPOOL_TIMEOUT``); *batch* lets
        it join a dynamic batch; *method* names the model's method to run (None: the model itself);
        *waiter* promises that the calling thread calls the future's ``result()`` next
        (:meth:`ModelProxy.__call__ <flask_torchpool.ModelProxy>`), so that a backend may read the answer
        in that thread instead of waking another (the attached client does: Note [Claimed lanes]).
        Cancelling the future drops a call that has not started. *retries*: how many times the call runs
        again after its worker died running it (None: ``TORCHPOOL_RETRIES``; a pool server passes one
        less for a direct call its web process sent again: Note [Lanes])."""

    def stream(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               method: str | None = None) -> Stream:
        """Start a streaming call (Note [Streams] in :mod:`flask_torchpool.streaming`): an iterator over
        what the model (or its *method*) yields, never batched. *timeout* bounds the time to the first
        chunk and between chunks (None: ``TORCHPOOL_TIMEOUT``); closing the iterator cancels it."""

    def shutdown(self, wait: bool = True, drain_timeout: float | None = None) -> None:
        """Take no new calls, let calls in flight finish (up to *drain_timeout*, default
        ``TORCHPOOL_DRAIN_TIMEOUT``), then stop. With *wait*, return once stopped."""

    def status(self) -> ModelStatus:
        """A JSON-ready snapshot, built with :func:`flask_torchpool.status.model_status`."""
