"""Hostile peers (issue 11, items 1-4): what a process of the same user can do to a pool server through
its socket, and what a caller can pass that must not stall a pool.

The first half runs a real pool server in a subprocess (``tests.servers.pool_server`` under ``python
-c``), so that a server killed by SIGBUS shows up as a dead process rather than a dead test run, and
speaks to it with raw sockets: a pickle that would set an attribute on a message class, a header of
nested shared lists, an arena and a one-off segment that are not sealed (and are shrunk after they were
handed over), descriptors sent with bad messages, a NaN deadline, a frame announcing 2 GiB, a hello
trickled one byte at a time. After each, the server must still be alive and answer a normal client
correctly. The second half runs a :class:`PoolServer` in this process over a fake backend (no model
processes) with its bounds lowered, for the bounds that need many connections or a client that never
reads, and checks the socket directory (item 4). The rest are unit tests of the decoder's budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from flask_torchpool import (
    ConfigError,
    PayloadTooLargeError,
    PoolClosedError,
    TorchPool,
    codec,
    messages,
    shm,
)
from flask_torchpool.attach import rendezvous
from flask_torchpool.attach import server as server_module
from flask_torchpool.attach.client import PoolConnection
from flask_torchpool.attach.server import PoolServer
from flask_torchpool.channel import Channel

from .conftest import make_app, wait_until
from .servers import ROOT, server_env

pytestmark = pytest.mark.timeout(180)

_SERVER_SCRIPT = """
import logging, sys
from tests.servers import pool_server
logging.basicConfig(level=logging.INFO)
with pool_server(sys.argv[1], TORCHPOOL_WORKERS=1, TORCHPOOL_ARENA_BYTES=8 << 20):
    print("ready", flush=True)
    sys.stdin.read()
