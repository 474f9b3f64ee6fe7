"""The LitServe server of the HTTP benchmark: the same model, decode and answer as the Flask servers.

    python -m benchmarks.peers.litserve_app --port 8000 --workers 2 \\
        [--max-batch-size 32 --batch-timeout 0.002]

``POST /predict`` takes the raw float32 body (``Content-Type: application/octet-stream``; FastAPI hands
``decode_request`` the bytes) and answers the same small JSON; ``GET /health`` is LitServe's own (it
reads the workers' state from LitServe's manager process); ``GET /ping``, added here to LitServe's FastAPI
app, answers at once and touches neither the model nor the manager: the light route the benchmark times.
``--workers`` inference workers (``workers_per_device`` on the CPU), each building the model in ``setup``
with ``BENCH_TORCH_THREADS`` threads; LitServe's default number of API server processes (one per
inference worker) and its default queues.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation as an object to
# build the FastAPI route, and a string would not do.

import argparse
import json
from typing import Annotated, Any

import litserve as ls
import torch
from fastapi import Body
from fastapi.responses import PlainTextResponse

from benchmarks.peers import common

RawBody = Annotated[bytes, Body(media_type="application/octet-stream")]


class ModelAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        common.apply_thread_setting()
        self.workload = common.workload()
        self.model = self.workload.build()

    def decode_request(self, request: RawBody) -> torch.Tensor:
        return common.decode(request, self.workload)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x)

    def encode_response(self, output: torch.Tensor) -> Any:
        return json.loads(common.encode(output))


class BatchedModelAPI(ModelAPI):
    """With ``max_batch_size > 1``: requests are (1, ...) tensors, stacked along dim 0 and split back."""

    def batch(self, inputs: list) -> torch.Tensor:
        return torch.cat(inputs)

    def unbatch(self, output: torch.Tensor) -> list:
        return list(output.split(1))


async def ping() -> PlainTextResponse:
    return PlainTextResponse("pong")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout", type=float, default=0.0, help="seconds")
    parser.add_argument("--fast-queue", action="store_true", help="LitServe's ZeroMQ queues")
    args = parser.parse_args()
    api_class = BatchedModelAPI if args.max_batch_size > 1 else ModelAPI
    api = api_class(max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=120,
                          fast_queue=args.fast_queue)
    # LitServe forks its API server processes from this one: a route added here is in all of them.
    server.app.add_api_route("/ping", ping, methods=["GET"])
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
