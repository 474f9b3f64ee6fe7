"""The HTTP benchmark behind ``benchmarks/http.py``: flask_torchpool against the usual ways to serve a
PyTorch model, over real HTTP, in one run.

    python benchmarks/http.py [--quick] [--duration S] [--workloads conv,wide-mlp,payload-16m,tiny]
                              [--servers flask,gunicorn,litserve,...] [--concurrency 1,8,16]
                              [--batch-size 16] [--wait-idle 1.0] [--docs | --no-docs] [--json FILE]
                              [--torchpool-config '{"TORCHPOOL_WORKERS": 1}']

The performance issue's table (every server, every workload, c=8 and c=16, batch 16)::

    python benchmarks/http.py --concurrency 8,16 --batch-size 16 --wait-idle 1.0 --json results.json

For each workload (``benchmarks.models.WORKLOADS``) and each server, in one run::

    flask             plain Flask, the model in-process, werkzeug's threaded dev server
    gunicorn          gunicorn -w N -k sync, every worker building the model
    litserve          LitServe, N inference workers (workers_per_device=N on the CPU), its defaults
    litserve-batch    the same with LitServe's own batching (max_batch_size, batch_timeout as below);
                      for information: the targets' "best peer" is the best of the three above
    torchpool         flask_torchpool, N workers, no batching
    torchpool-batch   flask_torchpool, N workers, TORCHPOOL_MAX_BATCH_SIZE / _DELAY_MS
    torchpool-copies  torchpool-batch with TORCHPOOL_SHARE_WEIGHTS=False (when flask_torchpool has
                      that key; on wide-mlp only unless --copies-everywhere)
    attach            gunicorn -w N -k sync, every web worker attached to one pool server
                      (TORCHPOOL_MODE "auto"), N model workers: compare with the gunicorn row
    attach-batch      the same with TORCHPOOL_MAX_BATCH_SIZE / _DELAY_MS
    attach-gthread-batch  attach-batch with gthread web workers (--threads 16 each), so that more
                      calls than web processes are in flight and batches can fill (information)
    attach-numpy, attach-gthread-batch-numpy  attach and attach-gthread-batch with a web app that
                      decodes the body with numpy and passes numpy arrays: its web processes and its
                      pool server never import torch (``benchmarks/peers/numpy_app.py``)
    torchpool-batch-numpy  torchpool-batch with that app: the embedded pool's web process imports
                      no torch either (only the model workers do)

flask_torchpool is served by gunicorn -k gthread -w 1 --threads 32 (``--torchpool-http gthread``, the
default: faster than werkzeug's threaded server in development runs) or werkzeug's threaded server;

it starts the server as a subprocess (its own session and process group) on a free port of 127.0.0.1,
waits (bounded) until ``GET /health`` answers, checks one ``POST /predict`` answer against the model run
here, warms up, then drives ``POST /predict`` with wrk (one thread; a C load generator that leaves the
cores to the server) for ``--duration`` seconds at each concurrency (connections). It reports requests
per second (2xx only), wrk's p50/p99 latency, errors (non-2xx answers and socket errors), and the total
PSS of the server's process tree (``Pss`` of ``/proc/PID/smaps_rollup`` summed over every process of its
session, sampled twice a second; the peak is reported). While the highest concurrency saturates the
model route, a second, light client (a thread here, one sequential ``GET /ping`` every 50 ms, i.e. 20 a
second, on one keep-alive connection) times a route that touches neither the model nor the pool. Then it
stops the server: SIGTERM to the server process (SIGINT for LitServe), SIGKILL to its process group after
a grace period, and a check that no process of its session is left.

Note [CPU per request]: every cell also reports the CPU the server spent per request: the CPU time
(``utime + stime`` of ``/proc/PID/stat``: every thread, live or ended) of every process of the server's
tree (its session, and the descendants of its members in sessions of their own, such as
flask_torchpool's pool server in attach mode, and its model workers) from just before wrk starts to just
after it ends, divided by the requests wrk got an answer to in that window. A process that started
during the window counts whole; one that ended during it counts through its parent's ``cutime +
cstime`` when a process of the tree waited for it (its CPU before the window taken off), else up to its
last sample (the tree is sampled twice a second: a lower bound, and the cell says how many there were).
Not counted: wrk and the light client (they run here, outside the tree). Counted but not in the request
count: the light client's ``GET /ping`` (20 a second, in the saturating cell only) and the requests in
flight when wrk stops (at most one per connection; the CPU they used before the window closed). Clock
ticks are 1/``SC_CLK_TCK`` s (10 ms) per process, nothing over a window of seconds.

Note [batch size]: for flask_torchpool servers the benchmark sets ``TORCHPOOL_HEALTH_URL`` and reads
``GET /torchpool/status`` before and after each window: the ``batch_rows`` and ``batch_calls`` histograms
of its ``metrics`` (in attach mode the pool server's, for every web process, fetched through the web
process that answers). The mean batch size of the window is the growth of their sums over the growth of
their counts, in rows (dim 0) and in calls. flask_torchpool records batches only when batching is on
(``TORCHPOOL_MAX_BATCH_SIZE`` > 1): without it the column is empty and every call runs alone.

Every server decodes the body the same way (raw float32 bytes -> ``torch.frombuffer``, one sample, shape
``(1, *sample_shape)``) and answers the same small JSON (output shape and first values): see
``benchmarks/peers/``. Same model, same weights (seeded factories), same number N of model processes.
Multi-process peers run ``cores // N`` torch threads per process (``--peer-threads share``, no
oversubscription, as flask_torchpool does by itself); plain Flask runs torch's default (every core).

The raw limit of each workload is measured in the same run, without HTTP: N processes (pinned, one
thread each, as the pool's workers) calling the model in a loop at batch 1 (and at the batch size of
``torchpool-batch``), started together.

At the end it prints the tables, ratios against the peers measured in the same run, the targets of the
performance issue as PASS/MISS with their numbers, and (unless ``--no-docs``; ``--quick`` implies it)
writes ``docs/benchmarks.rst`` (between its markers) and ``docs/_static/http_*.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.models import WORKLOADS, Workload

REPO_ROOT = Path(__file__).resolve().parents[2]

DOCS_RST = REPO_ROOT / "docs" / "benchmarks.rst"
DOCS_STATIC = REPO_ROOT / "docs" / "_static"
RST_BEGIN = ".. begin: generated by benchmarks/http.py"
RST_END = ".. end: generated by benchmarks/http.py"

PEERS = ("flask", "gunicorn", "litserve")  # the peers: "best peer" is the best of these
ALL_SERVERS = ("flask", "gunicorn", "litserve", "litserve-batch", "torchpool", "torchpool-batch",
               "torchpool-copies", "torchpool-batch-numpy", "attach", "attach-batch", "attach-gthread-batch",
               "attach-numpy", "attach-gthread-batch-numpy")
DEFAULT_SERVERS = ALL_SERVERS
TORCHPOOL_SERVERS = tuple(s for s in ALL_SERVERS if s.startswith(("torchpool", "attach")))
EMBEDDED_THREADED = ("torchpool", "torchpool-batch", "torchpool-copies",  # gthread (or werkzeug threaded)
                     "torchpool-batch-numpy")
START_DEADLINE = 180.0  # seconds for a server to answer /health (N model builds on a busy machine)
STOP_GRACE = 15.0  # seconds between SIGTERM and SIGKILL
LIGHT_PATH = "/ping"  # the light route: touches neither the model nor the pool
LIGHT_INTERVAL = 0.050  # the light client's pace: 20 requests a second, as the performance issue sent
HEALTH_URL = "/torchpool"  # TORCHPOOL_HEALTH_URL of the flask_torchpool servers (for their /status)
SAMPLE_INTERVAL = 0.5  # seconds between two samples of the server's process tree (PSS, CPU)
WRK_TIMEOUT = "30s"
WRK_INSTALL = ("wrk (https://github.com/wg/wrk) is not installed, and it is the load generator of this "
               "benchmark. Install it with your package manager: `sudo apt-get install -y wrk` (Debian, "
               "Ubuntu), `sudo dnf install wrk` (Fedora), `brew install wrk` (macOS); or build it from "
               "source: `git clone https://github.com/wg/wrk && make -C wrk` and put wrk/wrk on PATH.")
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- what a run is made of -------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    concurrency: tuple[int, ...]
    workers: int
    batch_size: int
    batch_delay_ms: float
    torchpool_http: str
    torchpool_threads: int
    peer_threads: str
    raw_seconds: float
    #: ``--torchpool-config``: TORCHPOOL_* keys set on every flask_torchpool server, after the benchmark's.
    torchpool_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def saturating(self) -> int:
        return max(self.concurrency)

    def peer_thread_count(self) -> int:
        return max(1, len(os.sched_getaffinity(0)) // self.workers)


@dataclass
class Server:
    """How to start one kind of server for one workload."""

    name: str
    label: str
    argv: list[str]
    env: dict[str, str]
    health: str = "/health"
    stop_signal: signal.Signals = signal.SIGTERM  # what stops it gracefully
    status: str | None = None  # flask_torchpool's status route (batch sizes), None for the peers


@dataclass
class Cell:
    """One wrk run: one workload, one server, one concurrency."""

    concurrency: int
    requests: int
    seconds: float
    rps: float  # 2xx answers per second
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    non2xx: int
    socket_errors: int
    pss_mib: float
    processes: int
    # Note [CPU per request]; None in results saved before the benchmark measured CPU
    cpu_s: float | None = None  # CPU seconds of the server's process tree in the window
    cpu_ms_per_request: float | None = None  # cpu_s over the requests answered in the window
    cpu_processes: int = 0  # processes of the tree seen during the window
    cpu_unreaped: int = 0  # of those, ended without a process of the tree waiting for them
    # Note [batch size]; None without batching, for the peers, or when the status could not be read
    batches: int | None = None
    batch_rows_mean: float | None = None
    batch_calls_mean: float | None = None
    pool_error: str | None = None  # why the status could not be read
    #: share of the window the pool's workers spent on calls (worker_busy_seconds over the window and
    #: the workers); None for the peers and for a status without that counter
    workers_busy: float | None = None


@dataclass
class Light:
    """The light client's view of GET /ping while the model route is saturated."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int


