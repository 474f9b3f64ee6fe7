"""A batch's rows: padded to a batch bucket before it runs, its answer split back to its members along
dim 0 after, and input blocks kept while outputs alias them.

:func:`pad` fills a batch up to its bucket (Note [Batch buckets]) with copies of its last row.
:func:`split` reads the worker's :class:`~flask_torchpool.messages.Result` for a job and gives each member
of a batch its rows (views, no copies); a job that is not a batch gets the whole answer. Outputs that
are views of the job's own inputs (Note [Outputs that are inputs], ``worker.py``) keep those input blocks
allocated until every such view is collected (:func:`input_releaser`).
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable

from . import codec, messages, shm
from .errors import OutputError

if TYPE_CHECKING:
    from .batching import Job


# Note [Batch buckets]
# ~~~~~~~~~~~~~~~~~~~~
# A model's cost per batch need not grow with its rows. With MKL on one core, the wide MLP of the
# benchmarks (2560-8192-2560) ran 1 row in 7 ms, 2 rows in 16 ms and 3 in 25 ms (as that many
# matrix-vector products), but 4 rows in 16 ms and 8 in 21 ms. With TORCHPOOL_BATCH_BUCKETS (e.g.
# [1, 4, 8, 16]) a batch of n rows runs as the smallest bucket >= n that its blocks hold (a call larger
# than the batch limit runs as it is): pad fills the rows after the n-th with copies of the n-th, never
# stale arena bytes (a model's error may quote any row, and those would be an earlier caller's), and
# split gives the members their rows and drops the rest. The Ray actor pads after stacking the members'
# tensors. The batch_rows metric counts the members' rows; batch_padding_rows counts the padding.


def bucket(job: Job[Any], buckets: tuple[int, ...]) -> int:
    """The rows *job*'s batch runs as: :func:`runs_as` of its rows."""
    return runs_as(job.rows, job.capacity, buckets)


def runs_as(rows: int, capacity: int, buckets: tuple[int, ...]) -> int:
    """The rows a batch of *rows* runs as: the smallest of *buckets* (ascending) that holds them and fits
    its blocks (*capacity* rows), or *rows* (Note [Batch buckets])."""
    for size in buckets:
        if size >= rows:
            return size if size <= capacity else rows
    return rows


def pad(job: Job[Any], buckets: tuple[int, ...]) -> int:
    """Fill *job*'s arena blocks up to its :func:`bucket` with copies of its last row, set ``job.padded``,
    and return the rows the worker runs. The members' writes are done; outside the scheduler's lock."""
    rows = bucket(job, buckets)
    job.padded, arena = rows - job.rows, job.slot.arena
    if job.padded and arena is not None:
        buf = arena.buffer
        for offset, row_bytes in job.regions:
            last = buf[offset + (job.rows - 1) * row_bytes:offset + job.rows * row_bytes]
            for i in range(job.rows, rows):
                buf[offset + i * row_bytes:offset + (i + 1) * row_bytes] = last
    return rows


def split(job: Job[Any], msg: messages.Result, fds: list[int], arrays: bool = False
          ) -> list[tuple[Any, BaseException | None]]:
    """The result of each member of *job* (a plain call has one member): its outputs read as numpy
    arrays with *arrays* (every member still waiting passed numpy arrays; no torch needed: Note [A pool
    server without torch] in :mod:`flask_torchpool.codec`), else as tensors, of which the members that
    passed numpy arrays (in a batch with torch callers) get numpy views."""
    slot = job.slot
    try:
        if slot.arena is None:
            raise OSError("the worker's arena is gone")
        tensors = shm.read_refs(slot.arena, msg.refs, fds, slot.releases,
                                input_releaser(job, msg.refs), arrays=arrays)
    except codec.UnsupportedValue as exc:  # a dtype numpy lacks, for callers that passed numpy arrays
        return [(None, numpy_refused(msg.value, exc)) for _ in job.members]
    except Exception as err:  # a malformed reply is a worker bug; the calls must not hang
        return [(None, OutputError(f"cannot read the model's output: {err}")) for _ in job.members]
    results = split_rows(job, msg.value, tensors)
    if arrays:
        return results
    return [_numpy_member(r) if m.numpy and r[1] is None else r for m, r in zip(job.members, results)]


