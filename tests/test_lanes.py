"""Direct calls in attach mode (Note [Lanes]): lanes from web processes straight to the workers.

One pool server in this process (one echo worker) for the module; each test attaches its own
:class:`PoolConnection` (a web process's) and closes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import pytest
import torch

from flask_torchpool import codec, lanes, messages, shm
from flask_torchpool.attach.client import PoolConnection
from flask_torchpool.attach.lanes import _Call
from flask_torchpool.attach.server import PoolServer
from flask_torchpool.deadlines import SLACK
from flask_torchpool.errors import (
    InferenceTimeoutError,
    InvalidInputError,
    PoolClosedError,
    PoolUnavailableError,
    WorkerCrashedError,
)

from .conftest import Gate, wait_until
from .crash_models import PROBE, open_gate, wait_started
from .reload_models import write_model
from .servers import pool_server, private_socket

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolServer]:
    with pool_server(private_socket(tmp_path_factory.mktemp("lanes")), TORCHPOOL_WORKERS=1,
                     TORCHPOOL_ARENA_BYTES=8 << 20) as server:
        yield server


@pytest.fixture
def conn(served: PoolServer) -> Iterator[PoolConnection]:
    c = PoolConnection(served.path, 1 << 20)
    c.connect()
    yield c
    c.close()


def _call(conn: PoolConnection, *args: object, timeout: float = 30.0, waiter: bool = False,
          **kwargs: object) -> Future:
    return conn.submit(None, args, kwargs, timeout, False, 1 << 20, waiter=waiter)


def _worker_pid(served: PoolServer) -> int | None:
    return served.pools["default"].workers[0].pid  # type: ignore[attr-defined]


def test_a_plain_call_goes_straight_to_the_worker_and_is_counted(served: PoolServer,
                                                                  conn: PoolConnection) -> None:
    lane = conn.lanes.pick("default")
    assert lane is not None, "attaching gave no lane"
    pool = served.pools["default"]
    before = pool.status()
    arena = pool.workers[0].arena  # type: ignore[attr-defined]
    direct = int(arena.control[lanes.CTRL_LANE_CALLS])
    assert torch.equal(_call(conn, torch.arange(4.0)).result(30), torch.arange(4.0))
    assert int(arena.control[lanes.CTRL_LANE_CALLS]) == direct + 1, "the call went through the server"
    assert pool.status()["workers"][0]["calls"] == before["workers"][0]["calls"] + 1
    status = conn.status()   # the outcome is reported before the status is taken
    ok = status["models"]["default"]["metrics"]["calls"]["ok"]
    assert ok >= before["metrics"]["calls"]["ok"] + 1


def test_a_forged_reference_fails_its_call_only(served: PoolServer, conn: PoolConnection) -> None:
    lane = conn.lanes.pick("default")
    assert lane is not None
    pid = _worker_pid(served)
    outside = shm.TensorRef(-1, 64 << 20, 4096, "torch.uint8", (4096,))   # past the end of the lane arena
    forged: Future = Future()
    with conn.lanes._lock:
        lane.calls[10**9] = _Call(forged, [], 0.0, lambda retried=False: forged)
    lane.channel.send(messages.Call(10**9, (codec.Slot(0),), {}, (outside,), ()))
    with pytest.raises(InvalidInputError, match="could not read the inputs"):
        forged.result(10)
    assert torch.equal(_call(conn, torch.ones(3)).result(30), torch.ones(3))
    assert _worker_pid(served) == pid, "the worker was replaced"


def test_a_forged_inline_reference_fails_its_call_only(served: PoolServer, conn: PoolConnection) -> None:
    """Note [Inline tensors]: a reference whose size does not match its shape, with the bytes it names
    in the message, fails that call (the worker stays)."""
    lane = conn.lanes.pick("default")
    assert lane is not None
    pid = _worker_pid(served)
    short = shm.TensorRef(shm.INLINE, 0, 8, "torch.float32", (4,))
    forged: Future = Future()
    with conn.lanes._lock:
        lane.calls[10**9 + 1] = _Call(forged, [], 0.0, lambda retried=False: forged)
    lane.channel.send(messages.Call(10**9 + 1, (codec.Slot(0),), {}, (short,), (), inline=bytes(8)))
    with pytest.raises(InvalidInputError, match="could not read the inputs.*does not match"):
        forged.result(10)
    assert torch.equal(_call(conn, torch.ones(3)).result(30), torch.ones(3))
    assert _worker_pid(served) == pid, "the worker was replaced"


def test_a_small_answer_comes_in_the_message_and_leaves_nothing_to_release(served: PoolServer,
                                                                          conn: PoolConnection) -> None:
    """Note [Inline tensors]: a small output is not written into the lane's arena, so the web process has
    no block to give back; a bigger one is, and is given back with the next call."""
    lane = conn.lanes.pick("default")
    assert lane is not None
    lane.releases.drain()
    small = _call(conn, torch.arange(4.0)).result(30)
    assert torch.equal(small, torch.arange(4.0))
    small.add_(1)  # the caller's own copy
    assert lane.releases.drain() == ()
    array = _call(conn, np.arange(4.0)).result(30)
    assert isinstance(array, np.ndarray) and array.flags.writeable and np.array_equal(array, np.arange(4.0))
    assert lane.releases.drain() == ()
    big = torch.arange(float(shm.INLINE_MAX_BYTES))  # 4x the bound: through the arena
    assert torch.equal(_call(conn, big).result(30), big)
    assert len(lane.releases.drain()) == 1


def test_a_worker_closing_a_lane_again_leaves_another_lane_with_its_number_alone() -> None:
    """A lane's descriptor number is reused by the next one opened; an event of the closed lane handled
    later (one poll of the worker's loop can carry both) must not close the new lane under that number."""
    from flask_torchpool.channel import Channel
    from flask_torchpool.worker import _Server

    def lane_fds() -> tuple[list[int], socket.socket]:
        ours, theirs = socket.socketpair()
        fds = [os.dup(ours.fileno()), shm.create_memfd(1 << 16, "torchpool-test-lane")]
        ours.close()
        return fds, theirs

    alarm = signal.getsignal(signal.SIGALRM)  # pytest-timeout's: a worker's first lane resets it
    pool_end, worker_end = socket.socketpair()
    arena_fd = shm.create_memfd(1 << 20, "torchpool-test-arena")
    server = _Server(Channel(Connection(os.dup(worker_end.fileno())), messages.WORKER_PROTOCOL),
                     shm.Arena(arena_fd, 1 << 20), torch.nn.Identity(), "cpu")
    os.close(arena_fd)
    first_fds, first_far = lane_fds()
    server._open_lane(messages.OpenLane(1, 1 << 20), first_fds)
    (first,) = server.lanes.values()
    server._close_lane(first)
    second_fds, second_far = lane_fds()
    server._open_lane(messages.OpenLane(2, 1 << 20), second_fds)
    (second,) = server.lanes.values()
    server.lanes = {first.fd: second}  # the second lane under the first one's number, as when it is reused
    server._close_lane(first)          # the first lane's stale event: nothing to do
    assert server.lanes == {first.fd: second}
    for sock in (pool_end, worker_end, first_far, second_far):
        sock.close()
    second.channel.close()
    signal.signal(signal.SIGALRM, alarm)


def test_a_hostile_message_on_a_lane_closes_that_lane_only(served: PoolServer, conn: PoolConnection) -> None:
    other = PoolConnection(served.path, 1 << 20)
    other.connect()
    try:
        lane = other.lanes.pick("default")
        assert lane is not None
        pid = _worker_pid(served)
        lane.channel.send(messages.Result(1, None, ()))          # not what a web process may send
        assert wait_until(lambda: other.lanes.pick("default") is None, timeout=10), "the lane stayed open"
        assert torch.equal(_call(conn, torch.ones(2)).result(30), torch.ones(2))
        # The hostile process still gets answers, through the server.
        assert torch.equal(_call(other, torch.ones(2)).result(30), torch.ones(2))
        assert _worker_pid(served) == pid, "the worker was replaced"
    finally:
        other.close()


def test_a_far_off_deadline_on_a_lane_does_not_end_the_worker(served: PoolServer,
                                                              conn: PoolConnection) -> None:
    """A web process sends deadlines at most MAX_TIMEOUT ahead; one a peer sent 10**15 s ahead overflowed
    the worker's setitimer, and the exception ended the worker (and every lane's call on it)."""
    pid = _worker_pid(served)
    lane = conn.lanes.pick("default")
    assert lane is not None
    lane.channel.send(messages.Call(10**9, (2.0,), {}, (), (), None, 0, time.monotonic() + 1e15, b""))
    assert torch.equal(_call(conn, torch.ones(2)).result(30), torch.ones(2))   # queued behind it, same lane
    assert _worker_pid(served) == pid, "the worker was replaced"
    assert conn.lanes.pick("default") is lane


def test_calls_queued_behind_a_crash_are_sent_again_and_served(served: PoolServer,
                                                              conn: PoolConnection) -> None:
    lane = conn.lanes.pick("default")
    assert lane is not None
    crash = _call(conn, torch.ones(1), action="exit")
    queued = [_call(conn, torch.full((2,), float(i))) for i in range(3)]
    with pytest.raises(Exception) as info:
        crash.result(60)
    assert type(info.value).__name__ == "WorkerCrashedError", info.value
    for i, future in enumerate(queued):
        assert torch.equal(future.result(60), torch.full((2,), float(i)))
    # The replacement offers a lane again.
    assert wait_until(lambda: conn.lanes.pick("default") is not None, timeout=30)


def test_a_lane_that_ends_just_before_its_server_shows_gone_fails_its_call_as_unavailable(
        served: PoolServer, conn: PoolConnection, monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker ends with its server (PDEATHSIG) and its lane can close before /proc shows the server
    # gone. Here the server "ends" only after the lane dropped: the running call must still say so.
    lane = conn.lanes.pick("default")
    assert lane is not None
    dropped = threading.Event()
    real_drop = conn.lanes._drop

    def drop(ended_lane: object) -> None:
        real_drop(ended_lane)  # type: ignore[arg-type]
        dropped.set()

    gone = PoolUnavailableError("the pool server ended (test)", retry_after=1)
    monkeypatch.setattr(conn.lanes, "_drop", drop)
    monkeypatch.setattr(conn.lanes, "_server_gone", lambda: gone if dropped.is_set() else None)
    crash = _call(conn, torch.ones(1), action="exit")
    with pytest.raises(PoolUnavailableError) as info:
        crash.result(60)
    assert info.value is gone
    monkeypatch.undo()
    assert wait_until(lambda: conn.lanes.pick("default") is not None, timeout=30)


def test_a_busy_lane_keeps_no_deadline_of_a_finished_call(served: PoolServer, conn: PoolConnection) -> None:
    # Note [Finished deadlines]: every call has a deadline 30 s away and finishes in milliseconds.
    assert conn.lanes.pick("default") is not None
    for i in range(3 * SLACK):
        assert torch.equal(_call(conn, torch.full((2,), float(i))).result(30), torch.full((2,), float(i)))
    assert len(conn.lanes._deadlines) <= 2 * SLACK


def test_a_direct_call_past_its_deadline_ends_its_worker_which_is_replaced(served: PoolServer,
                                                                            conn: PoolConnection) -> None:
    assert conn.lanes.pick("default") is not None
    pid = _worker_pid(served)
    with pytest.raises(InferenceTimeoutError, match="deadline"):
        _call(conn, torch.ones(1), action="sleep", seconds=30, timeout=0.3).result(30)
    assert wait_until(lambda: _worker_pid(served) not in (None, pid)
                      and served.pools["default"].status()["workers"][0]["state"] == "ready", timeout=30)
    last_exit = served.pools["default"].status()["workers"][0]["last_exit"] or ""
    assert "SIGALRM" in last_exit and "direct call" in last_exit, last_exit
    assert torch.equal(_call(conn, torch.ones(2)).result(30), torch.ones(2))


def test_a_worker_whose_alarm_beats_the_callers_own_expiry_still_reports_a_timeout(
        served: PoolServer, conn: PoolConnection, monkeypatch: pytest.MonkeyPatch) -> None:
    # Both processes act at the same deadline (Note [Lanes]). Here the web process never expires the
    # call itself, so the worker's SIGALRM always ends the lane first: the caller must see the timeout,
    # not WorkerCrashedError (the CI failure of test_conformance.py::test_deadlines[attach]).
    assert conn.lanes.pick("default") is not None
    pid = _worker_pid(served)
    monkeypatch.setattr(conn.lanes, "_expire", lambda now: None)
    with pytest.raises(InferenceTimeoutError, match="running in worker 0"):
        _call(conn, torch.ones(1), action="sleep", seconds=30, timeout=0.3).result(30)
    monkeypatch.undo()
    assert wait_until(lambda: _worker_pid(served) not in (None, pid)
                      and served.pools["default"].status()["workers"][0]["state"] == "ready", timeout=30)
    assert torch.equal(_call(conn, torch.ones(2)).result(30), torch.ones(2))


def test_stopping_the_server_drains_the_calls_on_lanes(tmp_path: Path) -> None:
    """SIGTERM drains (deploying.rst): a call running on a lane finishes within the drain timeout, and a
    call made meanwhile is refused by the server. The pool saw no call of its own and stopped its
    workers at once (Stop, 2 s, SIGTERM, 1 s, SIGKILL), so a 5 s lane call failed as a crash."""
    with pool_server(private_socket(tmp_path), TORCHPOOL_WORKERS=1, TORCHPOOL_ARENA_BYTES=8 << 20) as server:
        c = PoolConnection(server.path, 1 << 20)
        try:
            c.connect()
            lane = c.lanes.pick("default")
            assert lane is not None
            running = _call(c, torch.ones(2), action="sleep", seconds=5)
            assert wait_until(lambda: int(lane.words[lanes.CTRL_RUNNING]) != 0, timeout=30)
            stopping = threading.Thread(target=server.stop, kwargs={"drain_timeout": 30})
            started = time.monotonic()
            stopping.start()
            assert wait_until(lambda: not lane.open, timeout=10), "the worker did not stop the lane"
            with pytest.raises(PoolClosedError):
                _call(c, torch.ones(1)).result(30)
            assert torch.equal(running.result(30), torch.ones(2))
            stopping.join(30)
            assert not stopping.is_alive() and time.monotonic() - started < 20
        finally:
            c.close()


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolServer]:
    """Two workers of the crash tests' probe model, TORCHPOOL_RETRIES 1 (the default)."""
    with pool_server(private_socket(tmp_path_factory.mktemp("probed")), TORCHPOOL_MODEL=PROBE,
                     TORCHPOOL_WORKERS=2, TORCHPOOL_ARENA_BYTES=8 << 20) as server:
        yield server


def _pids(server: PoolServer) -> set[int]:
    return {w["pid"] for w in server.pools["default"].status()["workers"] if w["state"] == "ready"}


def test_a_direct_call_whose_worker_dies_is_retried_through_the_server(probed: PoolServer,
                                                                       tmp_path: Path) -> None:
    """TORCHPOOL_RETRIES holds for direct calls too: kill -9 of the worker running one, and its caller
    gets the answer from another worker (a 503 before: a helper's probe, 8 of 8)."""
    assert wait_until(lambda: len(_pids(probed)) == 2, timeout=60)
    c = PoolConnection(probed.path, 1 << 20)
    try:
        c.connect()
        assert c.lanes.pick("default") is not None
        future = _call(c, torch.ones(2), mark=str(tmp_path), hold=str(tmp_path))
        (victim,) = wait_started(tmp_path)
        os.kill(victim, signal.SIGKILL)
        open_gate(tmp_path)
        answer = future.result(60)
        assert answer["pid"] != victim and torch.equal(answer["out"], torch.ones(2)), answer
    finally:
        c.close()


def test_a_direct_call_that_kills_every_worker_costs_one_retry_and_says_why(probed: PoolServer) -> None:
    """A poison input costs 1 + TORCHPOOL_RETRIES deaths in attach mode as embedded (the server's pool
    gets one retry fewer), and the error that ends it has the death's details, from the server."""
    assert wait_until(lambda: len(_pids(probed)) == 2, timeout=60)
    before = sum(w["restarts"] for w in probed.pools["default"].status()["workers"])
    c = PoolConnection(probed.path, 1 << 20)
    try:
        c.connect()
        assert c.lanes.pick("default") is not None
        with pytest.raises(WorkerCrashedError) as info:
            _call(c, torch.ones(1), action="sigkill").result(60)
        assert (info.value.exitcode, info.value.signal) == (-9, "SIGKILL"), info.value
        assert wait_until(lambda: len(_pids(probed)) == 2, timeout=60)
        assert sum(w["restarts"] for w in probed.pools["default"].status()["workers"]) == before + 2
    finally:
        c.close()


def test_direct_calls_can_be_turned_off(tmp_path: Path) -> None:
    with pool_server(private_socket(tmp_path), TORCHPOOL_WORKERS=1, TORCHPOOL_DIRECT_CALLS=False) as server:
        c = PoolConnection(server.path, 1 << 20)
        try:
            c.connect()
            assert c.lanes.pick("default") is None
            assert torch.equal(_call(c, torch.ones(2)).result(30), torch.ones(2))
            arena = server.pools["default"].workers[0].arena  # type: ignore[attr-defined]
            assert server.pools["default"].status()["workers"][0]["calls"] == 1
            assert int(arena.control[lanes.CTRL_LANE_CALLS]) == 0
        finally:
            c.close()


def test_no_direct_call_fails_or_reaches_the_old_version_across_a_reload(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.syspath_prepend(str(models))
    with pool_server(private_socket(tmp_path), TORCHPOOL_WORKERS=2,
                     TORCHPOOL_MODEL=write_model(models, 1)) as server:
        c = PoolConnection(server.path, 1 << 20)
        stop = threading.Event()
        answers: list[tuple[float, float]] = []
        failures: list[BaseException] = []

        def load() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    answers.append((sent, float(_call(c, torch.zeros(2)).result(30)[0])))
                except Exception as exc:  # noqa: BLE001 - collected and asserted on
                    failures.append(exc)

        try:
            c.connect()
            assert c.lanes.pick("default") is not None
            threads = [threading.Thread(target=load) for _ in range(4)]
            for t in threads:
                t.start()
            assert wait_until(lambda: len(answers) >= 20, timeout=30)
            write_model(models, 2)
            server.pools["default"].reload()
            returned = time.monotonic()
            seen = len(answers)
            assert wait_until(lambda: len(answers) >= seen + 40, timeout=60)
            stop.set()
            for t in threads:
                t.join(60)
            assert failures == []
            assert {v for _, v in answers} == {1.0, 2.0}
            late = [v for sent, v in answers if sent > returned]
            assert late and set(late) == {2.0}, "an answer from the old version after reload() returned"
            assert c.lanes.pick("default") is not None, "no lane to the new version's workers"
        finally:
            stop.set()
            c.close()


def test_a_worker_frozen_under_a_direct_call_is_killed_and_replaced(served: PoolServer,
                                                                    conn: PoolConnection) -> None:
    assert conn.lanes.pick("default") is not None
    pid = _worker_pid(served)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)   # its alarm cannot end it: a stopped process takes no signal but KILL
    try:
        with pytest.raises(InferenceTimeoutError, match="deadline"):
            _call(conn, torch.ones(1), timeout=0.5).result(30)
        assert wait_until(lambda: _worker_pid(served) not in (None, pid)
                          and served.pools["default"].status()["workers"][0]["state"] == "ready", timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    last_exit = served.pools["default"].status()["workers"][0]["last_exit"] or ""
    assert "stopped" in last_exit, last_exit
    assert torch.equal(_call(conn, torch.ones(2)).result(30), torch.ones(2))


def _record_readers(conn: PoolConnection, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads that read each message of a lane, from now on."""
    readers: list[str] = []
    real_read = conn.lanes._read_one

    def read_one(lane: object) -> bool:
        readers.append(threading.current_thread().name)
        return real_read(lane)  # type: ignore[arg-type]

    monkeypatch.setattr(conn.lanes, "_read_one", read_one)
    return readers


@pytest.mark.parametrize("waiter", [False, True])
def test_a_waiting_caller_reads_its_own_answers(served: PoolServer, conn: PoolConnection,
                                                monkeypatch: pytest.MonkeyPatch, waiter: bool) -> None:
    # Note [One wake-up per reply]: the thread in result() reads its lane; the reader thread is not woken.
    # Note [Claimed lanes]: a caller that says it waits reads every one of its answers.
    assert conn.lanes.pick("default") is not None
    readers = _record_readers(conn, monkeypatch)
    for i in range(200):
        x = torch.full((2,), float(i))
        assert torch.equal(_call(conn, x, waiter=waiter).result(30), x)
    ours = readers.count(threading.current_thread().name)
    assert ours >= (200 if waiter else 100), f"the caller read {ours} of 200 answers: {sorted(set(readers))}"


def test_an_answer_that_comes_before_its_waiter_asks_is_left_to_it(served: PoolServer, conn: PoolConnection,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Note [Claimed lanes]: the worker answers before result() is called; the reader thread, not woken,
    # leaves the answer on the lane, and gives it back to the reader thread once result() read it.
    lane = conn.lanes.pick("default")
    assert lane is not None
    readers = _record_readers(conn, monkeypatch)
    x = torch.arange(5.0)
    claimed = _call(conn, x, waiter=True)
    assert lane.channel.poll(30), "no answer"
    assert not wait([claimed], timeout=0.5).done, "another thread read the answer of a claimed lane"
    assert torch.equal(claimed.result(30), x)
    assert readers == [threading.current_thread().name]
    later = _call(conn, x + 1)  # nobody calls result(): the reader thread must read it
    assert wait([later], timeout=30).done, "the lane was not given back to the reader thread"
    assert torch.equal(later.result(0), x + 1)


def test_a_claimed_call_whose_wait_times_out_gives_its_lane_back(served: PoolServer,
                                                                 conn: PoolConnection) -> None:
    assert conn.lanes.pick("default") is not None
    x = torch.ones(3)
    claimed = _call(conn, x, waiter=True, action="sleep", seconds=0.3)
    with pytest.raises(TimeoutError):
        claimed.result(0.01)
    assert wait([claimed], timeout=30).done, "nobody read the answer after its waiter gave up"
    assert torch.equal(claimed.result(0), x)
    assert torch.equal(_call(conn, x, waiter=True).result(30), x)


def test_threads_sharing_a_lane_each_get_their_own_answer(served: PoolServer, conn: PoolConnection) -> None:
    # Some threads read in result() (half of their calls claiming the lane from submit on), some only
    # wait for the future (the reader thread or another caller answers them), and some only get a
    # callback: the token passes between all of them.
    assert conn.lanes.pick("default") is not None
    wrong: list[object] = []

    def caller(k: int) -> None:
        for i in range(60):
            x = torch.full((3,), float(1000 * k + i))
            future = _call(conn, x, waiter=k % 3 == 0 and i % 2 == 0)
            if k % 3 == 0:
                value = future.result(30)
            elif k % 3 == 1:
                wait([future], timeout=30)
                value = future.result(0)
            else:
                done = threading.Event()
                future.add_done_callback(lambda f, done=done: done.set())
                assert done.wait(30)
                value = future.result(0)
            if not torch.equal(value, x):
                wrong.append((k, i, value))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert wrong == []
    lane = conn.lanes.pick("default")
    assert lane is not None and wait_until(lambda: not lane.calls, timeout=10)


def test_a_cancelled_queued_direct_call_is_dropped_by_its_worker(served: PoolServer,
                                                                 conn: PoolConnection) -> None:
    lane = conn.lanes.pick("default")
    assert lane is not None
    before = conn.status()["models"]["default"]["metrics"]["calls"].get("cancelled", 0)
    busy = _call(conn, torch.ones(1), action="sleep", seconds=0.5)
    queued = _call(conn, torch.ones(1))
    assert queued.cancel()
    assert torch.equal(busy.result(30), torch.ones(1))
    assert wait_until(lambda: not lane.calls, timeout=10), "the worker did not answer the cancelled call"
    after = conn.status()["models"]["default"]["metrics"]["calls"].get("cancelled", 0)
    assert after == before + 1


def test_two_threads_never_take_the_same_idle_lane(tmp_path: Path) -> None:
    """A lane taken for a call counts it at once, before it is sent: two threads sending at the same time
    go to the two idle workers, not both to the first (they did: each saw it idle before the other's call
    was registered)."""
    with pool_server(private_socket(tmp_path), TORCHPOOL_WORKERS=2) as server:
        c = PoolConnection(server.path, 1 << 20)
        c.connect()
        try:
            assert wait_until(lambda: len(c.lanes._by_model.get("default", [])) == 2, timeout=30)
            both = threading.Barrier(2, timeout=30)
            taken: list[object] = [None, None]

            def take(i: int) -> None:
                both.wait()
                taken[i] = c.lanes.take("default")

            threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            first, second = taken
            assert first is not None and second is not None and first is not second
            assert (first.load(), second.load()) == (1, 1)  # type: ignore[attr-defined]
            for lane in (first, second):
                c.lanes.unpick(lane)  # type: ignore[arg-type]
            assert (first.load(), second.load()) == (0, 0)  # type: ignore[attr-defined]
            # Calls: two at once run in the two workers.
            pids = {f.result(30) for f in [_call(c, torch.ones(1), action="pid") for _ in range(2)]}
            assert len(pids) == 2
        finally:
            c.close()


def test_a_lane_opened_while_a_stream_runs_shows_its_worker_full(tmp_path: Path) -> None:
    """A web process that attaches while a worker runs a stream gets a lane that shows the worker full,
    and the lanes it had still do (opening a lane wrote the worker's queue length over them)."""
    with pool_server(private_socket(tmp_path), TORCHPOOL_MODEL="tests.stream_models:counter",
                     TORCHPOOL_STREAM_BUFFER=1) as server:
        first = PoolConnection(server.path, 1 << 20)
        first.connect()
        second = PoolConnection(server.path, 1 << 20)
        try:
            assert wait_until(lambda: first.lanes.pick("default") is not None, timeout=30)
            lane = first.lanes.pick("default")
            assert lane is not None
            # One chunk ahead of its reader: the worker waits for credit, reading the pool's channel.
            stream = first.stream(None, (3,), {}, 30.0, None, server.pools["default"].config)
            assert int(next(stream)) == 0
            second.connect()   # its lane is opened in the worker while the stream runs
            assert wait_until(lambda: second.lanes._by_model.get("default"), timeout=30)
            [late] = second.lanes._by_model["default"]
            assert wait_until(lambda: late.load() == lanes.FULL_LOAD, timeout=10), late.load()
            assert lane.load() == lanes.FULL_LOAD
            assert [int(x) for x in stream] == [1, 2]
            assert wait_until(lambda: (lane.load(), late.load()) == (0, 0), timeout=10)
        finally:
            second.close()
            first.close()


def test_a_worker_running_a_stream_takes_no_direct_call(tmp_path: Path) -> None:
    """While a worker runs a stream its lanes show it full: a call goes through the server's queue, where
    any worker that frees up takes it, instead of waiting on the lane behind the stream."""
    gate = Gate(tmp_path)
    with pool_server(private_socket(tmp_path), TORCHPOOL_MODEL="tests.stream_models:counter") as server:
        c = PoolConnection(server.path, 1 << 20)
        c.connect()
        try:
            assert wait_until(lambda: c.lanes.pick("default") is not None, timeout=30)
            lane = c.lanes.pick("default")
            assert lane is not None and lane.load() == 0
            config = server.pools["default"].config
            stream = c.stream(None, (2,), {"gate": str(gate), "gate_at": 1}, 30.0, None, config)
            assert int(next(stream)) == 0
            assert lane.load() == lanes.FULL_LOAD and c.lanes.pick("default") is None
            queued = c.submit(None, (), {}, 30.0, False, 1 << 20, method="pid")
            gate.open()
            assert [int(x) for x in stream] == [1]
            assert queued.result(30) == _worker_pid(server)
            assert wait_until(lambda: lane.load() == 0, timeout=10), "the load stayed full after the stream"
        finally:
            c.close()