@dataclass
class Outcome:
    """One server on one workload: its cells, or why it has none."""

    server: str
    label: str
    error: str | None = None
    cells: dict[int, Cell] = field(default_factory=dict)
    light: Light | None = None
    answer: list[float] | None = None
    start_s: float | None = None
    leftovers: list[str] = field(default_factory=list)

    def cell(self, c: int) -> Cell | None:
        return self.cells.get(c)


@dataclass
class Raw:
    """The model alone in N processes, no HTTP."""

    batch: int
    samples_per_s: float
    median_call_ms: float


@dataclass
class Run:
    command: str
    started: str
    environment: dict[str, Any]
    settings: dict[str, Any]
    raw: dict[str, list[Raw]] = field(default_factory=dict)
    results: dict[str, list[Outcome]] = field(default_factory=dict)
    load_avg: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    leftovers: list[str] = field(default_factory=list)


# -- main ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.report_only:
        run = _load_run(Path(args.report_only))
        _report(run)
        if args.docs:
            _write_docs(run)
        return 0
    if shutil.which("wrk") is None:
        print(WRK_INSTALL, file=sys.stderr)
        return 2
    settings = Settings(
        duration=args.duration,
        warmup=args.warmup,
        concurrency=args.concurrency,
        workers=args.workers,
        batch_size=args.batch_size,
        batch_delay_ms=args.batch_delay_ms,
        torchpool_http=args.torchpool_http,
        torchpool_threads=args.torchpool_threads,
        peer_threads=args.peer_threads,
        raw_seconds=args.raw_seconds,
        torchpool_extra=args.torchpool_config,
    )
    command = "python benchmarks/http.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.wait_idle is not None:
        _wait_idle(args.wait_idle, args.wait_max)
    run = Run(command=command.strip(), started=datetime.datetime.now().isoformat(timespec="seconds"),
              environment=_environment(), settings=dataclasses.asdict(settings))
    run.load_avg["start"] = list(os.getloadavg())
    shm_before = _shm_entries()
    share_key = _has_share_weights()
    servers = [s for s in args.servers if s != "torchpool-copies" or share_key]
    if "torchpool-copies" in args.servers and not share_key:
        run.notes.append("torchpool-copies skipped: this flask_torchpool has no TORCHPOOL_SHARE_WEIGHTS")
    if share_key:
        run.notes.append("flask_torchpool has TORCHPOOL_SHARE_WEIGHTS: torchpool and torchpool-batch run "
                         "with it on, torchpool-copies (batching, weights copied per worker) with it off")
    _print_header(run, settings, args.workloads, servers)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="torchpool-http-") as tmp:
        for name in args.workloads:
            workload = WORKLOADS[name]
            run.load_avg[name] = list(os.getloadavg())
            print(f"\n=== {name}: {workload.description}  (load average "
                  f"{', '.join(f'{x:.2f}' for x in os.getloadavg())})", flush=True)
            run.raw[name] = _raw_limits(workload, settings)
            for raw in run.raw[name]:
                print(f"  raw limit, {settings.workers} processes x batch {raw.batch}: "
                      f"{raw.samples_per_s:,.1f} samples/s (median call {raw.median_call_ms:.2f} ms)",
                      flush=True)
            body_path = Path(tmp) / f"{name}.bin"
            body_path.write_bytes(workload.body())
            script = _wrk_script(Path(tmp), body_path)
            expected = _expected_answer(workload)
            run.results[name] = []
            for server_name in servers:
                if server_name == "torchpool-copies" and not args.copies_everywhere and name != "wide-mlp":
                    continue  # weights matter only where there are many of them
                server = _server(server_name, workload, settings)
                outcome = _bench_server(server, workload, settings, script, expected, Path(tmp))
                run.results[name].append(outcome)
                if outcome.leftovers:
                    run.leftovers.append(f"{name}/{server_name}: {outcome.leftovers}")
    run.wall_s = time.monotonic() - t0
    run.load_avg["end"] = list(os.getloadavg())
    stale = sorted(_shm_entries() - shm_before)
    if stale:
        run.notes.append(f"/dev/shm entries left behind during the run: {stale}")
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(run), indent=1))
        print(f"\nresults written to {args.json}")
    _report(run)
    if args.docs:
        _write_docs(run)
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 s per cell, 1 s warm-up, no docs written: for development")
    parser.add_argument("--duration", type=int, default=None, help="seconds per cell (default 15)")
    parser.add_argument("--warmup", type=int, default=None, help="seconds of load before the cells (3)")
    parser.add_argument("--workloads", type=_names(WORKLOADS), default=tuple(WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--servers", type=_names(ALL_SERVERS), default=DEFAULT_SERVERS,
                        help=f"comma-separated, of {', '.join(ALL_SERVERS)} (default: all)")
    parser.add_argument("--concurrency", type=_ints, default=(1, 32),
                        help="comma-separated wrk connection counts (default 1,32)")
    parser.add_argument("--workers", type=int, default=2, help="model processes N for every server (2)")
    parser.add_argument("--batch-size", type=int, default=32, help="TORCHPOOL_MAX_BATCH_SIZE (32)")
    parser.add_argument("--batch-delay-ms", type=float, default=2.0, help="TORCHPOOL_MAX_BATCH_DELAY_MS (2)")
    parser.add_argument("--torchpool-http", choices=("werkzeug", "gthread"), default="gthread",
                        help="the HTTP server in front of flask_torchpool: werkzeug's threaded server "
                        "or gunicorn -k gthread -w 1 --threads 32 (default gthread)")
    parser.add_argument("--torchpool-threads", type=int, default=32,
                        help="gunicorn gthread threads in front of flask_torchpool (32)")
    parser.add_argument("--peer-threads", choices=("share", "default"), default="share",
                        help="torch threads of gunicorn's and LitServe's model processes: cores // N "
                        "(share, default) or torch's default (every core, oversubscribed)")
    parser.add_argument("--torchpool-config", type=_config, default={}, metavar="JSON",
                        help="TORCHPOOL_* keys (a JSON object) for every flask_torchpool server, over the "
                        "benchmark's own (e.g. '{\"TORCHPOOL_WORKERS\": 1}'); the peers keep --workers")
    parser.add_argument("--raw-seconds", type=float, default=None, help="seconds of each raw-limit loop (4)")
    parser.add_argument("--copies-everywhere", action="store_true",
                        help="run torchpool-copies on every workload, not only wide-mlp")
    parser.add_argument("--wait-idle", type=float, default=None, metavar="LOAD",
                        help="first wait (polling every 30 s) until the 1-minute load average is below LOAD")
    parser.add_argument("--wait-max", type=float, default=900.0, help="give up waiting after this (900 s)")
    parser.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None,
                        help="write docs/benchmarks.rst and docs/_static/http_*.png "
                        "(default: unless --quick)")
    parser.add_argument("--json", default=None, help="also save the raw results to this file")
    parser.add_argument("--report-only", default=None, metavar="JSON",
                        help="print the report (and write the docs) of a saved --json run, measure nothing")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (3 if quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.raw_seconds = args.raw_seconds or (1.0 if quick else 4.0)
    if args.docs is None:
        args.docs = not quick
    if args.workers < 1 or args.batch_size < 1 or args.duration < 1:
        parser.error("--workers, --batch-size and --duration must be at least 1")
    return args


def _names(allowed: Any) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names

    return parse


def _config(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict) or not all(str(k).startswith("TORCHPOOL_") for k in value):
        raise argparse.ArgumentTypeError("a JSON object of TORCHPOOL_* keys")
    return value


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be >= 1")
    return values


def _wait_idle(limit: float, wait_max: float) -> None:
    end = time.monotonic() + wait_max
    while True:
        load = os.getloadavg()[0]
        print(f"{time.strftime('%H:%M:%S')} 1-minute load average {load:.2f} (waiting for < {limit:g})",
              flush=True)
        if load < limit:
            return
        if time.monotonic() >= end:
            print(f"still {load:.2f} after {wait_max:g} s: running anyway; the numbers are noisy",
                  flush=True)
            return
        time.sleep(30)


def _has_share_weights() -> bool:
    try:
        from flask_torchpool.config import DEFAULTS
    except ImportError:
        return False
    return "TORCHPOOL_SHARE_WEIGHTS" in DEFAULTS


def _environment() -> dict[str, Any]:
    import torch

    versions = {}
    for package in ("flask", "werkzeug", "gunicorn", "litserve", "torch"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        mem = f"{kib / (1 << 20):.0f} GiB of memory"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory": mem,
        "torch_threads_default": torch.get_num_threads(),
        "versions": versions,
        "wrk": (wrk.stdout or wrk.stderr or "wrk ?").splitlines()[0].split(" Copyright")[0].strip(),
    }


def _print_header(run: Run, settings: Settings, workloads: Sequence[str], servers: Sequence[str]) -> None:
    env = run.environment
    print(f"command: {run.command}")
    print(f"python {env['python']}, {env['platform']}, {env['cpu']}, {env['cores']} cores, {env['memory']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f", {env['wrk']}")
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in run.load_avg['start'])}")
    cells = len(workloads) * len(servers) * len(settings.concurrency)
    guess = cells * settings.duration + len(workloads) * len(servers) * (settings.warmup + 12) + \
        len(workloads) * (2 * settings.raw_seconds + 8)
    print(f"workloads {', '.join(workloads)}; servers {', '.join(servers)}; concurrency "
          f"{', '.join(map(str, settings.concurrency))}; {settings.duration} s a cell; N = {settings.workers}"
          f"; about {guess / 60:.0f} min")
    for note in run.notes:
        print(f"note: {note}")


