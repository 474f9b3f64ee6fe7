"""Lanes (Note [Lanes] in :mod:`flask_torchpool.lanes`): the web process's half, :class:`ClientLanes` (the
pool server's, which makes them and hands them out, is :mod:`flask_torchpool.attach.broker`).

A web process keeps its lanes by model. A plain call to a model it holds lanes for goes to the lane whose
worker holds the fewest calls (control word ``CTRL_LOAD``, written by the worker for every web process to
read). A caller waiting for its answer reads its lane itself while no other thread does (Note [One wake-up
per reply]); one reader thread, :class:`ClientLanes`, reads every other lane, fails calls at their deadlines,
and sends the outcomes to the server for its metrics (:class:`~flask_torchpool.messages.Observed`, at most
every :data:`REPORT_INTERVAL`, and before every status request). Everything else (streams, batched models,
a model without lanes, every lane busy) goes through the server as before.

Note [One wake-up per reply]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Waking a thread is the dearest thing a small call does in the web process (a VM's idle core is woken by an
interrupt; the kernel's share of the reader thread was 130 us of its 180 us per call). When the reader
thread took every answer, a reply woke two threads of the web process, the reader and then, through the
future, the caller. Now the thread in :meth:`LaneFuture.result` takes its lane's *token*
(``Lane.reading``), reads the lane until its own answer came (answering the lane's other calls on the way,
as the reader would) and gives the token back: the worker's reply wakes the caller and nobody else.

The reader thread watches every lane with ``EPOLLONESHOT``: an event disarms the lane until whoever holds
its token re-arms it. The token holder reads; a thread that cannot take the token does not read. A caller
that takes the token disarms the lane (the reader is not woken by the answer it reads), and re-arms it
*after* giving the token back, so an answer that arrives in between is seen by the reader (re-arming a
ready socket reports it). A thread that cannot take the token leaves the lane as it is: its holder re-arms
it. Only a token holder drops a lane, and a lane is re-armed only while it is registered (under the lock),
so no descriptor number is re-armed after it was closed and reused.

Note [Claimed lanes]
~~~~~~~~~~~~~~~~~~~
The token is taken in :meth:`LaneFuture.result`, after the call was sent. A worker on the caller's core
(Note [Web affinity]) is woken by the send and often answers before the caller reaches ``result()``; the
armed lane then woke the reader thread, which read the answer and handed it over through the future: two
threads woken per reply again, for 75% of the calls of the ``tiny`` HTTP benchmark (the reader thread
spent 65 us of CPU per request). So a caller that says it waits (``waiter``: ``ModelProxy.__call__``
calls ``result()`` right after ``submit``) takes the token before sending, when it is free, and disarms
the lane; :meth:`LaneFuture.result` then reads with the token it holds and gives it back as above. A
call that is not sent gives the token back at once. A caller that took the token must call
``result()``: until it does, no other thread reads the lane (its other calls wait, their deadlines still
fire), so only ``ModelProxy.__call__``, which calls it with nothing in between, passes ``waiter``.

When a lane ends (its worker died or retired) the calls on it that the worker had not started are sent
again through the server; the one it was running fails with :class:`~flask_torchpool.WorkerCrashedError`,
or with :class:`~flask_torchpool.PoolUnavailableError` when the server ended (its workers end with it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import select
import socket
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable

from .. import codec, lanes, messages, shm
from ..channel import Channel
from ..deadlines import MAX_TIMEOUT, DeadlineHeap
from ..errors import InferenceTimeoutError, OutputError, WireError, WorkerCrashedError, from_wire
from ..metrics import outcome_of

log = logging.getLogger(__name__)

#: How often outcomes of lane calls are sent to the server (seconds).
REPORT_INTERVAL = 0.25
#: A web process sends a call through the server instead when every lane of the model holds this many.
MAX_LANE_LOAD = 8
#: Outcomes one Observed message may carry.
MAX_OBSERVED = 4096
#: When a lane ends while its worker runs a call, how long to watch for the server's end before blaming
#: the worker (seconds). A worker ends with its server (PDEATHSIG), and its lane can close before
#: ``/proc`` shows the server gone; the call then fails with PoolUnavailableError, not WorkerCrashedError.
SERVER_END_GRACE = 0.1
#: How the reader thread watches a lane (Note [One wake-up per reply]); a lane being read by a caller has
#: only ``EPOLLONESHOT``, so that not even a hang-up wakes the reader more than once.
_ARMED = select.EPOLLIN | select.EPOLLONESHOT
_DISARMED = select.EPOLLONESHOT


class _Call:
    __slots__ = ("future", "blocks", "deadline", "started", "settled", "resend", "numpy", "retries")

    def __init__(self, future: Future[Any], blocks: list[int], deadline: float,
                 resend: Callable[[bool], Future[Any]], numpy: bool = False, retries: int = 0) -> None:
        self.numpy = numpy  # the caller passed numpy arrays: read its outputs as numpy arrays
        self.retries = retries  # TORCHPOOL_RETRIES: its worker dying while running it sends it again
        self.future = future
        self.blocks = blocks
        self.deadline = deadline
        self.started = time.monotonic()
        self.settled = False
        self.resend = resend


class Lane:
    """This web process's end of one lane: its socket, its arena, the calls on it."""

    def __init__(self, offer: messages.LaneOffer, fds: list[int]) -> None:
        self.channel, self.arena = lanes.map_lane(fds, offer.arena_bytes, messages.MAX_MESSAGE_BYTES)
        self.model = offer.model
        self.worker = offer.worker
        self.id = offer.lane
        self.inputs = shm.Allocator(*self.arena.inputs)
        self.releases = shm.ReleaseQueue()
        self.words = self.arena.control
        self.calls: dict[int, _Call] = {}
        self.picked = 0  # picked for a call not registered yet (under ClientLanes._lock): counts as load
        self.open = True  # False once the worker said Stop: no new calls
        self.reading = threading.Lock()  # the token: held by the one thread that reads the socket
        self.home = False  # its worker is on this web process's cores (Note [Web affinity])
        self.registered = False  # in the reader's epoll (changed under ClientLanes._lock)

    def load(self) -> int:
        try:
            return max(int(self.words[lanes.CTRL_LOAD]), len(self.calls)) + self.picked
        except ValueError:  # released: the lane was dropped meanwhile
            return MAX_LANE_LOAD


