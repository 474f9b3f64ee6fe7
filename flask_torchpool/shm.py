"""Shared memory: memfd arenas, their allocators, and writing and reading tensors in them.

Each worker owns one *arena*: an anonymous ``memfd`` mapping allocated once, when the worker is spawned, and
reused for every call. Its layout::

    0            4 KiB                       4 KiB + (size - 4 KiB) / 2                     size
    | control    | inputs: allocated by the   | outputs: allocated by the worker,               |
    | words      | web process, freed when    | freed when the web process has copied them out   |
    |            | the result arrives         | or the zero-copy view it returned is collected   |

The web process writes a call's tensors straight into the input half (:class:`Placer`) and sends a small
header (:mod:`flask_torchpool.messages`) whose tensors are :class:`TensorRef` (offset, dtype, shape). The
worker maps those bytes as tensors without copying (:func:`read_refs`), writes the outputs into the output
half and answers with refs of the same form. Tensor data is never pickled. A payload that does not fit the
arena travels through a one-off memfd whose descriptor is passed with ``SCM_RIGHTS`` beside the header.
An attached web process has an arena of the same layout, shared with the pool server only.

The control words let the web process see which call a worker is running (``CTRL_RUNNING``) without a
message, which is how a deadline decides between cancelling a queued call and killing a wedged worker.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from . import codec
from .blocks import ALIGN as ALIGN
from .blocks import Allocator as Allocator
from .blocks import ReleaseQueue as ReleaseQueue
from .codec import dtype_from_name, tensor_nbytes

if TYPE_CHECKING:
    import numpy
    import torch

_torch: Any = None


def _t() -> Any:
    """The torch module, imported on first use (Note [Arrays without torch] in codec.py)."""
    global _torch
    if _torch is None:
        import torch

        _torch = torch
    return _torch

CONTROL_BYTES = 4096
#: Outputs at least this large come back as zero-copy views of the arena (see Note [Zero-copy outputs]).
ZERO_COPY_MIN_BYTES = 64 * 1024
#: Tensors over a body buffer of their own (Note [Body buffers] in staging.py): address -> its memfd.
#: :meth:`Placer.place` sends such a tensor's descriptor instead of copying it.
shared_tensors: dict[int, int] = {}
#: Descriptors a pool server keeps at once to forward (Note [Forwarded segments]); past it, a received
#: segment is read as before (its bytes copied for the worker), so that no client can make the server
#: hold descriptors without bound.
MAX_FORWARDED_SEGMENTS = 128
_forwarding: set[int] = set()  # the descriptors kept to forward (set operations are atomic)
#: Held to check the bound and count a kept descriptor as one step (the server reads its clients in
#: several threads). Releases only discard (atomic), never take it: they run from garbage collection,
#: which may happen while it is held.
_forwarding_lock = threading.Lock()
CTRL_RUNNING = 0  # int64 index in the control words: id of the call the worker is running, 0 when idle
#: ``TensorRef.seg`` of an output that lies in the call's own inputs (Note [Outputs that are inputs]).
INPUT_ALIAS = -2
#: ``TensorRef.seg`` of a tensor whose bytes travel in the message itself, at *offset* of its inline bytes
#: (Note [Inline tensors]).
INLINE = -3
#: The inline bytes one message may carry: a :class:`Placer` made with ``inline=True`` writes tensors into
#: the message while they fit in this many bytes together (Note [Inline tensors]).
INLINE_MAX_BYTES = 8192


class TensorRef(NamedTuple):
    """Where a tensor's bytes are: the arena (``seg == -1``) or the *seg*-th descriptor sent along."""

    seg: int
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]



#: The seals every shared segment carries (Note [Sealed segments]).
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def create_memfd(size: int, name: str = "torchpool") -> int:
    """An anonymous shared-memory file of *size* bytes, sealed at that size (Note [Sealed segments]).
    It has no name in /dev/shm, so nothing can leak there, and only processes that are handed the
    descriptor can map it.

    Note [Sealed segments]: a process that mapped a segment it was handed faults (SIGBUS) on the next
    access past the end if the sender shrinks the file afterwards, which would kill a pool server and
    all its workers at a client's whim. So every segment is created with ``MFD_ALLOW_SEALING`` and
    sealed against shrinking, growing and further sealing once sized, and every descriptor received
    must carry those seals (:func:`check_sealed`), which also refuses anything that is not a memfd."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class UnsealedSegment(ValueError):
    """A descriptor received is not a memfd sealed at its size (Note [Sealed segments])."""


def check_sealed(fd: int, at_least: int = 0) -> int:
    """The size of the sealed memfd *fd*; :class:`UnsealedSegment` unless it carries :data:`SEALS` and
    holds at least *at_least* bytes."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise UnsealedSegment("a descriptor that is not a memfd was sent as shared memory") from None
    if seals & SEALS != SEALS:
        raise UnsealedSegment("a shared-memory segment was sent without the seals against shrinking and "
                              "growing (F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL)")
    size = os.fstat(fd).st_size
    if size < at_least:
        raise UnsealedSegment(f"a shared-memory segment of {size} bytes holds a tensor of {at_least}")
    return size


