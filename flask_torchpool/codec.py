"""The value codec: a call's arguments or a model's output <-> a skeleton of plain values plus tensors.

:func:`flatten` copies a structure of tensors, ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
``bytes`` and tuples, lists and dicts of them, replacing each tensor by a :class:`Slot` into a list of
tensors; :func:`unflatten` is its inverse. Anything else is refused with :class:`UnsupportedValue`, which
says where it was, so a header never carries an arbitrary object. The pool, the attached client, the
pool server, the worker and inline mode all validate values here, so every backend accepts and refuses
the same values with the same messages.

It also encodes skeletons for the wire (Note [Tagged values]): :func:`encode_value` and
:func:`decode_value`, a small tagged format with no shared references and no classes, decoded under a
budget (depth, nodes, bytes); and the fixed table of dtypes that may travel (:data:`DTYPE_NAMES`).

Note [Arrays without torch]: this module, :mod:`flask_torchpool.shm` and the attached client import no
torch, so that an attached web process whose views pass numpy arrays never loads it (~150 MiB of
private memory per process). A value is a torch tensor only if torch is loaded (:func:`tensor_type`);
numpy arrays travel like tensors, with the same wire dtypes (:data:`NUMPY_NAMES`).

Note [A pool server without torch]: the process that runs a process pool (the pool server, or an
embedded web process) only moves bytes, so it loads torch only for a call that has a torch tensor or
no array at all. The pool keeps numpy arrays as they are (``streaming.new_call(..., arrays=True)``),
writes them into arenas and batch rows with ``numpy.copyto`` (:func:`flask_torchpool.shm.write`) and
reads an answer as numpy arrays when every caller waiting for it passed numpy arrays
(:func:`flask_torchpool.outputs.split`); an attached client flags such calls (``RemoteCall.numpy``) and
the server reads and answers them with numpy. Workers are launched through the standard library's spawn
context and import their module themselves (:func:`flask_torchpool.forkserver.run_worker`), and GPUs are
counted with torch only on a host with a GPU driver. A rolling reload's warm-up, inline mode and the
Ray backend load torch on first use. docs/design.rst, "A pool server without torch".
"""

from __future__ import annotations

import struct
import sys
from typing import TYPE_CHECKING, Any, NamedTuple

from .deadlines import MAX_TIMEOUT, seconds_ok

if TYPE_CHECKING:
    import numpy
    import torch
    from typing_extensions import TypeIs

_SCALARS = (type(None), bool, int, float, complex, str, bytes)


class Slot(NamedTuple):
    """Stands in a skeleton for the tensor ``refs[index]``."""

    index: int  # type: ignore[assignment]  # shadows tuple.index, which no one calls on a Slot



