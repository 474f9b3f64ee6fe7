"""Chaos run: calls over real HTTP while worker processes are SIGKILLed; nothing may hang or leak.

    python benchmarks/chaos.py [--calls N] [--threads T] [--kill-every K] [--workers W]
                               [--ms MS] [--timeout S] [--max-seconds S]
                               [--retries R] [--max-restarts M] [--kill-interval SECONDS]

It starts a web server in a subprocess (Werkzeug's threaded server on 127.0.0.1, a free port) whose
``POST /infer`` view calls ``benchmarks.models:sleepy_factory`` (``x + 1`` after MS milliseconds)
through ``@pool.infer``, with W workers and ``TORCHPOOL_RETRIES`` left at its default (1) unless
``--retries`` says otherwise, and whose ``GET /status`` answers ``pool.status()``. T client threads (one
``requests.Session`` each) send N calls between them, each with a client-side timeout well above
``TORCHPOOL_TIMEOUT``: a call that gets no answer by then is counted as *hung*. Every K completed calls
the script SIGKILLs one ready worker (pids from ``/status``; a busy one when there is one). It never
kills a worker slot more often than the restart budget allows (``TORCHPOOL_MAX_RESTARTS`` per minute,
``--max-restarts``): that budget is there to stop crash loops, which this run does not test; a kill
waits instead. The run stops after N calls or ``--max-seconds``.

Then it prints calls ok / failed (by status and error type) / hung, kills, respawns, and, before and
after, the web process's open descriptors, RSS and threads, the new /dev/shm entries and the worker
processes alive against those configured; finally it SIGTERMs the server (a drain) and checks that
no process and no /dev/shm entry outlives it. It exits 0 only if the bar holds:

* zero hung calls;
* failed calls no more than the calls that were running on killed workers (with one retry each,
  expect none);
* zero leaks: descriptors back to the baseline (+- 4), no new /dev/shm entry, as many live workers
  as configured and no zombie, and after the server exits no process of it left.

``--kill-interval 0.5`` is the crash storm of issue 11 (the OOM killer under memory pressure): a ready
worker is SIGKILLed every 0.5 s, by the clock, whatever the restart budget says (when no worker is
ready, the kill waits for one). A thread samples ``/status`` every 50 ms to know when no worker was
ready. The bar's second line becomes: failed calls no more than those running on killed workers plus
the 504s whose deadline passed while no worker was ready (the nearest sample before the answer showed
none).

The machinery (server subprocess, /proc readers) is shared with ``benchmarks/overload.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
# `python benchmarks/X.py` puts benchmarks/ first on sys.path, not the repository root; and benchmarks/
# holds modules named like standard ones (http.py) that must not shadow them: swap the one for the other.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "benchmarks"]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import requests  # noqa: E402  (after the sys.path fix, like every import of this package)

#: Seconds the server gets to import torch, spawn its workers and answer.
START_DEADLINE = 120.0
FD_TOLERANCE = 4


# --- the server (runs in the subprocess) ------------------------------------------------------------


def serve(config: dict[str, Any]) -> None:
    """Run the benchmark app until killed or SIGTERMed. Prints ``LISTENING <port> <pid>`` once up."""
    import faulthandler
    import logging

    import torch
    from flask import Flask, jsonify, request
    from werkzeug.serving import make_server

    from flask_torchpool import TorchPool

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s [server %(process)d] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack to the log

    app = Flask("torchpool_benchmark")
    app.config.update(TORCHPOOL_MODEL="benchmarks.models:sleepy_factory", TORCHPOOL_DEVICES="cpu")
    app.config.update(config)
    pool = TorchPool(app)

    @app.post("/infer")
    @pool.infer
    def infer(model: Any) -> dict[str, Any]:
        body = request.get_json()
        y = model(torch.tensor(body["x"], dtype=torch.float32), ms=float(body.get("ms", 0.0)))
        return {"y": y.tolist()}

    @app.get("/status")
    def status() -> Any:
        return jsonify({**pool.status(), "pid": os.getpid()})

    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(f"LISTENING {server.server_address[1]} {os.getpid()}", flush=True)
    server.serve_forever()


# --- the client side: the server process, /proc, /dev/shm ------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def status(self, session: requests.Session | None = None) -> dict[str, Any]:
        getter = session.get if session is not None else requests.get
        resp = getter(self.url + "/status", timeout=30)
        resp.raise_for_status()
        return resp.json()


@contextmanager
def server_running(config: dict[str, Any], log_dir: Path) -> Iterator[Server]:
    """Start the benchmark server with *config* as the leader of a new process group; SIGKILL that
    group (the server and its workers, nothing else) on the way out, whatever happened."""
    log_path = log_dir / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "WERKZEUG_", "TORCHPOOL_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    # `-c`, not this file: spawned workers re-import a script __main__, and there is none here.
    code = "import json, sys; from benchmarks.chaos import serve; serve(json.loads(sys.argv[1]))"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(config)], cwd=REPO_ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
    try:
        server = Server(proc, _wait_listening(proc, log_path), log_path)
        yield server
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


def _wait_listening(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    assert proc.stdout is not None
    result: list[str] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            if line.startswith(b"LISTENING "):
                result.append(line.decode().split()[1])
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(START_DEADLINE)
    if not result:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise SystemExit(f"the server did not start within {START_DEADLINE:g}s; its log:\n{tail}")
    return f"http://127.0.0.1:{result[0]}"


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll *predicate* until it is truthy or *timeout* passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_ready(server: Server, workers: int, timeout: float = 60.0,
               restarts: int = 0) -> dict[str, Any] | None:
    """The server's status once every one of *workers* workers is ready and at least *restarts*
    restarts have happened in all, or None at the timeout."""
    def ready() -> dict[str, Any] | None:
        try:
            status = server.status()
        except requests.RequestException:
            return None
        ws = status["workers"]
        return status if (len(ws) == workers and all(w["state"] == "ready" for w in ws)
                          and sum(w["restarts"] for w in ws) >= restarts) else None

    return wait_for(ready, timeout, interval=0.1)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def rss_mib(pid: int) -> float:
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024


def thread_count(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def open_fds(pid: int) -> collections.Counter[str]:
    """The open descriptors of *pid* by kind: socket, pipe, memfd, anon_inode, file, ..."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            kinds[target.split(":", 1)[0]] += 1
        elif target.startswith("/memfd:"):
            kinds["memfd"] += 1
        elif target.startswith("anon_inode:"):
            kinds["anon_inode"] += 1
        else:
            kinds["file"] += 1
    return kinds


