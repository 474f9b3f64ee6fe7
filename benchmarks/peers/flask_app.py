"""The Flask servers of the HTTP benchmark: the model in-process, or in a flask_torchpool pool.

``create_app()`` reads the environment (see ``common``) and::

    BENCH_MODE            "inprocess" (default): the model lives in this process, built at start-up;
                          "torchpool": TorchPool(app) with the TORCHPOOL_* keys of BENCH_TORCHPOOL_CONFIG
    BENCH_TORCHPOOL_CONFIG  a JSON object of TORCHPOOL_* keys (workers, batching, ...)
    BENCH_BODY            "stream" (default): the torchpool mode reads the body with tensor_from_stream;
                          "get_data": with request.get_data() and torch.frombuffer, as before 0.2

Routes: ``POST /predict`` (raw float32 body -> small JSON; the torchpool mode reads it with
``ModelProxy.tensor_from_stream``, the in-process mode with ``request.get_data()``), ``GET /health``
(readiness) and ``GET /ping`` (the light route the benchmark times while ``/predict`` is saturated).
Neither of the last two touches the model or the pool. With BENCH_MODE "torchpool" the config usually
sets ``TORCHPOOL_HEALTH_URL``, whose ``/status`` the benchmark reads for the batch sizes.

    python -m benchmarks.peers.flask_app --port 8000          # werkzeug's threaded dev server
    gunicorn -w 2 -k sync 'benchmarks.peers.flask_app:create_app()'
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import torch
from flask import Flask, Response, request

from benchmarks.peers import common
from benchmarks.peers.numpy_app import add_light_routes


def create_app() -> Flask:
    app = Flask(__name__)
    w = common.workload()
    mode = os.environ.get("BENCH_MODE", "inprocess")
    add_light_routes(app)

    def answer(x_or_error: torch.Tensor | str, status: int = 200) -> Response:
        body = common.encode(x_or_error) if isinstance(x_or_error, torch.Tensor) else json.dumps(
            {"error": x_or_error})
        return Response(body, status=status, mimetype="application/json")

    if mode == "inprocess":
        common.apply_thread_setting()
        model = w.build()

        @app.post("/predict")
        def predict() -> Response:
            try:
                x = common.decode(request.get_data(), w)
            except common.BadRequest as exc:
                return answer(str(exc), 400)
            with torch.inference_mode():
                return answer(model(x))

    elif mode == "torchpool":
        from flask_torchpool import ModelProxy, TorchPool

        app.config.update(TORCHPOOL_MODEL=w.factory, TORCHPOOL_DEVICES="cpu")
        app.config.update(json.loads(os.environ.get("BENCH_TORCHPOOL_CONFIG", "{}")))
        pool = TorchPool(app)
        get_data = os.environ.get("BENCH_BODY", "stream") == "get_data"

        @app.post("/predict")
        @pool.infer
        def predict(model: ModelProxy) -> Response:
            # The documented way to take a raw body (docs/api.rst): read in chunks straight into the
            # tensor, not request.get_data(). A body of the wrong size is a 400 (InvalidInputError).
            if get_data:
                try:
                    x = common.decode(request.get_data(), w)
                except common.BadRequest as exc:
                    return answer(str(exc), 400)
            else:
                x = model.tensor_from_stream(request.stream, torch.float32, (1, *w.sample_shape))
            return answer(model(x))

    else:
        raise ValueError(f"BENCH_MODE={mode!r}: use 'inprocess' or 'torchpool'")
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="serve with werkzeug's threaded development server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # One log line per request would cost every server measured this way the same, and nothing else.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    create_app().run(args.host, args.port, threaded=True, use_reloader=False)


if __name__ == "__main__":
    main()
