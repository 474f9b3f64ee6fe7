"""Transport: shared-memory tensor arenas and the small messages that point into them.

Each worker owns one *arena*: an anonymous ``memfd`` mapping allocated once, when the worker is spawned, and
reused for every call. Its layout::

    0            4 KiB                       4 KiB + (size - 4 KiB) / 2                     size
    | control    | inputs: allocated by the   | outputs: allocated by the worker,               |
    | words      | web process, freed when    | freed when the web process has copied them out   |
    |            | the result arrives         | or the zero-copy view it returned is collected   |

The web process writes a call's tensors straight into the input half and sends a small header over the
worker's socketpair: a pickled :class:`Call` whose tensors are :class:`TensorRef` (offset, dtype, shape).
The worker maps those bytes as tensors without copying, writes the outputs into the output half and answers
with a :class:`Result` of the same form. Tensor data is never pickled. A payload that does not fit the arena
travels through a one-off memfd whose descriptor is passed with ``SCM_RIGHTS`` beside the header.

The control words let the web process see which call a worker is running (``CTRL_RUNNING``) without a
message, which is how a deadline decides between cancelling a queued call and killing a wedged worker.

Headers are unpickled with :class:`_Unpickler`, which resolves only the message classes defined here: no
other class can be constructed from a header, whatever it contains.
"""

from __future__ import annotations

import ctypes
import io
import mmap
import os
import pickle
import socket
import threading
import weakref
from collections import deque
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any, Callable, NamedTuple

import torch

CONTROL_BYTES = 4096
ALIGN = 64
#: Outputs at least this large come back as zero-copy views of the arena (see Note [Zero-copy outputs]).
ZERO_COPY_MIN_BYTES = 64 * 1024
CTRL_RUNNING = 0  # int64 index in the control words: id of the call the worker is running, 0 when idle
#: ``TensorRef.seg`` of an output that lies in the call's own inputs (Note [Outputs that are inputs]).
INPUT_ALIAS = -2

_SCALARS = (type(None), bool, int, float, complex, str, bytes)


# --- messages -----------------------------------------------------------------------------------------


class TensorRef(NamedTuple):
    """Where a tensor's bytes are: the arena (``seg == -1``) or the *seg*-th descriptor sent along."""

    seg: int
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


class Slot(NamedTuple):
    """Stands in a skeleton for the tensor ``refs[index]``."""

    index: int  # type: ignore[assignment]  # shadows tuple.index, which no one calls on a Slot


class Call(NamedTuple):
    id: int
    args: Any
    kwargs: Any
    refs: tuple[TensorRef, ...]
    releases: tuple[int, ...]  # output blocks the web process is done with


class Cancel(NamedTuple):
    id: int


class Stop(NamedTuple):
    pass


class Loaded(NamedTuple):
    """The model is built; its weights (by layout fingerprint) could be shared (Note [Shared weights])."""

    fingerprint: str
    nbytes: int


class Adopt(NamedTuple):
    """Map the pool's weights segment (sent along) instead of private weights; *fill* it first."""

    share: bool
    fill: bool


class Ready(NamedTuple):
    pid: int
    info: dict[str, Any]


class StartupFailed(NamedTuple):
    message: str
    tb: str


class Result(NamedTuple):
    id: int
    value: Any
    refs: tuple[TensorRef, ...]


class Failure(NamedTuple):
    id: int
    kind: str  # "model", "output", "input" or "cancelled"
    type_name: str
    message: str
    tb: str


# --- messages between attached web processes and a pool server (server.py, client.py) ---------------

#: Bumped when the attach protocol changes; a client and a server of different versions refuse each other.
PROTOCOL_VERSION = 1


class Hello(NamedTuple):
    """A web process attaches: its arena is the descriptor sent along (Note [Attached arenas])."""

    version: int
    pid: int
    arena_bytes: int


class Welcome(NamedTuple):
    version: int
    pid: int
    default_model: str | None
    models: dict[str, Any]   # name -> {"max_input_bytes", "timeout", "retry_after", "workers": [...]}


class RemoteCall(NamedTuple):
    id: int
    model: str | None       # None: the server's default model
    args: Any
    kwargs: Any
    refs: tuple[TensorRef, ...]
    timeout: float | None   # None: the model's TORCHPOOL_TIMEOUT
    batch: bool
    releases: tuple[int, ...]  # output blocks of this client's arena it is done with


class RemoteError(NamedTuple):
    id: int
    type_name: str          # a flask_torchpool.errors class
    message: str
    retry_after: int | None
    extra: dict[str, Any]
    tb: str | None          # the worker's traceback, when there is one


class StatusRequest(NamedTuple):
    id: int


class StatusReply(NamedTuple):
    id: int
    status: dict[str, Any]


