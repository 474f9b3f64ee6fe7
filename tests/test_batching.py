"""Dynamic batching: strict row limits, batches that form from the calls queued while the worker is busy,
errors confined to their batch, per-view opt-out, shape keys. A call that waits at a gate (a FIFO the test
opens once every call of the test is queued) holds the only worker, so that batches form
deterministically, however slowly the test submits. A batch formed from the queue that is not full waits
for the batch delay (Note [Batching]): short here, so that tests do not wait long, and never what decides
a batch's members (every call is queued before the gate opens)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest
import torch
from flask import Flask

from flask_torchpool import InferenceError, OutputError, TorchPool

from .conftest import Gate, make_app, wait_until

pytestmark = pytest.mark.timeout(120)


#: What a batch formed from the queue waits for more calls when it is not full.
BATCH_DELAY_S = 0.2


@pytest.fixture(scope="module")
def batch_app() -> Iterator[Flask]:
    # How batches fill, so no batch splitting (tested on its own below): every batch runs whole.
    app = make_app(TORCHPOOL_MODEL="tests.models:batch_probe", TORCHPOOL_MAX_BATCH_SIZE=8,
                   TORCHPOOL_MAX_BATCH_DELAY_MS=BATCH_DELAY_S * 1000, TORCHPOOL_PIPELINE_DEPTH=2,
                   TORCHPOOL_SPLIT_BATCHES=False)
    pool = TorchPool(app)
    yield app
    pool.shutdown(app=app)


@pytest.fixture
def bpool(batch_app: Flask) -> Iterator[TorchPool]:
    with batch_app.app_context():
        yield batch_app.extensions["torchpool"].extension


def _hold_worker(pool: TorchPool, gate: Gate) -> Future[Any]:
    """A call without tensors (never batched) that keeps the worker busy until *gate* opens."""
    return pool.submit(action="gate", gate=str(gate))


def _release(gate: Gate, hold: Future[Any]) -> None:
    gate.open()
    assert hold.result(60) == 0


def test_batches_fill_to_the_strict_row_limit(bpool: TorchPool, gate: Gate) -> None:
    hold = _hold_worker(bpool, gate)
    xs = [torch.full((1, 3), float(i)) for i in range(20)]
    futures = [bpool.submit(x) for x in xs]
    _release(gate, hold)
    results = [f.result(60) for f in futures]
    sizes = [int(r["n"][0]) for r in results]
    assert max(sizes) == 8 and all(n <= 8 for n in sizes)
    assert sizes[:16] == [8] * 16  # two full batches formed while the worker was busy
    for x, r in zip(xs, results):
        assert torch.equal(r["y"], x + 1) and r["y"].shape == (1, 3)
    status = bpool.status()
    assert status["counters"]["batches"] >= 3
    assert status["metrics"]["batch_rows"]["count"] >= 3


def test_limit_counts_rows_not_calls(bpool: TorchPool, gate: Gate) -> None:
    hold = _hold_worker(bpool, gate)
    xs = [torch.full((3, 2), float(i)) for i in range(6)]
    futures = [bpool.submit(x) for x in xs]
    _release(gate, hold)
    results = [f.result(60) for f in futures]
    sizes = {int(r["n"][0]) for r in results}
    assert sizes <= {3, 6} and 6 in sizes  # two 3-row calls per batch; a third would make 9 > 8
    for x, r in zip(xs, results):
        assert torch.equal(r["y"], x + 1)


def test_a_call_larger_than_the_limit_runs_alone(bpool: TorchPool) -> None:
    x = torch.ones(20, 2)
    r = bpool(x)
    assert int(r["n"][0]) == 20 and torch.equal(r["y"], x + 1)


def test_error_reaches_its_batch_only(bpool: TorchPool, gate: Gate) -> None:
    hold = _hold_worker(bpool, gate)
    good_a = [bpool.submit(torch.ones(2, 1)) for _ in range(4)]   # 8 rows: batch A, full
    bad_b = [bpool.submit(torch.ones(2, 1)), bpool.submit(-torch.ones(2, 1))]  # batch B, poisoned
    _release(gate, hold)
    assert all(int(f.result(60)["n"][0]) == 8 for f in good_a)
    # Issue 11 (Note [A failed batch]): the members of the failed batch run again alone; the error reaches
    # the caller whose input caused it, and the other member of that batch gets its result.
    assert int(bad_b[0].result(60)["n"][0]) == 2
    with pytest.raises(InferenceError, match="negative input in batch"):
        bad_b[1].result(60)
    assert torch.equal(bpool(torch.zeros(1, 1))["y"], torch.ones(1, 1))  # still serving


def test_different_shapes_do_not_mix(bpool: TorchPool, gate: Gate) -> None:
    hold = _hold_worker(bpool, gate)
    a = [bpool.submit(torch.zeros(1, 4)) for _ in range(3)]
    b = [bpool.submit(torch.zeros(1, 5)) for _ in range(3)]
    c = [bpool.submit(torch.zeros(1, 4, dtype=torch.float64)) for _ in range(2)]
    _release(gate, hold)
    for futures, shape, dtype in ((a, (1, 4), torch.float32), (b, (1, 5), torch.float32),
                                  (c, (1, 4), torch.float64)):
        for f in futures:
            r = f.result(60)
            assert r["y"].shape == shape and r["y"].dtype == dtype
            assert int(r["n"][0]) <= len(futures)


def test_opt_out_runs_calls_alone(batch_app: Flask, bpool: TorchPool, gate: Gate) -> None:
    proxy = bpool.model(batch=False)
    hold = _hold_worker(bpool, gate)
    futures = [proxy.submit(torch.zeros(1, 2)) for _ in range(3)]
    _release(gate, hold)
    assert [int(f.result(60)["n"][0]) for f in futures] == [1, 1, 1]

    @batch_app.get("/never-batched")
    @bpool.infer(batch=False)
    def view(model):
        return {"n": int(model(torch.zeros(1, 2))["n"][0])}


def test_outputs_must_keep_rows_aligned(bpool: TorchPool, gate: Gate) -> None:
    hold = _hold_worker(bpool, gate)
    futures = [bpool.submit(torch.ones(1, 2), action="bad_rows") for _ in range(3)]
    _release(gate, hold)
    for f in futures:
        with pytest.raises(OutputError, match="keep dim 0 aligned"):
            f.result(60)


def test_light_traffic_is_not_delayed(bpool: TorchPool) -> None:
    """In a quiet pool a lone call's batch is sent at once: it does not wait for the batch delay."""
    sched = bpool._state().pool._sched  # type: ignore[union-attr]
    bpool(torch.ones(1, 1))   # after the batches of the tests before, this one may wait (it ends alone)
    assert sched.last_batch_calls == 1
    future = bpool.submit(torch.ones(1, 1))
    with sched.lock:   # sealed and sent by submit itself, not waiting in an open batch for the timer
        assert not sched.open
    assert torch.equal(future.result(60)["y"], torch.full((1, 1), 2.0))


