"""Tuning: measure the app's model under load for a sweep of worker counts and batch sizes.

``flask torchpool tune`` (see :mod:`flask_torchpool.cli`) runs, for every (workers, max batch size) pair,
a fresh :class:`~flask_torchpool.pool.Pool` built from one model's configuration (the default model's, or
``--model``'s) with those two values changed, alone on the cores; a fixed number of client threads call
it with ``TORCHPOOL_EXAMPLE_INPUT`` for a few seconds after a warm-up, and the calls' throughput and
latency are recorded. One pool runs at a time, so the measurements do not compete for the cores. The
recommendation is the pair with the lowest 99th percentile latency among those within 5% of the best
throughput (in rows per second).

``--buckets`` also times one call at every row count from 1 to the largest batch size (one worker, no
batching; the example input's first row repeated) and suggests ``TORCHPOOL_BATCH_BUCKETS``: the row
counts that no larger count runs within 5% of (Note [Suggested buckets]).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import PoolConfig
from .config import example_args as example_args
from .errors import TorchPoolError
from .placement import plan as compute_plan
from .placement import resolve_devices, usable_cores
from .pool import Pool

#: Results within this share of the best throughput count as equally fast.
THROUGHPUT_TOLERANCE = 0.05

#: ``--buckets``: a row count is padded up to a larger one that takes at most this much longer.
BUCKET_TOLERANCE = 0.05

# Note [Suggested buckets]
# ~~~~~~~~~~~~~~~~~~~~~~~~
# A batch padded up to a bucket costs what the bucket's size costs, so padding n rows up to m pays when m
# rows take no longer than n (MKL runs 2 or 3 rows of a wide Linear as that many matrix-vector products,
# each as slow as one row, and 4 or more as one matrix product: docs/benchmarks.rst, "Batch buckets").
# The suggestion keeps the row counts n that every larger count takes more than (1 + BUCKET_TOLERANCE)
# times as long as; any other n has a larger count about as cheap, and its batches are padded up to the
# next kept one. The largest measured count is always kept. The curve is timed through a real pool, one
# call at a time with batching off, so each time includes one call's transport (a fraction of a
# millisecond, the same at every count): a model much faster than that has a flat curve, and the
# suggestion then pads everything to the largest count, which costs it nothing measurable either.


@dataclass
class TuneResult:
    """The measurements of one (workers, batch size) pair."""

    workers: int
    batch_size: int
    rows_per_call: int
    seconds: float
    latencies: list[float] = field(repr=False)
    errors: int = 0
    error: str | None = None  # the pool could not start or every call failed

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def calls_per_second(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.calls_per_second * self.rows_per_call

    def latency(self, q: float) -> float | None:
        """The *q* quantile of the call latency in seconds (nearest rank), None without calls."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    def as_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "batch_size": self.batch_size, "calls": self.calls,
                "errors": self.errors, "seconds": self.seconds, "calls_per_second": self.calls_per_second,
                "rows_per_second": self.rows_per_second, "p50_seconds": self.latency(0.5),
                "p99_seconds": self.latency(0.99), "error": self.error}


