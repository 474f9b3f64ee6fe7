"""Small tensors travel in the message on a lane (Note [Inline tensors] in :mod:`flask_torchpool.shm`).

One pool server in this process for the module, whose worker says where its input lives
(``tests.models:where_is_my_input``), with direct calls on; the placement and reading rules are also
checked without processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from flask_torchpool import lanes, shm
from flask_torchpool.attach.client import PoolConnection
from flask_torchpool.attach.server import PoolServer

from .servers import pool_server

pytestmark = pytest.mark.timeout(120)
MIB = 1 << 20


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolServer]:
    run = tmp_path_factory.mktemp("small") / "run"
    run.mkdir(mode=0o700)
    with pool_server(run / "pool.sock", TORCHPOOL_MODEL="tests.models:where_is_my_input",
                     TORCHPOOL_WORKERS=1, TORCHPOOL_ARENA_BYTES=4 * MIB) as server:
        yield server


@pytest.fixture
def conn(served: PoolServer) -> Iterator[PoolConnection]:
    c = PoolConnection(served.path, MIB)
    c.connect()
    yield c
    c.close()


def _lane_calls(served: PoolServer) -> int:
    return int(served.pools["default"].workers[0].arena.control[lanes.CTRL_LANE_CALLS])  # type: ignore[attr-defined]


@pytest.mark.parametrize("make", [lambda n: torch.arange(n, dtype=torch.float32),
                                  lambda n: np.arange(n, dtype=np.float32)], ids=["torch", "numpy"])
def test_a_small_input_travels_in_the_message_and_a_big_one_in_the_lane_arena(served: PoolServer,
                                                                              conn: PoolConnection,
                                                                              make: object) -> None:
    assert conn.lanes.pick("default") is not None, "attaching gave no lane"
    for n, inline in [(1, True), (shm.INLINE_MAX_BYTES // 4, True), (shm.INLINE_MAX_BYTES // 4 + 1, False)]:
        x = make(n)  # type: ignore[operator]
        before = _lane_calls(served)
        got = conn.submit(None, (x,), {}, 30.0, False, MIB).result(30)
        assert _lane_calls(served) == before + 1, "the call did not go on the lane"
        assert got["sum"] == float(np.arange(n, dtype=np.float64).sum())
        assert got["mapping"].startswith("/memfd:torchpool-lane") is not inline, (n, got)


def test_placing_inline_stops_at_the_bound_and_skips_what_is_not_dense() -> None:
    fd = shm.create_memfd(MIB, "test")
    arena = shm.Arena(fd, MIB)
    allocator = shm.Allocator(*arena.inputs)
    half = shm.INLINE_MAX_BYTES // 2
    tensors: list[object] = [torch.full((half // 4,), 1.0), np.full(half // 8, 2.0),   # inline: the bound
                             torch.full((1,), 3.0),                                   # past it: the arena
                             torch.arange(8.0).reshape(2, 4).t()]                     # not dense: the arena
    placer = shm.Placer(arena, allocator, inline=True)
    refs = placer.place_all(tensors)  # type: ignore[arg-type]
    assert [r.seg for r in refs] == [shm.INLINE, shm.INLINE, -1, -1]
    assert [r.offset for r in refs[:2]] == [0, half]
    assert len(placer.inline) == shm.INLINE_MAX_BYTES
    assert len(placer.blocks) == 2
    out = shm.read_refs(arena, refs, [], inline=bytes(placer.inline))
    assert torch.equal(out[0], tensors[0]) and torch.equal(out[2], tensors[2])  # type: ignore[arg-type]
    assert torch.equal(out[1], torch.from_numpy(tensors[1])) and torch.equal(out[3], tensors[3])  # type: ignore[arg-type]
    out[0].add_(1)  # each inline tensor is its own writable copy: nothing else changes
    assert torch.equal(shm.read_refs(arena, refs[:1], [], inline=bytes(placer.inline))[0], tensors[0])  # type: ignore[arg-type]
    arrays = shm.read_refs(arena, refs[:2], [], arrays=True, inline=bytes(placer.inline))
    assert arrays[1].flags.writeable and np.array_equal(arrays[1], tensors[1])  # type: ignore[arg-type]
    # Without inline (the pool server's placements), nothing goes in the message.
    plain = shm.Placer(arena, allocator)
    assert all(r.seg == -1 for r in plain.place_all(tensors[:2])) and not plain.inline  # type: ignore[arg-type]
    plain.rollback()
    placer.rollback()
    assert allocator.used == 0
    os.close(fd)


@pytest.mark.parametrize("ref, why", [
    (shm.TensorRef(shm.INLINE, 0, 8, "torch.float32", (4,)), "does not match"),     # 16 bytes for its shape
    (shm.TensorRef(shm.INLINE, 8, 16, "torch.float32", (4,)), "outside the 16 inline"),
    (shm.TensorRef(shm.INLINE, 0, 16, "torch.float32", (4,)), None),
])
def test_reading_an_inline_reference_checks_it_against_the_message(ref: shm.TensorRef,
                                                                   why: str | None) -> None:
    arena = shm.Segment(-1, 0)
    inline = np.arange(4, dtype=np.float32).tobytes()
    if why is None:
        assert torch.equal(shm.read_refs(arena, (ref,), [], inline=inline)[0], torch.arange(4.0))
        return
    with pytest.raises(ValueError, match=why):
        shm.read_refs(arena, (ref,), [], inline=inline)


def test_an_inline_reference_without_its_bytes_fails() -> None:
    ref = shm.TensorRef(shm.INLINE, 0, 16, "torch.float32", (4,))
    with pytest.raises(ValueError, match="outside the 0 inline"):
        shm.read_refs(shm.Segment(-1, 0), (ref,), [])
