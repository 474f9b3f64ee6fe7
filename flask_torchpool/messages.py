"""The wire: the messages of the three protocols (:mod:`flask_torchpool.channel` carries them).

Three protocols, each with its own allow-list, so that a peer of one can never send a message of another:

* the **worker protocol** (:data:`WORKER_PROTOCOL`), between a pool (the supervisor in the web process or
  the pool server) and its model worker over a socketpair: :class:`Call`, :class:`Cancel`,
  :class:`Credit`, :class:`Stop` one way; :class:`Loaded`, :class:`Ready`, :class:`StartupFailed`,
  :class:`Result`, :class:`Failure`, :class:`StreamChunk`, :class:`StreamEnd` the other,
  :class:`Adopt` for Note [Shared weights], and :class:`OpenLane` and :class:`CloseLanes` (Note [Lanes]);
* the **lane protocol** (:data:`LANE_PROTOCOL`), between an attached web process and one worker
  (Note [Lanes] in :mod:`flask_torchpool.lanes`): :class:`Call` (with its deadline) and :class:`Cancel`
  one way, :class:`Result` and :class:`Failure` the other, :class:`Stop` both ways;
* the **attach protocol** (:data:`ATTACH_PROTOCOL`), between an attached web process and the pool server
  over a Unix socket: :class:`Hello`, :class:`RemoteCall`, :class:`StatusRequest`, :class:`Cancel`,
  :class:`Credit`, :class:`Observed` one way; :class:`Welcome`, :class:`LaneOffer`, :class:`Result`,
  :class:`RemoteError`, :class:`StatusReply`, :class:`StreamChunk`, :class:`StreamEnd` the other.

A stream (Note [Streams] in :mod:`flask_torchpool.streaming`) is a :class:`Call` (or :class:`RemoteCall`)
with a credit *window* > 0: the answer is zero or more :class:`StreamChunk` (each one like a
:class:`Result`), then :class:`StreamEnd` or :class:`Failure`; the caller hands credits back with
:class:`Credit` as it consumes chunks, and stops the stream with :class:`Cancel`.

Tensors never travel in a message: a message carries :class:`~flask_torchpool.shm.TensorRef` into shared
memory, and descriptors of one-off segments pass beside it (``SCM_RIGHTS``). Nothing is pickled: see
Note [The wire format] for the bytes, and the bounds every received message is checked against.
"""

from __future__ import annotations

import errno
import math
import struct
from typing import Any, Callable, NamedTuple

from . import codec
from .codec import ValueReader, WireFormatError, encode_value
from .deadlines import MAX_TIMEOUT
from .shm import INLINE, INPUT_ALIAS, TensorRef

# --- the worker protocol ---------------------------------------------------------------------------------


class Call(NamedTuple):
    id: int
    args: Any
    kwargs: Any
    refs: tuple[TensorRef, ...]
    releases: tuple[int, ...]  # output blocks the web process is done with
    method: str | None = None  # the model's method to run; None: the model itself (forward)
    window: int = 0            # > 0: a stream, with this many chunks of credit; 0: a plain call
    deadline: float = 0.0      # a direct call's deadline (CLOCK_MONOTONIC seconds); 0: none (Note [Lanes])
    inline: bytes | bytearray = b""  # the bytes of the refs with seg INLINE (Note [Inline tensors])


class Cancel(NamedTuple):
    id: int


class Stop(NamedTuple):
    pass


class CloseLanes(NamedTuple):
    """The pool drains: the worker tells its lanes to stop, opens none, and serves what they queued."""


class Credit(NamedTuple):
    """The caller of stream *id* consumed *chunks* more chunks (the worker may produce that many more);
    *releases*: output blocks it is done with (a worker running a stream gets no :class:`Call` to carry
    them)."""

    id: int
    chunks: int
    releases: tuple[int, ...]


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
    """The model could not be built: the fields of an :class:`~flask_torchpool.errors.WireError`
    (:func:`~flask_torchpool.errors.to_wire` of a ``WorkerStartupError``)."""

    type_name: str
    message: str
    retry_after: int | None
    extra: dict[str, Any]
    tb: str | None


class Result(NamedTuple):
    id: int
    value: Any
    refs: tuple[TensorRef, ...]
    inline: bytes | bytearray = b""  # as Call.inline