def rows_per_call(args: tuple[Any, ...]) -> int:
    """Rows (dim 0) of the first tensor argument: what a batch counts; 1 without a tensor."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return int(arg.shape[0]) if arg.dim() else 1
    return 1


def default_workers(config: PoolConfig) -> list[int]:
    """1, 2, 4, ... up to the number of usable cores (and that number); on GPUs, 1 and 2 per device."""
    devices = resolve_devices(config)
    if devices != ["cpu"]:
        return [len(devices), 2 * len(devices)]
    cores = len(usable_cores())
    counts = [n for n in (2 ** i for i in range(8)) if n <= cores]
    return sorted(set(counts) | {cores})


def default_batch_sizes(rows: int, has_tensor: bool) -> list[int]:
    """No batching, and batches of about 4 and 16 calls, when the input has a batch dimension."""
    return [1, 4 * rows, 16 * rows] if has_tensor else [1]


def measure(config: PoolConfig, workers: int, batch_size: int, args: tuple[Any, ...], *,
            concurrency: int, duration: float, warmup: float) -> TuneResult:
    """Start a pool of *workers* with ``TORCHPOOL_MAX_BATCH_SIZE=batch_size``, drive it with
    *concurrency* client threads for *warmup* then *duration* seconds, stop it."""
    cfg = dataclasses.replace(config, workers=workers, max_batch_size=batch_size,
                              max_queue=max(config.max_queue, concurrency))
    result = TuneResult(workers, batch_size, rows_per_call(args), 0.0, [])
    pool = Pool(cfg, compute_plan(cfg), name=f"torchpool-tune[w={workers},b={batch_size}]")
    try:
        pool.start()
        _drive(pool, args, concurrency, warmup)
        begin = time.perf_counter()
        result.latencies, result.errors, result.error = _drive(pool, args, concurrency, duration)
        result.seconds = time.perf_counter() - begin
    except TorchPoolError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        pool.shutdown(wait=True, drain_timeout=5.0)
    return result


def _drive(pool: Pool, args: tuple[Any, ...], concurrency: int,
           duration: float) -> tuple[list[float], int, str | None]:
    deadline = time.monotonic() + duration

    def client() -> tuple[list[float], int, str | None]:
        latencies: list[float] = []
        errors, last = 0, None
        while time.monotonic() < deadline:
            begin = time.perf_counter()
            try:
                pool.submit(args, {}, None).result()
            except TorchPoolError as exc:
                errors, last = errors + 1, f"{type(exc).__name__}: {exc}"
                continue
            latencies.append(time.perf_counter() - begin)
        return latencies, errors, last

    with ThreadPoolExecutor(concurrency, thread_name_prefix="torchpool-tune") as executor:
        outcomes = [f.result() for f in [executor.submit(client) for _ in range(concurrency)]]
    latencies = [x for lat, _, _ in outcomes for x in lat]
    errors = sum(n for _, n, _ in outcomes)
    error = next((e for _, _, e in outcomes if e), None) if not latencies else None
    return latencies, errors, error


def recommend(results: Iterable[TuneResult]) -> TuneResult | None:
    """The lowest p99 latency among the results within 5% of the best throughput."""
    ok = [r for r in results if r.error is None and r.calls]
    if not ok:
        return None
    best = max(r.rows_per_second for r in ok)
    fast = [r for r in ok if r.rows_per_second >= (1 - THROUGHPUT_TOLERANCE) * best]
    return min(fast, key=lambda r: (r.latency(0.99) or 0.0, r.workers, r.batch_size))


class CurveError(Exception):
    """A call of the ``--buckets`` curve failed: the model does not take that many rows."""

    def __init__(self, rows: int, error: TorchPoolError) -> None:
        super().__init__(f"a call of {rows} row(s) failed: {type(error).__name__}: {error}")
        self.rows = rows


def curve_args(args: tuple[Any, ...], rows: int) -> tuple[Any, ...]:
    """The example input with *rows* rows: every tensor argument whose first dimension is the call's
    rows (:func:`rows_per_call`, what a batch stacks) becomes its first row repeated *rows* times;
    other arguments are unchanged."""
    n = rows_per_call(args)
    return tuple(a[:1].expand(rows, *a.shape[1:]).contiguous()
                 if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a for a in args)


def batch_curve(config: PoolConfig, args: tuple[Any, ...], max_rows: int, *, repeats: int = 9,
                warmup: int = 2) -> dict[int, float]:
    """Median seconds of one call of ``1..max_rows`` rows (:func:`curve_args`): one worker, batching
    off, one call at a time, *warmup* untimed calls at each count first. Raises :class:`CurveError` for
    the first row count whose call fails, :class:`TorchPoolError` when the pool does not start."""
    cfg = dataclasses.replace(config, workers=1, max_batch_size=1, batch_buckets=(),
                              max_queue=max(config.max_queue, 1))
    pool = Pool(cfg, compute_plan(cfg), name="torchpool-tune[curve]")
    out: dict[int, float] = {}
    try:
        pool.start()
        for rows in range(1, max_rows + 1):
            call = curve_args(args, rows)
            times = []
            try:
                for _ in range(warmup):
                    pool.submit(call, {}, None).result()
                for _ in range(repeats):
                    begin = time.perf_counter()
                    pool.submit(call, {}, None).result()
                    times.append(time.perf_counter() - begin)
            except TorchPoolError as exc:
                raise CurveError(rows, exc) from exc
            out[rows] = statistics.median(times)
    finally:
        pool.shutdown(wait=True, drain_timeout=5.0)
    return out


def suggest_buckets(seconds: dict[int, float], tolerance: float = BUCKET_TOLERANCE) -> list[int]:
    """Note [Suggested buckets]: the row counts that every larger count of *seconds* takes more than
    ``1 + tolerance`` times as long as."""
    sizes = sorted(seconds)
    return [n for n in sizes if all(seconds[m] > seconds[n] * (1 + tolerance) for m in sizes if m > n)]


def plot(results: list[TuneResult], path: str) -> None:
    """Write a PNG: throughput and p99 latency against the worker count, one line per batch size.
    The plotted series are also stored as JSON in the PNG's ``Description`` text chunk."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    series: dict[str, dict[str, list[Any]]] = {}
    for r in sorted(results, key=lambda r: (r.batch_size, r.workers)):
        if r.error is not None or not r.calls:
            continue
        s = series.setdefault(f"batch {r.batch_size}", {"workers": [], "rows_per_second": [],
                                                         "p99_ms": []})
        s["workers"].append(r.workers)
        s["rows_per_second"].append(round(r.rows_per_second, 3))
        s["p99_ms"].append(round((r.latency(0.99) or 0.0) * 1000, 3))
    figure = Figure(figsize=(10, 4), layout="constrained")
    throughput, latency = figure.subplots(1, 2)
    for label, s in series.items():
        throughput.plot(s["workers"], s["rows_per_second"], marker="o", label=label)
        latency.plot(s["workers"], s["p99_ms"], marker="o", label=label)
    throughput.set(title="Throughput", xlabel="workers", ylabel="rows / s")
    latency.set(title="p99 latency", xlabel="workers", ylabel="ms")
    for axes in (throughput, latency):
        axes.set_xticks(sorted({r.workers for r in results}))
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.savefig(path, format="png", dpi=100,
                   metadata={"Title": "flask torchpool tune", "Description": json.dumps(series)})
