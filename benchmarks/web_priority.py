"""Light-route latency while the model route is saturated, by ``TORCHPOOL_WORKER_NICE`` (issue 12, "the
web tier first").

A Flask app (Werkzeug's threaded server, in its own process) with an embedded pool of the compute-bound
conv net (``benchmarks.models:convnet_factory``, about 10 ms a sample on one core), one worker per
core. Clients: ``--saturate`` threads POST to ``/predict`` back to back (keep-alive), which keeps every
worker busy; one more thread sends ``GET /ping`` (no model) ``--rate`` times a second and records its
latency. Every nice value runs in each round, in turn, so that all see the same machine load; the
report is the median over rounds of each value's p50 / p99 ping latency and /predict throughput.

    python -m benchmarks.web_priority --nice 0 10 19 --rounds 3 --seconds 10
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any


def serve(port: int, nice: int) -> None:
    from flask import Flask, request

    from flask_torchpool import TorchPool

    app = Flask("web_priority")
    app.config.update(TORCHPOOL_MODEL="benchmarks.models:convnet_factory", TORCHPOOL_DEVICES="cpu",
                      TORCHPOOL_WORKER_NICE=nice, TORCHPOOL_ARENA_BYTES=32 << 20)
    pool = TorchPool(app)

    @app.post("/predict")
    def predict() -> Any:
        import torch

        n = int(request.args.get("n", "1"))
        out = pool(torch.zeros(n, 3, 96, 96))
        return {"argmax": out.argmax(1).tolist()}

    @app.get("/ping")
    def ping() -> Any:
        return "pong"

    with app.app_context():
        pool.start()
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", port, app, threaded=True)
    print("ready", flush=True)
    server.serve_forever()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(nice: int, seconds: float, saturate: int, rate: float) -> dict[str, float]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.web_priority", "--serve", str(port),
                             "--nice", str(nice)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        stop = threading.Event()
        done = [0]

        def saturator() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            while not stop.is_set():
                conn.request("POST", "/predict?n=1", body=b"")
                conn.getresponse().read()
                done[0] += 1

        threads = [threading.Thread(target=saturator, daemon=True) for _ in range(saturate)]
        for t in threads:
            t.start()
        time.sleep(1.0)   # warm up: workers busy
        latencies = []
        conn = http.client.HTTPConnection("127.0.0.1", port)
        start_done, t_end = done[0], time.monotonic() + seconds
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            conn.request("GET", "/ping")
            conn.getresponse().read()
            latencies.append(time.perf_counter() - t0)
            time.sleep(max(0.0, 1.0 / rate - (time.perf_counter() - t0)))
        throughput = (done[0] - start_done) / seconds
        stop.set()
        for t in threads:
            t.join(10)
    finally:
        proc.terminate()
        proc.wait(30)
    latencies.sort()
    return {"p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "max_ms": 1000 * latencies[-1], "predict_rps": throughput}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nice", type=int, nargs="+", default=[0, 10, 19])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--saturate", type=int, default=4, help="POST client threads")
    parser.add_argument("--rate", type=float, default=20.0, help="pings a second")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.nice[0])
        return
    results: dict[int, list[dict[str, float]]] = {n: [] for n in args.nice}
    for _ in range(args.rounds):
        for nice in args.nice:
            results[nice].append(measure(nice, args.seconds, args.saturate, args.rate))
            print(f"  nice {nice}: {results[nice][-1]}", file=sys.stderr, flush=True)
    print(f"{os.cpu_count()} CPUs; medians of {args.rounds} rounds of {args.seconds:g} s")
    for nice, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"TORCHPOOL_WORKER_NICE={nice:2d}: ping p50 {med['p50_ms']:.1f} ms, "
              f"p99 {med['p99_ms']:.1f} ms, max {med['max_ms']:.0f} ms; "
              f"/predict {med['predict_rps']:.0f} req/s")


if __name__ == "__main__":
    main()
