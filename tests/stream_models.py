"""Models that yield, for the streaming tests (tests/test_streaming.py)."""

from __future__ import annotations

import os

import torch
from torch import nn


def _touch(path: str | None, text: str) -> None:
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


class Counter(nn.Module):
    """``forward(n, ...)`` yields ``tensor([i])`` for i < n. Options (keyword arguments):

    * ``log``: a file each step appends to ("made i" before yielding chunk i, "finally" when closed), so a
      test sees how far the generator ran and that its ``finally`` ran;
    * ``gate``: a FIFO (tests.conftest.Gate) opened before yielding chunk ``gate_at``;
    * ``fail_at``: raise ValueError instead of yielding chunk ``fail_at``;
    * ``die_at``: ``os._exit(9)`` instead of yielding chunk ``die_at``;
    * ``size``: each chunk is ``size`` bytes (uint8) instead of one int64;
    * ``hang_at``: block for ever (reading a FIFO nobody opens) before chunk ``hang_at``, ignoring Cancel.
    """

    def forward(self, n, log=None, gate=None, gate_at=-1, fail_at=-1, die_at=-1, size=0, hang_at=-1):
        return self._gen(int(n), log, gate, gate_at, fail_at, die_at, size, hang_at)

    def _gen(self, n, log, gate, gate_at, fail_at, die_at, size, hang_at):
        try:
            for i in range(n):
                if i == gate_at and gate:
                    with open(gate, "rb") as f:
                        f.read()
                if i == hang_at and gate:
                    with open(gate, "rb") as f:  # nobody opens it: stuck
                        f.read()
                if i == fail_at:
                    raise ValueError(f"bad token at step {i}")
                if i == die_at:
                    os._exit(9)
                _touch(log, f"made {i}")
                yield torch.full((size,), i % 256, dtype=torch.uint8) if size else torch.tensor([i])
        finally:
            _touch(log, "finally")

    def generate(self, prefix: str, n: int = 3):
        """A second method: yields strings."""
        for i in range(n):
            yield f"{prefix}{i}"

    def pid(self):
        return os.getpid()

    def rows(self, x):
        """Yields ``2 * row`` for each row of *x*, on *x*'s device (a CUDA worker's inputs are there)."""
        for row in x:
            yield row * 2

    def note(self, path: str, text: str, gate: str | None = None):
        """A plain method: append "start <text>", wait at *gate* if given, append "end <text>"."""
        _touch(path, f"start {text}")
        if gate:
            with open(gate, "rb") as f:
                f.read()
        _touch(path, f"end {text}")
        return text


def counter():
    return Counter()
