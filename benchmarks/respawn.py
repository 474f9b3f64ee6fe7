"""Crash-to-serving time and memory of a small pool, per start method (issue 12, "one copy of torch").

For each start method (``TORCHPOOL_START_METHOD``), in one run and alternating, so that both see the same
load: start a 2-worker pool of ``tests.models:echo`` (1 torch thread each), SIGKILL worker 0 and time
until a call *on that slot* is served again (the other worker is busy waiting at a gate, so the call
cannot go elsewhere); repeat, and report the median. Then the PSS of the web process, its workers and
the fork server (the sum of ``Pss`` in ``/proc/PID/smaps_rollup``), after one call each.

    python -m benchmarks.respawn --repeats 5
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time
from typing import Any

from flask import Flask

from flask_torchpool import TorchPool, TorchPoolError


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.add(int(entry))
            except OSError:
                pass
    return found


def measure(method: str, repeats: int) -> dict[str, Any]:
    app = Flask("respawn")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_WORKERS=2, TORCHPOOL_DEVICES="cpu",
                      TORCHPOOL_ARENA_BYTES=32 << 20, TORCHPOOL_HANDLE_SIGTERM=False,
                      TORCHPOOL_START_METHOD=method, TORCHPOOL_RETRIES=0, TORCHPOOL_MAX_RESTARTS=1000,
                      # each crash is the first in its window: the backoff is 0.1 s every time
                      TORCHPOOL_RESTART_WINDOW=0.5)
    t0 = time.perf_counter()
    pool = TorchPool(app)
    with app.app_context():
        pool.start()
        ready = time.perf_counter() - t0
        import torch

        for _ in range(4):
            pool(torch.ones(4))
        procs = {os.getpid()} | _children(os.getpid())
        pss = {p: _pss_kib(p) for p in procs}
        times = []
        for _ in range(repeats):
            pids = [w["pid"] for w in pool.status()["models"]["default"]["workers"]]
            victim, other = pids
            os.kill(victim, signal.SIGKILL)
            t = time.perf_counter()
            # Until a call is served by slot 0's new process (calls that reach the dying one fail).
            while True:
                try:
                    pid = pool(action="pid")
                except TorchPoolError:
                    continue
                if pid not in (victim, other):
                    break
            times.append(time.perf_counter() - t)
            time.sleep(0.7)
    pool.shutdown(app=app)
    return {"method": method, "start_s": ready, "respawn_s": times, "pss_mib": sum(pss.values()) / 1024,
            "pss_by_process": {p: round(v / 1024) for p, v in pss.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"spawn": [], "forkserver": []}
    for _ in range(args.rounds):
        for method in ("spawn", "forkserver"):
            results[method].append(measure(method, args.repeats))
    for method, runs in results.items():
        respawn = [t for r in runs for t in r["respawn_s"]]
        print(f"{method:10s} first start {statistics.median(r['start_s'] for r in runs):.2f} s   "
              f"crash->serving median {statistics.median(respawn) * 1000:.0f} ms "
              f"(min {min(respawn) * 1000:.0f}, max {max(respawn) * 1000:.0f}, n={len(respawn)})   "
              f"PSS web+workers(+fork server) {statistics.median(r['pss_mib'] for r in runs):.0f} MiB "
              f"{runs[-1]['pss_by_process']}")


if __name__ == "__main__":
    main()
