"""SIGTERM while the main thread holds the lock the drain needs (issue 10, item 5).

In 0.1 the SIGTERM handler ran the drain itself, in the main thread, and took the app state's lock: a
signal that arrived while the main thread held that lock deadlocked the process. The handler now only
wakes a drain thread, which waits for the lock like any other thread.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    from flask import Flask
    from flask_torchpool import TorchPool

    app = Flask("signals")
    app.config.update(TORCHPOOL_MODEL="tests.models:echo", TORCHPOOL_INLINE=True,
                      TORCHPOOL_START="eager", TORCHPOOL_DRAIN_TIMEOUT=5)
    TorchPool(app)
    group = app.extensions["torchpool"]
    with group.lock:                      # what a view entering or leaving does, any moment
        os.kill(os.getpid(), signal.SIGTERM)
        print("handler returned with the lock held", flush=True)
    threading.Event().wait(60)            # the drain thread ends the process by SIGTERM
    sys.exit("still alive after 60 s")
""")


@pytest.mark.timeout(60)
def test_sigterm_while_the_main_thread_holds_the_lock(tmp_path: Path) -> None:
    script = tmp_path / "signals_app.py"
    script.write_text(SCRIPT)
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True,
                          timeout=45, env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    assert "handler returned with the lock held" in proc.stdout, proc.stderr
    assert "SIGTERM: draining" in proc.stderr, proc.stderr
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
