"""The ``flask torchpool`` commands, through ``app.test_cli_runner()`` and as real ``flask``
subprocesses: ``plan`` starts nothing, ``status`` reads a server or starts a pool here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask
from werkzeug.serving import make_server

from flask_torchpool import TorchPool

from .conftest import child_pids, make_app
from .servers import free_port, server_env

pytestmark = pytest.mark.timeout(120)

URL = "/torchpool"


def _lazy_app(**config: Any) -> tuple[Flask, TorchPool]:
    app = make_app(TORCHPOOL_START="lazy", **config)
    return app, TorchPool(app)


def test_plan_prints_the_placement_without_starting() -> None:
    before = child_pids()
    app, _ = _lazy_app(TORCHPOOL_WORKERS=2, TORCHPOOL_THREADS_PER_WORKER=1)
    result = app.test_cli_runner().invoke(args=["torchpool", "plan"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "model: 'tests.models:echo'"
    assert lines[1] == "2 worker(s), spawned processes"
    assert lines[2].split() == ["worker", "device", "cores", "threads"]
    rows = [line.split() for line in lines[3:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [("0", "cpu", "1"), ("1", "cpu", "1")]
    assert app.extensions["torchpool"].pool is None and child_pids() == before


def test_plan_json() -> None:
    app, pool = _lazy_app(TORCHPOOL_WORKERS=3)
    result = app.test_cli_runner().invoke(args=["torchpool", "plan", "--json"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert json.loads(result.output) == [
            {"worker": p.worker, "device": p.device, "cores": list(p.cores), "threads": p.threads,
             "model": "default"} for p in pool.plan]


def test_plan_inline() -> None:
    app, _ = _lazy_app(TORCHPOOL_INLINE=True)
    result = app.test_cli_runner().invoke(args=["torchpool", "plan"])
    assert result.exit_code == 0 and "1 worker(s), inline, in the web process" in result.output


@pytest.mark.timeout(90)
def test_status_in_process_with_probe(make_pool: Any) -> None:
    app, _ = make_pool(TORCHPOOL_START="lazy", TORCHPOOL_EXAMPLE_INPUT=lambda: torch.ones(2, 3))
    before = child_pids()
    result = app.test_cli_runner().invoke(args=["torchpool", "status", "--probe"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("probe: ok in ") and "tensor of shape (2, 3), float32" in lines[0]
    assert lines[1].startswith("pool: ready   queued: 0   busy workers: 0/1")
    assert "calls=1" in result.output and "ok=1" in result.output and "latency: p50=" in result.output
    header = next(i for i, line in enumerate(lines) if line.startswith("worker"))
    assert lines[header].split() == ["worker", "pid", "state", "device", "cores", "threads", "inflight",
                                     "calls", "errors", "restarts"]
    row = lines[header + 1].split()
    assert row[0] == "0" and row[2] == "ready" and row[3] == "cpu" and row[7] == "1"
    # The pool it started is stopped again, and the app is back to "not started".
    assert app.extensions["torchpool"].pool is None and child_pids() <= before


@pytest.mark.timeout(90)
def test_status_json(make_pool: Any) -> None:
    app, _ = make_pool(TORCHPOOL_START="lazy")
    result = app.test_cli_runner().invoke(args=["torchpool", "status", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["ready"] is True and body["workers"][0]["state"] == "ready"
    assert body["plan"] == [{k: body["workers"][0][k]
                             for k in ("worker", "device", "cores", "threads", "model")}]


@pytest.mark.timeout(90)
def test_a_failing_probe_exits_1_after_showing_the_status(make_pool: Any) -> None:
    # A tuple is spread as positional arguments; this one cannot travel (requires grad).
    app, _ = make_pool(TORCHPOOL_START="lazy",
                       TORCHPOOL_EXAMPLE_INPUT=(torch.ones(1, requires_grad=True), "second"))
    result = app.test_cli_runner().invoke(args=["torchpool", "status", "--probe"])
    assert result.exit_code == 1
    assert "the probe call failed: InvalidInputError: cannot send args[0]" in result.output
    assert "pool: ready" in result.output


def test_status_probe_needs_an_example_input() -> None:
    app, _ = _lazy_app()
    result = app.test_cli_runner().invoke(args=["torchpool", "status", "--probe"])
    assert result.exit_code == 2 and "TORCHPOOL_EXAMPLE_INPUT" in result.output
    assert app.extensions["torchpool"].pool is None  # refused before starting anything


def test_status_of_a_running_pool_leaves_it_running(echo_app: Flask) -> None:
    result = echo_app.test_cli_runner().invoke(args=["torchpool", "status"])
    assert result.exit_code == 0, result.output
    assert "pool: ready" in result.output and "busy workers: 0/2" in result.output
    state = echo_app.extensions["torchpool"]
    assert state.pool is not None and state.pool.started and not state.pool.closed


@pytest.fixture
def served(make_pool: Any) -> Iterator[str]:
    """A started pool with the health blueprint behind Werkzeug's server on a free port."""
    app, pool = make_pool(TORCHPOOL_HEALTH_URL=URL)
    with app.app_context():
        pool(torch.ones(1))
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


