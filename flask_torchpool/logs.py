"""Worker output: what a worker logs and prints reaches the Flask app's logger, tagged with the worker.

Each worker gets two pipes from the pool, one per stream, and makes them its file descriptors 1 and 2
first thing (:func:`redirect_output`), so that C code writing to stdout or stderr is captured as well as
``print``. Its ``sys.stdout`` and ``sys.stderr`` write straight through to the descriptors (nothing
waits in a Python buffer when the process dies), and its root logger gets one handler that writes each
record as one line on stderr: the line starts with ``\\x1e`` and carries the level, time, logger name,
source location and the formatted text (traceback included) as fields separated by ``\\x1f``, with
backslashes, newlines and the two separators escaped. A record therefore stays one record whatever it
holds, and keeps its place among what C code and ``print`` write to stderr.

::

    worker process                                 web process (the pool's manager thread)
    --------------                                 -----------------------------------------
    print(), C writes to fd 1 ---- stdout pipe ---> WorkerOutput: split lines -> INFO record
    logging records, C to fd 2 --- stderr pipe ---> WorkerOutput: split lines -> record at its level,
      faulthandler, tracebacks                        other lines -> WARNING record
                                                    both: logging.getLogger(<app name>).handle(record)

The manager thread reads the pipes in the selector it already blocks on (no thread, no polling), before
the replies of the same wake-up, so what a worker logged before it answered is logged before the caller
gets the answer. When a worker dies, its pipes are read to the end, a last line without a newline
included, before the death is handled. Lines longer than :data:`MAX_LINE_BYTES` are cut there.
"""

from __future__ import annotations

import ctypes
import faulthandler
import fcntl
import io
import logging
import os
import re
import sys
import threading
from typing import Any

log = logging.getLogger(__name__)

#: A line (a record, with its escaped traceback) is cut after this many bytes; the rest of it is dropped.
MAX_LINE_BYTES = 64 * 1024
_CHUNK = 64 * 1024
#: Chunks read per wake-up of the manager thread, so that a worker flooding its output cannot keep the
#: manager from everything else.
_CHUNKS_PER_WAKEUP = 16

_RECORD = "\x1e"
_FIELD = "\x1f"
_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", _RECORD: "\\x1e", _FIELD: "\\x1f"})
_UNESCAPES = {"\\": "\\", "n": "\n", "x1e": _RECORD, "x1f": _FIELD}
_ESCAPED = re.compile(r"\\(\\|n|x1e|x1f)")

#: Level of a line a worker printed, by stream (a record on stderr keeps its own level).
STREAM_LEVELS = {"stdout": logging.INFO, "stderr": logging.WARNING}


# --- in the worker -----------------------------------------------------------------------------------


def redirect_output(stdout_fd: int, stderr_fd: int, level: int) -> None:
    """Make *stdout_fd* and *stderr_fd* the worker's descriptors 1 and 2, unbuffered, and send the
    records of the root logger at *level* and above to stderr, one line each. Call first thing."""
    # Through fresh descriptors >= 3: either pipe may arrive as 1 or 2 when the web process runs with
    # those closed, and dup2 onto one must not overwrite the other.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in (stdout_fd, stderr_fd)]
    for fd in {stdout_fd, stderr_fd} - {1, 2}:
        os.close(fd)
    for target, fd in zip((1, 2), high):
        os.dup2(fd, target)  # inheritable: a subprocess of the model writes to the pipes too
        os.close(fd)
    sys.stdout = _text_stream(1)
    sys.stderr = _text_stream(2)
    root = logging.getLogger()
    # Handlers that the user's main module added when spawn re-imported it would print every record
    # a second time, unstructured: in a worker, the web process's handlers do that job.
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_RecordWriter(2, level))
    root.setLevel(level)
    logging.captureWarnings(True)  # a warning is one record, not two lines on stderr
    _line_buffer_c_stdout()
    threading.excepthook = _log_thread_exception
    # A native crash leaves the Python stack of every thread on stderr, and so in the app's log.
    faulthandler.enable(file=sys.stderr, all_threads=True)


