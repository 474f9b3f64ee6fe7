"""Shared buffers for big request bodies: tensors a worker maps instead of the web process copying them.

Note [Body buffers]: :func:`flask_torchpool.bodies.tensor_from_stream` reads a big body (at least
:data:`MIN_BYTES`) into a tensor backed by a sealed memfd of its own. When such a tensor is an argument
of a call, :meth:`flask_torchpool.shm.Placer.place` sends a duplicate of that descriptor (a one-off
segment, Note [Oversize payloads]) instead of copying the bytes into the arena, so the body is written
once, by the read, and never copied again in the web process.

A fresh memfd costs its pages again on every use (allocating and zeroing 16 MiB of shared memory took
about 22 ms here, against 2 ms to refill one already faulted in), so buffers are reused: when the last
view of a tensor is garbage-collected its buffer goes back to a free list holding at most
:data:`IDLE_BYTES` (anything beyond that is closed), and a body takes the smallest idle buffer of at
least its size (rounded up to :data:`GRANULE`) and at most twice that.

Lifetime and isolation: a buffer belongs to one web process (the free list is emptied in a forked
child, so two processes never share one). A worker maps it for the call it came with and unmaps it
when the call ends. A call that the web process gave up on (its deadline passed) may still be running
in its worker when its tensor is collected and the buffer reused for the next body of the same
process: that worker then reads newer bytes of the same web process for a result nobody will read.
No other web process's data is ever involved.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Any

from . import shm

if TYPE_CHECKING:
    import numpy
    import torch

#: Bodies smaller than this are read into ordinary memory and copied into the arena: below it, the
#: descriptor's round trip and the worker's mapping cost more than the copy saves.
MIN_BYTES = 2 * 1024 * 1024
#: Buffers are sized in multiples of this, so bodies of nearly the same size share them.
GRANULE = 1024 * 1024
#: At most this many bytes of idle buffers are kept for reuse in a process.
IDLE_BYTES = 256 * 1024 * 1024


class _Buffer:
    __slots__ = ("fd", "segment")

    def __init__(self, size: int) -> None:
        self.fd = shm.create_memfd(size, "torchpool-body")
        try:
            self.segment = shm.Segment(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        # The mapping goes with the last reference to the segment (a tensor may still export it).
        os.close(self.fd)


class _Buffers:
    def __init__(self) -> None:
        # Reentrant: a buffer's finalizer may run inside a garbage collection started under the lock.
        self._lock = threading.RLock()
        self._idle: dict[int, list[_Buffer]] = {}
        self._idle_bytes = 0

    def tensor(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of *nbytes* over a buffer of its own; the buffer is registered with
        :mod:`~flask_torchpool.shm` until the tensor (every view of it) is gone."""
        return self._make(nbytes, dtype, shape, shm.Segment.owned_view)  # type: ignore[no-any-return]

    def array(self, nbytes: int, dtype: numpy.dtype[Any], shape: tuple[int, ...]) -> numpy.ndarray:
        """:meth:`tensor` as a numpy array (no torch)."""
        return self._make(nbytes, dtype, shape, shm.Segment.owned_array)  # type: ignore[no-any-return]

    def _make(self, nbytes: int, dtype: Any, shape: tuple[int, ...], owned: Any) -> Any:
        size = -(-nbytes // GRANULE) * GRANULE
        with self._lock:
            # Best fit within twice the size: bodies of varying sizes still find a used buffer.
            fits = [s for s, free in self._idle.items() if free and size <= s <= 2 * size]
            buf = self._idle[min(fits)].pop() if fits else None
            if buf is not None:
                self._idle_bytes -= buf.segment.size
        if buf is None:
            buf = _Buffer(size)
        address = shm.address_of(buf.segment.buffer)
        out = owned(buf.segment, 0, nbytes, dtype, shape,
                    functools.partial(self._release, buf, address, os.getpid()))
        shm.shared_tensors[address] = buf.fd
        return out

    def _release(self, buf: _Buffer, address: int, pid: int, _offset: int) -> None:
        shm.shared_tensors.pop(address, None)
        size = buf.segment.size
        with self._lock:
            if pid == os.getpid() and self._idle_bytes + size <= IDLE_BYTES:
                self._idle.setdefault(size, []).append(buf)
                self._idle_bytes += size
                return
        buf.close()

    def idle_bytes(self) -> int:
        """Bytes of buffers kept for reuse."""
        with self._lock:
            return self._idle_bytes

    def release_idle(self) -> None:
        """Close every idle buffer (they are made again when needed)."""
        with self._lock:
            idle = [buf for free in self._idle.values() for buf in free]
            self._idle.clear()
            self._idle_bytes = 0
        for buf in idle:
            buf.close()

    def forget(self) -> None:
        """In a forked child: never hand out (or take back) the parent's buffers."""
        self._lock = threading.RLock()  # the parent's may have been held by another thread
        self.release_idle()
        shm.shared_tensors.clear()


buffers = _Buffers()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=buffers.forget)
