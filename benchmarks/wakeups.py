"""What a wake-up costs: the same exchange with both processes on one core and on two.

    python -m benchmarks.wakeups [--seconds 6] [--rounds 2]

Two measurements, each with the processes on one core (``same``) and on two (``split``), in turn:

``ping-pong``
    a forked child echoes 32 bytes over a socketpair, one round trip after the other: the floor of any
    call that crosses two processes.
``lane``
    one caller sends 4 KiB calls, one after the other, to one worker running ``torch.nn.Identity`` over a
    direct lane (a pool server in this process, as in ``benchmarks.gc_pauses --mode attach``).

For each it prints round trips per second and, per call, the CPU of each thread of this process (user and
system, from ``/proc/self/task``; the worker's from ``/proc/PID/stat``) and the context switches of this
process. On a virtual machine, waking a process on another (idle) core takes an interrupt through the
host; on the same core it is a context switch. Needs two usable cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .gc_pauses import attached, identity_pool

TICK = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[float, float]:
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def _threads() -> dict[str, tuple[float, float]]:
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[names.get(int(tid), f"thread {tid}")] = _stat(f"/proc/self/task/{tid}/stat")
        except OSError:
            pass
    return out


def _timed(call: Callable[[], Any], seconds: float, others: dict[str, int]) -> str:
    for _ in range(300):
        call()
    before, usage = _threads(), resource.getrusage(resource.RUSAGE_SELF)
    theirs = {name: _stat(f"/proc/{pid}/stat") for name, pid in others.items()}
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call()
        n += 1
    elapsed = time.perf_counter() - start
    after, usage2 = _threads(), resource.getrusage(resource.RUSAGE_SELF)
    parts = []
    for name, (user, system) in after.items():
        u0, s0 = before.get(name, (0.0, 0.0))
        if (user - u0) + (system - s0) > 0.005 * elapsed:
            parts.append(f"{name} {1e6 * (user - u0) / n:.0f}+{1e6 * (system - s0) / n:.0f}")
    for name, pid in others.items():
        user, system = _stat(f"/proc/{pid}/stat")
        u0, s0 = theirs[name]
        parts.append(f"{name} {1e6 * (user - u0) / n:.0f}+{1e6 * (system - s0) / n:.0f}")
    switches = (usage2.ru_nvcsw - usage.ru_nvcsw + usage2.ru_nivcsw - usage.ru_nivcsw) / n
    return (f"{n / elapsed:8.0f}/s  CPU us per call (user+system): {', '.join(parts)}; "
            f"{switches:.2f} context switches of this process")


def ping_pong(cores: tuple[int, int], seconds: float) -> str:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.sched_setaffinity(0, {cores[1]})
        ours.close()
        while data := theirs.recv(64):
            theirs.send(data)
        os._exit(0)
    theirs.close()
    os.sched_setaffinity(0, {cores[0]})

    def call() -> None:
        ours.send(b"x" * 32)
        ours.recv(64)

    try:
        return _timed(call, seconds, {"child": pid})
    finally:
        ours.close()
        os.waitpid(pid, 0)


def lane(cores: tuple[int, int], seconds: float) -> str:
    os.sched_setaffinity(0, {cores[1]})  # the worker is placed on the cores its pool may use
    x = torch.randn(1, 1024)
    with identity_pool(30.0) as pools:
        os.sched_setaffinity(0, {cores[0]})  # the caller (and the lane reader thread it starts)
        with attached(pools) as conn:
            worker = pools["default"].workers[0].pid
            return _timed(lambda: conn.submit(None, (x,), {}, 30.0, False, 1 << 20).result(30), seconds,
                          {"worker": worker})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        raise SystemExit("needs two usable cores")
    placements = {"same": (usable[0], usable[0]), "split": (usable[0], usable[1])}
    for r in range(1, args.rounds + 1):
        for name, run in (("ping-pong", ping_pong), ("lane", lane)):
            for placement, cores in placements.items():
                print(f"round {r} {name:9} {placement:5} {run(cores, args.seconds)}", flush=True)
                os.sched_setaffinity(0, usable)


if __name__ == "__main__":
    main()
