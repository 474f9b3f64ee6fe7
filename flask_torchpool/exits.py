"""What a worker's exit code says: the signal's name, and the likely cause, for logs and status."""

from __future__ import annotations

import signal


def signal_name(exitcode: int | None) -> str | None:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return None


def likely_cause(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown"
    if exitcode == -signal.SIGKILL:
        return ("killed by SIGKILL: probably the out-of-memory killer (check `dmesg` or the container's "
                "OOM events and the worker's memory), or someone ran kill -9")
    if exitcode in (-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGILL, -signal.SIGFPE, -signal.SIGABRT):
        return "a native crash in the model or one of its extensions"
    if exitcode == -signal.SIGALRM:  # Note [Lanes]: its own alarm
        return "a direct call (from an attached web process) ran past its deadline"
    if exitcode < 0:
        return f"killed by {signal_name(exitcode)}"
    if exitcode == 70:
        return "its parent process changed before it started"
    return "the worker process exited (sys.exit or os._exit in the model?)"


def _state(pid: int) -> bytes | None:
    """Process *pid*'s state letter in ``/proc/PID/stat``; None when it cannot be read (no such
    process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    end = stat_line.rfind(b")")  # the command name is in parentheses and may hold anything
    return stat_line[end + 2:end + 3]


def process_stopped(pid: int) -> bool:
    """Whether process *pid* is stopped (SIGSTOP, SIGTSTP, or held by a debugger): its state in
    ``/proc/PID/stat`` is ``T`` or ``t``. False for a process that is gone or cannot be read."""
    return _state(pid) in (b"T", b"t")


def process_gone(pid: int) -> bool:
    """Whether process *pid* has ended (no such process, or a zombie not reaped yet)."""
    return _state(pid) in (None, b"Z", b"X")