def describe_fds(kinds: collections.Counter[str]) -> str:
    detail = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    return f"{sum(kinds.values())} ({detail})"


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(parent: int) -> dict[int, str]:
    """Children of *parent* (zombies included): pid -> ``worker``, ``zombie`` or ``other``."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat(int(entry))
        if fields is None or int(fields[1]) != parent:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if fields[0] == "Z":
            out[int(entry)] = "zombie"
        elif b"multiprocessing.spawn import spawn_main" in cmd:
            out[int(entry)] = "worker"
        else:
            out[int(entry)] = "other"  # multiprocessing's resource tracker
    return out


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def shm_mapped_by_others(ours: set[int]) -> set[str]:
    """/dev/shm names mapped by processes not in *ours* (the machine is shared: theirs, not leaks)."""
    names: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                for line in f:
                    if "/dev/shm/" in line:
                        names.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        except OSError:
            continue
    return names


def new_shm(before: set[str], ours: set[int]) -> set[str]:
    new = shm_entries() - before
    return new - shm_mapped_by_others(ours) if new else new


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def stop_server(server: Server, workers: set[int], timeout: float) -> tuple[int | None, float, set[int]]:
    """SIGTERM the server (it drains) and wait for it: (exit status, seconds, processes left)."""
    started = time.monotonic()
    tracked = workers | set(children(server.pid))
    server.proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    took = time.monotonic() - started
    wait_for(lambda: not any(pid_alive(p) for p in tracked), 5.0)
    return code, took, {p for p in tracked if pid_alive(p)}


# --- the chaos run ----------------------------------------------------------------------------------


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int = 0
    issued: int = 0
    last_done: float = 0.0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    timeouts_at: list[float] = field(default_factory=list)   # monotonic times 504s were answered
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)


def classify(resp: requests.Response, x: list[float]) -> str:
    if resp.status_code == 200:
        try:
            y = resp.json()["y"]
        except (ValueError, KeyError):
            return "200 without a result"
        return "ok" if y == [v + 1 for v in x] else "200 with a wrong result"
    try:
        kind = resp.json().get("type", "?")
    except ValueError:
        kind = "non-JSON body"
    retry = " +Retry-After" if "Retry-After" in resp.headers else ""
    return f"{resp.status_code} {kind}{retry}"


def client(server: Server, tally: Tally, calls: int, ms: float, client_timeout: float, stop_at: float,
           sessions: list[requests.Session]) -> None:
    session = requests.Session()
    sessions.append(session)
    while True:
        with tally.lock:
            if tally.issued >= calls or time.monotonic() > stop_at:
                return
            tally.issued += 1
            n = tally.issued
        x = [float(n % 1000), 0.5, -1.0, 2.0]
        started = time.perf_counter()
        try:
            resp = session.post(server.url + "/infer", json={"x": x, "ms": ms}, timeout=client_timeout)
            outcome = classify(resp, x)
        except requests.Timeout:
            outcome = "hung"
        except requests.RequestException as exc:
            outcome = f"connection error ({type(exc).__name__})"
        took = time.perf_counter() - started
        with tally.changed:
            tally.done += 1
            tally.last_done = time.monotonic()
            tally.outcomes[outcome] += 1
            if outcome.startswith("504 "):
                tally.timeouts_at.append(tally.last_done)
            if outcome == "ok":
                tally.latencies.append(took)
            tally.changed.notify_all()


@dataclass
class Kill:
    slot: int
    pid: int
    inflight: int      # jobs outstanding on it in the status read just before the kill
    others_ready: int  # other workers ready at that moment
    at: float          # monotonic time
    done: int = 0      # calls completed when it was decided


class Killer:
    """SIGKILLs ready workers of the server, within the restart budget.

    The budget (``TORCHPOOL_MAX_RESTARTS`` per worker slot within ``TORCHPOOL_RESTART_WINDOW``) exists
    to stop crash loops; this run is about surviving kills, so it never kills a slot more often than
    the budget allows: when every ready worker's slot has used it up, the kill waits."""

    def __init__(self, server: Server, max_restarts: int, window: float) -> None:
        self.server = server
        self.max_restarts = max_restarts
        self.window = window
        self.kills: list[Kill] = []
        self.waited = 0.0

    def recent(self, slot: int, now: float) -> int:
        return sum(1 for k in self.kills if k.slot == slot and k.at > now - self.window)

    def kill_one(self, session: requests.Session, give_up: Callable[[], bool],
                 timeout: float = 60.0) -> Kill | None:
        """Kill a ready worker: of the slots least killed lately, a busy one. None at the timeout or
        once *give_up* says so (the calls are all done)."""
        started = time.monotonic()
        while time.monotonic() < started + timeout and not give_up():
            try:
                workers = self.server.status(session)["workers"]
            except requests.RequestException:
                time.sleep(0.05)
                continue
            now = time.monotonic()
            killed = {k.pid for k in self.kills}  # still "ready" until the server has reaped its death
            ready = [w for w in workers if w["state"] == "ready" and w["pid"] and w["pid"] not in killed
                     and (_stat(w["pid"]) or ["", "0"])[1] == str(self.server.pid)]
            eligible = [w for w in ready if self.recent(w["worker"], now) < self.max_restarts]
            if eligible:
                w = min(eligible, key=lambda w: (self.recent(w["worker"], now), w["inflight"] == 0))
                try:
                    os.kill(w["pid"], signal.SIGKILL)
                except ProcessLookupError:
                    continue
                kill = Kill(w["worker"], w["pid"], w["inflight"], len(ready) - 1, now)
                self.kills.append(kill)
                self.waited += now - started
                return kill
            time.sleep(0.05)  # every worker is being respawned, or out of budget: wait for one
        self.waited += time.monotonic() - started
        return None


