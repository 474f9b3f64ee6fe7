"""Metrics: counters and histograms kept in the web process, snapshot for status and Prometheus.

The supervisor records every accepted call, every retry, every finished call (outcome, latency, time spent
queued) and every batch (rows) here: this is the one place calls are counted (the status counters are
derived from it, :func:`flask_torchpool.status.counters`). Everything is collected in the web process,
where calls start and end, so exporting needs no multiprocess-mode tricks: the worker processes hold no
metrics at all. Gauges (queue depth, busy workers, restarts, shared-memory bytes) are read from the pool's
state when a snapshot is taken.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from concurrent.futures import CancelledError
from typing import Any, TypedDict

#: Seconds: from 0.5 ms to 60 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: Outcomes a call can end with (the ``outcome`` label).
OUTCOMES = ("ok", "model_error", "output_error", "invalid_input", "timeout", "crashed", "overloaded",
            "closed", "startup_failed", "cancelled")


class HistogramSnapshot(TypedDict):
    buckets: list[float]
    cumulative: list[int]    # Prometheus-style cumulative counts, the last one +Inf
    sum: float
    count: int


class MetricsSnapshot(TypedDict):
    """What :meth:`Metrics.snapshot` returns (JSON-ready)."""

    model: str | None
    submitted: int                       # calls accepted
    retries: int                         # calls run again after their worker died
    calls: dict[str, int]                # finished calls by outcome (OUTCOMES)
    latency_seconds: HistogramSnapshot
    queue_seconds: HistogramSnapshot
    batch_rows: HistogramSnapshot
    batch_calls: HistogramSnapshot
    batch_padding_rows: int              # rows added to batches to reach a bucket (TORCHPOOL_BATCH_BUCKETS)
    batch_split_calls: int               # calls a batch left for the next one (TORCHPOOL_SPLIT_BATCHES)
    worker_busy_seconds: float           # workers' time from sending each job to its answer, all added
    latency_quantiles: dict[str, float | None]
    streams: int                         # streams started (model.stream)
    streams_open: int                    # of those, not ended yet
    stream_chunks: int                   # chunks delivered to streams' callers
    first_chunk_seconds: HistogramSnapshot  # from a stream's start to its first chunk


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics) with quantile estimates."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """Estimate by linear interpolation inside the bucket (None when empty)."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if seen + n >= rank and n:
                lo = self.buckets[i - 1] if i > 0 else 0.0
                hi = self.buckets[i] if i < len(self.buckets) else self.buckets[-1]
                return lo + (hi - lo) * ((rank - seen) / n)
            seen += n
        return self.buckets[-1]

    def snapshot(self) -> HistogramSnapshot:
        cumulative, total = [], 0
        for n in self.counts:
            total += n
            cumulative.append(total)
        return HistogramSnapshot(buckets=list(self.buckets), cumulative=cumulative, sum=self.sum,
                                 count=self.count)


