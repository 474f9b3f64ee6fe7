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

Note [Bodies straight from gunicorn's socket]: gunicorn's reader of a body (``wsgi.input``, which is
``request.stream`` there) hands out what it receives through two ``BytesIO`` buffers, copying every
chunk several times into freshly allocated blocks; in a web process that also holds torch, the C
allocator kept giving those blocks back to the kernel and faulting them in again (7-8 ``brk`` calls and
2 ms more system time per 16 MiB request). When *stream* is that reader, for a body of known length
(``Content-Length``; a chunked body takes the general way), :func:`tensor_from_stream` takes the bytes
gunicorn has buffered already and then ``recv_into`` the tensor's own memory from the client's socket:
the kernel writes the body where the model reads it, and nothing else copies it. It keeps gunicorn's
count of the body's bytes left, never reads past the body (the bytes of a pipelined request behind it
stay for gunicorn), and marks the reader failed when the socket raises, so that gunicorn closes the
connection as its own reader would. 16 MiB bodies, attached (two sync web workers): 4.8-4.9 against
12.5-12.7 ms of CPU per request, 197-199 against 122-127 requests/s (docs/benchmarks.rst).

Given a numpy dtype, :func:`tensor_from_stream` makes a numpy array the same way, over the same kind of
buffer, and loads no torch (Note [Arrays without torch] in ``codec.py``).
"""

from __future__ import annotations

import ctypes
import io
import math
import socket
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
    if _gunicorn_body(stream):
        return _fill_from_gunicorn(stream, view)
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


def _gunicorn_body(stream: Any) -> bool:
    """Whether *stream* is gunicorn's reader of a body of known length (``Content-Length``) on a socket:
    Note [Bodies straight from gunicorn's socket]."""
    if type(stream).__name__ != "Body" or type(stream).__module__ != "gunicorn.http.body":
        return False
    reader = getattr(stream, "reader", None)
    unreader = getattr(reader, "unreader", None)
    return (type(reader).__name__ == "LengthReader" and isinstance(getattr(reader, "length", None), int)
            and isinstance(getattr(unreader, "sock", None), socket.socket)
            and isinstance(getattr(unreader, "buf", None), io.BytesIO)
            and isinstance(getattr(stream, "buf", None), io.BytesIO))


def _take(buf: io.BytesIO, view: memoryview, limit: int) -> tuple[io.BytesIO, int]:
    """Move up to *limit* bytes from the front of *buf* (all of whose content is buffered bytes, as
    gunicorn keeps it) into *view*: the buffer of what is left, and the bytes moved."""
    held = buf.getbuffer()
    try:
        got = min(limit, len(held))
        if not got:
            return buf, 0
        view[:got] = held[:got]
        rest = bytes(held[got:])
    finally:
        held.release()
    left = io.BytesIO()
    left.write(rest)
    return left, got


def _fill_from_gunicorn(body: Any, view: memoryview) -> int:
    """Note [Bodies straight from gunicorn's socket]: read what gunicorn buffered already, then
    ``recv_into`` *view* from the client's socket, keeping gunicorn's count of the body's bytes left
    (and any bytes of the next request, behind the body) as its own reader would."""
    reader = body.reader
    unreader = reader.unreader
    size = len(view)
    try:
        body.buf, pos = _take(body.buf, view, size)
        if pos < size and reader.length > 0:
            unreader.buf, got = _take(unreader.buf, view[pos:], min(size - pos, reader.length))
            reader.length -= got
            pos += got
        sock = unreader.sock
        while pos < size and reader.length > 0:
            got = sock.recv_into(view[pos:pos + min(size - pos, reader.length)])
            if not got:
                break
            reader.length -= got
            pos += got
    except BaseException:
        body.failed = True  # where the next request starts is unknown: gunicorn must not reuse the socket
        raise
    return pos


def _wrong_size(got: int, nbytes: int, dtype: torch.dtype | numpy.dtype[Any], dims: list[int]) -> str:
    return (f"the body has {got} bytes; a {dtype} tensor of shape {tuple(dims)} needs {nbytes} "
            f"({dtype.itemsize} bytes per element)")
