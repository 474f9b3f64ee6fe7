"""The transport: odd dtypes, shapes and strides, nested structures, oversize payloads, the allocator."""

from __future__ import annotations

import pytest
import torch
from flask import Flask

from flask_torchpool import InvalidInputError, OutputError, TorchPool, messages, shm

pytestmark = pytest.mark.timeout(120)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128,
          torch.uint16, torch.float8_e4m3fn]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(0, 100, shape).to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype ==
                                                                     torch.float8_e4m3fn else a,
                                                                     b.view(torch.uint8) if b.dtype ==
                                                                     torch.float8_e4m3fn else b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_round_trip(echo_app: Flask, pool: TorchPool, dtype: torch.dtype) -> None:
    x = _sample(dtype, (3, 5))
    with echo_app.app_context():
        y = pool(x)
    assert _same(x, y)


@pytest.mark.parametrize("make", [
    lambda: torch.tensor(3.5),                              # 0-d
    lambda: torch.empty(0, 4),                              # no elements
    lambda: torch.arange(24.0).view(2, 3, 4).permute(2, 0, 1),  # permuted
    lambda: torch.arange(100.0)[::3],                       # strided
    lambda: torch.arange(12.0).view(3, 4).t(),              # transposed
    lambda: torch.arange(10.0).expand(4, 10),               # stride 0
    lambda: torch.randn(2, 3, dtype=torch.complex64).conj(),  # lazy conjugate
    lambda: torch.arange(6.0)[1:5],                         # storage offset
    lambda: torch.randn(1, 3, 8, 8).to(memory_format=torch.channels_last),
], ids=["0d", "empty", "permuted", "strided", "transposed", "expanded", "conj", "offset", "chlast"])
def test_shapes_and_strides(echo_app: Flask, pool: TorchPool, make) -> None:
    x = make()
    with echo_app.app_context():
        y = pool(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, x.resolve_conj())


def test_nested_structures(echo_app: Flask, pool: TorchPool) -> None:
    a, b = torch.randn(2, 2), torch.arange(5)
    with echo_app.app_context():
        out = pool(a, [b, (1, 2.5, "s", None, b"raw", True, 1 + 2j)], key={"x": a, 3: [b]})
    args, kwargs = out["args"], out["kwargs"]
    assert torch.equal(args[0], a)
    assert torch.equal(args[1][0], b)
    assert args[1][1] == (1, 2.5, "s", None, b"raw", True, 1 + 2j)
    assert isinstance(args[1], list) and isinstance(args[1][1], tuple)
    assert torch.equal(kwargs["key"]["x"], a) and torch.equal(kwargs["key"][3][0], b)


def test_same_tensor_twice_and_large_output(echo_app: Flask, pool: TorchPool) -> None:
    x = torch.randn(1000)
    with echo_app.app_context():
        out = pool(x, x)
        big = pool(action="big", n=3 << 20)
    assert torch.equal(out["args"][0], x) and torch.equal(out["args"][1], x)
    assert big.shape == (3 << 20,) and int(big.sum()) == 3 << 20


def test_payload_larger_than_arena(echo_app: Flask, pool: TorchPool) -> None:
    # The test arena is 32 MiB (16 MiB per direction): 24 MiB goes through a one-off segment each way.
    x = torch.randn(6 << 20)
    with echo_app.app_context():
        y = pool(x)
        again = pool(torch.ones(3))
    assert torch.equal(x, y)
    assert torch.equal(again, torch.ones(3))


def test_outputs_outlive_many_calls(echo_app: Flask, pool: TorchPool) -> None:
    """Zero-copy outputs that callers keep must stay intact while later calls reuse the arena."""
    kept = []
    with echo_app.app_context():
        for i in range(40):
            kept.append((i, pool(torch.full((1 << 18,), float(i)))))  # 1 MiB each, 40 MiB in all
    for i, t in kept:
        assert bool((t == i).all())


def test_caller_cannot_corrupt_worker_input(echo_app: Flask, pool: TorchPool) -> None:
    x = torch.zeros(100)
    with echo_app.app_context():
        fut = pool.submit(x)
        y = fut.result(30)
    x += 1
    assert float(y.sum()) == 0.0


@pytest.mark.parametrize("value, fragment", [
    (object(), "builtins.object cannot travel"),
    ({1, 2}, "builtins.set cannot travel"),
    (torch.randn(2, requires_grad=True), "requires grad"),
    (torch.randn(2, 2).to_sparse(), "sparse"),
    (torch.empty(2, device="meta"), "meta tensor"),
    ({(1, object()): 1}, "dict key"),
])
def test_unsupported_inputs_are_refused_in_the_caller(echo_app: Flask, pool: TorchPool, value,
                                                      fragment: str) -> None:
    with echo_app.app_context():
        before = pool.status()["counters"]["calls"]
        with pytest.raises(InvalidInputError, match=fragment):
            pool(value)
        assert pool.status()["counters"]["calls"] == before  # nothing reached a worker
        assert torch.equal(pool(torch.ones(2)), torch.ones(2))


def test_unsupported_output_names_it(echo_app: Flask, pool: TorchPool) -> None:
    with echo_app.app_context():
        with pytest.raises(OutputError, match="returned a builtins.object"):
            pool(action="unpicklable")
        assert pool(1) == 1


def test_allocator_reuses_and_merges() -> None:
    alloc = shm.Allocator(4096, 1 << 20)
    a, b, c = alloc.alloc(100), alloc.alloc(1000), alloc.alloc(5000)
    assert a is not None and b is not None and c is not None
    assert a % shm.ALIGN == 0 and b % shm.ALIGN == 0 and len({a, b, c}) == 3
    assert alloc.alloc(2 << 20) is None
    alloc.free(b)
    alloc.free(a)
    alloc.free(c)
    assert alloc.used == 0
    assert alloc.alloc(1 << 20) == 4096  # everything merged back into one block
    alloc.free(12345)  # unknown offsets are ignored


def test_headers_refuse_foreign_classes() -> None:
    import pickle

    evil = bytes(messages.encode(messages.Stop()))
    evil = bytes([200]) + evil[1:]  # a type code no protocol has
    with pytest.raises(messages.ProtocolError):
        messages.decode(evil, messages.WORKER_PROTOCOL)
    with pytest.raises(messages.ProtocolError, match="refusing"):
        messages.decode(pickle.dumps(__import__("os").system), messages.WORKER_PROTOCOL)


def test_each_protocol_refuses_the_other_protocols_messages() -> None:
    hello = bytes(messages.encode(messages.Hello(messages.PROTOCOL_VERSION, 1, 1 << 20), 1))
    stop = bytes(messages.encode(messages.Stop()))
    with pytest.raises(messages.ProtocolError, match="worker protocol"):
        messages.decode(hello, messages.WORKER_PROTOCOL)
    with pytest.raises(messages.ProtocolError, match="attach protocol"):
        messages.decode(stop, messages.ATTACH_PROTOCOL)
    assert messages.decode(hello, messages.ATTACH_PROTOCOL)[1] == messages.Hello(messages.PROTOCOL_VERSION, 1,
                                                                                  1 << 20)