class UnsupportedValue(Exception):
    """A value cannot travel; ``path`` says where it was (e.g. ``args[0]['x']``)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


_tensor: type | None = None
_size: type | None = None   # torch.Size, set with _tensor
_ndarray: type | None = None


def tensor_type() -> type | None:
    """``torch.Tensor`` once torch is loaded in this process, else None (nothing can be a tensor)."""
    global _tensor, _size
    if _tensor is None:
        torch = sys.modules.get("torch")
        tensor = getattr(torch, "Tensor", None)
        if isinstance(tensor, type) and hasattr(torch, "strided"):  # torch fully imported
            _tensor, _size = tensor, getattr(torch, "Size", None)
    return _tensor


def ndarray_type() -> type | None:
    """``numpy.ndarray`` once numpy is loaded in this process, else None."""
    global _ndarray
    if _ndarray is None:
        np = sys.modules.get("numpy")
        nd = getattr(np, "ndarray", None)
        if isinstance(nd, type):
            _ndarray = nd
    return _ndarray


def is_array(x: Any) -> TypeIs[numpy.ndarray]:
    """Is *x* a numpy array (not a torch tensor)?"""
    nd = ndarray_type()
    return nd is not None and isinstance(x, nd)


def tensor_nbytes(t: torch.Tensor | numpy.ndarray) -> int:
    """Bytes of a tensor's or a numpy array's elements."""
    if is_array(t):
        return int(t.nbytes)
    return int(t.numel() * t.element_size())


def wire_dtype(t: torch.Tensor | numpy.ndarray) -> str:
    """The wire name of a tensor's or array's dtype, ``str(torch dtype)`` (e.g. ``"torch.float32"``)."""
    if is_array(t):
        return NUMPY_NAMES[t.dtype.name]
    return str(t.dtype)


def numpy_dtype_refusal(dtype: numpy.dtype[Any]) -> str | None:
    """Why numpy arrays of *dtype* cannot travel (no wire dtype: objects, strings, records, big-endian),
    or None when they can."""
    if dtype.isnative and dtype.name in NUMPY_NAMES:
        return None
    return (f"a numpy array of dtype {dtype.str!r} cannot travel; allowed are native-endian "
            f"{', '.join(sorted(NUMPY_NAMES))}")


def check_array(a: numpy.ndarray, path: str) -> None:
    """Refuse numpy arrays whose elements have no wire dtype (:func:`numpy_dtype_refusal`)."""
    reason = numpy_dtype_refusal(a.dtype)
    if reason is not None:
        raise UnsupportedValue(path, reason)


def check_tensor(t: torch.Tensor, path: str) -> None:
    """Refuse tensors whose bytes cannot be placed in shared memory as a dense strided block."""
    torch = sys.modules["torch"]  # loaded: *t* is a tensor

    if str(t.dtype) not in (_torch_dtypes or _by_name()):
        raise UnsupportedValue(path, f"a {t.dtype} tensor cannot travel; allowed dtypes are "
                                     f"{', '.join(sorted(_by_name()))}")
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


def flatten(obj: Any, tensors: list[Any], path: str, sizes: list[int] | None = None,
            depth: int = 0) -> Any:
    """Copy the structure of *obj*, replacing each tensor (or numpy array) by a :class:`Slot` into
    *tensors*.

    Allowed: tensors, numpy arrays, None, bool, int, float, complex, str, bytes, and tuples, lists and
    dicts (with scalar keys) of them, nested at most :data:`MAX_DEPTH` deep. Anything else raises
    :class:`UnsupportedValue`, so a header never carries an arbitrary object. With *sizes*, the length
    of every ``str`` and ``bytes`` value (they travel in the header) is appended to it.
    """
    kind = type(obj)
    if kind in _SCALARS:
        if sizes is not None and (kind is str or kind is bytes):
            sizes.append(len(obj))
        return obj
    tensor = _tensor or tensor_type()
    if tensor is not None and isinstance(obj, tensor):
        check_tensor(obj, path)  # type: ignore[arg-type]
        tensors.append(obj)
        return Slot(len(tensors) - 1)
    if kind.__module__ == "numpy" and is_array(obj):
        check_array(obj, path)
        tensors.append(obj)
        return Slot(len(tensors) - 1)
    if depth >= MAX_DEPTH and kind in (list, tuple, dict):
        raise UnsupportedValue(path, f"nested more than {MAX_DEPTH} levels deep")
    if kind is list:
        return [flatten(v, tensors, f"{path}[{i}]", sizes, depth + 1) for i, v in enumerate(obj)]
    if kind is tuple or kind is _size:   # _size is set once torch is loaded (tensor_type, above)
        return tuple(flatten(v, tensors, f"{path}[{i}]", sizes, depth + 1) for i, v in enumerate(obj))
    if kind is dict:
        out = {}
        for k, v in obj.items():
            if type(k) not in _SCALARS:
                raise UnsupportedValue(f"{path}", f"dict key {k!r} of type {type(k).__qualname__} "
                                                  "is not allowed; use str or int keys")
            if sizes is not None and (type(k) is str or type(k) is bytes):
                sizes.append(len(k))
            out[k] = flatten(v, tensors, f"{path}[{k!r}]", sizes, depth + 1)
        return out
    hint = ""
    if kind.__module__ == "numpy":
        hint = "; convert a numpy scalar with .item()"
    raise UnsupportedValue(path, f"{kind.__module__}.{kind.__qualname__} cannot travel to or from a "
                                 "worker; allowed are tensors, numpy arrays, None, bool, int, float, "
                                 f"complex, str, bytes and tuples, lists and dicts of them{hint}")


class Flat(NamedTuple):
    """One call's arguments, flattened by :func:`flatten_call`."""

    args: Any
    kwargs: Any
    tensors: list[Any]
    #: The call passed numpy arrays and no torch tensor: its outputs come back as numpy arrays.
    numpy: bool