@pytest.mark.timeout(90)
def test_status_of_a_server(served: str) -> None:
    app, _ = _lazy_app(TORCHPOOL_HEALTH_URL=URL)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["torchpool", "status", "--url", served])
    assert result.exit_code == 0, result.output
    assert "pool: ready" in result.output and "calls=1" in result.output
    result = runner.invoke(args=["torchpool", "status", "--url", served + "/", "--json"])
    body = json.loads(result.output)
    assert body["workers"][0]["calls"] == 1 and body["workers"][0]["state"] == "ready"
    assert app.extensions["torchpool"].pool is None  # nothing started on this side


def test_status_url_errors() -> None:
    app, _ = _lazy_app()
    runner = app.test_cli_runner()
    result = runner.invoke(args=["torchpool", "status", "--url", "http://127.0.0.1:1"])
    assert result.exit_code == 2 and "TORCHPOOL_HEALTH_URL" in result.output
    app, _ = _lazy_app(TORCHPOOL_HEALTH_URL=URL)
    runner = app.test_cli_runner()
    result = runner.invoke(args=["torchpool", "status", "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1 and "cannot reach" in result.output
    assert "is the server running?" in result.output
    result = runner.invoke(args=["torchpool", "status", "--url", "http://127.0.0.1:1", "--probe"])
    assert result.exit_code == 2 and "cannot be combined" in result.output


@pytest.mark.parametrize("timeout", ["nan", "-1", "0", "inf", "soon"])
def test_a_bad_timeout_is_a_usage_error(timeout: str) -> None:
    """Not a cause found later: -1 and nan reached the socket and read as 'did not answer JSON'."""
    app, _ = _lazy_app(TORCHPOOL_HEALTH_URL=URL)
    runner = app.test_cli_runner()
    for command in (["status", "--url", "http://127.0.0.1:1"], ["reload"]):
        result = runner.invoke(args=["torchpool", *command, "--timeout", timeout])
        assert result.exit_code == 2 and "--timeout" in result.output, (command, result.output)


def test_plan_with_gpus_this_machine_lacks_is_one_line_of_error() -> None:
    app, _ = _lazy_app(TORCHPOOL_DEVICES="cuda:63")
    result = app.test_cli_runner().invoke(args=["torchpool", "plan"])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ConfigError: TORCHPOOL_DEVICES") and "Traceback" not in \
        result.output, result.output


def test_plan_of_an_app_without_torchpool() -> None:
    app = Flask("bare")
    from flask_torchpool.cli import torchpool

    app.cli.add_command(torchpool)
    result = app.test_cli_runner().invoke(args=["torchpool", "plan"])
    assert result.exit_code == 1 and "this app has no TorchPool" in result.output


# --- a real `flask` command line -------------------------------------------------------------------------

APP_MODULE = """
    import os

    import torch
    from flask import Flask

    from flask_torchpool import TorchPool

    app = Flask(__name__)
    app.config.update(TORCHPOOL_MODEL="tinyapp:build", TORCHPOOL_WORKERS=2, TORCHPOOL_DEVICES="cpu",
                      TORCHPOOL_ARENA_BYTES=8 << 20, TORCHPOOL_EXAMPLE_INPUT=torch.ones(3))
    pool = TorchPool(app)  # TORCHPOOL_START="auto"


    def build():
        # Runs in each worker: proves whether a command started the pool.
        with open(os.environ["TINYAPP_MARKER"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        return torch.nn.Identity()
"""


@pytest.fixture
def tinyapp(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    (tmp_path / "tinyapp.py").write_text(textwrap.dedent(APP_MODULE))
    marker = tmp_path / "built"
    return marker, server_env(tmp_path, TINYAPP_MARKER=str(marker))


def _flask(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "tinyapp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=100)


@pytest.mark.timeout(120)
def test_real_flask_plan_starts_nothing(tinyapp: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    marker, env = tinyapp
    result = _flask(env, tmp_path, "torchpool", "plan")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["model: 'tinyapp:build'", "2 worker(s), spawned processes"]
    assert [line.split()[:2] for line in lines[3:]] == [["0", "cpu"], ["1", "cpu"]]
    # Other commands load the app without starting it either.
    result = _flask(env, tmp_path, "routes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists(), "a worker was started by `flask torchpool plan` or `flask routes`"


@pytest.mark.timeout(120)
def test_real_flask_status_starts_and_stops_a_pool(tinyapp: tuple[Path, dict[str, str]],
                                                  tmp_path: Path) -> None:
    marker, env = tinyapp
    result = _flask(env, tmp_path, "torchpool", "status", "--probe")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "probe: ok" in result.stdout and "pool: ready" in result.stdout
    assert "busy workers: 0/2" in result.stdout
    assert len(marker.read_text().split()) == 2  # both workers built the model


# --- tune ------------------------------------------------------------------------------------------------


def _png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG, checking its signature and chunk structure on the way."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks: dict[str, str] = {}
    pos, kinds = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8].decode("ascii")
        body = data[pos + 8:pos + 8 + length]
        kinds.append(kind)
        if kind == "tEXt":
            key, _, value = body.partition(b"\0")
            chunks[key.decode("latin-1")] = value.decode("latin-1")
        pos += 12 + length
    assert kinds[0] == "IHDR" and kinds[-1] == "IEND" and "IDAT" in kinds
    return chunks


@pytest.mark.timeout(120)
@pytest.mark.leaks_ok(reason="matplotlib's font cache keeps the font files it loaded open for the rest "
                             "of the process", only=["*/matplotlib/mpl-data/fonts/*"])
def test_tune_prints_a_table_recommends_and_plots(tmp_path: Path) -> None:
    before = child_pids()
    app, _ = _lazy_app(TORCHPOOL_MODEL="tests.models:linear",
                       TORCHPOOL_EXAMPLE_INPUT=lambda: torch.randn(1, 4))
    plot = tmp_path / "tune.png"
    result = app.test_cli_runner().invoke(args=[
        "torchpool", "tune", "--workers", "1,2", "--batch-sizes", "1,4", "--duration", "0.3",
        "--warmup", "0.1", "--concurrency", "4", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("workers"))
    assert lines[header].split() == ["workers", "batch", "calls/s", "rows/s", "p50", "p99", "errors"]
    rows = [line.split() for line in lines[header + 1:header + 5]]
    assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("2", "1"), ("1", "4"), ("2", "4")]
    assert all(float(r[2]) > 0 and r[-1] == "0" for r in rows)
    recommended = next(line for line in lines if line.startswith("recommended: "))
    assert "TORCHPOOL_WORKERS = " in recommended and "TORCHPOOL_MAX_BATCH_SIZE = " in recommended
    # The plot: a valid PNG whose series are one line per batch size, one point per worker count.
    text = _png_text(plot.read_bytes())
    series = json.loads(text["Description"])
    assert set(series) == {"batch 1", "batch 4"}
    for s in series.values():
        assert s["workers"] == [1, 2] and len(s["rows_per_second"]) == len(s["p99_ms"]) == 2
        assert all(v > 0 for v in s["rows_per_second"] + s["p99_ms"])
    import matplotlib.image

    assert matplotlib.image.imread(str(plot)).shape[:2] == (400, 1000)
    assert app.extensions["torchpool"].pool is None and child_pids() <= before


@pytest.mark.timeout(120)
def test_tune_json(tmp_path: Path) -> None:
    app, _ = _lazy_app(TORCHPOOL_EXAMPLE_INPUT=(torch.ones(2, 3),))
    result = app.test_cli_runner().invoke(args=[
        "torchpool", "tune", "--workers", "1", "--batch-sizes", "8", "--duration", "0.3", "--warmup", "0",
        "--plot", "", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    (row,) = body["results"]
    assert (row["workers"], row["batch_size"], row["errors"], row["error"]) == (1, 8, 0, None)
    assert row["rows_per_second"] == pytest.approx(2 * row["calls_per_second"])
    assert body["recommended"] == {"TORCHPOOL_WORKERS": 1, "TORCHPOOL_MAX_BATCH_SIZE": 8}
    assert not list(tmp_path.iterdir())


@pytest.mark.timeout(120)
def test_tune_buckets_times_every_row_count_and_suggests_the_cheap_ones() -> None:
    # Stepped costs 40 ms up to 4 rows and 120 ms above: a batch of 1-3 rows is padded to 4, of 5 to 6.
    app, _ = _lazy_app(TORCHPOOL_MODEL="tests.models:stepped", TORCHPOOL_EXAMPLE_INPUT=(torch.ones(1, 3),))
    runner = app.test_cli_runner()
    args = ["torchpool", "tune", "--workers", "1", "--batch-sizes", "6", "--duration", "0.3",
            "--warmup", "0", "--concurrency", "6", "--plot", "", "--buckets"]
    result = runner.invoke(args=[*args, "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    curve = body["batch_curve_ms"]
    assert list(curve) == ["1", "2", "3", "4", "5", "6"]
    assert all(40 <= curve[n] < 100 for n in "1234") and all(120 <= curve[n] for n in "56"), curve
    assert body["recommended"] == {"TORCHPOOL_WORKERS": 1, "TORCHPOOL_MAX_BATCH_SIZE": 6,
                                   "TORCHPOOL_BATCH_BUCKETS": [4, 6]}
    # The suggestion is a valid setting for the recommended batch size.
    make_app(TORCHPOOL_START="lazy", TORCHPOOL_MAX_BATCH_SIZE=6, TORCHPOOL_BATCH_BUCKETS=[4, 6])
    # As text: the curve's table and the suggestion, for a model of TORCHPOOL_MODELS under its own key.
    app, _ = _lazy_app(TORCHPOOL_MODEL=None, TORCHPOOL_MODELS={
        "s": {"model": "tests.models:stepped", "example_input": (torch.ones(1, 3),)}})
    result = app.test_cli_runner().invoke(args=[*args, "--model", "s"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("rows ")))
    assert lines[header].split() == ["rows", "ms", "a", "call", "rows/s"]
    assert [line.split()[0] for line in lines[header + 1:header + 7]] == ["1", "2", "3", "4", "5", "6"]
    assert 'suggested: TORCHPOOL_MODELS["s"]["batch_buckets"] = [4, 6]  (for ' \
           'TORCHPOOL_MODELS["s"]["max_batch_size"] = 6)' in result.output


@pytest.mark.timeout(120)
def test_tune_buckets_names_the_row_count_the_model_refuses() -> None:
    before = child_pids()
    app, _ = _lazy_app(TORCHPOOL_MODEL="tests.models:two_rows", TORCHPOOL_EXAMPLE_INPUT=(torch.ones(1, 3),))
    result = app.test_cli_runner().invoke(args=[
        "torchpool", "tune", "--workers", "1", "--batch-sizes", "1,4", "--duration", "0.2", "--warmup", "0",
        "--concurrency", "2", "--plot", "", "--buckets"])
    # The sweep ran (a failed batch is retried call by call); the curve stops at 3 rows, with the reason.
    assert result.exit_code == 1, result.output
    assert "Error: --buckets: a call of 3 row(s) failed: InferenceError: " in result.output
    assert "at most 2 rows, got 3" in result.output
    assert child_pids() <= before


def test_the_curve_grows_the_batched_tensors_only() -> None:
    from flask_torchpool.tune import curve_args

    x, table = torch.arange(6.0).view(2, 3), torch.ones(5, 3)
    grown = curve_args((x, table, 7, torch.tensor(1.0)), 4)
    assert torch.equal(grown[0], x[:1].expand(4, 3)) and grown[0].is_contiguous()
    assert grown[1] is table and grown[2] == 7 and grown[3].dim() == 0


def test_suggested_buckets_keep_the_sizes_no_larger_size_runs_as_cheaply() -> None:
    from flask_torchpool.tune import suggest_buckets

    # The wide MLP's shape on one core: 2 and 3 rows cost more than 4 (docs/benchmarks.rst).
    wide = {1: 7.0, 2: 15.0, 3: 22.0, 4: 15.0, 5: 18.0, 6: 18.5, 7: 18.6, 8: 18.6}
    assert suggest_buckets(wide) == [1, 4, 8]
    assert suggest_buckets({1: 1.0, 2: 1.02, 3: 1.0}) == [3]          # flat: pad to the largest
    assert suggest_buckets({1: 1.0, 2: 2.0, 3: 3.0}) == [1, 2, 3]     # linear: no padding pays
    assert suggest_buckets({1: 1.0, 2: 1.2}, tolerance=0.25) == [2]


def test_tune_needs_an_example_input_and_valid_lists() -> None:
    app, _ = _lazy_app()
    runner = app.test_cli_runner()
    result = runner.invoke(args=["torchpool", "tune"])
    assert result.exit_code == 2 and "TORCHPOOL_EXAMPLE_INPUT" in result.output
    app, _ = _lazy_app(TORCHPOOL_EXAMPLE_INPUT=torch.ones(1))
    result = app.test_cli_runner().invoke(args=["torchpool", "tune", "--workers", "0,x"])
    assert result.exit_code == 2 and "--workers" in result.output
    app, _ = _lazy_app(TORCHPOOL_EXAMPLE_INPUT=(3,))
    result = app.test_cli_runner().invoke(args=["torchpool", "tune", "--buckets"])
    assert result.exit_code == 2 and "--buckets needs a tensor" in result.output


def test_recommend_prefers_low_latency_among_the_fastest() -> None:
    from flask_torchpool.tune import TuneResult, recommend

    def result(workers: int, batch: int, calls: int, latency: float) -> TuneResult:
        return TuneResult(workers, batch, 1, 1.0, [latency] * calls)

    fast_slow = result(2, 16, 1000, 0.050)
    fast_quick = result(2, 4, 970, 0.010)   # within 5% of the best: lower p99 wins
    slow = result(1, 1, 500, 0.001)
    assert recommend([fast_slow, fast_quick, slow]) is fast_quick
    assert recommend([TuneResult(1, 1, 1, 0.0, [], error="WorkerStartupError: no")]) is None
