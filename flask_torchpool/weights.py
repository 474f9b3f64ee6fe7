"""Shared weights: N CPU workers map one copy of the model's parameters (Note [Shared weights]).

Both halves of the handshake live here: :class:`SharedWeights` is the pool's (it owns the segment and
decides which worker fills it and which ones wait), :func:`share_weights` is the worker's (it reports its
layout, then points every parameter and buffer at the segment). The messages are
:class:`~flask_torchpool.messages.Loaded` (worker to pool) and :class:`~flask_torchpool.messages.Adopt`
(pool to worker), before the worker says ``Ready``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any, Protocol

from . import codec, messages, shm
from .channel import Channel

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Note [Shared weights]
# ~~~~~~~~~~~~~~~~~~~~~
# With TORCHPOOL_SHARE_WEIGHTS on CPU, N workers hold one copy of the weights. Each worker builds the
# model as usual, then reports the layout of its parameters and buffers (a fingerprint of names, dtypes
# and shapes) and their total size. The supervisor creates one memfd of that size; the first worker to
# report copies its tensors into it, and every worker then points each parameter and buffer at its view
# of the segment (``tensor.data = view``), which frees the private copy. The supervisor keeps the
# descriptor, so a respawned worker maps the same weights. All workers therefore run the first worker's
# weights: a factory must build the same model each time (it always should). Weights must not be
# modified in place while serving; they are shared. TorchScript and torch.export models keep their own.


# --- the pool's half -----------------------------------------------------------------------------------


class Peer(Protocol):
    """A worker slot as the weights handshake sees it."""

    @property
    def index(self) -> int: ...
    @property
    def channel(self) -> Channel | None: ...


class SharedWeights:
    """The pool's half of Note [Shared weights]: the segment, its layout, who fills it, who waits for it.

    Used by the manager thread only (:meth:`shared_bytes` may be read from any thread)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._fd: int | None = None
        self._layout: tuple[str, int] | None = None   # (fingerprint, bytes)
        self._filled = False
        self._filler: Peer | None = None
        self._waiting: list[Peer] = []

    @property
    def shared_bytes(self) -> int:
        """Bytes of weights the workers share (0 until a worker has filled the segment)."""
        layout = self._layout
        return layout[1] if layout is not None and self._filled else 0

    def on_loaded(self, peer: Peer, msg: messages.Loaded) -> None:
        """*peer* built its model: hand it the shared weights, to fill or to map."""
        if self._layout is None:
            self._layout = (msg.fingerprint, msg.nbytes)
            self._fd = shm.create_memfd(msg.nbytes, "torchpool-weights")
        if self._layout != (msg.fingerprint, msg.nbytes):
            log.warning("%s: worker %d built a model with another layout than the shared weights; it "
                        "keeps its own copy (does the factory build different models?)", self.name,
                        peer.index)
            self._send_adopt(peer, share=False, fill=False)
        elif self._filled:
            self._send_adopt(peer, share=True, fill=False)
        elif self._filler is None:
            self._filler = peer
            self._send_adopt(peer, share=True, fill=True)
        else:
            self._waiting.append(peer)

    def on_ready(self, peer: Peer) -> None:
        """*peer* is serving; if it was filling the segment, the workers waiting for it map it now."""
        if peer is not self._filler:
            return
        self._filled = True
        self._filler = None
        for waiting in self._waiting:
            self._send_adopt(waiting, share=True, fill=False)
        self._waiting.clear()

    def on_death(self, peer: Peer) -> None:
        if peer in self._waiting:
            self._waiting.remove(peer)
        if peer is self._filler:
            # It died while filling the shared weights: the next waiting worker fills them afresh.
            self._filler = None
            if self._waiting:
                self._filler = self._waiting.pop(0)
                self._send_adopt(self._filler, share=True, fill=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _send_adopt(self, peer: Peer, share: bool, fill: bool) -> None:
        channel = peer.channel
        if channel is None:
            return
        try:
            fds = (self._fd,) if share and self._fd is not None else ()
            channel.send(messages.Adopt(share, fill), fds)
        except OSError:
            pass  # it died; its sentinel says so


# --- the worker's half ---------------------------------------------------------------------------------


def weight_tensors(model: Any) -> list[tuple[str, torch.Tensor]]:
    """The parameters and buffers of *model* that can be shared (CPU, strided, not empty), each once."""
    import torch  # the worker's half: the pool's process need not load torch

    if not isinstance(model, torch.nn.Module) or isinstance(model, torch.jit.ScriptModule):
        return []
    seen: set[int] = set()
    out = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or t.device.type != "cpu" or t.layout != torch.strided or not t.numel():
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


def layout(tensors: list[tuple[str, torch.Tensor]]) -> tuple[str, int, list[int]]:
    """(fingerprint of names, dtypes and shapes; total bytes; offset of each tensor) in the segment."""
    digest = hashlib.sha256()
    offsets, total = [], 0
    for name, t in tensors:
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        offsets.append(total)
        total += (codec.tensor_nbytes(t) + shm.ALIGN - 1) // shm.ALIGN * shm.ALIGN
    return digest.hexdigest(), total, offsets


def share_weights(channel: Channel, model: Any) -> int:
    """In a worker: run the Note [Shared weights] handshake; returns the bytes now shared (0: kept
    private)."""
    tensors = weight_tensors(model)
    if not tensors:
        return 0
    fingerprint, total, offsets = layout(tensors)
    channel.send(messages.Loaded(fingerprint, total))
    msg, fds = channel.recv()
    if type(msg) is not messages.Adopt or not msg.share or not fds:
        for fd in fds:
            os.close(fd)
        return 0
    segment = shm.Segment(fds[0], total)
    os.close(fds[0])
    import torch

    with torch.no_grad():
        for (_, t), offset in zip(tensors, offsets):
            view = segment.view(offset, codec.tensor_nbytes(t), t.dtype, tuple(t.shape))
            if msg.fill:
                shm.copy_into(view, t.detach())
            t.data = view
    return total
