"""Status: the one vocabulary of worker states and the status types, built in one place.

Every backend reports a :class:`ModelStatus` built by :func:`model_status` (or :func:`not_started`
before it starts); an app of several models adds them up with :func:`app_status`. health, the CLI,
Prometheus and the pool server read these types, never a dict built elsewhere. The call counters are
derived from the call metrics (:func:`counters`), so that a call is counted once, in one place.

Everything here is JSON-ready: what ``<TORCHPOOL_HEALTH_URL>/status`` answers is an :class:`AppStatus`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from .metrics import MetricsSnapshot, merge
from .placement import Placement


class WorkerState(str, enum.Enum):
    """The state of one worker, the same words on every backend."""

    NOT_STARTED = "not started"   # its pool has not started yet
    STARTING = "starting"         # loading its model
    READY = "ready"               # serving
    RETIRING = "retiring"         # reload: an old version's worker finishes its calls, takes no new one
    DEAD = "dead"                 # died; a respawn is scheduled
    FAILED = "failed"             # restart budget spent; retried after TORCHPOOL_RESTART_WINDOW
    STOPPED = "stopped"           # shut down


class _WorkerStatusRequired(TypedDict):

    worker: int
    model: str
    pid: int | None
    state: str               # a WorkerState value
    device: str
    cores: list[int]
    threads: int
    inflight: int            # jobs sent to it and not answered (a batch counts once)
    calls: int               # calls it answered
    errors: int              # of those, failures
    restarts: int            # respawns of its slot
    last_exit: str | None    # how its last process ended
    generation: int          # the model version it runs (ModelVersion's generation)
    incoming: bool           # a reload's new worker, not taking calls yet


class WorkerStatus(_WorkerStatusRequired, total=False):
    """One worker (or the model itself in inline mode). A Ray actor (``TORCHPOOL_BACKEND = "ray"``) adds
    ``actor_id``, ``node_id``, ``node_ip`` (where Ray placed it; None until it is ready) and ``resources``
    (what Ray assigned it, e.g. ``{"CPU": 1.0, "GPU": 1.0}``)."""

    actor_id: str | None
    node_id: str | None
    node_ip: str | None
    resources: dict[str, float]


class Counters(TypedDict):
    """Call counts, derived from the call metrics by :func:`counters`."""

    calls: int        # calls accepted (not counting those refused as overloaded)
    ok: int
    errors: int       # accepted calls that failed, whatever the reason
    timeouts: int
    crashes: int
    overloaded: int   # calls refused because the queue was full
    retries: int      # calls run again after their worker died
    batches: int      # batches of more than one call's rows sent to workers


class PlanEntry(TypedDict):
    worker: int
    device: str
    cores: list[int]
    threads: int
    model: str


class _ModelStatusRequired(TypedDict):
    started: bool
    closed: bool
    ready: bool              # started, not closed, and every worker ready
    queued: int              # calls waiting for a worker
    busy_workers: int
    arena_bytes: int         # shared-memory arenas mapped
    shared_weight_bytes: int
    counters: Counters
    metrics: MetricsSnapshot
    latency_quantiles: dict[str, float | None]
    workers: list[WorkerStatus]
    plan: list[PlanEntry]
    mode: str                # "embedded", "inline", "attach" or "ray"


class ModelVersion(TypedDict):
    """Which version of a model serves (Note [Rolling reload] in :mod:`flask_torchpool.reload`)."""

    generation: int          # 1 at start, +1 per successful reload
    model: str               # the model spec, as configured or given to reload()
    sha256: str | None       # of the model file, when the model is a file
    mtime: float | None      # of the model file (seconds since the epoch), when the model is a file
    version: str | None      # TORCHPOOL_MODEL_VERSION, or reload(version=...)


class ModelStatus(_ModelStatusRequired, total=False):
    """What one backend (one model) reports. ``error``: why it is not serving; attach mode adds
    ``socket`` and ``server`` (the pool server's pid and attached clients). A backend that reloads adds
    ``version`` (the version serving), ``reloading`` (a reload is in progress) and ``reloads`` (counts of
    reload outcomes: "ok", "failed")."""

    error: str
    version: ModelVersion
    reloading: bool
    reloads: dict[str, int]
    socket: str
    server: dict[str, Any]


class AppStatus(ModelStatus):
    """What :meth:`TorchPool.status` answers: the keys of :class:`ModelStatus` for every model together,
    plus ``inline`` and ``models`` (each model's own status, by name)."""

    inline: bool
    models: dict[str, ModelStatus]


def worker_status(placement: Placement, state: WorkerState, *, pid: int | None = None, inflight: int = 0,
                  calls: int = 0, errors: int = 0, restarts: int = 0,
                  last_exit: str | None = None, generation: int = 1, incoming: bool = False,
                  actor: dict[str, Any] | None = None) -> WorkerStatus:
    """One worker's status; *actor*: the keys of a Ray actor (see :class:`WorkerStatus`)."""
    status = WorkerStatus(worker=placement.worker, model=placement.model, pid=pid, state=state.value,
                          device=placement.device, cores=list(placement.cores), threads=placement.threads,
                          inflight=inflight, calls=calls, errors=errors, restarts=restarts,
                          last_exit=last_exit, generation=generation, incoming=incoming)
    if actor is not None:
        status.update(actor)  # type: ignore[typeddict-item]
    return status


def plan_entries(plan: Iterable[Placement]) -> list[PlanEntry]:
    return [PlanEntry(worker=p.worker, device=p.device, cores=list(p.cores), threads=p.threads,
                      model=p.model) for p in plan]


def counters(metrics: MetricsSnapshot) -> Counters:
    """The call counters of a pool, from its metrics: the one source of every count."""
    calls = metrics["calls"]
    overloaded = calls.get("overloaded", 0)
    return Counters(calls=metrics["submitted"], ok=calls.get("ok", 0),
                    errors=sum(calls.values()) - calls.get("ok", 0) - overloaded,
                    timeouts=calls.get("timeout", 0), crashes=calls.get("crashed", 0),
                    overloaded=overloaded, retries=metrics["retries"],
                    batches=metrics["batch_rows"]["count"])


def model_status(*, mode: str, started: bool, closed: bool, queued: int, busy_workers: int,
                 arena_bytes: int, metrics: MetricsSnapshot, workers: list[WorkerStatus],
                 plan: Iterable[Placement], shared_weight_bytes: int = 0,
                 error: str | None = None, version: ModelVersion | None = None, reloading: bool = False,
                 reloads: dict[str, int] | None = None) -> ModelStatus:
    """The status of one backend; ``ready`` and the counters are derived here, nowhere else. During a
    reload, a retiring old worker and a new one not in rotation yet do not make the model unready."""
    serving = [w for w in workers if not w.get("incoming") and w["state"] != WorkerState.RETIRING.value]
    status = ModelStatus(
        started=started, closed=closed,
        ready=bool(started and not closed and serving
                   and all(w["state"] == WorkerState.READY.value for w in serving)),
        queued=queued, busy_workers=busy_workers, arena_bytes=arena_bytes,
        shared_weight_bytes=shared_weight_bytes, counters=counters(metrics), metrics=metrics,
        latency_quantiles=metrics["latency_quantiles"], workers=workers, plan=plan_entries(plan),
        mode=mode)
    if error is not None:
        status["error"] = error
    if version is not None:
        status["version"] = version
        status["reloading"] = reloading
        status["reloads"] = reloads if reloads is not None else {"ok": 0, "failed": 0}
    return status


def not_started(mode: str, metrics: MetricsSnapshot, plan: list[Placement],
                error: str | None = None) -> ModelStatus:
    """The status of a model whose backend has not started (or could not)."""
    return model_status(mode=mode, started=False, closed=False, queued=0, busy_workers=0, arena_bytes=0,
                        metrics=metrics, workers=[worker_status(p, WorkerState.NOT_STARTED) for p in plan],
                        plan=plan, error=error)


def app_status(models: Mapping[str, ModelStatus], *, inline: bool, error: str | None = None) -> AppStatus:
    """The status of an app: one model's own status, or several models' added up; ``models`` holds each
    model's status by name either way."""
    parts = list(models.values())
    if len(parts) == 1:
        status = AppStatus(**parts[0])  # type: ignore[typeddict-item]
    else:
        metrics = merge([part["metrics"] for part in parts])
        total = {key: sum(part["counters"][key] for part in parts)  # type: ignore[literal-required]
                 for key in Counters.__annotations__}
        status = AppStatus(
            started=all(p["started"] for p in parts), closed=any(p["closed"] for p in parts),
            ready=all(p["ready"] for p in parts), queued=sum(p["queued"] for p in parts),
            busy_workers=sum(p["busy_workers"] for p in parts),
            arena_bytes=sum(p["arena_bytes"] for p in parts),
            shared_weight_bytes=sum(p["shared_weight_bytes"] for p in parts),
            counters=Counters(**total),  # type: ignore[typeddict-item]
            metrics=metrics, latency_quantiles=metrics["latency_quantiles"],
            workers=[w for p in parts for w in p["workers"]],
            plan=[e for p in parts for e in p["plan"]],
            mode=parts[0]["mode"])
    status["inline"] = inline
    status["models"] = dict(models)
    if error is not None:
        status["error"] = error
    return status
