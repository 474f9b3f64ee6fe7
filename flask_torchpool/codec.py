"""The value codec: a call's arguments or a model's output <-> a skeleton of plain values plus tensors.

:func:`flatten` copies a structure of tensors, ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
``bytes`` and tuples, lists and dicts of them, replacing each tensor by a :class:`Slot` into a list of
tensors; :func:`unflatten` is its inverse. Anything else is refused with :class:`UnsupportedValue`, which
says where it was, so a header never carries an arbitrary object. The pool, the attached client, the
pool server, the worker and inline mode all validate values here, so every backend accepts and refuses
the same values with the same messages.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

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


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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




def describe(value: Any) -> str:
    """A short description of *value* for an error message: ``a list of 3``, ``a numpy.ndarray``."""
    kind = type(value)
    if kind in (list, tuple, dict):
        return f"a {kind.__name__} of {len(value)}"
    return f"a {kind.__module__}.{kind.__qualname__}"
