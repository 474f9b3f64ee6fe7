"""Request bodies read straight into tensors (``tensor_from_stream``, Note [Reading big bodies]) and the
shared buffers that let a worker map a big body instead of the web process copying it (Note [Body
buffers]): sizes, errors, reuse, fork, and calls that carry them through each path to a worker."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from flask import Flask, jsonify, request
from werkzeug.serving import make_server
from werkzeug.wsgi import LimitedStream

from flask_torchpool import InvalidInputError, PayloadTooLargeError, TorchPool, bodies, shm, staging
from flask_torchpool.attach.client import PoolConnection

from .conftest import make_app, wait_until
from .servers import pool_server, private_socket

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _idle_buffers_released() -> Iterator[None]:
    """Idle body buffers are a process-wide cache; release them so the leak check sees the rest."""
    yield
    gc.collect()
    staging.buffers.release_idle()


class ReadOnly:
    """A stream with ``read`` only (gunicorn's body)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._data.read(size)


def _floats(n: int, seed: int = 0) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) * 0.5 + seed


@pytest.mark.parametrize("n", [3, 3 * MIB // 4 + 5])  # below and above staging.MIN_BYTES
@pytest.mark.parametrize("kind", ["readinto", "read", "limited"])
def test_the_body_becomes_the_tensor_whichever_the_stream(kind: str, n: int) -> None:
    data = _floats(n).numpy().tobytes()
    stream = {"readinto": lambda: io.BytesIO(data), "read": lambda: ReadOnly(data),
              "limited": lambda: LimitedStream(ReadOnly(data), len(data))}[kind]()
    x = bodies.tensor_from_stream(stream, torch.float32, (1, -1), length=len(data))
    assert x.shape == (1, n) and x.dtype == torch.float32
    assert torch.equal(x[0], _floats(n))
    assert (x.data_ptr() in shm.shared_tensors) == (len(data) >= staging.MIN_BYTES)


def test_minus_one_comes_from_the_streams_limit_and_other_dtypes_work() -> None:
    data = torch.arange(12, dtype=torch.int16).numpy().tobytes()
    x = bodies.tensor_from_stream(LimitedStream(io.BytesIO(data), len(data)), torch.int16, (-1, 3))
    assert torch.equal(x, torch.arange(12, dtype=torch.int16).view(4, 3))


@pytest.mark.parametrize(("data", "shape", "length", "words"), [
    (b"\0" * 8, (3,), None, "has 8 bytes; a torch.float32 tensor of shape (3,) needs 12"),
    (b"\0" * 16, (3,), None, "longer than the 12 bytes"),
    (b"\0" * 10, (-1,), 10, "not a whole number"),
    (b"\0" * 8, (-1, 2), None, "unknown length"),
    (b"\0" * 8, (3,), 8, "has 8 bytes"),
])
def test_a_body_that_does_not_fit_is_a_400_naming_the_sizes(data: bytes, shape: tuple[int, ...],
                                                            length: int | None, words: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(words)) as info:
        bodies.tensor_from_stream(ReadOnly(data), torch.float32, shape, length=length)
    assert info.value.code == 400


def test_too_big_a_body_is_a_413_before_anything_is_read() -> None:
    class Untouchable:
        def read(self, size: int = -1) -> bytes:
            raise AssertionError("read")

    with pytest.raises(PayloadTooLargeError, match="TORCHPOOL_MAX_INPUT_BYTES=1000") as info:
        bodies.tensor_from_stream(Untouchable(), torch.float32, (1, 1000), max_bytes=1000)
    assert info.value.code == 413


def test_bad_arguments_are_programming_errors() -> None:
    with pytest.raises(TypeError, match="torch.dtype"):
        bodies.tensor_from_stream(ReadOnly(b""), "float32", (1,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most one -1"):
        bodies.tensor_from_stream(ReadOnly(b""), torch.float32, (-1, -1))


def test_a_body_buffer_is_reused_once_every_view_of_its_tensor_is_gone() -> None:
    data = bytes(3 * MIB)
    x = bodies.tensor_from_stream(io.BytesIO(data), torch.uint8, (-1,), length=len(data))
    address = x.data_ptr()
    view = x[:10]
    del x
    gc.collect()
    assert address in shm.shared_tensors  # the view still holds the buffer
    del view
    gc.collect()
    assert address not in shm.shared_tensors
    y = bodies.tensor_from_stream(io.BytesIO(data), torch.uint8, (-1,), length=len(data))
    assert y.data_ptr() == address  # the same pages, already faulted in


def test_a_smaller_body_takes_an_idle_buffer_up_to_twice_its_size() -> None:
    big = bytes(4 * MIB)
    x = bodies.tensor_from_stream(io.BytesIO(big), torch.uint8, (-1,), length=len(big))
    address = x.data_ptr()
    del x
    gc.collect()
    small = bytes(2 * MIB + 100)  # rounds up to 3 MiB: the 4 MiB buffer fits
    y = bodies.tensor_from_stream(io.BytesIO(small), torch.uint8, (-1,), length=len(small))
    assert y.data_ptr() == address and y.numel() == len(small)
    del y
    gc.collect()
    least = bytes(staging.MIN_BYTES)  # 2 MiB: the 4 MiB buffer is not more than twice that...
    z = bodies.tensor_from_stream(io.BytesIO(least), torch.uint8, (-1,), length=len(least))
    assert z.data_ptr() == address
    del z
    gc.collect()
    staging.buffers.release_idle()
    x = bodies.tensor_from_stream(io.BytesIO(big * 2), torch.uint8, (-1,), length=2 * len(big))
    address = x.data_ptr()
    del x
    gc.collect()  # ...but an 8 MiB one is
    z = bodies.tensor_from_stream(io.BytesIO(least), torch.uint8, (-1,), length=len(least))
    assert z.data_ptr() != address


def test_the_placer_sends_a_body_buffer_instead_of_copying_it() -> None:
    segment_fd = shm.create_memfd(8 * MIB)
    segment = shm.Segment(segment_fd, 8 * MIB)
    allocator = shm.Allocator(0, 8 * MIB)
    data = _floats(MIB).numpy().tobytes()
    x = bodies.tensor_from_stream(io.BytesIO(data), torch.float32, (-1,), length=len(data))
    placer = shm.Placer(segment, allocator)
    try:
        whole, tail = placer.place(x), placer.place(x[1:])
        assert (whole.seg, whole.offset, whole.nbytes) == (0, 0, len(data))
        assert tail.seg == -1  # not at the start of its buffer: copied into the arena
        assert len(placer.fds) == 1 and placer.fds[0] != shm.shared_tensors[x.data_ptr()]
        got = shm.read_refs(segment, (whole,), [os.dup(placer.fds[0])])[0]
        assert torch.equal(got, x)
    finally:
        placer.rollback()
        del segment
        os.close(segment_fd)


def test_a_conjugate_or_negative_view_of_a_body_buffer_is_copied_with_its_values() -> None:
    # x.conj() and torch._neg_view(x) share x's memory but not its values: sending the body buffer
    # would hand the worker the raw bytes (shm.dense_address refuses such views).
    segment_fd = shm.create_memfd(16 * MIB)
    segment = shm.Segment(segment_fd, 16 * MIB)
    allocator = shm.Allocator(0, 16 * MIB)
    n = MIB // 2
    data = torch.complex(_floats(n), torch.ones(n)).numpy().tobytes()
    x = bodies.tensor_from_stream(io.BytesIO(data), torch.complex64, (-1,), length=len(data))
    assert x.data_ptr() in shm.shared_tensors
    small = torch.complex(_floats(4), torch.ones(4))
    placer = shm.Placer(segment, allocator, inline=True)
    try:
        for view in (x.conj(), torch._neg_view(x), small.conj(), torch._neg_view(small)):
            assert shm.dense_address(view) == -1
            ref = placer.place(view)
            assert ref.seg == -1, "a view whose bytes are not its values went by its memory"
            got = shm.read_refs(segment, (ref,), [])[0]
            assert torch.equal(got, view.resolve_conj().resolve_neg())
        assert placer.fds == [] and placer.inline == bytearray()
    finally:
        placer.rollback()
        del segment
        os.close(segment_fd)


def test_a_numpy_dtype_gives_a_numpy_array_which_the_placer_sends_as_its_buffer() -> None:
    """Given a numpy dtype the body becomes a numpy array (no torch needed), over a body buffer when it
    is big, which the placer sends by descriptor like a tensor's."""
    small = np.arange(5, dtype=np.float32).tobytes()
    a = bodies.tensor_from_stream(ReadOnly(small), np.float32, (-1,), length=len(small))
    assert type(a) is np.ndarray and a.dtype == np.float32 and a.tolist() == [0, 1, 2, 3, 4]
    data = np.arange(MIB, dtype=np.int32).tobytes()   # 4 MiB: a body buffer of its own
    b = bodies.tensor_from_stream(io.BytesIO(data), np.dtype("int32"), (2, -1), length=len(data))
    assert b.shape == (2, MIB // 2) and np.array_equal(b.ravel(), np.arange(MIB, dtype=np.int32))
    address = b.__array_interface__["data"][0]
    assert address in shm.shared_tensors
    segment_fd = shm.create_memfd(8 * MIB)
    segment = shm.Segment(segment_fd, 8 * MIB)
    placer = shm.Placer(segment, shm.Allocator(0, 8 * MIB))
    try:
        whole, tail = placer.place(b), placer.place(b[1:])
        assert (whole.seg, whole.nbytes, whole.dtype) == (0, len(data), "torch.int32")
        assert tail.seg == -1  # not at the start of its buffer: copied into the arena
        got = shm.read_refs(segment, (whole,), [os.dup(placer.fds[0])], arrays=True)[0]
        assert np.array_equal(got, b)
    finally:
        placer.rollback()
        del segment
        os.close(segment_fd)
    del b, got
    gc.collect()
    assert address not in shm.shared_tensors
    for bad in (np.dtype(">f4"), np.dtype(object)):
        with pytest.raises(TypeError, match="cannot travel"):
            bodies.tensor_from_stream(ReadOnly(b""), bad, (0,))


def test_a_forked_child_never_uses_its_parents_buffers() -> None:
    data = bytes(3 * MIB)
    x = bodies.tensor_from_stream(io.BytesIO(data), torch.uint8, (-1,), length=len(data))
    del x
    gc.collect()
    assert staging.buffers.idle_bytes() > 0
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = not shm.shared_tensors and staging.buffers.idle_bytes() == 0
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- through a pool --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sum_app() -> Iterator[Flask]:
    app = make_app(TORCHPOOL_MODEL="tests.models:checksum", TORCHPOOL_ARENA_BYTES=4 * MIB,
                   TORCHPOOL_MAX_INPUT_BYTES=16 * MIB)
    pool = TorchPool(app)

    @app.post("/sum")
    @pool.infer
    def total(model):  # type: ignore[no-untyped-def]
        x = pool.tensor_from_stream(request.stream, torch.float32, (1, -1))
        return jsonify(model(x))

    @app.post("/sum-numpy")
    @pool.infer
    def total_numpy(model):  # type: ignore[no-untyped-def]
        x = pool.tensor_from_stream(request.stream, np.float32, (1, -1))
        return jsonify(model(x))

    yield app
    pool.shutdown(app=app)


@pytest.mark.parametrize("n", [10, 3 * MIB])  # copied into the arena / sent as its own segment
def test_a_view_hands_the_body_to_the_model(sum_app: Flask, n: int) -> None:
    x = _floats(n)
    got = sum_app.test_client().post("/sum", data=x.numpy().tobytes())
    assert got.status_code == 200, got.get_data(as_text=True)
    assert got.json == {"shape": [1, n], "dtype": "torch.float32", "sum": float(x.double().sum())}


@pytest.mark.parametrize("n", [10, 3 * MIB])
def test_a_view_hands_a_numpy_body_to_the_model(sum_app: Flask, n: int) -> None:
    x = _floats(n)
    got = sum_app.test_client().post("/sum-numpy", data=x.numpy().tobytes())
    assert got.status_code == 200, got.get_data(as_text=True)
    assert got.json == {"shape": [1, n], "dtype": "torch.float32", "sum": float(x.double().sum())}


def test_minus_one_comes_from_content_length_when_the_server_hands_its_own_reader(sum_app: Flask) -> None:
    """gunicorn sets ``wsgi.input_terminated``: ``request.stream`` is then its reader, with no limit."""
    x = _floats(1000)
    got = sum_app.test_client().post("/sum", data=x.numpy().tobytes(),
                                     environ_overrides={"wsgi.input_terminated": True})
    assert got.status_code == 200, got.get_data(as_text=True)
    assert got.json["shape"] == [1, 1000]


def test_a_bad_body_gets_a_json_error_and_the_pool_keeps_serving(sum_app: Flask) -> None:
    client = sum_app.test_client()
    got = client.post("/sum", data=b"\0" * (4 * MIB + 2))
    assert got.status_code == 400
    assert got.json["type"] == "InvalidInputError" and "not a whole number" in got.json["error"]
    got = client.post("/sum", data=b"\0" * (17 * MIB))
    assert got.status_code == 413 and "TORCHPOOL_MAX_INPUT_BYTES" in got.json["error"]
    assert client.post("/sum", data=_floats(3 * MIB).numpy().tobytes()).status_code == 200


def test_calls_in_a_row_each_see_their_own_body(sum_app: Flask) -> None:
    """Buffers are reused between requests: every call still sees the body it was made with."""
    client = sum_app.test_client()
    for seed in range(4):
        x = _floats(3 * MIB, seed)
        assert client.post("/sum", data=x.numpy().tobytes()).json["sum"] == float(x.double().sum())


def test_a_model_that_writes_its_input_leaves_the_callers_tensor_alone(sum_app: Flask) -> None:
    """The worker maps a sent buffer copy-on-write, as the copy into the arena behaved before."""
    data = _floats(3 * MIB).numpy().tobytes()
    x = bodies.tensor_from_stream(io.BytesIO(data), torch.float32, (-1,), length=len(data))
    with sum_app.app_context():
        got = sum_app.extensions["torchpool"].extension(x, add=1.0)
    assert got["sum"] == float(x.double().sum()) + x.numel()
    assert x.numpy().tobytes() == data


@pytest.fixture(scope="module")
def attached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    run = tmp_path_factory.mktemp("bodies") / "run"
    run.mkdir(mode=0o700)
    with contextlib.ExitStack() as stack:
        paths = {}
        for direct in (True, False):
            path = run / f"direct-{direct}.sock"
            stack.enter_context(pool_server(path, TORCHPOOL_MODEL="tests.models:checksum",
                                            TORCHPOOL_DIRECT_CALLS=direct, TORCHPOOL_ARENA_BYTES=4 * MIB))
            paths["lane" if direct else "server"] = path
        yield paths


@pytest.mark.parametrize("kind", [torch.float32, np.float32])
@pytest.mark.parametrize("path", ["lane", "server"])
def test_an_attached_web_process_sends_its_body_buffers_by_either_path(attached: dict[str, Path],
                                                                       path: str, kind: Any) -> None:
    conn = PoolConnection(str(attached[path]), 1 * MIB)
    conn.connect()
    try:
        assert bool(conn.lanes.pick("default")) == (path == "lane")
        for seed in range(3):
            data = _floats(3 * MIB, seed).numpy().tobytes()
            x = bodies.tensor_from_stream(io.BytesIO(data), kind, (-1,), length=len(data))
            got = conn.submit(None, (x,), {}, 30.0, False, 64 * MIB).result(30)
            assert got["sum"] == float(x.astype(np.float64).sum() if kind is np.float32 else x.double().sum())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def forwarding_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A pool server in this process (its relay is what forwards) whose calls all go through it."""
    path = private_socket(tmp_path_factory.mktemp("forward"))
    with pool_server(path, TORCHPOOL_MODEL="tests.models:where_is_my_input", TORCHPOOL_DIRECT_CALLS=False,
                     TORCHPOOL_ARENA_BYTES=4 * MIB):
        yield path


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("kind", [torch.float32, np.float32])
def test_the_pool_server_forwards_a_body_buffer_to_its_worker_without_copying(forwarding_server: Path,
                                                                              kind: Any) -> None:
    """Note [Forwarded segments]: the worker maps the web process's body buffer itself; the server keeps
    its duplicate only while the call lasts (no descriptor left behind, none registered)."""
    conn = PoolConnection(str(forwarding_server), 1 * MIB)
    conn.connect()
    try:
        assert conn.lanes.pick("default") is None  # every call goes through the server
        registered = len(shm.shared_tensors)
        for seed in range(3):
            data = _floats(3 * MIB, seed).numpy().tobytes()
            x = bodies.tensor_from_stream(io.BytesIO(data), kind, (-1,), length=len(data))
            got = conn.submit(None, (x,), {}, 30.0, False, 64 * MIB).result(30)
            assert got["mapping"].startswith("/memfd:torchpool-body"), got
            assert got["sum"] == float(np.frombuffer(data, np.float32).astype(np.float64).sum())
            small = bodies.tensor_from_stream(io.BytesIO(data[:400]), kind, (-1,), length=400)
            got = conn.submit(None, (small,), {}, 30.0, False, 64 * MIB).result(30)
            assert not got["mapping"].startswith("/memfd:torchpool-body"), got  # copied into the arena
            del x, small

        def released() -> bool:  # the server lets go of a call's inputs just after its answer went out
            gc.collect()
            return not shm._forwarding and len(shm.shared_tensors) == registered

        # No duplicate kept (each is closed as it leaves the set), no registration left behind. (Not a
        # count of this process's descriptors: other tests' servers in it open and close their own.)
        assert wait_until(released), (sorted(shm._forwarding), len(shm.shared_tensors), registered)
    finally:
        conn.close()


def test_past_its_bound_the_pool_server_copies_instead_of_keeping_descriptors(
        forwarding_server: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server keeps at most MAX_FORWARDED_SEGMENTS descriptors to forward; past it, calls still
    work, their bodies copied into the worker's arena."""
    monkeypatch.setattr(shm, "MAX_FORWARDED_SEGMENTS", 0)
    conn = PoolConnection(str(forwarding_server), 1 * MIB)
    conn.connect()
    try:
        data = _floats(3 * MIB).numpy().tobytes()
        x = bodies.tensor_from_stream(io.BytesIO(data), torch.float32, (-1,), length=len(data))
        got = conn.submit(None, (x,), {}, 30.0, False, 64 * MIB).result(30)
        assert not got["mapping"].startswith("/memfd:torchpool-body"), got
        assert got["sum"] == float(x.double().sum())
    finally:
        conn.close()


class _RacingSet(set[int]):
    """A set whose size two threads read at the same moment when they can: both read it between two
    barriers, so neither has counted anything in between (the barriers time out, and are broken for
    good, when only one thread can get there)."""

    def __init__(self) -> None:
        super().__init__()
        self.before, self.after = threading.Barrier(2, timeout=1.0), threading.Barrier(2, timeout=1.0)

    def __len__(self) -> int:
        with contextlib.suppress(threading.BrokenBarrierError):
            self.before.wait()
        size = super().__len__()
        with contextlib.suppress(threading.BrokenBarrierError):
            self.after.wait()
        return size


def test_threads_forwarding_at_once_never_keep_more_than_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two server threads that read a call with a segment at the same moment both check the bound
    before either counts its descriptor: without the lock both would keep one, past a bound of 1."""
    racing = _RacingSet()
    monkeypatch.setattr(shm, "_forwarding", racing)
    monkeypatch.setattr(shm, "MAX_FORWARDED_SEGMENTS", 1)
    arena_fd = shm.create_memfd(4096, "torchpool-test-arena")
    arena = shm.Segment(arena_fd, 4096)
    ref = shm.TensorRef(0, 0, 4096, "torch.float32", (1024,))
    segments = [shm.create_memfd(4096, "torchpool-test") for _ in range(2)]
    out: list[torch.Tensor] = []

    def read(fd: int) -> None:
        out.extend(shm.read_refs(arena, (ref,), [fd], forward=True))

    threads = [threading.Thread(target=read, args=(fd,)) for fd in segments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(out) == 2, "a read failed"
    assert set.__len__(racing) == 1, "both threads kept a descriptor past the bound"
    out.clear()
    gc.collect()
    assert set.__len__(racing) == 0
    os.close(arena_fd)


def test_a_forwarded_segment_with_a_bad_reference_leaves_no_descriptor_behind() -> None:
    """A reference that does not fit its dtype fails the call's read; the duplicate kept to forward the
    descriptor is closed with it."""
    fd = shm.create_memfd(4096, "torchpool-test")
    arena_fd = shm.create_memfd(4096, "torchpool-test-arena")
    arena = shm.Segment(arena_fd, 4096)
    before = _open_fds()
    bad = shm.TensorRef(0, 0, 4095, "torch.float32", (1023,))
    with pytest.raises(ValueError, match="does not match its shape"):
        shm.read_refs(arena, (bad,), [os.dup(fd)], forward=True)
    assert _open_fds() <= before
    good = shm.TensorRef(0, 0, 4096, "torch.float32", (1024,))
    (t,) = shm.read_refs(arena, (good,), [os.dup(fd)], forward=True)
    assert shm.shared_tensors[t.data_ptr()] not in before
    del t
    gc.collect()
    assert _open_fds() <= before
    # A second segment that is not sealed fails the read after the first one's duplicate was kept:
    # that duplicate is closed and no longer counts against MAX_FORWARDED_SEGMENTS.
    unsealed = os.memfd_create("torchpool-test-unsealed", os.MFD_CLOEXEC)
    os.ftruncate(unsealed, 4096)
    second = shm.TensorRef(1, 0, 4096, "torch.float32", (1024,))
    with pytest.raises(shm.UnsealedSegment):
        shm.read_refs(arena, (good, second), [os.dup(fd), unsealed], forward=True)
    assert not shm._forwarding
    assert _open_fds() <= before
    os.close(fd)
    os.close(arena_fd)


def test_a_client_that_hangs_up_mid_body_gets_nothing_and_the_next_one_is_served(sum_app: Flask) -> None:
    """Over a real socket (werkzeug's threaded server): the view's read fails as a 400 the client no
    longer hears, its buffer is freed (the leak check), and the server and pool keep serving."""
    server = make_server("127.0.0.1", 0, sum_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_port
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /sum HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (3 * MIB))
            s.sendall(bytes(MIB))  # a third of the body, then hang up
            s.shutdown(socket.SHUT_WR)
            assert b" 400 " in s.recv(4096).split(b"\r\n", 1)[0] + b" "
        x = _floats(3 * MIB)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            body = x.numpy().tobytes()
            s.sendall(b"POST /sum HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                      % len(body) + body)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(payload)["sum"] == float(x.double().sum())
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# --- Note [Bodies straight from gunicorn's socket] ------------------------------------------------------


def _gunicorn_body(sock: socket.socket, buffered: bytes, length: int) -> Any:
    """gunicorn's reader of a body of *length* bytes on *sock*, holding *buffered* already (the bytes it
    received with the request's headers), as its sync and gthread workers build it."""
    from gunicorn.http.body import Body, LengthReader
    from gunicorn.http.unreader import SocketUnreader

    unreader = SocketUnreader(sock)
    unreader.unread(buffered)
    return Body(LengthReader(unreader, length))


@pytest.mark.parametrize("held", [0, 5000, "all"])  # nothing buffered, the body's start, all of it
@pytest.mark.parametrize("n", [1000, 3 * MIB // 4 + 5])  # ordinary memory / a body buffer
def test_a_gunicorn_body_is_read_from_its_socket_leaving_the_next_request(n: int, held: int | str) -> None:
    pytest.importorskip("gunicorn")
    data = _floats(n).numpy().tobytes()
    after = b"GET /next HTTP/1.1\r\n\r\n"  # a pipelined request behind the body: it must stay readable
    ours, theirs = socket.socketpair()
    with ours, theirs:
        cut = len(data) + len(after) if held == "all" else int(held)
        wire = data + after
        sender = threading.Thread(target=theirs.sendall, args=(wire[cut:],), daemon=True)
        sender.start()
        body = _gunicorn_body(ours, wire[:cut], len(data))
        assert bodies._gunicorn_body(body)
        x = bodies.tensor_from_stream(body, torch.float32, (-1,), length=len(data))
        sender.join(30)
        assert torch.equal(x, _floats(n))
        assert body.reader.length == 0 and body.read() == b""
        theirs.shutdown(socket.SHUT_WR)
        assert body.reader.unreader.read() == after


@pytest.mark.parametrize("held", [0, "all"])
def test_a_gunicorn_body_shorter_than_the_tensor_never_reads_the_next_request(held: int | str) -> None:
    """Asked for more bytes than the request's Content-Length: a 400 naming what came, and the bytes
    behind the body stay for the next request."""
    pytest.importorskip("gunicorn")
    data, after = bytes(range(200)) * 2, b"GET /next HTTP/1.1\r\n\r\n"
    ours, theirs = socket.socketpair()
    with ours, theirs:
        cut = 0 if held == 0 else len(data) + len(after)
        theirs.sendall((data + after)[cut:])
        theirs.shutdown(socket.SHUT_WR)
        body = _gunicorn_body(ours, (data + after)[:cut], len(data))
        with pytest.raises(InvalidInputError, match="the body has 400 bytes"):
            bodies.tensor_from_stream(body, torch.uint8, (-1,), length=800)
        assert body.reader.unreader.read() == after


def test_a_gunicorn_body_partly_read_by_the_view_gives_the_rest() -> None:
    """What the view read first is not read again, nor what gunicorn's reader took beyond it (asked for
    12 bytes, it reads ahead and keeps the rest in its own buffer)."""
    pytest.importorskip("gunicorn")
    data = _floats(4096).numpy().tobytes()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data[3000:])
        body = _gunicorn_body(ours, data[:3000], len(data))
        assert body.read(12) == data[:12]
        assert body.buf.getbuffer().nbytes > 0  # read ahead: the path this test is about
        rest = bodies.tensor_from_stream(body, torch.uint8, (-1,), length=len(data) - 12)
        assert rest.numpy().tobytes() == data[12:]
        assert body.reader.length == 0 and body.read() == b""


def test_a_gunicorn_body_cut_short_is_a_400_and_its_socket_is_not_reused() -> None:
    pytest.importorskip("gunicorn")
    data = _floats(MIB).numpy().tobytes()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data[100:1000])
        theirs.shutdown(socket.SHUT_WR)  # the client hangs up after 1,000 bytes of 4 MiB
        body = _gunicorn_body(ours, data[:100], len(data))
        with pytest.raises(InvalidInputError, match="the body has 1000 bytes"):
            bodies.tensor_from_stream(body, torch.float32, (-1,), length=len(data))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(0.01)  # a client that stalls past the worker's timeout: what recv raises
        body = _gunicorn_body(ours, b"", len(data))
        with pytest.raises(TimeoutError):
            bodies.tensor_from_stream(body, torch.float32, (-1,), length=len(data))
        assert body.failed


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_gunicorn_workers_hand_each_body_to_its_view(tmp_path: Path, worker: str) -> None:
    """Real gunicorn, bodies of several sizes; with gthread, two requests pipelined on one kept-alive
    connection (the second request's bytes arrive with the first body's)."""
    pytest.importorskip("gunicorn")
    from .servers import free_port, running, server_env

    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-k", worker, "-w", "1", "--threads", "2", "-b",
            f"127.0.0.1:{port}", "tests.body_app:create_app()"]
    with running(argv, port, tmp_path / "gunicorn.log", server_env()) as server:
        server.wait_answers("/")
        sizes = [1, 3000, 300_000, 3 * MIB // 4 + 5]
        for i, n in enumerate(sizes):
            x = _floats(n, i)
            got = requests.post(server.base_url + "/sum", data=x.numpy().tobytes(), timeout=60)
            assert got.status_code == 200, got.text
            assert got.json() == {"n": n, "sum": float(x.double().sum()), "last": float(x[-1])}
        got = requests.post(server.base_url + "/sum", data=b"123", timeout=60)
        assert got.status_code == 400 and "not a whole number" in got.json()["error"]
        if worker == "gthread":
            a, b = _floats(70_000, 1), _floats(5, 2)
            wire = b"".join(b"POST /sum HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s" % (
                len(x.numpy().tobytes()), close, x.numpy().tobytes())
                for x, close in ((a, b""), (b, b"Connection: close\r\n")))
            with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
                s.sendall(wire)
                answer = b""
                while chunk := s.recv(65536):
                    answer += chunk
            sums = [json.loads(m)["sum"] for m in re.findall(rb"\{[^}]*\}", answer)]
            assert sums == [float(a.double().sum()), float(b.double().sum())], answer[:2000]