class LaneFuture(Future[Any]):
    """The future of a call on a lane. :meth:`result` reads the lane in the calling thread while no other
    thread does (Note [One wake-up per reply]); :meth:`cancel` tells the worker to drop the call."""

    def __init__(self, owner: ClientLanes, lane: Lane, call_id: int) -> None:
        super().__init__()
        self._owner = owner
        self._lane = weakref.ref(lane)  # a future kept by its caller must not keep the arena mapped
        self._call_id = call_id
        self._claimed = False  # this future holds its lane's token from submit (Note [Claimed lanes])

    def result(self, timeout: float | None = None) -> Any:
        claimed, self._claimed = self._claimed, False
        if (claimed or not self.done()) and (lane := self._lane()) is not None:
            end = None if timeout is None else time.monotonic() + timeout
            self._owner.read_own(lane, self, self._call_id, end, claimed)
            del lane
            if end is not None:
                timeout = max(0.0, end - time.monotonic())
        return super().result(timeout)

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        lane = self._lane()
        if lane is not None:
            with contextlib.suppress(OSError):  # a queued call is dropped; the worker ignores an old id
                lane.channel.send(messages.Cancel(self._call_id))
        return True


class ClientLanes:
    """The lanes of one attached web process, and the thread that reads them."""

    def __init__(self, report: Callable[[messages.Observed], None], retry_after: int,
                 server_gone: Callable[[], BaseException | None]) -> None:
        self._report = report
        self._server_gone = server_gone  # the error to give when a lane ended with its server
        self._retry_after = retry_after
        self._lock = threading.Lock()
        self._by_model: dict[str, list[Lane]] = {}
        self._deadlines: DeadlineHeap[Lane] = DeadlineHeap(_settled)   # Note [Finished deadlines]
        self._wake_at = math.inf
        self._observed: dict[str, tuple[list[str], list[float]]] = {}
        self._report_at = math.inf
        self._turn = itertools.count(os.getpid())
        self._epoll: select.epoll | None = None
        self._by_fd: dict[int, Lane] = {}
        self._home: Callable[[Lane], bool] | None = None  # Note [Web affinity]
        #: Sees the times of the direct calls that ended, per model, as they are reported (Note [Web
        #: affinity]: a pinned web process unpins itself when they are long).
        self.observer: Callable[[str, list[float]], None] | None = None
        self._wake_r: socket.socket | None = None   # made with the first lane, with the thread
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.closed = False
        self._closed_error: BaseException | None = None

    # --- the caller's side ------------------------------------------------------------------------------

    def add(self, offer: messages.LaneOffer, fds: list[int]) -> None:
        """A lane the server offered (the attach reader thread)."""
        try:
            lane = Lane(offer, fds)
        except (OSError, ValueError) as exc:
            log.warning("torchpool: cannot use lane %d to worker %d of %r: %s", offer.lane, offer.worker,
                        offer.model, exc)
            return
        with self._lock:
            if self.closed:
                lane.channel.close()
                return
            if self._epoll is None:
                self._wake_r, self._wake_w = socket.socketpair()
                self._epoll = select.epoll()
                self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
                self._thread = threading.Thread(target=self._read_loop, name="torchpool-lanes", daemon=True)
                self._thread.start()
            self._by_model.setdefault(lane.model, []).append(lane)
            self._by_fd[lane.channel.fileno()] = lane
            self._epoll.register(lane.channel.fileno(), _ARMED)
            lane.registered = True
            lane.home = self._home is not None and self._home(lane)

    def prefer(self, home: Callable[[Lane], bool] | None) -> None:
        """Prefer the lanes for which *home* is true when they hold no more calls than the others (Note
        [Web affinity]); None: prefer none."""
        with self._lock:
            self._home = home
            for lane in (lane for ls in self._by_model.values() for lane in ls):
                lane.home = home is not None and home(lane)

    def take(self, model: str) -> Lane | None:
        """:meth:`pick` for a call, which the lane counts as held from now, so that two threads do not
        both take the one idle lane: pass it to :meth:`submit` at once (or :meth:`unpick` it)."""
        with self._lock:
            best = self.pick(model)
            if best is not None:
                best.picked += 1   # until submit registers the call, or gives up
            return best

    def unpick(self, lane: Lane) -> None:
        """*lane* was taken for a call that will not be sent after all."""
        with self._lock:
            lane.picked -= 1

    def pick(self, model: str) -> Lane | None:
        """The open lane of *model* whose worker holds the fewest calls (on a tie, one on this process's
        cores: Note [Web affinity]); None: go through the server."""
        candidates = self._by_model.get(model)
        if not candidates:
            return None
        best, best_load = None, MAX_LANE_LOAD
        n = len(candidates)
        start = next(self._turn)
        for i in range(n):
            try:
                lane = candidates[(start + i) % n]
            except IndexError:  # a lane was dropped meanwhile
                break
            if lane.open:
                load = lane.load()
                if load < best_load or load == best_load and lane.home and best is not None and not best.home:
                    best, best_load = lane, load
                    if not load and (lane.home or self._home is None):
                        break
        return best

    def submit(self, lane: Lane, call_id: int, args: Any, kwargs: Any, tensors: list[Any], deadline: float,
               method: str | None, resend: Callable[[bool], Future[Any]], numpy: bool = False,
               waiter: bool = False, retries: int = 0) -> Future[Any] | None:
        """Send one call on *lane* (from :meth:`take`); None when the lane failed (send it through the
        server instead). With *waiter* the calling thread promises to call the future's ``result()``
        next: it takes the lane's token now when it is free (Note [Claimed lanes])."""
        placer = shm.Placer(lane.arena, lane.inputs, inline=True)   # Note [Inline tensors]
        try:
            refs = placer.place_all(tensors)
        except BaseException:
            self.unpick(lane)
            raise
        future = LaneFuture(self, lane, call_id)
        call = _Call(future, placer.blocks, deadline, resend, numpy, retries)
        claimed = waiter and lane.reading.acquire(blocking=False)
        with self._lock:
            lane.picked -= 1
            if not lane.open:
                placer.rollback()
                if claimed:
                    lane.reading.release()
                return None
            if claimed:  # the reader thread is not woken by this call's answer: its caller reads it
                assert self._epoll is not None
                with contextlib.suppress(OSError):
                    self._epoll.modify(lane.channel.fileno(), _DISARMED)
                future._claimed = True
            lane.calls[call_id] = call
            if deadline:
                self._deadlines.push(deadline, call_id, lane)
                wake = deadline < self._wake_at
        try:
            lane.channel.send(messages.Call(call_id, args, kwargs, refs, lane.releases.drain(), method, 0,
                                            deadline, placer.inline), tuple(placer.fds))
        except BaseException as exc:  # not sent: nothing of it may stay behind, nor the token
            with self._lock:
                lane.calls.pop(call_id, None)  # its deadline entry is finished now (_settled)
            placer.rollback()
            if claimed:
                future._claimed = False
                lane.reading.release()
                self._arm(lane, _ARMED)
            if isinstance(exc, OSError):
                return None
            raise
        placer.close_fds()
        if deadline and wake:
            self._wake()
        return future

    def read_own(self, lane: Lane, future: Future[Any], call_id: int, end: float | None,
                 claimed: bool = False) -> None:
        """Read *lane* in this thread until *future* is done, its deadline or *end* passed, or the lane
        ended; return at once when another thread reads it (Note [One wake-up per reply]). *claimed*: this
        thread holds the lane's token already, and the lane is disarmed (Note [Claimed lanes])."""
        if not claimed and not lane.reading.acquire(blocking=False):
            return
        try:
            if not claimed and not self._arm(lane, _DISARMED):
                return
            call = lane.calls.get(call_id)
            if call is not None and call.deadline and (end is None or call.deadline < end):
                end = call.deadline  # then the reader thread fails it: wait on the future for that
            while not future.done():
                wait = None if end is None else end - time.monotonic()
                if wait is not None and wait <= 0 or not lane.channel.poll(wait) or not self._read_one(lane):
                    return
        finally:
            lane.reading.release()
            self._arm(lane, _ARMED)  # after the release: Note [One wake-up per reply]

    def _arm(self, lane: Lane, events: int) -> bool:
        """Set what the reader thread watches on *lane*; False when the lane was dropped."""
        with self._lock:
            if not lane.registered:
                return False
            assert self._epoll is not None
            with contextlib.suppress(OSError):
                self._epoll.modify(lane.channel.fileno(), events)
            return True

    def futures(self) -> list[Future[Any]]:
        """The futures of every call on a lane not answered yet."""
        with self._lock:
            return [c.future for ls in self._by_model.values() for lane in ls for c in lane.calls.values()
                    if not c.settled]

    def flush(self) -> None:
        """Send the outcomes observed so far to the server (before a status request)."""
        with self._lock:
            observed, self._observed = self._observed, {}
            self._report_at = math.inf
        for model, (outcomes, seconds) in observed.items():
            if self.observer is not None:
                self.observer(model, seconds)
            for i in range(0, len(outcomes), MAX_OBSERVED):
                self._report(messages.Observed(model, tuple(outcomes[i:i + MAX_OBSERVED]),
                                               tuple(seconds[i:i + MAX_OBSERVED])))

    def close(self, error: BaseException) -> None:
        """Drop every lane (detaching): the calls still on them fail with *error*."""
        with self._lock:
            self.closed = True
            self._closed_error = error
            all_lanes = [lane for ls in self._by_model.values() for lane in ls]
        for lane in all_lanes:
            shutdown(lane.channel)  # the reader sees end-of-file and drops it
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    # --- the reader thread ------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        epoll = self._epoll
        assert epoll is not None
        while True:
            with self._lock:
                if self.closed and not any(self._by_model.values()):
                    break
                due = self._deadlines.next()
                self._wake_at = min(math.inf if due is None else due, self._report_at)
                wake_at = self._wake_at
            timeout = None if wake_at == math.inf else max(0.0, wake_at - time.monotonic())
            self._serve_ready(epoll, timeout)
            now = time.monotonic()
            self._expire(now)
            if now >= self._report_at:
                with contextlib.suppress(OSError):
                    self.flush()
        with self._lock:
            wake_r, wake_w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, None, None
        for sock in (wake_r, wake_w):
            if sock is not None:
                sock.close()
        epoll.close()

    def _serve_ready(self, epoll: select.epoll, timeout: float | None) -> None:
        for fd, _ in epoll.poll(-1 if timeout is None else min(timeout, MAX_TIMEOUT)):
            self._service(fd)

    def _service(self, fd: int) -> None:
        """Read what the lane on *fd* sent (or the wake-up socket). Methods, so that no local of the loop
        keeps a dropped lane's arena mapped while the thread waits."""
        lane = self._by_fd.get(fd)
        if lane is None:
            if self._wake_r is not None and fd == self._wake_r.fileno():
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            return
        if not lane.reading.acquire(blocking=False):
            return  # a caller reads it, and re-arms it when done (Note [One wake-up per reply])
        try:
            while lane.registered and lane.channel.poll(0) and self._read_one(lane):
                pass
        finally:
            lane.reading.release()
            self._arm(lane, _ARMED)

    def _read_one(self, lane: Lane) -> bool:
        """Read and act on one message of *lane* (holding its token); False when the lane ended."""
        try:
            self._on_message(lane, *lane.channel.recv())
            return True
        except (EOFError, OSError) as exc:
            if isinstance(exc, messages.ProtocolError):
                log.warning("torchpool: lane %d to worker %d of %r: %s", lane.id, lane.worker, lane.model,
                            exc.strerror)
            self._drop(lane)
            return False

    def _on_message(self, lane: Lane, msg: Any, fds: list[int]) -> None:
        if type(msg) is messages.Stop:  # the worker retires: agree, then read until it closes
            lane.open = False
            with contextlib.suppress(OSError):
                lane.channel.send(messages.Stop())
            return
        with self._lock:
            call = lane.calls.pop(msg.id, None)
        if call is None:
            for fd in fds:
                os.close(fd)
            return
        value: Any = None
        exc: BaseException | None = None
        if type(msg) is messages.Result:
            try:  # before the input blocks are freed: an output may alias an input (it is copied out)
                tensors = shm.read_refs(lane.arena, msg.refs, fds, on_free=lane.releases, arrays=call.numpy,
                                         inline=msg.inline)
                value = codec.unflatten(msg.value, tensors)
            except Exception as err:  # noqa: BLE001 - a bad result fails its call, not the reader
                exc = OutputError(f"cannot read the result: {err}")
        else:
            for fd in fds:
                os.close(fd)
            exc = from_wire(WireError(*msg[1:]))
        for offset in call.blocks:
            lane.inputs.free(offset)
        if not call.settled:
            self._settle(lane, call, value, exc)

    def _settle(self, lane: Lane, call: _Call, value: Any, exc: BaseException | None) -> None:
        """Record the outcome first (a status request right after the answer sees it), then resolve."""
        call.settled = True
        with self._lock:
            outcomes, seconds = self._observed.setdefault(lane.model, ([], []))
            outcomes.append("cancelled" if call.future.cancelled() else outcome_of(exc))
            seconds.append(time.monotonic() - call.started)
            wake = self._report_at == math.inf
            if wake:
                self._report_at = time.monotonic() + REPORT_INTERVAL
                wake = self._report_at < self._wake_at and threading.current_thread() is not self._thread
        if wake:  # answered by its caller: the reader thread sends the outcome (once per REPORT_INTERVAL)
            self._wake()
        with contextlib.suppress(InvalidStateError):
            call.future.set_result(value) if exc is None else call.future.set_exception(exc)

    def _expire(self, now: float) -> None:
        expired = []
        with self._lock:
            while (entry := self._deadlines.pop_due(now)) is not None:
                _, call_id, lane = entry
                expired.append((lane, call_id, lane.calls[call_id]))
        for lane, call_id, call in expired:
            running = int(lane.words[lanes.CTRL_RUNNING]) == call_id
            self._settle(lane, call, None, _timed_out(lane, call, now, running))
            with contextlib.suppress(OSError):  # a queued call is dropped; a running one ends the worker
                lane.channel.send(messages.Cancel(call_id))

    def _drop(self, lane: Lane) -> None:
        """The lane ended: its worker died or retired (Note [Lanes]). Called by the holder of its token."""
        with self._lock:
            lanes_of = self._by_model.get(lane.model, [])
            if lane in lanes_of:
                lanes_of.remove(lane)
            calls, lane.calls = lane.calls, {}
            lane.open = False
            self._deadlines.drop_where(lambda item: item is lane)   # its arena is unmapped now, not later
            if lane.registered:  # before the descriptor is closed (and its number reused)
                lane.registered = False
                self._by_fd.pop(lane.channel.fileno(), None)
                assert self._epoll is not None
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(lane.channel.fileno())
        if self.closed and threading.current_thread() is not self._thread:
            self._wake()  # a caller dropped the last lane: the reader thread may end now
        running = int(lane.words[lanes.CTRL_RUNNING])
        lane.words.release()
        lane.channel.close()
        live = {call_id: call for call_id, call in calls.items() if not call.settled}
        # This process detached, or the server ended (its workers end with it): say which ended.
        ended = self._closed_error or (self._server_gone() if live else None)
        for call_id, call in live.items():
            if ended is not None:
                self._settle(lane, call, None, ended)
                continue
            if call_id == running and call.deadline and (now := time.monotonic()) >= call.deadline:
                # The worker's alarm ended it at the deadline, before this process's own expiry (the
                # deadline entry is dropped with the lane): the caller sees the timeout, not a crash.
                self._settle(lane, call, None, _timed_out(lane, call, now, True))
                continue
            if call_id == running:  # off this thread: other lanes' answers do not wait for the grace
                threading.Thread(target=self._settle_crashed, args=(lane, call), daemon=True,
                                 name="torchpool-lane-ended").start()
                continue
            # Never started: through the server, which runs it on another (or the respawned) worker.
            _send_again(call, False)

    def _settle_crashed(self, lane: Lane, call: _Call) -> None:
        """The lane of the call its worker was running ended: the server ended (its workers end with it),
        or the worker died alone. Watch for the first for :data:`SERVER_END_GRACE`."""
        give_up = time.monotonic() + SERVER_END_GRACE
        while (ended := self._server_gone()) is None and time.monotonic() < give_up:
            time.sleep(0.005)
        if ended is None and call.retries and not call.settled:
            # The worker died alone: TORCHPOOL_RETRIES, through the server (which then has one retry fewer,
            # and the details of any further death).
            _send_again(call, True)
            return
        self._settle(lane, call, None, ended or WorkerCrashedError(
            f"worker {lane.worker} of {lane.model!r} died while running this call",
            retry_after=self._retry_after))


