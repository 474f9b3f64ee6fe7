"""The example app: a digit classifier behind two prediction endpoints, served by flask_torchpool.

``create_app()`` configures a pool of two CPU workers that each build
``example_app.model:build_classifier`` once at start-up. A request travels like this::

    POST body --decode (Flask thread)--> (N, 1, 28, 28) float32 --model(x)--> worker --> (N, 10)
              \\-- bad input: InvalidInputError, HTTP 400, never reaches a worker

The views only decode, call ``model(images)`` on the proxy that ``@pool.infer`` passes in, and
encode the answer; the pool moves the tensors through shared memory and runs the model in a worker.
Settings can be changed with ``create_app({...})`` or with ``FLASK_``-prefixed environment variables
(``FLASK_TORCHPOOL_WORKERS=1``), read by :meth:`flask.Config.from_prefixed_env`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge
from werkzeug.wrappers import Response as WerkzeugResponse

from example_app.decoding import MAX_BATCH, image_from_bytes, images_from_json
from example_app.model import example_input
from flask_torchpool import InvalidInputError, ModelProxy, TorchPool, TorchPoolError

pool = TorchPool()
bp = Blueprint("example", __name__)

DEFAULT_CONFIG: dict[str, Any] = {
    "TORCHPOOL_MODEL": "example_app.model:build_classifier",
    "TORCHPOOL_WORKERS": 2,
    "TORCHPOOL_DEVICES": "cpu",
    "TORCHPOOL_EXAMPLE_INPUT": example_input,
    "MAX_CONTENT_LENGTH": 4 * 1024 * 1024,
    "EXAMPLE_MAX_BATCH": MAX_BATCH,
}

_ENDPOINTS = {
    "POST /predict": {
        "body": 'JSON {"inputs": [[784 numbers], ...]} (1 to EXAMPLE_MAX_BATCH rows) '
        'or {"image": [[28 numbers], ... 28 rows]}; 0 = background, 1 = ink',
        "returns": '{"labels": [int, ...], "probabilities": [[10 floats], ...]}',
    },
    "POST /predict/image": {
        "body": "a binary PGM (P5) file of 28 x 28 pixels, or exactly 784 raw grayscale bytes",
        "returns": '{"label": int, "probabilities": [10 floats]}',
    },
    "GET /": {"returns": "this description"},
}


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; its pool starts (and waits for both workers) during this call."""
    app = Flask(__name__)
    app.config.update(DEFAULT_CONFIG)
    app.config.from_prefixed_env()
    if config is not None:
        app.config.update(config)
    app.register_blueprint(bp)
    # JSON for the errors Flask raises itself; the pool's own errors already answer in JSON.
    for error_type in (NotFound, MethodNotAllowed, RequestEntityTooLarge):
        app.register_error_handler(error_type, _json_error)
    pool.init_app(app)
    return app


@bp.get("/")
def index() -> Response:
    """Describe the endpoints and the configured model."""
    return jsonify(model=current_app.config["TORCHPOOL_MODEL"], endpoints=_ENDPOINTS)


@bp.post("/predict")
@pool.infer
def predict(model: ModelProxy) -> Response:
    """Classify a JSON batch: ``{"inputs": [[784 numbers], ...]}`` or ``{"image": 28 x 28}``."""
    payload = request.get_json(force=True, silent=True)
    if payload is None:
        raise InvalidInputError(
            'the body must be a JSON object such as {"inputs": [[784 numbers]]}; '
            "it is empty or not valid JSON"
        )
    images = images_from_json(payload, current_app.config["EXAMPLE_MAX_BATCH"])
    probabilities = model(images)
    return jsonify(
        labels=probabilities.argmax(dim=1).tolist(), probabilities=_rounded(probabilities)
    )


@bp.post("/predict/image")
@pool.infer
def predict_image(model: ModelProxy) -> Response:
    """Classify one 28 x 28 image sent as a binary PGM file or as 784 raw bytes."""
    # Raw bytes whatever the Content-Type: curl --data-binary sends form-urlencoded by default.
    image = image_from_bytes(request.get_data(cache=False))
    probabilities = model(image)
    return jsonify(
        label=int(probabilities.argmax(dim=1)[0]), probabilities=_rounded(probabilities)[0]
    )


def _rounded(probabilities: torch.Tensor) -> list[list[float]]:
    return [[round(p, 6) for p in row] for row in probabilities.tolist()]


def _json_error(error: HTTPException) -> WerkzeugResponse:
    response = error.get_response()  # keeps headers such as Allow on a 405
    if isinstance(error, TorchPoolError):  # PayloadTooLargeError: already JSON, with more fields
        return response
    response.set_data(json.dumps({"error": error.description, "type": type(error).__name__}))
    response.content_type = "application/json"
    return response