# -- the raw limit ---------------------------------------------------------------------------------


def _raw_limits(workload: Workload, settings: Settings) -> list[Raw]:
    batches = [1]
    if settings.batch_size > 1 and workload.body_bytes * settings.batch_size <= 64 * MIB:
        batches.append(settings.batch_size)
    return [_raw_limit(workload, settings, b) for b in batches]


def _raw_limit(workload: Workload, settings: Settings, batch: int) -> Raw:
    cores = sorted(os.sched_getaffinity(0))
    threads = max(1, len(cores) // settings.workers)
    procs = []
    try:
        for i in range(settings.workers):
            argv = [sys.executable, "-m", "benchmarks.peers.raw", "--workload", workload.name,
                    "--core", str(cores[(i * threads) % len(cores)]), "--threads", str(threads),
                    "--batch", str(batch), "--seconds", str(settings.raw_seconds)]
            procs.append(subprocess.Popen(argv, cwd=REPO_ROOT, env=_child_env(), stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, start_new_session=True))
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a raw-limit process for {workload.name} failed to start")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [json.loads(p.communicate(timeout=settings.raw_seconds + 120)[0].strip().splitlines()[-1])
                for p in procs]
    finally:
        for p in procs:
            _kill_session(p.pid)
            p.wait()
    return Raw(batch, sum(o["samples"] / o["seconds"] for o in outs),
               statistics.median(o["median_call_ms"] for o in outs))


def _expected_answer(workload: Workload) -> list[float]:
    import torch

    from benchmarks.peers import common

    model = workload.build()
    with torch.inference_mode():
        out = model(common.decode(workload.body(), workload))
    return json.loads(common.encode(out))["head"]


# -- the servers -----------------------------------------------------------------------------------


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLASK_", "WERKZEUG_", "GUNICORN_", "TORCHPOOL_", "BENCH_", "OMP_",
                                "MKL_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _server(name: str, workload: Workload, settings: Settings) -> Server:
    py = sys.executable
    n = str(settings.workers)
    peer_threads = {"BENCH_TORCH_THREADS": str(settings.peer_thread_count())} \
        if settings.peer_threads == "share" else {}
    base = {"BENCH_WORKLOAD": workload.name}
    if name == "flask":
        return Server(name, "plain Flask (threaded dev server, model in-process)",
                      [py, "-m", "benchmarks.peers.flask_app", "--port", "{port}"],
                      _child_env(**base, BENCH_MODE="inprocess"))
    if name == "gunicorn":
        return Server(name, f"gunicorn -w {n} -k sync, model in every worker",
                      [py, "-m", "gunicorn", "-w", n, "-k", "sync", "-b", "127.0.0.1:{port}", "--timeout",
                       "120", "benchmarks.peers.flask_app:create_app()"],
                      _child_env(**base, **peer_threads, BENCH_MODE="inprocess"))
    if name in ("litserve", "litserve-batch"):
        argv = [py, "-m", "benchmarks.peers.litserve_app", "--port", "{port}", "--workers", n]
        label = f"LitServe, workers_per_device={n}"
        if name == "litserve-batch":
            argv += ["--max-batch-size", str(settings.batch_size),
                     "--batch-timeout", str(settings.batch_delay_ms / 1000)]
            label += f", max_batch_size={settings.batch_size}"
        # LitServe shuts down on Ctrl-C (KeyboardInterrupt); it does not stop on SIGTERM.
        return Server(name, label, argv, _child_env(**base, **peer_threads), stop_signal=signal.SIGINT)
    if name.endswith("-numpy"):
        server = _server(name.removesuffix("-numpy"), workload, settings)
        app = "benchmarks.peers.flask_app:create_app()"
        argv = [a if a != app else "benchmarks.peers.numpy_app:create_app()" for a in server.argv]
        env = {**server.env, "BENCH_FACTORY": workload.factory,
               "BENCH_SAMPLE_SHAPE": ",".join(map(str, workload.sample_shape))}
        return dataclasses.replace(server, name=name, label=server.label + ", numpy web app (no torch)",
                                   argv=argv, env=env)
    if name in ("attach", "attach-batch", "attach-gthread-batch"):
        # gunicorn -w N sync web workers attached to one pool server (TORCHPOOL_MODE "auto": the first
        # web worker starts it), against the "gunicorn" row: the same -w N with the model in-process.
        sock_dir = Path(tempfile.mkdtemp(prefix="bench-attach-"))
        config = {"TORCHPOOL_WORKERS": settings.workers, "TORCHPOOL_MODE": "auto",
                  "TORCHPOOL_SOCKET": str(sock_dir / "pool.sock"),
                  "TORCHPOOL_ARENA_BYTES": max(64 * MIB, 8 * workload.body_bytes),
                  "TORCHPOOL_HEALTH_URL": HEALTH_URL}
        label = f"gunicorn -w {n} -k sync attached to one flask_torchpool server, {n} workers"
        if name in ("attach-batch", "attach-gthread-batch"):
            label += _batching(config, settings)
        worker_class = ["-k", "sync"]
        if name == "attach-gthread-batch":
            worker_class = ["-k", "gthread", "--threads", "16"]
            label = label.replace("-k sync", "-k gthread --threads 16")
        argv = [py, "-m", "gunicorn", "-w", n, *worker_class, "-b", "127.0.0.1:{port}", "--timeout", "120",
                "benchmarks.peers.flask_app:create_app()"]
        return Server(name, label + _extra(config, settings), argv,
                      _child_env(**base, BENCH_MODE="torchpool", BENCH_TORCHPOOL_CONFIG=json.dumps(config)),
                      status=f"{HEALTH_URL}/status")
    if name.startswith("torchpool"):
        config: dict[str, Any] = {"TORCHPOOL_WORKERS": settings.workers,
                                  "TORCHPOOL_ARENA_BYTES": max(256 * MIB, 8 * workload.body_bytes),
                                  "TORCHPOOL_HEALTH_URL": HEALTH_URL}
        label = f"flask_torchpool, {n} workers"
        if name in ("torchpool-batch", "torchpool-copies"):
            label += _batching(config, settings)
        if _has_share_weights():
            config["TORCHPOOL_SHARE_WEIGHTS"] = name != "torchpool-copies"
            label += ", weights shared" if name != "torchpool-copies" else ", weights copied"
        if settings.torchpool_http == "werkzeug":
            argv = [py, "-m", "benchmarks.peers.flask_app", "--port", "{port}"]
            label += " (werkzeug threaded)"
        else:
            threads = str(settings.torchpool_threads)
            argv = [py, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", threads, "-b",
                    "127.0.0.1:{port}", "--timeout", "120", "benchmarks.peers.flask_app:create_app()"]
            label += f" (gunicorn -k gthread -w 1 --threads {threads})"
        label += _extra(config, settings)
        return Server(name, label, argv, _child_env(**base, BENCH_MODE="torchpool",
                                                    BENCH_TORCHPOOL_CONFIG=json.dumps(config)),
                      status=f"{HEALTH_URL}/status")
    raise ValueError(name)


def _extra(config: dict[str, Any], settings: Settings) -> str:
    """Apply ``--torchpool-config`` to *config*; the words for the server's label."""
    config.update(settings.torchpool_extra)
    return "".join(f", {k}={v!r}" for k, v in settings.torchpool_extra.items())


def _batching(config: dict[str, Any], settings: Settings) -> str:
    """Turn batching on in *config*; the words for the server's label."""
    config["TORCHPOOL_MAX_BATCH_SIZE"] = settings.batch_size
    config["TORCHPOOL_MAX_BATCH_DELAY_MS"] = settings.batch_delay_ms
    return f", batch {settings.batch_size}/{settings.batch_delay_ms:g} ms"