class Segment:
    """A shared mapping seen as bytes, as a uint8 tensor (made on first use: a process that only
    handles numpy arrays never imports torch) and as numpy arrays."""

    def __init__(self, fd: int, size: int, private: bool = False) -> None:
        self.size = size
        # private: copy-on-write, for a segment received (Note [Body buffers]): a model that writes its
        # input in place must not write into the sender's memory.
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        self.mmap = mmap.mmap(fd, size, flags=flags) if size else None
        self.buffer = memoryview(self.mmap) if self.mmap is not None else memoryview(b"")
        self._bytes: torch.Tensor | None = None
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    @property
    def bytes(self) -> torch.Tensor:
        """The whole segment as a uint8 tensor."""
        if self._bytes is None:
            torch = _t()
            self._bytes = (torch.frombuffer(self.buffer, dtype=torch.uint8) if self.size
                           else torch.empty(0, dtype=torch.uint8))
        return self._bytes

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        torch = _torch or _t()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)  # type: ignore[no-any-return]
        # One as_strided on a cached whole-segment view of this dtype: every torch op costs
        # microseconds of dispatch on the hot path, and a slice + two views cost three.
        typed = self._typed.get(dtype)
        if typed is None:
            itemsize = torch.empty(0, dtype=dtype).element_size()
            typed = self._typed[dtype] = self.bytes[:self.size // itemsize * itemsize].view(dtype)
        return typed.as_strided(shape, _contiguous_strides(shape), offset // typed.element_size())

    def owned_view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...],
                   on_free: Callable[[int], None]) -> torch.Tensor:
        """A tensor over ``[offset, offset+nbytes)`` that calls ``on_free(offset)`` once the tensor and
        every view of it are gone. It keeps the mapping alive on its own."""
        torch = _torch or _t()
        piece = self.buffer[offset:offset + nbytes]
        weakref.finalize(piece, on_free, offset)
        return torch.frombuffer(piece, dtype=torch.uint8).view(dtype).view(shape)  # type: ignore[no-any-return]

    def array(self, offset: int, nbytes: int, dtype: numpy.dtype[Any], shape: tuple[int, ...]
              ) -> numpy.ndarray:
        """A numpy array over ``[offset, offset+nbytes)`` (it keeps the mapping alive)."""
        import numpy

        if nbytes == 0:
            return numpy.empty(shape, dtype=dtype)
        return numpy.frombuffer(self.buffer, dtype=dtype, count=nbytes // dtype.itemsize,
                                offset=offset).reshape(shape)

    def owned_array(self, offset: int, nbytes: int, dtype: numpy.dtype[Any], shape: tuple[int, ...],
                    on_free: Callable[[int], None]) -> numpy.ndarray:
        """:meth:`owned_view` as a numpy array: ``on_free(offset)`` runs once it and its views are gone.

        The finalizer watches the flat array, not the memoryview slice: ``numpy.frombuffer`` keeps a
        buffer of its own, not the slice, which would die (and free the block under a live array) as
        soon as this returns. Every view of the returned array has the flat array as its ``base``."""
        import numpy

        flat = numpy.frombuffer(self.buffer[offset:offset + nbytes], dtype=dtype)
        weakref.finalize(flat, on_free, offset)
        return flat.reshape(shape)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


class Arena(Segment):
    """A worker's arena (see the module docstring for its layout)."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(fd, size)
        half = (size - CONTROL_BYTES) // 2 // ALIGN * ALIGN
        self.inputs = (CONTROL_BYTES, half)
        self.outputs = (CONTROL_BYTES + half, half)
        #: The control words as int64s (a memoryview: cheaper to index than a tensor, and no torch).
        self.control = self.buffer[:CONTROL_BYTES].cast("q")

    @property
    def running(self) -> int:
        """The id of the call the worker is running, 0 when idle."""
        return int(self.control[CTRL_RUNNING])


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, but a plain single-threaded memmove (without the GIL) when *src* is a
    contiguous CPU tensor of the same dtype.

    Note [No OpenMP in the web process]: torch parallelises large copies over its intra-op threads,
    whose OpenMP workers keep spinning after the copy and take cores from the model workers; on a small
    machine that made a 192 KiB call 10x slower. The web process only moves bytes, so it moves them
    with one memmove.
    """
    address = dense_address(src) if src.dtype == dst.dtype else -1
    if address != -1:
        ctypes.memmove(dst.data_ptr(), address, tensor_nbytes(src))
    else:
        dst.copy_(src)


