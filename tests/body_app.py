"""A Flask app with no pool that reads raw float32 bodies with ``tensor_from_stream``: served by real
gunicorn workers in tests/test_bodies.py (Note [Bodies straight from gunicorn's socket])."""

from __future__ import annotations

import torch
from flask import Flask, Response, jsonify, request

from flask_torchpool import InvalidInputError, bodies


def create_app() -> Flask:
    app = Flask(__name__)

    @app.post("/sum")
    def total() -> Response:
        x = bodies.tensor_from_stream(request.stream, torch.float32, (-1,))
        return jsonify(n=x.numel(), sum=float(x.double().sum()), last=float(x[-1]) if x.numel() else None)

    @app.errorhandler(InvalidInputError)
    def bad_body(exc: InvalidInputError) -> tuple[Response, int]:
        return jsonify(error=str(exc)), 400

    return app
