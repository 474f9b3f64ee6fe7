"""The Ray backend (``TORCHPOOL_BACKEND = "ray"``): a model's workers are Ray actors, anywhere in a cluster.

:class:`RayPool` implements :class:`~flask_torchpool.backend.Backend` with the process pool's scheduler
(:class:`flask_torchpool.batching.Scheduler`), so batching, the queue limit, deadlines, retries, drain and
shutdown mean what they mean there and raise the same errors. What differs is where a job runs: on a
:class:`~flask_torchpool.ray_backend.actor.ModelActor` that Ray placed (``TORCHPOOL_RAY_ACTOR_OPTIONS``), its
tensors carried by Ray's object store instead of this host's shared memory. Ray is imported here only when
a RayPool starts (:mod:`flask_torchpool.ray_backend.cluster`), so the package imports without Ray.
"""

from __future__ import annotations

from .pool import RayPool, plan

__all__ = ["RayPool", "plan"]