def flush_c_streams() -> None:
    """Flush C's stdio buffers: ``os._exit`` skips that, and a last line without a newline waits there."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # pragma: no cover - no C library to ask
        pass


def _line_buffer_c_stdout() -> None:
    # C's stdout is block-buffered on a pipe: printf output of an extension would wait for 4 KiB, and
    # be lost with the process. Line-buffered, each line is written when it ends.
    try:
        libc = ctypes.CDLL(None)
        stdout = ctypes.c_void_p.in_dll(libc, "stdout")
        libc.setvbuf(stdout, None, _IOLBF, 0)
    except (OSError, AttributeError, ValueError):  # pragma: no cover - not glibc
        pass


_IOLBF = 1  # glibc's value


class _FdWriter(io.RawIOBase):
    """A descriptor that takes every byte at once: nothing waits in a buffer for a flush that
    ``os._exit`` or a signal would skip."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        _write_all(self._fd, data)
        return len(data)


class _PlainText(io.TextIOWrapper):
    """The worker's ``sys.stdout`` and ``sys.stderr``: a record separator in what is printed is
    escaped, so that printed text (a model echoing its input, say) cannot pass for a log record. Only
    :class:`_RecordWriter` starts a line with it. (C code writing to descriptor 2 is not filtered.)"""

    def write(self, s: str) -> int:
        super().write(s.replace(_RECORD, "\\x1e"))
        return len(s)


def _text_stream(fd: int) -> io.TextIOWrapper:
    raw: Any = _FdWriter(fd)
    return _PlainText(raw, encoding="utf-8", errors="backslashreplace", line_buffering=True,
                      write_through=True)


def _write_all(fd: int, data: Any) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


class _RecordWriter(logging.Handler):
    """Writes each record as one line on the worker's stderr (see the module docstring)."""

    def __init__(self, fd: int, level: int) -> None:
        super().__init__(level)
        self.fd = fd
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_all(self.fd, encode_record(record, self.format(record)))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def encode_record(record: logging.LogRecord, text: str) -> bytes:
    fields = (str(record.levelno), f"{record.created:.6f}", record.name, record.pathname,
              str(record.lineno), record.funcName or "", text)
    line = _RECORD + _FIELD.join(str(f).translate(_ESCAPES) for f in fields) + "\n"
    return line.encode("utf-8", "backslashreplace")


