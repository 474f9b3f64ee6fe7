"""Inline mode (``TORCHPOOL_INLINE = True``): the model runs in the web process, for tests.

:class:`InlinePool` is a :class:`~flask_torchpool.backend.Backend` without any subprocess: the model is
built in-process the first time it is needed, with the loading rules of the workers
(:func:`flask_torchpool.worker.load_model`), and each call runs in the calling thread under
``torch.inference_mode()``, one at a time (a lock). Arguments are validated exactly as the pool validates
them (:func:`flask_torchpool.codec.flatten`), tensors are copied on the way in and out as they are
when they travel through shared memory, and failures raise the pool's exceptions, so views and tests see
the same results and the same errors. What does not apply: deadlines (``TORCHPOOL_TIMEOUT`` is not
enforced, a running call cannot be interrupted), the queue limit, crashes and restarts (a model that
kills its process kills the web process), batching and core pinning. A stream (``model.stream``) runs the
model's generator in the iterating thread, one chunk at a time under the same lock; closing the
iterator closes the generator.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import codec
from .config import PoolConfig
from .errors import InferenceError, OutputError, PoolClosedError, TorchPoolError, WorkerStartupError
from .metrics import Metrics, outcome_of
from .outputs import numpy_result
from .placement import Placement, resolve_devices, usable_cores
from .status import ModelStatus, WorkerState, model_status, worker_status
from .streaming import Sink, Stream, check_method
from .worker import call_target, close_iterator, load_model

log = logging.getLogger(__name__)


def plan(config: PoolConfig) -> list[Placement]:
    """The one placement of a model in inline mode: the web process, the model's first configured
    device, all its cores and torch's current thread count (inline mode changes neither)."""
    return [Placement(worker=0, device=resolve_devices(config)[0], cores=tuple(usable_cores()),
                      threads=torch.get_num_threads(), model=config.name)]


@dataclass(eq=False)
class _InlineWorker:
    placement: Placement
    state: WorkerState = WorkerState.STARTING   # until the model is loaded, on first use
    calls: int = 0
    errors: int = 0
    running: int = 0

    @property
    def index(self) -> int:
        return self.placement.worker


