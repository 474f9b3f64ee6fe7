"""CPU per request of each process on the attach path: through the pool server, direct (lanes), and
``gunicorn -w 2`` with the model in-process, in turn.

    python -m benchmarks.hops [--workload tiny] [--seconds 8] [--connections 8] [--rounds 2]

For each setup it starts ``gunicorn -w 2 -k sync 'benchmarks.peers.flask_app:create_app()'`` (the HTTP
benchmark's app) in its own session, warms it up, runs wrk for ``--seconds`` and reads the CPU time
(``utime + stime`` of ``/proc/PID/stat``) of every process of the app before and after: the gunicorn
master and web workers, and in attach mode the pool server (started by the first web worker,
``TORCHPOOL_MODE="auto"``) and its model workers (2, one torch thread each). It prints requests/s and
CPU ms per request of each process, and their sum (wrk excluded). Setups:

    server     attach, TORCHPOOL_DIRECT_CALLS False: every call through the pool server
    direct     attach, TORCHPOOL_DIRECT_CALLS True (the default): calls straight to the workers;
               each web worker pinned to its paired worker's cores (TORCHPOOL_WEB_AFFINITY "auto";
               ``direct:off --configs '{"off": {"TORCHPOOL_WEB_AFFINITY": "off"}}'`` for unpinned)
    gunicorn   the model in every web worker (BENCH_MODE=inprocess)
    embedded   one ``gunicorn -w 1 -k gthread --threads 32`` web process with an embedded pool of 2
               workers (the HTTP benchmark's ``torchpool`` server)

A flask_torchpool setup followed by ``+get_data`` reads the body with ``request.get_data()`` and
``torch.frombuffer`` instead of ``tensor_from_stream`` (``BENCH_BODY``), for the big-body A/B::

    python -m benchmarks.hops --workload payload-16m --rounds 3 --seconds 6 \
        --setups embedded+get_data,embedded,direct+get_data,direct,gunicorn

A flask_torchpool setup followed by ``:NAME`` runs with the ``TORCHPOOL_*`` keys of set NAME of
``--configs`` (JSON) added, for A/Bs of a setting::

    python -m benchmarks.hops --setups direct,direct:nice0 --configs '{"nice0": {"TORCHPOOL_WORKER_NICE": 0}}'

The setups alternate, ``--rounds`` times, on the same machine. Needs ``wrk``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT = 8765


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cores(pid: int) -> str:
    """The cores *pid*'s main thread may run on at the end of its run (Cpus_allowed_list): a web
    worker pinned by TORCHPOOL_WEB_AFFINITY shows its worker's, one that unpinned itself all."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "?"
    match = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.M)
    return match.group(1) if match else "?"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _tree(root: int) -> dict[int, str]:
    """*root* and its descendants (the pool server runs in a session of its own), with their roles."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        cmd = _cmdline(pid)
        role = ("pool server" if "flask_torchpool.server" in cmd else
                "gunicorn master" if pid == root else
                "web worker" if "gunicorn" in cmd else
                "resource tracker" if "resource_tracker" in cmd else "model worker / fork server")
        found[pid] = role
        todo.extend(children.get(pid, []))
    return found


def _run(setup: str, workload: str, seconds: int, connections: int, body: Path, script: Path,
         extra: dict[str, object]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), BENCH_WORKLOAD=workload)
    kind, _, body_mode = setup.partition("+")
    web = ["-w", "2", "-k", "sync"]
    arena = max(64 << 20, 8 * body.stat().st_size)
    if kind == "gunicorn":
        env.update(BENCH_MODE="inprocess", BENCH_TORCH_THREADS="1")
    elif kind == "embedded":
        web = ["-w", "1", "-k", "gthread", "--threads", "32"]
        env.update(BENCH_MODE="torchpool", BENCH_BODY=body_mode or "stream",
                   BENCH_TORCHPOOL_CONFIG=json.dumps({"TORCHPOOL_WORKERS": 2,
                                                      "TORCHPOOL_ARENA_BYTES": arena, **extra}))
    elif kind in ("server", "direct"):
        sock = Path(tempfile.mkdtemp(prefix="hops-")) / "pool.sock"
        env.update(BENCH_MODE="torchpool", BENCH_BODY=body_mode or "stream",
                   BENCH_TORCHPOOL_CONFIG=json.dumps({
                       "TORCHPOOL_WORKERS": 2, "TORCHPOOL_MODE": "auto", "TORCHPOOL_SOCKET": str(sock),
                       "TORCHPOOL_ARENA_BYTES": arena, "TORCHPOOL_DIRECT_CALLS": kind == "direct",
                       **extra}))
    else:
        raise ValueError(f"unknown setup {setup!r}")
    log = tempfile.NamedTemporaryFile(prefix="hops-", suffix=".log", delete=False)
    argv = [sys.executable, "-m", "gunicorn", *web, "-b", f"127.0.0.1:{PORT}", "--timeout",
            "120", "benchmarks.peers.flask_app:create_app()"]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{PORT}/predict", data=body.read_bytes())
                urllib.request.urlopen(request, timeout=30).read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{setup}: the server did not answer; see {log.name}") from None
                time.sleep(0.2)
        wrk = ["wrk", "-t1", f"-c{connections}", "-s", str(script), f"http://127.0.0.1:{PORT}/predict"]
        subprocess.run([*wrk[:3], "-d3s", *wrk[3:]], capture_output=True, check=True)  # warm-up
        tree = _tree(proc.pid)
        before = {pid: _cpu(pid) for pid in tree}
        out = subprocess.run([*wrk[:3], f"-d{seconds}s", *wrk[3:]], capture_output=True, text=True,
                             check=True).stdout
        after = {pid: _cpu(pid) for pid in tree if Path(f"/proc/{pid}").exists()}
        cores = {pid: _cores(pid) for pid in after}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    rps = float(match.group(1)) if match else 0.0
    requests = max(1.0, rps * seconds)
    per_process = {f"{tree[pid]} {pid} (cores {cores[pid]})": 1000 * (after[pid] - before[pid]) / requests
                   for pid in after if after[pid] > before[pid]}
    return {"setup": setup, "rps": rps, "cpu_ms_per_request": per_process,
            "total_cpu_ms_per_request": sum(per_process.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="tiny")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--setups", default="server,direct,gunicorn")
    parser.add_argument("--configs", default="{}",
                        help="JSON: named sets of TORCHPOOL_* keys; a setup KIND:SET runs with that set "
                             "added (see the module docstring)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ["BENCH_WORKLOAD"] = args.workload
    from benchmarks.peers import common

    workload = common.workload()
    tmp = Path(tempfile.mkdtemp(prefix="hops-"))
    body = tmp / "body.bin"
    body.write_bytes(bytes(workload.body_bytes))
    script = tmp / "post.lua"
    script.write_text(f'wrk.method = "POST"\nlocal f = io.open("{body}", "rb")\nwrk.body = f:read("*a")\n'
                      "f:close()\n")
    configs = json.loads(args.configs)
    for round_ in range(1, args.rounds + 1):
        for setup in args.setups.split(","):
            kind, _, named = setup.partition(":")
            extra = configs[named] if named else {}
            result = _run(kind, args.workload, args.seconds, args.connections, body, script, extra)
            print(f"round {round_} {setup:9s} {result['rps']:8.1f} req/s  "
                  f"CPU {result['total_cpu_ms_per_request']:.2f} ms/req (all processes, wrk excluded)")
            for name, ms in sorted(result["cpu_ms_per_request"].items()):
                print(f"    {ms:6.3f} ms/req  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
