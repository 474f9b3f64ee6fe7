"""Top-level callables the benchmarks send to other processes, importable by name in every child.

``identity_factory`` is the ``TORCHPOOL_MODEL`` of the transport benchmark; ``identity`` and
``echo_queue`` are what the baselines run in their worker process; ``sleepy_factory`` is the model of
the chaos and overload benchmarks. They live here, not in the
benchmark script, so that pickling them refers to ``benchmarks.models`` rather than ``__main__``.

``WORKLOADS`` are the models of the HTTP benchmark (``benchmarks/http.py``): every server it compares
builds them from the same factories, with the same weights.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

if TYPE_CHECKING:
    from multiprocessing.queues import Queue

T = TypeVar("T")


def identity_factory() -> torch.nn.Module:
    """Return ``torch.nn.Identity()``: the model that measures transport alone."""
    return torch.nn.Identity()


def identity(value: T) -> T:
    """Return ``value`` unchanged (the ProcessPoolExecutor baseline's task)."""
    return value


def echo_queue(inbox: Queue, outbox: Queue) -> None:
    """Put every item from ``inbox`` on ``outbox`` until a ``None`` arrives (the queue baseline)."""
    while True:
        item = inbox.get()
        if item is None:
            return
        outbox.put(item)


class Sleepy(torch.nn.Module):
    """``x + 1`` after sleeping ``ms`` milliseconds: a model whose cost per call is known exactly and
    that leaves the CPU to the web process and the clients (the chaos and overload benchmarks)."""

    def forward(self, x: torch.Tensor, ms: float = 0.0) -> torch.Tensor:
        if ms > 0:
            time.sleep(ms / 1000.0)
        return x + 1


def sleepy_factory() -> torch.nn.Module:
    """Return a :class:`Sleepy` model."""
    return Sleepy()


# -- the HTTP benchmark's workloads (benchmarks/http.py) --------------------------------------------
#
# Every factory builds its weights from a fixed seed, inside ``fork_rng`` so that building a model
# leaves the caller's random state alone: every server and every worker holds the same numbers.

MIB = 1 << 20


def _seeded(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def convnet_factory() -> torch.nn.Module:
    """A compute-bound conv net: 3x96x96 in, 10 logits out, about 10 ms a sample on one core."""

    def build() -> torch.nn.Module:
        nn = torch.nn
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
        )

    return _seeded(build)


def wide_mlp_factory() -> torch.nn.Module:
    """A memory-bound MLP, 2560 -> 8192 -> 2560: 168 MB of float32 weights (the performance issue's
    "wide MLP"), read whole by every forward pass, so a batch of 16 costs little more than a single
    sample."""

    def build() -> torch.nn.Module:
        nn = torch.nn
        return nn.Sequential(nn.Linear(2560, 8192), nn.ReLU(), nn.Linear(8192, 2560))

    return _seeded(build)


class Checksum(torch.nn.Module):
    """The 16 MiB payload's model: reads every input element and answers one number per row, so the
    benchmark measures moving the request's tensor to the model, not compute or a 16 MiB answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=1, keepdim=True)


def checksum_factory() -> torch.nn.Module:
    """Return :class:`Checksum` (no weights)."""
    return Checksum().eval()


def tiny_factory() -> torch.nn.Module:
    """A tiny MLP, 256 -> 512 -> 512 -> 10 (1.6 MB of weights, well under 0.1 ms a sample on one
    core): almost nothing to compute, so what a server costs per request decides its rate."""

    def build() -> torch.nn.Module:
        nn = torch.nn
        return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10))

    return _seeded(build)


@dataclass(frozen=True)
class Workload:
    """One model of the HTTP benchmark and what a request to it carries (one sample, float32)."""

    name: str
    factory: str  # "module:callable", importable in every process
    sample_shape: tuple[int, ...]  # one request's tensor is (1, *sample_shape)
    description: str

    @property
    def body_bytes(self) -> int:
        return 4 * math.prod(self.sample_shape)

    def build(self) -> torch.nn.Module:
        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(module), name)()

    def body(self) -> bytes:
        """The request body every server gets: raw float32 bytes of one sample, from a fixed seed."""
        generator = torch.Generator().manual_seed(1234)
        return torch.randn((1, *self.sample_shape), generator=generator).numpy().tobytes()


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("conv", "benchmarks.models:convnet_factory", (3, 96, 96),
                 "compute-bound conv net, 5 conv layers, 2.2 MB of weights, ~9-10 ms a sample on one core"),
        Workload("wide-mlp", "benchmarks.models:wide_mlp_factory", (2560,),
                 "memory-bound MLP 2560-8192-2560, 168 MB of weights, batchable"),
        Workload("payload-16m", "benchmarks.models:checksum_factory", (4 * MIB,),
                 "16 MiB float32 body -> sum of the row (one number back)"),
        Workload("tiny", "benchmarks.models:tiny_factory", (256,),
                 "tiny MLP 256-512-512-10, under 0.1 ms a sample on one core"),
    )
}


class _Chunks(torch.nn.Module):
    """``forward(n, size)``: yields ``n`` float32 tensors of ``size`` elements (the streaming benchmark's
    transport-only generator)."""

    def forward(self, n: int, size: int = 1) -> Iterator[torch.Tensor]:
        for i in range(n):
            yield torch.full((size,), float(i))


def chunks_factory() -> torch.nn.Module:
    """The generator that measures streaming overhead alone (``benchmarks/streaming.py``)."""
    return _Chunks()
