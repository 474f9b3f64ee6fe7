"""The example app: a digit classifier behind two prediction endpoints, served by flask_torchpool.

``create_app()`` configures a pool of two CPU workers that each build
``example_app.model:build_classifier`` once at start-up. A request travels like this::

    POST body --decode (Flask thread)--> (N, 1, 28, 28) float32 --model(x)--> worker --> (N, 10)
              \\-- bad input: InvalidInputError, HTTP 400, never reaches a worker

The views only decode, call ``model(images)`` on the proxy that ``@pool.infer`` passes in, and
encode the answer; the pool moves the tensors through shared memory and runs the model in a worker.
A second model, ``"generator"`` (``example_app.generator:build_generator``, one worker), yields text one
character at a time: ``POST /generate`` streams it as server-sent events with ``model.stream(...)``.
Settings can be changed with ``create_app({...})`` or with ``FLASK_``-prefixed environment variables
(``FLASK_TORCHPOOL_WORKERS=1``), read by :meth:`flask.Config.from_prefixed_env`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from flask import Blueprint, Flask, Response, current_app, jsonify, request, stream_with_context
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge
from werkzeug.wrappers import Response as WerkzeugResponse

from example_app.decoding import MAX_BATCH, image_from_bytes, images_from_json
from example_app.generator import encode
from example_app.model import example_input
from flask_torchpool import InvalidInputError, ModelProxy, TorchPool, TorchPoolError

pool = TorchPool()
bp = Blueprint("example", __name__)

DEFAULT_CONFIG: dict[str, Any] = {
    "TORCHPOOL_MODEL": "example_app.model:build_classifier",
    "TORCHPOOL_WORKERS": 2,
    "TORCHPOOL_DEVICES": "cpu",
    "TORCHPOOL_EXAMPLE_INPUT": example_input,
    "TORCHPOOL_MODELS": {"generator": {"model": "example_app.generator:build_generator", "workers": 1,
                                       "example_input": None}},
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
    "POST /generate": {
        "body": 'JSON {"prompt": str (at most 200 characters), "max_new_tokens": 1 to 500 (default 64)}',
        "returns": 'server-sent events: "data: <json string>" per character, then "event: end"',
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


@bp.post("/generate")
@pool.infer("generator")
def generate(model: ModelProxy) -> Response:
    """Stream generated text as server-sent events, one event per character as the model yields it."""
    payload = request.get_json(force=True, silent=True)
    if not isinstance(payload, dict) or not isinstance(payload.get("prompt"), str) \
            or len(payload["prompt"]) > 200:
        raise InvalidInputError('the body must be a JSON object such as {"prompt": "the ", '
                                '"max_new_tokens": 32}, with a prompt of at most 200 characters')
    max_new_tokens = payload.get("max_new_tokens", 64)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or not 1 <= max_new_tokens <= 500:
        raise InvalidInputError(f"max_new_tokens must be an integer from 1 to 500, not {max_new_tokens!r}")
    # Started here, in the view: a bad request or a full pool is still an HTTP error, not an event.
    stream = model.stream(encode(payload["prompt"]), max_new_tokens=max_new_tokens)

    def events() -> Iterator[str]:
        # Closed by the server when the client disconnects: the stream is then dropped, which stops
        # the generator in its worker.
        try:
            for text in stream:
                yield f"data: {json.dumps(text)}\n\n"
        except TorchPoolError as exc:  # the status line is sent already: report it as an event
            yield f"event: error\ndata: {json.dumps({'error': str(exc), 'type': type(exc).__name__})}\n\n"
            return
        yield "event: end\ndata: {}\n\n"

    return Response(stream_with_context(events()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache"})


def _rounded(probabilities: torch.Tensor) -> list[list[float]]:
    return [[round(p, 6) for p in row] for row in probabilities.tolist()]


def _json_error(error: HTTPException) -> WerkzeugResponse:
    response = error.get_response()  # keeps headers such as Allow on a 405
    if isinstance(error, TorchPoolError):  # PayloadTooLargeError: already JSON, with more fields
        return response
    response.set_data(json.dumps({"error": error.description, "type": type(error).__name__}))
    response.content_type = "application/json"
    return response
