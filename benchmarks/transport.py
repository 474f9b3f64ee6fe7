"""Round-trip time of an identity call through flask_torchpool, against the usual ways to do it.

    python benchmarks/transport.py [--quick] [--repeat N] [--sizes 4,4K,192K,16M,64M]
                                   [--threads N] [--baselines-only]

For each size (a float32 tensor of that many bytes; 4 B is one float) it times, with
``time.perf_counter_ns``, calls that send the tensor to one worker process and get it back::

    pool          TorchPool(app), one CPU worker running torch.nn.Identity: pool(x)
    ProcessPool   concurrent.futures.ProcessPoolExecutor(1, spawn): submit(identity, x).result()
    tmp queue     a torch.multiprocessing (spawn) worker moving x from one Queue to another
                  (tensors travel by torch's default file_descriptor sharing strategy)

and, in the same run, two floors no transport can beat: the ping-pong of one byte with a child
process over an ``os.pipe`` pair (and over a socketpair, what the pool's headers use), and
``dst.copy_(x)`` into a preallocated tensor of the same size, on one thread (one memcpy; torch's
parallel copy waits for its slowest thread, which on a busy machine is no floor). It prints the
medians, checks each path's answer once per size, and says whether the targets hold: at 4 KiB the
pool within 3x of the pipe ping-pong (the ratio is printed), at 16 MiB the pool at least 3x faster
than both baselines, and at 4 KiB the pool's CPU per call (every process) at most 300 us.

Note [CPU per call]: beside each round trip it reports the CPU one call costs, all processes
together: this process (every thread: the pool's manager and reader threads, the executor's, the
queue's feeder) and every process below it (the path's worker, multiprocessing's resource tracker),
from just before the timed loop to just after it, over the calls of the loop. That is ``utime +
stime``, read with nanosecond resolution from each process's CPU clock (``clock_gettime`` of
``CLOCK_PROCESS_CPUTIME_ID`` here, of the process CPU clock of each child's pid; ``/proc/PID/stat``
ticks where that clock cannot be read). The loop also clones each call's input (Note [fresh inputs]):
the same loop without the calls is timed too, and its CPU taken off. The ping-pong floors report their
CPU per round trip the same way (both processes).

Note [fresh inputs]: torch's reducers move a CPU tensor's storage into shared memory *in place* the
first time it is pickled, and only pass a file descriptor afterwards. Sending one tensor over and
over would time fd passing, not moving data. A request carries a tensor just decoded in the Flask
thread, so every timed call on every path sends a fresh clone, made outside the timed region.

Every child process is shut down in ``finally`` blocks, and the script checks at the end that none
is left.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as torch_mp

REPO_ROOT = Path(__file__).resolve().parent.parent
# `python benchmarks/transport.py` puts benchmarks/ first on sys.path, not the repository root that
# `benchmarks.models` and `flask_torchpool` are found from; spawned children inherit this list.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
DEFAULT_SIZES = (4, 4 * KIB, 192 * KIB, 16 * MIB, 64 * MIB)
SMALL_SIZE_LIMIT = 192 * KIB  # the pool/pipe ratio is printed up to this size
TARGET_LATENCY_SIZE, TARGET_LATENCY_RATIO = 4 * KIB, 3.0
TARGET_CPU_SIZE, TARGET_CPU_US = 4 * KIB, 300.0  # the performance issue: pool-path CPU per call
TARGET_SPEEDUP_SIZE, TARGET_SPEEDUP = 16 * MIB, 3.0
CHILD_STOP_TIMEOUT = 10.0
_UNITS = {"": 1, "b": 1, "k": KIB, "kib": KIB, "m": MIB, "mib": MIB, "g": GIB, "gib": GIB}

# Runs in a bare interpreter: echo single bytes from one fd to another until EOF.
_ECHO_CHILD = """
import os, sys
src, dst = int(sys.argv[1]), int(sys.argv[2])
while True:
    byte = os.read(src, 1)
    if not byte:
        break
    os.write(dst, byte)