def flatten_call(args: tuple[Any, ...], kwargs: dict[str, Any], max_input_bytes: int,
                 arrays: bool = False) -> Flat:
    """Validate one call's arguments and flatten them.

    Raises :class:`~flask_torchpool.InvalidInputError` for a value that cannot travel and
    :class:`~flask_torchpool.PayloadTooLargeError` past ``TORCHPOOL_MAX_INPUT_BYTES``, which counts the
    bytes of the tensors and of the ``str``/``bytes`` values (they travel in the header). Numpy arrays
    become torch tensors (sharing their memory) unless *arrays* (the attached client, which writes them
    into shared memory itself: Note [Arrays without torch])."""
    from .errors import InvalidInputError, PayloadTooLargeError

    tensors: list[Any] = []
    sizes: list[int] = []
    try:
        skel_args = flatten(tuple(args), tensors, "args", sizes)
        skel_kwargs = flatten(dict(kwargs), tensors, "kwargs", sizes)
    except UnsupportedValue as exc:
        raise InvalidInputError(f"cannot send {exc.path} to a worker: {exc.reason}") from None
    except RecursionError:
        raise InvalidInputError(f"cannot send the arguments to a worker: nested more than {MAX_DEPTH} "
                                "levels deep") from None
    nbytes = sum(tensor_nbytes(t) for t in tensors)
    header = sum(sizes)
    if nbytes + header > max_input_bytes:
        raise PayloadTooLargeError(
            f"the call carries {nbytes} bytes of tensors and {header} bytes of str/bytes values, more "
            f"than TORCHPOOL_MAX_INPUT_BYTES={max_input_bytes}")
    numpy = _ndarray is not None and bool(tensors) and all(is_array(t) for t in tensors)
    if not arrays and _ndarray is not None:
        tensors = [as_tensor(t) if is_array(t) else t for t in tensors]
    return Flat(skel_args, skel_kwargs, tensors, numpy)


def as_tensor(a: numpy.ndarray) -> torch.Tensor:
    """A torch tensor sharing *a*'s memory (a read-only array too: the pool only reads its inputs)."""
    import torch

    if not a.flags.writeable:
        _quiet_read_only()
    return torch.from_numpy(a)


_quiet = False


def _quiet_read_only() -> None:
    """Silence torch's warning that a tensor over a read-only array may not be written, for the calls
    made here only: the pool copies the inputs into shared memory and never writes them."""
    global _quiet
    if not _quiet:
        import warnings

        warnings.filterwarnings("ignore", message="The given NumPy array is not writable",
                                category=UserWarning, module=__name__)
        _quiet = True


def to_numpy(value: Any) -> Any:
    """*value* (a model's output) with every torch tensor turned into a numpy array sharing its memory.
    Raises :class:`UnsupportedValue` for a dtype numpy lacks."""
    tensor = tensor_type()
    if tensor is None:
        return value
    tensors: list[Any] = []
    skel = flatten(value, tensors, "output")
    arrays = []
    for t in tensors:
        if not is_array(t):
            numpy_dtype(str(t.dtype))  # refuses bfloat16 and the like, with the message
            t = t.numpy()
        arrays.append(t)
    return unflatten(skel, arrays)