def address_of(buffer: memoryview) -> int:
    """The address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def dense_address(t: torch.Tensor | numpy.ndarray) -> int:
    """The address of *t*'s first element if its elements are one dense block in this process's memory
    (a C-contiguous numpy array, a contiguous CPU tensor), else -1. A conjugate or negative view
    (``x.conj()``, ``torch._neg_view``) shares its base's bytes but not its values: -1."""
    if codec.is_array(t):
        return int(t.__array_interface__["data"][0]) if t.flags.c_contiguous else -1
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_conj() or t.is_neg():
        return -1
    return int(t.data_ptr())


def write(segment: Segment, offset: int, t: torch.Tensor | numpy.ndarray) -> None:
    """Write *t*'s elements, dense, at *offset* of *segment*: a numpy array with ``numpy.copyto`` (no
    torch, no GIL, one thread, whatever its strides), a tensor with :func:`copy_into`."""
    shape = tuple(t.shape)
    if codec.is_array(t):
        import numpy

        numpy.copyto(segment.array(offset, int(t.nbytes), t.dtype, shape), t, casting="no")
    else:
        copy_into(segment.view(offset, tensor_nbytes(t), t.dtype, shape), t)


# Note [Inline tensors]
# ~~~~~~~~~~~~~~~~~~~~~
# On a lane (Note [Lanes] in lanes.py) a small tensor travels in the message itself, not in the arena:
# placing it in the arena and reading it there (allocate a block, a typed view, a copy, the reference,
# then on the other side a view, a copy out and the block's release sent back with the next call) cost
# about 12 us of Python per tensor and direction (both processes together), against 2 us for
# copying its bytes into the frame and out of it. A Placer made with inline=True (the web process's
# lane calls, the worker's answers on a lane) appends each dense CPU tensor to its inline bytes while
# they stay within INLINE_MAX_BYTES in all; the reference's seg is INLINE and its offset the tensor's
# place in those bytes, which follow the references in the frame (Note [The wire format] in
# messages.py: in order, back to back, checked).
# read_refs gives each one its own writable copy (a bytearray), so a model may write its inputs in
# place, and nothing of it stays in the arena. Everything else (big tensors, body buffers, GPU
# tensors, the pool server's calls) goes through shared memory as before.


