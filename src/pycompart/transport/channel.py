"""``Channel``: one end of an edge; both ends use it.

Many threads may call
over it at once. There is no reader thread: the first waiting thread becomes
the *leader* and reads, handing replies that belong to other threads to them;
when its own reply arrives it passes leadership on. With a single caller this
costs nothing over a plain blocking round trip.

Calls flow both ways. A call nested inside one of ours (a callback: its
``parent`` is the id of a call we are waiting on) is handed to the thread that
waits on that call, which runs it through the channel's ``CallServer`` and
goes back to waiting. So A → B → A → B nests on the threads already involved,
from any number of threads, with no helper thread and no deadlock. Top-level
calls (``parent`` 0) go to ``CallServer.top_level``: an instance queues them
for its serve loop; ``main`` refuses them.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from .. import fastpaths
from ..errors import CallTimeout, CompartmentCrashed, CompartmentError, ProtocolError
from ..wire.protocol import (
    MAX_RELEASES,
    MAX_WARNINGS,
    NEED_DATA as _NEED_DATA,
    Call,
    Cancel,
    Connection,
    Err,
    ErrorInfo,
    LateReply,
    Ok,
    Output,
    Release,
    Violation,
    HEADER,
    Warn,
    close_fds,
    leave_stack,
)
from ..wire.contract import BulkPayload
from .bulk import Lanes
from . import gate
from .streams import PipeTransport, Transport

_READ_CHUNK = 64 * 1024


#: Nested calls queued for one waiting thread while it is busy (running an
#: earlier one); beyond this the peer gets an error instead of our memory.
MAX_QUEUED_NESTED = 256

#: How long a reply to a nested call may take to write when the call it
#: answers has no deadline of its own (the peer is waiting for it, so it is
#: reading; this only bounds a peer that stopped). A call with a deadline
#: bounds the replies sent while it waits: a peer that does not read is
#: misbehaving, and must not hold the caller past its timeout.
REPLY_SEND_TIMEOUT = 60.0
#: Bytes one ``drain`` may read: the monitor thread drains, and no single
#: instance may hold it.
DRAIN_BUDGET = 256 * 1024
#: Calls whose warnings are kept waiting for their callers at once.
MAX_WARNED_CALLS = 256
#: Descriptors that wait for their messages' decoders at once, per channel.
MAX_KEPT_FDS = 64
#: Messages whose bulk values (``transport.bulk``) wait for their decoders;
#: they hold at most two lanes' worth of bytes (beyond, the oldest go).
MAX_KEPT_BULK = 8

_context = threading.local()

#: How long a waiting end of a channel polls before it sleeps, by default.
DEFAULT_SPIN = 100e-6


def spin_seconds() -> float:
    """``DEFAULT_SPIN``, or ``PYCOMPART_SPIN_US`` microseconds (0: never
    spin); 0 on a single CPU, where spinning only delays the peer."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    if cpus < 2:
        return 0.0
    value = os.environ.get("PYCOMPART_SPIN_US")
    if value is None:
        return DEFAULT_SPIN
    try:
        return max(0.0, min(float(value), 10_000.0)) * 1e-6
    except ValueError:
        return DEFAULT_SPIN


def serving(channel: Channel) -> int:
    """The innermost call that this thread is serving for ``channel``'s
    peer, or 0. A call this thread makes to that peer is nested in it."""
    stack = getattr(_context, "stack", None)
    if stack:
        for ch, rid in reversed(stack):
            if ch is channel:
                return rid
    return 0


def serving_any() -> list[tuple[Channel, int]]:
    """Every (channel, call id) this thread is serving, innermost last."""
    return list(getattr(_context, "stack", ()) or ())


def serving_stack() -> list[tuple[Channel, int]]:
    """This thread's stack of calls being served (for a serve loop that
    pushes and pops without a context manager)."""
    stack = getattr(_context, "stack", None)
    if stack is None:
        stack = _context.stack = []
    return stack


class CallServer:
    """What a channel does with calls that arrive from its peer. The default
    refuses everything: that is ``main`` with no callbacks exported."""

    def execute(self, channel: Channel, call: Call) -> bytes:
        """Run a nested call in this thread; return the reply frame. Must not raise."""
        return channel.conn.send_err(call.id, refusal(f"{channel.peer!r} may not call back"))

    def top_level(self, channel: Channel, call: Call) -> None:
        channel.refuse(call, f"compartment {channel.peer!r} may only call back while it is being "
                       "called")

    def concurrent(self, channel: Channel, call: Call) -> None:
        """A call made during one of ours by another thread of the peer than
        the one running ours (``Call.concurrent``; ``call.parent`` is still
        waiting). By default it runs as a nested call, on the thread waiting
        for ``call.parent``; ``main``'s callback gate runs it on a thread of
        its own."""
        channel.queue_nested(call)

    def cancel(self, channel: Channel, rid: int) -> None:
        """The peer gave up on a call we are running (we cannot stop a thread;
        the reply it eventually gets is a late one)."""

    def release(self, channel: Channel, handles: list[tuple[int, int]]) -> None:
        """The peer dropped references to our objects."""

    def arrived(self, channel: Channel, key: tuple[str, int]) -> None:
        """A message that may name our objects arrived: a reply (``("r",
        id)``) or a call (``("c", id)``); only with the channel's
        ``track_arrivals``. Releases wait until it is ``decoded``
        (``pycompart.wire.refs.Peer.arrived``)."""

    def decoded(self, channel: Channel, key: tuple[str, int]) -> None:
        """The message ``key`` was decoded, or never will be."""

    def closed(self, channel: Channel) -> None:
        """The channel is closed: drop what the peer held."""


def refusal(message: str) -> ErrorInfo:
    return ErrorInfo("pycompart.EntrypointError", message, [message], "")


#: How long a sender waits for the send lock at least (``_wait_to_send``),
#: and at most between two looks at it.
SEND_WAIT_MIN = 0.05
SEND_WAIT_SLICE = 0.05


class _LockBusy(Exception):
    """The send lock stayed held past a sender's deadline."""


class _Waiter:
    """A thread waiting for its reply while another thread leads. Calls
    nested in its call are queued on ``nested`` for it to run."""

    __slots__ = ("lock", "done", "message", "error", "nested", "running", "busy", "took_lead")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.done = False
        self.message: Ok | Err | None = None
        self.error: BaseException | None = None
        self.nested: list[Call] = []
        #: The nested calls it took to run, until all are answered: what an
        #: interrupt leaves unanswered is refused (``_stop_waiting``).
        self.running: list[Call] = []
        #: Running nested calls or still sending its own: not waiting, so
        #: it cannot be handed the reading.
        self.busy = False
        #: It took the reading while its frame waited for room (``_pump``).
        self.took_lead = False

    def wake(self) -> None:
        try:
            self.lock.release()
        except RuntimeError:  # already awake
            pass


_DRAIN = _Waiter()  # a waiter that is never done: read what is there, then stop
_REFUSE = CallServer()


