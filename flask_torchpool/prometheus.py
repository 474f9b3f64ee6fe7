"""Prometheus export: a custom collector that reads the pool's status and metrics at scrape time.

Everything is measured in the process that owns the workers (see :mod:`flask_torchpool.metrics`): the web
process, or the pool server that attached web processes ask for its status. So the collector needs no
multiprocess mode: each scrape takes one :meth:`TorchPool.status` snapshot and turns its counters,
cumulative-bucket histograms and gauges into metric families, with one sample per model (the ``model``
label; several with ``TORCHPOOL_MODELS``). It serves
``<TORCHPOOL_HEALTH_URL>/metrics`` and can be mounted in any registry::

    from prometheus_client import REGISTRY
    REGISTRY.register(pool.prometheus_collector(app))

``prometheus_client`` is an optional dependency (``pip install flask_torchpool[metrics]``); this module
imports it only when metrics are collected or rendered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

from .status import AppStatus, ModelStatus, WorkerState

if TYPE_CHECKING:
    from .group import ModelGroup

#: Worker states always exported by ``torchpool_workers`` (0 when no worker is in them).
WORKER_STATES = tuple(state.value for state in WorkerState)


class TorchPoolCollector:
    """Collects one app's pool metrics when scraped. Get one from :meth:`TorchPool.prometheus_collector`.

    Metrics (every one labelled with ``model``):

    ======================================  ==========  =========================================
    ``torchpool_calls_total``               counter     calls by ``outcome``
    ``torchpool_call_latency_seconds``      histogram   submit to result, queueing included
    ``torchpool_queue_seconds``             histogram   time waiting for a worker
    ``torchpool_batch_rows``                histogram   rows (dim 0) per batch run by a worker
    ``torchpool_batch_calls``               histogram   calls per batch run by a worker
    ``torchpool_batch_padding_rows_total``  counter     rows added to batches to reach a bucket
    ``torchpool_batch_split_calls_total``   counter     calls a batch left for the next one
    ``torchpool_worker_busy_seconds_total``  counter    seconds the workers spent on calls
    ``torchpool_queue_depth``               gauge       calls waiting for a worker
    ``torchpool_inflight_calls``            gauge       calls sent to workers, not yet answered
    ``torchpool_busy_workers``              gauge       workers with at least one call
    ``torchpool_workers``                   gauge       workers by ``state``
    ``torchpool_ready``                     gauge       1 when every worker is ready
    ``torchpool_worker_restarts_total``     counter     worker respawns since the pool started
    ``torchpool_shared_memory_bytes``       gauge       bytes of shared-memory arenas mapped
    ``torchpool_streams_total``             counter     streams started
    ``torchpool_streams_open``              gauge       streams running now
    ``torchpool_stream_chunks_total``       counter     chunks streams delivered
    ``torchpool_stream_first_chunk_seconds``  histogram  seconds from a stream's start to its first chunk
    ``torchpool_model_generation``          gauge       the model version serving (reloads)
    ``torchpool_model_info``                gauge       1, labelled generation, version, sha256
    ``torchpool_reloading``                 gauge       1 while a reload runs
    ``torchpool_reloads_total``             counter     reloads that ended, by ``outcome``
    ======================================  ==========  =========================================
    """

    def __init__(self, state: ModelGroup) -> None:
        _require()
        self._state = state

    def describe(self) -> list[Any]:
        """The metric families without samples: lets a registry check names without a scrape."""
        return list(_families(None))

    def collect(self) -> Iterator[Any]:
        yield from _families(self._state.status())


def _require() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError("Prometheus metrics need the prometheus_client package: "
                          "pip install flask_torchpool[metrics]") from exc


def render(state: ModelGroup, accept: str = "") -> tuple[bytes, str]:
    """Encode one scrape of *state*'s pool for a scraper sending *accept*: (body, content type)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import choose_encoder

    registry = CollectorRegistry(auto_describe=False)
    registry.register(TorchPoolCollector(state))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


def _models(status: AppStatus | None) -> list[tuple[str, ModelStatus]]:
    """(name, status) of every model of one app status; none for the families without samples."""
    return [] if status is None else list(status["models"].items())


