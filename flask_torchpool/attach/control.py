"""The pool server's answers to a client's control requests: its status, and a reload of its models
(``flask torchpool reload``; Note [Rolling reload] in :mod:`flask_torchpool.reload`)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

from .. import messages
from ..versions import reload_request


def answer_request(server: Any, msg: messages.StatusRequest | messages.ReloadRequest,
                   send: Callable[[Any], None]) -> None:
    """Answer *msg* with a :class:`~messages.StatusReply` through *send*: the status of *server* (a
    :class:`~flask_torchpool.attach.server.PoolServer`) at once; a reload from a thread, as it takes
    seconds and the client's calls must keep flowing meanwhile."""
    if isinstance(msg, messages.StatusRequest):
        send(messages.StatusReply(msg.id, server.status()))
        return

    def reload() -> None:
        reply = reload_request(server.pools, server.default_model, msg)
        with contextlib.suppress(OSError):   # it went away: the reload happened all the same
            send(reply)

    threading.Thread(target=reload, name="torchpool-server-reload", daemon=True).start()
