"""What Python's cyclic garbage collector costs the web process per call, and the pauses it makes.

    python -m benchmarks.gc_pauses [--calls 10000] [--timeout 1] [--mode embedded|attach]

One caller sends ``--calls`` calls of 4 KiB, one after the other, to one worker running
``torch.nn.Identity``: through an embedded pool (``TorchPool(app)``), or attached to a pool server in
this process over the direct lanes (``--mode attach``). ``TORCHPOOL_TIMEOUT`` is ``--timeout`` seconds
(short, so that the run is many times the window in which a finished call's deadline is still ahead:
Note [Finished deadlines] in ``flask_torchpool/deadlines.py``). It prints the median, 99.9th percentile
and worst round trip, the CPU per call of this process (every thread: the caller, the pool's manager
or the lanes' reader, in attach mode the pool server's threads too), and, from ``gc.callbacks``, the
collections of each generation during the timed calls, the objects they freed and the collector's time
per call.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable

import torch
from flask import Flask

from flask_torchpool import TorchPool

MODEL = "benchmarks.models:identity_factory"


def _timed(call: Callable[[], Any], calls: int) -> None:
    stats: dict[int, list[float]] = {}
    started = [0.0]

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        row = stats.setdefault(info["generation"], [0, 0.0, 0])
        row[0] += 1
        row[1] += time.perf_counter() - started[0]
        row[2] += info["collected"]

    for _ in range(500):  # warm up
        call()
    gc.collect()
    latencies = []
    gc.callbacks.append(watch)
    cpu = time.process_time()
    try:
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            latencies.append(time.perf_counter() - t0)
    finally:
        gc.callbacks.remove(watch)
    cpu = time.process_time() - cpu
    latencies.sort()
    print(f"{calls} calls: median {latencies[calls // 2] * 1e6:.0f} us, p99.9 "
          f"{latencies[int(calls * 0.999)] * 1e3:.2f} ms, worst {latencies[-1] * 1e3:.1f} ms")
    total = sum(row[1] for row in stats.values())
    for generation, (count, seconds, freed) in sorted(stats.items()):
        print(f"  generation {generation}: {int(count)} collections, {seconds * 1e3:.1f} ms, {int(freed)} "
              "objects freed")
    print(f"  collector time per call: {total / calls * 1e6:.1f} us; CPU per call of this process (every "
          f"thread): {cpu / calls * 1e6:.0f} us")


@contextlib.contextmanager
def identity_pool(timeout: float) -> Iterator[dict[str, Any]]:
    """The pools of an app with one ``torch.nn.Identity`` worker, shut down on leaving."""
    app = Flask("benchmarks")
    app.config.update(TORCHPOOL_MODEL=MODEL, TORCHPOOL_WORKERS=1, TORCHPOOL_TIMEOUT=timeout,
                      TORCHPOOL_HANDLE_SIGTERM=False, TORCHPOOL_HANDLE_SIGHUP=False)
    TorchPool(app)
    pools = app.extensions["torchpool"].start()
    try:
        yield pools
    finally:
        for pool in pools.values():
            pool.shutdown(drain_timeout=1)


@contextlib.contextmanager
def attached(pools: dict[str, Any]) -> Iterator[Any]:
    """A pool server in this process for *pools*, and a web process's connection to it (with lanes)."""
    from flask_torchpool.attach.client import PoolConnection
    from flask_torchpool.attach.server import PoolServer

    with tempfile.TemporaryDirectory() as run:
        server = PoolServer(pools, os.path.join(run, "pool.sock"), default_model="default")
        server.start()
        conn = PoolConnection(server.path, 1 << 20)
        try:
            conn.connect()
            yield conn
        finally:
            conn.close()
            server.stop(drain_timeout=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--mode", choices=("embedded", "attach"), default="embedded")
    args = parser.parse_args()
    x = torch.randn(1, 1024)
    with identity_pool(args.timeout) as pools:
        if args.mode == "embedded":
            pool = pools["default"]
            _timed(lambda: pool.submit((x,), {}).result(30), args.calls)
            return
        with attached(pools) as conn:
            _timed(lambda: conn.submit(None, (x,), {}, args.timeout, False, 1 << 20).result(30), args.calls)


if __name__ == "__main__":
    main()