def check_timeout(timeout: float | None) -> None:
    """Refuse a call deadline that is not None or a number of seconds > 0 and at most
    :data:`~flask_torchpool.deadlines.MAX_TIMEOUT` (a NaN deadline compares false with every other and
    would stall whoever orders deadlines; an infinite one overflows the waits)."""
    if timeout is None:
        return
    if not seconds_ok(timeout):
        raise ValueError(f"timeout must be None or a number of seconds > 0 and at most {MAX_TIMEOUT:.0f}, "
                         f"not {timeout!r}")


def unflatten(skel: Any, tensors: list[Any]) -> Any:
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


# The dtypes that may travel, by wire code (the index). Append only: a code never changes meaning.
_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "complex64", "complex128", "uint8", "int8",
                "int16", "int32", "int64", "bool", "uint16", "uint32", "uint64", "complex32",
                "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
#: Wire code -> the dtype's wire name, ``str(torch dtype)``: a fixed table, nothing received can grow it.
DTYPE_NAMES: tuple[str, ...] = tuple(f"torch.{n}" for n in _DTYPE_NAMES)
#: Wire name -> wire code.
DTYPE_NAME_CODES: dict[str, int] = {n: i for i, n in enumerate(DTYPE_NAMES)}
#: numpy dtype name -> wire name, for the dtypes numpy has (no bfloat16, complex32 or float8).
NUMPY_NAMES: dict[str, str] = {n: f"torch.{n}" for n in _DTYPE_NAMES[:15] if n != "bfloat16"}
#: The wire names of those dtypes.
NUMPY_WIRE_NAMES: frozenset[str] = frozenset(NUMPY_NAMES.values())
_NUMPY_DTYPES: dict[str, Any] = {}
_torch_dtypes: dict[str, Any] | None = None