def _send_again(call: _Call, retried: bool) -> None:
    """Through the server: a call its lane's end left unanswered (*retried*: its worker died running it)."""
    call.settled = True
    try:
        _chain(call.resend(retried), call.future)
    except Exception as exc:  # noqa: BLE001
        with contextlib.suppress(InvalidStateError):
            call.future.set_exception(exc)


def _timed_out(lane: Lane, call: _Call, now: float, running: bool) -> InferenceTimeoutError:
    return InferenceTimeoutError(
        f"the call did not finish within its deadline ({now - call.started:.3g}s; it was "
        f"{'running in' if running else 'queued for'} worker {lane.worker}). Raise TORCHPOOL_TIMEOUT "
        "or the view's timeout, or add workers")


def _settled(call_id: int, lane: Lane) -> bool:
    call = lane.calls.get(call_id)
    return call is None or call.settled


def _chain(source: Future[Any], target: Future[Any]) -> None:
    def done(f: Future[Any]) -> None:
        with contextlib.suppress(InvalidStateError):
            if f.cancelled():
                target.cancel()
            elif f.exception() is not None:
                target.set_exception(f.exception())
            else:
                target.set_result(f.result())
    source.add_done_callback(done)


def shutdown(channel: Channel) -> None:
    """End a lane's socket so that its reader sees end-of-file (it closes the descriptor itself)."""
    with contextlib.suppress(OSError):
        socket.socket(fileno=os.dup(channel.fileno())).shutdown(socket.SHUT_RDWR)
