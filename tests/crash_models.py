"""The model and helpers of the fault-injection tests (test_crash, test_shutdown).

:class:`Probe` (factory ``tests.crash_models:probe``) is :class:`tests.models.Echo` plus two keyword
arguments that let a test see and steer a call from outside the worker, without sleeping to guess where
the call is:

* ``mark=DIR``: on entry, create ``DIR/started-<pid>`` (the call is running, in that worker);
* ``hold=DIR``: then wait until ``DIR/open`` exists (the test opens the gate; at most ``hold_max`` s).

After that it behaves as ``Echo`` with the remaining arguments (``action=...``); with ``mark`` or
``hold`` it returns ``{"pid": os.getpid(), "out": <Echo's result>}``.

The helpers below run in the test process only; they import Flask lazily so that workers, which import
this module to build the model, don't pay for them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from tests.models import Echo
from tests.servers import _mapped_shm_names

PROBE = "tests.crash_models:probe"


class Probe(Echo):
    def forward(self, *args, **kwargs):
        mark = kwargs.pop("mark", None)
        hold = kwargs.pop("hold", None)
        hold_max = kwargs.pop("hold_max", 120.0)
        if mark is None and hold is None:
            return super().forward(*args, **kwargs)
        if mark is not None:
            open(os.path.join(mark, f"started-{os.getpid()}"), "w").close()
        if hold is not None:
            gate = os.path.join(hold, "open")
            deadline = time.monotonic() + hold_max
            # Polls inside the worker: the test itself waits on files and futures, never on time.
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.005)
        return {"pid": os.getpid(), "out": super().forward(*args, **kwargs)}


def probe():
    return Probe()


# --- helpers for the tests (web process only) --------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def add_views(app: Any, pool: Any, short_timeout: float = 1.0) -> None:
    """``POST /run`` (default deadline) and ``POST /short`` (``@pool.infer(timeout=short_timeout)``):
    both call ``model(torch.tensor(json["x"]), **rest_of_json)`` and answer ``{"out": result}``."""
    from flask import request

    def forward(model: Any) -> dict[str, Any]:
        body = dict(request.get_json())
        x = torch.tensor(body.pop("x", [1.0, 2.0]))
        return {"out": jsonable(model(x, **body))}

    app.add_url_rule("/run", "run", pool.infer(forward), methods=["POST"])
    app.add_url_rule("/short", "short", pool.infer(timeout=short_timeout)(forward), methods=["POST"])


def assert_http_error(resp: Any, status: int, exc_type: type, *fragments: str,
                      retry_after: int | None = None) -> dict[str, Any]:
    """The answer is *status* with the JSON body of *exc_type*, and its message has every fragment."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert body["type"] == exc_type.__name__, body
    for fragment in fragments:
        assert fragment in body["error"], body
    if retry_after is not None:
        assert resp.headers.get("Retry-After") == str(retry_after), dict(resp.headers)
    return body


def wait_ready(pool: Any, app: Any, exclude: set[int] | frozenset[int] = frozenset(),
               timeout: float = 90.0) -> list[int]:
    """Wait until every worker is ready with a pid not in *exclude*; returns the pids by worker.

    The deadline is generous: a respawn imports torch, which takes many seconds on a loaded machine."""
    from tests.conftest import wait_until

    def ready() -> list[int] | None:
        workers = pool.status(app)["workers"]
        if all(w["state"] == "ready" and w["pid"] not in exclude for w in workers):
            return [w["pid"] for w in workers]
        return None

    pids = wait_until(ready, timeout=timeout)
    if not pids:
        workers = pool.status(app)["workers"]
        raise AssertionError(f"the workers did not become ready within {timeout:g}s: {workers}; "
                             f"their processes: {[_describe_process(w['pid']) for w in workers]}; "
                             f"load average {os.getloadavg()}")
    return pids


def _describe_process(pid: int | None) -> str:
    """State, kernel wait channel and CPU time of *pid*, for a failure message."""
    if pid is None:
        return "no pid"
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
    except OSError:
        return f"{pid}: gone"
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return f"{pid}: state {fields[0]}, wchan {wchan or '-'}, cpu {cpu:.1f}s"


def started(directory: Path) -> set[int]:
    """Pids of the workers in which a ``mark=directory`` call has started running."""
    return {int(p.name.split("-", 1)[1]) for p in Path(directory).glob("started-*")}


def wait_started(directory: Path, count: int = 1, timeout: float = 60.0) -> set[int]:
    from tests.conftest import wait_until

    pids = wait_until(lambda: len(started(directory)) >= count and started(directory), timeout=timeout)
    assert pids, f"no call started running (markers in {directory}: {sorted(os.listdir(directory))})"
    return pids


def open_gate(directory: Path) -> None:
    (Path(directory) / "open").touch()


def leaked_shm(before: set[str], timeout: float = 5.0) -> set[str]:
    """/dev/shm entries created since *before* that no other program has mapped: leaked by us.

    /dev/shm is shared by the whole machine: an entry that another program (another test run, a
    benchmark) has mapped is not ours, and multiprocessing's resource tracker of a program that just
    exited may need a moment to unlink its semaphores, hence the short wait."""
    from tests.conftest import shm_entries, wait_until

    def leaked() -> set[str]:
        return (shm_entries() - before) - _mapped_shm_names({os.getpid()})

    if wait_until(lambda: not leaked(), timeout=timeout):
        return set()
    return leaked()