class Metrics:
    """Thread-safe call metrics of one pool (one model)."""

    def __init__(self, model: str = "default") -> None:
        self.model = model
        self._lock = threading.Lock()
        self.submitted = 0
        self.retries = 0
        self.calls = dict.fromkeys(OUTCOMES, 0)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.queue_time = Histogram(LATENCY_BUCKETS)
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.batch_calls = Histogram(BATCH_BUCKETS)
        self.batch_padding_rows = 0
        self.batch_split_calls = 0
        self.worker_busy_seconds = 0.0
        # worker -> when it last answered (record_answer); weak, so that a slot a reload replaced goes
        self._answered: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()
        self.streams = 0
        self.streams_open = 0
        self.stream_chunks = 0
        self.first_chunk = Histogram(LATENCY_BUCKETS)

    def record_submit(self) -> None:
        """A call was accepted (queued or placed)."""
        with self._lock:
            self.submitted += 1

    def record_retry(self) -> None:
        """A call whose worker died is run again."""
        with self._lock:
            self.retries += 1

    def record_call(self, outcome: str, latency: float | None = None,
                    queue_time: float | None = None) -> None:
        with self._lock:
            self.calls[outcome] = self.calls.get(outcome, 0) + 1
            if latency is not None:
                self.latency.observe(latency)
            if queue_time is not None:
                self.queue_time.observe(queue_time)

    def record_batch(self, rows: int, calls: int, padded: int = 0) -> None:
        """A batch of *rows* callers' rows in *calls* calls was sent, with *padded* rows more (Note
        [Batch buckets])."""
        with self._lock:
            self.batch_rows.observe(rows)
            self.batch_calls.observe(calls)
            self.batch_padding_rows += padded

    def record_split(self, calls: int) -> None:
        """A batch left *calls* calls for the next one (Note [Batch splitting])."""
        with self._lock:
            self.batch_split_calls += calls

    def record_answer(self, worker: object, sent_at: float) -> float:
        """*worker* answered a job sent at *sent_at* (``time.monotonic()``); returns the seconds since.
        The worker was busy from then, or from its answer before (it runs its jobs in turn), to now."""
        now = time.monotonic()
        with self._lock:
            self.worker_busy_seconds += max(0.0, now - max(sent_at, self._answered.get(worker, 0.0)))
            self._answered[worker] = now
        return now - sent_at

    def record_stream(self, change: int) -> None:
        """A stream started (+1) or ended (-1)."""
        with self._lock:
            self.streams += change > 0
            self.streams_open += change

    def record_chunk(self, first_after: float | None = None) -> None:
        """A stream's chunk arrived; *first_after*: seconds since the stream started, for its first."""
        with self._lock:
            self.stream_chunks += 1
            if first_after is not None:
                self.first_chunk.observe(first_after)

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            return MetricsSnapshot(
                model=self.model, submitted=self.submitted, retries=self.retries, calls=dict(self.calls),
                latency_seconds=self.latency.snapshot(), queue_seconds=self.queue_time.snapshot(),
                batch_rows=self.batch_rows.snapshot(), batch_calls=self.batch_calls.snapshot(),
                batch_padding_rows=self.batch_padding_rows, batch_split_calls=self.batch_split_calls,
                worker_busy_seconds=self.worker_busy_seconds,
                latency_quantiles=_quantiles(self.latency),
                streams=self.streams, streams_open=self.streams_open, stream_chunks=self.stream_chunks,
                first_chunk_seconds=self.first_chunk.snapshot())


def merge(snapshots: list[MetricsSnapshot], model: str | None = None) -> MetricsSnapshot:
    """One snapshot of several pools' metrics (several models), their counts added up; the quantiles
    are estimated from the added latency histograms. *model* becomes its ``model``."""
    calls: dict[str, int] = {}
    for snapshot in snapshots:
        for outcome, n in snapshot["calls"].items():
            calls[outcome] = calls.get(outcome, 0) + n
    merged: dict[str, Any] = {"model": model, "calls": calls,
                              "submitted": sum(s.get("submitted", 0) for s in snapshots),
                              "retries": sum(s.get("retries", 0) for s in snapshots)}
    for key in ("streams", "streams_open", "stream_chunks", "batch_padding_rows", "batch_split_calls",
                "worker_busy_seconds"):
        merged[key] = sum(s.get(key, 0) for s in snapshots)
    for key in ("latency_seconds", "queue_seconds", "batch_rows", "batch_calls", "first_chunk_seconds"):
        parts = [snapshot[key] for snapshot in snapshots]  # type: ignore[literal-required]
        merged[key] = {"buckets": list(parts[0]["buckets"]),
                       "cumulative": [sum(column) for column in zip(*(p["cumulative"] for p in parts))],
                       "sum": sum(p["sum"] for p in parts), "count": sum(p["count"] for p in parts)}
    latency = Histogram(tuple(merged["latency_seconds"]["buckets"]))
    cumulative = merged["latency_seconds"]["cumulative"]
    latency.counts = [n - (cumulative[i - 1] if i else 0) for i, n in enumerate(cumulative)]
    latency.count = merged["latency_seconds"]["count"]
    merged["latency_quantiles"] = _quantiles(latency)
    result: MetricsSnapshot = MetricsSnapshot(**merged)  # type: ignore[typeddict-item]
    return result


def _quantiles(histogram: Histogram) -> dict[str, float | None]:
    return {str(q): histogram.quantile(q) for q in (0.5, 0.9, 0.99)}


def outcome_of(exc: BaseException | None) -> str:
    """The ``outcome`` label for a call that ended with *exc* (None: success)."""
    from . import errors

    if exc is None:
        return "ok"
    if isinstance(exc, CancelledError):
        return "cancelled"
    for cls, name in ((errors.OutputError, "output_error"), (errors.InferenceError, "model_error"),
                      (errors.InferenceTimeoutError, "timeout"), (errors.WorkerCrashedError, "crashed"),
                      (errors.PoolOverloadedError, "overloaded"), (errors.PoolClosedError, "closed"),
                      (errors.InvalidInputError, "invalid_input"),
                      (errors.WorkerStartupError, "startup_failed")):
        if isinstance(exc, cls):
            return name
    return "model_error"