"""


@dataclass
class _Served:
    proc: subprocess.Popen[bytes]
    path: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Served]:
    """A pool server (one echo worker) in its own process."""
    base = tmp_path_factory.mktemp("hostile")
    run = base / "run"
    run.mkdir(mode=0o700)
    log_path = base / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, str(run / "pool.sock")], cwd=ROOT,
                                env=server_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log_file)
    served = _Served(proc, str(run / "pool.sock"), log_path)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline() == b"ready\n", served.log()
        yield served
    finally:
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _serves(served: _Served) -> None:
    """The server is alive and answers a normal client with the right values."""
    assert served.proc.poll() is None, f"the pool server died ({served.proc.returncode}):\n{served.log()}"
    conn = PoolConnection(served.path, 1 << 20)
    try:
        for n in (16, 1000):
            x = torch.arange(n, dtype=torch.float32) + 1
            out = conn.submit(None, (x,), {}, 30.0, False, 1 << 20).result(60)
            assert torch.equal(out, x), "the server read the inputs from the wrong place"
            del out
    finally:
        conn.close()


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def _attach(path: str, arena_fd: int, arena_bytes: int) -> Channel:
    channel = Channel(Connection(_connect(path).detach()), messages.ATTACH_PROTOCOL)
    channel.send(messages.Hello(messages.PROTOCOL_VERSION, os.getpid(), arena_bytes), (arena_fd,))
    return channel


def _next(channel: Channel, timeout: float) -> Any:
    """The next message, ``"closed"`` when the server closed the connection, None after *timeout*."""
    if not channel.poll(timeout):
        return None
    try:
        msg, fds = channel.recv()
    except (EOFError, OSError):
        return "closed"
    for fd in fds:
        os.close(fd)
    return msg


@contextlib.contextmanager
def _attached(path: str, arena_bytes: int = 1 << 20) -> Iterator[tuple[Channel, shm.Arena]]:
    """A well-behaved handshake, by hand: the channel (after its Welcome) and the arena."""
    fd = shm.create_memfd(arena_bytes, "torchpool-hostile")
    try:
        arena = shm.Arena(fd, arena_bytes)
        channel = _attach(path, fd, arena_bytes)
    finally:
        os.close(fd)
    try:
        msg = _next(channel, 30)
        while isinstance(msg, messages.LaneOffer):  # direct-call lanes come first (their fds are closed)
            msg = _next(channel, 30)
        assert isinstance(msg, messages.Welcome)
        yield channel, arena
    finally:
        channel.close()
        del arena


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    ready, _, _ = select.select([sock], [], [], seconds)
    if not ready:
        return False
    try:
        return sock.recv(4096) == b""
    except OSError:
        return True


# --- item 1: no pickle on the wire ---------------------------------------------------------------------


def test_a_pickle_that_sets_a_class_attribute_changes_nothing(served: _Served) -> None:
    # BUILD with a (None, slots) state calls setattr on whatever is on the stack: here the class
    # TensorRef itself, which the 0.1 allow-list resolved. Every later TensorRef would read offset 8192.
    state = pickle.dumps((None, {"offset": 8192}), protocol=2)[2:-1]
    payload = b"\x80\x02cflask_torchpool.shm\nTensorRef\n" + state + b"b."
    with _connect(served.path) as sock:
        sock.sendall(struct.pack("!i", len(payload)) + payload)
        assert _closed_within(sock, 15)
    _serves(served)


def test_nested_shared_lists_cannot_stall_the_server(served: _Served) -> None:
    bomb: list[Any] = []
    for _ in range(60):
        bomb = [bomb, bomb]  # 2^60 leaves once unflattened; a few hundred bytes pickled
    frame = pickle.dumps((0, messages.RemoteCall(1, None, (bomb,), {}, (), 5.0, False, ())))
    with _attached(served.path) as (channel, _):
        channel.conn.send_bytes(frame)
        assert _next(channel, 10) is not None, "the server is stuck decoding a small header"
    _serves(served)


# --- item 2: seals ------------------------------------------------------------------------------------


def test_a_shrunk_arena_cannot_kill_the_server(served: _Served) -> None:
    size = 1 << 20
    fd = os.memfd_create("hostile-arena", os.MFD_CLOEXEC)  # no seals
    try:
        os.ftruncate(fd, size)
        channel = _attach(served.path, fd, size)
        try:
            answer = _next(channel, 30)
            os.ftruncate(fd, 0)  # after handing it over
            if isinstance(answer, messages.Welcome):  # taken: the next read of it faults
                ref = shm.TensorRef(-1, shm.CONTROL_BYTES, 4096, "torch.float32", (1024,))
                channel.send(messages.RemoteCall(1, None, (codec.Slot(0),), {}, (ref,), 30.0, False, ()))
                _next(channel, 30)
        finally:
            channel.close()
    finally:
        os.close(fd)
    _serves(served)
    assert answer == "closed", f"an arena without seals was accepted: {answer}"
    assert "seals" in served.log()


def test_an_unsealed_one_off_segment_is_refused(served: _Served) -> None:
    fd = os.memfd_create("hostile-segment", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 4096)
        ref = shm.TensorRef(0, 0, 4096, "torch.float32", (1024,))
        with _attached(served.path) as (channel, _):
            channel.send(messages.RemoteCall(1, None, (codec.Slot(0),), {}, (ref,), 30.0, False, ()), (fd,))
            os.ftruncate(fd, 0)
            answer = _next(channel, 30)
    finally:
        os.close(fd)
    assert isinstance(answer, messages.RemoteError), answer
    assert answer.type_name == "InvalidInputError" and "seal" in answer.message
    _serves(served)


def test_a_numpy_call_naming_a_dtype_numpy_lacks_is_refused(served: _Served) -> None:
    """A call flagged numpy (Note [A pool server without torch]) is read with numpy: a bfloat16 reference
    in it is a bad header, refused like any other, and the server serves on."""
    ref = shm.TensorRef(-1, shm.CONTROL_BYTES, 8, "torch.bfloat16", (4,))
    with _attached(served.path) as (channel, _):
        channel.send(messages.RemoteCall(1, None, (codec.Slot(0),), {}, (ref,), 30.0, False, (), numpy=True))
        answer = _next(channel, 30)
    assert isinstance(answer, messages.RemoteError), answer
    assert answer.type_name == "InvalidInputError" and "numpy" in answer.message, answer
    _serves(served)


def test_our_segments_cannot_be_resized() -> None:
    fd = shm.create_memfd(1 << 16, "torchpool-test")
    try:
        for size in (0, 1 << 20):
            with pytest.raises(PermissionError):
                os.ftruncate(fd, size)
        assert shm.check_sealed(fd) == 1 << 16
    finally:
        os.close(fd)
    with open(__file__, "rb") as f, pytest.raises(shm.UnsealedSegment, match="not a memfd"):
        shm.check_sealed(f.fileno())


# --- item 3: resource exhaustion ------------------------------------------------------------------------


def test_descriptors_sent_with_bad_messages_are_closed(served: _Served) -> None:
    _serves(served)
    before = served.fds()

    def memfds(sealed: bool) -> list[int]:
        if sealed:
            return [shm.create_memfd(4096, "torchpool-hostile") for _ in range(3)]
        fds = [os.memfd_create("hostile", os.MFD_CLOEXEC) for _ in range(3)]
        for fd in fds:
            os.ftruncate(fd, 4096)
        return fds

    refs = tuple(shm.TensorRef(i, 0, 4096, "torch.uint8", (4096,)) for i in range(3))
    slots = tuple(codec.Slot(i) for i in range(3))
    for _ in range(5):
        for case in ("unsealed", "unknown model", "outside", "garbage"):
            fds = memfds(sealed=case != "unsealed")
            try:
                with _attached(served.path) as (channel, _):
                    if case == "garbage":  # a frame that announces 3 descriptors and does not decode
                        code = bytes(messages.encode(messages.StatusRequest(1)))[:1]
                        channel.conn.send_bytes(code + b"\x03!")
                        with socket.socket(fileno=os.dup(channel.fileno())) as sock:
                            reduction.sendfds(sock, fds)
                        assert _next(channel, 30) == "closed"
                        continue
                    model = "nope" if case == "unknown model" else None
                    too_big = shm.TensorRef(2, 0, 8192, "torch.uint8", (8192,))
                    call_refs = refs if case != "outside" else (*refs[:2], too_big)
                    call = messages.RemoteCall(1, model, slots, {}, call_refs, 30.0, False, ())
                    channel.send(call, tuple(fds))
                    answer = _next(channel, 30)
                    assert isinstance(answer, messages.RemoteError), (case, answer)
            finally:
                for fd in fds:
                    os.close(fd)
    assert wait_until(lambda: served.fds() <= before, timeout=10), \
        f"the server holds {served.fds() - before} more descriptors"
    _serves(served)


# 1e9 s and 30 days: finite, but past what the server's waits take (2**31 - 1 ms); they overflowed its
# manager thread.
@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 0.0, 1e9, 2_592_000.0])
def test_a_deadline_that_is_not_a_positive_number_within_the_bound_is_refused(served: _Served,
                                                                              timeout: float) -> None:
    with _attached(served.path) as (channel, arena):
        arena.view(shm.CONTROL_BYTES, 16, torch.float32, (4,)).fill_(1)
        ref = shm.TensorRef(-1, shm.CONTROL_BYTES, 16, "torch.float32", (4,))
        channel.send(messages.RemoteCall(1, None, (codec.Slot(0),), {}, (ref,), timeout, False, ()))
        answer = _next(channel, 30)
    assert not isinstance(answer, messages.Result), f"a call with timeout={timeout} ran"
    _serves(served)
    conn = PoolConnection(served.path, 1 << 20)
    try:
        with pytest.raises(ValueError, match="number of seconds > 0 and at most 1000000"):
            conn.submit(None, (torch.ones(1),), {}, timeout, False, 1 << 20)
    finally:
        conn.close()


def test_callers_deadlines_are_checked_on_every_backend() -> None:
    app = make_app(TORCHPOOL_INLINE=True)
    pool = TorchPool(app)
    with app.app_context():
        assert torch.equal(pool(torch.ones(2)), torch.ones(2))
        with pytest.raises(ValueError, match="number of seconds > 0 and at most 1000000"):
            pool.model(timeout=float("nan"))(torch.ones(2))
    pool.shutdown()


def test_a_frame_announcing_gigabytes_is_refused_at_once(served: _Served) -> None:
    with _connect(served.path) as sock:
        sock.sendall(struct.pack("!i", 2**31 - 1))
        assert _closed_within(sock, 5)
    with _attached(served.path) as (channel, _):
        with socket.socket(fileno=os.dup(channel.fileno())) as sock:
            sock.sendall(struct.pack("!i", 2**31 - 1))
        assert _next(channel, 5) == "closed"
    _serves(served)


def test_a_hello_trickled_byte_by_byte_is_cut_off(served: _Served) -> None:
    handshake = getattr(server_module, "HANDSHAKE_SECONDS", 10.0)
    data = struct.pack("!i", 1000) + bytes(1000)  # a frame of 1000 bytes, sent one byte every 0.5 s
    start = time.monotonic()
    closed = False
    with _connect(served.path) as sock:
        for byte in data:
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed = True
                break
            if _closed_within(sock, 0.5):
                closed = True
                break
            if time.monotonic() - start > handshake + 10:
                break
    assert closed, "a handshake trickled one byte every 0.5 s was never cut off"
    assert time.monotonic() - start < handshake + 5
    _serves(served)


# --- bounds that need many connections or a client that never reads: a server over a fake backend ---


class _FakePool:
    """A backend without processes: each call's future is resolved with *result*, or never."""

    def __init__(self, result: Any = None) -> None:
        self.config = SimpleNamespace(max_input_bytes=1 << 20, arena_bytes=1 << 20, timeout=5.0,
                                      retry_after=1, retries=1, name="fake")
        self.placements: list[Any] = []
        self.result = result
        self.futures: list[Future[Any]] = []

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               batch: bool = True, method: str | None = None, retries: int | None = None) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        if self.result is not None:
            future.set_result(self.result)
        self.futures.append(future)
        return future

    def shutdown(self, wait: bool = True, drain_timeout: float | None = None) -> None:
        for future in self.futures:
            if not future.done():
                future.set_exception(PoolClosedError("stopped"))

    def status(self) -> dict[str, Any]:
        return {}


