"""Tiny model factories for the tests (built in code, deterministic)."""

from __future__ import annotations

import gc
import os
import signal
import sys
import time

import torch
from torch import nn


class Echo(nn.Module):
    """Returns its inputs, with ``os.getpid()``; and misbehaves on request (for the crash tests)."""

    def forward(self, *args, **kwargs):
        action = kwargs.pop("action", None)
        if action == "raise":
            raise ValueError("bad shape: expected 4 features, got 3")
        if action == "exit":
            os._exit(7)
        if action == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if action == "sleep":
            time.sleep(kwargs.pop("seconds", 3600))
        if action == "spin":
            # Holds the GIL for `seconds` and records when it ran, in the worker.
            start = time.time()
            end = start + kwargs.pop("seconds")
            while time.time() < end:
                pass
            return {"pid": os.getpid(), "start": start, "end": time.time()}
        if action == "unpicklable":
            return object()
        if action == "big":
            return torch.ones(kwargs.pop("n"), dtype=torch.uint8)
        if action == "pid":
            return os.getpid()
        if action == "semaphore":
            # A named semaphore that multiprocessing registers with a resource tracker: the worker was
            # started without one (Note [No resource tracker]) and starts its own.
            import multiprocessing
            from multiprocessing import resource_tracker

            lock = multiprocessing.get_context("spawn").Lock()
            with lock:
                return {"pid": os.getpid(), "tracker": resource_tracker._resource_tracker._pid}
        if action == "process":  # what the worker inherited from a fork server (test_fast_start.py)
            return {"frozen": gc.get_freeze_count(),
                    "modules": sorted(m for m in sys.modules if m.startswith("flask_torchpool"))}
        if action == "cast":
            return args[0].to(getattr(torch, kwargs.pop("dtype")))
        if action == "yield":
            return self.count(kwargs.pop("n"))
        if len(args) == 1 and not kwargs:
            return args[0]
        return {"args": args, "kwargs": kwargs}

    def count(self, n, fail_at=-1, log=None):
        """Yields ``tensor([i])``, then ``{"i": i}`` (any output travels) for i < n; raises at *fail_at*;
        appends "finally" to *log* when closed (streams, issue 13)."""
        try:
            for i in range(n):
                if i == fail_at:
                    raise ValueError(f"bad token at step {i}")
                yield torch.tensor([i]) if i % 2 == 0 else {"i": i, "text": f"t{i}"}
        finally:
            if log:
                with open(log, "a") as f:
                    f.write("finally\n")


def echo():
    return Echo()


def linear():
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def failing():
    raise RuntimeError("the weights file is corrupt")


class Stepped(nn.Module):
    """Costs 40 ms for up to 4 rows and 120 ms for more (a model whose cost steps, for ``tune
    --buckets``); returns its input."""

    def forward(self, x):
        time.sleep(0.04 if x.shape[0] <= 4 else 0.12)
        return x


def stepped():
    return Stepped()


class TwoRows(nn.Module):
    """Refuses inputs of more than two rows; returns its input."""

    def forward(self, x):
        if x.shape[0] > 2:
            raise ValueError(f"at most 2 rows, got {x.shape[0]}")
        return x


def two_rows():
    return TwoRows()


def fail_in_worker_after_first():
    """Loads in the first incarnation of each worker, fails in respawns (marker file in env)."""
    marker = os.environ["TORCHPOOL_TEST_MARKER"]
    if os.path.exists(marker):
        raise RuntimeError("respawn refused by the test")
    open(marker, "w").close()
    return Echo()


def wait_at_gate(path):
    """Block until the test opens the gate: *path* is a FIFO (``tests.conftest.Gate``); opening it for
    reading waits for the test to open it for writing, and reading ends when the test closes it."""
    with open(path, "rb") as gate:
        gate.read()


class BatchProbe(nn.Module):
    """Adds 1 and reports the size of the batch each row ran in (for the batching tests); with
    ``action="gate", gate=PATH`` it holds its worker until the test opens the gate at PATH."""

    def forward(self, x=None, action=None, seconds=0.0, gate=None):
        if action == "sleep":
            time.sleep(seconds)
            return 0
        if action == "gate":
            wait_at_gate(gate)
            return 0
        if bool((x < 0).any()):
            raise ValueError("negative input in batch")
        if action == "bad_rows":
            return x[:1]
        return {"y": x + 1, "n": torch.full((x.shape[0],), x.shape[0]), "pid": os.getpid()}


def batch_probe():
    return BatchProbe()


class Staircase(nn.Module):
    """Adds 1, taking 20 ms for a batch of up to 2 rows and 30 ms a row for a larger one (a step up after
    2 rows, as MKL's curve for a wide Linear on one core has after 3; a sleep, so it uses no CPU). Every
    batch of more than 2 rows runs faster split, whatever sizes the pool has timed: with a flat step (3
    to 8 rows all as slow), a batch of 8 rows is as fast a row as two of 4, and none need be split."""

    def forward(self, x):
        time.sleep(0.02 if x.shape[0] <= 2 else 0.03 * x.shape[0])
        return x + 1


def staircase():
    return Staircase()


class BigLinear(nn.Module):
    """32 MiB of weights (plus a tied copy and a buffer), reporting the pid that ran it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4096, 2048)
        self.b = nn.Linear(2048, 4096)
        self.b.weight = nn.Parameter(self.a.weight.t().contiguous())
        self.tied = self.a  # the same module twice: its tensors must be shared once
        self.register_buffer("scale", torch.full((4096,), 0.5))

    def forward(self, x):
        return self.b(self.tied(x)) * self.scale, os.getpid()


def big_linear():
    return BigLinear()


def gated():
    """``linear()``, once the test lets it: loading blocks on the FIFO at ``$TORCHPOOL_TEST_GATE`` until
    the test opens it for writing and closes it (a model that is slow to load, without any sleep)."""
    with open(os.environ["TORCHPOOL_TEST_GATE"]) as gate:
        gate.read()
    return linear()


class Checksum(nn.Module):
    """What a body read into a tensor holds: its shape, dtype and the float64 sum of its elements."""

    def forward(self, x, add=0.0):
        if add:
            x.add_(add)  # a model that writes its input in place
        return {"shape": list(x.shape), "dtype": str(x.dtype), "sum": float(x.double().sum())}


def checksum():
    return Checksum()


class WhereIsMyInput(nn.Module):
    """The name of the mapping that holds the input's first byte (``/proc/self/maps``): a worker's arena,
    or a segment forwarded whole (``/memfd:torchpool-body``), and the float64 sum of the input."""

    def forward(self, x):
        address = x.data_ptr()
        name = "?"
        with open("/proc/self/maps") as maps:
            for line in maps:
                span, _, rest = line.partition(" ")
                low, high = (int(v, 16) for v in span.split("-"))
                if low <= address < high:
                    name = rest.split(None, 4)[4].strip() if len(rest.split(None, 4)) > 4 else ""
                    break
        return {"mapping": name, "sum": float(x.double().sum())}


def where_is_my_input():
    return WhereIsMyInput()
