"""Streams (issue 13): a model that yields, iterated by the caller through the process pool.

Every test drives real worker processes. The generator (``tests.stream_models.Counter``) writes a line to a
log file before each chunk it makes and one in its ``finally``, so what the worker did is read from there,
never inferred from time; it waits at FIFO gates (``tests.conftest.Gate``) where a test needs it to.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from flask import Flask, Response, stream_with_context
from werkzeug.serving import make_server

from flask_torchpool import (
    InferenceError,
    InferenceTimeoutError,
    OutputError,
    TorchPool,
    WorkerCrashedError,
)
from flask_torchpool.streaming import Stream

from .conftest import Gate, make_app, shared_mappings, wait_until
from .servers import free_port, running, server_env

pytestmark = pytest.mark.timeout(120)

WINDOW = 3


def lines(log: Path) -> list[str]:
    try:
        return log.read_text().splitlines()
    except FileNotFoundError:
        return []


def made(log: Path) -> int:
    return sum(1 for line in lines(log) if line.startswith("made"))


@pytest.fixture(scope="module")
def stream_app() -> Iterator[Flask]:
    """One worker, so that a stream that is not stopped would hold up every later call."""
    app = make_app(TORCHPOOL_MODEL="tests.stream_models:counter", TORCHPOOL_WORKERS=1,
                   TORCHPOOL_STREAM_BUFFER=WINDOW)
    pool = TorchPool(app)
    yield app
    pool.shutdown(app=app)


@pytest.fixture
def model(stream_app: Flask) -> Any:
    pool: TorchPool = stream_app.extensions["torchpool"].extension
    with stream_app.app_context():
        yield pool.model()


def worker_pid(model: Any) -> int:
    return int(model.call("pid"))


def test_chunks_arrive_in_order_and_values_of_every_kind_travel(model: Any) -> None:
    assert [int(t) for t in model.stream(7)] == list(range(7))
    assert list(model.method("generate").stream("tok", n=4)) == ["tok0", "tok1", "tok2", "tok3"]
    big = list(model.stream(3, size=1 << 20))  # zero-copy chunks from the arena
    assert [int(t[0]) for t in big] == [0, 1, 2] and all(t.numel() == 1 << 20 for t in big)
    assert list(model.stream(0)) == []
    x = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(torch.stack(list(model.method("rows").stream(x))), x * 2)  # tensors in, too


def test_calling_a_model_that_yields_names_stream_and_the_reverse(model: Any) -> None:
    with pytest.raises(OutputError, match=r"model\.stream"):
        model(3)
    with pytest.raises(OutputError, match=r"call model\(\.\.\.\)"):
        list(model.method("pid").stream())
    with pytest.raises(InferenceError, match="no method 'nope'"):
        model.call("nope")
    with pytest.raises(ValueError, match="not allowed"):
        model.method("_private")
    assert worker_pid(model) > 0


def test_an_error_mid_stream_comes_after_the_chunks_and_the_worker_survives(model: Any) -> None:
    pid = worker_pid(model)
    got = []
    with pytest.raises(InferenceError, match="bad token at step 3") as info:
        for chunk in model.stream(10, fail_at=3):
            got.append(int(chunk))
    assert got == [0, 1, 2]
    assert info.value.remote_type == "ValueError"
    assert worker_pid(model) == pid


def test_closing_the_iterator_runs_the_generators_finally_and_frees_the_worker(model: Any,
                                                                               tmp_path: Path) -> None:
    log = tmp_path / "log"
    stream = model.stream(10**9, log=str(log))
    assert int(next(stream)) == 0
    stream.close()
    assert wait_until(lambda: "finally" in lines(log)), lines(log)
    assert made(log) <= 1 + WINDOW  # the window, never the billion
    assert worker_pid(model) > 0


def test_dropping_the_iterator_cancels_too(model: Any, tmp_path: Path) -> None:
    log = tmp_path / "log"
    for chunk in model.stream(10**9, log=str(log)):
        if int(chunk) == 1:
            break  # the for loop drops its iterator
    assert wait_until(lambda: "finally" in lines(log)), lines(log)
    assert worker_pid(model) > 0


def test_a_slow_reader_pauses_the_generator_after_the_window(model: Any, tmp_path: Path) -> None:
    log = tmp_path / "log"
    with model.stream(50, log=str(log)) as stream:
        for consumed in range(6):
            # The worker runs ahead of the reader by the window exactly, then waits for credit.
            assert wait_until(lambda n=consumed: made(log) >= n + WINDOW), lines(log)
            assert made(log) == consumed + WINDOW, lines(log)
            assert int(next(stream)) == consumed
    assert wait_until(lambda: "finally" in lines(log))
    assert made(log) <= 6 + WINDOW


def test_a_crash_mid_stream_is_worker_crashed_without_retry(model: Any, tmp_path: Path) -> None:
    pid = worker_pid(model)
    log = tmp_path / "log"
    got = []
    with pytest.raises(WorkerCrashedError, match="exit code 9"):
        for chunk in model.stream(10, die_at=2, log=str(log)):
            got.append(int(chunk))
    assert got == [0, 1]
    assert lines(log) == ["made 0", "made 1"]  # run once: not retried
    assert wait_until(lambda: _pid_or_none(model) not in (None, pid), timeout=60)


def _pid_or_none(model: Any) -> int | None:
    try:
        return worker_pid(model)
    except Exception:
        return None


def test_async_iteration(model: Any) -> None:
    async def collect() -> list[int]:
        return [int(chunk) async for chunk in model.stream(5)]

    assert asyncio.run(collect()) == [0, 1, 2, 3, 4]


def test_cancelling_the_task_of_an_async_reader_stops_the_stream(model: Any, tmp_path: Path) -> None:
    log = tmp_path / "log"

    async def read_then_cancel() -> None:
        stream = model.stream(10**9, log=str(log))
        assert int(await stream.__anext__()) == 0
        task = asyncio.ensure_future(_read_all(stream))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(read_then_cancel())
    assert wait_until(lambda: "finally" in lines(log)), lines(log)


async def _read_all(stream: Stream) -> None:
    async for _ in stream:
        await asyncio.Event().wait()  # never set: the reader stalls until cancelled


def test_stream_metrics_and_status(stream_app: Flask, model: Any) -> None:
    pool: TorchPool = stream_app.extensions["torchpool"].extension
    before = pool.status()["metrics"]
    assert len(list(model.stream(4))) == 4
    after = pool.status()["metrics"]
    assert after["streams"] == before["streams"] + 1
    assert after["stream_chunks"] == before["stream_chunks"] + 4
    assert after["first_chunk_seconds"]["count"] == before["first_chunk_seconds"]["count"] + 1
    assert wait_until(lambda: pool.status()["metrics"]["streams_open"] == 0)


def test_a_call_waits_in_the_queue_rather_than_behind_a_stream(stream_app: Flask, model: Any,
                                                               gate: Gate, tmp_path: Path) -> None:
    pool: TorchPool = stream_app.extensions["torchpool"].extension
    notes = tmp_path / "notes"
    stream = model.stream(2, gate=str(gate), gate_at=1)
    assert int(next(stream)) == 0
    waiting = model.method("note").submit(str(notes), "after")
    # Not pipelined onto the worker that runs the stream (TORCHPOOL_PIPELINE_DEPTH is 2): queued, so that
    # any other worker that frees up could take it.
    assert pool.status()["queued"] == 1
    gate.open()
    assert [int(c) for c in stream] == [1]
    assert waiting.result(30) == "after"


# --- cancelling plain calls ----------------------------------------------------------------------------


def test_a_cancelled_call_that_has_not_started_never_runs(model: Any, gate: Gate, tmp_path: Path) -> None:
    log, notes = tmp_path / "log", tmp_path / "notes"
    note = model.method("note")
    blocker = model.stream(2, log=str(log), gate=str(gate), gate_at=1)
    assert int(next(blocker)) == 0  # the only worker now waits at the gate
    queued = note.submit(str(notes), "cancelled")  # waits behind the stream
    assert queued.cancel()
    with pytest.raises(CancelledError):
        queued.result(0)
    later = note.submit(str(notes), "later")
    gate.open()
    assert [int(c) for c in blocker] == [1]
    assert later.result(30) == "later"
    assert lines(notes) == ["start later", "end later"]


def test_a_cancelled_call_that_started_finishes_and_its_result_is_discarded(
        stream_app: Flask, model: Any, gate: Gate, tmp_path: Path) -> None:
    pool: TorchPool = stream_app.extensions["torchpool"].extension
    notes = tmp_path / "notes"
    note = model.method("note")
    cancelled_before = pool.status()["metrics"]["calls"]["cancelled"]
    running = note.submit(str(notes), "running", gate=str(gate))
    assert wait_until(lambda: lines(notes) == ["start running"])
    assert running.cancel()
    gate.open()
    assert note(str(notes), "next") == "next"
    assert lines(notes) == ["start running", "end running", "start next", "end next"]
    assert running.cancelled()
    assert pool.status()["metrics"]["calls"]["cancelled"] == cancelled_before + 1


# --- deadlines --------------------------------------------------------------------------------------------


def test_a_generator_stuck_past_the_deadline_is_an_error_and_its_worker_is_replaced(
        make_pool: Any, tmp_path: Path) -> None:
    stuck = tmp_path / "never"
    os.mkfifo(stuck)
    app, pool = make_pool(TORCHPOOL_MODEL="tests.stream_models:counter")
    with app.app_context():
        model = pool.model(timeout=1.0)  # the view's timeout, not TORCHPOOL_TIMEOUT (60 s)
        pid = worker_pid(model)
        got = []
        with pytest.raises(InferenceTimeoutError, match="no progress for 1s") as info:
            for chunk in model.stream(10, gate=str(stuck), hang_at=2):
                got.append(int(chunk))
        assert got == [0, 1]
        assert "after 2 chunks" in str(info.value)
        # Told to stop, it cannot (stuck in the generator): killed after the grace, and replaced.
        assert wait_until(lambda: "did not stop a cancelled stream" in (
            pool.status()["workers"][0]["last_exit"] or ""), timeout=30), pool.status()["workers"]
        assert wait_until(lambda: _pid_or_none(model) not in (None, pid), timeout=60)


def test_the_total_bound_ends_a_stream_whose_reader_stalls_without_killing(make_pool: Any,
                                                                             tmp_path: Path) -> None:
    log = tmp_path / "log"
    app, pool = make_pool(TORCHPOOL_MODEL="tests.stream_models:counter", TORCHPOOL_STREAM_TIMEOUT=1.0,
                          TORCHPOOL_STREAM_BUFFER=2)
    with app.app_context():
        model = pool.model()
        pid = worker_pid(model)
        stream = model.stream(10**9, log=str(log))
        assert int(next(stream)) == 0
        # The reader stalls; the worker, out of credit, waits; the total bound ends the stream.
        assert wait_until(lambda: "finally" in lines(log), timeout=30), lines(log)
        got = []
        with pytest.raises(InferenceTimeoutError, match="TORCHPOOL_STREAM_TIMEOUT"):
            for chunk in stream:
                got.append(int(chunk))
        assert got == [1, 2][:len(got)]
        assert worker_pid(model) == pid  # it stopped when told: not killed


def test_drain_waits_for_a_stream(make_pool: Any, gate: Gate, tmp_path: Path) -> None:
    app, pool = make_pool(TORCHPOOL_MODEL="tests.stream_models:counter")
    with app.app_context():
        stream = pool.model().stream(3, gate=str(gate), gate_at=1)
        assert int(next(stream)) == 0
        done = threading.Event()
        stopper = threading.Thread(target=lambda: (pool.shutdown(app=app, drain_timeout=60), done.set()))
        stopper.start()
        assert wait_until(lambda: pool.status()["closed"])
        assert not done.is_set()
        gate.open()
        assert [int(c) for c in stream] == [1, 2]
        stopper.join(60)
        assert done.is_set()


# --- shared memory -----------------------------------------------------------------------------------


def oversize_mappings() -> int:
    return sum(1 for path in shared_mappings().values() if "torchpool-oversize" in path)


def test_a_cancelled_stream_frees_what_it_held_in_shared_memory(make_pool: Any, tmp_path: Path) -> None:
    # 1 MiB of output arena: the first 700 KB chunk lies in it, the ones after it, which the reader has not
    # taken yet, in one-off segments; closing the stream must unmap them all and hand the block back.
    log = tmp_path / "log"
    app, pool = make_pool(TORCHPOOL_MODEL="tests.stream_models:counter", TORCHPOOL_ARENA_BYTES=2 << 20,
                          TORCHPOOL_STREAM_BUFFER=3)
    with app.app_context():
        model = pool.model()
        before = oversize_mappings()
        for round_ in range(3):
            stream = model.stream(10**9, size=700_000, log=str(log))
            first = next(stream)
            assert int(first[0]) == 0
            assert wait_until(lambda: oversize_mappings() >= before + 2), shared_mappings()
            del first
            stream.close()
            assert wait_until(lambda: oversize_mappings() == before), shared_mappings()
            assert wait_until(lambda n=round_: lines(log).count("finally") == n + 1)
        # Every output block went back to the worker: a chunk of nearly the whole output half still lies
        # in the arena, not in a one-off segment.
        chunks = list(model.stream(1, size=900_000))
        assert int(chunks[0][0]) == 0 and oversize_mappings() == before


# --- a real HTTP server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sse_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A one-worker pool behind Werkzeug's threaded server: POST /generate streams server-sent events
    of a generator that would run for hours; GET /pid is a plain call."""
    log = tmp_path_factory.mktemp("sse") / "log"
    app = make_app(TORCHPOOL_MODEL="tests.stream_models:counter", TORCHPOOL_WORKERS=1, TESTING=False)
    pool = TorchPool(app)

    @app.post("/generate")
    @pool.infer
    def generate(model: Any) -> Response:
        def events() -> Iterator[str]:
            for chunk in model.stream(10**9, log=str(log)):
                yield f"data: {int(chunk)}\n\n"
        return Response(stream_with_context(events()), mimetype="text/event-stream")

    @app.get("/pid")
    @pool.infer
    def pid(model: Any) -> Any:
        return {"pid": model.call("pid")}

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="test-sse-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", log
    finally:
        server.shutdown()
        thread.join(30)
        server.server_close()
        pool.shutdown(app=app)


