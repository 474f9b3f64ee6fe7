"""Per-call overhead and throughput of the Ray backend against the process backend, on this machine.

    python benchmarks/ray_backend.py [--calls N] [--seconds S] [--threads N]

One run, the same model and the same load on both backends, one worker each (``TORCHPOOL_WORKERS=1``;
the Ray actor asks for ``num_cpus=1`` on a local Ray started here with ``ray.init(num_cpus=2)``):

overhead
    the median and p90 round trip of sequential calls through ``pool.submit(x).result()`` to
    ``torch.nn.Identity`` (``benchmarks.models:identity_factory``), for a 4 KiB and a 1 MiB float32 tensor
    (a fresh clone per call, made outside the timed region), batching off;
throughput
    calls per second of ``--threads`` threads calling ``tiny_factory`` (a 256 -> 512 -> 512 -> 10 MLP) with
    one row each for ``--seconds``, with batching off (``TORCHPOOL_MAX_BATCH_SIZE=1``) and on (8 rows,
    ``TORCHPOOL_MAX_BATCH_DELAY_MS=2``).

As a floor, the same sequential calls to a bare Ray actor (``actor.identity.remote(x)`` then ``ray.get``),
without flask_torchpool: what the Ray backend adds on top of Ray is the difference.

It prints one table and the ratios Ray / process measured in this run, then an *estimate* (not a
measurement: nothing here runs on a second machine) of what a remote node adds, from Ray's documented
behaviour: a task's arguments and return values under Ray's inline limit (100 KiB,
``max_direct_call_object_size``) travel inside the task's gRPC messages, so a remote actor adds one network
round trip per call; larger ones go through the object stores, pulled by the receiving node, which adds
their size over the link's bandwidth each way plus that pull's round trip.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

import torch

#: The network the remote estimate assumes: one round trip within a datacentre zone, and a 10 Gbit/s link.
ASSUMED_RTT_MS = 0.25
ASSUMED_BANDWIDTH = 10e9 / 8
INLINE_LIMIT = 100 * 1024


def make_pool(backend: str, model: str, **config: Any) -> tuple[Any, Any]:
    from flask import Flask

    from flask_torchpool import TorchPool

    app = Flask("bench")
    app.config.update(TORCHPOOL_MODEL=model, TORCHPOOL_WORKERS=1, TORCHPOOL_BACKEND=backend,
                      TORCHPOOL_DEVICES="cpu" if backend == "process" else "auto",
                      TORCHPOOL_HANDLE_SIGTERM=False, TORCHPOOL_ARENA_BYTES=64 << 20,
                      TORCHPOOL_RAY_ACTOR_OPTIONS={"num_cpus": 1} if backend == "ray" else None, **config)
    return app, TorchPool(app)


def overhead(backend: str, nbytes: int, calls: int) -> tuple[float, float]:
    """(median, p90) round trip in ms of sequential identity calls with a tensor of *nbytes*."""
    app, pool = make_pool(backend, "benchmarks.models:identity_factory")
    try:
        x = torch.rand(nbytes // 4)
        times = []
        with app.app_context():
            for i in range(calls + 20):
                fresh = x.clone()
                start = time.perf_counter()
                pool.submit(fresh).result()
                if i >= 20:  # warm-up
                    times.append(time.perf_counter() - start)
        times.sort()
        return statistics.median(times) * 1e3, times[int(len(times) * 0.9)] * 1e3
    finally:
        pool.shutdown(app=app)


def ray_floor(nbytes: int, calls: int) -> tuple[float, float]:
    """(median, p90) round trip in ms of a bare Ray actor's identity method, sequential calls."""
    import ray

    @ray.remote(num_cpus=1)
    class Identity:
        def identity(self, x: torch.Tensor) -> torch.Tensor:
            return x

    actor = Identity.remote()  # type: ignore[attr-defined]
    try:
        x = torch.rand(nbytes // 4)
        times = []
        for i in range(calls + 20):
            fresh = x.clone()
            start = time.perf_counter()
            ray.get(actor.identity.remote(fresh))
            if i >= 20:
                times.append(time.perf_counter() - start)
        times.sort()
        return statistics.median(times) * 1e3, times[int(len(times) * 0.9)] * 1e3
    finally:
        ray.kill(actor)


def throughput(backend: str, batch: int, threads: int, seconds: float) -> float:
    """Calls per second of *threads* threads calling the tiny MLP with one row each."""
    app, pool = make_pool(backend, "benchmarks.models:tiny_factory", TORCHPOOL_MAX_BATCH_SIZE=batch,
                          TORCHPOOL_MAX_BATCH_DELAY_MS=2.0, TORCHPOOL_PIPELINE_DEPTH=2)
    done = [0] * threads
    stop = threading.Event()

    def client(i: int) -> None:
        with app.app_context():
            x = torch.rand(1, 256)
            while not stop.is_set():
                pool.submit(x.clone()).result()
                done[i] += 1

    try:
        with app.app_context():
            for _ in range(20):
                pool.submit(torch.rand(1, 256)).result()
        workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        start = time.perf_counter()
        time.sleep(seconds)  # the measured interval (a benchmark, not a test)
        count = sum(done)
        elapsed = time.perf_counter() - start
        stop.set()
        for w in workers:
            w.join()
        return count / elapsed
    finally:
        pool.shutdown(app=app)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = []
        results: dict[tuple[str, str], float] = {}
        for nbytes, label in ((4096, "4 KiB"), (1 << 20, "1 MiB")):
            for backend in ("process", "ray"):
                p50, p90 = overhead(backend, nbytes, args.calls)
                results[(backend, f"overhead {label}")] = p50
                rows.append((f"round trip {label} (ms p50 / p90)", backend, f"{p50:.3f} / {p90:.3f}"))
            p50, p90 = ray_floor(nbytes, args.calls)
            results[("bare ray", f"overhead {label}")] = p50
            rows.append((f"round trip {label} (ms p50 / p90)", "bare ray", f"{p50:.3f} / {p90:.3f}"))
        for batch in (1, 8):
            for backend in ("process", "ray"):
                rate = throughput(backend, batch, args.threads, args.seconds)
                results[(backend, f"batch {batch}")] = rate
                rows.append((f"throughput, batch {batch} ({args.threads} threads, calls/s)", backend,
                             f"{rate:.0f}"))
    finally:
        ray.shutdown()
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'backend':<8}  value")
    for name, backend, value in rows:
        print(f"{name:<{width}}  {backend:<8}  {value}")
    print("\nray / process, this run:")
    for key in ("overhead 4 KiB", "overhead 1 MiB"):
        print(f"  {key} round trip: {results[('ray', key)] / results[('process', key)]:.1f}x "
              f"(bare Ray actor: {results[('bare ray', key)] / results[('process', key)]:.1f}x)")
    for key in ("batch 1", "batch 8"):
        print(f"  throughput {key}: {results[('ray', key)] / results[('process', key)]:.2f}x")
    print(f"\nESTIMATE (not measured) of a remote actor node, assuming a {ASSUMED_RTT_MS:g} ms round trip "
          f"and {ASSUMED_BANDWIDTH * 8 / 1e9:g} Gbit/s:")
    for nbytes, label in ((4096, "4 KiB"), (1 << 20, "1 MiB")):
        extra = ASSUMED_RTT_MS
        if nbytes > INLINE_LIMIT:  # pulled through the object stores, both ways (input and output)
            extra += 2 * (ASSUMED_RTT_MS + nbytes / ASSUMED_BANDWIDTH * 1e3)
        local = results[("ray", f"overhead {label}")]
        print(f"  {label}: + ~{extra:.2f} ms a call -> ~{local + extra:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
