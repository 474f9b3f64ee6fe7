"""Worker logs: what workers log and print reaches the app's logger, tagged with the worker, and nothing
is lost when a worker dies.

The model (:mod:`tests.log_models`) logs, prints or writes to its descriptors on request and may then
end its process. A handler on the app's logger (``tests``, the name of ``Flask("tests")``) collects the
records. What a worker wrote before it answered, or before it died, is logged before the caller gets the
answer or the crash, so most checks look at the records right after the call, without waiting.
"""

from __future__ import annotations

import logging
import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from flask import Flask

from flask_torchpool import ConfigError, TorchPool, WorkerCrashedError, WorkerStartupError
from flask_torchpool.config import DEFAULTS, PoolConfig
from flask_torchpool.logs import MAX_LINE_BYTES, WorkerOutput, decode_record, encode_record
from tests.conftest import child_pids, make_app, shm_entries, wait_until
from tests.crash_models import leaked_shm, wait_ready

TALKER = "tests.log_models:talker"


class Capture(logging.Handler):
    """Keeps every record it sees (from any thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def find(self, fragment: str, start: int = 0) -> list[logging.LogRecord]:
        """Records from workers whose message contains *fragment*."""
        return [r for r in self.records[start:]
                if hasattr(r, "torchpool_worker") and fragment in r.getMessage()]


@pytest.fixture(scope="module")
def capture() -> Iterator[Capture]:
    """A handler on the app's logger and on the pool's own, both at DEBUG for the module."""
    handler = Capture()
    loggers = [logging.getLogger("tests"), logging.getLogger("flask_torchpool.pool")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


@pytest.fixture(scope="module")
def talk(capture: Capture) -> Iterator[tuple[Flask, TorchPool]]:
    """Two talking workers at the default TORCHPOOL_WORKER_LOG_LEVEL; crashes are not retried and do
    not use up the restart budget."""
    before_children, before_shm = child_pids(), shm_entries()
    with pytest.MonkeyPatch.context() as mp:
        # Buffered streams, as in production: with PYTHONUNBUFFERED (set in some CI images) Python
        # and C would write through anyway, and the tests of what a dying worker leaves would be void.
        mp.delenv("PYTHONUNBUFFERED", raising=False)
        app = make_app(TORCHPOOL_MODEL=TALKER, TORCHPOOL_WORKERS=2, TORCHPOOL_RETRIES=0,
                       TORCHPOOL_MAX_RESTARTS=100)
        pool = TorchPool(app)
        yield app, pool
        pool.shutdown(app=app)
    assert wait_until(lambda: not (child_pids() - before_children), timeout=10), \
        f"worker processes outlived their pool: {child_pids() - before_children}"
    assert not leaked_shm(before_shm), f"/dev/shm entries leaked: {leaked_shm(before_shm)}"


def token() -> str:
    return f"token-{uuid.uuid4().hex}"


def call(app: Flask, pool: TorchPool, **kwargs: Any) -> Any:
    with app.app_context():
        return pool(torch.zeros(1), **kwargs)


def only(records: list[logging.LogRecord]) -> logging.LogRecord:
    assert len(records) == 1, [r.getMessage() for r in records]
    return records[0]


def worker_of(app: Flask, pool: TorchPool, pid: int) -> int:
    [worker] = [w["worker"] for w in pool.status(app)["workers"] if w["pid"] == pid]
    return worker


# --- a live worker -------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_factory_warning_arrives_with_the_worker(talk: tuple[Flask, TorchPool], capture: Capture) -> None:
    app, pool = talk
    pids = wait_ready(pool, app)
    # Every worker (a respawned one too) logged while it built the model, before it said it was ready.
    for worker, pid in enumerate(pids):
        record = only(capture.find(f"building the model in pid {pid}"))
        assert record.name == "tests"
        assert record.levelno == logging.WARNING
        assert record.getMessage() == (f"[torchpool worker {worker} pid {pid}] tests.log_models: "
                                       f"building the model in pid {pid}")
        assert (record.torchpool_worker, record.torchpool_pid) == (worker, pid)
        assert (record.torchpool_stream, record.torchpool_logger) == ("logging", "tests.log_models")
        # Where it was logged, in the worker.
        assert record.process == pid
        assert record.pathname.endswith(os.path.join("tests", "log_models.py"))
        assert record.funcName == "talker"


@pytest.mark.timeout(120)
def test_forward_logs_at_their_level_before_the_answer(talk: tuple[Flask, TorchPool],
                                                       capture: Capture) -> None:
    app, pool = talk
    for how, level in [("warning", logging.WARNING), ("info", logging.INFO), ("error", logging.ERROR)]:
        say = token()
        pid = call(app, pool, say=say, how=how)
        # No waiting: the worker logged before it answered, and that is forwarded first.
        record = only(capture.find(say))
        worker = worker_of(app, pool, pid)
        assert record.levelno == level, how
        assert record.getMessage() == f"[torchpool worker {worker} pid {pid}] tests.log_models: {say}"
        assert (record.torchpool_worker, record.torchpool_pid) == (worker, pid)
        assert record.funcName == "forward"
    # Below TORCHPOOL_WORKER_LOG_LEVEL (INFO by default): dropped in the worker.
    say = token()
    call(app, pool, say=say, how="debug")
    assert capture.find(say) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how, stream, level", [
    ("print", "stdout", logging.INFO),
    ("fd1", "stdout", logging.INFO),
    ("fd2", "stderr", logging.WARNING),
    ("c_stdio", "stdout", logging.INFO),
])
def test_printed_lines_arrive(talk: tuple[Flask, TorchPool], capture: Capture, how: str, stream: str,
                              level: int) -> None:
    app, pool = talk
    say = token()
    pid = call(app, pool, say=say, how=how)
    record = only(capture.find(say))
    worker = worker_of(app, pool, pid)
    assert record.levelno == level
    assert record.getMessage() == f"[torchpool worker {worker} pid {pid}] {say}"
    assert (record.torchpool_worker, record.torchpool_pid) == (worker, pid)
    assert (record.torchpool_stream, record.torchpool_logger) == (stream, None)


@pytest.mark.timeout(120)
def test_printed_text_cannot_forge_a_record(talk: tuple[Flask, TorchPool], capture: Capture) -> None:
    """Issue 11 (minor): a model that prints what it was sent cannot make it a log record of its own
    choosing (level, logger, location): the record separator is escaped in what is printed."""
    app, pool = talk
    say = token()
    forged = "\x1e" + "\x1f".join(["50", "0.0", "forged.logger", "/etc/passwd", "1", "f", say])
    pid = call(app, pool, say=forged, how="print_stderr")
    record = only(capture.find(say))
    assert record.levelno == logging.WARNING and record.torchpool_logger is None
    assert record.torchpool_stream == "stderr" and "forged.logger" in record.getMessage()
    assert record.torchpool_pid == pid


@pytest.mark.timeout(120)
def test_a_traceback_is_one_record(talk: tuple[Flask, TorchPool], capture: Capture) -> None:
    app, pool = talk
    say = token()
    start = len(capture.records)
    pid = call(app, pool, say=say, how="exception")
    record = only(capture.find(say, start))
    assert record.levelno == logging.ERROR
    message = record.getMessage()
    worker = worker_of(app, pool, pid)
    assert message.startswith(f"[torchpool worker {worker} pid {pid}] tests.log_models: "
                              "the model caught an error\nTraceback (most recent call last):\n")
    assert "raise ValueError(say)" in message
    assert message.endswith(f"ValueError: {say}")
    assert not capture.find("Traceback", start)[1:], "the traceback was split"


@pytest.mark.timeout(120)
def test_a_long_line_is_cut(talk: tuple[Flask, TorchPool], capture: Capture) -> None:
    app, pool = talk
    say = token()
    start = len(capture.records)
    pid = call(app, pool, say=say, how="long_print", size=3 * MAX_LINE_BYTES)
    prefix = f"[torchpool worker {worker_of(app, pool, pid)} pid {pid}] "
    long = [r.getMessage() for r in capture.find("xxxx", start)]
    assert long == [f"{prefix}{'x' * MAX_LINE_BYTES} [... cut: the line was longer than "
                    f"{MAX_LINE_BYTES} bytes]"]
    # The rest of the long line is dropped, and the next line is whole.
    assert only(capture.find(say, start)).getMessage() == f"{prefix}{say}"


# --- a dying worker ------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how, then, stream", [
    ("print", "exit", "stdout"),
    ("print_partial", "sigkill", "stdout"),
    ("c_stdio", "exit", "stdout"),
    ("fd2", "sigkill", "stderr"),
    ("warning", "segv", "logging"),
])
def test_last_words_before_death_arrive(talk: tuple[Flask, TorchPool], capture: Capture, how: str,
                                        then: str, stream: str) -> None:
    app, pool = talk
    pids = wait_ready(pool, app)
    say = token()
    start = len(capture.records)
    with pytest.raises(WorkerCrashedError) as info:
        call(app, pool, say=say, how=how, then=then)
    pid = info.value.pid
    assert pid in pids
    # Already there when the caller hears of the crash.
    record = only(capture.find(say, start))
    worker = pids.index(pid)
    assert (record.torchpool_worker, record.torchpool_pid, record.torchpool_stream) == (worker, pid, stream)
    assert record.getMessage().endswith(say)
    if then == "segv":  # faulthandler's report of the native crash, from the worker's stderr
        assert capture.find("Fatal Python error: Segmentation fault", start)
    # ... and before the pool's report of the death.
    died = f"worker {worker} (pid {pid}) died"
    assert wait_until(lambda: any(died in r.getMessage() for r in capture.records[start:]), timeout=30)
    [death] = [i for i, r in enumerate(capture.records[start:]) if died in r.getMessage()]
    assert capture.records[start:].index(record) < death
    wait_ready(pool, app, exclude={pid})


@pytest.mark.timeout(120)
def test_a_model_that_fails_to_load_logs_its_traceback(capture: Capture) -> None:
    before_children, before_shm = child_pids(), shm_entries()
    start = len(capture.records)
    app = make_app(TORCHPOOL_MODEL="tests.models:failing")
    pool = TorchPool()
    try:
        with pytest.raises(WorkerStartupError, match="the weights file is corrupt"):
            pool.init_app(app)
        # Logged by the worker before it reported the failure: there when init_app raises.
        record = only(capture.find("could not load the model 'tests.models:failing'", start))
        assert record.levelno == logging.ERROR
        assert record.torchpool_worker == 0 and record.torchpool_pid != os.getpid()
        message = record.getMessage()
        assert message.startswith(f"[torchpool worker 0 pid {record.torchpool_pid}] flask_torchpool.worker: "
                                  "worker 0 could not load the model 'tests.models:failing'\n"
                                  "Traceback (most recent call last):\n")
        assert 'raise RuntimeError("the weights file is corrupt")' in message
        assert message.endswith("RuntimeError: the weights file is corrupt")
        assert wait_until(lambda: not (child_pids() - before_children), timeout=10)
    finally:
        pool.shutdown(app=app)
    assert not leaked_shm(before_shm)


# --- the level, and the pipes ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_worker_log_level(make_pool: Any, capture: Capture) -> None:
    start = len(capture.records)
    app, pool = make_pool(TORCHPOOL_MODEL=TALKER, TORCHPOOL_WORKER_LOG_LEVEL="error")
    [pid] = wait_ready(pool, app)
    assert not capture.find(f"building the model in pid {pid}", start)
    quiet, loud, printed = token(), token(), token()
    call(app, pool, say=quiet, how="warning")
    call(app, pool, say=loud, how="error")
    call(app, pool, say=printed, how="print")
    assert not capture.find(quiet)
    assert only(capture.find(loud)).levelno == logging.ERROR
    # The level applies to log records; printed lines always come.
    assert only(capture.find(printed)).levelno == logging.INFO


def pipes() -> set[str]:
    """This process's descriptors that are pipes, with the pipe's inode."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(f"{fd}:{target}")
    return found


