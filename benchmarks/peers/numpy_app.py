"""The torch-free web process of the HTTP benchmark: ``numpy`` servers (``attach-numpy``,
``attach-gthread-batch-numpy``, ``torchpool-batch-numpy``) read the body into a numpy array
(``tensor_from_stream`` with a numpy dtype) and pass numpy arrays, so neither the web processes nor
the pool's own process import torch (Note [Arrays without torch] and Note [A pool server without
torch] in ``flask_torchpool/codec.py``).

This module imports neither torch nor ``benchmarks.models``: the harness passes what it needs::

    BENCH_FACTORY          the workload's TORCHPOOL_MODEL ("module:callable")
    BENCH_SAMPLE_SHAPE     one sample's shape, comma-separated (a request is (1, *shape) float32s)
    BENCH_TORCHPOOL_CONFIG a JSON object of TORCHPOOL_* keys

The routes and answers are those of ``benchmarks/peers/flask_app.py``.

    gunicorn -w 2 -k sync 'benchmarks.peers.numpy_app:create_app()'
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flask import Flask, Response, request


def create_app() -> Flask:
    from flask_torchpool import ModelProxy, TorchPool

    shape = tuple(int(d) for d in os.environ["BENCH_SAMPLE_SHAPE"].split(","))
    app = Flask(__name__)
    app.config.update(TORCHPOOL_MODEL=os.environ["BENCH_FACTORY"], TORCHPOOL_DEVICES="cpu")
    app.config.update(json.loads(os.environ.get("BENCH_TORCHPOOL_CONFIG", "{}")))
    pool = TorchPool(app)
    add_light_routes(app)

    @app.post("/predict")
    @pool.infer
    def predict(model: ModelProxy) -> Response:
        # As the torch app reads it (the documented way): in chunks straight into the array, over a
        # shared body buffer for a big body. A body of the wrong size is a 400 (InvalidInputError).
        out = model(model.tensor_from_stream(request.stream, np.float32, (1, *shape)))
        return _answer({"shape": list(out.shape), "head": out.ravel()[:4].tolist()})

    return app


def add_light_routes(app: Flask) -> None:
    """``GET /health`` (readiness) and ``GET /ping`` (the light route): neither touches the model."""

    @app.get("/health")
    def health() -> Response:
        return Response("ok", mimetype="text/plain")

    @app.get("/ping")
    def ping() -> Response:
        return Response("pong", mimetype="text/plain")


def _answer(doc: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(doc), status=status, mimetype="application/json")
