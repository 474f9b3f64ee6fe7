"""CUDA workers. Marked ``gpu``: they run where a GPU is visible and skip cleanly elsewhere."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_worker_runs_on_the_gpu_and_returns_cpu_tensors(make_pool) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL="tests.models:linear", TORCHPOOL_DEVICES="cuda:0")
    x = torch.randn(5, 4)
    with app.app_context():
        y = pool(x)
        status = pool.status()
    assert y.device.type == "cpu" and y.shape == (5, 2)
    from tests.models import linear

    assert torch.allclose(y, linear()(x), atol=1e-4)
    assert status["workers"][0]["device"] == "cuda:0"


def test_several_workers_per_gpu_and_batching(make_pool) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL="tests.models:batch_probe", TORCHPOOL_DEVICES="cuda",
                          TORCHPOOL_WORKERS=2, TORCHPOOL_MAX_BATCH_SIZE=16)
    with app.app_context():
        futures = [pool.submit(torch.full((2, 3), float(i))) for i in range(32)]
        results = [f.result(120) for f in futures]
        devices = {w["device"] for w in pool.status()["workers"]}
    for i, r in enumerate(results):
        assert r["y"].device.type == "cpu" and torch.equal(r["y"], torch.full((2, 3), i + 1.0))
    assert devices <= {f"cuda:{i}" for i in range(torch.cuda.device_count())}


def test_large_payload_through_pinned_arena(make_pool) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_DEVICES="cuda:0",
                          TORCHPOOL_ARENA_BYTES=128 << 20)
    x = torch.randn(8 << 20)  # 32 MiB
    with app.app_context():
        y = pool(x)
    assert torch.equal(x, y)


def test_a_stream_of_cuda_tensors_arrives_as_cpu_tensors(make_pool) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL="tests.stream_models:counter", TORCHPOOL_DEVICES="cuda:0")
    x = torch.arange(12.0).reshape(4, 3)
    with app.app_context():
        chunks = list(pool.model().method("rows").stream(x))
    assert all(c.device.type == "cpu" for c in chunks)
    assert torch.equal(torch.stack(chunks), x * 2)
