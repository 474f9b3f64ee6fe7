"""The wire: the messages of the two protocols, and the channel that carries them.

Two protocols, each with its own allow-list, so that a peer of one can never send a message of the other:

* the **worker protocol** (:data:`WORKER_PROTOCOL`), between a pool (the supervisor in the web process or
  the pool server) and its model worker over a socketpair: :class:`Call`, :class:`Cancel`, :class:`Stop`
  one way; :class:`Loaded`, :class:`Ready`, :class:`StartupFailed`, :class:`Result`, :class:`Failure` the
  other, and :class:`Adopt` for Note [Shared weights];
* the **attach protocol** (:data:`ATTACH_PROTOCOL`), between an attached web process and the pool server
  over a Unix socket: :class:`Hello`, :class:`RemoteCall`, :class:`StatusRequest` one way;
  :class:`Welcome`, :class:`Result`, :class:`RemoteError`, :class:`StatusReply` the other.

Tensors never travel in a message: a message carries :class:`~flask_torchpool.shm.TensorRef` into shared
memory, and descriptors of one-off segments pass beside it (``SCM_RIGHTS``). Headers are unpickled with
an unpickler that resolves only the classes of the channel's protocol.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import threading
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from .codec import Slot
from .shm import TensorRef

# --- the worker protocol ---------------------------------------------------------------------------------


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


class Failure(NamedTuple):
    """Call *id* failed: the fields of an :class:`~flask_torchpool.errors.WireError` (the worker's
    :func:`~flask_torchpool.errors.to_wire` of the error the caller gets)."""

    id: int
    type_name: str
    message: str
    retry_after: int | None
    extra: dict[str, Any]
    tb: str | None



# --- the attach protocol -----------------------------------------------------------------------------

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



class Protocol(NamedTuple):
    """The classes a channel may receive, by name."""

    name: str
    types: dict[str, type]


def _protocol(name: str, *types: type) -> Protocol:
    return Protocol(name, {cls.__name__: cls for cls in (TensorRef, Slot, *types)})


#: Between a pool and its workers.
WORKER_PROTOCOL = _protocol("worker", Call, Cancel, Stop, Loaded, Adopt, Ready, StartupFailed, Result,
                            Failure)
#: Between an attached web process and the pool server.
ATTACH_PROTOCOL = _protocol("attach", Hello, Welcome, RemoteCall, RemoteError, StatusRequest, StatusReply,
                            Result)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, protocol: Protocol) -> None:
        super().__init__(io.BytesIO(data))
        self._protocol = protocol

    def find_class(self, module: str, name: str) -> Any:
        cls = self._protocol.types.get(name)
        if cls is not None and module == cls.__module__:
            return cls
        if module == "builtins" and name == "complex":
            return complex
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a message of the "
                                     f"{self._protocol.name} protocol")


def decode(data: bytes, protocol: Protocol) -> Any:
    """Unpickle one header of *protocol* (see :class:`Channel`)."""
    return _Unpickler(data, protocol).load()


class Channel:
    """One end of a socket carrying whole messages of *protocol*, plus descriptors passed beside them."""

    def __init__(self, conn: Connection, protocol: Protocol) -> None:
        self.conn = conn
        self.protocol = protocol
        self._send_lock = threading.Lock()

    def send(self, msg: Any, fds: tuple[int, ...] = ()) -> None:
        data = pickle.dumps((len(fds), msg), protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            self.conn.send_bytes(data)
            if fds:
                with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                    reduction.sendfds(sock, list(fds))

    def recv(self) -> tuple[Any, list[int]]:
        nfds, msg = decode(self.conn.recv_bytes(), self.protocol)
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


