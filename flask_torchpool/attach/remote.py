"""The per-model face of an attached web process's connection to the pool server: :class:`RemotePool`,
the :class:`~flask_torchpool.backend.Backend` of a model served by the host's pool server, so views,
health and metrics work unchanged in attach mode. The connection itself is :mod:`.client`'s."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from .. import errors, messages
from ..config import PoolConfig
from ..errors import PoolUnavailableError, TorchPoolError
from ..metrics import Metrics
from ..placement import Placement
from ..status import ModelStatus, WorkerState, model_status, not_started, worker_status
from ..streaming import Stream
from .control import reload_model

if TYPE_CHECKING:
    from .client import PoolConnection

log = logging.getLogger(__name__)


class RemotePool:
    """One model of a pool server: the attached :class:`~flask_torchpool.backend.Backend`."""

    #: The server's pool enforces every call's deadline.
    enforces_deadlines = True

    def __init__(self, config: PoolConfig, connection: PoolConnection, model: str | None = None,
                 name: str = "torchpool") -> None:
        self.config = config
        self.connection = connection
        self.model = model
        self.name = name
        self._closing = False

    @property
    def started(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._closing or self.connection.closed

    @property
    def placements(self) -> list[Placement]:
        """The server's placement of this model's workers, as it said when this process attached."""
        welcome = self.connection.welcome
        if welcome is None:
            return []
        info = welcome.models.get(self._model_name(welcome) or "")
        return [Placement(*p) for p in info["workers"]] if info else []

    def _model_name(self, welcome: messages.Welcome) -> str | None:
        return self.model if self.model is not None else welcome.default_model

    def reload(self, model: Any = None, *, version: str | None = None) -> Any:
        """The pool server reloads this model (:func:`~flask_torchpool.attach.control.reload_model`)."""
        return reload_model(self.connection, self._model_name(self.connection.connect()), model, version)

    def start(self) -> None:
        """Attach now if a server listens. One that is still loading its model is waited for in the
        background (up to ``TORCHPOOL_START_TIMEOUT``), not here: a gunicorn worker that does not
        finish booting within gunicorn's ``--timeout`` is killed. Calls meanwhile wait for the server
        within their deadline; without any server they answer 503 until one is reachable."""
        try:
            self.connection.connect()
            return
        except PoolUnavailableError as exc:
            if not self.connection.starting():
                log.warning("%s: %s; calls answer 503 until it is reachable", self.name, exc)
                return
        log.info("%s: the pool server at %s is starting; attaching when it listens", self.name,
                 self.connection.path)

        def attach() -> None:
            try:
                self.connection.connect(wait=self.config.start_timeout)
            except TorchPoolError as exc:
                log.warning("%s: %s", self.name, exc)

        threading.Thread(target=attach, name=f"{self.name}-attach", daemon=True).start()

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               batch: bool = True, method: str | None = None, waiter: bool = False,
               retries: int | None = None) -> Future[Any]:   # retries: the server's TORCHPOOL_RETRIES
        if self._closing:
            raise errors.PoolClosedError.closing(self.config.retry_after)
        return self.connection.submit(self.model, args, kwargs, timeout, batch,
                                      self.config.max_input_bytes, method, waiter)

    def stream(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               method: str | None = None) -> Stream:
        if self._closing:
            raise errors.PoolClosedError.closing(self.config.retry_after)
        return self.connection.stream(self.model, args, kwargs, timeout, method, self.config)

    def shutdown(self, wait: bool = True, drain_timeout: float | None = None) -> None:
        """Detach this web process (the server and its workers keep running for the others)."""
        self._closing = True  # no new calls from here; with wait=False, calls in flight go on
        if wait:
            drain = self.config.drain_timeout if drain_timeout is None else drain_timeout
            self.connection.close(drain)

    def status(self) -> ModelStatus:
        """The server's status of this model (``"mode": "attach"``, the socket, the server's pid and
        client count added); without a server, a not-started status with the reason in ``"error"``;
        once this process detached (shutdown), its workers as it last knew them, ``"stopped"``."""
        if self.closed:
            return self._detached()
        try:
            server = self.connection.status()
        except TorchPoolError as exc:
            return self._without_server(str(exc))
        name = self.model if self.model is not None else server["default_model"]
        model: ModelStatus | None = server["models"].get(name)
        if model is None:
            return self._without_server(f"the pool server serves no model {name!r}")
        closed = self.closed or model["closed"]
        return {**model, "mode": "attach", "socket": self.connection.path, "closed": closed,
                "ready": model["ready"] and not closed,
                "server": {"pid": self.connection.server_pid or server["pid"], "clients": server["clients"]}}

    def _detached(self) -> ModelStatus:
        placements = self.placements
        status = model_status(mode="attach", started=False, closed=True, queued=0, busy_workers=0,
                              arena_bytes=0, metrics=Metrics(self.config.name).snapshot(),
                              workers=[worker_status(p, WorkerState.STOPPED) for p in placements],
                              plan=placements)
        status["socket"] = self.connection.path
        return status

    def _without_server(self, error: str) -> ModelStatus:
        status = not_started("attach", Metrics(self.config.name).snapshot(), [], error=error)
        status["workers"] = []
        status["closed"] = self.closed
        status["socket"] = self.connection.path
        return status


__all__ = ["RemotePool"]
