"""The health blueprint: liveness, readiness, a JSON status and Prometheus metrics over HTTP.

Registered by ``init_app`` at ``TORCHPOOL_HEALTH_URL`` (e.g. ``/torchpool``) when that key is set::

    GET /torchpool/live      200 {"status": "alive"} whenever the web process answers (nothing else)
    GET /torchpool/ready     200 when the pool is started and every worker (of every model) is ready, else 503
    GET /torchpool/status    200 TorchPool.status(): workers, queue, counters, latency, plan
    GET /torchpool/metrics   Prometheus text exposition (501 without prometheus_client)

Every answer is read from the pool's state in the web process; nothing here calls a worker. ``/ready``
starts a pool that is still waiting for its first use (``TORCHPOOL_START="lazy"``, or ``"auto"`` in a
gunicorn worker) in the background, so that an orchestrator's readiness probe does not wait forever for a
request it will never route to a pod that is not ready; it never restarts a pool that was shut down.

``/status`` and ``/metrics`` are for the operator: pids, exit causes, socket paths, model names, the
plan of cores and devices. Keep them off the public port (docs/deploying.rst shows how).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, jsonify, request

if TYPE_CHECKING:
    from .group import ModelGroup

blueprint = Blueprint("torchpool", __name__)


def _state() -> ModelGroup:
    group: ModelGroup = current_app.extensions["torchpool"]
    return group


def _json(body: Mapping[str, Any], status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers["Cache-Control"] = "no-store"
    return response


@blueprint.get("/live")
def live() -> Response:
    """Liveness: the web process answers. Says nothing about the workers, and nothing an anonymous
    caller could use (no pids)."""
    return _json({"status": "alive"})


@blueprint.get("/ready")
def ready() -> Response:
    """Readiness: 200 when every worker of every model has loaded its model, 503 with the reason
    otherwise."""
    state = _state()
    status = state.status()
    workers = [{"model": w["model"], "worker": w["worker"], "pid": w["pid"], "state": w["state"]}
               for w in status["workers"]]
    if status["ready"]:
        return _json({"status": "ready", "workers": workers})
    if "error" in status and status.get("mode") == "attach":
        reason = f"no pool server serves this app: {status['error']}"
    elif "error" in status:
        reason = f"the workers failed to start: {status['error']}"
    elif status["closed"]:
        reason = "the pool is shut down"
    elif not status["started"]:
        state.start_in_background()
        reason = "the pool is starting"
    elif len(status["models"]) == 1:
        waiting = [w["worker"] for w in status["workers"] if w["state"] != "ready"]
        reason = f"worker(s) {waiting} are not ready (starting or restarting)"
    else:
        reason = "; ".join(
            f"model {name!r}: worker(s) {[w['worker'] for w in model['workers'] if w['state'] != 'ready']} "
            "are not ready (starting or restarting)"
            for name, model in status["models"].items() if not model["ready"])
    return _json({"status": "not ready", "reason": reason, "workers": workers}, 503)


@blueprint.get("/status")
def status() -> Response:
    """The JSON of :meth:`TorchPool.status`."""
    return _json(_state().status())


@blueprint.get("/metrics")
def metrics() -> Response:
    """Prometheus exposition (text, or OpenMetrics when the scraper asks for it)."""
    from .prometheus import render

    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return _json({"error": "Prometheus metrics need the prometheus_client package: "
                               "pip install flask_torchpool[metrics]",
                      "type": "NotImplemented"}, 501)
    body, content_type = render(_state(), request.headers.get("Accept", ""))
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})
