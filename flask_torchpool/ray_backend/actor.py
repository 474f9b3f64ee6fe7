"""The model actor: what runs on a Ray worker for each of a model's workers.

:class:`ModelActor` is a plain class; :mod:`flask_torchpool.ray_backend.pool` makes it a Ray actor with the
model's ``TORCHPOOL_RAY_ACTOR_OPTIONS`` (one call at a time, never restarted by Ray). :meth:`~ModelActor.load`
builds the model with the workers' recipes (:func:`flask_torchpool.worker.load_model`) after setting torch's
threads to the CPUs Ray assigned the actor and choosing the GPU Ray gave it, if any. :meth:`~ModelActor.run`
runs one job (a call, or a batch whose members' tensors it concatenates along dim 0) under
``torch.inference_mode()`` and answers builtins and CPU tensors only: the failures its caller gets travel as
:class:`~flask_torchpool.errors.WireError` tuples, never as pickled exceptions.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch

from .. import codec
from ..config import WORKER_ENV
from ..errors import InferenceError, InvalidInputError, OutputError, RemoteTraceback, to_wire
from ..worker import close_iterator, load_model

#: What :meth:`ModelActor.run` answers: ("ok", output skeleton, output tensors) or ("error", WireError).
Reply = tuple[Any, ...]


class ModelActor:
    """One worker of a model, as a Ray actor."""

    def __init__(self, pool_name: str, index: int) -> None:
        os.environ[WORKER_ENV] = f"{pool_name} worker {index} (Ray actor)"
        self.index = index
        self.model: Any = None
        self.device = torch.device("cpu")

    def load(self, spec: Any, threads: int | None) -> Reply:
        """Pin torch's threads, build the model; ("ready", info) or ("failed", message, traceback)."""
        import ray  # only ever imported on a Ray worker, where it is

        context = ray.get_runtime_context()
        assigned = context.get_assigned_resources()  # type: ignore[no-untyped-call]
        resources = {k: float(v) for k, v in assigned.items()}
        threads = threads or max(1, int(resources.get("CPU", 1)))
        try:
            torch.set_num_threads(threads)
            try:
                torch.set_num_interop_threads(1)
            except RuntimeError:  # the inter-op pool already started
                pass
            device = "cpu"
            if ray.get_gpu_ids() and torch.cuda.is_available():
                device = "cuda:0"  # Ray sets CUDA_VISIBLE_DEVICES to the GPU(s) it assigned
                torch.cuda.set_device(0)
            self.model = load_model(spec, device)
            self.device = torch.device(device)
        except BaseException as exc:
            return ("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc())
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        node_ip = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        return ("ready", {"pid": os.getpid(), "node_id": context.get_node_id(), "node_ip": node_ip,
                          "actor_id": context.get_actor_id(), "device": device,
                          "threads": torch.get_num_threads(), "cores": cores, "resources": resources})

    def ping(self) -> int:
        return os.getpid()

    def run(self, args: Any, kwargs: Any, parts: list[list[torch.Tensor]],
            method: str | None = None, padded: int = 0) -> Reply:
        """Run one job: *parts* holds each member's tensors (one member: a plain call); *method*: the
        model's method to run (None: the model itself); *padded*: copies of the last row to add to a
        batch (Note [Batch buckets])."""
        try:
            tensors = []
            for i in range(len(parts[0])):
                rows = [member[i] for member in parts]
                if padded:
                    last = rows[-1][-1:]
                    rows.append(last.expand(padded, *last.shape[1:]))
                tensors.append(rows[0] if len(rows) == 1 else torch.cat(rows))
            if self.device.type != "cpu":
                tensors = [t.to(self.device, non_blocking=True) for t in tensors]
            args = codec.unflatten(args, tensors)
            kwargs = codec.unflatten(kwargs, tensors)
        except Exception as exc:
            err = InvalidInputError(f"the actor could not read the inputs: {type(exc).__name__}: {exc}")
            err.__cause__ = RemoteTraceback(traceback.format_exc())
            return ("error", tuple(to_wire(err)))
        target = self.model if method is None else getattr(self.model, method, None)
        if target is None or not callable(target):
            missing = InferenceError(f"the model ({type(self.model).__qualname__}) has no method {method!r}")
            return ("error", tuple(to_wire(missing)))
        try:
            with torch.inference_mode():
                out = target(*args, **kwargs)
        except Exception as exc:
            return ("error", tuple(to_wire(InferenceError.model_raised(type(exc).__name__, str(exc),
                                                                       traceback.format_exc()))))
        del args, kwargs, tensors
        if isinstance(out, Iterator):
            close_iterator(out)
            yields = OutputError(f"the model returned {codec.describe(out)}: it yields its outputs one by "
                                 "one; model.stream(...) would iterate them, but the Ray backend does not "
                                 "stream (use the process backend for this model)", remote_type="Iterator")
            return ("error", tuple(to_wire(yields)))
        produced: list[torch.Tensor] = []
        try:
            skel = codec.flatten(out, produced, "output")
        except codec.UnsupportedValue as exc:
            unsupported = OutputError(f"the model returned {codec.describe(out)}, which cannot travel back: "
                                      f"{exc}", remote_type="UnsupportedValue")
            return ("error", tuple(to_wire(unsupported)))
        # Plain CPU tensors (not inference tensors, not views of a larger storage): pickling a view sends
        # its whole storage.
        return ("ok", skel, [t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                             for t in produced])
