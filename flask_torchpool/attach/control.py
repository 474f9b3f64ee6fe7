"""Control requests between a client and the pool server: its status, and a reload of its models
(``flask torchpool reload``, an attached app's ``pool.reload()``; Note [Rolling reload] in
:mod:`flask_torchpool.reload`). Both ends: :func:`answer_request` is the server's, :func:`ask_reload` and
:func:`reload_model` the client's."""

from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Callable

from .. import messages
from ..errors import ReloadError

if TYPE_CHECKING:
    from .client import PoolConnection


def answer_request(server: Any, msg: messages.StatusRequest | messages.ReloadRequest,
                   send: Callable[[Any], None]) -> None:
    """Answer *msg* with a :class:`~messages.StatusReply` through *send*: the status of *server* (a
    :class:`~flask_torchpool.attach.server.PoolServer`) at once; a reload from a thread, as it takes
    seconds and the client's calls must keep flowing meanwhile."""
    if isinstance(msg, messages.StatusRequest):
        send(messages.StatusReply(msg.id, server.status()))
        return

    from ..versions import reload_request  # the server's half: it loads torch, which clients need not

    def reload() -> None:
        reply = reload_request(server.pools, server.default_model, msg)
        with contextlib.suppress(OSError):   # it went away: the reload happened all the same
            send(reply)

    threading.Thread(target=reload, name="torchpool-server-reload", daemon=True).start()


def ask_reload(connection: PoolConnection, model: str | None, spec: str | None, version: str | None,
               timeout: float) -> dict[str, Any]:
    """Have the server reload *model* (None: every model): ``{"error": str | None, "versions": {...}}``."""
    reply: dict[str, Any] = connection.ask(
        lambda call_id: messages.ReloadRequest(call_id, model, spec, version), timeout)
    return reply


def reload_model(connection: PoolConnection, name: str | None, model: Any, version: str | None) -> Any:
    """An attached app's ``pool.reload()`` of model *name*: its new version, or :class:`ReloadError`."""
    if model is not None and not isinstance(model, str):
        raise ReloadError("an attached app can only name another model as a string "
                          "('package.module:callable' or a file path)", name or "")
    reply = ask_reload(connection, name, model, version, timeout=3600.0)
    if reply["error"] is not None:
        raise ReloadError(reply["error"], name or "")
    return reply["versions"][name or ""]