@contextlib.contextmanager
def _fake_server(tmp_path: Path, result: Any = None) -> Iterator[PoolServer]:
    run = tmp_path / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    server = PoolServer({"fake": _FakePool(result)}, str(run / "fake.sock"))  # type: ignore[dict-item]
    server.start()
    try:
        yield server
    finally:
        server.stop(drain_timeout=1)


def _call(channel: Channel, call_id: int) -> None:
    channel.send(messages.RemoteCall(call_id, None, (), {}, (), 30.0, False, ()))


def test_connections_beyond_the_bound_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "MAX_CONNECTIONS", 3, raising=False)
    with _fake_server(tmp_path) as server:
        socks = [_connect(server.path) for _ in range(3)]  # in their handshake, holding their places
        try:
            with _connect(server.path) as extra:
                assert _closed_within(extra, 5)
        finally:
            for sock in socks:
                sock.close()
        # The places free up as the server's handshake threads see the sockets close.
        assert wait_until(lambda: server._connections == 0)
        with _attached(server.path):
            assert wait_until(lambda: server.clients == 1)


def test_a_client_past_the_calls_in_flight_bound_is_dropped(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "MAX_PENDING_CALLS", 5, raising=False)
    with _fake_server(tmp_path) as server, _attached(server.path) as (channel, _):
        for call_id in range(1, 7):
            _call(channel, call_id)
        assert _next(channel, 10) == "closed"
        assert wait_until(lambda: server.clients == 0)