class ReadySampler:
    """Polls the server's /status every *interval* seconds: (monotonic time, workers ready)."""

    def __init__(self, server: Server, interval: float = 0.05) -> None:
        self.server = server
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="ready-sampler", daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self.stop.wait(self.interval):
                try:
                    workers = self.server.status(session)["workers"]
                except requests.RequestException:
                    continue
                self.samples.append((time.monotonic(), sum(w["state"] == "ready" for w in workers)))

    def none_ready_at(self, t: float) -> bool:
        """Whether the last sample before *t* showed no worker ready."""
        before = [n for at, n in self.samples if at <= t]
        return bool(before) and before[-1] == 0

    def none_ready_seconds(self) -> float:
        return sum(b[0] - a[0] for a, b in zip(self.samples, self.samples[1:]) if a[1] == 0)


def run(args: argparse.Namespace) -> int:
    config = {
        "TORCHPOOL_WORKERS": args.workers,
        "TORCHPOOL_TIMEOUT": args.timeout,
        "TORCHPOOL_DRAIN_TIMEOUT": 10.0,
    }
    if args.max_restarts is not None:
        config["TORCHPOOL_MAX_RESTARTS"] = args.max_restarts
    if args.retries is not None:
        config["TORCHPOOL_RETRIES"] = args.retries
    client_timeout = args.timeout + 30.0
    every = f"{args.kill_interval:g} s (a storm)" if args.kill_interval else f"{args.kill_every} calls"
    print(f"chaos: {args.calls} calls from {args.threads} threads, SIGKILL a worker every "
          f"{every}; {args.workers} workers, model sleeps {args.ms:g} ms; "
          f"TORCHPOOL_TIMEOUT={args.timeout:g}s, client timeout {client_timeout:g}s, TORCHPOOL_RETRIES="
          f"{'1 (default)' if args.retries is None else args.retries}; load average {load_average()} on "
          f"{os.cpu_count()} CPUs")
    shm_before = shm_entries()
    with tempfile.TemporaryDirectory(prefix="torchpool-chaos-") as tmp, \
            server_running(config, Path(tmp)) as server:
        status0 = wait_ready(server, args.workers)
        if status0 is None:
            print(f"the workers did not become ready; server log:\n{server.log_tail()}")
            return 1
        # Warm up (the first calls import and allocate), then take the baseline with no client
        # connection open: once the handler thread of the warm-up connection has exited.
        idle_threads = thread_count(server.pid)
        with requests.Session() as warm:
            for i in range(4 * args.workers):
                warm.post(server.url + "/infer", json={"x": [float(i)], "ms": args.ms}, timeout=30)
        wait_for(lambda: thread_count(server.pid) <= idle_threads, 5.0)
        fds_before, rss_before, threads_before = open_fds(server.pid), rss_mib(server.pid), \
            thread_count(server.pid)
        workers_before = {w["pid"] for w in status0["workers"]}

        tally = Tally()
        sessions: list[requests.Session] = []
        started = time.monotonic()
        stop_at = started + args.max_seconds
        threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True,
                                    args=(server, tally, args.calls, args.ms, client_timeout, stop_at,
                                          sessions))
                   for i in range(args.threads)]
        for t in threads:
            t.start()
        # A storm ignores the restart budget: the point is that the pool survives it.
        killer = Killer(server, 10**9 if args.kill_interval else
                        args.max_restarts if args.max_restarts is not None else 5, 60.0)
        sampler = ReadySampler(server)
        sampler.thread.start()
        seen_pids = set(workers_before)
        next_kill = args.kill_every if args.kill_every > 0 and not args.kill_interval else args.calls + 1

        def kill_due() -> bool:
            return tally.done >= next_kill or not any(t.is_alive() for t in threads)

        with requests.Session() as control:
            last_kill = time.monotonic()
            while args.kill_interval:
                # The storm's cadence is the clock (an OOM killer does not wait for calls to finish).
                time.sleep(max(0.0, last_kill + args.kill_interval - time.monotonic()))
                if not any(t.is_alive() for t in threads):
                    break
                with tally.lock:
                    done = tally.done
                kill = killer.kill_one(control, lambda: not any(t.is_alive() for t in threads))
                last_kill = time.monotonic()
                if kill is not None:
                    kill.done = done
                    seen_pids.add(kill.pid)
            while True:
                with tally.changed:
                    tally.changed.wait_for(kill_due, timeout=1.0)
                    done = tally.done
                if not any(t.is_alive() for t in threads):
                    break
                if done >= next_kill:
                    kill = killer.kill_one(control, lambda: not any(t.is_alive() for t in threads))
                    if kill is not None:
                        kill.done = done
                        seen_pids.add(kill.pid)
                    next_kill += args.kill_every
        for t in threads:
            t.join()
        sampler.stop.set()
        sampler.thread.join(10)
        elapsed = max(tally.last_done - started, 1e-9)
        for s in sessions:
            s.close()
        if server.proc.poll() is not None:
            print(f"the server exited ({server.proc.returncode}) during the run; its log:\n"
                  f"{server.log_tail()}")
            return 1

        # Let the last killed worker come back and the server's handler threads wind down.
        final = wait_ready(server, args.workers, timeout=60.0, restarts=len(killer.kills))
        if final is None:
            final = server.status()
            print(f"after 60s, not every kill was followed by a respawn: {final['workers']}")
        seen_pids |= {w["pid"] for w in final["workers"] if w["pid"]}
        wait_for(lambda: thread_count(server.pid) <= threads_before, 5.0)
        fds_after, rss_after, threads_after = open_fds(server.pid), rss_mib(server.pid), \
            thread_count(server.pid)
        kids = children(server.pid)
        live_workers = sorted(p for p, kind in kids.items() if kind == "worker")
        zombies = sorted(p for p, kind in kids.items() if kind == "zombie")
        ours = {server.pid, *kids}
        shm_running = new_shm(shm_before, ours)

        code, took, left = stop_server(server, seen_pids, timeout=30.0)
        shm_after_exit = new_shm(shm_before, set())
        log_text = server.log_tail(200_000)

    kills = killer.kills
    by_slot = collections.Counter(k.slot for k in kills)
    counters = final.get("counters", {})
    respawns = sum(w["restarts"] for w in final["workers"])
    on_killed = counters.get("retries", 0) + counters.get("crashes", 0)
    ok = tally.outcomes.get("ok", 0)
    hung = tally.outcomes.get("hung", 0)
    failed = tally.done - ok - hung
    timeouts_none_ready = sum(1 for t in tally.timeouts_at if sampler.none_ready_at(t))
    fd_delta = sum(fds_after.values()) - sum(fds_before.values())

    print()
    lat = tally.latencies
    print(f"{tally.done} calls in {elapsed:.1f}s ({tally.done / elapsed:.0f}/s); latency of the ok calls: "
          f"p50 {percentile(lat, 0.5) * 1e3:.1f} ms, p99 {percentile(lat, 0.99) * 1e3:.1f} ms, "
          f"max {max(lat, default=float('nan')) * 1e3:.1f} ms")
    rows = [
        ("calls ok", ok),
        ("calls failed", failed),
    ]
    rows += [(f"  {kind}", n) for kind, n in sorted(tally.outcomes.items()) if kind not in ("ok", "hung")]
    rows += [
        (f"calls hung (no answer in {client_timeout:g}s)", hung),
        ("workers SIGKILLed", f"{len(kills)} (per slot {dict(sorted(by_slot.items()))}; "
                              f"{sum(k.others_ready == 0 for k in kills)} left no other worker ready; "
                              f"waited {killer.waited:.1f}s in all for a ready worker within budget)"),
        ("  calls running on them, retried", counters.get("retries", 0)),
        ("  calls running on them, failed", counters.get("crashes", 0)),
        ("  inflight seen at kill time", sum(k.inflight for k in kills)),
        ("respawns (status restarts)", respawns),
        ("504s answered while no worker was ready", f"{timeouts_none_ready} of {len(tally.timeouts_at)}"),
        ("time with no worker ready", f"{sampler.none_ready_seconds():.1f}s of {elapsed:.1f}s "
                                      f"({len(sampler.samples)} samples)"),
        ("pool counters", ", ".join(f"{k} {v}" for k, v in counters.items())),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print()
    table = [
        ("", "before", "after"),
        ("web process open fds", describe_fds(fds_before), describe_fds(fds_after)),
        ("web process RSS", f"{rss_before:.1f} MiB", f"{rss_after:.1f} MiB"),
        ("web process threads", str(threads_before), str(threads_after)),
        ("/dev/shm entries", f"{len(shm_before)}", f"{len(shm_before) + len(shm_running)} "
                                                     f"(new and not another program's: {len(shm_running)})"),
        ("worker processes alive", f"{len(workers_before)} of {args.workers}",
         f"{len(live_workers)} of {args.workers}, zombies {len(zombies)}"),
    ]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print()
    print(f"SIGTERM to the server: exit status {code} after {took:.2f}s; processes of it left: "
          f"{sorted(left) or 'none'}; new /dev/shm entries after exit: {sorted(shm_after_exit) or 'none'}")
    print("kills (s since start, calls done, slot, pid, jobs on it, other workers ready): " + "; ".join(
        f"{k.at - started:.1f}s {k.done} w{k.slot} {k.pid} {k.inflight} {k.others_ready}" for k in kills))
    deaths = log_text.count(" died, ")
    print(f"server log: {deaths} worker death(s) logged, "
          f"{log_text.count('is back')} 'is back', {log_text.count('restart budget spent')} budget spent")

    bars = [
        ("zero hung calls", hung == 0, f"{hung} hung"),
        ("failed <= calls running on killed workers" + (" + 504s while none was ready"
                                                         if args.kill_interval else ""),
         failed <= on_killed + (timeouts_none_ready if args.kill_interval else 0),
         f"{failed} failed, {on_killed} were running on killed workers"
         + (f", {timeouts_none_ready} timed out while no worker was ready" if args.kill_interval else "")),
        (f"fds back to baseline (+-{FD_TOLERANCE})", abs(fd_delta) <= FD_TOLERANCE, f"delta {fd_delta:+d}"),
        ("no new /dev/shm entries (running, after exit)", not shm_running and not shm_after_exit,
         f"{sorted(shm_running | shm_after_exit) or 'none'}"),
        ("live workers == configured, no zombies", len(live_workers) == args.workers and not zombies
         and all(w["state"] == "ready" for w in final["workers"]),
         f"{len(live_workers)} live of {args.workers}, {len(zombies)} zombies"),
        ("every kill respawned", respawns == len(kills), f"{respawns} respawns for {len(kills)} kills"),
        ("nothing outlives the server", not left and code is not None, f"left {sorted(left)}"),
    ]
    return report_bars(bars)


def report_bars(bars: list[tuple[str, bool, str]]) -> int:
    """Print each bar as ok/FAIL with its detail; 0 if every bar holds, else 1."""
    print()
    held = True
    for name, good, detail in bars:
        held &= good
        print(f"  [{'ok' if good else 'FAIL'}] {name}: {detail}")
    print(f"\nbar {'holds' if held else 'DOES NOT hold'} (load average now {load_average()})")
    return 0 if held else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls to send (default 1000)")
    parser.add_argument("--threads", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--kill-every", type=int, default=100,
                        help="SIGKILL a worker every K completed calls (default 100; 0: never)")
    parser.add_argument("--workers", type=int, default=2, help="TORCHPOOL_WORKERS (default 2)")
    parser.add_argument("--ms", type=float, default=5.0, help="model time per call in ms (default 5)")
    parser.add_argument("--timeout", type=float, default=15.0, help="TORCHPOOL_TIMEOUT (default 15)")
    parser.add_argument("--max-restarts", type=int, default=None,
                        help="TORCHPOOL_MAX_RESTARTS (default: the pool's, 5 per worker per minute); "
                             "kills wait rather than exceed it")
    parser.add_argument("--retries", type=int, default=None,
                        help="TORCHPOOL_RETRIES (default: the pool's, 1)")
    parser.add_argument("--kill-interval", type=float, default=0.0,
                        help="a crash storm: SIGKILL a ready worker every SECONDS by the clock, ignoring "
                             "the restart budget (e.g. 0.5; default 0: use --kill-every)")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="stop sending calls after this many seconds (default 120)")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
