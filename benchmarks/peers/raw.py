"""The model alone, no HTTP: one of the N processes that measure the raw limit of a workload.

    python -m benchmarks.peers.raw --workload conv --core 0 --threads 1 --batch 1 --seconds 3

Builds the model, pins itself to ``--core``, warms up, prints ``ready`` and waits for a line on stdin
(so that the N processes start together), then calls the model on a ``(batch, *sample_shape)`` tensor
in a loop for ``--seconds`` and prints one JSON line: calls, samples, seconds and the median call in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from benchmarks.models import WORKLOADS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--core", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    w = WORKLOADS[args.workload]
    model = w.build()
    x = torch.randn((args.batch, *w.sample_shape), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        warm_until = time.perf_counter() + 0.5
        while time.perf_counter() < warm_until:
            model(x)
        print("ready", flush=True)
        sys.stdin.readline()
        durations = []
        start = time.perf_counter()
        end = start + args.seconds
        now = start
        while now < end:
            model(x)
            later = time.perf_counter()
            durations.append(later - now)
            now = later
    elapsed = now - start
    print(json.dumps({"calls": len(durations), "samples": len(durations) * args.batch, "seconds": elapsed,
                      "median_call_ms": statistics.median(durations) * 1e3}), flush=True)


if __name__ == "__main__":
    main()