def _bench_server(server: Server, workload: Workload, settings: Settings, script: Path,
                  expected: list[float], tmp: Path) -> Outcome:
    outcome = Outcome(server.name, server.label)
    log_path = tmp / f"{workload.name}-{server.name}.log"
    port = _free_port()
    argv = [a.replace("{port}", str(port)) for a in server.argv]
    print(f"  {server.name:<17} ", end="", flush=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=server.env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, port, server.health, log_path)
        outcome.start_s = time.monotonic() - t0
        status, body = _request(port, "POST", "/predict", workload.body(), timeout=120)
        if status != 200:
            raise RuntimeError(f"POST /predict answered {status}: {body[:300]!r}")
        outcome.answer = json.loads(body)["head"]
        if not all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-3) for a, b in zip(outcome.answer, expected)):
            raise RuntimeError(f"wrong answer {outcome.answer}, expected {expected}")
        if settings.warmup:
            _wrk(port, script, settings.saturating, settings.warmup)
        for c in settings.concurrency:
            _drain(port, workload)
            # Read outside the CPU window: the status request is not one of the window's requests.
            pool_before = _pool_batches(port, server.status)
            with _sampling_tree(proc.pid) as tree, _light_client(port, c == settings.saturating) as light:
                stats = _wrk(port, script, c, settings.duration)
                tree.finish()  # closes the CPU window before the light client and the sampler stop
            pool_after = _pool_batches(port, server.status)
            seconds = stats["duration_us"] / 1e6
            good = stats["requests"] - stats["status"]
            if not stats["requests"]:  # wrk reports 0 for the percentiles of nothing
                for key in ("p50_us", "p90_us", "p99_us", "max_us"):
                    stats[key] = math.nan
            cpu = tree.cpu
            answered = stats["requests"]
            cell = Cell(
                concurrency=c, requests=stats["requests"], seconds=seconds, rps=good / seconds,
                p50_ms=stats["p50_us"] / 1e3, p90_ms=stats["p90_us"] / 1e3, p99_ms=stats["p99_us"] / 1e3,
                max_ms=stats["max_us"] / 1e3, non2xx=stats["status"],
                socket_errors=stats["connect"] + stats["read"] + stats["write"] + stats["timeout"],
                pss_mib=tree.peak / MIB, processes=tree.processes,
                cpu_s=cpu.seconds if cpu else None,
                cpu_ms_per_request=cpu.seconds * 1e3 / answered if cpu and answered else None,
                cpu_processes=cpu.processes if cpu else 0, cpu_unreaped=cpu.unreaped if cpu else 0)
            _add_batches(cell, pool_before, pool_after, settings.workers)
            outcome.cells[c] = cell
            if light.result is not None:
                outcome.light = light.result
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode} during the run")
        print("  ".join(_cell_text(c, cell) for c, cell in outcome.cells.items())
              + (f"  /ping p99 {outcome.light.p99_ms:.1f} ms" if outcome.light else ""), flush=True)
    except Exception as exc:  # a peer that cannot run here is a result ("n/a" and why), not a crash
        outcome.error = f"{type(exc).__name__}: {exc}"
        tail = log_path.read_text(errors="replace").strip().splitlines()[-6:] if log_path.exists() else []
        if tail:
            outcome.error += " | server output: " + " / ".join(line.strip() for line in tail)
        print(f"n/a: {outcome.error[:400]}", flush=True)
    finally:
        outcome.leftovers = _stop(proc, server.stop_signal)
    return outcome


def _cell_text(c: int, cell: Cell) -> str:
    """One cell on the progress line."""
    text = f"c={c}: {cell.rps:,.1f} req/s p50 {cell.p50_ms:.2f} p99 {cell.p99_ms:.1f} ms"
    if cell.non2xx + cell.socket_errors:
        text += f" ERR {cell.non2xx + cell.socket_errors}"
    if cell.cpu_ms_per_request is not None:
        text += f" CPU {cell.cpu_ms_per_request:.2f} ms/req"
    if cell.batch_rows_mean is not None:
        text += f" batch {cell.batch_rows_mean:.1f} rows/{cell.batch_calls_mean:.1f} calls"
    elif cell.pool_error:
        text += f" (batch sizes: {cell.pool_error[:80]})"
    if cell.workers_busy is not None:
        text += f" workers busy {cell.workers_busy:.0%}"
    return text + f" PSS {cell.pss_mib:,.0f} MiB"


@dataclass(frozen=True)
class _Batches:
    """The batch histograms of a flask_torchpool server's status at one moment (sums and counts)."""

    rows_sum: float
    calls_sum: float
    count: int
    busy_s: float | None   # worker_busy_seconds
    at: float              # time.monotonic() of the read


def _pool_batches(port: int, path: str | None) -> _Batches | str | None:
    """What ``GET <path>`` (flask_torchpool's status) says of the batches run so far; None for a server
    without one, the reason when it could not be read."""
    if path is None:
        return None
    try:
        status, body = _request(port, "GET", path, timeout=30)
        if status != 200:
            return f"GET {path} answered {status}"
        metrics = json.loads(body)["metrics"]
        rows, calls, busy = metrics["batch_rows"], metrics["batch_calls"], metrics.get("worker_busy_seconds")
        return _Batches(float(rows["sum"]), float(calls["sum"]), int(rows["count"]),
                        None if busy is None else float(busy), time.monotonic())
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError) as exc:
        return f"GET {path}: {type(exc).__name__}: {exc}"


def _add_batches(cell: Cell, before: _Batches | str | None, after: _Batches | str | None,
                 workers: int) -> None:
    """Fill in the cell's batch sizes from the status before and after its window (Note [batch size]),
    and how busy its *workers* were."""
    if before is None or after is None:
        return
    if isinstance(before, str) or isinstance(after, str):
        cell.pool_error = before if isinstance(before, str) else str(after)
        return
    cell.batches = after.count - before.count
    if before.busy_s is not None and after.busy_s is not None and after.at > before.at:
        cell.workers_busy = (after.busy_s - before.busy_s) / ((after.at - before.at) * workers)
    if cell.batches > 0:
        cell.batch_rows_mean = (after.rows_sum - before.rows_sum) / cell.batches
        cell.batch_calls_mean = (after.calls_sum - before.calls_sum) / cell.batches


def _drain(port: int, workload: Workload) -> None:
    """Wait until the requests wrk left behind are done: a server that queues them (LitServe with
    16 MiB bodies) would otherwise still be busy with them in the next cell. One request goes to the
    back of that queue; its answer means the queue ahead of it is empty."""
    status, body = _request(port, "POST", "/predict", workload.body(), timeout=300)
    if status != 200:
        raise RuntimeError(f"POST /predict answered {status} after a cell: {body[:300]!r}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: bytes | None = None,
             timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _wait_ready(proc: subprocess.Popen[bytes], port: int, path: str, log_path: Path) -> None:
    end = time.monotonic() + START_DEADLINE
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before answering {path}")
        try:
            status, _ = _request(port, "GET", path, timeout=5)
            if status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"the server did not answer {path} within {START_DEADLINE:g} s")
        time.sleep(0.2)  # polling a port that nothing listens on yet; bounded by the deadline above


def _stop(proc: subprocess.Popen[bytes], stop_signal: signal.Signals) -> list[str]:
    """SIGTERM the server (as an orchestrator stops a container's main process; SIGINT for LitServe),
    SIGKILL its whole process group after the grace period and anything else of its session; return the
    processes of its session that were still there after the grace (then killed).

    Not SIGTERM to the whole group: flask_torchpool's workers die of it at once, alongside the web
    process, and the web process then waits TORCHPOOL_DRAIN_TIMEOUT for calls that no worker will run
    (see the report of the benchmark run)."""
    session = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(session, stop_signal)
    end = time.monotonic() + STOP_GRACE
    while _session_members(session) and time.monotonic() < end:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.1)
    stragglers = [f"{pid} {_describe(pid)}" for pid in _session_members(session)]
    _kill_session(session)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    return stragglers


def _describe(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "(gone)"
    return f"[{state}] {cmdline[:80].strip()}"


def _kill_session(session: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(session, signal.SIGKILL)
    for pid in _session_members(session):  # a process that left the group but not the session
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class _Proc:
    """What ``/proc/PID/stat`` says of one process (times in clock ticks)."""

    pid: int
    ppid: int
    session: int
    zombie: bool
    started: int  # clock ticks after boot: with the pid, names the process (pids are reused)
    own: int  # utime + stime: every thread of the process, ended ones too
    reaped: int  # cutime + cstime: its children that it waited for, and theirs

    @property
    def key(self) -> tuple[int, int]:
        return self.pid, self.started

    @property
    def total(self) -> int:
        return self.own + self.reaped


def _proc_table() -> dict[int, _Proc]:
    """Every process of the machine, zombies included."""
    table = {}
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rsplit(")", 1)[1].split()
            pid = int(stat_path.parent.name)
            # fields[i] is stat field i + 3 (proc(5)): state, ppid, pgrp, session, ..., utime (14),
            # stime, cutime, cstime (17), ..., starttime (22)
            table[pid] = _Proc(pid, int(fields[1]), int(fields[3]), fields[0] == "Z", int(fields[19]),
                               int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14]))
        except (OSError, IndexError, ValueError):
            continue  # ended while we read
    return table


def _tree(session: int, table: dict[int, _Proc], zombies: bool = False) -> list[_Proc]:
    """The processes of *session* and their descendants in sessions of their own (flask_torchpool's
    pool server in TORCHPOOL_MODE "auto", which a web worker starts in a new session), zombies only
    when asked for."""
    members = {pid for pid, p in table.items() if p.session == session}
    added = True
    while added:
        new = {pid for pid, p in table.items() if p.ppid in members and pid not in members}
        members |= new
        added = bool(new)
    return [table[pid] for pid in sorted(members) if zombies or not table[pid].zombie]


def _session_members(session: int) -> list[int]:
    """Live (non-zombie) processes of *session*: the server, everything it forked or spawned, and
    their descendants in sessions of their own."""
    return [p.pid for p in _tree(session, _proc_table())]


def _shm_entries() -> set[str]:
    with contextlib.suppress(OSError):
        return set(os.listdir("/dev/shm"))
    return set()


# -- load: wrk, the light client, PSS --------------------------------------------------------------