def test_a_client_that_disconnects_mid_stream_frees_the_only_worker_at_once(
        sse_server: tuple[str, Path]) -> None:
    base_url, log = sse_server
    pid = requests.get(base_url + "/pid", timeout=60).json()["pid"]
    for round_ in range(3):
        host, port = base_url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            seen = b""
            while seen.count(b"data: ") < 2:
                data = sock.recv(4096)
                assert data, seen
                seen += data
            assert b"text/event-stream" in seen and b"data: 0\n\n" in seen
        # The client is gone. The server sees it on its next write, closes the response, the stream is
        # cancelled and the generator closed; the one worker serves the next call now, not in hours.
        assert wait_until(lambda n=round_: lines(log).count("finally") == n + 1, timeout=30), lines(log)[-5:]
        assert requests.get(base_url + "/pid", timeout=30).json()["pid"] == pid


SSE_SCRIPT = '''
import sys

from flask import Flask, Response, stream_with_context
from werkzeug.serving import make_server

from flask_torchpool import TorchPool


def main():
    port, gate = int(sys.argv[1]), sys.argv[2]
    app = Flask("sse")
    app.config.update(TORCHPOOL_MODEL="tests.stream_models:counter", TORCHPOOL_WORKERS=1,
                      TORCHPOOL_DEVICES="cpu", TORCHPOOL_ARENA_BYTES=32 << 20)
    pool = TorchPool(app)

    @app.post("/generate")
    @pool.infer
    def generate(model):
        stream = model.stream(3, gate=gate, gate_at=1)

        def events():
            for chunk in stream:
                yield f"data: {int(chunk)}\\n\\n"
            yield "event: end\\n\\n"
        return Response(stream_with_context(events()), mimetype="text/event-stream")

    make_server("127.0.0.1", port, app, threaded=True).serve_forever()


if __name__ == "__main__":
    main()
'''


@pytest.mark.timeout(180)
def test_a_sigterm_drain_lets_a_stream_that_is_being_sent_finish(tmp_path: Path, gate: Gate) -> None:
    script = tmp_path / "sse_app.py"
    script.write_text(SSE_SCRIPT)
    port = free_port()
    with running([sys.executable, str(script), str(port), str(gate)], port, tmp_path / "server.log",
                 server_env()) as server:
        assert server.wait_answers("/").status_code == 404, server.log()
        with requests.post(server.base_url + "/generate", stream=True, timeout=60) as response:
            events = (line for line in response.iter_lines() if line)
            assert next(events) == b"data: 0"
            os.kill(server.pid, signal.SIGTERM)
            assert wait_until(lambda: "SIGTERM: draining" in server.log(), timeout=30), server.log()
            gate.open()  # the model goes on: the drain waits for the stream, then for its reader
            assert list(events) == [b"data: 1", b"data: 2", b"event: end"], server.log()
        assert server.wait_exit() == -signal.SIGTERM, server.log()