def _by_name() -> dict[str, Any]:
    """Wire name -> torch dtype, for the dtypes this torch has (imports torch)."""
    global _torch_dtypes
    if _torch_dtypes is None:
        import torch

        _torch_dtypes = {f"torch.{n}": d for n in _DTYPE_NAMES
                         if isinstance(d := getattr(torch, n, None), torch.dtype)}
    return _torch_dtypes


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype a wire name names, from the fixed table; :class:`UnsupportedValue` otherwise."""
    dtype = (_torch_dtypes or _by_name()).get(name)
    if dtype is None:
        raise UnsupportedValue("header", f"unknown dtype {name!r}")
    return dtype  # type: ignore[no-any-return]


def numpy_dtype(name: str) -> numpy.dtype[Any]:
    """The numpy dtype a wire name names; :class:`UnsupportedValue` when numpy has none (bfloat16, ...)."""
    dtype = _NUMPY_DTYPES.get(name)
    if dtype is None:
        short = name.removeprefix("torch.")
        if name not in DTYPE_NAME_CODES:
            raise UnsupportedValue("header", f"unknown dtype {name!r}")
        if NUMPY_NAMES.get(short) != name:
            raise UnsupportedValue("output", f"a {name} tensor has no numpy dtype; return another dtype "
                                             "from the model (e.g. .float()) or pass torch tensors")
        import numpy

        dtype = _NUMPY_DTYPES[name] = numpy.dtype(short)
    return dtype


# --- the wire encoding of skeletons ---------------------------------------------------------------------
#
# Note [Tagged values]
# ~~~~~~~~~~~~~~~~~~~~
# A skeleton (or a status dict) travels as a tree of tagged values: one tag byte, then a fixed-size
# payload (int64, float64, a Slot's uint32 index) or a uint32 length and that many bytes (str as UTF-8,
# bytes, ints past 64 bits) or a uint32 count and that many values (list, tuple) or key/value pairs
# (dict, with scalar keys). There are no references between values, so a header of n bytes decodes to
# at most n values: the "nested shared lists" of a pickle (2^depth work from a few bytes) cannot be
# written. No tag names a class, so nothing received can build an object other than these builtins
# and Slot, or reach an attribute. Decoding checks every length and count against the bytes left
# before using it and keeps a budget: MAX_DEPTH levels of nesting, MAX_NODES values per header.

#: Nesting that a value may have (flatten refuses deeper arguments; decoding refuses deeper headers).
MAX_DEPTH = 100
#: Values one header may decode to.
MAX_NODES = 1 << 22
#: Bytes of an int past 64 bits.
MAX_BIGINT_BYTES = 1024

(_T_NONE, _T_TRUE, _T_FALSE, _T_INT, _T_BIGINT, _T_FLOAT, _T_COMPLEX, _T_STR, _T_BYTES, _T_LIST,
 _T_TUPLE, _T_DICT, _T_SLOT) = range(13)
_Q = struct.Struct("<q")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
_C128 = struct.Struct("<dd")
_TAG_U32 = struct.Struct("<BI")
_INT64 = (-(1 << 63), 1 << 63)


class WireFormatError(ValueError):
    """Received bytes do not decode (truncated, over a bound, or not a value of this format)."""


def encode_value(obj: Any, out: bytearray, depth: int = 0) -> None:
    """Append the tagged encoding of *obj* (a skeleton, or a dict of builtins) to *out*."""
    kind = type(obj)
    if kind is Slot:
        out += _TAG_U32.pack(_T_SLOT, obj.index)
    elif kind is tuple or kind is list:
        if depth >= MAX_DEPTH:
            raise UnsupportedValue("header", f"nested more than {MAX_DEPTH} levels deep")
        out += _TAG_U32.pack(_T_TUPLE if kind is tuple else _T_LIST, len(obj))
        for v in obj:
            encode_value(v, out, depth + 1)
    elif kind is dict:
        if depth >= MAX_DEPTH:
            raise UnsupportedValue("header", f"nested more than {MAX_DEPTH} levels deep")
        out += _TAG_U32.pack(_T_DICT, len(obj))
        for k, v in obj.items():
            if type(k) not in _SCALARS:
                raise UnsupportedValue("header", f"dict key of type {type(k).__qualname__}")
            encode_value(k, out, depth + 1)
            encode_value(v, out, depth + 1)
    elif kind is str:
        raw = obj.encode("utf-8", "surrogatepass")
        out += _TAG_U32.pack(_T_STR, len(raw))
        out += raw
    elif kind is int:
        if _INT64[0] <= obj < _INT64[1]:
            out.append(_T_INT)
            out += _Q.pack(obj)
        else:
            raw = obj.to_bytes(obj.bit_length() // 8 + 1, "little", signed=True)
            if len(raw) > MAX_BIGINT_BYTES:
                raise UnsupportedValue("header", f"an int of more than {MAX_BIGINT_BYTES} bytes")
            out += _TAG_U32.pack(_T_BIGINT, len(raw))
            out += raw
    elif obj is None:
        out.append(_T_NONE)
    elif kind is bool:
        out.append(_T_TRUE if obj else _T_FALSE)
    elif kind is float:
        out.append(_T_FLOAT)
        out += _F64.pack(obj)
    elif kind is bytes:
        out += _TAG_U32.pack(_T_BYTES, len(obj))
        out += obj
    elif kind is complex:
        out.append(_T_COMPLEX)
        out += _C128.pack(obj.real, obj.imag)
    else:
        encode_value(_as_builtin(obj), out, depth)


def _as_builtin(obj: Any) -> Any:
    """A subclass of a builtin (an IntEnum, a NamedTuple in a status dict) as that builtin."""
    bases: tuple[Any, ...] = (bool, int, float, complex, str, bytes, tuple, list, dict)
    for base in bases:
        if isinstance(obj, base):
            return base(obj)
    raise UnsupportedValue("header", f"{type(obj).__module__}.{type(obj).__qualname__} cannot be "
                                     "encoded in a header")


class ValueReader:
    """Decodes tagged values from *data* starting at *pos*, under one budget for the whole header.
    Slots must index one of *slots* tensors. Raises :class:`WireFormatError`."""

    __slots__ = ("data", "pos", "nodes", "slots")

    def __init__(self, data: bytes, pos: int, slots: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.nodes = MAX_NODES
        self.slots = slots

    def value(self, depth: int = 0) -> Any:
        try:
            return self._value(depth)
        except struct.error:
            raise WireFormatError("a header ends in the middle of a value") from None
        except RecursionError:  # pragma: no cover - MAX_DEPTH is far below the recursion limit
            raise WireFormatError("a header is nested too deeply") from None

    def _length(self, what: str) -> int:
        n: int = _U32.unpack_from(self.data, self.pos)[0]
        self.pos += 4
        if n > len(self.data) - self.pos:
            raise WireFormatError(f"a header announces a {what} of {n} but has only "
                                  f"{len(self.data) - self.pos} bytes left")
        return n

    def _value(self, depth: int) -> Any:
        self.nodes -= 1
        if self.nodes < 0:
            raise WireFormatError(f"a header holds more than {MAX_NODES} values")
        data = self.data
        pos = self.pos
        if pos >= len(data):
            raise WireFormatError("a header ends where a value should be")
        tag = data[pos]
        self.pos = pos + 1
        if tag == _T_SLOT:
            (index,) = _U32.unpack_from(data, pos + 1)
            self.pos = pos + 5
            if index >= self.slots:
                raise WireFormatError(f"a header refers to tensor {index} of {self.slots}")
            return Slot(index)
        if tag == _T_TUPLE or tag == _T_LIST or tag == _T_DICT:
            if depth >= MAX_DEPTH:
                raise WireFormatError(f"a header is nested more than {MAX_DEPTH} levels deep")
            n = self._length("container")
            if tag == _T_DICT:
                out = {}
                for _ in range(n):
                    key = self._value(depth + 1)
                    if type(key) not in _SCALARS:
                        raise WireFormatError(f"a header has a dict key of type {type(key).__name__}")
                    out[key] = self._value(depth + 1)
                return out
            items = [self._value(depth + 1) for _ in range(n)]
            return tuple(items) if tag == _T_TUPLE else items
        if tag == _T_STR:
            n = self._length("str")
            self.pos += n
            try:
                return bytes(data[pos + 5:pos + 5 + n]).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise WireFormatError("a header has a str that is not UTF-8") from None
        if tag == _T_INT:
            self.pos = pos + 9
            return _Q.unpack_from(data, pos + 1)[0]
        if tag == _T_NONE:
            return None
        if tag == _T_TRUE:
            return True
        if tag == _T_FALSE:
            return False
        if tag == _T_FLOAT:
            self.pos = pos + 9
            return _F64.unpack_from(data, pos + 1)[0]
        if tag == _T_BYTES:
            n = self._length("bytes")
            self.pos += n
            return bytes(data[pos + 5:pos + 5 + n])
        if tag == _T_BIGINT:
            n = self._length("int")
            if n > MAX_BIGINT_BYTES:
                raise WireFormatError(f"a header has an int of {n} bytes (at most {MAX_BIGINT_BYTES})")
            self.pos += n
            return int.from_bytes(data[pos + 5:pos + 5 + n], "little", signed=True)
        if tag == _T_COMPLEX:
            self.pos = pos + 17
            real, imag = _C128.unpack_from(data, pos + 1)
            return complex(real, imag)
        raise WireFormatError(f"a header has an unknown value tag {tag}")


def describe(value: Any) -> str:
    """A short description of *value* for an error message: ``a list of 3``, ``a numpy.ndarray``."""
    kind = type(value)
    if kind in (list, tuple, dict):
        return f"a {kind.__name__} of {len(value)}"
    return f"a {kind.__module__}.{kind.__qualname__}"