_WRK_LUA = r"""
local f = assert(io.open("%(body)s", "rb"))
wrk.method = "POST"
wrk.path = "/predict"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH_JSON {\"requests\": %%.0f, \"duration_us\": %%.0f, \"connect\": %%.0f, " ..
    "\"read\": %%.0f, \"write\": %%.0f, \"status\": %%.0f, \"timeout\": %%.0f, \"p50_us\": %%.0f, " ..
    "\"p90_us\": %%.0f, \"p99_us\": %%.0f, \"max_us\": %%.0f}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _wrk_script(tmp: Path, body: Path) -> Path:
    path = tmp / f"{body.stem}.lua"
    path.write_text(_WRK_LUA % {"body": str(body)})
    return path


def _wrk(port: int, script: Path, connections: int, seconds: int) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", WRK_TIMEOUT, "--latency",
            "-s", str(script), f"http://127.0.0.1:{port}/predict"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise RuntimeError(f"wrk printed no summary (exit {out.returncode}): {out.stdout[-500:]} "
                       f"{out.stderr[-500:]}")


class _LightClient(threading.Thread):
    """Sequential GET /ping on one keep-alive connection (reopened when the server closes it), one
    every LIGHT_INTERVAL seconds, timed from request to last byte."""

    def __init__(self, port: int) -> None:
        super().__init__(name="light-client", daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors = 0
        self.result: Light | None = None

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        self.stop.wait(1.0)  # let wrk saturate the model route first
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                conn.request("GET", LIGHT_PATH)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
            elapsed = time.perf_counter() - start
            if ok:
                self.latencies.append(elapsed)
            else:
                self.errors += 1
            self.stop.wait(max(0.0, LIGHT_INTERVAL - elapsed))
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        self.join(40)
        lat = sorted(self.latencies)
        if lat:
            self.result = Light(len(lat), _percentile(lat, 50) * 1e3, _percentile(lat, 99) * 1e3,
                                lat[-1] * 1e3, self.errors)
        else:
            self.result = Light(0, math.nan, math.nan, math.nan, self.errors)


class _NoLight:
    result: Light | None = None


@contextlib.contextmanager
def _light_client(port: int, enabled: bool) -> Iterator[_LightClient | _NoLight]:
    if not enabled:
        yield _NoLight()
        return
    client = _LightClient(port)
    client.start()
    try:
        yield client
    finally:
        client.finish()


@dataclass(frozen=True)
class _Cpu:
    """The CPU of a server's process tree over one window (Note [CPU per request])."""

    seconds: float
    processes: int  # seen during the window
    unreaped: int  # ended without a process of the tree waiting for them: counted to their last sample


class _CpuWindow:
    """CPU time of a process tree between :meth:`__init__` and :meth:`finish`, with :meth:`sample` in
    between (Note [CPU per request])."""

    def __init__(self, session: int) -> None:
        self.session = session
        self.first = self._snapshot()
        self.last_seen = dict(self.first)  # every process of the window, at its latest sample

    def _snapshot(self) -> dict[tuple[int, int], _Proc]:
        return {p.key: p for p in _tree(self.session, _proc_table(), zombies=True)}

    def sample(self, tree: list[_Proc]) -> None:
        """Note the processes of *tree* (the session's, zombies included, just read)."""
        self.last_seen.update((p.key, p) for p in tree)

    def finish(self) -> _Cpu:
        last = self._snapshot()
        self.last_seen.update(last)
        alive_at_end = {p.pid for p in last.values()}
        ended = {key: p for key, p in self.last_seen.items() if key not in last}

        def waited_for(p: _Proc) -> bool:
            # Its CPU reached a process still in the tree at the end, through cutime/cstime: its parent
            # waited for it (a parent that ended too hands it on to its own parent, and so on).
            seen: set[int] = set()
            while p.ppid not in alive_at_end:
                parent = next((q for q in ended.values() if q.pid == p.ppid), None)
                if parent is None or parent.pid in seen:
                    return False
                seen.add(parent.pid)
                p = parent
            return True

        ticks = unreaped = 0
        for key, p in last.items():
            ticks += p.total - (self.first[key].total if key in self.first else 0)
        for key, p in ended.items():
            before = self.first[key].total if key in self.first else 0
            if waited_for(p):
                ticks -= before  # its parent's cutime/cstime grew by all of it, the part before too
            else:
                ticks += p.total - before
                unreaped += 1
        return _Cpu(ticks / CLK_TCK, len(self.last_seen), unreaped)


class _TreeSampler(threading.Thread):
    """Samples a server's process tree twice a second: the peak of its total PSS and, from the moment
    it is created to :meth:`finish`, its CPU (:class:`_CpuWindow`)."""

    def __init__(self, session: int) -> None:
        super().__init__(name="tree-sampler", daemon=True)
        self.session = session
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.peak = 0
        self.processes = 0
        self.window: _CpuWindow | None = _CpuWindow(session)
        self.cpu: _Cpu | None = None

    def run(self) -> None:
        while True:
            tree = _tree(self.session, _proc_table(), zombies=True)
            total, count = _tree_pss([p.pid for p in tree if not p.zombie])
            if total > self.peak:
                self.peak, self.processes = total, count
            with self.lock:
                if self.window is not None:
                    self.window.sample(tree)
            if self.stop.wait(SAMPLE_INTERVAL):
                return

    def finish(self) -> None:
        """Close the CPU window (PSS is sampled on until the sampler stops)."""
        with self.lock:
            if self.window is not None:
                self.cpu = self.window.finish()
                self.window = None


@contextlib.contextmanager
def _sampling_tree(session: int) -> Iterator[_TreeSampler]:
    sampler = _TreeSampler(session)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.finish()
        sampler.stop.set()
        sampler.join()


def _tree_pss(pids: Sequence[int]) -> tuple[int, int]:
    """Sum of Pss (bytes) over the processes *pids*, and how many of them there still are."""
    total = count = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    count += 1
                    break
        except (OSError, ValueError):
            continue  # exited meanwhile
    return total, count


def _percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


# -- the report ------------------------------------------------------------------------------------


@dataclass
class Verdict:
    target: str
    passed: bool | None  # None: not measured, or information only
    detail: str
    info: bool = False  # a figure next to a target, not a target

    @property
    def mark(self) -> str:
        if self.info:
            return "info"
        return "n/a" if self.passed is None else ("PASS" if self.passed else "MISS")


def _load_run(path: Path) -> Run:
    data = json.loads(path.read_text())
    run = Run(**{k: v for k, v in data.items() if k not in ("raw", "results")})
    run.raw = {w: [Raw(**r) for r in rs] for w, rs in data["raw"].items()}
    for w, outcomes in data["results"].items():
        run.results[w] = []
        for o in outcomes:
            cells = {int(c): Cell(**cell) for c, cell in o.pop("cells").items()}
            light = o.pop("light")
            run.results[w].append(Outcome(**o, cells=cells, light=Light(**light) if light else None))
    return run


def _outcome(run: Run, workload: str, server: str) -> Outcome | None:
    for o in run.results.get(workload, []):
        if o.server == server:
            return o
    return None


def _rps(run: Run, workload: str, server: str, c: int) -> float | None:
    o = _outcome(run, workload, server)
    cell = o.cell(c) if o is not None and o.error is None else None
    return cell.rps if cell is not None else None


def _best_peer(run: Run, workload: str, c: int) -> tuple[str, float] | None:
    rates = [(s, _rps(run, workload, s, c)) for s in PEERS]
    rates = [(s, r) for s, r in rates if r is not None]
    return max(rates, key=lambda sr: sr[1]) if rates else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _rows(run: Run, workload: str) -> tuple[list[str], list[list[str]]]:
    conc = run.settings["concurrency"]
    sat = max(conc)
    header = ["server", "c", "req/s", "vs best peer", "vs gunicorn", "p50 ms", "p99 ms", "errors",
              "CPU ms/req", "batch rows / calls", "PSS MiB", f"{LIGHT_PATH} p50/p99 ms at c={sat}"]
    rows = []
    for o in run.results[workload]:
        if o.error is not None:
            rows.append([o.server, "-", "n/a", "-", "-", "-", "-", "-", "-", "-", "-", o.error[:90]])
            continue
        for c in conc:
            cell = o.cell(c)
            if cell is None:
                continue
            best = _best_peer(run, workload, c)
            gun = _rps(run, workload, "gunicorn", c)
            light = ""
            if o.light and c == sat:
                light = f"{_fmt(o.light.p50_ms)} / {_fmt(o.light.p99_ms)}"
                light += f" ({o.light.errors} err)" if o.light.errors else ""
            rows.append([o.server, str(c), _fmt(cell.rps), _ratio(cell.rps, best[1] if best else None),
                         _ratio(cell.rps, gun), _fmt(cell.p50_ms, 2), _fmt(cell.p99_ms, 1),
                         str(cell.non2xx + cell.socket_errors), _cpu_text(cell), _batch_text(o, cell),
                         _fmt(cell.pss_mib, 0), light])
    return header, rows


def _cpu_text(cell: Cell) -> str:
    text = _fmt(cell.cpu_ms_per_request, 2)
    if cell.cpu_unreaped:
        text += f" (>=, {cell.cpu_unreaped} unreaped)"
    return text


def _batch_text(o: Outcome, cell: Cell) -> str:
    """Mean rows / calls per batch; "-" for the peers, "no batching" for flask_torchpool without it."""
    if cell.batch_rows_mean is not None and cell.batch_calls_mean is not None:
        return f"{cell.batch_rows_mean:.2f} / {cell.batch_calls_mean:.2f}"
    if cell.pool_error:
        return "status unread"
    if o.server in TORCHPOOL_SERVERS and cell.batches == 0:
        return "1 (no batching)" if "batch" not in o.server and "copies" not in o.server else "0 batches"
    return "-"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _raw_text(run: Run, workload: str) -> str:
    n = run.settings["workers"]
    return "; ".join(f"{n} processes x batch {r.batch}: {r.samples_per_s:,.1f} samples/s (median call "
                     f"{r.median_call_ms:.2f} ms)" for r in run.raw.get(workload, []))