def test_a_client_that_never_reads_is_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "SEND_TIMEOUT", 0.5, raising=False)
    with _fake_server(tmp_path, result="x" * 200_000) as server, _attached(server.path) as (channel, _):
        for call_id in range(1, 200):
            _call(channel, call_id)
        assert wait_until(lambda: server.clients == 0, timeout=20), "a client that never reads is kept"


def test_logs_name_a_client_by_its_kernel_pid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="flask_torchpool.attach.server")
    with _fake_server(tmp_path) as server:
        fd = shm.create_memfd(1 << 20, "torchpool-hostile")
        try:
            channel = Channel(Connection(_connect(server.path).detach()), messages.ATTACH_PROTOCOL)
            channel.send(messages.Hello(messages.PROTOCOL_VERSION, 1, 1 << 20), (fd,))  # claims pid 1
            try:
                assert isinstance(_next(channel, 10), messages.Welcome)
            finally:
                channel.close()
        finally:
            os.close(fd)
        conn = PoolConnection(server.path, 1 << 20)
        try:
            conn.connect()
            assert conn.server_pid == os.getpid()
        finally:
            conn.close()
    assert f"web process {os.getpid()} attached" in caplog.text
    assert "web process 1 attached" not in caplog.text


# --- item 4: the socket directory -------------------------------------------------------------------------


