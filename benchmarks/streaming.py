"""Streaming (issue 13): time to first chunk and chunks/s through the pool, and cancellation.

    python benchmarks/streaming.py [--tokens N] [--repeat R] [--clients C] [--workers W]

Part 1, in this process, with a one-worker pool (``TORCHPOOL_MODELS``: the example app's character GRU
``example_app.generator:build_generator`` and ``benchmarks.models:chunks_factory``, a generator that only
makes tensors): for each generator, the time from ``model.stream(...)`` to its first chunk and the
chunks per second of a whole stream of N chunks, against the same generator run in this process
(``for chunk in model(...)`` under ``torch.inference_mode()``), medians of R runs measured in the same
run, and their ratio.

Part 2, a real HTTP server (Werkzeug's threaded server in this process, W workers of the character
GRU, ``POST /generate`` streaming server-sent events of a stream that would run for hours): C clients
each read 2 events and disconnect. It prints how long until every stream was cancelled (the pool's
``streams_open`` back to 0 and no worker busy) and the latency of a plain call made right after, and
exits 1 if the workers are not free within 30 s.
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "benchmarks"]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from flask import Flask, Response, stream_with_context  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

from benchmarks.models import chunks_factory  # noqa: E402
from example_app.generator import build_generator, encode  # noqa: E402
from flask_torchpool import TorchPool  # noqa: E402

GRU = "example_app.generator:build_generator"
CHUNKS = "benchmarks.models:chunks_factory"


def _timed(stream: Iterator[Any]) -> tuple[float, float, int]:
    """(seconds to the first chunk, chunks per second over the whole stream, chunks)."""
    start = time.perf_counter()
    first = None
    n = 0
    for _ in stream:
        n += 1
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return first or total, n / total, n


def _local(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Any]:
    with torch.inference_mode():
        yield from model(*args, **kwargs)


def part1(tokens: int, repeat: int) -> None:
    app = Flask("bench-streaming")
    app.config.update(TORCHPOOL_MODELS={"gru": GRU, "chunks": CHUNKS}, TORCHPOOL_WORKERS=1,
                      TORCHPOOL_DEVICES="cpu", TORCHPOOL_HANDLE_SIGTERM=False, TORCHPOOL_THREADS_PER_WORKER=1)
    pool = TorchPool(app)
    torch.set_num_threads(1)
    cases = [("char GRU (str chunks)", "gru", build_generator(), (encode("the "),),
              {"max_new_tokens": tokens}),
             ("tensor chunks, 1 float", "chunks", chunks_factory(), (tokens,), {"size": 1}),
             ("tensor chunks, 64 KiB", "chunks", chunks_factory(), (tokens,), {"size": 16384})]
    print(f"Part 1: one stream of {tokens} chunks at a time, one worker; medians of {repeat} runs\n")
    print(f"{'generator':26} {'path':10} {'first chunk ms':>15} {'chunks/s':>10}")
    try:
        with app.app_context():
            for label, name, local_model, args, kwargs in cases:
                proxy = pool.model(name)
                _timed(proxy.stream(*args, **kwargs))  # warm-up
                _timed(_local(local_model, args, kwargs))
                pooled = [_timed(proxy.stream(*args, **kwargs)) for _ in range(repeat)]
                local = [_timed(_local(local_model, args, kwargs)) for _ in range(repeat)]
                rows = {}
                for path, runs in (("pool", pooled), ("in-process", local)):
                    first = statistics.median(r[0] for r in runs) * 1000
                    rate = statistics.median(r[1] for r in runs)
                    rows[path] = (first, rate)
                    print(f"{label:26} {path:10} {first:15.3f} {rate:10.0f}")
                print(f"{'':26} {'ratio':10} {rows['pool'][0] / rows['in-process'][0]:14.1f}x "
                      f"{rows['pool'][1] / rows['in-process'][1]:9.2f}x")
    finally:
        pool.shutdown(app=app)


def part2(clients: int, workers: int) -> bool:
    app = Flask("bench-streaming-cancel")
    app.config.update(TORCHPOOL_MODEL=GRU, TORCHPOOL_WORKERS=workers, TORCHPOOL_DEVICES="cpu",
                      TORCHPOOL_HANDLE_SIGTERM=False, TORCHPOOL_THREADS_PER_WORKER=1,
                      TORCHPOOL_MAX_QUEUE=max(128, clients))
    pool = TorchPool(app)

    @app.post("/generate")
    @pool.infer
    def generate(model: Any) -> Response:
        stream = model.stream(encode("the "), max_new_tokens=10**9)

        def events() -> Iterator[str]:
            for text in stream:
                yield f"data: {text}\n\n"
        return Response(stream_with_context(events()), mimetype="text/event-stream")

    @app.get("/one")
    @pool.infer
    def one(model: Any) -> Any:
        return {"chunks": len(list(model.stream(encode("a"), max_new_tokens=1)))}

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            seen = b""
            while seen.count(b"data: ") < 2:
                data = sock.recv(4096)
                if not data:
                    return
                seen += data

    ok = True
    try:
        print(f"\nPart 2: {clients} clients, each disconnects after 2 events; {workers} worker(s)")
        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        gone = time.perf_counter()

        def free() -> bool:
            status = pool.status(app)
            return status["metrics"]["streams_open"] == 0 and status["busy_workers"] == 0

        while not free() and time.perf_counter() - gone < 30:
            time.sleep(0.005)
        freed = time.perf_counter()
        ok = free()
        import requests

        before_call = time.perf_counter()
        answer = requests.get(f"http://127.0.0.1:{port}/one", timeout=30)
        call_ms = (time.perf_counter() - before_call) * 1000
        status = pool.status(app)
        print(f"  all {clients} clients got 2 events and left:  {(gone - start) * 1000:8.1f} ms")
        print(f"  every stream cancelled, every worker idle:   {(freed - gone) * 1000:8.1f} ms after the "
              f"last client left ({'yes' if ok else 'NO'})")
        print(f"  a call right after:                          {call_ms:8.1f} ms (HTTP {answer.status_code})")
        metrics = status["metrics"]
        print(f"  streams {metrics['streams']}, cancelled {metrics['calls']['cancelled']}, "
              f"chunks {metrics['stream_chunks']}, workers restarted "
              f"{sum(w['restarts'] for w in status['workers'])}")
    finally:
        server.shutdown()
        pool.shutdown(app=app)
    return ok


def main() -> int:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request would drown the table
    logging.getLogger("flask_torchpool").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    part1(args.tokens, args.repeat)
    return 0 if part2(args.clients, args.workers) else 1


if __name__ == "__main__":
    sys.exit(main())
