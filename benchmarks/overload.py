"""Overload run: offered load at many times capacity over real HTTP; the queue stays bounded, the
excess is shed at once with 503 + ``Retry-After``, and the web process's memory stays flat.

    python benchmarks/overload.py [--duration 30] [--threads 48] [--workers 2] [--ms 20]
                                  [--max-queue 8] [--sample-every 3]

It starts the same server as ``benchmarks/chaos.py`` (Werkzeug's threaded server on 127.0.0.1 in a
subprocess, ``@pool.infer`` calling ``benchmarks.models:sleepy_factory``) with W workers, a model that
takes MS milliseconds a call (so capacity is W * 1000 / MS calls/s), ``TORCHPOOL_MAX_QUEUE`` small and
``TORCHPOOL_RETRY_AFTER=1``. T client threads then call it in a loop for DURATION seconds, each with its
own ``requests.Session``, and send the next call as soon as the last one is answered (an overloaded
answer is not a reason to slow down here: this is the worst case).

It prints the calls served (200), shed (503 ``PoolOverloadedError`` with ``Retry-After``) and anything
else, the p50/p99 latency of the served and of the shed calls, and a table of the web process's RSS,
descriptors, threads and queue length sampled every few seconds. It exits 0 when calls were both served
and shed, every 503 carried ``Retry-After``, nothing else came back, the queue never exceeded
``TORCHPOOL_MAX_QUEUE`` and the RSS grew by at most 16 MiB after the first sample.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# `python benchmarks/X.py` puts benchmarks/ first on sys.path, not the repository root; and benchmarks/
# holds modules named like standard ones (http.py) that must not shadow them: swap the one for the other.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "benchmarks"]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import requests  # noqa: E402

from benchmarks.chaos import (  # noqa: E402
    children,
    load_average,
    open_fds,
    percentile,
    report_bars,
    rss_mib,
    server_running,
    stop_server,
    thread_count,
    wait_ready,
)

RSS_GROWTH_LIMIT_MIB = 16.0


@dataclass
class Results:
    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    served: list[float] = field(default_factory=list)
    shed: list[float] = field(default_factory=list)


def client(url: str, ms: float, stop_at: float, results: Results, client_timeout: float) -> None:
    served: list[float] = []
    shed: list[float] = []
    outcomes: collections.Counter[str] = collections.Counter()
    with requests.Session() as session:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                resp = session.post(url, json={"x": [1.0, 2.0, 3.0, 4.0], "ms": ms}, timeout=client_timeout)
            except requests.Timeout:
                outcomes["hung"] += 1
                continue
            except requests.RequestException as exc:
                outcomes[f"connection error ({type(exc).__name__})"] += 1
                continue
            took = time.perf_counter() - started
            if resp.status_code == 200 and resp.json().get("y") == [2.0, 3.0, 4.0, 5.0]:
                outcomes["served"] += 1
                served.append(took)
                continue
            try:
                kind = resp.json().get("type", "?")
            except ValueError:
                kind = "non-JSON body"
            if resp.status_code == 503 and kind == "PoolOverloadedError":
                if resp.headers.get("Retry-After") == "1":
                    outcomes["shed"] += 1
                    shed.append(took)
                else:
                    outcomes["503 without Retry-After: 1"] += 1
            else:
                outcomes[f"{resp.status_code} {kind}"] += 1
    with results.lock:
        results.outcomes.update(outcomes)
        results.served.extend(served)
        results.shed.extend(shed)


def run(args: argparse.Namespace) -> int:
    config = {
        "TORCHPOOL_WORKERS": args.workers,
        "TORCHPOOL_MAX_QUEUE": args.max_queue,
        "TORCHPOOL_RETRY_AFTER": 1,
        "TORCHPOOL_TIMEOUT": 10.0,
        "TORCHPOOL_DRAIN_TIMEOUT": 10.0,
    }
    capacity = args.workers * 1000.0 / args.ms
    print(f"overload: {args.threads} client threads for {args.duration:g}s against {args.workers} "
          f"worker(s) of a {args.ms:g} ms model (capacity {capacity:.0f} calls/s); TORCHPOOL_MAX_QUEUE="
          f"{args.max_queue}, TORCHPOOL_RETRY_AFTER=1; load average {load_average()} on "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="torchpool-overload-") as tmp, \
            server_running(config, Path(tmp)) as server:
        if wait_ready(server, args.workers) is None:
            print(f"the workers did not become ready; server log:\n{server.log_tail()}")
            return 1
        results = Results()
        samples: list[tuple[float, float, int, int, int, int, int]] = []
        started = time.monotonic()
        stop_at = started + args.duration
        threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True,
                                    args=(server.url + "/infer", args.ms, stop_at, results, 30.0))
                   for i in range(args.threads)]
        for t in threads:
            t.start()
        max_queued = 0
        with requests.Session() as control:
            next_sample = started
            while any(t.is_alive() for t in threads):
                now = time.monotonic()
                if now >= next_sample:
                    status = server.status(control)
                    max_queued = max(max_queued, status["queued"])
                    counters = status["counters"]
                    samples.append((now - started, rss_mib(server.pid), sum(open_fds(server.pid).values()),
                                    thread_count(server.pid), status["queued"], counters.get("ok", 0),
                                    counters.get("overloaded", 0)))
                    next_sample += args.sample_every
                time.sleep(max(0.0, min(next_sample - time.monotonic(), 0.2)))
        elapsed = time.monotonic() - started
        # One more sample once the clients have gone.
        time.sleep(0.5)
        status = server.status()
        counters = status["counters"]
        samples.append((time.monotonic() - started, rss_mib(server.pid), sum(open_fds(server.pid).values()),
                        thread_count(server.pid), status["queued"], counters.get("ok", 0),
                        counters.get("overloaded", 0)))
        workers = {w["pid"] for w in status["workers"] if w["pid"]} | set(children(server.pid))
        code, took, left = stop_server(server, workers, timeout=30.0)

    out = results.outcomes
    served, shed = out.get("served", 0), out.get("shed", 0)
    other = sum(n for k, n in out.items() if k not in ("served", "shed"))
    total = served + shed + other
    print()
    rate = total / elapsed
    print(f"{total} calls in {elapsed:.1f}s: offered {rate:.0f}/s, {rate / capacity:.1f}x capacity")

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1e3:6.1f} ms"

    print(f"  served (200)                 {served:7d}  {served / elapsed:5.0f}/s  latency p50 "
          f"{ms(results.served, 0.5)}  p99 {ms(results.served, 0.99)}  max {ms(results.served, 1.0)}")
    print(f"  shed (503 + Retry-After: 1)  {shed:7d}  {shed / elapsed:5.0f}/s  latency p50 "
          f"{ms(results.shed, 0.5)}  p99 {ms(results.shed, 0.99)}  max {ms(results.shed, 1.0)}")
    others = {k: n for k, n in out.items() if k not in ("served", "shed")}
    print(f"  other                        {other:7d}  {others or ''}")
    print(f"  pool counters: {', '.join(f'{k} {v}' for k, v in counters.items())}")
    print()
    print("     t (s)   RSS (MiB)   fds   threads   queued   served   shed   (web process; pool counters)")
    for t, rss, fds, nthreads, queued, ok, overloaded in samples:
        print(f"  {t:8.1f}  {rss:10.1f}  {fds:4d}  {nthreads:8d}  {queued:7d}  {ok:7d}  {overloaded:5d}")
    growth = samples[-1][1] - samples[0][1]
    print(f"\nSIGTERM to the server: exit status {code} after {took:.2f}s; processes of it left: "
          f"{sorted(left) or 'none'}")
    bars = [
        ("calls served and calls shed", served > 0 and shed > 0, f"{served} served, {shed} shed"),
        ("nothing but 200 and 503 + Retry-After", other == 0, f"{other} other"),
        (f"queue <= TORCHPOOL_MAX_QUEUE={args.max_queue}", max_queued <= args.max_queue,
         f"longest seen {max_queued}"),
        (f"RSS growth <= {RSS_GROWTH_LIMIT_MIB:g} MiB", growth <= RSS_GROWTH_LIMIT_MIB,
         f"{growth:+.1f} MiB from the first sample to the last"),
        ("nothing outlives the server", not left and code is not None, f"left {sorted(left)}"),
    ]
    return report_bars(bars)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of overload (default 30)")
    parser.add_argument("--threads", type=int, default=48, help="client threads (default 48)")
    parser.add_argument("--workers", type=int, default=2, help="TORCHPOOL_WORKERS (default 2)")
    parser.add_argument("--ms", type=float, default=20.0, help="model time per call in ms (default 20)")
    parser.add_argument("--max-queue", type=int, default=8, help="TORCHPOOL_MAX_QUEUE (default 8)")
    parser.add_argument("--sample-every", type=float, default=3.0,
                        help="seconds between RSS samples (default 3)")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
