"""Batch buckets (``TORCHPOOL_BATCH_BUCKETS``, Note [Batch buckets] in ``flask_torchpool/outputs.py``):
what a batch of each size costs the model, and what padding to buckets does to a pool's throughput.

1. The model alone, in this process on one torch thread: milliseconds per forward pass at every batch
   size from 1 to ``--max-batch``, and the buckets that curve suggests: the sizes that no larger size
   runs within ``--tolerance`` of (padding a batch up to a size that costs less than its own is free).
2. A pool of ``--workers`` (1 torch thread each) driven by ``--concurrency`` threads in a closed loop
   for ``--seconds``, with and without the buckets, alternating for ``--rounds``: calls/s and the mean
   batch (the callers' rows). No HTTP.

    python -m benchmarks.buckets --workload wide-mlp --workers 1 --concurrency 3
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
from flask import Flask

from flask_torchpool import TorchPool
from flask_torchpool.tune import suggest_buckets

from .models import WORKLOADS


def curve(workload: str, max_batch: int, repeats: int) -> dict[int, float]:
    """Median milliseconds of one forward pass of *workload*'s model at each batch size."""
    torch.set_num_threads(1)
    w = WORKLOADS[workload]
    model = w.build().eval()
    out: dict[int, float] = {}
    with torch.inference_mode():
        for rows in range(1, max_batch + 1):
            x = torch.randn(rows, *w.sample_shape)
            model(x)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t) * 1000)
            out[rows] = statistics.median(times)
    return out


def closed_loop(workload: str, workers: int, concurrency: int, max_batch: int, buckets: list[int] | None,
                seconds: float) -> tuple[float, float]:
    """(calls/s, mean batch rows) of a pool driven by *concurrency* threads, one row a call."""
    w = WORKLOADS[workload]
    app = Flask("buckets")
    app.config.update(TORCHPOOL_MODEL=w.factory, TORCHPOOL_WORKERS=workers, TORCHPOOL_DEVICES="cpu",
                      TORCHPOOL_THREADS_PER_WORKER=1, TORCHPOOL_MAX_BATCH_SIZE=max_batch,
                      TORCHPOOL_BATCH_BUCKETS=buckets, TORCHPOOL_HANDLE_SIGTERM=False)
    pool = TorchPool(app)
    x = torch.randn(1, *w.sample_shape)
    with app.app_context():
        pool.start()
        for _ in range(10):
            pool(x)
        before = pool.status()["metrics"]["batch_rows"]
        done = [0] * concurrency
        stop = time.monotonic() + seconds

        def loop(i: int) -> None:
            while time.monotonic() < stop:
                pool(x)
                done[i] += 1

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = pool.status()["metrics"]["batch_rows"]
    pool.shutdown(app=app)
    batches = after["count"] - before["count"]
    return sum(done) / seconds, (after["sum"] - before["sum"]) / max(1, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="wide-mlp", choices=sorted(WORKLOADS))
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15, help="forward passes timed per batch size")
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--buckets", default=None, help="e.g. 1,4,8,16 [default: the suggested ones]")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    ms = curve(args.workload, args.max_batch, args.repeats)
    print(f"## {args.workload}: the model alone, one torch thread\n")
    print("| rows | ms a batch | rows/s |\n|---:|---:|---:|")
    for rows, t in ms.items():
        print(f"| {rows} | {t:.1f} | {rows / t * 1000:,.0f} |")
    suggested = suggest_buckets(ms, args.tolerance)
    print(f"\nsuggested TORCHPOOL_BATCH_BUCKETS: {suggested}")
    buckets = [int(b) for b in args.buckets.split(",")] if args.buckets else suggested

    print(f"\n## a pool: {args.workers} worker(s), {args.concurrency} callers, one row a call, "
          f"TORCHPOOL_MAX_BATCH_SIZE={args.max_batch}\n")
    print("| round | buckets | calls/s | mean batch rows |\n|---:|---|---:|---:|")
    rates: dict[str, list[float]] = {"none": [], str(buckets): []}
    for r in range(1, args.rounds + 1):
        for b in (None, buckets):
            rate, mean_rows = closed_loop(args.workload, args.workers, args.concurrency, args.max_batch, b,
                                     args.seconds)
            rates["none" if b is None else str(buckets)].append(rate)
            print(f"| {r} | {b} | {rate:,.1f} | {mean_rows:.2f} |", flush=True)
    ratios = [padded / plain for padded, plain in zip(rates[str(buckets)], rates["none"])]
    print(f"\nwith buckets / without, per round: {', '.join(f'{x:.2f}x' for x in ratios)}")


if __name__ == "__main__":
    main()