def _cell(run: Run, workload: str, server: str, c: int) -> Cell | None:
    o = _outcome(run, workload, server)
    return o.cell(c) if o is not None and o.error is None else None


def _best_of(run: Run, workload: str, servers: Sequence[str], c: int) -> tuple[str, Cell] | None:
    """The server of *servers* with the most req/s at *c*, and its cell."""
    cells = [(s, _cell(run, workload, s, c)) for s in servers]
    found = [(s, cell) for s, cell in cells if cell is not None]
    return max(found, key=lambda sc: sc[1].rps) if found else None


def _reference_c(run: Run) -> int:
    """The concurrency the performance issue quotes (8), or the highest one measured."""
    conc = run.settings["concurrency"]
    return 8 if 8 in conc else max(conc)


def _fast_path_concurrencies(run: Run) -> list[int]:
    """The concurrencies of the performance issue's table: every one but 1 (unless it is the only one)."""
    conc = list(run.settings["concurrency"])
    return [c for c in conc if c > 1] or conc


def _fast_path_rows(run: Run, c: int) -> tuple[list[str], list[list[str]]]:
    """The performance issue's table (issue 12) at concurrency *c*, from this run."""
    header = ["workload", "gunicorn -w N sync req/s", "best flask_torchpool req/s", "ratio",
              "CPU ms/req: torchpool vs gunicorn", "mean batch rows / calls"]
    rows = []

    def row(title: str, workload: str, servers: Sequence[str]) -> None:
        gun = _cell(run, workload, "gunicorn", c)
        best = _best_of(run, workload, servers, c)
        if best is None and (gun is None or title != workload):  # a variant row needs its servers
            return
        ours = f"{best[1].rps:,.1f} ({best[0]})" if best else "-"
        cpu = (f"{_fmt(best[1].cpu_ms_per_request if best else None, 2)} vs "
               f"{_fmt(gun.cpu_ms_per_request if gun else None, 2)}")
        best_outcome = _outcome(run, workload, best[0]) if best else None
        batch = _batch_text(best_outcome, best[1]) if best and best_outcome else "-"
        rows.append([title, _fmt(gun.rps) if gun else "-", ours,
                     _ratio(best[1].rps if best else None, gun.rps if gun else None), cpu, batch])

    for workload in run.results:
        row(workload, workload, TORCHPOOL_SERVERS)
        if workload == "tiny":
            row("tiny, sync web workers (attach)", workload, ("attach", "attach-batch"))
        if workload == "payload-16m":
            row("payload-16m, embedded", workload, EMBEDDED_THREADED)
    sat = max(run.settings["concurrency"])
    if c != sat:  # PSS peaks and the light route are measured at the saturating concurrency
        return header, rows
    if "wide-mlp" in run.results:
        gun = _cell(run, "wide-mlp", "gunicorn", sat)
        emb = _cell(run, "wide-mlp", "torchpool-batch", sat)
        att = _cell(run, "wide-mlp", "attach-batch", sat)
        if gun is not None:
            emb_pss, att_pss = emb.pss_mib if emb else None, att.pss_mib if att else None
            ours = f"{_fmt(emb_pss, 0)} embedded, {_fmt(att_pss, 0)} attach"
            ratios = f"{_ratio(emb_pss, gun.pss_mib)} / {_ratio(att_pss, gun.pss_mib)}"
            rows.append([f"peak PSS MiB, wide-mlp (c={sat})", _fmt(gun.pss_mib, 0), ours, ratios, "", ""])
    for workload in run.results:
        measured = {o.server: o.light.p99_ms for o in run.results[workload]
                    if o.error is None and o.light and o.light.samples}
        threaded = _p99s(measured, (*EMBEDDED_THREADED, "attach-gthread-batch"))
        sync = _p99s(measured, ("attach", "attach-batch"))
        if threaded == sync == "-":
            continue
        rows.append([f"{LIGHT_PATH} p99 ms while saturated (c={sat}), {workload}",
                     f"plain Flask {_fmt(measured.get('flask'))}", f"threaded: {threaded}; sync: {sync}",
                     "", "", ""])
    return header, rows


def _p99s(measured: dict[str, float], servers: Sequence[str]) -> str:
    return ", ".join(f"{measured[s]:.1f} ({s})" for s in servers if s in measured) or "-"


def _fast_path_verdicts(run: Run) -> list[Verdict]:
    """The targets of the performance issue (issue 12) that this benchmark measures."""
    conc = run.settings["concurrency"]
    sat, ref = max(conc), _reference_c(run)
    out: list[Verdict] = []
    batching = ("torchpool-batch", "torchpool-copies", "torchpool-batch-numpy", "attach-batch",
                "attach-gthread-batch", "attach-gthread-batch-numpy")

    # pool-path CPU per call: attach (sync web workers) less gunicorn -w N sync, same HTTP stack, same model
    att, gun = _cell(run, "tiny", "attach", ref), _cell(run, "tiny", "gunicorn", ref)
    name = "tiny: pool-path CPU per call <= 0.3 ms (CPU ms/req of attach less gunicorn's)"
    if att and gun and att.cpu_ms_per_request is not None and gun.cpu_ms_per_request is not None:
        extra = att.cpu_ms_per_request - gun.cpu_ms_per_request
        out.append(Verdict(name, extra <= 0.3,
                           f"{att.cpu_ms_per_request:.2f} - {gun.cpu_ms_per_request:.2f} = {extra:+.2f} ms "
                           f"(c={ref}; without HTTP: benchmarks/transport.py)"))
    else:
        out.append(Verdict(name, None, "not measured"))

    def ratio_target(workload: str, servers: Sequence[str], need: float, c: int, what: str) -> None:
        name = f"{workload}: {what} >= {need:g}x gunicorn -w N sync (c={c})"
        if c not in conc:
            out.append(Verdict(name, None, f"not measured (add {c} to --concurrency)"))
            return
        best, gun = _best_of(run, workload, servers, c), _cell(run, workload, "gunicorn", c)
        if best is None or gun is None or not gun.rps:
            out.append(Verdict(name, None, "not measured"))
            return
        r = best[1].rps / gun.rps
        detail = f"{best[0]} {best[1].rps:,.1f} vs gunicorn {gun.rps:,.1f} req/s = {r:.2f}x"
        if best[1].batch_rows_mean is not None:
            detail += (f"; mean batch {best[1].batch_rows_mean:.2f} rows / "
                       f"{best[1].batch_calls_mean:.2f} calls")
        detail += f"; CPU {_fmt(best[1].cpu_ms_per_request, 2)} vs {_fmt(gun.cpu_ms_per_request, 2)} ms/req"
        out.append(Verdict(name, r >= need, detail))

    ratio_target("tiny", ("attach", "attach-numpy"), 0.8, ref, "attach with sync web workers")
    ratio_target("payload-16m", ("attach", "attach-batch", "attach-numpy"), 0.9, ref, "attach")
    emb = _best_of(run, "payload-16m", EMBEDDED_THREADED, ref)
    if emb is not None:
        out.append(Verdict("payload-16m: embedded at least 2x what it was", None,
                           f"{emb[0]} {emb[1].rps:,.1f} req/s (c={ref}); the issue measured 27: compare "
                           "runs on one machine", info=True))
    ratio_target("wide-mlp", batching, 2.0, 8, "batching")
    ratio_target("wide-mlp", batching, 3.0, 16, "batching")
    ratio_target("conv", TORCHPOOL_SERVERS, 1.0, ref, "best flask_torchpool")

    # light route while saturated: <= 10 ms and <= 1/3 plain Flask's, every threaded flask_torchpool server
    for workload in run.results:
        flask = _outcome(run, workload, "flask")
        flask_p99 = flask.light.p99_ms if flask and flask.light and flask.light.samples else None
        for server in (*EMBEDDED_THREADED, "attach-gthread-batch", "attach-gthread-batch-numpy"):
            o = _outcome(run, workload, server)
            if o is None:
                continue
            name = f"{workload}: {LIGHT_PATH} p99 <= 10 ms and <= 1/3 plain Flask ({server}, c={sat})"
            if o.light is None or not o.light.samples:
                out.append(Verdict(name, None, o.error[:120] if o.error else "not measured"))
                continue
            p99 = o.light.p99_ms
            ok: bool | None = False if p99 > 10.0 else (p99 <= flask_p99 / 3 if flask_p99 else None)
            ratio = f" = {p99 / flask_p99:.2f}x" if flask_p99 else " (plain Flask not measured)"
            out.append(Verdict(name, ok, f"{p99:.1f} ms vs plain Flask {_fmt(flask_p99)} ms{ratio}"))

    # peak PSS on the wide MLP: the leanest embedded and attach servers (the numpy app's web processes, and
    # its pool, import no torch)
    attach = ("attach-batch", "attach", "attach-gthread-batch", "attach-numpy", "attach-gthread-batch-numpy")
    gun = _cell(run, "wide-mlp", "gunicorn", sat)
    embedded = ("torchpool-batch", "torchpool-batch-numpy")
    for what, servers, need in (("embedded", embedded, 0.6), ("attach", attach, 0.8)):
        cells = [(s, c) for s in servers if (c := _cell(run, "wide-mlp", s, sat)) and c.pss_mib]
        name = f"wide-mlp: peak PSS of {what} <= {need:g}x gunicorn -w N sync"
        if cells and gun and gun.pss_mib:
            server, ours = min(cells, key=lambda sc: sc[1].pss_mib)
            r = ours.pss_mib / gun.pss_mib
            out.append(Verdict(name, r <= need, f"{server} {ours.pss_mib:,.0f} vs {gun.pss_mib:,.0f} MiB = "
                                                f"{r:.2f}x"))
        else:
            out.append(Verdict(name, None, "not measured"))
    out.append(Verdict("a respawned worker serves again within 0.3 s", None,
                       "not measured here: see benchmarks/chaos.py"))
    return out