def test_a_symlinked_socket_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    server = PoolServer({"fake": _FakePool()}, str(link / "p.sock"))  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="TORCHPOOL_SOCKET.*symbolic link"):
        server.start()
    app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=str(link / "p.sock"), TORCHPOOL_START="lazy")
    pool = TorchPool(app)
    with app.app_context(), pytest.raises(ConfigError, match="TORCHPOOL_SOCKET.*symbolic link"):
        pool.start()


def test_a_planted_default_directory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir(mode=0o700)
    path = rendezvous.default_socket_path("app")
    assert path.startswith(str(tmp_path))
    os.symlink(elsewhere, os.path.dirname(path))  # squatted before our first start
    with pytest.raises(ConfigError, match="TORCHPOOL_SOCKET"):
        rendezvous.take_lock(path)
    assert not os.listdir(elsewhere)


def test_the_lock_file_is_not_followed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    target = tmp_path / "target"
    (run / "p.sock.lock").symlink_to(target)
    with pytest.raises(ConfigError, match="TORCHPOOL_SOCKET"):
        rendezvous.take_lock(str(run / "p.sock"))
    assert not target.exists()


def test_the_runtime_directory_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{tmp_path}/a:{tmp_path}/b")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "x"))
    assert rendezvous.default_socket_path("app").startswith(f"{tmp_path}/a/")
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    assert rendezvous.default_socket_path("app").startswith(f"{tmp_path}/x/")


# --- the decoder's budget, and the minor points -----------------------------------------------------------


def _tagged(*parts: bytes) -> bytes:
    return b"".join(parts)


@pytest.mark.parametrize("value, why", [
    (b"\x09" + struct.pack("<I", 1) * 1 + (b"\x09" + struct.pack("<I", 1)) * 5000 + b"\x00", "nested"),
    (b"\x09" + struct.pack("<I", 2**32 - 1), "announces"),
    (b"\x07" + struct.pack("<I", 2**31), "announces"),
    (b"\x04" + struct.pack("<I", 100_000) + bytes(100_000), "int of"),
    (b"\x0c" + struct.pack("<I", 0), "tensor 0 of 0"),
    (b"\x0b" + struct.pack("<I", 1) + b"\x09" + struct.pack("<I", 0) + b"\x00", "dict key"),
    (b"\x63", "unknown value tag"),
    (b"\x03\x01", "middle of a value"),
])
def test_the_decoder_refuses_headers_past_its_budget(value: bytes, why: str) -> None:
    frame = bytes([24, 0]) + value  # a StatusRequest whose fields are *value*
    with pytest.raises(messages.ProtocolError, match=why):
        messages.decode(frame, messages.ATTACH_PROTOCOL)


