"""The model of the worker-log tests (test_logs): it logs, prints and writes to its descriptors on request,
then dies on request.

``model(x, say="text", how=..., then=...)`` emits *say* one way (``how``), then may end its process
(``then``), and returns its pid. The factory logs a warning, so a test can see the worker's start-up in
the app's log.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

from torch import nn

log = logging.getLogger("tests.log_models")


class Talker(nn.Module):
    def forward(self, x=None, say="", how="warning", then=None, size=0):
        if how in ("debug", "info", "warning", "error"):
            getattr(log, how)("%s", say)
        elif how == "exception":
            try:
                raise ValueError(say)
            except ValueError:
                log.exception("the model caught an error")
        elif how == "print":
            print(say)
        elif how == "print_partial":
            print(say, end="")  # no newline: only the end of the stream ends this line
        elif how == "fd1":
            os.write(1, say.encode() + b"\n")
        elif how == "fd2":
            os.write(2, say.encode() + b"\n")
        elif how == "c_stdio":
            ctypes.CDLL(None).puts(say.encode())  # C's buffered stdout, as an extension's printf
        elif how == "long_print":
            print("x" * size)
            print(say)
        elif how == "print_stderr":
            print(say, file=sys.stderr)
        elif how == "print_then_log":
            print(say, end="")
            log.warning("%s", say)
        if then == "exit":
            os._exit(3)
        if then == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if then == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        return os.getpid()


def talker():
    log.warning("building the model in pid %d", os.getpid())
    return Talker()