def _log_thread_exception(args: Any) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "a thread"
    logging.getLogger("flask_torchpool.worker").error(
        "uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


# --- in the web process ------------------------------------------------------------------------------


class WorkerOutput:
    """One stream (stdout or stderr) of one worker process, read by the pool's manager thread and
    forwarded to the logger named *logger_name*. Non-blocking: :meth:`read` takes what is there."""

    def __init__(self, fd: int, stream: str, logger_name: str, worker: int, pid: int,
                 process_name: str) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self.stream = stream
        self.eof = False
        self._logger = logging.getLogger(logger_name)
        self._worker = worker
        self._pid = pid
        self._process_name = process_name
        self._partial = b""
        self._cutting = False  # dropping the rest of a line that was cut at MAX_LINE_BYTES

    def fileno(self) -> int:
        if self.fd is None:
            raise ValueError("closed")
        return self.fd

    def read(self, chunks: int = _CHUNKS_PER_WAKEUP) -> bool:
        """Forward the complete lines waiting in the pipe (at most *chunks* reads); False at the
        end of the stream, when every process that could write to it is gone."""
        for _ in range(chunks):
            if self.fd is None or self.eof:
                return False
            try:
                data = os.read(self.fd, _CHUNK)
            except BlockingIOError:
                return True
            except OSError:  # pragma: no cover - a closed or broken pipe reads as its end
                data = b""
            if not data:
                self.eof = True
                self._flush_partial()
                return False
            self._feed(data)
        return True

    def close(self) -> None:
        """Forward what is left in the pipe, the last line too when it has no newline, and close it.
        Call once the worker is gone: a process it started may still hold the pipe open, so this
        reads what is there and does not wait for the end."""
        if self.fd is None:
            return
        # What the dead worker wrote is in the pipe's buffer, at most its capacity (64 KiB by
        # default, 1 MiB at most): a bounded read gets all of it.
        self.read(chunks=64)
        self._flush_partial()
        os.close(self.fd)
        self.fd = None

    def _feed(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self._cutting:
                self._cutting = False  # the end of a line already forwarded, cut
                continue
            self._line(line)
        if len(self._partial) > MAX_LINE_BYTES:
            if not self._cutting:
                self._line(self._partial)
                self._cutting = True
            self._partial = b""

    def _flush_partial(self) -> None:
        if self._partial and not self._cutting:
            self._line(self._partial)
        self._partial = b""
        self._cutting = False

    def _line(self, raw: bytes) -> None:
        cut = len(raw) > MAX_LINE_BYTES
        if cut:
            raw = raw[:MAX_LINE_BYTES]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        line = raw.decode("utf-8", "replace")
        note = f" [... cut: the line was longer than {MAX_LINE_BYTES} bytes]" if cut else ""
        if self.stream == "stderr":
            # A record normally starts the line; a print without a newline may precede it.
            start = line.find(_RECORD)
            if start >= 0:
                if start:
                    self._plain(line[:start])
                parsed = decode_record(line[start:])
                if parsed is not None:
                    self._record(*parsed, note=note)
                    return
                line = line[start:].replace(_RECORD, "").replace(_FIELD, " ")
        self._plain(line + note)

    def _plain(self, text: str) -> None:
        level = STREAM_LEVELS[self.stream]
        if self._logger.isEnabledFor(level):
            self._emit(level, "[torchpool worker %d pid %d] %s", (self._worker, self._pid, text),
                       None, {"torchpool_stream": self.stream, "torchpool_logger": None})

    def _record(self, level: int, created: float, name: str, pathname: str, lineno: int, func: str,
                text: str, note: str = "") -> None:
        if self._logger.isEnabledFor(level):
            self._emit(level, "[torchpool worker %d pid %d] %s: %s",
                       (self._worker, self._pid, name, text + note),
                       (created, pathname, lineno, func),
                       {"torchpool_stream": "logging", "torchpool_logger": name})

    def _emit(self, level: int, msg: str, args: tuple[Any, ...], origin: tuple[Any, ...] | None,
              extra: dict[str, Any]) -> None:
        extra = {"torchpool_worker": self._worker, "torchpool_pid": self._pid, **extra}
        pathname, lineno, func = ("(torchpool worker)", 0, None) if origin is None else origin[1:]
        record = self._logger.makeRecord(self._logger.name, level, pathname, lineno, msg, args, None,
                                         func=func, extra=extra)
        if origin is not None:  # when the worker logged it, not when it was read
            created = origin[0]
            record.relativeCreated += (created - record.created) * 1000
            record.created = created
            record.msecs = (created - int(created)) * 1000
        record.process = self._pid
        record.processName = self._process_name
        try:
            self._logger.handle(record)
        except Exception:  # a failing filter must not take the pool's manager thread down
            log.exception("cannot log a line of worker %d (pid %d)", self._worker, self._pid)


def decode_record(line: str) -> tuple[int, float, str, str, int, str, str] | None:
    """The fields of a line :func:`encode_record` wrote, or None when it is not one."""
    if not line.startswith(_RECORD):
        return None
    fields = line[1:].split(_FIELD, 6)
    if len(fields) != 7:
        return None
    level, created, name, pathname, lineno, func, text = (
        _ESCAPED.sub(lambda m: _UNESCAPES[m[1]], f) for f in fields)
    try:
        return int(level), float(created), name, pathname, int(lineno), func, text
    except ValueError:
        return None
