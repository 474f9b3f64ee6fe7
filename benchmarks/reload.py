"""Rolling reload under HTTP load: throughput, p99, failed calls and memory before and during a reload.

    python benchmarks/reload.py [--workers W] [--threads T] [--seconds S] [--surge N] [--mb MB]

A Werkzeug threaded server on 127.0.0.1 (in this process) serves ``POST /v`` through ``@pool.infer``; the
model is a module written to a temporary directory whose answer is its version and which holds MB MiB
of weights (shared between the workers, ``TORCHPOOL_SHARE_WEIGHTS``). T client threads call it without
pause. The run measures S seconds of steady state, then writes version 2 and calls ``pool.reload()``
(``TORCHPOOL_RELOAD_SURGE`` = N, a warm-up call with ``TORCHPOOL_EXAMPLE_INPUT``), then S more seconds.
A sampler reads the PSS (``/proc/PID/smaps_rollup``) of every process below this one (workers and fork
servers) every 20 ms. It prints, for "before", "during" (from ``reload()`` to its return, which is when
the last old worker has stopped) and "after": calls/s, p50 and p99 latency, failed calls, the peak and
median PSS of the pool's processes, and the ratios during/before.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "benchmarks"]
sys.path.insert(0, str(REPO_ROOT))

_MODEL = '''\
import torch
from torch import nn

VERSION = {version}


class Versioned(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full(({floats},), float(VERSION)), requires_grad=False)

    def forward(self, x):
        return x * 0 + self.weight[0]


def build():
    return Versioned()
'''


def _write_model(directory: Path, version: int, mb: int) -> None:
    (directory / "bench_reload_model.py").write_text(_MODEL.format(version=version, floats=mb * (1 << 18)))
    shutil.rmtree(directory / "__pycache__", ignore_errors=True)


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--surge", type=int, default=1)
    parser.add_argument("--mb", type=int, default=64, help="MiB of weights per model version")
    args = parser.parse_args()

    import requests
    import torch
    from flask import Flask, request
    from werkzeug.serving import make_server

    from flask_torchpool import TorchPool

    directory = Path(tempfile.mkdtemp(prefix="torchpool-reload-bench-"))
    _write_model(directory, 1, args.mb)
    sys.path.insert(0, str(directory))
    app = Flask("reload-bench")
    app.config.update(TORCHPOOL_MODEL="bench_reload_model:build", TORCHPOOL_WORKERS=args.workers,
                      TORCHPOOL_DEVICES="cpu", TORCHPOOL_ARENA_BYTES=8 << 20,
                      TORCHPOOL_RELOAD_SURGE=args.surge,
                      TORCHPOOL_EXAMPLE_INPUT=(torch.zeros(3),), TORCHPOOL_HANDLE_SIGTERM=False,
                      TORCHPOOL_HANDLE_SIGHUP=False)
    pool = TorchPool(app)

    @app.post("/v")
    @pool.infer
    def predict(model: Any) -> Any:
        return {"y": model(torch.tensor(request.get_json()["x"])).tolist()}

    pool.start(app=app)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/v"

    stop = threading.Event()
    lock = threading.Lock()
    calls: list[tuple[float, float, bool, float]] = []   # (sent, latency, ok, version)

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = session.post(url, json={"x": [0.0, 0.0]}, timeout=120)
                    ok, version = r.status_code == 200, (r.json()["y"][0] if r.status_code == 200 else -1.0)
                except requests.RequestException:
                    ok, version = False, -1.0
                with lock:
                    calls.append((sent, time.monotonic() - sent, ok, version))

    pss: list[tuple[float, int]] = []

    def sampler() -> None:
        me = os.getpid()
        while not stop.is_set():
            pids = _children(me)
            pss.append((time.monotonic(), sum(_pss_kib(p) for p in pids)))
            stop.wait(0.02)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.threads)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    for t in threads:
        t.start()
    time.sleep(1.0)   # warm the connections before measuring (a benchmark, not a test)
    begin = time.monotonic()
    time.sleep(args.seconds)
    _write_model(directory, 2, args.mb)
    reload_start = time.monotonic()
    pool.reload(app=app)
    reload_end = time.monotonic()
    time.sleep(args.seconds)
    end = time.monotonic()
    stop.set()
    for t in threads:
        t.join(130)
    pool.shutdown(app=app)
    server.shutdown()
    shutil.rmtree(directory, ignore_errors=True)

    phases = {"before": (begin, reload_start), "during": (reload_start, reload_end),
              "after": (reload_end, end)}
    rows = []
    for name, (lo, hi) in phases.items():
        done = [c for c in calls if lo <= c[0] < hi]
        ok = [c[1] for c in done if c[2]]
        mem = [kib for t, kib in pss if lo <= t < hi]
        rows.append((name, hi - lo, len(ok) / max(hi - lo, 1e-9), _quantile(ok, 0.5) * 1000,
                     _quantile(ok, 0.99) * 1000, sum(1 for c in done if not c[2]),
                     max(mem, default=0) / 1024, statistics.median(mem) / 1024 if mem else 0.0))
    print(f"workers={args.workers} threads={args.threads} surge={args.surge} weights={args.mb} MiB/version")
    print(f"{'phase':8} {'seconds':>8} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} "
          f"{'peak PSS MiB':>13} {'median PSS MiB':>15}")
    for row in rows:
        print(f"{row[0]:8} {row[1]:8.2f} {row[2]:9.1f} {row[3]:8.2f} {row[4]:8.2f} {row[5]:7d} "
              f"{row[6]:13.1f} {row[7]:15.1f}")
    before, during, after = rows
    print(f"during/before: calls/s x{during[2] / before[2]:.2f}, p99 x{during[4] / before[4]:.2f}, "
          f"peak PSS x{during[6] / before[7]:.2f} of steady; after/before peak PSS "
          f"x{after[6] / before[6]:.2f}")
    print(f"reload() to last old worker stopped: {reload_end - reload_start:.2f}s; "
          f"failed calls in all: {sum(1 for c in calls if not c[2])}; "
          f"answers after reload() returned from version 1: "
          f"{sum(1 for c in calls if c[0] > reload_end and c[3] == 1.0)}")
    return 0 if all(c[2] for c in calls) else 1


if __name__ == "__main__":
    sys.exit(main())