def test_tensor_records_are_checked() -> None:
    ref = shm.TensorRef(-1, 4096, 16, "torch.float32", (4,))
    call = messages.RemoteCall(1, None, (codec.Slot(0),), {}, (ref,), 1.0, True, (64,))
    good = bytes(messages.encode(call))
    assert messages.decode(good, messages.ATTACH_PROTOCOL)[1].refs == (ref,)
    record = good.index(struct.pack("<iQQBB", -1, 4096, 16, 0, 1))
    for offset, patch, why in [(20, b"\xff", "unknown dtype"), (21, b"\x40", "dimensions"),
                               (22, struct.pack("<q", -4), "shape"), (0, struct.pack("<i", 3), "one-off"),
                               (0, struct.pack("<i", -2), "segment -2")]:
        bad = good[:record + offset] + patch + good[record + offset + len(patch):]
        with pytest.raises(messages.ProtocolError, match=why):
            messages.decode(bad, messages.ATTACH_PROTOCOL)
    with pytest.raises(messages.ProtocolError, match="left over"):
        messages.decode(good + b"\x00", messages.ATTACH_PROTOCOL)


def test_inline_tensor_records_are_checked() -> None:
    """Note [Inline tensors]: inline references lie in order and back to back over bytes the frame
    carries, none empty; only Call, Result and StreamChunk carry them."""
    refs = (shm.TensorRef(shm.INLINE, 0, 16, "torch.float32", (4,)),
            shm.TensorRef(-1, 4096, 16, "torch.float32", (4,)),
            shm.TensorRef(shm.INLINE, 16, 8, "torch.int64", (1,)))
    call = messages.Call(1, (codec.Slot(0), codec.Slot(1), codec.Slot(2)), {}, refs, (),
                         inline=bytes(range(24)))
    good = bytes(messages.encode(call))
    assert messages.decode(good, messages.LANE_PROTOCOL)[1] == call
    third = good.index(struct.pack("<iQQBB", shm.INLINE, 16, 8, codec.DTYPE_NAME_CODES["torch.int64"], 1))
    for offset, patch, why in [(4, struct.pack("<Q", 17), "back to back"),
                               (4, struct.pack("<Q", 0), "back to back"),
                               (12, struct.pack("<Q", 0), "inline tensor of 0 bytes"),
                               (12, struct.pack("<Q", 1 << 40), "inline tensor of 1099511627776 bytes"),
                               (12, struct.pack("<Q", len(good)), "too short"),
                               (12, struct.pack("<Q", 9), "left over")]:
        bad = good[:third + offset] + patch + good[third + offset + len(patch):]
        with pytest.raises(messages.ProtocolError, match=why):
            messages.decode(bad, messages.LANE_PROTOCOL)
    with pytest.raises(messages.ProtocolError, match="too short"):
        messages.decode(good[:good.index(bytes(range(24)))], messages.LANE_PROTOCOL)
    remote = messages.RemoteCall(1, None, (codec.Slot(0),), {}, refs[:1], 1.0, False, ())
    with pytest.raises(messages.ProtocolError, match="segment -3"):
        messages.decode(bytes(messages.encode(remote)), messages.ATTACH_PROTOCOL)


def test_random_bytes_only_ever_raise_protocol_errors() -> None:
    rng = random.Random(11)
    samples = [bytes(messages.encode(m)) for m in (
        messages.RemoteCall(1, "m", (codec.Slot(0), [1, 2.5, "x"]), {"k": b"v"},
                            (shm.TensorRef(-1, 4096, 16, "torch.float32", (2, 2)),), 2.0, False, (64,)),
        messages.StatusReply(3, {"a": [1, None, (True, 1j)], 2: {"b": "c"}}),
        messages.Hello(2, 1, 1 << 20))]
    lane_sample = bytes(messages.encode(messages.Call(
        1, (codec.Slot(0), codec.Slot(1)), {}, (shm.TensorRef(shm.INLINE, 0, 16, "torch.float32", (2, 2)),
                                                 shm.TensorRef(shm.INLINE, 16, 8, "torch.uint8", (8,))),
        (64,), None, 0, 2.0, bytes(24))))
    for protocol, choices in [(messages.ATTACH_PROTOCOL, samples), (messages.LANE_PROTOCOL, [lane_sample])]:
        for _ in range(3000):
            data = bytearray(rng.choice(choices))
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.3:
                del data[rng.randrange(len(data)):]
            try:
                _, msg = messages.decode(bytes(data), protocol)
            except messages.ProtocolError:
                continue
            assert type(msg).__module__ == "flask_torchpool.messages"
            if type(msg) is messages.Call:  # the inline bytes are exactly those its references name
                assert len(msg.inline) == sum(r.nbytes for r in msg.refs if r.seg == shm.INLINE)


