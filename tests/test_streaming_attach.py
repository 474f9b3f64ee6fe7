"""Streams in attach mode (issue 13): the pool server relays a stream's chunks into the web process's arena
with credits of its own (flask_torchpool/attach/relay.py), cancels on Cancel, and closes every stream of a
web process that goes away. The server runs in this process (``tests.servers.pool_server``), one worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_torchpool import InferenceError, PoolUnavailableError, TorchPool
from flask_torchpool.attach.client import PoolConnection
from flask_torchpool.attach.server import PoolServer
from flask_torchpool.config import PoolConfig

from .conftest import make_app, wait_until
from .servers import pool_server
from .test_streaming import lines, made

pytestmark = pytest.mark.timeout(120)

WINDOW = 2


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PoolServer]:
    run = tmp_path_factory.mktemp("stream-attach") / "run"
    run.mkdir(mode=0o700)
    with pool_server(run / "pool.sock", TORCHPOOL_MODEL="tests.stream_models:counter", TORCHPOOL_WORKERS=1,
                     TORCHPOOL_STREAM_BUFFER=WINDOW, TORCHPOOL_ARENA_BYTES=8 << 20) as server:
        yield server


@pytest.fixture(scope="module")
def web(served: PoolServer) -> Iterator[Flask]:
    app = make_app(TORCHPOOL_MODE="attach", TORCHPOOL_SOCKET=served.path, TORCHPOOL_ARENA_BYTES=8 << 20,
                   TORCHPOOL_MODEL="tests.stream_models:counter", TORCHPOOL_STREAM_BUFFER=WINDOW)
    pool = TorchPool(app)
    yield app
    pool.shutdown(app=app)


@pytest.fixture
def model(web: Flask) -> Iterator[Any]:
    pool: TorchPool = web.extensions["torchpool"].extension
    with web.app_context():
        yield pool.model()


def test_chunks_of_every_kind_and_errors_after_them(model: Any) -> None:
    assert [int(c) for c in model.stream(5)] == [0, 1, 2, 3, 4]
    big = list(model.stream(2, size=3 << 20))  # zero-copy chunks in this process's arena
    assert [int(t[0]) for t in big] == [0, 1] and big[0].numel() == 3 << 20
    got = []
    with pytest.raises(InferenceError, match="bad token at step 2"):
        for chunk in model.stream(5, fail_at=2):
            got.append(int(chunk))
    assert got == [0, 1]


def test_a_slow_reader_pauses_the_generator(model: Any, tmp_path: Path) -> None:
    log = tmp_path / "log"
    # In flight at most: the worker's window and the web process's (the relay pulls a chunk only with
    # the web process's credit), plus one in the relay's hands.
    bound = 2 * WINDOW + 1
    with model.stream(40, log=str(log)) as stream:
        for consumed in range(5):
            assert wait_until(lambda n=consumed: made(log) >= n + WINDOW), lines(log)
            assert made(log) <= consumed + bound, lines(log)
            assert int(next(stream)) == consumed
    assert wait_until(lambda: "finally" in lines(log)), lines(log)
    assert made(log) <= 5 + bound


def test_closing_the_stream_stops_the_generator_on_the_server(model: Any, tmp_path: Path) -> None:
    log = tmp_path / "log"
    stream = model.stream(10**9, log=str(log))
    assert int(next(stream)) == 0
    stream.close()
    assert wait_until(lambda: "finally" in lines(log)), lines(log)
    assert int(model.call("pid")) > 0


def test_a_web_process_that_goes_away_cancels_its_streams(served: PoolServer, model: Any,
                                                          tmp_path: Path) -> None:
    log = tmp_path / "log"
    connection = PoolConnection(served.path, 4 << 20)
    config = PoolConfig(model="tests.stream_models:counter")
    stream = connection.stream(None, (10**9,), {"log": str(log)}, None, None, config)
    assert int(next(stream)) == 0
    connection.close()  # the connection is gone, as when its process exits
    with pytest.raises(PoolUnavailableError):
        list(stream)
    assert wait_until(lambda: "finally" in lines(log)), lines(log)
    # The one worker is free at once for the other web processes.
    assert int(model.call("pid")) > 0