class Placer:
    """Writes tensors into an arena half (or one-off segments) and makes :class:`TensorRef` for them;
    with *inline*, small tensors into :attr:`inline`, the bytes sent in the message (Note [Inline
    tensors]).

    On failure of a later tensor, :meth:`rollback` frees what was placed; :attr:`fds` are the one-off
    segments to send along (the caller closes them after sending).
    """

    def __init__(self, segment: Segment, allocator: Allocator, inline: bool = False) -> None:
        self.segment = segment
        self.allocator = allocator
        self.blocks: list[int] = []
        self.fds: list[int] = []
        self.inline = bytearray()
        self._inline_left = INLINE_MAX_BYTES if inline else 0

    def place(self, t: torch.Tensor | numpy.ndarray) -> TensorRef:
        """Write *t* (a tensor, or a numpy array: Note [Arrays without torch]) and return its reference."""
        nbytes, name, shape = tensor_nbytes(t), codec.wire_dtype(t), tuple(t.shape)
        if nbytes == 0:
            return TensorRef(-1, 0, 0, name, shape)
        if nbytes <= self._inline_left:  # Note [Inline tensors]
            address = dense_address(t)
            if address != -1:
                ref = TensorRef(INLINE, len(self.inline), nbytes, name, shape)
                self.inline += ctypes.string_at(address, nbytes)
                self._inline_left -= nbytes
                return ref
        if shared_tensors:
            fd = shared_tensors.get(dense_address(t))
            if fd is not None:  # Note [Body buffers]: the worker maps the body where it was read
                self.fds.append(os.dup(fd))
                return TensorRef(len(self.fds) - 1, 0, nbytes, name, shape)
        seg, target, offset = -1, self.segment, self.allocator.alloc(nbytes)
        if offset is not None:
            self.blocks.append(offset)
        else:
            # Note [Oversize payloads]: a one-off segment, mapped once on each side and closed after the
            # call. It costs fresh pages and a descriptor, never a pickle of the data.
            fd = create_memfd(nbytes, "torchpool-oversize")
            self.fds.append(fd)
            seg, target, offset = len(self.fds) - 1, Segment(fd, nbytes), 0
        write(target, offset, t)
        return TensorRef(seg, offset, nbytes, name, shape)

    def place_all(self, tensors: list[torch.Tensor]) -> tuple[TensorRef, ...]:
        """:meth:`place` every tensor; if one fails, free what was placed and re-raise."""
        try:
            return tuple(self.place(t) for t in tensors)
        except BaseException:
            self.rollback()
            raise

    def rollback(self) -> None:
        for offset in self.blocks:
            self.allocator.free(offset)
        self.blocks.clear()
        self.close_fds()

    def close_fds(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def read_refs(segment: Segment, refs: tuple[TensorRef, ...], fds: list[int],
              on_free: Callable[[int], None] | None = None,
              on_input_free: Callable[[int], None] | None = None,
              arrays: bool = False, forward: bool = False, inline: bytes | bytearray = b"") -> list[Any]:
    """Tensors for *refs* (numpy arrays with *arrays*): views of *segment* or of the passed descriptors
    (which this closes), or copies of the message's *inline* bytes (Note [Inline tensors]).

    With *on_free* (the web process reading results), small arena tensors are copied out and their
    block freed at once; large ones are zero-copy views whose block is freed when they are collected.
    Without it (the worker reading inputs) every tensor is a plain view.

    Every descriptor must be a sealed memfd large enough for its tensor, every reference's size must
    match its shape and dtype, and every arena reference must lie inside *segment*
    (:class:`UnsealedSegment` / ``ValueError`` otherwise; :func:`flask_torchpool.messages.decode`
    already refused unknown dtypes, negative dimensions and stray segment numbers). With *arrays*, a
    dtype that numpy lacks raises :class:`~flask_torchpool.codec.UnsupportedValue`.

    With *forward* (the pool server reading a web process's call), the tensor over each passed
    descriptor keeps a duplicate of it, registered in :data:`shared_tensors` until the tensor is
    collected, so that placing it for a worker sends the descriptor on instead of copying its bytes
    (Note [Forwarded segments]).
    """
    extra = []
    kept: dict[int, int] = {}  # segment number -> the duplicate its tensor keeps (forward)
    try:
        try:
            for fd, ref in zip(fds, _seg_refs(refs, len(fds))):
                check_sealed(fd, ref.nbytes)
                extra.append(Segment(fd, ref.nbytes, private=True))
                if forward and ref.nbytes:
                    with _forwarding_lock:
                        if len(_forwarding) < MAX_FORWARDED_SEGMENTS:
                            kept[ref.seg] = os.dup(fd)
                            _forwarding.add(kept[ref.seg])
        finally:
            for fd in fds:
                os.close(fd)
        size = segment.size
        dtypes: list[Any] = []
        for ref in refs:
            dtype: Any = codec.numpy_dtype(ref.dtype) if arrays else dtype_from_name(ref.dtype)
            numel = 1
            for dim in ref.shape:
                numel *= dim
            if ref.seg == INLINE:  # copied out of the message: any offset, inside its inline bytes
                if ref.nbytes != numel * dtype.itemsize or not 0 <= ref.offset <= len(inline) - ref.nbytes:
                    raise ValueError(f"an inline tensor of {ref.nbytes} bytes at {ref.offset} does not match "
                                     f"its shape {tuple(ref.shape)} and dtype, or lies outside the "
                                     f"{len(inline)} inline bytes of the message")
            elif ref.nbytes != numel * dtype.itemsize or ref.offset % dtype.itemsize or ref.offset < 0:
                raise ValueError(f"a tensor reference's size ({ref.nbytes}) does not match its shape "
                                 f"{tuple(ref.shape)} and dtype, or its offset is not aligned")
            elif ref.seg < 0 and ref.nbytes and not 0 <= ref.offset <= size - ref.nbytes:
                raise ValueError(f"a tensor reference [{ref.offset}, {ref.offset + ref.nbytes}) lies outside "
                                 f"shared memory of {size} bytes")
            dtypes.append(dtype)
        if arrays:
            view, owned, copy = Segment.array, Segment.owned_array, _copy_array
        else:
            view, owned, copy = Segment.view, Segment.owned_view, _clone  # type: ignore[assignment]
        out = []
        for ref, dtype in zip(refs, dtypes):
            if ref.seg == INLINE:
                out.append(_inline(inline, ref, dtype, arrays))
            elif ref.seg in kept:
                out.append(_forwarded(extra[ref.seg], kept.pop(ref.seg), ref.nbytes, dtype, ref.shape, owned))
            elif ref.seg >= 0:
                out.append(view(extra[ref.seg], 0, ref.nbytes, dtype, ref.shape))
            elif ref.seg == INPUT_ALIAS and on_free is not None and ref.nbytes:
                if ref.nbytes < ZERO_COPY_MIN_BYTES or on_input_free is None:
                    out.append(copy(view(segment, ref.offset, ref.nbytes, dtype, ref.shape)))
                else:
                    out.append(owned(segment, ref.offset, ref.nbytes, dtype, ref.shape, on_input_free))
            elif on_free is None or ref.nbytes == 0:
                out.append(view(segment, ref.offset, ref.nbytes, dtype, ref.shape))
            elif ref.nbytes < ZERO_COPY_MIN_BYTES:
                out.append(copy(view(segment, ref.offset, ref.nbytes, dtype, ref.shape)))
                on_free(ref.offset)
            else:
                # Note [Zero-copy outputs]: copying a large result into freshly allocated pages costs several
                # times a plain memcpy (page faults), so the caller gets the arena bytes themselves and the
                # block goes back to the worker when the tensor is garbage-collected.
                out.append(owned(segment, ref.offset, ref.nbytes, dtype, ref.shape, on_free))
        return out
    finally:
        for fd in kept.values():  # not handed to a tensor: an error came first
            _forwarding.discard(fd)
            os.close(fd)


# Note [Forwarded segments]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# A web process sends a big body as a sealed memfd of its own (Note [Body buffers] in staging.py). A
# call through the pool server used to arrive there as a view of that descriptor, which the server's
# pool then copied into its worker's arena: 16 MiB copied, through freshly faulted pages, in the one
# process every web process's calls go through (3.0 ms of the server's CPU per 16 MiB call). The
# server now keeps a duplicate of the descriptor with the tensor and registers it in shared_tensors,
# as the web process does with its body buffers, so Placer.place sends the descriptor on and the
# worker maps the web process's buffer itself. Isolation is unchanged: the bytes are the same web
# process's body, for the call it made; the worker maps them copy-on-write, as on a direct lane. The
# registration and the duplicate go when the server's tensor (every view of it) is collected, that
# is when the call is done with. Only placement that sends a tensor as it is forwards it: rows copied
# into a batch are copied, as before. A server keeps at most MAX_FORWARDED_SEGMENTS descriptors at
# once (a client with thousands of calls in flight must not exhaust its descriptors); past that, a
# segment is copied for its worker as before.


def _forwarded(segment: Segment, fd: int, nbytes: int, dtype: Any, shape: tuple[int, ...],
               owned: Callable[..., Any]) -> Any:
    """A view of the received *segment* that owns *fd* (a duplicate of its descriptor), registered in
    :data:`shared_tensors` until the view is collected."""
    address = [-1]

    def release(_offset: int) -> None:
        shared_tensors.pop(address[0], None)
        _forwarding.discard(fd)
        os.close(fd)

    try:
        out = owned(segment, 0, nbytes, dtype, shape, release)
    except BaseException:
        _forwarding.discard(fd)
        os.close(fd)
        raise
    address[0] = dense_address(out)
    shared_tensors[address[0]] = fd
    return out


def _inline(inline: bytes | bytearray, ref: TensorRef, dtype: Any, arrays: bool) -> Any:
    """A writable copy of an inline tensor's bytes (Note [Inline tensors])."""
    data = bytearray(memoryview(inline)[ref.offset:ref.offset + ref.nbytes])  # one copy, not a slice's too
    if arrays:
        import numpy

        return numpy.frombuffer(data, dtype=dtype).reshape(ref.shape)
    torch = _torch or _t()
    return torch.frombuffer(data, dtype=dtype).view(ref.shape)


def _clone(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _copy_array(a: numpy.ndarray) -> numpy.ndarray:
    return a.copy()


def _seg_refs(refs: tuple[TensorRef, ...], count: int) -> list[TensorRef]:
    if not count and all(ref.seg < 0 for ref in refs):  # the common case: no dict, no sort
        return []
    by_seg = {ref.seg: ref for ref in refs if ref.seg >= 0}
    if sorted(by_seg) != list(range(count)):
        raise ValueError(f"{count} descriptors for one-off segments {sorted(by_seg)}")
    return [by_seg[i] for i in range(count)]