def test_every_message_survives_the_trip() -> None:
    ref = shm.TensorRef(-1, 4096, 16, "torch.float32", (2, 2))
    alias = shm.TensorRef(shm.INPUT_ALIAS, 4096, 16, "torch.int32", (4,))
    for protocol, msg, nfds in [
        (messages.WORKER_PROTOCOL, messages.Call(1, (codec.Slot(0), 2**70), {"a": -1.5}, (ref,), (64,)), 0),
        (messages.WORKER_PROTOCOL, messages.Result(2, {"y": codec.Slot(0)}, (alias,)), 0),
        (messages.LANE_PROTOCOL, messages.Result(2, (codec.Slot(0), codec.Slot(1)),
                                                 (alias, shm.TensorRef(shm.INLINE, 0, 4, "torch.int32", ())),
                                                 b"\x01\x02\x03\x04"), 0),
        (messages.WORKER_PROTOCOL, messages.StreamChunk(
            2, codec.Slot(0), (shm.TensorRef(shm.INLINE, 0, 2, "torch.int16", (1,)),), b"\x05\x06"), 0),
        (messages.WORKER_PROTOCOL, messages.Failure(3, "InferenceError", "boom", None, {"k": 1}, "tb"), 0),
        (messages.WORKER_PROTOCOL, messages.Ready(4, {"device": "cpu", "cores": [0, 1]}), 0),
        (messages.WORKER_PROTOCOL, messages.Adopt(True, False), 1),
        (messages.ATTACH_PROTOCOL, messages.Welcome(2, 5, None, {"m": {"workers": [("cpu", (0,))]}}), 0),
        (messages.ATTACH_PROTOCOL, messages.RemoteCall(6, None, ("é\udc80", b""), {}, (), None, True, ()), 0),
        (messages.ATTACH_PROTOCOL, messages.RemoteCall(7, "m", (codec.Slot(0),), {}, (ref,), 2.5, False, (1,),
                                                       "generate", True, True), 0),
    ]:
        assert messages.decode(bytes(messages.encode(msg, nfds)), protocol) == (nfds, msg)


def test_the_dtype_table_does_not_grow() -> None:
    assert codec.dtype_from_name("torch.float32") is torch.float32
    for i in range(100):
        with pytest.raises(codec.UnsupportedValue, match="unknown dtype"):
            codec.dtype_from_name(f"evil{i}.float32")
    with pytest.raises(codec.UnsupportedValue, match="unknown dtype"):
        codec.dtype_from_name("torch.Tensor")


def test_str_and_bytes_count_against_max_input_bytes() -> None:
    with pytest.raises(PayloadTooLargeError, match="str/bytes"):
        codec.flatten_call(("x" * 100,), {}, 50)
    with pytest.raises(PayloadTooLargeError, match="TORCHPOOL_MAX_INPUT_BYTES"):
        codec.flatten_call((), {"data": [b"y" * 40, torch.ones(4)]}, 50)
    codec.flatten_call(("x" * 40,), {}, 50)
    app = make_app(TORCHPOOL_INLINE=True, TORCHPOOL_MAX_INPUT_BYTES=50)
    pool = TorchPool(app)
    with app.app_context(), pytest.raises(PayloadTooLargeError):
        pool(b"z" * 100)
    pool.shutdown()
