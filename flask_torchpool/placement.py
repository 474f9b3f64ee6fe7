"""Placement: which CPU cores and which device each worker gets. Computed in one place.

On CPU the usable cores (``os.sched_getaffinity``) are split into disjoint, contiguous sets, one per
worker, and each worker runs ``len(cores)`` intra-op threads (or ``TORCHPOOL_THREADS_PER_WORKER``) and one
inter-op thread, so N workers never oversubscribe the machine. On GPUs workers go round-robin over the
devices (several workers per GPU are allowed); the cores are still split so that each worker's
pre/post-processing threads stay off its neighbours' cores. With several models
(``TORCHPOOL_MODELS``) the cores are split across the workers of every model together, and each model's
workers go over its own devices. The plan is logged at start and exposed as ``TorchPool.plan``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import NamedTuple

from .config import DEFAULT_MODEL, PoolConfig
from .errors import ConfigError


class Placement(NamedTuple):
    """Where one worker runs."""

    worker: int
    device: str
    cores: tuple[int, ...]
    threads: int
    model: str = DEFAULT_MODEL

    def describe(self) -> str:
        model = "" if self.model == DEFAULT_MODEL else f"model {self.model} "
        return (f"{model}worker {self.worker}: device={self.device} cores={_ranges(self.cores)} "
                f"threads={self.threads}")


#: ``TORCHPOOL_WORKER_NICE="auto"`` behind gunicorn sync workers: each web process waits for its call, so
#: a niced worker is only preempted by the process it answers, in the middle of answering it.
SYNC_WEB_NICE = 0
#: ``TORCHPOOL_WORKER_NICE="auto"`` behind any other web tier (threads, or not known): the web tier first.
THREADED_WEB_NICE = 10


def worker_nice(config: PoolConfig, sync_web: bool = False) -> int:
    """The workers' nice value: ``TORCHPOOL_WORKER_NICE``, ``"auto"`` resolved for a web tier of gunicorn
    sync workers (*sync_web*) or any other."""
    if config.worker_nice == "auto":
        return SYNC_WEB_NICE if sync_web else THREADED_WEB_NICE
    return int(config.worker_nice)


def usable_cores() -> list[int]:
    """The cores this process may run on, sorted."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))  # pragma: no cover - not Linux


#: Present on a host with a GPU driver (NVIDIA's, or ROCm's for AMD GPUs, which torch.cuda also drives).
GPU_DRIVER_PATHS = ("/proc/driver/nvidia/gpus", "/dev/nvidiactl", "/dev/kfd")


def cuda_device_count() -> int:
    """Number of CUDA devices, 0 without CUDA. ``torch.cuda.device_count()`` creates no CUDA context
    in the web process (one would break a later fork). On a host without a GPU driver this is 0 without
    importing torch, which a pool server or web process that only moves numpy arrays never loads
    (Note [A pool server without torch] in :mod:`flask_torchpool.codec`)."""
    if "torch" not in sys.modules and not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return 0
    try:
        import torch

        if not torch.backends.cuda.is_built():  # type: ignore[no-untyped-call]
            return 0
        return int(torch.cuda.device_count())
    except Exception:  # pragma: no cover - broken driver installs
        return 0


def resolve_devices(config: PoolConfig, gpu_count: int | None = None) -> list[str]:
    """The concrete device list: ``'auto'`` and ``'cuda'`` expanded to every visible GPU."""
    if gpu_count is None:
        gpu_count = cuda_device_count() if config.devices != ("cpu",) else 0
    if config.devices == "auto":
        return [f"cuda:{i}" for i in range(gpu_count)] or ["cpu"]
    devices: list[str] = []
    for device in config.devices:
        if device == "cuda":
            devices.extend(f"cuda:{i}" for i in range(gpu_count))
        else:
            devices.append(device)
    return devices


def auto_workers(devices: list[str], cores: list[int]) -> int:
    """``TORCHPOOL_WORKERS='auto'``: one per GPU; on CPU one per core up to 4 cores, then 4 workers up
    to 16 cores, then one per 4 cores (each worker runs its share of the cores as torch threads)."""
    if devices != ["cpu"]:
        return len(devices)
    return min(len(cores), max(4, len(cores) // 4))


def plan(config: PoolConfig, *, cores: list[int] | None = None,
         gpu_count: int | None = None) -> list[Placement]:
    """Compute the placement of every worker of one model, alone on the cores. Pure: starts nothing,
    touches no device."""
    return plan_models({config.name: config}, cores=cores, gpu_count=gpu_count)


def plan_models(configs: Mapping[str, PoolConfig], *, cores: list[int] | None = None,
                gpu_count: int | None = None) -> list[Placement]:
    """Compute the placement of every worker of every model, in model order, each model's workers
    numbered from 0. The cores are split across all the workers; each model's workers go round-robin
    over its own devices. Models whose ``workers`` is ``"auto"`` on CPU share the automatic count: each
    gets an equal part of it, at least 1. Pure: starts nothing, touches no device."""
    cores = usable_cores() if cores is None else sorted(cores)
    devices = {name: _devices(config, gpu_count) for name, config in configs.items()}
    auto_cpu = [name for name, config in configs.items()
                if not isinstance(config.workers, int) and devices[name] == ["cpu"]]
    counts = {}
    for name, config in configs.items():
        if isinstance(config.workers, int):
            counts[name] = config.workers
        elif devices[name] != ["cpu"]:
            counts[name] = auto_workers(devices[name], cores)
        else:
            counts[name] = max(1, auto_workers(["cpu"], cores) // len(auto_cpu))
    core_sets = iter(split_cores(cores, sum(counts.values())))
    placements = []
    for name, config in configs.items():
        for i in range(counts[name]):
            core_set = next(core_sets)
            placements.append(Placement(worker=i, device=devices[name][i % len(devices[name])],
                                        cores=core_set, threads=config.threads_per_worker or len(core_set),
                                        model=name))
    return placements


def _devices(config: PoolConfig, gpu_count: int | None) -> list[str]:
    """The concrete devices of one model, checked against the visible GPUs."""
    devices = resolve_devices(config, gpu_count)
    key = config.key("devices")
    if not devices:
        raise ConfigError(key, f"{config.devices!r} names CUDA devices, but none is visible; use 'cpu' or "
                               "'auto'")
    if gpu_count is not None or config.devices not in ("auto", ("cpu",)):
        visible = gpu_count if gpu_count is not None else cuda_device_count()
        for device in devices:
            if device.startswith("cuda:") and int(device[5:]) >= visible:
                raise ConfigError(key, f"{device} does not exist: {visible} CUDA device(s) visible")
    return devices


def split_cores(cores: list[int], n: int) -> list[tuple[int, ...]]:
    """Split *cores* into *n* disjoint contiguous sets as even as possible; with more workers than
    cores, workers share single cores round-robin."""
    if n >= len(cores):
        return [(cores[i % len(cores)],) for i in range(n)]
    base, extra = divmod(len(cores), n)
    sets, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        sets.append(tuple(cores[start:start + size]))
        start += size
    return sets


def _ranges(cores: tuple[int, ...]) -> str:
    parts: list[str] = []
    for core in cores:
        if parts and "-" not in parts[-1].split(",")[-1] and int(parts[-1]) == core - 1:
            parts[-1] = f"{parts[-1]}-{core}"
        elif parts and "-" in parts[-1] and int(parts[-1].split("-")[1]) == core - 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{core}"
        else:
            parts.append(str(core))
    return ",".join(parts)
