"""The channel: one end of a socket carrying whole messages of one protocol (:mod:`.messages`), plus the
descriptors passed beside them (``SCM_RIGHTS``)."""

from __future__ import annotations

import array
import math
import os
import select
import socket
import threading
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

from .deadlines import MAX_TIMEOUT
from .messages import MAX_MESSAGE_BYTES, Protocol, ProtocolError, decode_frame, encode, peek


def _recv_fds(fd: int, count: int) -> list[int]:
    """Receive the byte that carries *count* descriptors; every descriptor received is closed unless
    exactly *count* came."""
    size = array.array("i").itemsize
    with socket.socket(fileno=os.dup(fd)) as sock:
        data, ancdata, flags, _ = sock.recvmsg(1, socket.CMSG_SPACE(count * size))
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[:len(payload) - len(payload) % size])
            fds.extend(received)
    if not data and not fds:
        raise EOFError
    if len(fds) != count or flags & socket.MSG_CTRUNC or data[0] != count % 256:
        for received_fd in fds:
            os.close(received_fd)
        raise ProtocolError(f"expected {count} descriptors, received {len(fds)}")
    return fds


class Channel:
    """One end of a socket carrying whole messages of *protocol* (at most *max_bytes* each), plus
    descriptors passed beside them."""

    def __init__(self, conn: Connection, protocol: Protocol, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.conn = conn
        self.protocol = protocol
        self.max_bytes = max_bytes
        self._send_lock = threading.Lock()
        self._poller: select.poll | None = None

    def send(self, msg: Any, fds: tuple[int, ...] = ()) -> None:
        data = encode(msg, len(fds))
        with self._send_lock:
            self.conn.send_bytes(data)
            if fds:
                with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                    reduction.sendfds(sock, list(fds))

    def recv(self) -> tuple[Any, list[int]]:
        """One message and the descriptors sent with it (the caller closes them). Raises
        :class:`ProtocolError` (closing whatever descriptors came) for anything else."""
        try:
            data = self.conn.recv_bytes(self.max_bytes)
        except OSError as exc:
            if str(exc) == "bad message length":
                raise ProtocolError(f"a message over {self.max_bytes} bytes on the {self.protocol.name} "
                                    "protocol") from None
            raise
        kind, nfds = peek(data, self.protocol)
        fds = _recv_fds(self.conn.fileno(), nfds) if nfds else []
        try:
            msg = decode_frame(data, self.protocol, kind, nfds)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return msg, fds

    def poll(self, timeout: float | None = 0.0) -> bool:
        """Whether a message (or the end of the connection) is waiting, within *timeout* seconds (None:
        wait for ever). One poll(2) on a cached poll object: ``Connection.poll`` builds a selector each
        time, which costs more than the rest of a small call's reading."""
        poller = self._poller
        if poller is None:
            if self.conn.closed:
                raise OSError("handle is closed")
            poller = select.poll()
            poller.register(self.conn.fileno(), select.POLLIN)
            self._poller = poller
        try:
            wait = None if timeout is None else math.ceil(min(max(0.0, timeout), MAX_TIMEOUT) * 1000)
            return bool(poller.poll(wait))
        except RuntimeError:  # another thread is polling it: the general way
            return self.conn.poll(None if timeout is None else min(timeout, MAX_TIMEOUT))

    def fileno(self) -> int:
        return self.conn.fileno()

    def close(self) -> None:
        # Under the send lock: closing while another thread sends could let the descriptor number be
        # reused by a new socket and the rest of the message go to the wrong worker.
        with self._send_lock:
            self._poller = None
            self.conn.close()