_MESSAGE_TYPES = {cls.__name__: cls for cls in (TensorRef, Slot, Call, Cancel, Stop, Loaded, Adopt, Ready,
                                                 StartupFailed, Result, Failure, Hello, Welcome,
                                                 RemoteCall, RemoteError, StatusRequest, StatusReply)}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name in _MESSAGE_TYPES:
            return _MESSAGE_TYPES[name]
        if module == "builtins" and name == "complex":
            return complex
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a message")


class Channel:
    """One end of a worker's socketpair: whole messages, plus descriptors passed beside them."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._send_lock = threading.Lock()

    def send(self, msg: Any, fds: tuple[int, ...] = ()) -> None:
        data = pickle.dumps((len(fds), msg), protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.conn.send_bytes(data)
            if fds:
                with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                    reduction.sendfds(sock, list(fds))

    def recv(self) -> tuple[Any, list[int]]:
        nfds, msg = _Unpickler(io.BytesIO(self.conn.recv_bytes())).load()
        fds: list[int] = []
        if nfds:
            with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                fds = reduction.recvfds(sock, nfds)
        return msg, fds

    def poll(self, timeout: float = 0.0) -> bool:
        return self.conn.poll(timeout)

    def fileno(self) -> int:
        return self.conn.fileno()

    def close(self) -> None:
        # Under the send lock: closing while another thread sends could let the descriptor number be
        # reused by a new socket and the rest of the message go to the wrong worker.
        with self._send_lock:
            self.conn.close()


# --- arenas -------------------------------------------------------------------------------------------


def create_memfd(size: int, name: str = "torchpool") -> int:
    """An anonymous shared-memory file of *size* bytes. It has no name in /dev/shm, so nothing can leak
    there, and only processes that are handed the descriptor can map it."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    else:  # pragma: no cover - not Linux: an unlinked file in a private temp dir
        import tempfile

        fd, path = tempfile.mkstemp(prefix=name)
        os.unlink(path)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Segment:
    """A shared mapping seen as bytes and as a uint8 tensor."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self.mmap = mmap.mmap(fd, size) if size else None
        self.buffer = memoryview(self.mmap) if self.mmap is not None else memoryview(b"")
        self.bytes = (torch.frombuffer(self.buffer, dtype=torch.uint8) if size
                      else torch.empty(0, dtype=torch.uint8))
        self._typed: dict[torch.dtype, torch.Tensor] = {torch.uint8: self.bytes}

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
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
        piece = self.buffer[offset:offset + nbytes]
        weakref.finalize(piece, on_free, offset)
        return torch.frombuffer(piece, dtype=torch.uint8).view(dtype).view(shape)


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
        self.control = self.bytes[:CONTROL_BYTES].view(torch.int64)

    @property
    def running(self) -> int:
        """The id of the call the worker is running, 0 when idle."""
        return int(self.control[CTRL_RUNNING])


class Allocator:
    """First-fit allocation of aligned blocks in ``[start, start+size)``. Thread-safe.

    Few blocks are live at a time (a worker has a handful of calls outstanding), so a sorted free list
    is fast enough and simple to trust.
    """

    def __init__(self, start: int, size: int) -> None:
        self._free: list[tuple[int, int]] = [(start, size)] if size > 0 else []
        self._used: dict[int, int] = {}
        self._lock = threading.Lock()
        self._later: deque[int] = deque()
        self.capacity = size

    def free_later(self, offset: int) -> None:
        """Free *offset* at the next allocation. Safe from a garbage-collection callback, which may run
        in a thread that holds this allocator's lock."""
        self._later.append(offset)

    def _drain_later(self) -> None:
        while self._later:
            try:
                self._free_locked(self._later.popleft())
            except IndexError:  # pragma: no cover - drained by another thread
                break

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a block of at least *nbytes*, or None when no free block is large enough."""
        size = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
        with self._lock:
            self._drain_later()
            for i, (off, length) in enumerate(self._free):
                if length >= size:
                    if length == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, length - size)
                    self._used[off] = size
                    return off
        return None

    def free(self, offset: int) -> None:
        with self._lock:
            self._free_locked(offset)

    def _free_locked(self, offset: int) -> None:
        size = self._used.pop(offset, None)
        if size is None:
            return
        free = self._free
        lo, hi = 0, len(free)
        while lo < hi:
            mid = (lo + hi) // 2
            if free[mid][0] < offset:
                lo = mid + 1
            else:
                hi = mid
        free.insert(lo, (offset, size))
        # merge with the neighbours
        if lo + 1 < len(free) and free[lo][0] + free[lo][1] == free[lo + 1][0]:
            free[lo] = (free[lo][0], free[lo][1] + free[lo + 1][1])
            del free[lo + 1]
        if lo > 0 and free[lo - 1][0] + free[lo - 1][1] == free[lo][0]:
            free[lo - 1] = (free[lo - 1][0], free[lo - 1][1] + free[lo][1])
            del free[lo]

    @property
    def used(self) -> int:
        with self._lock:
            self._drain_later()
            return sum(self._used.values())


# --- structures of tensors ----------------------------------------------------------------------------


class UnsupportedValue(Exception):
    """A value cannot travel; ``path`` says where it was (e.g. ``args[0]['x']``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, but a plain single-threaded memmove (without the GIL) when *src* is a
    contiguous CPU tensor of the same dtype.

    Note [No OpenMP in the web process]: torch parallelises large copies over its intra-op threads,
    whose OpenMP workers keep spinning after the copy and take cores from the model workers; on a small
    machine that made a 192 KiB call 10x slower. The web process only moves bytes, so it moves them
    with one memmove.
    """
    if src.device.type == "cpu" and src.dtype == dst.dtype and src.is_contiguous() and \
            not src.is_conj() and not src.is_neg():
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), tensor_nbytes(src))
    else:
        dst.copy_(src)


def check_tensor(t: torch.Tensor, path: str) -> None:
    """Refuse tensors whose bytes cannot be placed in shared memory as a dense strided block."""
    if t.layout != torch.strided:
        raise UnsupportedValue(path, f"a {t.layout} tensor cannot travel; convert it with .to_dense()")
    if t.device.type == "meta":
        raise UnsupportedValue(path, "a meta tensor has no data to send")
    if t.is_quantized:
        raise UnsupportedValue(path, "quantized tensors cannot travel; dequantize() them first")
    if t.requires_grad:
        raise UnsupportedValue(path, "the tensor requires grad; inference takes no gradients, pass "
                                     "tensor.detach()")
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        raise UnsupportedValue(path, f"tensor subclass {type(t).__qualname__} cannot travel; pass a "
                                     "plain torch.Tensor")


def flatten(obj: Any, tensors: list[torch.Tensor], path: str) -> Any:
    """Copy the structure of *obj*, replacing each tensor by a :class:`Slot` into *tensors*.

    Allowed: tensors, None, bool, int, float, complex, str, bytes, and tuples, lists and dicts (with
    scalar keys) of them. Anything else raises :class:`UnsupportedValue`, so a header never carries an
    arbitrary object.
    """
    kind = type(obj)
    if kind in _SCALARS:
        return obj
    if isinstance(obj, torch.Tensor):
        check_tensor(obj, path)
        tensors.append(obj)
        return Slot(len(tensors) - 1)
    if kind is list:
        return [flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)]
    if kind is tuple or kind is torch.Size:
        return tuple(flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj))
    if kind is dict:
        out = {}
        for k, v in obj.items():
            if type(k) not in _SCALARS:
                raise UnsupportedValue(f"{path}", f"dict key {k!r} of type {type(k).__qualname__} "
                                                  "is not allowed; use str or int keys")
            out[k] = flatten(v, tensors, f"{path}[{k!r}]")
        return out
    hint = ""
    if kind.__module__ == "numpy":
        hint = "; convert it with torch.from_numpy() or .item()"
    raise UnsupportedValue(path, f"{kind.__module__}.{kind.__qualname__} cannot travel to or from a "
                                 "worker; allowed are tensors, None, bool, int, float, complex, str, "
                                 f"bytes and tuples, lists and dicts of them{hint}")


def flatten_call(args: tuple[Any, ...], kwargs: dict[str, Any], max_input_bytes: int
                 ) -> tuple[Any, Any, list[torch.Tensor]]:
    """Validate one call's arguments and return ``(args skeleton, kwargs skeleton, tensors)``.

    Raises :class:`~flask_torchpool.InvalidInputError` for a value that cannot travel and
    :class:`~flask_torchpool.PayloadTooLargeError` past ``TORCHPOOL_MAX_INPUT_BYTES``."""
    from .errors import InvalidInputError, PayloadTooLargeError

    tensors: list[torch.Tensor] = []
    try:
        skel_args = flatten(tuple(args), tensors, "args")
        skel_kwargs = flatten(dict(kwargs), tensors, "kwargs")
    except UnsupportedValue as exc:
        raise InvalidInputError(f"cannot send {exc.path} to a worker: {exc.reason}") from None
    nbytes = sum(tensor_nbytes(t) for t in tensors)
    if nbytes > max_input_bytes:
        raise PayloadTooLargeError(
            f"the call carries {nbytes} bytes of tensors, more than TORCHPOOL_MAX_INPUT_BYTES="
            f"{max_input_bytes}")
    return skel_args, skel_kwargs, tensors


def unflatten(skel: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    kind = type(skel)
    if kind is Slot:
        return tensors[skel.index]
    if kind is list:
        return [unflatten(v, tensors) for v in skel]
    if kind is tuple:
        return tuple(unflatten(v, tensors) for v in skel)
    if kind is dict:
        return {k: unflatten(v, tensors) for k, v in skel.items()}
    return skel


_DTYPES: dict[str, torch.dtype] = {}


def dtype_from_name(name: str) -> torch.dtype:
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = getattr(torch, name.rpartition(".")[2], None)
        if not isinstance(dtype, torch.dtype):
            raise UnsupportedValue("header", f"unknown dtype {name!r}")
        _DTYPES[name] = dtype
    return dtype


class Placer:
    """Writes tensors into an arena half (or one-off segments) and makes :class:`TensorRef` for them.

    On failure of a later tensor, :meth:`rollback` frees what was placed; :attr:`fds` are the one-off
    segments to send along (the caller closes them after sending).
    """

    def __init__(self, segment: Segment, allocator: Allocator) -> None:
        self.segment = segment
        self.allocator = allocator
        self.blocks: list[int] = []
        self.fds: list[int] = []

    def place(self, t: torch.Tensor) -> TensorRef:
        nbytes = tensor_nbytes(t)
        dtype, shape = t.dtype, tuple(t.shape)
        if nbytes == 0:
            return TensorRef(-1, 0, 0, str(dtype), shape)
        offset = self.allocator.alloc(nbytes)
        if offset is not None:
            self.blocks.append(offset)
            copy_into(self.segment.view(offset, nbytes, dtype, shape), t)
            return TensorRef(-1, offset, nbytes, str(dtype), shape)
        # Note [Oversize payloads]: a one-off segment, mapped once on each side and closed after the
        # call. It costs fresh pages and a descriptor, never a pickle of the data.
        fd = create_memfd(nbytes, "torchpool-oversize")
        self.fds.append(fd)
        copy_into(Segment(fd, nbytes).view(0, nbytes, dtype, shape), t)
        return TensorRef(len(self.fds) - 1, 0, nbytes, str(dtype), shape)

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
              on_input_free: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Tensors for *refs*: views of *segment* or of the passed descriptors (which this closes).

    With *on_free* (the web process reading results), small arena tensors are copied out and their
    block freed at once; large ones are zero-copy views whose block is freed when they are collected.
    Without it (the worker reading inputs) every tensor is a plain view.
    """
    extra = []
    try:
        for fd, ref in zip(fds, _seg_refs(refs, len(fds))):
            extra.append(Segment(fd, ref.nbytes))
    finally:
        for fd in fds:
            os.close(fd)
    out = []
    for ref in refs:
        dtype = dtype_from_name(ref.dtype)
        if ref.seg >= 0:
            out.append(extra[ref.seg].view(0, ref.nbytes, dtype, ref.shape))
        elif ref.seg == INPUT_ALIAS and on_free is not None and ref.nbytes:
            if ref.nbytes < ZERO_COPY_MIN_BYTES or on_input_free is None:
                out.append(segment.view(ref.offset, ref.nbytes, dtype, ref.shape).clone())
            else:
                out.append(segment.owned_view(ref.offset, ref.nbytes, dtype, ref.shape, on_input_free))
        elif on_free is None or ref.nbytes == 0:
            out.append(segment.view(ref.offset, ref.nbytes, dtype, ref.shape))
        elif ref.nbytes < ZERO_COPY_MIN_BYTES:
            out.append(segment.view(ref.offset, ref.nbytes, dtype, ref.shape).clone())
            on_free(ref.offset)
        else:
            # Note [Zero-copy outputs]: copying a large result into freshly allocated pages costs several
            # times a plain memcpy (page faults), so the caller gets the arena bytes themselves and the
            # block goes back to the worker when the tensor is garbage-collected.
            out.append(segment.owned_view(ref.offset, ref.nbytes, dtype, ref.shape, on_free))
    return out


def _seg_refs(refs: tuple[TensorRef, ...], count: int) -> list[TensorRef]:
    by_seg = {ref.seg: ref for ref in refs if ref.seg >= 0}
    return [by_seg[i] for i in range(count)]


class ReleaseQueue:
    """Output blocks the web process no longer needs, sent to the worker with its next call.

    Appends come from garbage collection (any thread, possibly while a lock is held), so this is a
    lock-free deque rather than anything that could deadlock."""

    def __init__(self) -> None:
        self._items: deque[int] = deque()

    def __call__(self, offset: int) -> None:
        self._items.append(offset)

    def drain(self) -> tuple[int, ...]:
        items = []
        try:
            while True:
                items.append(self._items.popleft())
        except IndexError:
            pass
        return tuple(items)