"""

Call = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """How many calls to time per path and size, from the command line."""

    repeat: int  # timed calls for small sizes
    byte_budget: int  # fewer calls for big sizes: at most this many payload bytes per cell
    min_repeat: int
    max_seconds: float  # stop a cell early past this, once min_repeat calls are timed
    floor_repeat: int
    settle_seconds: float  # untimed calls to a freshly opened path before its first size

    def calls(self, size: int) -> int:
        """Timed calls for one size."""
        return max(min(self.min_repeat, self.repeat), min(self.repeat, self.byte_budget // size))

    def warmup(self, size: int) -> int:
        """Untimed calls before timing one size."""
        return max(2, self.calls(size) // 10)


@dataclass(frozen=True)
class Timing:
    """The timed calls of one path at one size."""

    median_us: float
    calls: int
    correct: bool
    cpu_us: float  # CPU per call, every process (Note [CPU per call])


@dataclass(frozen=True)
class Floor:
    """One ping-pong floor: the median round trip and the CPU of a round trip (both processes)."""

    median_us: float
    cpu_us: float


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status is 1 if a path returned a wrong tensor."""
    args = _parse_args(argv)
    settings = Settings(
        repeat=args.repeat if args.repeat is not None else (30 if args.quick else 200),
        byte_budget=256 * MIB if args.quick else 2048 * MIB,
        min_repeat=3 if args.quick else 7,
        max_seconds=3.0 if args.quick else 20.0,
        floor_repeat=300 if args.quick else 3000,
        settle_seconds=0.5 if args.quick else 2.0,
    )
    if not args.baselines_only:
        try:
            import flask_torchpool  # noqa: F401
        except ImportError as exc:
            print(
                f"flask_torchpool cannot be imported ({exc}); install it with `pip install -e .` "
                "or measure the baselines alone with --baselines-only",
                file=sys.stderr,
            )
            return 2
    # For a pool that launches its workers other than by multiprocessing's spawn.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
    )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _print_environment(args.sizes, settings)

    templates = {size: torch.randn(size // 4) for size in args.sizes}
    try:
        floors_before = _ping_pongs(settings)
        memcpy = {size: _memcpy_us(x, settings) for size, x in templates.items()}
        paths: dict[str, Callable[[int], contextlib.AbstractContextManager[Call]]] = {}
        if not args.baselines_only:
            paths["pool"] = _pool_path
        paths["ProcessPool"] = _process_pool_path
        paths["tmp queue"] = _torch_queue_path
        results: dict[str, dict[int, Timing]] = {}
        for name, open_path in paths.items():
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            with open_path(max(args.sizes)) as call:
                _settle(call, templates[min(args.sizes)], settings)
                results[name] = {
                    size: _time_calls(call, x, settings) for size, x in templates.items()
                }
        floors_after = _ping_pongs(settings)
    finally:
        leftovers = _reap_children()
    _print_report(args.sizes, (floors_before, floors_after), memcpy, results, settings)
    if leftovers:
        print(f"\nWARNING: child processes left running, terminated now: {leftovers}")
    else:
        print("\nchild processes left running: none")
    return 0 if all(t.correct for by_size in results.values() for t in by_size.values()) else 1


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=DEFAULT_SIZES,
        help="comma-separated tensor sizes in bytes, multiples of 4, with an optional unit "
        "B, K(iB), M(iB), G(iB) (default: 4,4K,192K,16M,64M)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="timed calls per path for small sizes; big sizes get fewer (default 200, quick 30)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer calls: a rough run in seconds")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads in this (the calling) process; default: torch's default",
    )
    parser.add_argument(
        "--baselines-only",
        action="store_true",
        help="skip flask_torchpool: measure the floors and the baselines alone",
    )
    args = parser.parse_args(argv)
    for option in ("repeat", "threads"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    return args


def _parse_sizes(text: str) -> tuple[int, ...]:
    sizes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", item)
        unit = match and _UNITS.get(match.group(2).lower())
        if not match or unit is None:
            raise argparse.ArgumentTypeError(f"{item!r} is not a size such as 4, 4K, 192KiB, 16M")
        size = int(match.group(1)) * unit
        if size <= 0 or size % 4:
            raise argparse.ArgumentTypeError(f"{item!r} is not a positive multiple of 4 bytes")
        sizes.append(size)
    return tuple(sorted(set(sizes)))


# -- the paths -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _pool_path(max_size: int) -> Iterator[Call]:
    from flask import Flask

    from flask_torchpool import TorchPool

    app = Flask(__name__)
    app.config.update(
        TORCHPOOL_MODEL="benchmarks.models:identity_factory",
        TORCHPOOL_WORKERS=1,
        TORCHPOOL_DEVICES="cpu",
        # Half the arena holds inputs, half outputs: room for the largest tensor both ways, twice.
        TORCHPOOL_ARENA_BYTES=max(256 * MIB, 4 * max_size),
        TORCHPOOL_MAX_INPUT_BYTES=max(256 * MIB, max_size),
    )
    pool = TorchPool()
    try:
        pool.init_app(app)  # starts the worker and waits for its model
        with app.app_context():
            yield pool
    finally:
        pool.shutdown()


@contextlib.contextmanager
def _process_pool_path(max_size: int) -> Iterator[Call]:
    from benchmarks.models import identity

    executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield lambda x: executor.submit(identity, x).result()
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _torch_queue_path(max_size: int) -> Iterator[Call]:
    from benchmarks.models import echo_queue

    context = torch_mp.get_context("spawn")
    inbox, outbox = context.Queue(), context.Queue()
    worker = context.Process(target=echo_queue, args=(inbox, outbox), daemon=True)
    worker.start()

    def call(x: torch.Tensor) -> torch.Tensor:
        inbox.put(x)
        return outbox.get()

    try:
        yield call
    finally:
        if worker.is_alive():
            inbox.put(None)
        _stop_process(worker)
        for queue in (inbox, outbox):
            queue.close()
            queue.cancel_join_thread()  # the worker is gone: nothing will drain these pipes


def _stop_process(process: multiprocessing.process.BaseProcess) -> None:
    process.join(CHILD_STOP_TIMEOUT)
    if process.is_alive():
        process.terminate()
        process.join(CHILD_STOP_TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join()


# -- timing ----------------------------------------------------------------------------------------


def _time_calls(call: Call, template: torch.Tensor, settings: Settings) -> Timing:
    size = template.numel() * template.element_size()
    first = call(template.clone())
    second = call(template.neg())
    # Also catches a result that lives in a buffer the next call overwrites.
    correct = torch.equal(first, template) and torch.equal(second, template.neg())
    # Results are the caller's to keep, but kept ones hold arena space (zero-copy outputs): the timed
    # loop below keeps none, as a server that answers and drops its tensors.
    del first, second
    for _ in range(settings.warmup(size)):
        call(template.clone())
    durations = []
    deadline = time.perf_counter() + settings.max_seconds
    cpu = _CpuMeter()  # see Note [CPU per call]
    for _ in range(settings.calls(size)):
        x = template.clone()  # see Note [fresh inputs]
        start = time.perf_counter_ns()
        y = call(x)
        durations.append(time.perf_counter_ns() - start)
        del x, y  # freeing the answer is the caller's business, after the call
        if len(durations) >= settings.min_repeat and time.perf_counter() > deadline:
            break
    cpu_s = cpu.seconds() - _loop_cpu_s(template, len(durations))
    return Timing(statistics.median(durations) / 1000, len(durations), correct,
                  max(0.0, cpu_s) / len(durations) * 1e6)


def _settle(call: Call, template: torch.Tensor, settings: Settings) -> None:
    """Call a freshly opened path for a while before timing it: a new worker spends its first hundred
    or so calls much more CPU (about 1 ms a call more in development runs: first uses of torch and the
    interpreter warming up), which would land in the CPU of the first size measured."""
    end = time.perf_counter() + settings.settle_seconds
    calls = 0
    while calls < 200 or time.perf_counter() < end:
        call(template.clone())
        calls += 1
        if time.perf_counter() > end + settings.max_seconds:  # a slow path: enough
            break


def _loop_cpu_s(template: torch.Tensor, calls: int) -> float:
    """CPU of the timed loop of :func:`_time_calls` without the calls: the clones, the clock reads,
    the list (this process only: nothing else works for it)."""
    cpu = _CpuMeter(children=False)
    durations = []
    for _ in range(calls):
        x = template.clone()
        start = time.perf_counter_ns()
        durations.append(time.perf_counter_ns() - start)
        del x
        time.perf_counter()  # the timed loop's deadline check
    return cpu.seconds()


class _CpuMeter:
    """CPU seconds of this process and (unless ``children=False``) every process below it, from its
    creation to :meth:`seconds` (Note [CPU per call])."""

    def __init__(self, children: bool = True) -> None:
        self.pids = _descendants() if children else []
        self.start = self._now()

    def _now(self) -> float:
        return time.process_time() + sum(_process_cpu_s(pid) for pid in self.pids)

    def seconds(self) -> float:
        return self._now() - self.start


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread, ended ones too) of process *pid* so far; 0 once it is
    gone."""
    try:
        # The process-wide CPU clock of another process: MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED) of
        # Linux's posix-timers.h, as clock_getcpuclockid(3) returns it.
        return time.clock_gettime((~pid << 3) | 2)
    except OSError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime (stat fields 14, 15)


def _descendants() -> list[int]:
    """Every live process below this one (children, theirs, ...)."""
    found: list[int] = []
    todo = _child_pids()
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(_child_pids(pid))
    return found


def _memcpy_us(template: torch.Tensor, settings: Settings) -> float:
    size = template.numel() * template.element_size()
    target = torch.empty_like(template)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(settings.warmup(size)):
            target.copy_(template)  # also faults the target's pages in
        durations = []
        for _ in range(settings.calls(size)):
            start = time.perf_counter_ns()
            target.copy_(template)
            durations.append(time.perf_counter_ns() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(durations) / 1000


def _ping_pongs(settings: Settings) -> dict[str, Floor]:
    return {
        "pipe": _ping_pong(socketpair=False, calls=settings.floor_repeat),
        "socketpair": _ping_pong(socketpair=True, calls=settings.floor_repeat),
    }


def _ping_pong(*, socketpair: bool, calls: int) -> Floor:
    """Median round trip of one byte with an echoing child over a socketpair or two os.pipes, and the
    CPU of one round trip, both processes together."""
    if socketpair:
        ours, theirs = (end.detach() for end in socket.socketpair())
        our_fds, their_fds = (ours, ours), (theirs, theirs)
    else:
        (their_read, our_write), (our_read, their_write) = os.pipe(), os.pipe()
        our_fds, their_fds = (our_read, our_write), (their_read, their_write)
    child = None
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", _ECHO_CHILD, *map(str, their_fds)], pass_fds=their_fds
        )
        for fd in set(their_fds):
            os.close(fd)
        durations = []
        cpu_start = 0.0
        for i in range(calls + calls // 10):
            if i == calls // 10:  # the first tenth warms up
                cpu_start = time.process_time() + _process_cpu_s(child.pid)
            start = time.perf_counter_ns()
            os.write(our_fds[1], b"x")
            if os.read(our_fds[0], 1) != b"x":
                raise RuntimeError("the echo child answered something else than the byte sent")
            if i >= calls // 10:
                durations.append(time.perf_counter_ns() - start)
        cpu_s = time.process_time() + _process_cpu_s(child.pid) - cpu_start
    finally:
        for fd in set(our_fds) | (set(their_fds) if child is None else set()):
            os.close(fd)  # EOF: the child's loop ends
        if child is not None:
            try:
                child.wait(CHILD_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return Floor(statistics.median(durations) / 1000, cpu_s / len(durations) * 1e6)


def _reap_children() -> list[int]:
    """Terminate and list the children still running, but multiprocessing's resource tracker.

    The tracker is meant to outlive every pool and exits when this process does.
    """
    leftovers = []
    for pid in _child_pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if _alive(pid) else b""
        if cmdline and b"resource_tracker" not in cmdline:
            leftovers.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    return leftovers


def _child_pids(pid: int | str = "self") -> list[int]:
    pids: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids.extend(int(pid) for pid in children.read_text().split())
    return pids


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- the report ------------------------------------------------------------------------------------


def _print_environment(sizes: Sequence[int], settings: Settings) -> None:
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, torch threads here {torch.get_num_threads()}, "
        f"sharing strategy {torch_mp.get_sharing_strategy()}, {platform.platform()}"
    )
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    calls = ", ".join(f"{_format_size(s)}: {settings.calls(s)}" for s in sizes)
    print(f"timed calls per path (after warm-up, median reported): {calls}")


def _print_report(
    sizes: Sequence[int],
    floors: tuple[dict[str, Floor], dict[str, Floor]],
    memcpy: dict[int, float],
    results: dict[str, dict[int, Timing]],
    settings: Settings,
) -> None:
    # Measured before and after the paths; the lower one is what the OS can do on this machine.
    pipe_floor = min((floor["pipe"] for floor in floors), key=lambda f: f.median_us)
    pipe = pipe_floor.median_us
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for when, floor in zip(("before", "after"), floors):
        print(
            f"floors {when}: 1-byte ping-pong over os.pipe {floor['pipe'].median_us:.1f} us "
            f"(CPU {floor['pipe'].cpu_us:.1f} us), over a socketpair {floor['socketpair'].median_us:.1f} us "
            f"(CPU {floor['socketpair'].cpu_us:.1f} us) (medians; CPU per round trip, both processes)"
        )
    header = (
        "size",
        "pool us",
        "pool CPU us",
        "ProcessPool us",
        "ProcessPool CPU us",
        "tmp queue us",
        "tmp queue CPU us",
        "memcpy us",
        "memcpy GB/s",
        "pool/pipe",
        "vs ProcessPool",
        "vs tmp queue",
    )
    rows = []
    for size in sizes:
        pool = _median(results, "pool", size)
        process_pool = _median(results, "ProcessPool", size)
        queue = _median(results, "tmp queue", size)
        rows.append(
            (
                _format_size(size),
                _format_us(pool),
                _format_us(_cpu(results, "pool", size)),
                _format_us(process_pool),
                _format_us(_cpu(results, "ProcessPool", size)),
                _format_us(queue),
                _format_us(_cpu(results, "tmp queue", size)),
                _format_us(memcpy[size]),
                f"{size / memcpy[size] / 1000:.1f}",
                _format_ratio(pool, pipe) if size <= SMALL_SIZE_LIMIT else "-",
                _format_ratio(process_pool, pool),
                _format_ratio(queue, pool),
            )
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print(" | ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    print(
        "(pool/pipe: pool time over the lower os.pipe ping-pong; vs X: X time over pool time; "
        "memcpy: one thread; X CPU: CPU time per call of this process and every process below it, "
        "the loop's own clones taken off)"
    )

    wrong = [
        f"{name} at {_format_size(size)}"
        for name, by_size in results.items()
        for size, timing in by_size.items()
        if not timing.correct
    ]
    print(f"correctness (torch.equal, twice per path and size): {'; '.join(wrong) or 'all equal'}")
    cut = [
        f"{name} at {_format_size(size)} ({timing.calls} calls)"
        for name, by_size in results.items()
        for size, timing in by_size.items()
        if timing.calls < settings.calls(size)
    ]
    if cut:
        print(f"cut short by the {settings.max_seconds:g} s cap per cell: {'; '.join(cut)}")
    print()
    print("targets:")
    pool_small = _median(results, "pool", TARGET_LATENCY_SIZE)
    label = (
        f"pool at {_format_size(TARGET_LATENCY_SIZE)} within {TARGET_LATENCY_RATIO:g}x of the "
        "pipe ping-pong"
    )
    if pool_small is None:
        print(f"  {label}: not measured")
    else:
        ratio = pool_small / pipe
        verdict = "HOLDS" if ratio <= TARGET_LATENCY_RATIO else "MISSED"
        print(f"  {label}: {pool_small:.1f} us / {pipe:.1f} us = {ratio:.2f}x -> {verdict}")
    pool_cpu = _cpu(results, "pool", TARGET_CPU_SIZE)
    label = (
        f"pool CPU per call at {_format_size(TARGET_CPU_SIZE)} (every process) at most "
        f"{TARGET_CPU_US:g} us"
    )
    if pool_cpu is None:
        print(f"  {label}: not measured")
    else:
        verdict = "HOLDS" if pool_cpu <= TARGET_CPU_US else "MISSED"
        print(
            f"  {label}: {pool_cpu:.1f} us ({pool_cpu / pipe_floor.cpu_us:.1f}x the pipe ping-pong's "
            f"{pipe_floor.cpu_us:.1f} us) -> {verdict}"
        )
    pool_big = _median(results, "pool", TARGET_SPEEDUP_SIZE)
    baselines = [
        (name, _median(results, name, TARGET_SPEEDUP_SIZE)) for name in ("ProcessPool", "tmp queue")
    ]
    label = (
        f"pool at {_format_size(TARGET_SPEEDUP_SIZE)} at least {TARGET_SPEEDUP:g}x faster than "
        "both baselines"
    )
    if pool_big is None or any(us is None for _, us in baselines):
        print(f"  {label}: not measured")
    else:
        speedups = [(name, us / pool_big) for name, us in baselines if us is not None]
        verdict = "HOLDS" if all(s >= TARGET_SPEEDUP for _, s in speedups) else "MISSED"
        detail = ", ".join(f"{s:.2f}x vs {name}" for name, s in speedups)
        print(f"  {label}: {detail} -> {verdict}")


def _median(results: dict[str, dict[int, Timing]], name: str, size: int) -> float | None:
    timing = results.get(name, {}).get(size)
    return timing.median_us if timing is not None else None


def _cpu(results: dict[str, dict[int, Timing]], name: str, size: int) -> float | None:
    timing = results.get(name, {}).get(size)
    return timing.cpu_us if timing is not None else None


def _format_size(size: int) -> str:
    for unit, scale in (("MiB", MIB), ("KiB", KIB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _format_us(us: float | None) -> str:
    return "-" if us is None else f"{us:,.1f}"


def _format_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