def _numpy_member(result: tuple[Any, BaseException | None]) -> tuple[Any, BaseException | None]:
    try:
        return numpy_result(result[0]), None
    except OutputError as err:
        return None, err


def split_rows(job: Job[Any], skel: Any, tensors: list[Any]) -> list[tuple[Any, BaseException | None]]:
    """The result of each member of *job* from the model's output (*skel* and its *tensors*): a plain
    call gets it whole, a batch's members their rows (views); the process and Ray backends share it."""
    if job.key is None:
        return [(codec.unflatten(skel, tensors), None)]
    rows = job.rows + job.padded   # a padded batch's last rows are copies; nobody gets their outputs
    for t in tensors:
        if not len(t.shape) or t.shape[0] != rows:
            return [(None, OutputError(
                f"the model returned a tensor of shape {tuple(t.shape)} for a batch of {rows} "
                "rows; batched outputs must keep dim 0 aligned with the inputs. Turn batching off "
                "for this view (@pool.infer(batch=False)) or return per-row outputs"))
                for _ in job.members]
    return [(codec.unflatten(skel, [t[start:start + m.rows] for t in tensors]), None)
            for m, start in zip(job.members, job.starts)]


def input_releaser(job: Job[Any], refs: tuple[shm.TensorRef, ...]) -> Callable[[int], None] | None:
    """For outputs that are views of *job*'s input blocks: mark those blocks kept, and return the
    callback that frees each block once every view of it is collected."""
    aliases = [r for r in refs if r.seg == shm.INPUT_ALIAS and r.nbytes >= shm.ZERO_COPY_MIN_BYTES]
    allocator = job.slot.inputs
    if not aliases or allocator is None:
        return None
    blocks = sorted(job.blocks)

    def block_of(offset: int) -> int:
        return blocks[bisect.bisect_right(blocks, offset) - 1]

    counts: dict[int, int] = {}
    for ref in aliases:
        block = block_of(ref.offset)
        counts[block] = counts.get(block, 0) + 1
    job.kept = set(counts)
    lock = threading.Lock()

    def release(offset: int) -> None:
        block = block_of(offset)
        with lock:  # a leaf lock: garbage collection may call this from any thread
            counts[block] -= 1
            last = counts[block] == 0
        if last:
            allocator.free_later(block)

    return release


def numpy_result(value: Any) -> Any:
    """*value* with its tensors as numpy arrays (:func:`flask_torchpool.codec.to_numpy`), for a call that
    passed numpy arrays; a dtype numpy lacks is an :class:`OutputError` that says so."""
    try:
        return codec.to_numpy(value)
    except codec.UnsupportedValue as exc:
        raise numpy_refused(value, exc) from None


def numpy_refused(value: Any, exc: codec.UnsupportedValue) -> OutputError:
    """The error of a call that passed numpy arrays and whose model returned *value* (or its skeleton),
    with a dtype numpy lacks."""
    what = "a tensor" if type(value) is codec.Slot else codec.describe(value)
    return OutputError(f"the model returned {what}, which cannot come back as numpy arrays: {exc}",
                       remote_type="UnsupportedValue")


class NumpyFuture(Future[Any]):
    """The future of a Ray call that passed numpy arrays: *inner*'s outcome, its tensors turned into numpy
    arrays that share their memory. Cancelling it cancels *inner*. (The process pool reads numpy
    outputs itself: :func:`split`.)"""

    def __init__(self, inner: Future[Any]) -> None:
        super().__init__()
        self._inner = inner
        inner.add_done_callback(self._settle)

    def cancel(self) -> bool:
        return self._inner.cancel()  # _settle cancels this one

    def _settle(self, inner: Future[Any]) -> None:
        if inner.cancelled():
            super().cancel()
            return
        exc = inner.exception()
        if exc is not None:
            self.set_exception(exc)
            return
        try:
            value = numpy_result(inner.result())
        except OutputError as err:
            self.set_exception(err)
        else:
            self.set_result(value)