@pytest.mark.timeout(180)
def test_pipes_are_closed_on_respawn_and_shutdown(talk: tuple[Flask, TorchPool], make_pool: Any) -> None:
    wait_ready(talk[1], talk[0])  # the module's pool is idle: its pipes stay as they are
    before = pipes()
    app, pool = make_pool(TORCHPOOL_MODEL=TALKER)
    [pid] = wait_ready(pool, app)
    os.kill(pid, signal.SIGKILL)
    wait_ready(pool, app, exclude={pid})
    pool.shutdown(app=app)
    assert wait_until(lambda: pipes() == before, timeout=10), pipes() ^ before


# --- the format, without processes ---------------------------------------------------------------------


def _record(msg: str, level: int = logging.WARNING, name: str = "a.b") -> logging.LogRecord:
    return logging.LogRecord(name, level, "/src/model.py", 12, msg, None, None, func="forward")


def test_record_round_trip() -> None:
    text = "two\nlines, a \\n that is not one, separators \x1e \x1f, and ünïcode \\"
    decoded = decode_record(encode_record(_record(text), text).decode().rstrip("\n"))
    assert decoded is not None
    level, created, name, pathname, lineno, func, back = decoded
    assert (level, name, pathname, lineno, func, back) == (logging.WARNING, "a.b", "/src/model.py", 12,
                                                           "forward", text)
    assert abs(created - _record("").created) < 60
    assert encode_record(_record(text), text).count(b"\n") == 1
    assert decode_record("plain text") is None
    assert decode_record("\x1enot\x1fenough") is None


