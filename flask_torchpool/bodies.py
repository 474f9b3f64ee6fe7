"""Request bodies read straight into a tensor: :func:`tensor_from_stream`.

Note [Reading big bodies]: ``request.get_data()`` followed by ``torch.frombuffer`` costs a 16 MiB body
several full-size copies in the web process (the HTTP server's buffer, its slices, werkzeug's join),
each into freshly allocated pages (the C allocator hands blocks that large back to the kernel when
they are freed, so every request pays the page faults again). With a few threads reading bodies at
once, one gunicorn ``gthread`` process spent about 45 ms of CPU per 16 MiB request, two thirds of it in
the kernel. Reading the body in bounded chunks (``readinto`` where the stream has it) into one tensor
allocated at its final size halves that: the chunks stay in cache and their blocks are reused, and the
tensor is the only full-size allocation. The pool then moves it into shared memory with one memmove.
Measured with ``benchmarks/http.py --workloads payload-16m`` (docs/benchmarks.rst).

Given a numpy dtype, :func:`tensor_from_stream` makes a numpy array the same way, over the same kind of
buffer, and loads no torch (Note [Arrays without torch] in ``codec.py``).
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from flask import has_request_context, request

from . import codec, shm, staging
from .errors import InvalidInputError, PayloadTooLargeError

if TYPE_CHECKING:
    import numpy
    import torch

#: Bytes read from the stream per step: large enough that per-call overhead vanishes, small enough that
#: the HTTP server's buffers for it are reused rather than mapped afresh each time.
CHUNK_BYTES = 1 << 20


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def tensor_from_stream(stream: _Readable, dtype: Any, shape: Sequence[int], *,
                       length: int | None = None, max_bytes: int | None = None) -> Any:
    """A tensor of *dtype* and *shape* holding the raw bytes of *stream* (native byte order), read in
    bounded chunks straight into the tensor's memory. With a numpy dtype (``numpy.float32``,
    ``numpy.dtype("int64")``, ...) it is a numpy array instead, and torch is not loaded.

    *stream* is anything with ``read(n)`` (``request.stream`` in a Flask view); ``readinto`` is used when
    it has one. One dimension of *shape* may be ``-1``: it is worked out from the body's *length* in
    bytes (default: the stream's ``limit``, or, for ``request.stream``, the request's
    ``Content-Length``).

    Raises :class:`~flask_torchpool.InvalidInputError` (HTTP 400) when the body is shorter or longer than
    the tensor, or its length does not fit the shape, and :class:`~flask_torchpool.PayloadTooLargeError`
    (HTTP 413) before reading anything when the tensor would exceed *max_bytes*. A client that
    disconnects mid-body raises what the stream raises (werkzeug: ``ClientDisconnected``, a 400).
    """
    dtype, arrays = _dtype(dtype)
    itemsize = dtype.itemsize
    dims = [int(d) for d in shape]
    if sum(1 for d in dims if d == -1) > 1 or any(d < -1 for d in dims):
        raise ValueError(f"shape {tuple(dims)}: dimensions must be >= 0, with at most one -1")
    if length is None:
        length = _known_length(stream)
    if -1 in dims:
        if length is None:
            raise InvalidInputError(f"a body of unknown length cannot fill shape {tuple(dims)}: send a "
                                    "Content-Length, or give the shape in full")
        known = math.prod(d for d in dims if d != -1) * itemsize
        if known == 0 or length % known:
            raise InvalidInputError(f"a body of {length} bytes is not a whole number of {dtype} tensors "
                                    f"of shape {tuple(dims)}")
        dims[dims.index(-1)] = length // known
    nbytes = math.prod(dims) * itemsize
    if max_bytes is not None and nbytes > max_bytes:
        raise PayloadTooLargeError(f"a body of {nbytes} bytes exceeds TORCHPOOL_MAX_INPUT_BYTES="
                                   f"{max_bytes}")
    if length is not None and length != nbytes:
        raise InvalidInputError(_wrong_size(length, nbytes, dtype, dims))
    out: Any
    if arrays:
        import numpy

        out = (staging.buffers.array(nbytes, dtype, tuple(dims)) if nbytes >= staging.MIN_BYTES
               else numpy.empty(dims, dtype=dtype))
    else:
        import torch

        out = (staging.buffers.tensor(nbytes, dtype, tuple(dims)) if nbytes >= staging.MIN_BYTES
               else torch.empty(dims, dtype=dtype))
    if nbytes:
        view = memoryview((ctypes.c_ubyte * nbytes).from_address(shm.dense_address(out))).cast("B")
        got = _fill(stream, view)
        if got < nbytes:
            raise InvalidInputError(_wrong_size(got, nbytes, dtype, dims))
    if length is None and stream.read(1):
        raise InvalidInputError(f"the body is longer than the {nbytes} bytes of a {dtype} tensor of "
                                f"shape {tuple(dims)}")
    return out


def _dtype(dtype: Any) -> tuple[Any, bool]:
    """(*dtype*, whether it is numpy's) for a torch dtype or a numpy one (a dtype, or a type such as
    ``numpy.float32``) of a dtype that may travel; TypeError otherwise."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(dtype, torch.dtype):
        return dtype, False
    if type(dtype).__module__.startswith("numpy") or getattr(dtype, "__module__", "") == "numpy":
        import numpy

        np_dtype = numpy.dtype(dtype)
        reason = codec.numpy_dtype_refusal(np_dtype)
        if reason is not None:
            raise TypeError(reason)
        return np_dtype, True
    raise TypeError(f"dtype must be a torch.dtype or a numpy dtype, not {type(dtype).__name__}")


def _known_length(stream: Any) -> int | None:
    """The body's length, when something knows it: werkzeug's ``LimitedStream`` (its ``limit``), or the
    request's ``Content-Length`` when *stream* is ``request.stream`` (gunicorn sets
    ``wsgi.input_terminated``, so there ``request.stream`` is the server's own reader, without a
    limit)."""
    limit = getattr(stream, "limit", None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        return limit
    if has_request_context() and stream is request.stream:
        return request.content_length
    return None


def _fill(stream: Any, view: memoryview) -> int:
    """Read into *view* until it is full or the stream ends; the bytes read."""
    readinto = getattr(stream, "readinto", None)
    pos, size = 0, len(view)
    while pos < size:
        step = min(CHUNK_BYTES, size - pos)
        if readinto is not None:
            got = readinto(view[pos:pos + step])
            if got is None:  # a non-blocking stream with nothing ready: not a request body
                raise InvalidInputError("the body stream returned no data (a non-blocking stream?)")
        else:
            data = stream.read(step)
            got = len(data)
            if got > step:
                raise InvalidInputError("the body stream returned more bytes than were asked for")
            view[pos:pos + got] = data
        if not got:
            break
        pos += got
    return pos


def _wrong_size(got: int, nbytes: int, dtype: torch.dtype | numpy.dtype[Any], dims: list[int]) -> str:
    return (f"the body has {got} bytes; a {dtype} tensor of shape {tuple(dims)} needs {nbytes} "
            f"({dtype.itemsize} bytes per element)")
