"""The ``flask torchpool`` commands: where the workers go, and what a pool is doing.

``init_app`` adds the group to ``app.cli``::

    flask --app myapp torchpool plan                  # worker -> device, cores, threads; starts nothing
    flask --app myapp torchpool status --url http://127.0.0.1:5000    # a running server's pool
    flask --app myapp torchpool status --probe        # start the pool here, make one call, show it
    flask --app myapp torchpool tune                  # sweep workers x batch sizes, recommend, plot
    flask --app myapp torchpool tune --model resnet   # the same for one of several models

With several models (``TORCHPOOL_MODELS``), ``plan`` and ``status`` show every model's workers, with a
``model`` column.

Loading the app for a ``flask`` command other than ``flask run`` starts no worker with
``TORCHPOOL_START = "auto"`` (see :func:`flask_torchpool.startup.defer_start`): ``plan`` only computes
the placement, and ``status`` starts a pool in-process only when it is not given ``--url``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

import click
from flask import current_app
from flask.cli import AppGroup, ScriptInfo

from .deadlines import MAX_TIMEOUT, seconds_ok
from .errors import TorchPoolError
from .placement import _ranges
from .startup import SERVING_META

if TYPE_CHECKING:
    from .group import ModelGroup

#: How a pool server logs when nothing else configured logging (INFO: serving, attachments, reloads).
LOG_FORMAT = "%(asctime)s [torchpool-server %(process)d] %(levelname)s %(name)s: %(message)s"

torchpool = AppGroup("torchpool", help="Inspect and tune the app's TorchPool: placement, status, tuning.")


def _state() -> ModelGroup:
    state: ModelGroup | None = current_app.extensions.get("torchpool")
    if state is None:
        raise click.ClickException("this app has no TorchPool: create it with TorchPool(app) or "
                                   "pool.init_app(app) in the app's module or factory")
    return state


def _seconds(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """A --timeout: a number of seconds > 0 and at most MAX_TIMEOUT (click's FloatRange lets NaN in)."""
    if not seconds_ok(value):
        raise click.BadParameter(f"{value!r} is not a number of seconds > 0 and at most {MAX_TIMEOUT:.0f}")
    return value


@torchpool.command("plan")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(as_json: bool) -> None:
    """Show which worker gets which device, cores and threads, without starting anything."""
    state = _state()
    try:
        placements = state.plan
    except TorchPoolError as exc:  # a ConfigError only the plan finds (GPUs this machine does not show)
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    if as_json:
        click.echo(json.dumps([{"worker": p.worker, "device": p.device, "cores": list(p.cores),
                                "threads": p.threads, "model": p.model} for p in placements], indent=2))
        return
    mode = "inline, in the web process" if state.app_config.inline else "spawned processes"
    headers = ["worker", "device", "cores", "threads"]
    rows = [[p.worker, p.device, _ranges(p.cores), p.threads] for p in placements]
    if len(state.configs) > 1:
        for name, config in state.configs.items():
            click.echo(f"model {name}: {config.model!r}")
        headers = ["model"] + headers
        rows = [[p.model] + row for p, row in zip(placements, rows)]
    else:
        click.echo(f"model: {next(iter(state.configs.values())).model!r}")
    click.echo(f"{len(placements)} worker(s), {mode}")
    click.echo(_table(headers, rows))


@torchpool.command("status")
@click.option("--url", metavar="URL",
              help="Base URL of a running server, e.g. http://127.0.0.1:5000: read its "
                   "<URL><TORCHPOOL_HEALTH_URL>/status instead of starting a pool here.")
@click.option("--probe", is_flag=True,
              help="In-process only: call the model (each model that has one) once with "
                   "TORCHPOOL_EXAMPLE_INPUT before showing the status.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--timeout", type=float, callback=_seconds, default=10.0, show_default=True,
              help="Seconds to wait for the server (--url).")
def status_command(url: str | None, probe: bool, as_json: bool, timeout: float) -> None:
    """Show a pool's state: per worker (and model) pid, state, device, cores, calls, errors, restarts;
    the queue, counters and latency.

    With --url, the status of a running server (its TORCHPOOL_HEALTH_URL must be set). Without it, the
    app's pool is started in this process (and stopped again afterwards if it was not running).
    """
    state = _state()
    probe_error: str | None = None
    status: dict[str, Any]
    if url is not None:
        if probe:
            raise click.UsageError("--probe calls the model in this process; it cannot be combined "
                                   "with --url")
        status = _fetch_status(url, state.app_config.health_url, timeout)
    else:
        probed = [name for name, config in state.configs.items() if config.example_input is not None]
        if probe and not probed:
            raise click.UsageError("--probe needs an example input: set TORCHPOOL_EXAMPLE_INPUT to a "
                                   "value (a tuple is spread as arguments) or to a function returning one")
        app = current_app._get_current_object()  # type: ignore[attr-defined]
        started_here = not state.pools or not all(pool.started for pool in state.pools.values())
        try:
            state.extension.start(app)
        except TorchPoolError as exc:
            raise click.ClickException(f"the pool could not start: {type(exc).__name__}: {exc}") from exc
        try:
            if probe:
                errors = [_probe(state, app, name) for name in probed]
                probe_error = "; ".join(e for e in errors if e is not None) or None
            status = dict(state.status())
        finally:
            if started_here:
                state.shutdown(wait=True)
                state.pools = {}  # back to "not started": the next use starts a fresh pool
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        click.echo(_format_status(status))
    if probe_error is not None:
        raise click.ClickException(probe_error)


@torchpool.command("reload")
@click.option("--model", "name", metavar="NAME", default=None,
              help="The model to reload (default: every model of the pool server).")
@click.option("--spec", metavar="SPEC", default=None,
              help="Load this factory ('package.module:callable') or model file instead of the configured "
                   "one (with several models, name the model with --model).")
@click.option("--version", "label", metavar="LABEL", default=None,
              help="A label for the new version (status, metrics, logs).")
@click.option("--timeout", type=float, callback=_seconds, default=900.0, show_default=True,
              help="Seconds to wait for the reload to finish.")
def reload_command(name: str | None, spec: str | None, label: str | None, timeout: float) -> None:
    """Reload models of the running pool server (attach mode), worker by worker, without failing a call:
    the model's recipe again (its module imported afresh, its file read again), or --spec. Prints each
    model's new version; exits 1 when the reload failed (the old version keeps serving).

    In embedded mode (workers are children of the web process), send SIGHUP to the web process instead.
    """
    from .attach.client import PoolConnection
    from .attach.control import ask_reload

    state = _state()
    connection = PoolConnection(state.socket_path(), 1 << 20)
    try:
        reply = ask_reload(connection, name, spec, label, timeout)
    except TorchPoolError as exc:
        raise click.ClickException(f"{exc}. In embedded mode (no pool server), send SIGHUP to the web "
                                   "process to reload its models") from exc
    finally:
        connection.close()
    for model, version in reply["versions"].items():
        label_text = f" ({version['version']})" if version.get("version") else ""
        digest = f" sha256 {version['sha256'][:12]}" if version.get("sha256") else ""
        click.echo(f"{model}: version {version['generation']}{label_text} [{version['model']}]{digest}")
    if reply["error"] is not None:
        raise click.ClickException(f"reload failed: {reply['error']}")


@torchpool.command("tune")
@click.option("--workers", "worker_counts", metavar="N,N,...",
              help="Worker counts to try.  [default: 1, 2, 4, ... up to the number of cores]")
@click.option("--batch-sizes", metavar="N,N,...",
              help="TORCHPOOL_MAX_BATCH_SIZE values to try.  [default: 1, and the rows of about 4 and 16 "
                   "calls when the input is a tensor]")
@click.option("--concurrency", type=click.IntRange(1, 1024),
              help="Client threads calling the model.  [default: enough to fill the largest batches of the "
                   "largest pool twice, at most 64]")
@click.option("--duration", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Seconds measured per pair.")
@click.option("--warmup", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="Seconds of calls before measuring each pair.")
@click.option("--plot", "plot_path", default="torchpool-tune.png", show_default=True,
              help="Where to write the PNG plot; '' for none.")
@click.option("--model", "model_name", metavar="NAME",
              help="The model to tune, by its name in TORCHPOOL_MODELS.  [default: the default model]")
@click.option("--buckets", is_flag=True,
              help="Also time one call at every row count up to the largest batch size and suggest "
                   "TORCHPOOL_BATCH_BUCKETS for the recommended batch size.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def tune_command(worker_counts: str | None, batch_sizes: str | None, concurrency: int | None,
                 duration: float, warmup: float, plot_path: str, model_name: str | None,
                 buckets: bool, as_json: bool) -> None:
    """Measure throughput and latency for a sweep of worker counts and batch sizes, and recommend a
    configuration.

    Each pair gets a fresh pool built from the model's configuration, driven with its
    TORCHPOOL_EXAMPLE_INPUT by --concurrency client threads; one pool runs at a time. The app's own
    pools are not touched.
    """
    from . import tune
    from .errors import ConfigError

    state = _state()
    try:
        config = state.configs[state.model_name(model_name)]
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--model") from None
    try:
        args = tune.example_args(config)
    except TorchPoolError as exc:
        raise click.UsageError(f"tune needs an example input: {exc}") from None
    rows = tune.rows_per_call(args)
    has_tensor = any(_is_tensor(a) for a in args)
    workers = _int_list(worker_counts, "--workers") or tune.default_workers(config)
    batches = _int_list(batch_sizes, "--batch-sizes") or tune.default_batch_sizes(rows, has_tensor)
    if buckets and not has_tensor:
        raise click.UsageError("--buckets needs a tensor with a batch dimension in TORCHPOOL_EXAMPLE_INPUT")
    if concurrency is None:
        concurrency = min(64, max(2, 2 * max(workers) * max(1, max(batches) // rows)))
    pairs = [(w, b) for b in batches for w in workers]
    results: list[Any] = []
    stderr = sys.stderr  # not click.get_text_stream: deprecated in Click 8.5
    click.echo(f"tuning {len(pairs)} configurations, {duration:g} s each with {concurrency} clients; "
               f"{rows} row(s) per call", err=True)
    with click.progressbar(pairs, label="tune", file=stderr,
                           item_show_func=lambda p: p and f"workers={p[0]} batch={p[1]}") as bar:
        for w, b in bar:
            results.append(tune.measure(config, w, b, args, concurrency=concurrency,
                                        duration=duration, warmup=warmup))
    best = tune.recommend(results)
    curve: dict[int, float] = {}
    if buckets and best is not None:  # with no configuration answering, there is nothing to suggest for
        click.echo(f"timing one call at 1..{max(batches)} rows", err=True)
        try:
            curve = tune.batch_curve(config, args, max(batches))
        except (tune.CurveError, TorchPoolError) as exc:
            raise click.ClickException(f"--buckets: {exc}") from None
    suggested = None
    if best is not None and curve and best.batch_size > 1:
        suggested = tune.suggest_buckets({n: t for n, t in curve.items() if n <= best.batch_size})
    if as_json:
        recommended: dict[str, Any] | None = None if best is None else {
            _setting_key(config, "workers"): best.workers,
            _setting_key(config, "max_batch_size"): best.batch_size}
        if recommended is not None and suggested is not None:
            recommended[_setting_key(config, "batch_buckets")] = suggested
        doc: dict[str, Any] = {"results": [r.as_dict() for r in results], "recommended": recommended}
        if curve:
            doc["batch_curve_ms"] = {str(n): round(t * 1000, 3) for n, t in curve.items()}
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(_table(
            ["workers", "batch", "calls/s", "rows/s", "p50", "p99", "errors"],
            [[r.workers, r.batch_size, f"{r.calls_per_second:.1f}", f"{r.rows_per_second:.1f}",
              _ms(r.latency(0.5)) if r.calls else "-", _ms(r.latency(0.99)) if r.calls else "-",
              r.errors if r.error is None else r.error] for r in results]))
        if best is not None:
            click.echo(f"\nrecommended: {_setting_key(config, 'workers')} = {best.workers}, "
                       f"{_setting_key(config, 'max_batch_size')} = {best.batch_size}  "
                       f"({best.rows_per_second:.1f} rows/s, p99 "
                       f"{_ms(best.latency(0.99) or 0.0)})")
        if curve:
            click.echo("\n" + _table(["rows", "ms a call", "rows/s"],
                                      [[n, f"{t * 1000:.2f}", f"{n / t:.1f}"] for n, t in curve.items()]))
        if suggested is not None and best is not None:
            click.echo(f"\nsuggested: {_setting_key(config, 'batch_buckets')} = {suggested}  (for "
                       f"{_setting_key(config, 'max_batch_size')} = {best.batch_size})")
        elif curve and best is not None:
            click.echo(f"\nno {_setting_key(config, 'batch_buckets')}: the recommended configuration "
                       "does not batch")
    if best is None:
        raise click.ClickException("no configuration answered a call: see the errors above")
    if plot_path:
        try:
            tune.plot(results, plot_path)
        except ImportError:
            click.echo("no plot: it needs matplotlib (pip install flask_torchpool[tune])", err=True)
        else:
            click.echo(f"plot: {plot_path}", err=True)


def _setting_key(config: Any, setting: str) -> str:
    """Where to set *setting* for this model alone: ``TORCHPOOL_WORKERS`` for ``TORCHPOOL_MODEL``'s,
    ``TORCHPOOL_MODELS["name"]["workers"]`` for a model of ``TORCHPOOL_MODELS``."""
    if config.source == "TORCHPOOL_MODEL":
        return f"TORCHPOOL_{setting.upper()}"
    return f'{config.source}["{setting}"]'


def _int_list(value: str | None, option: str) -> list[int]:
    if value is None:
        return []
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers >= 1",
                                 param_hint=option)
    return sorted(set(numbers))


def _probe(state: ModelGroup, app: Any, name: str) -> str | None:
    """Call model *name* once with its ``TORCHPOOL_EXAMPLE_INPUT``; returns an error message or None."""
    example = state.configs[name].example_input
    value = example() if callable(example) and not _is_tensor(example) else example
    args = value if isinstance(value, tuple) else (value,)
    label, call = ("probe", "the probe call") if len(state.configs) == 1 else (
        f"probe {name}", f"the probe call of model {name!r}")
    begin = time.perf_counter()
    try:
        out = state.extension.model(name, app=app)(*args)
    except TorchPoolError as exc:
        click.echo(f"{label}: failed after {_ms(time.perf_counter() - begin)}", err=True)
        return f"{call} failed: {type(exc).__name__}: {exc}"
    click.echo(f"{label}: ok in {_ms(time.perf_counter() - begin)}, returned {_summary(out)}")
    return None


def _fetch_status(url: str, health_url: str | None, timeout: float) -> dict[str, Any]:
    if health_url is None:
        raise click.UsageError("--url needs TORCHPOOL_HEALTH_URL in the app's config: the status is read "
                               "from <URL><TORCHPOOL_HEALTH_URL>/status")
    import urllib.error
    import urllib.request

    target = url.rstrip("/") + health_url + "/status"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 - user's URL
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        raise click.ClickException(f"{target} answered {exc.code} {exc.reason}: is TORCHPOOL_HEALTH_URL "
                                   f"({health_url}) the same on the server?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot reach {target}: {reason}; is the server running?") from None
    except ValueError:
        raise click.ClickException(f"{target} did not answer JSON: is it a flask_torchpool status "
                                   "endpoint?") from None
    if not isinstance(body, dict) or "workers" not in body:
        raise click.ClickException(f"{target} did not answer a flask_torchpool status")
    return body


def _format_status(status: dict[str, Any]) -> str:
    workers = status.get("workers", [])
    models = status.get("models") or {}
    several = len(models) > 1
    lines = [
        f"pool: {_state_word(status)}{' (inline)' if status.get('inline') else ''}   "
        f"queued: {status.get('queued', 0)}   busy workers: {status.get('busy_workers', 0)}/{len(workers)}   "
        f"shared memory: {status.get('arena_bytes', 0) / (1 << 20):.0f} MiB",
    ]
    if status.get("error"):
        lines.append(f"error: {status['error']}")
    counters = status.get("counters") or {}
    if counters:
        lines.append("counters: " + "  ".join(f"{k}={v}" for k, v in counters.items()))
    quantiles = status.get("latency_quantiles") or {}
    if any(v is not None for v in quantiles.values()):
        lines.append("latency: " + _quantiles(quantiles))
    if several:
        for name, model in models.items():
            counts = model.get("counters") or {}
            line = (f"model {name}: {_state_word(model)}   queued: {model.get('queued', 0)}   busy workers: "
                    f"{model.get('busy_workers', 0)}/{len(model.get('workers', []))}   "
                    f"ok: {counts.get('ok', 0)}   errors: {counts.get('errors', 0)}")
            if any(v is not None for v in (model.get("latency_quantiles") or {}).values()):
                line += "   latency: " + _quantiles(model["latency_quantiles"])
            lines.append(line)
    lines.append("")
    headers = ["worker", "pid", "state", "device", "cores", "threads", "inflight", "calls", "errors",
               "restarts"]
    rows = [[w.get("worker"), w.get("pid") or "-", w.get("state"), w.get("device"),
             _ranges(tuple(w.get("cores") or ())), w.get("threads"), w.get("inflight", 0), w.get("calls", 0),
             w.get("errors", 0), w.get("restarts", 0)] for w in workers]
    if any("node_ip" in w for w in workers):  # Ray actors: where Ray placed each, and what it gave it
        headers += ["node", "resources"]
        for w, row in zip(workers, rows):
            resources = ",".join(f"{k}={v:g}" for k, v in sorted((w.get("resources") or {}).items()))
            row += [w.get("node_ip") or "-", resources or "-"]
    if several:
        headers = ["model"] + headers
        rows = [[w.get("model")] + row for w, row in zip(workers, rows)]
    lines.append(_table(headers, rows))
    exits = [f"{w['model'] + ' ' if several else ''}worker {w['worker']}: {w['last_exit']}"
             for w in workers if w.get("last_exit")]
    if exits:
        lines.append("last exits: " + "; ".join(exits))
    return "\n".join(lines)


def _state_word(status: dict[str, Any]) -> str:
    return ("ready" if status.get("ready") else "closed" if status.get("closed")
            else "started, not ready" if status.get("started") else "not started")


def _quantiles(quantiles: dict[str, float | None]) -> str:
    return "  ".join(f"p{float(q) * 100:g}={_ms(v)}" for q, v in quantiles.items() if v is not None)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _is_tensor(value: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(value, torch.Tensor)


def _summary(value: Any) -> str:
    if _is_tensor(value):
        return f"tensor of shape {tuple(value.shape)}, {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@torchpool.command("serve", with_appcontext=False)
@click.option("--socket", "socket_path", metavar="PATH", default=None,
              help="Unix socket to serve on (default: TORCHPOOL_SOCKET, else a private per-user "
                   "directory).")
@click.option("--owner-pid", type=int, default=None, hidden=True, help="Stop when this process exits.")
@click.option("--lock-fd", type=int, default=None, hidden=True, help="The server lock, taken already.")
@click.option("--ready-fd", type=int, default=None, hidden=True, help="Write the socket path here.")
@click.option("--sync-web", is_flag=True, default=False,
              help="The web processes are gunicorn sync workers, one request at a time each: "
                   "TORCHPOOL_WORKER_NICE \"auto\" is then 0 (auto mode and the gunicorn hook say so).")
@click.pass_context
def serve_command(ctx: click.Context, socket_path: str | None, owner_pid: int | None, lock_fd: int | None,
                  ready_fd: int | None, sync_web: bool) -> None:
    """Run the app's pool as a pool server that web processes attach to (TORCHPOOL_MODE = "attach"
    or "auto"). Stops, after draining, on SIGTERM or Ctrl-C."""
    from .attach.rendezvous import exit_now

    # Loading the app (here when `python -m flask_torchpool.server` runs this command) starts nothing:
    # the workers start below, embedded, whatever TORCHPOOL_MODE and TORCHPOOL_START say.
    ctx.meta[SERVING_META] = True
    app = ctx.ensure_object(ScriptInfo).load_app()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # unless the app configured logging
    with app.app_context():
        state = _state()
        state.sync_web_worker = sync_web or state.sync_web_worker
        try:
            state.extension.serve(app, socket_path=socket_path, owner_pid=owner_pid, lock_fd=lock_fd,
                                  ready_fd=ready_fd)
        except TorchPoolError as exc:
            raise click.ClickException(str(exc)) from None
    exit_now(0)