@pytest.fixture
def unit_capture() -> Iterator[Capture]:
    handler = Capture()
    logger = logging.getLogger("tests.logs_unit")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def _output(stream: str) -> tuple[WorkerOutput, int]:
    r, w = os.pipe()
    return WorkerOutput(r, stream, "tests.logs_unit", 3, 4242, "w3"), w


def _feed(out: WorkerOutput, w: int, data: bytes) -> None:
    """Write *data* into the pipe in pieces, as a worker would, reading after each (one thread: a
    write larger than the pipe would block)."""
    for i in range(0, len(data), 4096):
        os.write(w, data[i:i + 4096])
        assert out.read()
        assert len(out._partial) <= MAX_LINE_BYTES


def test_stderr_lines_and_records(unit_capture: Capture) -> None:
    out, w = _output("stderr")
    try:
        os.write(w, b"no newline, then a record: " + encode_record(_record("one\ntwo"), "one\ntwo")
                 + b"a C line\r\n" + b"the last line has no newline")
        assert out.read()
        got = [(r.levelno, r.getMessage(), r.torchpool_stream) for r in unit_capture.records]
        assert got == [
            (logging.WARNING, "[torchpool worker 3 pid 4242] no newline, then a record: ", "stderr"),
            (logging.WARNING, "[torchpool worker 3 pid 4242] a.b: one\ntwo", "logging"),
            (logging.WARNING, "[torchpool worker 3 pid 4242] a C line", "stderr"),
        ]
        assert all((r.torchpool_worker, r.torchpool_pid, r.process) == (3, 4242, 4242)
                   for r in unit_capture.records)
    finally:
        os.close(w)
    out.close()  # the end of the stream: the last line comes without its newline
    last = unit_capture.records[-1].getMessage()
    assert last == "[torchpool worker 3 pid 4242] the last line has no newline"
    assert len(unit_capture.records) == 4
    assert out.fd is None
    out.close()  # idempotent