def _verdicts(run: Run) -> list[Verdict]:
    """The targets of the earlier performance issues (batching, shared weights, one pool per host)."""
    sat = max(run.settings["concurrency"])
    low = min(run.settings["concurrency"])
    out: list[Verdict] = []

    def best_torchpool(workload: str) -> tuple[str, float] | None:
        rates = [(s, _rps(run, workload, s, sat)) for s in ("torchpool", "torchpool-batch")]
        rates = [(s, r) for s, r in rates if r is not None]
        return max(rates, key=lambda sr: sr[1]) if rates else None

    # compute-bound: >= 0.95x the best peer
    ours, best = best_torchpool("conv"), _best_peer(run, "conv", sat)
    if ours and best:
        r = ours[1] / best[1]
        out.append(Verdict("conv: req/s >= 0.95x best peer", r >= 0.95,
                           f"{ours[0]} {ours[1]:,.1f} req/s vs {best[0]} {best[1]:,.1f} = {r:.2f}x "
                           f"(c={sat})"))
    else:
        out.append(Verdict("conv: req/s >= 0.95x best peer", None, "not measured"))

    # wide MLP with batching: >= 3x best peer; PSS <= 0.6x gunicorn
    ours_rps, best = _rps(run, "wide-mlp", "torchpool-batch", sat), _best_peer(run, "wide-mlp", sat)
    if ours_rps is not None and best:
        r = ours_rps / best[1]
        out.append(Verdict("wide-mlp: batching req/s >= 3x best peer", r >= 3.0,
                           f"torchpool-batch {ours_rps:,.1f} req/s vs {best[0]} {best[1]:,.1f} = {r:.2f}x"))
        lb = _rps(run, "wide-mlp", "litserve-batch", sat)
        if lb is not None:
            out.append(Verdict("wide-mlp: against LitServe with its own batching", None,
                               f"torchpool-batch {ours_rps:,.1f} vs litserve-batch {lb:,.1f} = "
                               f"{ours_rps / lb:.2f}x", info=True))
    else:
        out.append(Verdict("wide-mlp: batching req/s >= 3x best peer", None, "not measured"))
    ours_o, gun_o = _outcome(run, "wide-mlp", "torchpool-batch"), _outcome(run, "wide-mlp", "gunicorn")
    if ours_o and gun_o and ours_o.cell(sat) and gun_o.cell(sat):
        a, b = ours_o.cells[sat].pss_mib, gun_o.cells[sat].pss_mib
        out.append(Verdict("wide-mlp: total PSS <= 0.6x gunicorn", a <= 0.6 * b,
                           f"torchpool-batch {a:,.0f} MiB vs gunicorn {b:,.0f} MiB = {a / b:.2f}x"))
        copies = _outcome(run, "wide-mlp", "torchpool-copies")
        if copies and copies.cell(sat):
            cp = copies.cells[sat].pss_mib
            out.append(Verdict("wide-mlp: PSS with TORCHPOOL_SHARE_WEIGHTS=False", None,
                               f"torchpool-copies {cp:,.0f} MiB = {cp / b:.2f}x gunicorn", info=True))
    else:
        out.append(Verdict("wide-mlp: total PSS <= 0.6x gunicorn", None, "not measured"))

    # one pool per host: gunicorn -w N sync attached vs gunicorn -w N sync in-process
    for workload, server, need in (("tiny", "attach", 1.0), ("wide-mlp", "attach-batch", 3.0)):
        name = f"{workload}: {server} req/s >= {need:g}x gunicorn (-w N sync, in-process)"
        ours_rps, gun = _rps(run, workload, server, sat), _rps(run, workload, "gunicorn", sat)
        if ours_rps is not None and gun:
            out.append(Verdict(name, ours_rps >= need * gun,
                               f"{server} {ours_rps:,.1f} vs gunicorn {gun:,.1f} = {ours_rps / gun:.2f}x"))
        else:
            out.append(Verdict(name, None, "not measured"))
    gthread = _rps(run, "wide-mlp", "attach-gthread-batch", sat)
    gun = _rps(run, "wide-mlp", "gunicorn", sat)
    if gthread is not None and gun:
        out.append(Verdict("wide-mlp: attach-gthread-batch (gthread web workers)", None,
                           f"{gthread:,.1f} vs gunicorn {gun:,.1f} = {gthread / gun:.2f}x", info=True))
    att, gun_o = _outcome(run, "wide-mlp", "attach-batch"), _outcome(run, "wide-mlp", "gunicorn")
    if att and gun_o and att.cell(sat) and gun_o.cell(sat):
        a, b = att.cells[sat].pss_mib, gun_o.cells[sat].pss_mib
        out.append(Verdict("wide-mlp: attach-batch total PSS (one copy of the weights)", None,
                           f"{a:,.0f} MiB vs gunicorn {b:,.0f} MiB = {a / b:.2f}x", info=True))

    # 16 MiB payloads: >= 0.8x gunicorn and >= 3x LitServe
    ours = best_torchpool("payload-16m")
    for peer, need in (("gunicorn", 0.8), ("litserve", 3.0)):
        theirs = _rps(run, "payload-16m", peer, sat)
        name = f"payload-16m: req/s >= {need:g}x {peer}"
        if ours and theirs == 0.0:
            out.append(Verdict(name, True, f"{ours[0]} {ours[1]:,.1f} vs {peer} 0 (no request answered "
                                           f"within wrk's {WRK_TIMEOUT} timeout)"))
        elif ours and theirs:
            r = ours[1] / theirs
            out.append(Verdict(name, r >= need,
                               f"{ours[0]} {ours[1]:,.1f} vs {peer} {theirs:,.1f} = {r:.2f}x"))
        else:
            o = _outcome(run, "payload-16m", peer)
            why = o.error[:120] if o is not None and o.error else "not measured"
            out.append(Verdict(name, None, why))

    # light route while saturated: p99 <= 20 ms and <= 1/3 plain Flask's
    for workload in run.results:
        flask = _outcome(run, workload, "flask")
        flask_p99 = flask.light.p99_ms if flask and flask.light and flask.light.samples else None
        for server in ("torchpool", "torchpool-batch"):
            o = _outcome(run, workload, server)
            if o is None:
                continue
            name = f"{workload}: {LIGHT_PATH} p99 <= 20 ms and <= 1/3 plain Flask ({server})"
            if o.light is None or not o.light.samples:
                out.append(Verdict(name, None, o.error[:120] if o.error else "not measured"))
                continue
            p99 = o.light.p99_ms
            ok = p99 <= 20.0 and (flask_p99 is None or p99 <= flask_p99 / 3)
            ratio = f" = {p99 / flask_p99:.2f}x" if flask_p99 else " (plain Flask not measured)"
            out.append(Verdict(name, ok, f"{p99:.1f} ms vs plain Flask {_fmt(flask_p99)} ms{ratio}"))

    # concurrency 1: p50 within 0.3 ms of the model in-process (plain Flask, same HTTP, same request)
    for workload in run.results:
        ours_o, flask = _outcome(run, workload, "torchpool"), _outcome(run, workload, "flask")
        name = f"{workload}: c=1 p50 within 0.3 ms of the model in-process"
        if low != 1:
            out.append(Verdict(name, None, "not measured (add 1 to --concurrency)"))
        elif ours_o and flask and ours_o.cell(low) and flask.cell(low):
            a, b = ours_o.cells[low].p50_ms, flask.cells[low].p50_ms
            raw = run.raw.get(workload)
            call = f"; the model call alone: {raw[0].median_call_ms:.2f} ms" if raw else ""
            out.append(Verdict(name, a - b <= 0.3,
                               f"torchpool {a:.2f} ms - plain Flask {b:.2f} ms = {a - b:+.2f} ms{call}"))
        else:
            out.append(Verdict(name, None, "not measured"))
    return out


def _report(run: Run) -> None:
    print("\n" + "=" * 100)
    print(f"command: {run.command}")
    print(f"started {run.started}; wall time {run.wall_s / 60:.1f} min; load average "
          + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in run.load_avg.items()))
    for note in run.notes:
        print(f"note: {note}")
    for workload, outcomes in run.results.items():
        print(f"\n## {workload}: {WORKLOADS[workload].description if workload in WORKLOADS else ''}")
        print(f"raw limit (no HTTP): {_raw_text(run, workload)}")
        header, rows = _rows(run, workload)
        print("\n".join(_table(header, rows)))
        answers = {o.server: o.answer for o in outcomes if o.answer is not None}
        print(f"answers checked against the model run here: {len(answers)} of {len(outcomes)} servers agree")
    print("\n## servers")
    seen: dict[str, str] = {}
    for outcomes in run.results.values():
        for o in outcomes:
            seen.setdefault(o.server, o.label)
    for name, label in seen.items():
        print(f"  {name:<17} {label}")
    for c in _fast_path_concurrencies(run):
        header, rows = _fast_path_rows(run, c)
        if rows:
            print(f"\n## the performance issue's table (issue 12), c={c}")
            print("\n".join(_table(header, rows)))
    print("\n## targets of the performance issue (issue 12)")
    for v in _fast_path_verdicts(run):
        print(f"  {v.mark:<4}  {v.target}: {v.detail}")
    print("\n## targets of the earlier issues (4 and 6)")
    for v in _verdicts(run):
        print(f"  {v.mark:<4}  {v.target}: {v.detail}")
    print("\nCPU ms/req: CPU time (utime + stime) of every process of the server's tree during the cell, "
          "over the requests answered (processes that ended during it through their parents' cutime/cstime; "
          '">=": some ended unwaited for, counted to their last sample). batch rows / calls: means over the '
          "batches flask_torchpool ran during the cell, from its status metrics.")
    print(f"\nprocesses still there {STOP_GRACE:g} s after the stop signal (then SIGKILLed): "
          f"{'; '.join(run.leftovers) or 'none'}")