class Channel:
    """The caller's end of an edge.

    ``request`` sends one call and returns the ``Ok``/``Err`` message that
    answers it, or raises ``CompartmentCrashed`` (the far end died),
    ``ProtocolError`` (it broke the protocol) or ``CallTimeout``.
    ``on_event(kind, detail)`` reports ``timeout``, ``late_reply``,
    ``violation`` and ``broken`` to the monitor.
    """

    def __init__(self, transport: Transport, conn: Connection, peer: str,
                 on_event: Callable[[str, Any], None] | None = None,
                 server: CallServer | None = None):
        self.transport = transport
        self.conn = conn
        self.peer = peer
        self.on_event = on_event or (lambda kind, detail: None)
        self.server = server or _REFUSE
        #: (handle, count) pairs to tell the peer about with the next frame.
        self.pending_release: list[tuple[int, int]] = []
        #: Sources of Output frames to send before the next frame (what an
        #: instance printed during a call: ``pycompart.compartment.output``).
        self.pending_output: list[Any] = []
        #: Tell the server of each reply's and call's arrival (releases wait
        #: for decodes; module compartments, both ends).
        self.track_arrivals = False
        #: Where Output from the peer goes: ``(stream, data)``; None drops it
        #: (only instances send output).
        self.output_sink: Callable[[int, bytes], None] | None = None
        #: Warnings the peer's code issued, by the id of the call they came
        #: with, for the caller to re-issue (``pycompart.frontend.warn``);
        #: None drops them (only module compartments' warnings are kept).
        self.call_warnings: dict[int, list[Any]] | None = None
        self._leader_nested: list[Call] = []
        # The serve loop of an instance waits here for top-level calls.
        self._inbox = _Waiter()
        self._inbox_waiting = False
        self._inbox_reading = False  # the serve thread itself leads
        #: The transport's read end blocks (an instance): an idle serve loop
        #: reads without polling first; everyone else still polls.
        self.blocking_reads = False
        self._mu = threading.Lock()
        #: The send lock: the token of the thread that may write a frame
        #: now, None if nobody. Taken under ``_mu`` by storing a token (a
        #: call's id, or the sender's own object) and given back by the
        #: holder, so that whatever ends a holder by raising (a signal
        #: handler's exception, which Python raises at its next check, even
        #: right after a lock was taken) can tell from it whether the lock
        #: is its own to give back (``_unwind``). A ``threading.Lock``
        #: cannot: nothing says who holds it. Senders that wait for it
        #: queue here (``_wait_to_send``).
        self._send_owner: object = None
        self._send_queue: list[_Waiter] = []
        #: The exception that interrupted ``_send_whole`` once the frame was
        #: out whole (``_not_sent``).
        self._sent_whole: BaseException | None = None
        #: Who copies into our bulk lane now (``_place_bulk``).
        self._lane_owner: object = None
        self._waiters: dict[int, _Waiter] = {}
        self._leader = False
        self._leader_rid = 0
        #: Who reads (with ``_leader``): the fast-path leader's call id, a
        #: follower's waiter, or the serve loop's inbox; for the same reason.
        self._lead_by: object = None
        self._leader_reply: Ok | Err | None = None
        self._buf = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buf)
        # Wakes the leader out of poll when the channel fails.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(transport.fileno(), select.POLLIN)
        self._poll.register(self._wake, select.POLLIN)
        #: Seconds to wait for the peer's next frame by polling without
        #: sleeping before blocking (``spin_seconds``).
        self.spin = spin_seconds()
        self._spin_us = int(self.spin * 1e6)
        #: (write fd, read fd) of a pipe transport, for ``gate.receive``.
        self._direct: tuple[int, int] | None = (
            (transport.write_fd, transport.read_fd) if isinstance(transport, PipeTransport) else None)
        #: Send calls (top-level, and callbacks nested in the peer's) in
        #: compact form (``pycompart.wire.protocol``) through ``gate.call``,
        #: and replies to callbacks too (``compact``); their entrypoints'
        #: names, encoded (bounded).
        self._compact = self._direct is not None and fastpaths.enabled("compact")
        self._names: dict[str, bytes] = {}
        #: The bytes a read returned that are not yet taken into the decoder
        #: (-1: none; -2 or 1: a read whose count is not known yet). A signal
        #: handler's exception raised right after a read would lose them: the
        #: channel is then broken (``_interrupted``), not misread, unless the
        #: count is exact (``_keep_unread``). ``gate.receive`` sets it the
        #: moment its read returns.
        self._got = memoryview(bytearray(8)).cast("q")
        self._got[0] = -1
        #: A message is being taken from the decoder and dispatched: one
        #: that an exception interrupts is lost (a call nobody answers), so
        #: the channel breaks (``_interrupted``).
        self._handling = False
        self.failure: CompartmentError | None = None
        self.failure_factory: Callable[[], CompartmentError] | None = None
        self._users = 0  # threads inside request()/drain(); close waits for 0
        #: Descriptors that came with messages, until decoded (``_keep_fds``).
        self.message_fds: dict[tuple[str, int], list[int]] = {}
        #: Shared memory for large values (``use_bulk``), and the values
        #: that came through it, until decoded (``take_message_bulk``).
        self.bulk: Lanes | None = None
        #: Lanes made for the peer that it has not said it mapped yet.
        self.bulk_offer: Lanes | None = None
        self.message_bulk: dict[tuple[str, int], list[bytes]] = {}
        self._kept_count = 0
        self._close_requested = False
        self._pump_eof = False
        self.closed = False

    @property
    def pending(self) -> int:
        return len(self._waiters) + self._leader

    def use_bulk(self, lanes: Lanes, kind: type) -> None:
        """Send large values through ``lanes`` and accept messages of
        ``kind`` (``Ok`` at main's end, ``Call`` at an instance's) that name
        their segments, copied out as each such frame is read."""
        frames = self.conn.frames
        self.bulk = lanes
        self.conn.bulk_kind = kind
        frames.bulk_source = lambda count: lanes.receive(count, frames.max_frame)

    @property
    def compact(self) -> bool:
        """Whether frames to the peer may be sent in compact form."""
        return self._compact

    # -- calling ----------------------------------------------------------------

    def request(self, entrypoint: str, payload: bytes | BulkPayload, deadline: float | None,
                parent: int = 0, concurrent: bool = False, fds: list[int] | tuple[int, ...] = ()) -> Ok | Err:
        conn = self.conn
        if fds and not self.transport.can_pass_fds:
            close_fds(fds)
            raise TypeError(f"the channel to {self.peer!r} cannot carry descriptors (its spec "
                            "needs descriptors = true)")
        # A signal handler's exception (KeyboardInterrupt) is raised where
        # Python next checks for it: at any call, even right after a lock was
        # taken. Whatever this call takes of the channel (the reading, the
        # send lock, a waiter's slot, a user's count) is taken inside the
        # try of the method that gives it back, and recorded under the
        # call's id, so that what ends it by raising can give back exactly
        # that (``_unwind``).
        if self._compact and not fds and not concurrent and payload.__class__ is bytes:
            # (A top-level call, or a callback nested in the peer's call
            # ``parent`` that this thread serves.)
            rid = conn.new_call()
            reply = self._exchange(rid, entrypoint, None, deadline, 0, payload, parent)  # type: ignore[arg-type]
            if reply is not None:
                return reply
            nbulk = 0
            frame = conn.call_frame(rid, entrypoint, payload, 0, parent)  # type: ignore[arg-type]
        else:
            nbulk = 0  # (bulk values: the general path only)
            if payload.__class__ is BulkPayload:
                payload, nbulk = self._place_bulk(payload)  # type: ignore[arg-type]
            try:
                rid, frame = conn.send_call(entrypoint, payload, len(fds), parent, concurrent, nbulk)  # type: ignore[arg-type]
            except BaseException:
                if nbulk:
                    self.bulk.unsend()  # type: ignore[union-attr]
                raise
        frame = self.with_pending(frame)
        if not fds and self._direct is not None:
            reply = self._exchange(rid, entrypoint, frame, deadline, nbulk)
            if reply is not None:
                return reply
        return self._request(rid, entrypoint, frame, deadline, fds, nbulk)

    def _take_lead(self, rid: int) -> bool:
        """(With ``_mu`` held.) The fast path's start: if nobody reads or
        sends, lead for ourselves, call ``rid``, holding the send lock
        already (leading while waiting for it would leave its holder, its
        frame waiting for room, with nobody to read for it). Stores only:
        nothing in here can raise once the first store is done."""
        if self._leader or self._send_owner is not None:
            return False
        self._send_owner = rid
        self._leader = True
        self._leader_rid = rid
        self._lead_by = rid
        self._leader_reply = None
        return True

    def _unwind(self, rid: int, exc: BaseException) -> None:
        """Call ``rid`` is ending by raising ``exc`` (a signal handler's
        exception at any moment, or anything else): give back what the
        channel's state says it still holds (the send lock, the reading, a
        waiter registered for it, cancelled as a timeout does), or every
        later call would wait for ever."""
        if self._send_owner == rid:
            self._release_send()
        self._stop_leading(rid, exc)
        waiter = self._waiters.get(rid)
        if waiter is not None:
            self._stop_waiting(rid, waiter)
        conn = self.conn
        if rid in conn.awaiting and rid not in conn.cancelled and self.failure is None:
            self.cancel(rid)  # (out, and its reply not taken: nobody will)

    def _place_bulk(self, payload: BulkPayload) -> tuple[bytes, int]:
        """The bytes to frame and how many bulk segments they name: the
        values go into our lane if it is free, else inline."""
        lanes = self.bulk
        if lanes is not None:
            token = object()
            try:
                with self._mu:
                    if self._lane_owner is None:
                        self._lane_owner = token
                if self._lane_owner is token and lanes.send(payload.buffers):
                    return payload.payload, len(payload.buffers)
            finally:
                if self._lane_owner is token:  # (as the send lock: see ``_send_owner``)
                    self._lane_owner = None
        return payload.inline(), 0

    def reply_value(self, rid: int, value: bytes | BulkPayload, nfds: int = 0) -> bytes:
        """The Ok frame for ``value`` (its bulk values placed as in
        ``request``); a reply that does not go out breaks the channel, so
        the lane needs no undoing."""
        nbulk = 0
        if value.__class__ is BulkPayload:
            value, nbulk = self._place_bulk(value)  # type: ignore[arg-type]
        return self.conn.send_ok(rid, value, nfds, nbulk)  # type: ignore[arg-type]

    def take_message_bulk(self, key: tuple[str, int]) -> list[bytes] | None:
        """The bulk values that came with message ``key``, if any."""
        if not self.message_bulk:
            return None
        with self._mu:
            return self.message_bulk.pop(key, None)

    def _leave(self) -> None:
        with self._mu:
            self._users -= 1
        if self._close_requested:
            self._close_if_unused()

    def _close_if_unused(self) -> None:
        """A close was asked for while we were in: the last one out closes."""
        with self._mu:
            close = self._close_requested and self._users == 0 and not self.closed
            if close:
                self.closed = True
        if close:
            self._close_now()

    def _request(self, rid: int, entrypoint: str, frame: bytes, deadline: float | None,
                 fds: list[int] | tuple[int, ...] = (), nbulk: int = 0) -> Ok | Err:
        """The general path: lead for ourselves if nobody reads or sends (a
        transport without ``_exchange``); else send when the send lock is
        free, and wait as a follower for our reply (or for the reading)."""
        mu = self._mu
        waiter = None
        entered = False
        try:
            with mu:
                failure = self.failure
                if failure is None:
                    self._users += 1
                    entered = True
                    if not self._take_lead(rid):
                        waiter = _Waiter()
                        waiter.busy = True  # sending: it cannot be handed the reading yet
                        self._waiters[rid] = waiter
            if failure is not None:
                self.conn.forget(rid)
                close_fds(fds)
                raise failure
            try:
                if waiter is None:
                    self._send(frame, deadline, fds, owner=rid)
                else:
                    try:
                        self._send(frame, deadline, fds, follower=waiter)
                    finally:
                        waiter.busy = False
            except BaseException as exc:
                self._not_sent(rid, entrypoint, waiter, nbulk, exc)
            if waiter is None:
                return self._lead_then_await(rid, entrypoint, deadline)
            return self._follow(rid, entrypoint, waiter, deadline)
        except BaseException as exc:
            if entered:
                self._unwind(rid, exc)
            raise
        finally:
            if entered:
                # (Inline: a signal handler's exception can be raised as any
                # function is entered, even in a finally clause.)
                with mu:
                    self._users -= 1
                if self._close_requested:
                    self._close_if_unused()

    def _not_sent(self, rid: int, entrypoint: str, waiter: _Waiter | None, nbulk: int,
                  exc: BaseException, compact: bool = False) -> NoReturn:
        """``_send`` raised ``exc``: what the caller gets instead.
        ``compact``: the frame was a ``gate.call``, whose return an
        interrupt can hide (the frame went out whole, or not at all)."""
        if self._sent_whole is exc or (compact and not isinstance(exc, Exception) and self.failure is None):
            # Interrupted as the frame went out whole (or perhaps did): the
            # call is out, and ``_unwind`` cancels it; its reply, if it
            # comes, is a cancelled call's.
            self._sent_whole = None
            self._abandon(rid, waiter, forget=False)
            raise exc
        if isinstance(exc, _LockBusy):
            # Another thread is stuck sending (to a peer that does not
            # read): nothing of ours is on the wire; give up by our deadline.
            if nbulk:
                self.bulk.unsend()  # type: ignore[union-attr]
            self._abandon(rid, waiter)
            raise CallTimeout(f"call {entrypoint} to {self.peer!r} could not be sent in time "
                              "(the channel is busy)") from None
        if isinstance(exc, TimeoutError):
            # Part of a frame may be on the wire: the stream is unusable.
            self._abandon(rid, waiter)
            self.fail(ProtocolError(f"channel to {self.peer!r} broken: a call could not be "
                                    "sent before its deadline"), reason="send timeout")
            raise CallTimeout(f"call {entrypoint} to {self.peer!r} could not be sent in time") from None
        if isinstance(exc, OSError):
            self._abandon(rid, waiter)
            self._fail_from_eof(f"send failed: {exc}")
            raise self.failure or CompartmentCrashed(self.peer, None, "closed its channel") from None
        self._abandon(rid, waiter)
        raise exc

    def _lead_then_await(self, rid: int, entrypoint: str, deadline: float | None) -> Ok | Err:
        """Our call sent while we lead for ourselves: read until our reply
        comes, or wait as a follower if calls nested in ours came instead."""
        reply, waiter = self._lead_for_self(rid, deadline)
        if reply is not None:
            return reply
        if waiter is None:
            # Our reply did not come while we led (timeout or failure).
            return self._finish_leading_without_reply(rid, entrypoint)
        return self._follow(rid, entrypoint, waiter, deadline)

    def _follow(self, rid: int, entrypoint: str, waiter: _Waiter, deadline: float | None) -> Ok | Err:
        if waiter.took_lead:
            waiter.took_lead = False
            self._lead_as_follower(waiter, deadline)
        return self._await(rid, entrypoint, waiter, deadline)

    def _lead_as_follower(self, waiter: _Waiter, deadline: float | None) -> None:
        try:
            self._read_until(waiter, deadline)
        except TimeoutError:
            pass
        finally:
            self._release_leadership(own=waiter)

    def _exchange(self, rid: int, entrypoint: str, frame: bytes | None, deadline: float | None,
                  nbulk: int, compact: bytes | None = None, parent: int = 0) -> Ok | Err | None:
        """``request``'s fast path on a pipe, if nobody reads or sends (else
        None, as when the channel failed): lead for ourselves holding the
        send lock, write our frame (with one ``os.write`` when the pipe has
        room), release the lock, and wait for what comes back first in
        ``transport.gate.receive`` (C where built). Our plain reply ends it
        there, leaving the channel under one lock; anything else goes to the
        general loop. ``compact``: no frame yet, but the arguments of a
        call (nested in the peer's ``parent`` if not 0) to send in compact
        form (not while releases or output wait to go out with a frame)."""
        entered = left = False
        try:
            with self._mu:
                if self.failure is not None or (compact is not None and (
                        self.pending_release or self.pending_output)) or not self._take_lead(rid):
                    return None
                self._users += 1
                entered = True
            try:
                if compact is not None:
                    self._write_compact(rid, entrypoint, compact, deadline, parent)
                else:
                    self._write_leading(frame, deadline)  # type: ignore[arg-type]
            except BaseException as exc:
                self._not_sent(rid, entrypoint, None, nbulk, exc, compact is not None)
            while not self.conn.frames.pending and self.failure is None:
                event = self._receive_own(rid, deadline)
                if event is None and self._leader_nested and self._leader_reply is None \
                        and self.failure is None:
                    # Calls nested in ours (callbacks) came first.
                    waiter = self._serve_nested_then_lead(rid, entrypoint, deadline)
                    if waiter is None:
                        continue  # leading for ourselves again
                    return self._await(rid, entrypoint, waiter, deadline)
                if event is not None:
                    if event.__class__ is Ok:  # our plain reply, not yet taken
                        with self._mu:
                            if not self._leader_nested and not self._waiters and not self._inbox_waiting:
                                self._leader = False
                                self._leader_rid = 0
                                self._lead_by = None
                                if not self._close_requested:
                                    self._users -= 1
                                    left = True
                                return event
                        self._leader_reply = event
                    elif not self._leader_nested and self.failure is None:
                        reply, _ = self._release_leadership(rid)
                        if reply is not None:
                            return reply
                break
            return self._lead_then_await(rid, entrypoint, deadline)
        except BaseException as exc:
            # A signal handler's exception (KeyboardInterrupt) anywhere in
            # here, or anything else: we stop leading (if we still do), or
            # nobody would ever read again.
            if entered:
                self._unwind(rid, exc)
            raise
        finally:
            if entered and not left:
                with self._mu:  # (inline: see ``_request``)
                    self._users -= 1
                if self._close_requested:
                    self._close_if_unused()

    def _serve_nested_then_lead(self, rid: int, entrypoint: str, deadline: float | None) -> _Waiter | None:
        """``_exchange``'s leader got calls nested in its own before its
        reply. It stops leading, so that another thread may read while
        they run (a callback may take long), runs them, and leads for
        itself again if nobody else took the reading or waits meanwhile:
        None. Otherwise (or past ``deadline``) it is a follower: the waiter
        to ``_await`` on."""
        _, waiter = self._release_leadership(rid)
        if waiter is None:  # the channel failed meanwhile
            self._finish_leading_without_reply(rid, entrypoint)  # (raises)
        mu = self._mu
        try:
            while True:
                with mu:
                    nested = waiter.nested
                    if not nested:
                        break
                    waiter.nested = []
                    waiter.running = nested
                    waiter.busy = True
                self._run_nested(waiter, nested, deadline)
                if deadline is not None and time.monotonic() >= deadline:
                    return waiter  # (``_await`` gives up, refusing what else comes)
        except BaseException:
            self._stop_waiting(rid, waiter)
            raise
        with mu:
            if waiter.done or waiter.nested or self._leader or len(self._waiters) != 1 \
                    or self._inbox_waiting or self.failure is not None:
                return waiter
            del self._waiters[rid]
            self._leader = True
            self._leader_rid = rid
            self._lead_by = rid
            self._leader_reply = None
        return None

    def _run_nested(self, waiter: _Waiter, nested: list[Call], deadline: float | None) -> None:
        """Run the calls nested in ``waiter``'s that it took (``busy`` and
        ``running`` since). Whatever raises out of here ends the wait
        (``_stop_waiting``), answering what is left."""
        while nested:
            self.serve_nested(nested[0], deadline, nested)
        waiter.busy = False

    def _stop_leading(self, rid: int, exc: BaseException) -> None:
        if self._leader and self._leader_rid == rid:  # we are the one who reads
            self._interrupted(exc)
            self._release_leadership(rid)

    def _write_leading(self, frame: bytes, deadline: float | None) -> None:
        """``_send`` for the leader of ``_exchange``, which holds the send
        lock: a frame that does not fit the pipe waits for room while we
        read (``_pump``)."""
        try:
            self._send_whole(frame, (), deadline, self._pump)
        finally:
            # (Inline, not ``_release_send``: an interrupt as that is entered,
            # after the frame went out whole, would be taken for one that
            # stopped it going out.)
            self._send_owner = None
            if self._send_queue:
                self._wake_senders()

    def _send_whole(self, data: bytes | memoryview, fds: list[int] | tuple[int, ...], deadline: float | None,
                    pump: Callable[[], None] | None) -> None:
        """``transport.send``, under the send lock. Interrupted by anything
        but its own errors (a signal handler's exception, even right after
        the first write), part of the frame may be on the wire, and nothing
        after it could be framed: the channel is broken, the peer not to
        blame. Unless all of it went out (``wrote_all``: a Ctrl-C raised as
        the last write returned)."""
        try:
            self.transport.send(data, fds, deadline, pump)
        except (OSError, ProtocolError):
            raise
        except BaseException as exc:
            if self.transport.wrote_all(data):
                # (Raised as the last write returned: the whole frame is out.)
                self._sent_whole = exc
                raise
            self.fail(ProtocolError(f"channel to {self.peer!r} broken: sending a frame was interrupted "
                                    f"({type(exc).__name__})"), reason="interrupted send")
            raise

    def _write_compact(self, rid: int, entrypoint: str, args: bytes, deadline: float | None,
                       parent: int = 0) -> None:
        """``_write_leading`` for a call in compact form: one ``gate.call``,
        or (too big for one write, or no room in the pipe) the call as a
        msgpack frame the usual way."""
        name = self._names.get(entrypoint)
        if name is None:
            name = entrypoint.encode()
            if len(self._names) < 1024:
                self._names[entrypoint] = name
        try:
            if not gate.call(self._direct[0], rid, name, args, parent):  # type: ignore[index]
                self._send_whole(self.conn.call_frame(rid, entrypoint, args, 0, parent), (), deadline,
                                 self._pump)
        finally:
            self._send_owner = None  # (inline: see ``_write_leading``)
            if self._send_queue:
                self._wake_senders()

    def _receive_own(self, rid: int, deadline: float | None) -> Ok | bool | None:
        """Wait for what comes first, and read it: our plain reply (``Ok``,
        still to be taken), True if the leader's reply was set meanwhile
        (anything else was dispatched), or None."""
        timeout = -1 if deadline is None else min(max(0, int((deadline - time.monotonic()) * 1000)),
                                                  gate.MAX_TIMEOUT_MS)
        try:
            n = gate.receive(self._direct[1], self._view, timeout, self._spin_us, rid, self._got)  # type: ignore[index]
        except BaseException:
            self._keep_unread()
            raise
        if n.__class__ is bytes:  # our reply in compact form, all that was read
            self._handling = True
            self._got[0] = -1
            event = self.conn.reply_to(rid, n)  # type: ignore[arg-type]
            if event.__class__ is Ok and self.failure is None:
                if self.track_arrivals:
                    self.server.arrived(self, ("r", rid))
                self._handling = False
                return event  # type: ignore[return-value]
            self._dispatch(event)
            self._handling = False
            return None
        if n == 0:
            self._fail_from_eof("closed its channel")
        elif n > 0:
            conn = self.conn
            self._handling = True
            event = conn.parse_one(self._view[:n])
            self._got[0] = -1
            if event.__class__ is Ok and event.id == rid and conn.bulk_values is None \
                    and self.failure is None:  # type: ignore[union-attr]
                # Our reply, plain (as ``_dispatch`` would take it).
                if self.track_arrivals:
                    self.server.arrived(self, ("r", rid))
                if conn.frames.pending:
                    # Whole frames read with it (the releases an instance
                    # sends after a reply): taken now, or the next call
                    # could not take the fast path.
                    self._dispatch_buffered()
                self._handling = False
                return event  # type: ignore[return-value]
            if event is not _NEED_DATA:
                self._dispatch(event)
            self._handling = False
            if self._leader_reply is not None:
                return True
        return None

    def _dispatch_buffered(self) -> None:
        """(The leader.) Dispatch the whole frames buffered, if any."""
        conn = self.conn
        while conn.frames.pending and self.failure is None:
            self._handling = True
            event = conn.next_event()
            if event is not _NEED_DATA:
                self._dispatch(event)
            self._handling = False
            if event is _NEED_DATA:
                return

    def _lead_for_self(self, rid: int, deadline: float | None) -> tuple[Ok | Err | None, _Waiter | None]:
        try:
            self._read_until(None, deadline)
        except TimeoutError:
            pass
        finally:
            # Taken while still leader: the next leader reuses the slot.
            reply, waiter = self._release_leadership(rid)
        return (reply if self.failure is None else None), waiter

    def _finish_leading_without_reply(self, rid: int, entrypoint: str) -> Ok | Err:
        failure = self.failure
        if failure is not None:
            self.conn.forget(rid)
            raise failure
        return self._timed_out(rid, entrypoint)

    def _await(self, rid: int, entrypoint: str, waiter: _Waiter, deadline: float | None) -> Ok | Err:
        try:
            return self._await_loop(rid, entrypoint, waiter, deadline)
        except BaseException:
            self._stop_waiting(rid, waiter)
            raise

    def _stop_waiting(self, rid: int, waiter: _Waiter) -> None:
        """Something (Ctrl-C, a nested call's own BaseException) ended our
        wait for ``rid`` by raising: unregister the waiter, or it would
        take the calls the peer nests in ``rid`` from now on, and nobody
        runs them (the peer would wait for ever), and cancel the call, as a
        timeout does. What was queued for it is refused."""
        if self._leader and self._lead_by is waiter:
            # (It took the reading, and was stopped before it read.)
            self._release_leadership(own=waiter)
        with self._mu:
            # (Not registered any more: its reply came, or a timeout gave
            # it up and cancelled it already.)
            registered = self._waiters.get(rid) is waiter
            if registered:
                del self._waiters[rid]
            orphans, waiter.nested = waiter.nested, []
            running, waiter.running = waiter.running, []
        for call in running:  # (taken to run, and never answered)
            self.refuse(call, "interrupted")
        for call in orphans:
            self.refuse(call, "the call this one is nested in was interrupted")
        if registered and self.failure is None:
            self.cancel(rid)

    def _await_loop(self, rid: int, entrypoint: str, waiter: _Waiter, deadline: float | None) -> Ok | Err:
        while True:
            with self._mu:
                if waiter.done:
                    break
                nested = waiter.nested
                if nested:
                    waiter.nested = []
                    waiter.running = nested
                    waiter.busy = True
                lead = not nested and not self._leader
                if lead:
                    self._leader = True
                    self._leader_rid = 0
                    self._lead_by = waiter
            if nested:
                self._run_nested(waiter, nested, deadline)  # back in the loop, it leads if nobody does
                # Checked here too, not only before waiting for data: a peer
                # that keeps a buffer of nested calls queued would otherwise
                # delay the timeout until that buffer ran out. Its later
                # nested calls are refused.
                if deadline is not None and time.monotonic() >= deadline and self._give_up(rid, waiter):
                    return self._timed_out(rid, entrypoint)
                continue
            if lead:
                self._lead_as_follower(waiter, deadline)
                if waiter.done:
                    break
            elif deadline is None:
                waiter.lock.acquire()
            else:
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    waiter.lock.acquire(timeout=remaining)
            if deadline is not None and not waiter.done and time.monotonic() >= deadline \
                    and self._give_up(rid, waiter):
                return self._timed_out(rid, entrypoint)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.message is not None
        return waiter.message

    def _give_up(self, rid: int, waiter: _Waiter) -> bool:
        """Stop waiting for ``rid`` unless its reply came in the meantime."""
        with self._mu:
            timed_out = not waiter.done
            if timed_out:
                self._waiters.pop(rid, None)
        return timed_out

    def _timed_out(self, rid: int, entrypoint: str) -> Ok | Err:
        self.cancel(rid)
        self.on_event("timeout", rid)
        raise CallTimeout(f"call {entrypoint} to compartment {self.peer!r} timed out")

    def _release_leadership(self, rid: int = 0, own: _Waiter | None = None) -> tuple[Ok | Err | None, _Waiter | None]:
        """Stop leading. Returns the fast-path leader's own reply, if any,
        and, if calls nested in ``rid`` arrived instead, a waiter (now
        registered) holding them: the leader goes on waiting as a follower."""
        waiter = None
        orphans: list[Call] = []
        with self._mu:
            reply, self._leader_reply = self._leader_reply, None
            if self._leader_nested:
                if reply is None and rid and self.failure is None:
                    waiter = _Waiter()
                    waiter.nested, self._leader_nested = self._leader_nested, []
                    self._waiters[rid] = waiter
                else:
                    orphans, self._leader_nested = self._leader_nested, []
            self._leader = False
            self._leader_rid = 0
            self._lead_by = None
            for other in self._waiters.values():
                if not other.done and not other.busy and not other.nested \
                        and other is not waiter and other is not own:
                    # It takes over reading (we may be about to run a nested
                    # call for a long time).
                    other.wake()
                    break
            else:
                if self._inbox_waiting:
                    self._inbox.wake()
        for call in orphans:
            self.refuse(call, "the call this one is nested in has already ended")
        return reply, waiter

    def cancel(self, rid: int) -> None:
        """Tell the far side to abandon ``rid`` (best effort, bounded)."""
        frame = self.conn.send_cancel(rid)
        try:
            self._send(frame, time.monotonic() + 0.5)
        except (OSError, TimeoutError, ProtocolError, _LockBusy):
            pass

    def _abandon(self, rid: int, waiter: _Waiter | None, forget: bool = True) -> None:
        if waiter is None:
            self._release_leadership()
        else:
            with self._mu:
                self._waiters.pop(rid, None)
            if waiter.took_lead:  # it led while its frame waited for room
                waiter.took_lead = False
                self._release_leadership(own=waiter)
        if forget:
            self.conn.forget(rid)

    # -- reading (leader only) -----------------------------------------------

    def _read_until(self, waiter: _Waiter | None, deadline: float | None) -> None:
        """Read and dispatch until ``waiter`` is done (``None``: until the
        leader's own reply arrives; ``_DRAIN``: until nothing is buffered, or
        ``DRAIN_BUDGET`` bytes have been read)."""
        try:
            self._read_loop(waiter, deadline)
        except BaseException as exc:
            self._interrupted(exc)
            raise

    def _keep_unread(self) -> None:
        """A signal handler's exception (Ctrl-C) raised as ``gate.receive``
        returned: the bytes its read returned are in ``_view``, an exact
        count of them in ``_got``, none taken yet. They are buffered for the
        next reader instead of lost, so the channel stays framed and the
        peer is not killed for our interruption."""
        n = self._got[0]
        if n > 0:
            self.conn.receive_data(bytes(self._view[:n]))
            self._got[0] = -1  # (after: interrupted before, the channel breaks as it did)

    def _interrupted(self, exc: BaseException) -> None:
        """``exc`` escaped a read. If it came between a read and the
        decoder taking its bytes in (a signal handler's exception, raised
        where Python next checks), those bytes are lost and the stream can
        no longer be framed; between the decoder giving a message and its
        dispatch, the message is lost. Either way the channel is broken, the
        peer not to blame."""
        if (self._got[0] != -1 or self._handling) and not isinstance(exc, (OSError, ProtocolError)):
            self._got[0] = -1
            self._handling = False
            self.fail(ProtocolError(f"channel to {self.peer!r} broken: reading it was interrupted "
                                    f"({type(exc).__name__})"), reason="interrupted read")

    def _read_loop(self, waiter: _Waiter | None, deadline: float | None) -> None:
        conn = self.conn
        frames = conn.frames
        transport = self.transport
        poll = self._poll.poll
        drained = 0
        while True:
            if self.failure is not None:
                return  # nothing after a failure is trusted, not even our reply
            if waiter is _DRAIN and drained > DRAIN_BUDGET:
                return  # what is left waits for the next reader
            if waiter is None:
                if self._leader_reply is not None or self._leader_nested:
                    return
            elif waiter.done or waiter.nested:
                return
            if frames.buffered:
                self._handling = True
                event = conn.next_event()
                if event is not _NEED_DATA:
                    self._dispatch(event)
                    self._handling = False
                    self._check_deadline(deadline, waiter)
                    continue
                self._handling = False
            if self.failure is not None:
                return
            if waiter is self._inbox and self.blocking_reads:
                ready = True  # the serve thread, idle: one blocking read, no poll
            elif self.spin and waiter is not _DRAIN and self._spin():
                ready = True
            elif deadline is None:
                ready = poll()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and waiter is not _DRAIN:
                    raise TimeoutError
                ready = poll(max(0, int(remaining * 1000) + 1) if waiter is not _DRAIN else 0)
            if not ready:
                if waiter is _DRAIN:
                    return
                continue
            if self.failure is not None:
                return  # woken by the eventfd: never read (a blocking fd would hang)
            view = frames.want_buffer() or self._view
            got = self._got
            try:
                got[0] = 1  # (from here until the bytes are taken: see ``_got``)
                n, fds = transport.read_into(view)
            except BlockingIOError:
                got[0] = -1
                continue  # woken by the eventfd, or a spurious wake-up
            except ProtocolError as exc:
                self.fail(exc, reason=str(exc))
                return
            except OSError as exc:
                self._fail_from_eof(f"read failed: {exc}")
                return
            if n == 0:
                self._fail_from_eof("closed its channel")
                return
            drained += n
            if view is not self._view:
                self._buffered(view, n, fds)
                got[0] = -1
            else:
                self._handling = True
                event = conn.parse_one(view[:n]) if not fds else self._feed(view[:n], fds)
                got[0] = -1
                if event is not _NEED_DATA:
                    self._dispatch(event)
                    self._handling = False
                    self._check_deadline(deadline, waiter)
                    continue
                self._handling = False
            # Part of a frame: a peer trickling bytes (found by the spin,
            # which does not look at the clock) must not outlast the deadline.
            if deadline is not None and waiter is not _DRAIN and time.monotonic() >= deadline:
                raise TimeoutError

    @staticmethod
    def _check_deadline(deadline: float | None, waiter: Any) -> None:
        """After a dispatch, ``TimeoutError`` if we are past our deadline: a
        peer that keeps frames coming (calls from its worker threads, or
        output, cancels, releases instead of the reply) must not keep us
        reading past it."""
        if deadline is not None and waiter is not _DRAIN and time.monotonic() >= deadline:
            raise TimeoutError

    def _feed(self, data: memoryview, fds: list[int]) -> object:
        self.conn.receive_data(data, fds)
        return self.conn.next_event()

    def _dispatch(self, event: object) -> None:
        cls = event.__class__
        if cls is Ok or cls is Err:
            msg: Any = event
            self._keep_fds(("r", msg.id))
            if self.conn.bulk_values is not None:
                self._keep_bulk(("r", msg.id))
            if self.track_arrivals:
                self.server.arrived(self, ("r", msg.id))
            if msg.id == self._leader_rid:
                self._leader_reply = msg
                return
            with self._mu:
                waiter = self._waiters.pop(msg.id, None)
                if waiter is not None:
                    waiter.message = msg
                    waiter.done = True
                    waiter.wake()
            if waiter is None:
                self._drop_fds(("r", msg.id))
                self.take_message_bulk(("r", msg.id))
                self.on_event("late_reply", msg.id)  # it timed out just before
            return
        if cls is LateReply:
            self.on_event("late_reply", event.id)  # type: ignore[attr-defined]
            return
        if cls is Violation:
            v: Any = event
            if v.fatal:
                self.fail(ProtocolError(f"compartment {self.peer!r} broke the protocol: {v.reason}"),
                          reason=v.reason)
            else:
                self.on_event("violation", v.reason)
            return
        if cls is Call:
            call: Any = event
            self._keep_fds(("c", call.id))
            if self.conn.bulk_values is not None:
                self._keep_bulk(("c", call.id))
            if self.track_arrivals:
                self.server.arrived(self, ("c", call.id))
            if not call.parent:
                self.server.top_level(self, call)
            elif call.concurrent and self.waiting_on(call.parent):
                self.server.concurrent(self, call)
            else:
                self.queue_nested(call)
            return
        if cls is Release:
            self.server.release(self, event.handles)  # type: ignore[attr-defined]
            return
        if cls is Output:
            sink = self.output_sink
            if sink is not None:
                sink(event.stream, event.data)  # type: ignore[attr-defined]
            return
        if cls is Warn:
            kept = self.call_warnings
            if kept is not None:
                found = kept.get(event.call)  # type: ignore[attr-defined]
                if found is None:
                    if len(kept) >= MAX_WARNED_CALLS:  # ids of calls that never claimed theirs
                        del kept[next(iter(kept))]
                    found = kept[event.call] = []  # type: ignore[attr-defined]
                if len(found) < MAX_WARNINGS:
                    found.append(event)
            return
        if cls is Cancel:
            self.server.cancel(self, event.id)  # type: ignore[attr-defined]
            return
        self.fail(ProtocolError(f"compartment {self.peer!r} sent an unexpected "
                                f"{cls.__name__} message"), reason="unexpected message")

    # -- descriptors that came with a message -------------------------------------

    def _keep_fds(self, key: tuple[str, int]) -> None:
        """Keep the descriptors of the message just parsed for whoever
        decodes it (``take_message_fds``); bounded: beyond ``MAX_KEPT_FDS``
        descriptors kept, the oldest messages' are closed."""
        fds = self.conn.take_fds()
        if not fds:
            return
        if not self.transport.can_pass_fds:
            close_fds(fds)
            return
        stale: list[int] = []
        with self._mu:
            kept = self.message_fds
            kept[key] = fds
            self._kept_count += len(fds)
            while self._kept_count > MAX_KEPT_FDS and kept:
                dropped = kept.pop(next(iter(kept)))
                self._kept_count -= len(dropped)
                stale.extend(dropped)
        close_fds(stale)

    def _keep_bulk(self, key: tuple[str, int]) -> None:
        """Keep the bulk values of the message just parsed for its
        decoder; beyond ``MAX_KEPT_BULK`` messages, the oldest are dropped
        (their decoders fail: a peer flooding us with unread values)."""
        bulk = self.conn.take_bulk()
        with self._mu:
            kept = self.message_bulk
            kept[key] = bulk  # type: ignore[assignment]
            limit = 2 * self.bulk.size if self.bulk is not None else 0
            while len(kept) > MAX_KEPT_BULK or (
                    len(kept) > 1 and sum(len(v) for b in kept.values() for v in b) > limit):
                del kept[next(iter(kept))]

    def _drop_fds(self, key: tuple[str, int]) -> None:
        close_fds(self.take_message_fds(key))

    def set_reply_fds(self, fds: list[int]) -> None:
        """Descriptors for the reply this thread sends next (the frame's
        header already counts them)."""
        _context.reply_fds = fds

    @staticmethod
    def take_reply_fds() -> list[int]:
        fds = getattr(_context, "reply_fds", None)
        if fds:
            _context.reply_fds = None
            return fds
        return []

    def take_message_fds(self, key: tuple[str, int]) -> list[int]:
        """The descriptors that came with message ``key`` (``("r", id)`` a
        reply, ``("c", id)`` a call); the caller owns them now."""
        if not self.message_fds:
            return []
        with self._mu:
            fds = self.message_fds.pop(key, [])
            self._kept_count -= len(fds)
            return fds

    # -- serving calls from the peer ---------------------------------------------

    def waiting_on(self, rid: int) -> bool:
        """Whether a thread of ours still waits for the reply to ``rid``."""
        with self._mu:
            if self._leader and rid == self._leader_rid:
                return True
            waiter = self._waiters.get(rid)
            return waiter is not None and not waiter.done

    def queue_nested(self, call: Call) -> None:
        """Hand a call nested in one of ours to the thread waiting on its
        parent, or refuse it."""
        parent = call.parent
        with self._mu:
            if self._leader and parent == self._leader_rid:
                self._leader_nested.append(call)
                return
            waiter = self._waiters.get(parent)
            full = waiter is not None and len(waiter.nested) >= MAX_QUEUED_NESTED
            if waiter is not None and not waiter.done and not full:
                waiter.nested.append(call)
                waiter.wake()
                return
        if full:
            self.conn.violations += 1
            self.on_event("violation", f"more than {MAX_QUEUED_NESTED} nested calls queued")
            self.refuse(call, f"more than {MAX_QUEUED_NESTED} calls are already queued for "
                        "the call this one is nested in")
            return
        self.refuse(call, "the call this one is nested in is no longer waiting (it timed "
                    "out or ended)")

    def serve_nested(self, call: Call, deadline: float | None = None,
                     running: list[Call] | None = None) -> None:
        """Run a call nested in one of ours, in this thread, and reply
        (within ``deadline``, the deadline of the call it is nested in).
        ``running``: the waiter's calls to answer, ``call`` first; it leaves
        them the moment its reply went out (one that an interrupt leaves
        there is refused: ``_stop_waiting``)."""
        # (Pushed inside the try, popped inline: a signal handler's exception
        # raised as a context manager's ``__enter__`` returned, or as its
        # ``__exit__`` was entered, would leave the entry on the stack, and
        # every later call of this thread would be sent as nested in a call
        # that is over.)
        stack = serving_stack()
        entry = (self, call.id)
        try:
            try:
                stack.append(entry)
                frame = self.server.execute(self, call)
            finally:
                if stack and stack[-1] is entry:
                    stack.pop()
                else:
                    leave_stack(stack, entry)
        except BaseException:
            # KeyboardInterrupt and the like: the peer still gets an answer.
            if self.track_arrivals:
                self.server.decoded(self, ("c", call.id))
            self.reply(self.conn.send_err(call.id, refusal("interrupted")), deadline)
            if running:
                del running[0]
            raise
        if self.track_arrivals:
            self.server.decoded(self, ("c", call.id))
        self.reply(frame, deadline)
        if running:
            del running[0]

    def idle(self) -> bool:
        """Nothing is read, buffered, queued, waited on or waiting to be
        sent: the serve thread may read the transport itself."""
        return not (self._leader or self._waiters or self._inbox.nested or self.conn.frames.pending
                    or self.pending_output or self.pending_release or self.message_fds
                    or self.failure is not None or self._close_requested)

    def with_pending(self, frame: bytes) -> bytes:
        """``frame`` with the pending releases after it and output before."""
        if self.pending_release:
            frame = frame + self._release_frame()  # after: the frame may name those handles
        if self.pending_output:
            frame = self._output_frames() + frame
        return frame

    def reply(self, frame: bytes, deadline: float | None = None,
              fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send a reply frame (with any pending releases before it), by
        ``deadline`` at the latest (default: ``REPLY_SEND_TIMEOUT`` from now).
        A peer that does not read it in time breaks the channel."""
        if not fds:
            fds = self.take_reply_fds()
            if fds and HEADER.unpack_from(frame)[1] != len(fds):
                # The reply became an error (too big to send): it names none.
                close_fds(fds)
                fds = []
        frame = self.with_pending(frame)
        if deadline is None:
            deadline = time.monotonic() + REPLY_SEND_TIMEOUT
        try:
            self._send(frame, deadline, fds)
        except _LockBusy:
            return  # a sender is stuck on a peer that does not read: it fails the channel
        except (OSError, ProtocolError) as exc:
            self.send_failed(exc)

    def send_failed(self, exc: OSError | ProtocolError) -> None:
        """A reply could not be sent: the channel is broken (a peer that
        stopped reading, ``TimeoutError``, or one that went away)."""
        if isinstance(exc, TimeoutError):
            self.fail(ProtocolError(f"channel to {self.peer!r} broken: it does not read (a reply "
                                    "could not be sent in time)"), reason="reply send timeout")
        else:
            self._fail_from_eof(f"send failed: {exc}")

    def _send(self, frame: bytes, deadline: float | None, fds: list[int] | tuple[int, ...] = (),
              owner: object = None, follower: _Waiter | None = None) -> None:
        """Send a whole frame, waiting for the send lock no longer than
        ``deadline`` (``_LockBusy``): a thread stuck writing to a peer that
        does not read must not hold the others past their deadlines.
        ``fds`` are the channel's from now on: closed once sent (or not).
        ``owner``: we hold the send lock already, under that token, leading
        for ourselves (``_request``), so we read while the frame waits for
        room (the peer may be waiting for us to read); ``follower``: we wait
        on that call, and read meanwhile if nobody else does (``took_lead``)."""
        token = object() if owner is None else owner
        try:
            if owner is None:
                self._wait_to_send(token, deadline)
            pump = self._pump if owner is not None else (lambda: self._pump_for(follower)) if follower else None
            self._send_whole(frame, fds, deadline, pump)
        finally:
            if self._send_owner is token:  # (not if the wait for it raised)
                self._send_owner = None
                if self._send_queue:
                    self._wake_senders()
            close_fds(fds)

    def _wait_to_send(self, token: object, deadline: float | None) -> None:
        """Take the send lock for ``token``, waiting no longer than
        ``deadline`` (at least ``SEND_WAIT_MIN`` seconds). The caller gives
        it back if ``_send_owner`` is its token, however this returns."""
        mu = self._mu
        me: _Waiter | None = None
        end = None if deadline is None else max(deadline, time.monotonic() + SEND_WAIT_MIN)
        try:
            while True:
                with mu:
                    if self._send_owner is None:
                        self._send_owner = token
                        return
                    if me is None:
                        me = _Waiter()
                        self._send_queue.append(me)
                # In slices: a wake-up lost to an interrupted holder only
                # delays us.
                if end is None:
                    me.lock.acquire(timeout=SEND_WAIT_SLICE)
                else:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        raise _LockBusy
                    me.lock.acquire(timeout=min(remaining, SEND_WAIT_SLICE))
        finally:
            if me is not None:
                with mu:
                    if me in self._send_queue:
                        self._send_queue.remove(me)

    @contextmanager
    def send_lock(self, deadline: float | None = None) -> Iterator[None]:
        """Hold the send lock (``_LockBusy`` past ``deadline``): for a
        writer that frames by hand, as tests of hostile peers do."""
        token = object()
        try:
            self._wait_to_send(token, deadline)
            yield
        finally:
            if self._send_owner is token:
                self._release_send()

    def _release_send(self) -> None:
        self._send_owner = None
        if self._send_queue:
            self._wake_senders()

    def _wake_senders(self) -> None:
        """The send lock is free: every sender waiting for it tries again."""
        with self._mu:
            for waiter in self._send_queue:
                waiter.wake()

    def _pump_for(self, waiter: _Waiter) -> None:
        """``_pump`` for a follower whose frame waits for room: it reads only
        if nobody leads (then it leads, and goes on leading after the send)."""
        if not waiter.took_lead:
            with self._mu:
                if self._leader:
                    lead = False
                else:
                    self._leader = True
                    self._leader_rid = 0
                    self._lead_by = waiter
                    lead = waiter.took_lead = True
            if not lead:
                time.sleep(0.001)  # the leader reads; the poll says readable
                return
        self._pump()

    def _pump(self) -> None:
        """Read what the peer sent while our frame waits for room in the
        stream; the reading loop takes it from the buffer. At most a frame's
        worth beyond what is buffered: a peer that keeps sending does not
        grow us."""
        frames = self.conn.frames
        if self._pump_eof or frames.buffered > frames.max_frame + _READ_CHUNK:
            time.sleep(0.001)  # the poll says readable; do not spin on it
            return
        view = frames.want_buffer() or self._view
        try:
            n, fds = self.transport.read_into(view)
        except BlockingIOError:
            return
        except (OSError, ProtocolError):
            self._pump_eof = True  # the reader finds out why
            return
        if n == 0:
            self._pump_eof = True
            return
        self._buffered(view, n, fds)

    def _buffered(self, view: memoryview, n: int, fds: list[int]) -> None:
        """Take ``n`` bytes just read into ``view`` (a large frame's own
        body, ``want_buffer``, or our read buffer) into the frame decoder."""
        conn = self.conn
        if view is not self._view:
            conn.frames.body_written(n)
            conn.bytes_in += n
            if fds:
                conn.frames.receive_data(b"", fds)
        else:
            conn.receive_data(view[:n], fds)

    def refuse(self, call: Call, message: str) -> None:
        """Answer a call we will not run, without waiting: a peer that sends
        calls and does not read the answers is misbehaving."""
        self._drop_fds(("c", call.id))
        self.take_message_bulk(("c", call.id))
        if self.track_arrivals:
            self.server.decoded(self, ("c", call.id))
        self.reply(self.conn.send_err(call.id, refusal(message)), time.monotonic())

    def _release_frame(self) -> bytes:
        # In place: the Peer that fills the list holds it. Appends from other
        # threads land after the part we take.
        pending = self.pending_release
        handles = pending[:MAX_RELEASES]  # the rest rides with the next frame
        del pending[:len(handles)]
        return Connection.send_release(handles)

    def _output_frames(self) -> bytes:
        pending = self.pending_output
        sources = pending[:]
        del pending[:len(sources)]
        return b"".join(source.frames() for source in sources)

    def send_output(self) -> None:
        """Send pending output now (it grew past what one frame holds, or a
        thread wrote it while another leads)."""
        if self.pending_output and self.failure is None:
            frame = self._output_frames()
            try:
                self._send(frame, time.monotonic() + REPLY_SEND_TIMEOUT)
            except _LockBusy:
                return
            except (OSError, TimeoutError, ProtocolError) as exc:
                self._fail_from_eof(f"send failed: {exc}")

    def deliver(self, call: Call) -> None:
        """Queue a top-level call for ``next_call`` (an instance's serve loop)."""
        if self._inbox_reading:
            # The serve thread is the one reading: nobody to wake.
            self._inbox.nested.append(call)
            return
        with self._mu:
            self._inbox.nested.append(call)
            if self._inbox_waiting:
                self._inbox.wake()

    def withdraw(self, rid: int) -> bool:
        """Take a queued top-level call back out (it was cancelled)."""
        with self._mu:
            for call in self._inbox.nested:
                if call.id == rid:
                    self._inbox.nested.remove(call)
                    break
            else:
                return False
        if self.track_arrivals:
            self.server.decoded(self, ("c", rid))
        return True

    def next_call(self) -> Call | None:
        """For an instance's serve loop: the next top-level call, reading the
        channel when no other thread does; None once the channel is closed."""
        inbox = self._inbox
        mu = self._mu
        while True:
            with mu:
                if inbox.nested:
                    return inbox.nested.pop(0)
                if self.failure is not None:
                    return None
                lead = not self._leader
                if lead:
                    self._leader = True
                    self._leader_rid = 0
                    self._lead_by = inbox
                    self._users += 1
                    self._inbox_reading = True
                else:
                    self._inbox_waiting = True
            if lead:
                call = None
                try:
                    if self.blocking_reads:
                        call = self._serve_read()
                    if call is None:
                        self._read_until(inbox, None)
                finally:
                    self._inbox_reading = False
                    if call is None and inbox.nested and not self._waiters:
                        call = inbox.nested.pop(0)
                    mu.acquire()
                    if not self._waiters and not self._close_requested and not self._inbox_waiting:
                        # Nobody else is here: stop leading, no hand-over.
                        self._leader = False
                        self._lead_by = None
                        self._users -= 1
                        mu.release()
                    else:
                        mu.release()
                        self._release_leadership()
                        self._leave()
                if call is not None:
                    return call
            else:
                inbox.lock.acquire()
                with mu:
                    self._inbox_waiting = False

    def _serve_read(self) -> Call | None:
        """The idle serve loop's read: blocking, one frame, a top-level call
        returned as is. Anything else is dispatched; None hands over to the
        general ``_read_until``."""
        conn = self.conn
        frames = conn.frames
        view = self._view
        read = self.transport.read_into
        inbox = self._inbox
        while True:
            if self.failure is not None or frames.pending or inbox.nested:
                return None
            if self.spin:
                self._spin()
            try:
                n, fds = read(view)
            except BlockingIOError:
                return None
            except (OSError, ProtocolError) as exc:
                self._fail_from_eof(f"read failed: {exc}")
                return None
            if n == 0:
                self._fail_from_eof("closed its channel")
                return None
            if fds:
                event = self._feed(view[:n], fds)
            else:
                event = conn.parse_one(view[:n])
            if event.__class__ is Call and not event.parent:  # type: ignore[attr-defined]
                self._keep_fds(("c", event.id))  # type: ignore[attr-defined]
                if conn.bulk_values is not None:
                    self._keep_bulk(("c", event.id))  # type: ignore[attr-defined]
                if self.track_arrivals:
                    self.server.arrived(self, ("c", event.id))  # type: ignore[attr-defined]
                return event  # type: ignore[return-value]
            if event is _NEED_DATA:
                return None  # a large frame: the general loop reads the rest
            self._dispatch(event)

    def _spin(self) -> bool:
        """Poll without sleeping for up to ``spin`` seconds: whether the
        peer's frame (or a wake-up) arrived. A round trip whose two ends
        both sleep costs two cross-CPU wake-ups (tens of microseconds on
        virtual machines); one whose ends keep polling for a moment costs a
        few. Bounded, so an idle peer costs nothing after it."""
        poll = self._poll.poll
        end = time.perf_counter() + self.spin
        while True:
            if poll(0):
                return True
            if time.perf_counter() >= end:
                return False

    def try_drain(self) -> None:
        """``drain`` from a signal handler: gives up at once if the channel's
        lock is held (possibly by the very thread the handler interrupted)."""
        if not self._mu.acquire(blocking=False):
            return
        if self._leader or self.failure is not None:
            self._mu.release()
            return
        self._leader = True
        self._leader_rid = 0
        self._lead_by = _DRAIN
        self._users += 1
        self._mu.release()
        try:
            self._read_until(_DRAIN, time.monotonic())
        finally:
            self._release_leadership()
            self._leave()

    def drain(self) -> None:
        """Process what has already arrived, without waiting, if no other
        thread is reading. The monitor uses it to notice late replies."""
        with self._mu:
            if self._leader or self.failure is not None:
                return
            self._leader = True
            self._leader_rid = 0
            self._lead_by = _DRAIN
            self._users += 1
        try:
            self._read_until(_DRAIN, time.monotonic())
        finally:
            self._release_leadership()
            self._leave()

    # -- failure ----------------------------------------------------------------

    def _fail_from_eof(self, detail: str) -> None:
        factory = self.failure_factory
        exc = factory() if factory else CompartmentCrashed(self.peer, None, detail)
        self.fail(exc, reason=detail)

    def fail(self, exc: CompartmentError, reason: str = "") -> None:
        """Fail every pending call with ``exc`` and refuse new ones."""
        with self._mu:
            first = self.failure is None
            if first:
                self.failure = exc
            waiters, self._waiters = self._waiters, {}
            for waiter in waiters.values():
                waiter.error = exc
                waiter.done = True
                waiter.wake()
            self._inbox.wake()
        if first:
            # Report first: the monitor must know why before the far side
            # can see end-of-stream and exit.
            self.on_event("broken", (exc, reason))
            self.transport.shutdown()
            try:
                os.eventfd_write(self._wake, 1)  # a poll already waiting on the old pipe
            except OSError:
                pass

    def close(self) -> None:
        """Release the descriptors as soon as no thread is using the channel
        (now, or when the last caller inside it leaves). Fails it first."""
        if self.failure is None:
            self.fail(CompartmentCrashed(self.peer, None, "channel closed"), reason="closed")
        self._close_when_unused()

    def hand_over(self) -> None:
        """The far end's peer is someone else from now on (the monitor read an
        edge instance's Hello and handed this end to its caller, which holds
        a copy): close our descriptors *without* shutting the stream down,
        which would end it for the new holder too."""
        with self._mu:
            if self.failure is None:
                self.failure = CompartmentCrashed(self.peer, None, "handed over to its caller")
        self._close_when_unused()

    def _close_when_unused(self) -> None:
        with self._mu:
            self._close_requested = True
            close = self._users == 0 and not self.closed
            if close:
                self.closed = True
        if close:
            self._close_now()

    def _close_now(self) -> None:
        try:
            self.server.closed(self)
        except Exception:
            pass
        self.transport.close()
        self.conn.close()
        with self._mu:
            kept, self.message_fds = self.message_fds, {}
            self.message_bulk = {}
        for fds in kept.values():
            close_fds(fds)
        for lanes in (self.bulk, self.bulk_offer):
            if lanes is not None:
                lanes.close()
        try:
            os.close(self._wake)
        except OSError:
            pass

