"""A pool's model versions: the version serving, the reload in progress and each generation's shared
weights (Note [Rolling reload] in :mod:`flask_torchpool.reload`); and the version record of a model."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, Callable

from . import messages
from .backend import Backend
from .batching import Scheduler
from .config import ModelConfig, PinnedFile, replace_model
from .errors import ReloadError, TorchPoolError
from .reload import Reload
from .status import ModelVersion, WorkerState
from .weights import SharedWeights
from .workers import WorkerSet, WorkerSlot

log = logging.getLogger(__name__)


class Versions:
    """One pool's model versions. :meth:`reload` runs in the caller's thread; everything else in the
    pool's manager thread (:meth:`shared_bytes` and :meth:`status` from any thread)."""

    def __init__(self, name: str, config: ModelConfig, workers: WorkerSet, sched: Scheduler[WorkerSlot],
                 wake: Callable[[], None], adopt: Callable[[ModelConfig], None]) -> None:
        self.name = name
        self._workers = workers
        self._sched = sched
        self._wake = wake
        self._adopt = adopt   # the pool takes a new version's configuration
        #: The version serving (generation 1 at start).
        self.version = model_version(config, 1)
        #: The reload (or rollback) in progress.
        self.current: Reload | None = None
        self._lock = threading.Lock()   # taken before the pool's lock, never after
        self._outcomes = {"ok": 0, "failed": 0}
        self._generations = 1
        self._weights: dict[int, SharedWeights] = {}
        self._owner_pid = os.getpid()
        self._manager: int | None = None   # the manager thread's ident, once it stepped a reload

    def status(self) -> dict[str, Any]:
        """The ``version``, ``reloading`` and ``reloads`` status keys."""
        return {"version": self.version, "reloading": self.current is not None,
                "reloads": dict(self._outcomes)}

    # --- shared weights, one segment per generation ------------------------------------------------------

    def weights_of(self, slot: WorkerSlot) -> SharedWeights:
        weights = self._weights.get(slot.generation)
        if weights is None:
            weights = self._weights[slot.generation] = SharedWeights(self.name)
        return weights

    @property
    def shared_bytes(self) -> int:
        return sum(w.shared_bytes for w in list(self._weights.values()))

    def close(self) -> None:
        for weights in self._weights.values():
            weights.close()

    # --- reloading ---------------------------------------------------------------------------------------

    def reload(self, config: ModelConfig, model: Any, label: str | None,
               serving: Callable[[], bool]) -> ModelVersion:
        """Have the manager thread reload *config* (with *model*, when given) and wait for the outcome.
        Refuses (:class:`ReloadError`) while another one runs or the pool is not serving."""
        if os.getpid() != self._owner_pid or threading.get_ident() == self._manager:
            raise ReloadError(f"{self.name}: reload() from a worker's fork or the manager thread is not "
                              "possible; call it from the process and a thread that serve the pool")
        new = new_config(config, model)
        if label is None and model is None:
            label = config.model_version
        with self._lock:
            if self.current is not None:
                raise ReloadError(
                    f"{self.name}: a reload to version {self.current.generation} is in progress; try again "
                    "when it has finished (reloads are not queued)", config.name, self.current.generation,
                    "another reload is in progress")
            generation = self._generations + 1
            if not serving():
                raise ReloadError(f"{self.name}: the pool is not serving (not started, or shut down); "
                                  "nothing to reload", config.name, generation, "not serving")
            self._generations = generation
            self.current = Reload(name=self.name, config=new, version=model_version(new, generation, label),
                                  workers=self._workers, sched=self._sched, old_config=config,
                                  old_version=self.version, wake=self._wake)
            future = self.current.future
        self._wake()
        return future.result()

    def on_death(self, slot: WorkerSlot) -> None:
        """Under the pool's lock, *slot*'s process reaped: when it is the reload's to forget rather than
        respawn (an old worker, a new one it gave up), it is STOPPED and leaves the slots."""
        if self.current is not None and self.current.on_death(slot):
            log.info("%s: worker %d (pid %s, generation %d) stopped for the reload: %s", self.name,
                     slot.index, slot.pid, slot.generation, slot.last_exit)
            slot.state = WorkerState.STOPPED
            self._workers.remove_slot(slot)

    def next_timer(self) -> float | None:
        return self.current.next_timer() if self.current is not None else None

    def step(self, closing: bool) -> None:
        """In the manager thread: advance the reload; at its end, adopt or drop the new version (then
        the caller of :meth:`reload` gets the outcome)."""
        self._manager = threading.get_ident()
        reload = self.current
        if reload is None:
            return
        finished, rollback = reload.step(closing)
        if rollback is not None:
            with self._lock:
                self.current = rollback
            self._wake()
            return
        if not finished:
            return
        ok = not isinstance(reload.outcome, BaseException)
        with self._lock, self._sched.lock:
            if ok:
                self.version = reload.version
            self._outcomes["ok" if ok else "failed"] += 1
            self.current = None
            live = {w.generation for w in self._workers.slots}
            for generation in set(self._weights) - live:
                self._weights.pop(generation).close()   # freed with the last worker that mapped it
        if not closing:
            self._workers.stop_unused_fork_servers()
        if ok:
            self._workers.config = reload.config
            self._adopt(reload.config)
        reload.resolve()