def _families(status: AppStatus | None) -> Iterator[Any]:
    """The metric families of one status snapshot, a sample per model; with None, the families without
    samples."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    models = _models(status)

    calls = CounterMetricFamily("torchpool_calls", "Calls that ended, by outcome.",
                                labels=["model", "outcome"])
    for model, part in models:
        for outcome, n in part["metrics"]["calls"].items():
            calls.add_metric([model, outcome], n)
    yield calls

    histograms: tuple[tuple[str, Literal["latency_seconds", "queue_seconds", "batch_rows", "batch_calls",
                                         "first_chunk_seconds"], str], ...] = (
        ("torchpool_call_latency_seconds", "latency_seconds",
         "Seconds from submitting a call to its result, queueing included."),
        ("torchpool_queue_seconds", "queue_seconds", "Seconds a call waited for a worker."),
        ("torchpool_batch_rows", "batch_rows", "Rows (along dim 0) of each batch a worker ran."),
        ("torchpool_batch_calls", "batch_calls", "Calls in each batch a worker ran."),
        ("torchpool_stream_first_chunk_seconds", "first_chunk_seconds",
         "Seconds from starting a stream to its first chunk."),
    )
    for name, key, doc in histograms:
        family = HistogramMetricFamily(name, doc, labels=["model"])
        for model, part in models:
            snapshot = part["metrics"][key]
            buckets = [(floatToGoString(le), n)  # type: ignore[no-untyped-call]
                       for le, n in zip(snapshot["buckets"], snapshot["cumulative"])]
            buckets.append(("+Inf", snapshot["count"]))
            family.add_metric([model], buckets, sum_value=snapshot["sum"])
        yield family

    def gauge(name: str, doc: str, value: Callable[[ModelStatus], float]) -> Any:
        family = GaugeMetricFamily(name, doc, labels=["model"])
        for model, part in models:
            family.add_metric([model], value(part))
        return family

    yield gauge("torchpool_queue_depth", "Calls waiting for a worker.", lambda p: p["queued"])
    yield gauge("torchpool_inflight_calls", "Calls sent to workers and not answered yet.",
                lambda p: sum(w["inflight"] for w in p["workers"]))
    yield gauge("torchpool_busy_workers", "Workers running at least one call.", lambda p: p["busy_workers"])
    by_state = GaugeMetricFamily("torchpool_workers", "Workers by state.", labels=["model", "state"])
    for model, part in models:
        for state in WORKER_STATES:
            by_state.add_metric([model, state], sum(1 for w in part["workers"] if w["state"] == state))
    yield by_state
    yield gauge("torchpool_ready", "1 when the pool is started and every worker is ready, else 0.",
                lambda p: 1 if p["ready"] else 0)
    restarts = CounterMetricFamily("torchpool_worker_restarts", "Worker respawns since the pool started.",
                                   labels=["model"])
    for model, part in models:
        restarts.add_metric([model], sum(w["restarts"] for w in part["workers"]))
    yield restarts
    streams = CounterMetricFamily("torchpool_streams", "Streams started (model.stream).", labels=["model"])
    chunks = CounterMetricFamily("torchpool_stream_chunks", "Chunks streams delivered.", labels=["model"])
    for model, part in models:
        streams.add_metric([model], part["metrics"]["streams"])
        chunks.add_metric([model], part["metrics"]["stream_chunks"])
    yield streams
    yield chunks
    def counter(name: str, doc: str, key: str) -> Any:
        family = CounterMetricFamily(name, doc, labels=["model"])
        for model, part in models:
            # cast: a TypedDict's get() with a key not known to the checker; a snapshot without it counts 0
            family.add_metric([model], cast("Mapping[str, float]", part["metrics"]).get(key, 0))
        return family

    yield counter("torchpool_batch_padding_rows", "Rows added to batches to reach a batch bucket "
                  "(TORCHPOOL_BATCH_BUCKETS).", "batch_padding_rows")
    yield counter("torchpool_batch_split_calls", "Calls a batch left for the next one, which ran more rows "
                  "per second without them (TORCHPOOL_SPLIT_BATCHES).", "batch_split_calls")
    yield counter("torchpool_worker_busy_seconds", "Seconds the workers spent on calls: from sending each "
                  "job to its answer, a worker's jobs in turn counted once; rate / ready workers is "
                  "their busy share.", "worker_busy_seconds")
    yield gauge("torchpool_streams_open", "Streams running now.", lambda p: p["metrics"]["streams_open"])
    yield gauge("torchpool_shared_memory_bytes", "Bytes of shared-memory arenas mapped by the pool.",
                lambda p: p["arena_bytes"])
    yield from _version_families(models)


def _version_families(models: list[tuple[str, ModelStatus]]) -> Iterator[Any]:
    """The model versions (Note [Rolling reload]), of the backends that report them."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    versioned = [(model, part) for model, part in models if "version" in part]
    generation = GaugeMetricFamily("torchpool_model_generation", "The model version serving (1 at start, "
                                   "+1 per reload).", labels=["model"])
    info = GaugeMetricFamily("torchpool_model_info", "1, labelled with the version serving.",
                             labels=["model", "generation", "version", "sha256"])
    reloading = GaugeMetricFamily("torchpool_reloading", "1 while a reload runs.", labels=["model"])
    reloads = CounterMetricFamily("torchpool_reloads", "Reloads that ended, by outcome (ok, failed).",
                                  labels=["model", "outcome"])
    for model, part in versioned:
        version = part["version"]
        generation.add_metric([model], version["generation"])
        info.add_metric([model, str(version["generation"]), version["version"] or "",
                         version["sha256"] or ""], 1)
        reloading.add_metric([model], 1 if part.get("reloading") else 0)
        for outcome, count in part.get("reloads", {}).items():
            reloads.add_metric([model, outcome], count)
    yield from (generation, info, reloading, reloads)
