"""The connection to Ray, and what Ray's errors mean for a call.

:func:`connect` imports Ray (the only place that does in the web process) and joins the cluster of
``TORCHPOOL_RAY_ADDRESS`` once per process: a process already connected (``ray.init`` called by the app, or
an earlier pool) is used as it is. :func:`death_cause` tells the errors that mean the actor is gone
(its process died or was killed, its node was lost, Ray's memory monitor killed it) from the others, and
says which in words for ``last_exit`` and :class:`~flask_torchpool.WorkerCrashedError`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

_connect_lock = threading.Lock()


def ray_module() -> Any:
    """Ray, imported now. Raises :class:`ConfigError` naming ``TORCHPOOL_BACKEND`` without it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("TORCHPOOL_BACKEND", f"is 'ray', but Ray cannot be imported ({exc}); install it "
                                               'with pip install "flask_torchpool[ray]"') from None
    return ray


def connect(address: str | None) -> Any:
    """Ray, connected to the cluster at *address* (None: a local Ray started in this process), unless this
    process is connected already, in which case that connection is kept."""
    ray = ray_module()
    with _connect_lock:
        if not ray.is_initialized():
            log.info("torchpool: connecting to Ray at %s", address or "a new local instance")
            ray.init(address=address, include_dashboard=False if address is None else None,
                     ignore_reinit_error=True)
    return ray


def kill(ray: Any, handle: Any) -> None:
    """Kill one of our actors (no Ray restart); nothing when it is gone already."""
    if handle is None:
        return
    try:
        ray.kill(handle, no_restart=True)
    except Exception as exc:  # already gone, or Ray is: nothing left to stop
        log.debug("torchpool: ray.kill: %s", exc)


def death_cause(exc: BaseException) -> str | None:
    """Why the actor behind a failed Ray call is gone, or None when *exc* does not mean it is."""
    from ray import exceptions as rex

    if isinstance(exc, rex.OutOfMemoryError):
        return "Ray's memory monitor killed it (the node ran out of memory)"
    if isinstance(exc, getattr(rex, "NodeDiedError", ())):
        return "its node was lost"
    if isinstance(exc, getattr(rex, "ActorUnavailableError", ())):
        # The connection to the actor broke mid-call (its process died, or its node is unreachable);
        # Ray may restart nothing (max_restarts=0): the pool replaces it.
        return (f"its process died or its node became unreachable (Ray: "
                f"{first_line(str(exc)).split(' The task may')[0]})")
    if isinstance(exc, rex.RayActorError):
        text = str(exc)
        reason = next((line.strip() for line in text.splitlines()
                       if line.strip().startswith("The actor is dead because")), first_line(text))
        if "ray.kill" in reason:
            return "it was killed (ray.kill)"
        if "its node" in reason.lower():
            return f"its node was lost ({first_line(reason)})"
        if "worker process has died" in reason:
            return ("its process died (killed by a signal, such as the OOM killer's SIGKILL, or a native "
                    "crash; the Ray logs of its node say which)")
        return f"the actor died ({first_line(reason)})"
    if isinstance(exc, (rex.ObjectLostError, rex.OwnerDiedError, rex.WorkerCrashedError,
                        rex.LocalRayletDiedError)):
        return f"Ray lost it ({type(exc).__name__}: {first_line(str(exc))})"
    return None


def first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()[:200]
    return text[:200]
