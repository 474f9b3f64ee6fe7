"""The light route's floor: how long ``GET /ping`` waits while ``/predict`` is saturated, with no model.

The HTTP benchmark's threaded servers (``gunicorn -k gthread -w 1 --threads 32``) quote the p99 of a
``GET /ping`` sent 20 times a second while wrk saturates ``/predict``. This runs the same web tier and
the same light client twice per round, in turn:

``floor``
    A torch-free Flask app whose ``/predict`` reads the body with ``request.get_data()`` and sleeps
    ``--sleep-ms`` with the GIL released (a model in another process, costing the web process nothing),
    then answers a small JSON document: what the web server and Flask alone make ``/ping`` wait.
``pool``
    The same app with an embedded pool (2 workers, batch 32, 2 ms delay, as ``torchpool-batch-numpy``)
    whose model sleeps ``--sleep-ms`` per batch in its worker: what flask_torchpool's path adds.

Each cell also reports the web process's CPU (every thread, from ``/proc/PID/stat``) per request,
the light client's included.

    python -m benchmarks.light_floor --rounds 2 --seconds 15
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flask import Flask, Response, request

from .peers import harness

SAMPLE = 2560  # floats in a request body (the wide MLP's sample: 10 KiB)


def sleeper() -> Any:
    """The ``pool`` setup's model: sleeps ``BENCH_SLEEP_MS`` per forward pass, returns 4 columns."""
    import torch

    seconds = float(os.environ.get("BENCH_SLEEP_MS", "25")) / 1000

    class Sleeper(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            time.sleep(seconds)
            return x[:, :4].clone()

    return Sleeper()


def create_app() -> Flask:
    """The app of both setups (``BENCH_POOL`` = ``1`` for the pool)."""
    import numpy as np

    app = Flask(__name__)
    seconds = float(os.environ.get("BENCH_SLEEP_MS", "25")) / 1000

    @app.get("/ping")
    def ping() -> Response:
        return Response("pong", mimetype="text/plain")

    def answer(out: Any) -> Response:
        return Response(json.dumps({"shape": list(out.shape), "head": out.ravel()[:4].tolist()}),
                        mimetype="application/json")

    if os.environ.get("BENCH_POOL") == "1":
        from flask_torchpool import ModelProxy, TorchPool

        app.config.update(TORCHPOOL_MODEL="benchmarks.light_floor:sleeper", TORCHPOOL_DEVICES="cpu",
                          TORCHPOOL_WORKERS=2, TORCHPOOL_THREADS_PER_WORKER=1,
                          TORCHPOOL_MAX_BATCH_SIZE=32, TORCHPOOL_MAX_BATCH_DELAY_MS=2.0)
        pool = TorchPool(app)

        @app.post("/predict")
        @pool.infer
        def predict(model: ModelProxy) -> Response:
            return answer(model(model.tensor_from_stream(request.stream, np.float32, (1, SAMPLE))))
    else:
        @app.post("/predict")
        def predict_floor() -> Response:
            x = np.frombuffer(request.get_data(), np.float32).reshape(1, SAMPLE)
            time.sleep(seconds)
            return answer(x[:, :4])

    return app


def measure(setup: str, args: argparse.Namespace, script: Path) -> dict[str, float]:
    port = harness._free_port()
    env = harness._child_env(BENCH_SLEEP_MS=str(args.sleep_ms), BENCH_POOL="1" if setup == "pool" else "0")
    argv = [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", str(args.threads),
            "-b", f"127.0.0.1:{port}", "--timeout", "120", "benchmarks.light_floor:create_app()"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            harness._wait_ready(proc, port, "/ping", Path(os.devnull))
            harness._wrk(port, script, args.concurrency, 2)  # warm-up: workers, imports, batches
            # gunicorn's one worker: the web process (and the pool's); its CPU, every thread
            web = next(p for p in harness._proc_table().values() if p.ppid == proc.pid)
            with harness._light_client(port, True) as light:
                summary = harness._wrk(port, script, args.concurrency, args.seconds)
            web_cpu = (harness._proc_table()[web.pid].own - web.own) / harness.CLK_TCK
        finally:
            harness._stop(proc, signal.SIGTERM)
    result = light.result
    assert result is not None
    requests = summary["requests"] + result.samples
    return {"rps": summary["requests"] / (summary["duration_us"] / 1e6), "p50": result.p50_ms,
            "p99": result.p99_ms, "max": result.max_ms, "pings": result.samples,
            "web_us": web_cpu / requests * 1e6}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sleep-ms", type=float, default=25.0, help="the stand-in model's time (25 ms)")
    parser.add_argument("--concurrency", type=int, default=16, help="wrk connections on /predict (16)")
    parser.add_argument("--threads", type=int, default=32, help="gunicorn gthread threads (32)")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.bin"
        body.write_bytes(bytes(4 * SAMPLE))
        script = harness._wrk_script(Path(tmp), body)
        print(f"gunicorn -k gthread -w 1 --threads {args.threads}, wrk c={args.concurrency} on /predict, "
              f"GET /ping 20/s; {args.seconds} s a cell\n")
        print("| round | setup | /predict req/s | web process CPU us/req | /ping p50 ms | p99 ms | max ms "
              "| pings |\n|---:|---|---:|---:|---:|---:|---:|---:|")
        p99s: dict[str, list[float]] = {"floor": [], "pool": []}
        for r in range(1, args.rounds + 1):
            for setup in ("floor", "pool"):
                m = measure(setup, args, script)
                p99s[setup].append(m["p99"])
                print(f"| {r} | {setup} | {m['rps']:,.1f} | {m['web_us']:,.0f} | {m['p50']:.1f} "
                      f"| {m['p99']:.1f} | {m['max']:.1f} | {m['pings']:.0f} |", flush=True)
    print(f"\nmedian /ping p99: floor {statistics.median(p99s['floor']):.1f} ms, "
          f"pool {statistics.median(p99s['pool']):.1f} ms")


if __name__ == "__main__":
    main()
