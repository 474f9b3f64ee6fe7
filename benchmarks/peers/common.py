"""What every benchmarked server does the same way: pick the workload, decode the body, encode the answer.

The environment says what to serve (the benchmark sets it for each server subprocess)::

    BENCH_WORKLOAD       a name in benchmarks.models.WORKLOADS
    BENCH_TORCH_THREADS  torch intra-op threads of a process that runs the model in-process; unset: torch's
                         default (all cores)

A request body is one sample of the workload as raw float32 bytes; ``decode`` wraps it without copying
(``torch.frombuffer``) and shapes it ``(1, *sample_shape)``. The answer is the same small JSON document
everywhere: the output's shape and its first four values.
"""

from __future__ import annotations

import json
import os
import warnings

import torch

from benchmarks.models import WORKLOADS, Workload

# torch.frombuffer warns that the request's bytes are read-only; the models never write their input.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


class BadRequest(ValueError):
    """The body is not one sample of the workload."""


def workload() -> Workload:
    return WORKLOADS[os.environ["BENCH_WORKLOAD"]]


def apply_thread_setting() -> None:
    threads = os.environ.get("BENCH_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
        torch.set_num_interop_threads(1)


def decode(body: bytes, w: Workload) -> torch.Tensor:
    if len(body) != w.body_bytes:
        raise BadRequest(f"expected {w.body_bytes} bytes of float32, got {len(body)}")
    return torch.frombuffer(body, dtype=torch.float32).view(1, *w.sample_shape)


def encode(output: torch.Tensor) -> str:
    return json.dumps({"shape": list(output.shape), "head": output.flatten()[:4].tolist()})
