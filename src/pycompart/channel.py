"""Channels: the byte streams calls travel on, and the caller's end of one.

A *transport* moves bytes (and, where it can, file descriptors). Today that is
an AF_UNIX stream socket from a socketpair the monitor made; a later transport
(an SSH byte stream) implements the same three methods with
``can_pass_fds = False``.

``Channel`` is the caller's end of one caller→callee edge. Many threads may
call over it at once. There is no reader thread: the first waiting thread
becomes the *leader* and reads the socket, handing replies that belong to
other threads to them; when its own reply arrives it passes leadership on.
With one caller this costs nothing over a plain blocking round trip, which is
why the hot path stays close to a raw pipe.
"""

from __future__ import annotations

import array
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import CallTimeout, CompartmentCrashed, CompartmentError, ProtocolError
from .protocol import (
    MAX_FDS_PER_FRAME,
    Call,
    Connection,
    Err,
    FrameReceived,
    LateReply,
    NeedData,
    Ok,
    Violation,
)

_READ_CHUNK = 256 * 1024
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)


class Transport:
    """Interface of a byte transport. Subclasses implement all of it."""

    can_pass_fds = False

    def fileno(self) -> int:
        raise NotImplementedError

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = (), deadline: float | None = None) -> None:
        raise NotImplementedError

    def recv_into(self, buf: memoryview, deadline: float | None) -> tuple[int, list[int]]:
        """Read at least one byte (``0`` means end of stream). Raises
        ``TimeoutError`` if ``deadline`` (a ``time.monotonic`` value) passes."""
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SocketTransport(Transport):
    """A connected AF_UNIX stream socket, used non-blocking with poll so that
    any thread can wait on it with its own deadline."""

    can_pass_fds = True

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()

    def fileno(self) -> int:
        return self._fd

    def _wait(self, events: int, deadline: float | None) -> None:
        timeout_ms = -1
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            timeout_ms = max(1, int(remaining * 1000 + 0.999))
        p = select.poll()
        p.register(self._fd, events)
        if not p.poll(timeout_ms):
            raise TimeoutError

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = (), deadline: float | None = None) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while view:
            try:
                n = self.sock.sendmsg([view], anc)
            except BlockingIOError:
                self._wait(select.POLLOUT, deadline)
                continue
            anc = []  # descriptors ride with the first byte only
            view = view[n:]

    def recv_into(self, buf: memoryview, deadline: float | None) -> tuple[int, list[int]]:
        while True:
            try:
                n, anc, flags, _ = self.sock.recvmsg_into([buf], _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                self._wait(select.POLLIN, deadline)
                continue
            except ConnectionResetError:
                return 0, []
            fds = _fds_from_ancillary(anc)
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError("peer sent more file descriptors than a frame may carry")
            return n, fds

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def _fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
            fds.extend(a)
    return fds


class _Waiter:
    __slots__ = ("lock", "done", "message", "error")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.done = False
        self.message: Ok | Err | None = None
        self.error: BaseException | None = None

    def wake(self) -> None:
        try:
            self.lock.release()
        except RuntimeError:  # already awake
            pass


class Channel:
    """The caller's end of an edge.

    ``request`` sends one call and returns the ``Ok``/``Err`` message that
    answers it, or raises ``CompartmentCrashed`` (the far end died),
    ``ProtocolError`` (the far end broke the protocol) or ``CallTimeout``.
    """

    def __init__(self, transport: Transport, conn: Connection, peer: str,
                 on_event: Callable[[str, Any], None] | None = None):
        self.transport = transport
        self.conn = conn
        self.peer = peer
        self._on_event = on_event or (lambda kind, detail: None)
        self._mu = threading.Lock()
        self._send_lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._leader = False
        self._buf = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buf)
        self.failure: CompartmentError | None = None
        self.failure_factory: Callable[[], CompartmentError] | None = None

    @property
    def pending(self) -> int:
        return len(self._waiters)

    # -- calling ----------------------------------------------------------------

    def request(self, entrypoint: str, payload: bytes, deadline: float | None) -> Ok | Err:
        rid, frame = self.conn.send_call(entrypoint, payload)
        waiter = _Waiter()
        with self._mu:
            if self.failure is not None:
                self.conn.forget(rid)
                raise self.failure
            self._waiters[rid] = waiter
        try:
            with self._send_lock:
                self.transport.send(frame, (), deadline)
        except TimeoutError:
            # Part of a frame may be on the wire: the stream is unusable.
            self._drop(rid)
            self.fail(ProtocolError(f"channel to {self.peer!r} broken: a call could not be "
                                    "sent before its deadline"), reason="send timeout")
            raise CallTimeout(f"call to {self.peer!r} {entrypoint} could not be sent in time") from None
        except OSError as exc:
            self._drop(rid)
            self._fail_from_eof(f"send failed: {exc}")
            raise self.failure or CompartmentCrashed(self.peer, None, "closed its channel") from None
        return self._await(rid, entrypoint, waiter, deadline)

    def _await(self, rid: int, entrypoint: str, waiter: _Waiter, deadline: float | None) -> Ok | Err:
        while True:
            with self._mu:
                if waiter.done:
                    break
                lead = not self._leader
                if lead:
                    self._leader = True
            if lead:
                try:
                    self._lead(waiter, deadline)
                except TimeoutError:
                    pass
                finally:
                    with self._mu:
                        self._leader = False
                        for other in self._waiters.values():
                            if not other.done:
                                other.wake()
                                break
                if waiter.done:
                    break
            else:
                if deadline is None:
                    waiter.lock.acquire()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining > 0:
                        waiter.lock.acquire(timeout=remaining)
            if deadline is not None and not waiter.done and time.monotonic() >= deadline:
                with self._mu:
                    timed_out = not waiter.done
                    if timed_out:
                        self._waiters.pop(rid, None)
                if timed_out:
                    self.cancel(rid)
                    self._on_event("timeout", rid)
                    raise CallTimeout(f"call {entrypoint} to compartment {self.peer!r} timed out")
        if waiter.error is not None:
            raise waiter.error
        assert waiter.message is not None
        return waiter.message

    def cancel(self, rid: int) -> None:
        """Tell the far side to abandon ``rid`` (best effort; never blocks long)."""
        try:
            with self._send_lock:
                self.transport.send(self.conn.send_cancel(rid), (), time.monotonic() + 0.5)
        except (OSError, TimeoutError):
            pass

    def _drop(self, rid: int) -> None:
        with self._mu:
            self._waiters.pop(rid, None)
        self.conn.forget(rid)

    # -- reading (leader only) -----------------------------------------------

    def _lead(self, mine: _Waiter, deadline: float | None) -> None:
        conn = self.conn
        while not mine.done:
            event = conn.next_event()
            if isinstance(event, NeedData):
                view = conn.frames.want_buffer() or self._view
                try:
                    n, fds = self.transport.recv_into(view, deadline)
                except ProtocolError as exc:
                    self.fail(exc, reason=str(exc))
                    return
                except OSError as exc:
                    self._fail_from_eof(f"read failed: {exc}")
                    return
                if n == 0:
                    self._fail_from_eof("closed its channel")
                    return
                if view is self._view:
                    conn.receive_data(view[:n], fds)
                else:
                    conn.frames.body_written(n)
                    conn.bytes_in += n
                    if fds:
                        conn.frames.receive_data(b"", fds)
                continue
            self._dispatch(event)

    def _dispatch(self, event: FrameReceived | LateReply | Violation) -> None:
        if isinstance(event, FrameReceived):
            msg = event.message
            if isinstance(msg, (Ok, Err)):
                for fd in event.fds:  # fds as values arrive in a later version
                    os.close(fd)
                with self._mu:
                    waiter = self._waiters.pop(msg.id, None)
                    if waiter is not None:
                        waiter.message = msg
                        waiter.done = True
                        waiter.wake()
                if waiter is None:
                    # It timed out between the reply's arrival and now.
                    self._on_event("late_reply", msg.id)
                return
            if isinstance(msg, Call):
                # Calls *from* a compartment need a may_call edge; none exist yet.
                self.conn.violations += 1
                from .gate import describe_exception
                from .errors import EntrypointError
                info = describe_exception(EntrypointError(
                    f"compartment {self.peer!r} may not call into main (not in its may_call)"))
                with self._send_lock:
                    self.transport.send(self.conn.send_err(msg.id, info), (), time.monotonic() + 1)
                self._on_event("violation", f"unexpected call {msg.entrypoint!r} from {self.peer!r}")
                return
            self.fail(ProtocolError(f"compartment {self.peer!r} sent an unexpected "
                                    f"{type(msg).__name__} message"), reason="unexpected message")
            return
        if isinstance(event, LateReply):
            self._on_event("late_reply", event.id)
            return
        if event.fatal:
            self.fail(ProtocolError(f"compartment {self.peer!r} broke the protocol: {event.reason}"),
                      reason=event.reason)
        else:
            self._on_event("violation", event.reason)

    def drain(self) -> None:
        """Process whatever has already arrived, without waiting, if no other
        thread is reading. Used by the monitor to notice late replies."""
        with self._mu:
            if self._leader or self.failure is not None:
                return
            self._leader = True
        try:
            sentinel = _Waiter()
            try:
                self._lead(sentinel, time.monotonic())
            except TimeoutError:
                pass
        finally:
            with self._mu:
                self._leader = False
                for other in self._waiters.values():
                    if not other.done:
                        other.wake()
                        break

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
        if first:
            self.transport.shutdown()
            self._on_event("broken", (exc, reason))

    def close(self) -> None:
        self.transport.shutdown()
        self.transport.close()
        self.conn.close()
