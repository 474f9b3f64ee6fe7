"""Model versions for the reload tests: a module written to a test's directory, whose answers are its
version (``x * 0 + weight``, with the version in a shared weight, so a new worker that ran the old
version's shared weights would answer the old version), and which fails on request."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

_TEMPLATE = '''\
import torch
from torch import nn

VERSION = {version}
FAIL = {fail!r}
GATE = {gate!r}


class Versioned(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((4096,), float(VERSION)), requires_grad=False)

    def forward(self, x):
        if FAIL == "warmup":
            raise RuntimeError("version %d refuses its warm-up call" % VERSION)
        return x * 0 + self.weight[0]


def build():
    if FAIL == "build":
        raise RuntimeError("version %d cannot be built" % VERSION)
    if GATE:
        with open(GATE) as f:   # waits at the test's gate (tests.conftest.Gate)
            f.read()
    return Versioned()


def build_failing():
    raise RuntimeError("version %d cannot be built" % VERSION)


def build_refusing():
    global FAIL
    FAIL = "warmup"
    return Versioned()


def build_other():
    model = Versioned()
    model.weight.fill_(100.0 + VERSION)
    return model
'''


def write_model(directory: Path, version: int, *, fail: str | None = None, gate: object = None,
                name: str = "reloadable") -> str:
    """Write version *version* of module *name* into *directory* (on the workers' ``sys.path``); returns
    its factory spec. The bytecode cache goes, so that a rewrite within the same second is read."""
    (directory / f"{name}.py").write_text(_TEMPLATE.format(version=version, fail=fail,
                                                           gate=None if gate is None else str(gate)))
    shutil.rmtree(directory / "__pycache__", ignore_errors=True)
    return f"{name}:build"


def write_file_model(path: Path, version: int) -> str:
    """A TorchScript file whose answers are *version*."""

    class Constant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.value = torch.nn.Parameter(torch.tensor(float(version)), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 0 + self.value

    tmp = path.with_suffix(".tmp")
    torch.jit.save(torch.jit.script(Constant()), str(tmp))
    os.replace(tmp, path)
    return str(path)