class InlinePool:
    """The :class:`~flask_torchpool.backend.Backend` that runs the model in the calling thread."""

    #: A running call cannot be interrupted in-process: deadlines are not enforced.
    enforces_deadlines = False

    def __init__(self, config: PoolConfig, placements: list[Placement] | None = None,
                 name: str = "torchpool", logger_name: str | None = None) -> None:
        # logger_name: the pool's workers log there; here the model logs in this process as it likes.
        self.config = config
        self.name = name
        self.workers = [_InlineWorker((placements or plan(config))[0])]
        self.metrics = Metrics(config.name)
        self._model: Any = None
        self._call_lock = threading.Lock()     # one call at a time, like one worker
        self._state_lock = threading.Lock()    # counters, waiting
        self._start_lock = threading.Lock()
        self._waiting = 0
        self._startup_error: WorkerStartupError | None = None
        self._closing = False
        self._stopped = threading.Event()

    @property
    def started(self) -> bool:
        return self.workers[0].state is WorkerState.READY and not self._closing

    @property
    def placements(self) -> list[Placement]:
        return [self.workers[0].placement]

    @property
    def closed(self) -> bool:
        return self._closing

    def start(self) -> None:
        """Build the model in this process (once). Raises :class:`WorkerStartupError`, with the
        traceback as ``__cause__``, when the factory fails."""
        with self._start_lock:
            if self._startup_error is not None:
                raise self._startup_error
            if self._closing:
                raise PoolClosedError("the pool is shut down; create a new TorchPool to serve again")
            worker = self.workers[0]
            if worker.state is WorkerState.READY:
                return
            failure: tuple[str, str] | None = None
            try:
                self._model = load_model(self.config.spec, worker.placement.device)
            except Exception as exc:
                failure = (f"{type(exc).__name__}: {exc}", traceback.format_exc())
            if failure is not None:
                err = WorkerStartupError.load_failed("0 (inline)", self.config.model, *failure)
                self._startup_error = err
                self._closing = True
                worker.state = WorkerState.FAILED
                self._stopped.set()
                raise err
            worker.state = WorkerState.READY
            log.info("%s: model loaded in-process (TORCHPOOL_INLINE)", self.name)

    def shutdown(self, wait: bool = True, drain_timeout: float | None = None) -> None:
        """Take no new calls; with *wait*, let the running call finish (up to *drain_timeout*, default
        ``TORCHPOOL_DRAIN_TIMEOUT``) and drop the model. Idempotent."""
        self._closing = True
        if not wait:
            return
        drain = self.config.drain_timeout if drain_timeout is None else drain_timeout
        acquired = self._call_lock.acquire(timeout=max(drain, 0.001))
        try:
            self._model = None
            worker = self.workers[0]
            if worker.state is not WorkerState.FAILED:
                worker.state = WorkerState.STOPPED
            self._stopped.set()
        finally:
            if acquired:
                self._call_lock.release()

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               batch: bool = True, method: str | None = None, waiter: bool = False,
               retries: int | None = None) -> Future[Any]:
        """Run one call now, in this thread, and return its (completed) future. *timeout* is not
        enforced, and *batch* and *retries* are ignored in inline mode (no worker can die)."""
        skel_args, skel_kwargs, tensors, numpy = self._accept(args, kwargs, timeout, method)
        future: Future[Any] = Future()
        future.set_running_or_notify_cancel()
        enqueued = time.monotonic()
        self.metrics.record_submit()
        with self._state_lock:
            self._waiting += 1
        try:
            self._call_lock.acquire()
        finally:
            with self._state_lock:
                self._waiting -= 1
        worker = self.workers[0]
        result: Any = None
        exc: TorchPoolError | None = None
        try:
            queue_time = time.monotonic() - enqueued
            with self._state_lock:
                worker.running += 1
            model = self._model
            if self._closing or model is None:
                exc = PoolClosedError.before_run(self.config.retry_after)
            else:
                try:
                    result = self._run(model, skel_args, skel_kwargs, tensors, method)
                    if numpy:
                        result = numpy_result(result)
                except TorchPoolError as err:
                    exc = err
                worker.calls += 1
                worker.errors += exc is not None
        finally:
            with self._state_lock:
                worker.running -= 1
            self._call_lock.release()
        self.metrics.record_call(outcome_of(exc), time.monotonic() - enqueued, queue_time)
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
        return future

    def stream(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None = None,
               method: str | None = None) -> Stream:
        """Iterate what the model yields, in the iterating thread (each chunk under the call lock);
        *timeout* is not enforced."""
        skel_args, skel_kwargs, tensors, numpy = self._accept(args, kwargs, timeout, method)
        self.metrics.record_submit()
        self.metrics.record_stream(1)
        started = time.monotonic()
        box: list[Any] = []

        def step() -> Any:
            with self._call_lock:
                if self._closing or self._model is None:
                    raise PoolClosedError.before_finish(self.config.retry_after)
                if not box:
                    out = self._invoke(self._model, skel_args, skel_kwargs, tensors, method)
                    if not isinstance(out, Iterator):
                        raise OutputError(f"model.stream() needs a model that yields its outputs (a "
                                          f"generator or an iterator); it returned {codec.describe(out)}: "
                                          "call model(...) instead", remote_type="NotAnIterator")
                    box.append(out)
                chunk = self._output(self._produce(lambda: next(box[0])))
                return numpy_result(chunk) if numpy else chunk

        def ended(exc: BaseException | None) -> None:
            if box:
                close_iterator(box.pop())
            self.metrics.record_stream(-1)
            self.metrics.record_call(outcome_of(exc), time.monotonic() - started, 0.0)

        return _InlineStream(step, ended, self.metrics, started)

    def _accept(self, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None,
                method: str | None) -> codec.Flat:
        codec.check_timeout(timeout)  # refused as on every backend, though not enforced here
        check_method(method)
        flat = codec.flatten_call(args, kwargs, self.config.max_input_bytes)
        self._check_open()
        if not self.started:
            self.start()
        return flat

    def _check_open(self) -> None:
        if self._startup_error is not None:
            raise self._startup_error
        if self._closing:
            raise PoolClosedError.closing(self.config.retry_after)

    def _run(self, model: Any, skel_args: Any, skel_kwargs: Any, tensors: list[torch.Tensor],
             method: str | None = None) -> Any:
        out = self._invoke(model, skel_args, skel_kwargs, tensors, method)
        if isinstance(out, Iterator):
            close_iterator(out)
            raise OutputError(f"the model returned {codec.describe(out)}: it yields its outputs one by one; "
                              "iterate them with model.stream(...) instead of calling model(...)",
                              remote_type="Iterator")
        return self._output(out)

    def _invoke(self, model: Any, skel_args: Any, skel_kwargs: Any, tensors: list[torch.Tensor],
                method: str | None) -> Any:
        # Copies, as the arena makes them: the model may modify its inputs in place without the caller
        # seeing it, and the caller gets tensors that nothing else holds.
        device = torch.device(self.workers[0].placement.device)
        copies = [t.to(device, copy=True, memory_format=torch.contiguous_format) for t in tensors]
        args = codec.unflatten(skel_args, copies)
        kwargs = codec.unflatten(skel_kwargs, copies)
        def run() -> Any:
            return (model if method is None else call_target(model, method))(*args, **kwargs)

        return self._produce(run)

    @staticmethod
    def _produce(run: Callable[[], Any]) -> Any:
        """``run()`` under inference mode; the model's exception becomes :class:`InferenceError`
        (StopIteration passes through)."""
        failure: tuple[str, str, str] | None = None
        try:
            with torch.inference_mode():
                return run()
        except StopIteration:
            raise
        except Exception as exc:
            failure = (type(exc).__name__, str(exc), traceback.format_exc())
        # Raised outside the except block, like the pool's errors: no __context__ holding the model's
        # frames (and their tensors) alive, only the formatted traceback.
        raise InferenceError.model_raised(*failure)

    @staticmethod
    def _output(out: Any) -> Any:
        produced: list[torch.Tensor] = []
        try:
            skel = codec.flatten(out, produced, "output")
        except codec.UnsupportedValue as exc:
            raise OutputError(f"the model returned {codec.describe(out)}, which cannot travel back: {exc}",
                              remote_type="UnsupportedValue") from None
        # Outside inference_mode, so that the copies are ordinary tensors, as the pool's are.
        return codec.unflatten(skel, [t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
                                   for t in produced])

    def status(self) -> ModelStatus:
        worker = self.workers[0]
        with self._state_lock:
            workers = [worker_status(worker.placement, worker.state, pid=os.getpid(), inflight=worker.running,
                                     calls=worker.calls, errors=worker.errors)]
            return model_status(mode="inline", started=self.started, closed=self._closing,
                                queued=self._waiting, busy_workers=1 if worker.running else 0, arena_bytes=0,
                                metrics=self.metrics.snapshot(), workers=workers, plan=self.placements)


class _InlineStream(Stream):
    """A stream of inline mode: each ``next`` runs the model's generator one step in this thread."""

    def __init__(self, step: Callable[[], Any], ended: Callable[[BaseException | None], None],
                 metrics: Metrics, started: float) -> None:
        super().__init__(Sink(), lambda: ended(None))
        self._step = step
        self._done = ended
        self._metrics = metrics
        self._started = started

    def __next__(self) -> Any:
        if self._hooks is None:
            raise StopIteration
        try:
            value = self._step()
        except BaseException as exc:
            self._done(None if isinstance(exc, StopIteration) else exc)
            self._ended()
            raise
        self._metrics.record_chunk(time.monotonic() - self._started if not self._sink.chunks else None)
        self._sink.chunks += 1
        return value

    async def __anext__(self) -> Any:
        try:
            return self.__next__()
        except StopIteration:
            raise StopAsyncIteration from None
