"""Shared weights on CPU: N workers map one copy (Note [Shared weights]), also after a respawn."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from .conftest import wait_until

pytestmark = pytest.mark.timeout(180)

WEIGHT_BYTES = 4096 * 2048 * 4  # the one large matrix; the rest is small


def _weights_mapping(pid: int) -> tuple[int, int]:
    """(Rss, Pss) in bytes of the shared-weights memfd mapping in *pid*."""
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                inside = "torchpool-weights" in line
            elif inside and first in ("Rss:", "Pss:"):
                value = int(line.split()[1]) * 1024
                if first == "Rss:":
                    rss += value
                else:
                    pss += value
    return rss, pss


def _outputs_by_pid(pool, x: torch.Tensor, want: int) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}

    def collect() -> bool:
        for fut in [pool.submit(x) for _ in range(4)]:
            y, pid = fut.result(60)
            seen[pid] = y
        return len(seen) >= want

    assert wait_until(collect, timeout=60, interval=0)
    return seen


def test_workers_share_one_copy(make_pool) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL="tests.models:big_linear", TORCHPOOL_WORKERS=2,
                          TORCHPOOL_ARENA_BYTES=8 << 20)
    x = torch.randn(3, 4096)
    with app.app_context():
        outputs = _outputs_by_pid(pool, x, 2)
        a, b = outputs.values()
        assert torch.equal(a, b)
        pids = [w["pid"] for w in pool.status()["workers"]]
        for pid in pids:
            rss, pss = _weights_mapping(pid)
            assert rss >= WEIGHT_BYTES  # every worker maps all of the weights...
            assert pss <= 0.6 * rss     # ...but pays for half of them
        assert pool.status()["shared_weight_bytes"] >= WEIGHT_BYTES

        # A respawned worker maps the same segment.
        os.kill(pids[1], signal.SIGKILL)
        assert wait_until(lambda: all(w["state"] == "ready" and w["pid"] not in pids
                                      for w in pool.status()["workers"][1:]), timeout=60)
        outputs = _outputs_by_pid(pool, x, 2)
        assert all(torch.equal(y, a) for y in outputs.values())
        new_pid = pool.status()["workers"][1]["pid"]
        rss, pss = _weights_mapping(new_pid)
        assert rss >= WEIGHT_BYTES and pss <= 0.6 * rss


def test_sharing_can_be_turned_off(make_pool) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL="tests.models:big_linear", TORCHPOOL_WORKERS=2,
                          TORCHPOOL_SHARE_WEIGHTS=False, TORCHPOOL_ARENA_BYTES=8 << 20)
    x = torch.randn(2, 4096)
    with app.app_context():
        outputs = _outputs_by_pid(pool, x, 2)
        a, b = outputs.values()
        assert torch.equal(a, b)
        for w in pool.status()["workers"]:
            assert _weights_mapping(w["pid"]) == (0, 0)
        assert pool.status()["shared_weight_bytes"] == 0