# -- the docs --------------------------------------------------------------------------------------


def _write_docs(run: Run) -> None:
    DOCS_STATIC.mkdir(parents=True, exist_ok=True)
    plots = _plots(run)
    lines = _rst(run, plots)
    text = DOCS_RST.read_text() if DOCS_RST.exists() else ""
    if RST_BEGIN in text and RST_END in text:
        head, rest = text.split(RST_BEGIN, 1)
        _, tail = rest.split(RST_END, 1)
        text = head + RST_BEGIN + "\n\n" + "\n".join(lines) + "\n\n" + RST_END + tail
    else:
        text = text.rstrip() + "\n\n" + RST_BEGIN + "\n\n" + "\n".join(lines) + "\n\n" + RST_END + "\n"
    DOCS_RST.write_text(text)
    print(f"wrote {DOCS_RST.relative_to(REPO_ROOT)} and {', '.join(str(p) for p in plots)}")


def _rst_table(header: Sequence[str], rows: Sequence[Sequence[str]], widths: str | None = None) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1", ""]
    for row in (header, *rows):
        out.append("   * - " + (str(row[0]) or " "))
        out.extend(f"     - {str(cell) or ' '}" for cell in row[1:])
    return out


def _rst(run: Run, plots: list[Path]) -> list[str]:
    env = run.environment
    la = run.load_avg
    lines = [
        "Produced by::",
        "",
        f"    {run.command}",
        "",
        f"on {run.started}: {env['cpu']}, {env['cores']} cores, {env['memory']}, python {env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f", {env['wrk']}. "
        f"The full run took {run.wall_s / 60:.1f} minutes. 1-minute load average at the start "
        f"{la['start'][0]:.2f}, "
        + ", ".join(f"when {k} started {v[0]:.2f}" for k, v in la.items() if k not in ("start", "end"))
        + f", at the end {la['end'][0]:.2f} (the machine is shared: other processes ran too). "
        f"{run.settings['duration']} s per cell after {run.settings['warmup']} s of warm-up, N = "
        f"{run.settings['workers']} model processes for every server, wrk with one thread.",
        "",
    ]
    for note in run.notes:
        lines += [f"Note: {note}.", ""]
    lines += ["Servers:", ""]
    seen: dict[str, str] = {}
    for outcomes in run.results.values():
        for o in outcomes:
            seen.setdefault(o.server, o.label)
    lines += [f"* ``{name}``: {label}" for name, label in seen.items()]
    lines.append("")
    for c in _fast_path_concurrencies(run):
        header, rows = _fast_path_rows(run, c)
        if rows:
            title = f"The performance issue's table, {c} connections"
            lines += [title, "~" * len(title), ""]
            lines += _rst_table(header, rows)
            lines.append("")
    lines += ["Targets", "~~~~~~~", "", "Of the fast-path issue:", ""]
    lines += _rst_table(["", "target", "measured"],
                        [[v.mark, v.target, v.detail] for v in _fast_path_verdicts(run)])
    lines += ["", "Of the earlier issues (batching, shared weights, one pool per host):", ""]
    lines += _rst_table(["", "target", "measured"], [[v.mark, v.target, v.detail] for v in _verdicts(run)])
    lines += ["", "``CPU ms/req``: the CPU time (``utime + stime``) of every process of the server's tree "
              "during the cell, over the requests answered in it (\">=\": a process ended without its "
              "parent waiting for it, counted to its last sample). ``batch rows / calls``: the mean size of "
              "the batches flask_torchpool ran during the cell, from the ``batch_rows`` and ``batch_calls`` "
              "metrics of its status.", ""]
    for workload in run.results:
        title = f"``{workload}``: {WORKLOADS[workload].description}" if workload in WORKLOADS else workload
        lines += [title, "~" * len(title), "",
                  f"Raw limit (the model alone, no HTTP): {_raw_text(run, workload)}.", ""]
        header, rows = _rows(run, workload)
        lines += _rst_table(header, rows)
        lines.append("")
    lines += ["Plots", "~~~~~", ""]
    for p in plots:
        lines += [f".. image:: _static/{p.name}", f"   :alt: {p.stem.replace('_', ' ')}", ""]
    return lines


def _plots(run: Run) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(run.results)
    conc = run.settings["concurrency"]
    sat, low = max(conc), min(conc)
    servers: list[str] = []
    for outcomes in run.results.values():
        for o in outcomes:
            if o.server not in servers:
                servers.append(o.server)
    colors = {s: plt.get_cmap("tab10")(i) for i, s in enumerate(servers)}
    paths = []

    def grid(title: str) -> tuple[Any, Any]:
        fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 4.2), squeeze=False)
        fig.suptitle(title)
        return fig, axes[0]

    def bars(ax: Any, workload: str, values: dict[str, float | None], ylabel: str) -> None:
        names = [s for s in servers if _outcome(run, workload, s) is not None]
        xs = range(len(names))
        heights = [values.get(s) or 0.0 for s in names]
        ax.bar(xs, heights, color=[colors[s] for s in names])
        for x, s, h in zip(xs, names, heights):
            label = "n/a" if values.get(s) is None else (f"{h:,.0f}" if h >= 100 else f"{h:.3g}")
            ax.text(x, h, label, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(workload, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=8)

    # throughput at saturation, with the raw limits
    fig, axes = grid(f"Throughput at {sat} connections (2xx req/s); dashed: the model alone in N processes")
    for ax, w in zip(axes, workloads):
        rates = {s: _rps(run, w, s, sat) for s in servers}
        bars(ax, w, rates, "requests / s")
        top = max((r for r in rates.values() if r), default=1.0)
        off_scale = []
        for raw, style in zip(run.raw.get(w, []), ("--", ":")):
            if raw.samples_per_s <= 5 * top:
                ax.axhline(raw.samples_per_s, color="black", linestyle=style, linewidth=1,
                           label=f"raw, batch {raw.batch}")
            else:
                off_scale.append(f"raw, batch {raw.batch}: {raw.samples_per_s:,.0f}/s")
        if off_scale:
            ax.text(0.02, 0.98, "off scale:\n" + "\n".join(off_scale), transform=ax.transAxes, va="top",
                    fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    paths.append(_save(fig, "http_throughput.png"))

    # latency: p50 at the lowest concurrency, p99 at saturation
    fig, axes = grid(f"Latency: p50 at {low} connection(s) (bars), p99 at {sat} (dots); log scale")
    for ax, w in zip(axes, workloads):
        p50 = {}
        p99 = {}
        for s in servers:
            o = _outcome(run, w, s)
            if o is not None and o.error is None:
                p50[s] = o.cells[low].p50_ms if low in o.cells else None
                p99[s] = o.cells[sat].p99_ms if sat in o.cells else None
        bars(ax, w, p50, "ms")
        names = [s for s in servers if _outcome(run, w, s) is not None]
        ax.plot(range(len(names)), [p99.get(s) or math.nan for s in names], "ko", markersize=4)
        ax.set_yscale("log")
    paths.append(_save(fig, "http_latency.png"))

    # the light route while saturated
    fig, axes = grid(f"GET {LIGHT_PATH} p99 while {sat} connections saturate the model route; log scale")
    for ax, w in zip(axes, workloads):
        vals = {}
        for s in servers:
            o = _outcome(run, w, s)
            vals[s] = o.light.p99_ms if o is not None and o.light and o.light.samples else None
        bars(ax, w, vals, "ms")
        ax.axhline(10, color="red", linestyle="--", linewidth=1, label="10 ms target")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    paths.append(_save(fig, "http_light_route.png"))

    # CPU per request
    fig, axes = grid(f"CPU ms per request, all processes of the server's tree, at {sat} connections")
    for ax, w in zip(axes, workloads):
        vals = {}
        for s in servers:
            cell = _cell(run, w, s, sat)
            vals[s] = cell.cpu_ms_per_request if cell is not None else None
        bars(ax, w, vals, "CPU ms / request")
    paths.append(_save(fig, "http_cpu.png"))

    # memory
    fig, axes = grid(f"Total PSS of the server's process tree under load (MiB, peak at {sat} connections)")
    for ax, w in zip(axes, workloads):
        vals = {}
        for s in servers:
            o = _outcome(run, w, s)
            vals[s] = o.cells[sat].pss_mib if o is not None and o.error is None and sat in o.cells else None
        bars(ax, w, vals, "MiB")
    paths.append(_save(fig, "http_pss.png"))
    return paths


def _save(fig: Any, name: str) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = DOCS_STATIC / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.relative_to(REPO_ROOT)


if __name__ == "__main__":
    sys.exit(main())