def test_copy_into_uses_no_torch_threads() -> None:
    from flask_torchpool.shm import copy_into

    src = torch.arange(1 << 16, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_into(dst, src)
    assert torch.equal(src, dst)
    strided = torch.arange(100.0)[::2]
    dst2 = torch.empty(50)
    copy_into(dst2, strided)
    assert torch.equal(dst2, strided)


@pytest.fixture(scope="module")
def bucket_pool() -> Iterator[TorchPool]:
    """A pool whose batches run padded to 2, 4 or 8 rows (Note [Batch buckets])."""
    app = make_app(TORCHPOOL_MODEL="tests.models:batch_probe", TORCHPOOL_MAX_BATCH_SIZE=8,
                   TORCHPOOL_BATCH_BUCKETS=[8, 2, 4], TORCHPOOL_MAX_BATCH_DELAY_MS=BATCH_DELAY_S * 1000,
                   TORCHPOOL_SPLIT_BATCHES=False)
    pool = TorchPool(app)
    with app.app_context():
        yield pool
    pool.shutdown(app=app)


def test_batches_run_padded_to_their_bucket(bucket_pool: TorchPool, gate: Gate) -> None:
    x = torch.full((1, 3), 7.0)
    r = bucket_pool(x)   # alone: one row runs as two
    assert int(r["n"][0]) == 2 and r["y"].shape == (1, 3) and torch.equal(r["y"], x + 1)
    hold = _hold_worker(bucket_pool, gate)
    xs = [torch.full((1, 3), float(i)) for i in range(3)]
    futures = [bucket_pool.submit(x) for x in xs]
    _release(gate, hold)
    for x, f in zip(xs, futures):   # three rows, queued while the worker was busy, run as four
        r = f.result(60)
        assert int(r["n"][0]) == 4 and torch.equal(r["y"], x + 1)
    big = bucket_pool(torch.ones(20, 3))   # more rows than any bucket: run as they are
    assert int(big["n"][0]) == 20 and big["y"].shape == (20, 3)
    metrics = bucket_pool.status()["metrics"]
    assert metrics["batch_rows"]["sum"] == 1 + 3 + 20 and metrics["batch_padding_rows"] == 1 + 1


def test_numpy_and_torch_callers_share_a_batch_and_each_gets_its_own_kind(bpool: TorchPool,
                                                                          gate: Gate) -> None:
    """Note [A pool server without torch]: the pool writes numpy arrays into a batch as they are and reads
    the answer as numpy arrays when every member passed numpy; a batch of numpy and torch callers (the
    same wire dtype and row shape) is read as tensors and its numpy members get arrays back."""
    import numpy as np

    hold = _hold_worker(bpool, gate)
    mixed = [bpool.submit(np.full((1, 3), 1.0, np.float32)), bpool.submit(torch.full((1, 3), 2.0)),
             bpool.submit(np.full((2, 6), 3.0, np.float32)[:, ::2])]
    _release(gate, hold)
    kinds = []
    for f, value, rows in zip(mixed, (1.0, 2.0, 3.0), (1, 2, 2)):
        r = f.result(60)
        assert int(r["n"][0]) == 4, "the three calls did not run as one batch of four rows"
        kinds.append(type(r["y"]).__name__)
        assert r["y"].shape == (rows if value == 3.0 else 1, 3) and float(r["y"][0, 0]) == value + 1
    assert kinds == ["ndarray", "Tensor", "ndarray"]
    hold = _hold_worker(bpool, gate)
    arrays = [np.full((1, 3), float(i), np.float32) for i in range(3)]
    futures = [bpool.submit(a) for a in arrays]
    _release(gate, hold)
    for a, f in zip(arrays, futures):
        r = f.result(60)
        assert int(r["n"][0]) == 3 and type(r["y"]).__name__ == "ndarray"
        assert np.array_equal(r["y"], a + 1) and r["y"].dtype == np.float32


def test_batches_split_where_the_model_runs_more_rows_per_second_and_every_caller_gets_its_rows() -> None:
    """Note [Batch splitting], with real workers: eight callers in a closed loop on two workers of a
    model whose batches of 3 rows or more cost 30 ms a row, against 20 ms for up to 2 rows
    (tests.models:staircase), so that any batch of more than 2 rows runs faster split. The pool
    measures that, splits batches (the first ones near their middle, to time both halves), and every
    caller still gets its own rows back."""
    app = make_app(TORCHPOOL_MODEL="tests.models:staircase", TORCHPOOL_WORKERS=2, TORCHPOOL_MAX_BATCH_SIZE=8,
                   TORCHPOOL_MAX_BATCH_DELAY_MS=5)
    pool = TorchPool(app)
    wrong: list[str] = []
    stop = threading.Event()

    def caller(i: int) -> None:
        n = 0
        while not stop.is_set():
            x = torch.tensor([[float(i), float(n)]])
            try:
                out = pool.submit(x).result(20)   # a call lost between batches never ends
            except BaseException as exc:
                wrong.append(f"caller {i} call {n}: {exc!r}")
                return
            if out.tolist() != [[i + 1.0, n + 1.0]]:
                wrong.append(f"caller {i} call {n}: {out.tolist()}")
            n += 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
    try:
        with app.app_context():
            for t in threads:
                t.start()
            done = wait_until(lambda: (pool.status()["metrics"]["batch_split_calls"] >= 8
                                       and pool.status()["metrics"]["submitted"] >= 400) or wrong, timeout=60)
            m = pool.status()["metrics"]
            assert done, (m["batch_split_calls"], m["submitted"], m["batch_rows"])
            stop.set()
            for t in threads:
                t.join(60)
            assert not wrong, wrong[:5]
            metrics = pool.status()["metrics"]
            assert metrics["calls"]["ok"] == metrics["submitted"]
    finally:
        stop.set()
        pool.shutdown(app=app)
