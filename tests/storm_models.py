"""Models of the crash-storm and error-body tests (issue 11).

* ``hang_on_respawn``: loads, unless the file named by ``TORCHPOOL_TEST_HANG`` exists: then it hangs
  while loading (a respawn stuck in a slow disk, a lock, a download), until the pool kills it.
* ``leaky``: adds 1 and reports the size of the batch each row ran in; a negative input makes it raise
  an error that quotes *every* row of the batch it ran in (as real models' errors often quote input),
  so a test can see whose data an error carries. With ``action="gate", gate=PATH`` it holds its worker
  until the test opens the gate (``tests.conftest.Gate``); any other ``action`` is :class:`Echo`'s.
"""

from __future__ import annotations

import os
import time

import torch

from tests.models import Echo, wait_at_gate


def hang_on_respawn():
    if os.path.exists(os.environ["TORCHPOOL_TEST_HANG"]):
        time.sleep(3600)
    return Echo()


class Leaky(Echo):
    def forward(self, x=None, action=None, gate=None, **kwargs):
        if action == "gate":
            wait_at_gate(gate)
            return 0
        if action is not None:  # Echo's misbehaviours: "raise", "exit", ...
            return super().forward(x, action=action, **kwargs)
        if bool((x < 0).any()):
            raise ValueError(f"cannot score rows {x.flatten().tolist()}: negative input")
        return {"y": x + 1, "n": torch.full((x.shape[0],), x.shape[0])}


def leaky():
    return Leaky()