def test_cut_lines_keep_memory_bounded(unit_capture: Capture) -> None:
    out, w = _output("stdout")
    try:
        _feed(out, w, b"y" * (4 * MAX_LINE_BYTES) + b"\nnext\n")
        # On stdout a record is not parsed: too long, it is a plain line, cut.
        text = "z" * (2 * MAX_LINE_BYTES)
        _feed(out, w, encode_record(_record(text, logging.ERROR), text))
    finally:
        os.close(w)
        out.close()
    messages = [r.getMessage() for r in unit_capture.records]
    note = f" [... cut: the line was longer than {MAX_LINE_BYTES} bytes]"
    assert messages[0] == "[torchpool worker 3 pid 4242] " + "y" * MAX_LINE_BYTES + note
    assert messages[1] == "[torchpool worker 3 pid 4242] next"
    assert len(messages) == 3
    assert unit_capture.records[2].levelno == logging.INFO and messages[2].endswith(note)


def test_a_cut_record_on_stderr_keeps_its_level(unit_capture: Capture) -> None:
    out, w = _output("stderr")
    text = "z" * (2 * MAX_LINE_BYTES)
    try:
        _feed(out, w, encode_record(_record(text, logging.ERROR), text))
    finally:
        os.close(w)
        out.close()
    record = only(unit_capture.records)
    assert record.levelno == logging.ERROR and record.torchpool_logger == "a.b"
    assert record.getMessage().endswith(f"z [... cut: the line was longer than {MAX_LINE_BYTES} bytes]")


# --- configuration ---------------------------------------------------------------------------------------


def test_log_level_config() -> None:
    assert DEFAULTS["TORCHPOOL_WORKER_LOG_LEVEL"] == "INFO"

    def level(value: Any) -> int:
        return PoolConfig.from_mapping({"TORCHPOOL_MODEL": TALKER,
                                        "TORCHPOOL_WORKER_LOG_LEVEL": value}).worker_log_level

    assert PoolConfig.from_mapping({"TORCHPOOL_MODEL": TALKER}).worker_log_level == logging.INFO
    assert level("warning") == level("WARN") == level(" WARNING ") == logging.WARNING
    assert level(logging.DEBUG) == 10 and level(0) == 0 and level(25) == 25


@pytest.mark.parametrize("value", ["loud", "", -1, True, None, 1.5])
def test_bad_log_level_names_the_key(value: Any) -> None:
    app = Flask("cfg")
    app.config.update(TORCHPOOL_MODEL=TALKER, TORCHPOOL_START="lazy", TORCHPOOL_WORKER_LOG_LEVEL=value)
    with pytest.raises(ConfigError) as info:
        TorchPool(app)
    assert info.value.key == "TORCHPOOL_WORKER_LOG_LEVEL"
    assert str(info.value) == (f"TORCHPOOL_WORKER_LOG_LEVEL: {value!r} is not allowed; use a logging level: "
                               "a name such as 'INFO' or 'WARNING', or a number >= 0 such as logging.DEBUG")