def model_version(config: ModelConfig, generation: int, version: str | None = None) -> ModelVersion:
    """The version record of *config*'s model: for a model file, its SHA-256 and mtime as read now."""
    spec = config.spec
    path = spec.path if isinstance(spec, PinnedFile) else spec if isinstance(spec, str) and (
        ":" not in spec) else None
    sha256 = mtime = None
    if path is not None:
        try:
            mtime = os.stat(path).st_mtime
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            sha256 = digest.hexdigest()
        except OSError:
            pass  # the worker's load reports it, naming the file
    return ModelVersion(generation=generation, model=_describe(config.model), sha256=sha256, mtime=mtime,
                        version=version if version is not None else config.model_version)


def reload_models(pools: Mapping[str, Backend], names: list[str], model: Any = None,
                  version: str | None = None) -> dict[str, ModelVersion]:
    """Reload models *names* (one after the other) of started *pools*; see :meth:`TorchPool.reload`.
    A model that fails stops the sequence: those before it keep their new version."""
    done: dict[str, ModelVersion] = {}
    for name in names:
        backend = pools.get(name)
        if backend is None or not backend.started or backend.closed:
            raise ReloadError(f"model {name!r} is not serving (not started yet, or shut down); start it "
                              "first" + _reloaded(done), name, None, "not serving")
        reload = getattr(backend, "reload", None)
        if reload is None:
            raise ReloadError(f"model {name!r} runs on a backend that cannot reload "
                              f"({type(backend).__name__}); restart it instead" + _reloaded(done), name,
                              None, "not supported")
        try:
            done[name] = reload(model, version=version)
        except ReloadError as exc:
            if done:
                raise ReloadError(f"{exc}{_reloaded(done)}", exc.model, exc.version, exc.cause) from exc
            raise
    return done


def reload_request(pools: Mapping[str, Backend], default_model: str | None,
                   msg: messages.ReloadRequest) -> messages.StatusReply:
    """The pool server's answer to ``flask torchpool reload`` (a :class:`~messages.ReloadRequest`; the
    reply's status: ``{"error": message or None, "versions": {name: ModelVersion}}``):
    *msg.model* (None: every model; the default one when *msg.spec* names another model)."""
    versions: dict[str, ModelVersion] = {}
    try:
        if msg.model is not None and msg.model not in pools:
            raise ReloadError(f"the pool server has no model named {msg.model!r}; its models are "
                              f"{', '.join(map(repr, pools))}", msg.model, None, "unknown model")
        if msg.model is None and msg.spec is not None and default_model is None:
            raise ReloadError("the pool server serves several models: name the one to change (--model)")
        names = [msg.model] if msg.model is not None else (
            list(pools) if msg.spec is None else [default_model or ""])
        versions = reload_models(pools, names, msg.spec, msg.version)
    except TorchPoolError as exc:
        log.error("torchpool server: reload: %s", exc)
        return messages.StatusReply(msg.id, {"error": f"{type(exc).__name__}: {exc}", "versions": versions})
    return messages.StatusReply(msg.id, {"error": None, "versions": versions})


def _reloaded(done: dict[str, ModelVersion]) -> str:
    return f" (reloaded before it: {', '.join(done)})" if done else ""


def new_config(config: ModelConfig, model: Any) -> ModelConfig:
    """*config* with the model given to ``reload(model=...)``, validated like ``TORCHPOOL_MODEL``."""
    return config if model is None else replace_model(config, model, f"reload(model=...) of {config.name!r}")


def _describe(model: Any) -> str:
    if isinstance(model, str):
        return model
    return f"{getattr(model, '__module__', '?')}:{getattr(model, '__qualname__', repr(model))}"