class StreamChunk(NamedTuple):
    """One output of stream *id*, laid out like a :class:`Result`."""

    id: int
    value: Any
    refs: tuple[TensorRef, ...]
    inline: bytes | bytearray = b""  # as Call.inline


class StreamEnd(NamedTuple):
    """Stream *id* ended (its generator finished, or was closed after a :class:`Cancel`) after *chunks*
    chunks. A stream that fails ends with a :class:`Failure` instead."""

    id: int
    chunks: int


class Failure(NamedTuple):
    """Call *id* failed: the fields of an :class:`~flask_torchpool.errors.WireError` (the worker's
    :func:`~flask_torchpool.errors.to_wire` of the error the caller gets)."""

    id: int
    type_name: str
    message: str
    retry_after: int | None
    extra: dict[str, Any]
    tb: str | None



class OpenLane(NamedTuple):
    """The pool server gives the worker a lane to one attached web process (Note [Lanes] in
    :mod:`flask_torchpool.lanes`): the lane's socket and arena are the two descriptors sent along; what the
    web process sends on it is at most *max_bytes* a message."""

    lane: int
    max_bytes: int


# --- the attach protocol -----------------------------------------------------------------------------

#: Bumped when the attach protocol changes; a client and a server of different versions refuse each other.
PROTOCOL_VERSION = 6  # 5: RemoteCall.numpy; 6: inline tensors on lanes (Note [Inline tensors])


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
    method: str | None = None  # as Call.method
    stream: bool = False       # answered with StreamChunk ... StreamEnd (credits: Credit)
    numpy: bool = False        # the caller passed numpy arrays (Call.numpy): the server reads and answers
                               # them as numpy arrays, and needs no torch for it
    retried: bool = False      # sent again after its worker died running it on a lane: one retry used


class RemoteError(NamedTuple):
    id: int
    type_name: str          # a flask_torchpool.errors class
    message: str
    retry_after: int | None
    extra: dict[str, Any]
    tb: str | None          # the worker's traceback, when there is one


class LaneOffer(NamedTuple):
    """The pool server gives this web process a lane straight to worker *worker* of *model* (Note [Lanes]
    in :mod:`flask_torchpool.lanes`): the lane's socket and its arena of *arena_bytes* are the two
    descriptors sent along."""

    model: str
    worker: int
    lane: int
    arena_bytes: int


class Observed(NamedTuple):
    """Calls this web process made on its lanes to *model* ended: their outcomes (``metrics.OUTCOMES``)
    and latencies, in the same order, for the server's metrics (Note [Lanes])."""

    model: str
    outcomes: tuple[str, ...]
    seconds: tuple[float, ...]


class StatusRequest(NamedTuple):
    id: int


class StatusReply(NamedTuple):
    id: int
    status: dict[str, Any]


class ReloadRequest(NamedTuple):
    """``flask torchpool reload``: reload *model* (None: every model, or the default one with *spec*).
    Answered by a :class:`StatusReply` whose status is ``{"error": str | None, "versions": {...}}``."""

    id: int
    model: str | None
    spec: str | None        # another factory or file ('package.module:callable', a path); None: the same
    version: str | None     # a label for the new version



# --- the wire format ----------------------------------------------------------------------------------
#
# Note [The wire format]
# ~~~~~~~~~~~~~~~~~~~~~~
# A message is one frame of multiprocessing's Connection (a length, then that many bytes), at most
# Channel.max_bytes long, then, when it announces descriptors, one byte carrying them (SCM_RIGHTS).
# The frame starts with a fixed header: the message's type code (uint8) and how many descriptors follow
# (uint8, at most MAX_FDS). The hot messages (Call, Result, RemoteCall) go on with a fixed struct of
# their numbers (id, counts, timeout), then one fixed record per TensorRef (seg int32, offset and
# nbytes uint64, dtype code uint8 from codec.DTYPE_NAMES, ndim uint8, then ndim int64 dimensions),
# then the released offsets (uint64 each), then (Call, Result, StreamChunk) the bytes of the inline
# tensors (Note [Inline tensors] in shm.py: as many as their references name, which must lie in
# order and back to back, none empty), then their values in the tagged encoding of codec (Note
# [Tagged values]). Every other message is a tagged tuple of its fields, each type-checked before the
# NamedTuple is built with its constructor. A type code outside the channel's protocol, a count or
# length past the bytes received, an unknown dtype code, a negative dimension, a Slot past the refs,
# inline tensors out of order or past the frame, a descriptor count that does not match the one-off
# segments, bytes left over, a timeout that is not a number of seconds > 0 and at most MAX_TIMEOUT, or a
# deadline that is not a finite number >= 0: each is a ProtocolError, and the descriptors received with
# the message are closed. No received byte names a class or reaches an attribute. Whether a reference's
# nbytes matches its shape and lies inside the memory it names is checked where the memory is known
# (shm.read_refs), and fails that call only.

