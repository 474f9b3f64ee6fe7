"""A batch's answer, back to its members: split along dim 0, and input blocks kept while outputs alias
them.

:func:`split` reads the worker's :class:`~flask_torchpool.messages.Result` for a job and gives each member
of a batch its rows (views, no copies); a job that is not a batch gets the whole answer. Outputs that
are views of the job's own inputs (Note [Outputs that are inputs], ``worker.py``) keep those input blocks
allocated until every such view is collected (:func:`input_releaser`).
"""

from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING, Any, Callable

from . import codec, messages, shm
from .errors import OutputError

if TYPE_CHECKING:
    from .batching import Job


def split(job: Job[Any], msg: messages.Result, fds: list[int]) -> list[tuple[Any, BaseException | None]]:
    """The result of each member of *job* (a plain call has one member)."""
    slot = job.slot
    try:
        if slot.arena is None:
            raise OSError("the worker's arena is gone")
        tensors = shm.read_refs(slot.arena, msg.refs, fds, slot.releases,
                                input_releaser(job, msg.refs))
    except Exception as err:  # a malformed reply is a worker bug; the calls must not hang
        return [(None, OutputError(f"cannot read the model's output: {err}")) for _ in job.members]
    if job.key is None:
        return [(codec.unflatten(msg.value, tensors), None)]
    for t in tensors:
        if t.dim() == 0 or t.shape[0] != job.rows:
            return [(None, OutputError(
                f"the model returned a tensor of shape {tuple(t.shape)} for a batch of {job.rows} "
                "rows; batched outputs must keep dim 0 aligned with the inputs. Turn batching off "
                "for this view (@pool.infer(batch=False)) or return per-row outputs"))
                for _ in job.members]
    out: list[tuple[Any, BaseException | None]] = []
    for member, start in zip(job.members, job.starts):
        part = [t[start:start + member.rows] for t in tensors]
        out.append((codec.unflatten(msg.value, part), None))
    return out


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
