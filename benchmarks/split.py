"""Batch splitting (``TORCHPOOL_SPLIT_BATCHES``) on and off, in turn: callers in a closed loop, no HTTP.

    python -m benchmarks.split [--workload wide-mlp] [--concurrency 8] [--seconds 6] [--rounds 2]

An embedded pool of 2 workers (one torch thread each, ``TORCHPOOL_MAX_BATCH_SIZE`` 16, a 2 ms batch
delay, as ``torchpool-batch`` in ``benchmarks/http.py``) serves ``--concurrency`` threads of this process,
each calling the model with one row and calling again as soon as the answer is back, for ``--seconds``
after 2 s of warm-up. Per setting it prints rows per second, the mean rows of a batch and the calls the
batches put back (the ``batch_split_calls`` metric); with splitting on, also the time per batch size the
pool measured (milliseconds, and how many batches of that size ran).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import torch
from flask import Flask

from flask_torchpool import TorchPool

WORKLOADS = {"wide-mlp": ("benchmarks.models:wide_mlp_factory", (1, 2560)),
             "conv": ("benchmarks.models:convnet_factory", (1, 3, 96, 96))}


def run(workload: str, split: bool, concurrency: int, seconds: float) -> str:
    model, shape = WORKLOADS[workload]
    app = Flask("benchmarks.split")
    app.config.update(TORCHPOOL_MODEL=model, TORCHPOOL_WORKERS=2, TORCHPOOL_THREADS_PER_WORKER=1,
                      TORCHPOOL_MAX_BATCH_SIZE=16, TORCHPOOL_MAX_BATCH_DELAY_MS=2,
                      TORCHPOOL_SPLIT_BATCHES=split, TORCHPOOL_HANDLE_SIGTERM=False,
                      TORCHPOOL_HANDLE_SIGHUP=False)
    TorchPool(app)
    pools = app.extensions["torchpool"].start()
    pool = pools["default"]
    try:
        x = torch.randn(*shape)
        for _ in range(10):
            pool.submit((x,), {}).result(60)
        begin = time.monotonic() + 2.0
        end = begin + seconds
        counts = [0] * concurrency
        before: list[Any] = []

        def caller(i: int) -> None:
            while (now := time.monotonic()) < end:
                pool.submit((x,), {}).result(60)
                counts[i] += now >= begin

        def snapshot() -> None:
            time.sleep(max(0.0, begin - time.monotonic()))
            before.append(pool.metrics.snapshot())

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(concurrency)]
        threads.append(threading.Thread(target=snapshot))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = pool.metrics.snapshot()
        rows = after["batch_rows"]["sum"] - before[0]["batch_rows"]["sum"]
        batches = after["batch_rows"]["count"] - before[0]["batch_rows"]["count"]
        split_calls = after["batch_split_calls"] - before[0]["batch_split_calls"]
        line = (f"{workload} c={concurrency} split {'on ' if split else 'off'}: "
                f"{sum(counts) / seconds:7.1f} rows/s, {rows / max(1, batches):5.2f} rows a batch, "
                f"{split_calls} calls put back")
        costs = pool._sched.costs   # what the pool measured (not an API)
        if costs is not None:
            line += "; ms a batch by rows (batches): " + ", ".join(
                f"{n}: {1000 * t:.1f} ({costs._samples[n]})" for n, t in sorted(costs._seconds.items()))
        return line
    finally:
        for p in pools.values():
            p.shutdown(drain_timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="wide-mlp")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for split in (False, True):
            print(run(args.workload, split, args.concurrency, args.seconds), flush=True)


if __name__ == "__main__":
    main()
