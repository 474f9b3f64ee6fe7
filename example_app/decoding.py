"""Turn request bodies into image batches, in the Flask thread, before anything reaches the pool.

Every function returns a float32 tensor of shape ``(N, 1, 28, 28)`` with values in ``[0, 1]``, or
raises :class:`flask_torchpool.InvalidInputError`, which the extension answers with HTTP 400 and a
JSON body ``{"error": ..., "type": "InvalidInputError"}``. Decoding here, not in the worker, means a
malformed request costs no round trip and can never take a worker down. Binary PGM files are parsed
with plain Python and torch, so the app needs no imaging library.
"""

from __future__ import annotations

from typing import Any

import torch

from flask_torchpool import InvalidInputError

IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE
MAX_BATCH = 256

_PGM_MAGIC = b"P5"
_PGM_WHITESPACE = frozenset(b" \t\n\r\x0b\x0c")
_OTHER_NETPBM_TYPES = frozenset(b"123467")
_PGM_MAX_DIGITS = 5  # width, height and maxval are all at most 65535 in a valid file


def images_from_json(payload: Any, max_batch: int = MAX_BATCH) -> torch.Tensor:
    """Decode ``{"inputs": [[784 floats], ...]}`` or ``{"image": 28 x 28 nested list}``."""
    if not isinstance(payload, dict) or len(payload.keys() & {"inputs", "image"}) != 1:
        raise InvalidInputError(
            'expected a JSON object with exactly one of "inputs" (a list of rows of 784 numbers) '
            'or "image" (28 rows of 28 numbers)'
        )
    if "inputs" in payload:
        batch = _float_tensor(payload["inputs"], "inputs")
        if batch.ndim != 2 or batch.shape[1] != IMAGE_PIXELS:
            raise InvalidInputError(
                f'"inputs" must be a list of rows of {IMAGE_PIXELS} numbers, got shape '
                f"{list(batch.shape)}"
            )
        if not 1 <= batch.shape[0] <= max_batch:
            raise InvalidInputError(
                f'"inputs" must hold 1 to {max_batch} rows, got {batch.shape[0]}; '
                "split larger batches over several requests"
            )
    else:
        batch = _float_tensor(payload["image"], "image")
        if batch.shape == (IMAGE_SIDE, IMAGE_SIDE):
            batch = batch.unsqueeze(0)
        if batch.shape != (1, IMAGE_SIDE, IMAGE_SIDE):
            raise InvalidInputError(
                f'"image" must be {IMAGE_SIDE} rows of {IMAGE_SIDE} numbers, got shape '
                f"{list(batch.shape)}"
            )
    if not bool(torch.isfinite(batch).all()):
        raise InvalidInputError("pixel values must be finite numbers (no NaN or Infinity)")
    return batch.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)


def image_from_bytes(body: bytes) -> torch.Tensor:
    """Decode a binary PGM (P5) file of 28 x 28 pixels, or exactly 784 raw grayscale bytes."""
    if is_pgm(body):
        pixels = parse_pgm(body)
        if pixels.shape != (IMAGE_SIDE, IMAGE_SIDE):
            raise InvalidInputError(
                f"the PGM image is {pixels.shape[1]} x {pixels.shape[0]} pixels; "
                f"this model takes {IMAGE_SIDE} x {IMAGE_SIDE}"
            )
    elif len(body) == IMAGE_PIXELS:
        pixels = _uint8_tensor(body).reshape(IMAGE_SIDE, IMAGE_SIDE) / 255.0
    elif len(body) > 1 and body[:1] == b"P" and body[1] in _OTHER_NETPBM_TYPES:
        raise InvalidInputError(
            f"this is a Netpbm file of type {body[:2].decode()}; only binary grayscale PGM (P5) "
            "is accepted (ImageMagick writes one with `convert in.png out.pgm`)"
        )
    else:
        raise InvalidInputError(
            f"expected a binary PGM (P5) file or exactly {IMAGE_PIXELS} raw grayscale bytes "
            f"({IMAGE_SIDE} x {IMAGE_SIDE}, row by row), got {len(body)} bytes"
        )
    return pixels.reshape(1, 1, IMAGE_SIDE, IMAGE_SIDE)


def is_pgm(body: bytes) -> bool:
    """Whether ``body`` starts like a binary PGM file ("P5" and a whitespace byte)."""
    return body[:2] == _PGM_MAGIC and len(body) > 2 and body[2] in _PGM_WHITESPACE


def parse_pgm(data: bytes) -> torch.Tensor:
    """Parse a binary PGM (P5) file into a float32 ``(height, width)`` tensor scaled to ``[0, 1]``.

    Follows the Netpbm format: the magic, then width, height and maxval as decimal numbers separated
    by whitespace, ``#`` comments allowed up to the end of their line, exactly one whitespace byte,
    then the raster: one byte per pixel when maxval < 256, else two, most significant first.
    """
    if not is_pgm(data):
        raise InvalidInputError('not a binary PGM file: it must start with "P5" and a whitespace')
    pos = len(_PGM_MAGIC)
    fields: list[int] = []
    while len(fields) < 3:
        pos = _skip_pgm_separators(data, pos)
        start = pos
        while pos < len(data) and data[pos : pos + 1].isdigit():
            pos += 1
        if start == pos or pos - start > _PGM_MAX_DIGITS:
            raise InvalidInputError(
                "the PGM header must give width, height and maxval as numbers up to 65535"
            )
        fields.append(int(data[start:pos]))
    if pos >= len(data) or data[pos] not in _PGM_WHITESPACE:
        raise InvalidInputError("the PGM header must end with one whitespace byte after maxval")
    raster = data[pos + 1 :]
    width, height, maxval = fields
    if not 0 < maxval <= 65535:
        raise InvalidInputError(f"the PGM maxval must be between 1 and 65535, got {maxval}")
    bytes_per_pixel = 1 if maxval < 256 else 2
    expected = width * height * bytes_per_pixel
    if len(raster) != expected:
        raise InvalidInputError(
            f"a {width} x {height} PGM with maxval {maxval} needs {expected} bytes of pixels "
            f"after the header, got {len(raster)}"
        )
    values = _uint8_tensor(raster).to(torch.int32)
    if bytes_per_pixel == 2:
        values = values[0::2] * 256 + values[1::2]
    if values.numel() and int(values.max()) > maxval:
        raise InvalidInputError(f"a PGM pixel value is above the file's maxval ({maxval})")
    return (values.to(torch.float32) / maxval).reshape(height, width)


def _skip_pgm_separators(data: bytes, pos: int) -> int:
    while pos < len(data):
        if data[pos] in _PGM_WHITESPACE:
            pos += 1
        elif data[pos : pos + 1] == b"#":
            while pos < len(data) and data[pos] not in b"\r\n":
                pos += 1
        else:
            break
    return pos


def _float_tensor(value: Any, key: str) -> torch.Tensor:
    if _holds_bool(value):  # torch.tensor takes true and false as 1 and 0
        raise InvalidInputError(f'"{key}" must be a rectangular nested list of numbers (true and false are '
                                "not numbers)")
    try:
        return torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidInputError(
            f'"{key}" must be a rectangular nested list of numbers ({exc})'
        ) from None


def _holds_bool(value: Any) -> bool:
    if type(value) is bool:
        return True
    return type(value) is list and any(type(v) is bool or type(v) is list and _holds_bool(v) for v in value)


def _uint8_tensor(data: bytes) -> torch.Tensor:
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    # bytearray: torch.frombuffer wants a writable buffer and warns on immutable bytes.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