#: Descriptors one message may carry (Linux's SCM_MAX_FD).
MAX_FDS = 253
#: Dimensions a tensor may have.
MAX_NDIM = 32
#: Default size bound of one message: the worker protocol (the pool server bounds its clients' lower).
MAX_MESSAGE_BYTES = 1 << 30


class ProtocolError(OSError):
    """A peer sent bytes that are not a message of the channel's protocol; the connection is dropped
    (an ``OSError``, like a broken connection, so every reader treats it as one)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPROTO, message)


_FRAME = struct.Struct("<BB")
_CALL = struct.Struct("<qIIId")
_RESULT = struct.Struct("<qI")
_CREDIT = struct.Struct("<qII")
_REMOTE_CALL = struct.Struct("<qIIdB")
_REF = struct.Struct("<iQQBB")
_DIMS = tuple(struct.Struct(f"<{n}q") for n in range(MAX_NDIM + 1))
_BATCH, _HAS_TIMEOUT, _STREAM, _NUMPY, _RETRIED = 1, 2, 4, 8, 16
_DTYPE_STRS = codec.DTYPE_NAMES
_tuple_new = tuple.__new__  # builds a NamedTuple from checked fields without its Python __new__

# The value sections of recent hot messages, decoded: most calls of a model repeat the same small
# skeleton (``(Slot(0),)`` and ``{}``). Only deeply immutable values are kept (an empty dict is
# rebuilt on each hit), keyed by their bytes and the number of refs they may name.
_TAILS: dict[tuple[bytes, int], tuple[Any, ...]] = {}
_TAIL_BYTES = 64
_TAILS_KEPT = 256
_EMPTY_DICT = object()


def _immutable(value: Any) -> bool:
    kind = type(value)
    if kind is tuple or kind is codec.Slot:
        return all(_immutable(v) for v in value)
    return kind is not list and kind is not dict


def _values(data: bytes, pos: int, slots: int, count: int) -> tuple[Any, ...]:
    """The *count* tagged values that end the frame *data* at *pos*."""
    tail = data[pos:] if len(data) - pos <= _TAIL_BYTES else None
    if tail is not None:
        hit = _TAILS.get((tail, slots))
        if hit is not None:
            return tuple({} if v is _EMPTY_DICT else v for v in hit)
    reader = ValueReader(data, pos, slots)
    values = tuple(reader.value() for _ in range(count))
    if reader.pos != len(data):
        raise WireFormatError(f"{len(data) - reader.pos} bytes left over")
    if tail is not None and all(v == {} if type(v) is dict else _immutable(v) for v in values):
        if len(_TAILS) >= _TAILS_KEPT:
            _TAILS.clear()
        _TAILS[(tail, slots)] = tuple(_EMPTY_DICT if type(v) is dict else v for v in values)
    return values


def _put_refs(out: bytearray, refs: tuple[TensorRef, ...]) -> None:
    for ref in refs:
        shape = ref.shape
        out += _REF.pack(ref.seg, ref.offset, ref.nbytes, codec.DTYPE_NAME_CODES[ref.dtype], len(shape))
        if shape:
            out += _DIMS[len(shape)].pack(*shape)


def _get_refs(data: bytes, pos: int, count: int, nfds: int, alias: bool, inline: bool = False
              ) -> tuple[tuple[TensorRef, ...], int, int]:
    """The *count* references at *pos*, the position after them, and how many inline bytes they name
    (references with seg INLINE, allowed with *inline*: in order and back to back, Note [Inline
    tensors])."""
    if count * _REF.size > len(data) - pos:
        raise WireFormatError(f"a header announces {count} tensors but is too short for them")
    refs = []
    segs = 0
    inlined = 0
    for _ in range(count):
        seg, offset, nbytes, code, ndim = _REF.unpack_from(data, pos)
        pos += _REF.size
        if ndim > MAX_NDIM:
            raise WireFormatError(f"a tensor of {ndim} dimensions (at most {MAX_NDIM})")
        shape = _DIMS[ndim].unpack_from(data, pos)
        pos += 8 * ndim
        if code >= len(_DTYPE_STRS):
            raise WireFormatError(f"unknown dtype code {code}")
        for dim in shape:
            if dim < 0:
                raise WireFormatError(f"a tensor of shape {shape}")
        if seg >= 0:
            if seg != segs or offset != 0:
                raise WireFormatError("one-off segments must be referred to once each, in order, at "
                                      "offset 0")
            segs += 1
        elif seg == INLINE and inline:
            if offset != inlined:
                raise WireFormatError("inline tensors must lie in order, back to back")
            if not 0 < nbytes <= len(data):
                raise WireFormatError(f"an inline tensor of {nbytes} bytes in a frame of {len(data)}")
            inlined += nbytes
        elif seg != -1 and not (alias and seg == INPUT_ALIAS):
            raise WireFormatError(f"a tensor in segment {seg}")
        refs.append(_tuple_new(TensorRef, (seg, offset, nbytes, _DTYPE_STRS[code], shape)))
    if segs != nfds:
        raise WireFormatError(f"{nfds} descriptors for {segs} one-off segments")
    return tuple(refs), pos, inlined


def _get_inline(data: bytes, pos: int, nbytes: int) -> tuple[bytes, int]:
    if nbytes > len(data) - pos:
        raise WireFormatError(f"a header announces {nbytes} inline bytes but is too short for them")
    return (data[pos:pos + nbytes] if nbytes else b""), pos + nbytes


def _put_releases(out: bytearray, releases: tuple[int, ...]) -> None:
    if releases:
        out += struct.pack(f"<{len(releases)}Q", *releases)


def _get_releases(data: bytes, pos: int, count: int) -> tuple[tuple[int, ...], int]:
    if count * 8 > len(data) - pos:
        raise WireFormatError(f"a header announces {count} released blocks but is too short for them")
    if not count:
        return (), pos
    return struct.unpack_from(f"<{count}Q", data, pos), pos + 8 * count


def _enc_call(msg: Call, out: bytearray) -> None:
    out += _CALL.pack(msg.id, len(msg.refs), len(msg.releases), msg.window, msg.deadline)
    _put_refs(out, msg.refs)
    _put_releases(out, msg.releases)
    out += msg.inline
    encode_value(msg.args, out)
    encode_value(msg.kwargs, out)
    encode_value(msg.method, out)


def _dec_call(data: bytes, pos: int, nfds: int) -> Call:
    call_id, nrefs, nrel, window, deadline = _CALL.unpack_from(data, pos)
    if not (math.isfinite(deadline) and deadline >= 0):
        raise WireFormatError(f"a call's deadline must be a finite number >= 0, not {deadline!r}")
    refs, pos, inlined = _get_refs(data, pos + _CALL.size, nrefs, nfds, False, True)
    releases, pos = _get_releases(data, pos, nrel)
    inline, pos = _get_inline(data, pos, inlined)
    args, kwargs, method = _values(data, pos, nrefs, 3)
    if type(args) is not tuple or type(kwargs) is not dict or not (method is None or type(method) is str):
        raise WireFormatError("a call's arguments must be a tuple and a dict, its method a str or None")
    return _tuple_new(Call, (call_id, args, kwargs, refs, releases, method, window, deadline, inline))


def _enc_result(msg: Result | StreamChunk, out: bytearray) -> None:
    out += _RESULT.pack(msg.id, len(msg.refs))
    _put_refs(out, msg.refs)
    out += msg.inline
    encode_value(msg.value, out)


def _result_decoder(kind: type) -> Callable[[bytes, int, int], Any]:
    def decode(data: bytes, pos: int, nfds: int) -> Any:
        call_id, nrefs = _RESULT.unpack_from(data, pos)
        refs, pos, inlined = _get_refs(data, pos + _RESULT.size, nrefs, nfds, True, True)
        inline, pos = _get_inline(data, pos, inlined)
        (value,) = _values(data, pos, nrefs, 1)
        return _tuple_new(kind, (call_id, value, refs, inline))
    return decode


def _enc_credit(msg: Credit, out: bytearray) -> None:
    out += _CREDIT.pack(msg.id, msg.chunks, len(msg.releases))
    _put_releases(out, msg.releases)


def _dec_credit(data: bytes, pos: int, nfds: int) -> Credit:
    call_id, chunks, nrel = _CREDIT.unpack_from(data, pos)
    releases, pos = _get_releases(data, pos + _CREDIT.size, nrel)
    if nfds or pos != len(data):
        raise WireFormatError("descriptors or bytes left over on a credit")
    return _tuple_new(Credit, (call_id, chunks, releases))


def _enc_remote_call(msg: RemoteCall, out: bytearray) -> None:
    flags = (_BATCH * msg.batch | _HAS_TIMEOUT * (msg.timeout is not None) | _STREAM * msg.stream
             | _NUMPY * msg.numpy | _RETRIED * msg.retried)
    out += _REMOTE_CALL.pack(msg.id, len(msg.refs), len(msg.releases),
                             0.0 if msg.timeout is None else msg.timeout, flags)
    _put_refs(out, msg.refs)
    _put_releases(out, msg.releases)
    encode_value(msg.model, out)
    encode_value(msg.args, out)
    encode_value(msg.kwargs, out)
    encode_value(msg.method, out)


def _dec_remote_call(data: bytes, pos: int, nfds: int) -> RemoteCall:
    call_id, nrefs, nrel, timeout, flags = _REMOTE_CALL.unpack_from(data, pos)
    if flags & ~(_BATCH | _HAS_TIMEOUT | _STREAM | _NUMPY | _RETRIED):
        raise WireFormatError(f"unknown call flags {flags:#x}")
    if flags & _HAS_TIMEOUT and not 0 < timeout <= MAX_TIMEOUT:
        raise WireFormatError(f"a call's timeout must be a number of seconds > 0 and at most "
                              f"{MAX_TIMEOUT:.0f}, not {timeout!r}")
    refs, pos, _ = _get_refs(data, pos + _REMOTE_CALL.size, nrefs, nfds, False)
    releases, pos = _get_releases(data, pos, nrel)
    model, args, kwargs, method = _values(data, pos, nrefs, 4)
    if (model is not None and type(model) is not str) or type(args) is not tuple or type(kwargs) is not dict \
            or (method is not None and type(method) is not str):
        raise WireFormatError("a call's model and method must be a str or None, its arguments a tuple and "
                              "a dict")
    return RemoteCall(call_id, model, args, kwargs, refs, timeout if flags & _HAS_TIMEOUT else None,
                      bool(flags & _BATCH), releases, method, bool(flags & _STREAM),
                      bool(flags & _NUMPY), bool(flags & _RETRIED))


_NONE = type(None)
_INT, _STR, _BOOL, _DICT = (int,), (str,), (bool,), (dict,)
_OPT_INT, _OPT_STR = (int, _NONE), (str, _NONE)
_ERROR_FIELDS = (_STR, _STR, _OPT_INT, _DICT, _OPT_STR)

#: Every message class: its type code, and the types each field may have (hot messages: None, they have
#: their own encoders).
_SCHEMAS: dict[type, tuple[int, tuple[tuple[type, ...], ...] | None]] = {
    Call: (1, None),
    Cancel: (2, (_INT,)),
    Stop: (3, ()),
    Loaded: (4, (_STR, _INT)),
    Adopt: (5, (_BOOL, _BOOL)),
    Ready: (6, (_INT, _DICT)),
    StartupFailed: (7, _ERROR_FIELDS),
    Result: (8, None),
    Failure: (9, (_INT, *_ERROR_FIELDS)),
    Hello: (20, (_INT, _INT, _INT)),
    Welcome: (21, (_INT, _INT, _OPT_STR, _DICT)),
    RemoteCall: (22, None),
    RemoteError: (23, (_INT, *_ERROR_FIELDS)),
    StatusRequest: (24, (_INT,)),
    StatusReply: (25, (_INT, _DICT)),
    StreamChunk: (30, None),
    StreamEnd: (31, (_INT, _INT)),
    Credit: (32, None),
    ReloadRequest: (33, (_INT, _OPT_STR, _OPT_STR, _OPT_STR)),
    OpenLane: (40, (_INT, _INT)),
    LaneOffer: (41, (_STR, _INT, _INT, _INT)),
    Observed: (42, (_STR, (tuple,), (tuple,))),
    CloseLanes: (43, ()),
}
_HOT_ENCODERS: dict[type, Callable[[Any, bytearray], None]] = {
    Call: _enc_call, Result: _enc_result, RemoteCall: _enc_remote_call, StreamChunk: _enc_result,
    Credit: _enc_credit}
_HOT_DECODERS: dict[type, Callable[[bytes, int, int], Any]] = {
    Call: _dec_call, Result: _result_decoder(Result), RemoteCall: _dec_remote_call,
    StreamChunk: _result_decoder(StreamChunk), Credit: _dec_credit}


class Protocol(NamedTuple):
    """The messages a channel may receive: type code -> class."""

    name: str
    types: dict[int, type]


def _protocol(name: str, *types: type) -> Protocol:
    return Protocol(name, {_SCHEMAS[cls][0]: cls for cls in types})


#: Between a pool and its workers.
WORKER_PROTOCOL = _protocol("worker", Call, Cancel, Stop, Loaded, Adopt, Ready, StartupFailed, Result,
                            Failure, StreamChunk, StreamEnd, Credit, OpenLane, CloseLanes)
#: A lane, between an attached web process and one worker (Note [Lanes]): calls and cancels one way,
#: results and failures the other; Stop both ways (the worker retires, the web process agrees).
LANE_PROTOCOL = _protocol("lane", Call, Cancel, Stop, Result, Failure)
#: Between an attached web process and the pool server.
ATTACH_PROTOCOL = _protocol("attach", Hello, Welcome, RemoteCall, RemoteError, StatusRequest, StatusReply,
                            Result, StreamChunk, StreamEnd, Credit, Cancel,
                            ReloadRequest, LaneOffer, Observed)


def encode(msg: Any, nfds: int = 0) -> bytearray:
    """The frame of *msg*, announcing *nfds* descriptors sent beside it (Note [The wire format])."""
    kind = type(msg)
    code, _ = _SCHEMAS[kind]
    out = bytearray(_FRAME.pack(code, nfds))
    hot = _HOT_ENCODERS.get(kind)
    if hot is not None:
        hot(msg, out)
    else:
        encode_value(tuple(msg), out)
    return out


def peek(data: bytes, protocol: Protocol) -> tuple[type, int]:
    """The class and descriptor count a frame announces, refused unless *protocol* allows them."""
    if len(data) < _FRAME.size:
        raise ProtocolError(f"a {len(data)}-byte message on the {protocol.name} protocol")
    code, nfds = _FRAME.unpack_from(data)
    kind = protocol.types.get(code)
    if kind is None:
        known = {c: k.__name__ for k, (c, _) in _SCHEMAS.items()}
        raise ProtocolError(f"refusing a message of type {known.get(code, code)!r} on the {protocol.name} "
                            "protocol")
    if nfds > MAX_FDS:
        raise ProtocolError(f"a message announces {nfds} descriptors (at most {MAX_FDS})")
    return kind, nfds


def decode(data: bytes, protocol: Protocol) -> tuple[int, Any]:
    """``(descriptor count, message)`` of one frame of *protocol*; :class:`ProtocolError` when it is not
    one (Note [The wire format])."""
    data = bytes(data)
    kind, nfds = peek(data, protocol)
    return nfds, decode_frame(data, protocol, kind, nfds)


def decode_frame(data: bytes, protocol: Protocol, kind: type, nfds: int) -> Any:
    pos = _FRAME.size
    try:
        hot = _HOT_DECODERS.get(kind)
        if hot is not None:
            return hot(data, pos, nfds)
        if nfds and kind not in (Hello, Adopt, OpenLane, LaneOffer):
            raise WireFormatError("descriptors on a message that carries none")
        reader = ValueReader(data, pos)
        fields = reader.value()
        pos = reader.pos
        types = _SCHEMAS[kind][1] or ()
        if type(fields) is not tuple or len(fields) != len(types):
            raise WireFormatError("wrong number of fields")
        for value, allowed in zip(fields, types):
            if type(value) not in allowed:
                raise WireFormatError(f"a field of type {type(value).__name__}")
        msg = kind(*fields)
    except (WireFormatError, struct.error) as exc:
        reason = exc if isinstance(exc, WireFormatError) else "it ends in the middle of a field"
        raise ProtocolError(f"a bad {kind.__name__} on the {protocol.name} protocol: {reason}") from None
    if pos != len(data):
        raise ProtocolError(f"a {kind.__name__} on the {protocol.name} protocol with "
                            f"{len(data) - pos} bytes left over")
    return msg
