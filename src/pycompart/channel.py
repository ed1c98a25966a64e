"""Channels: the byte streams calls travel on, and the caller's end of one.

A *transport* moves bytes and, where it can, file descriptors:

* ``PipeTransport``: a pair of pipes. The cheapest round trip Linux offers
  between two processes (on the machines we measure, a socketpair costs ~1.7×
  a pipe), so calls use it. It cannot carry descriptors.
* ``SocketTransport``: a connected AF_UNIX stream socket; carries
  descriptors with SCM_RIGHTS. The zygote's control channel uses it.

A later transport (an SSH byte stream) implements the same interface with
``can_pass_fds = False``.

``Channel`` is the caller's end of one caller→callee edge. Many threads may
call over it at once. There is no reader thread: the first waiting thread
becomes the *leader* and reads, handing replies that belong to other threads
to them; when its own reply arrives it passes leadership on. With a single
caller this costs nothing over a plain blocking round trip.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import CallTimeout, CompartmentCrashed, CompartmentError, EntrypointError, ProtocolError
from .protocol import (
    MAX_FDS_PER_FRAME,
    NEED_DATA as _NEED_DATA,
    Call,
    Connection,
    Err,
    LateReply,
    Ok,
    Violation,
)

_READ_CHUNK = 64 * 1024
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_FRAME * array.array("i").itemsize)
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1024 * 1024


class Transport:
    """Interface of a byte transport.

    ``read_into`` never blocks: it raises ``BlockingIOError`` when nothing is
    there, returns ``(0, [])`` at end of stream. ``send`` writes everything or
    raises ``TimeoutError`` once ``deadline`` (``time.monotonic``) passes."""

    can_pass_fds = False

    def fileno(self) -> int:
        """The descriptor to poll for readability."""
        raise NotImplementedError

    def read_into(self, buf: memoryview) -> tuple[int, list[int]]:
        raise NotImplementedError

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = (), deadline: float | None = None) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """End the stream both ways now (the far side reads EOF), while
        other threads may still hold our descriptors."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _wait_fd(fd: int, events: int, deadline: float | None) -> None:
    timeout_ms = -1
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        timeout_ms = max(1, int(remaining * 1000 + 0.999))
    p = select.poll()
    p.register(fd, events)
    if not p.poll(timeout_ms):
        raise TimeoutError


def make_pipe() -> tuple[int, int]:
    """A pipe with a large buffer (best effort), close-on-exec both ends."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over the per-user pipe budget: the default size still works
    return r, w


class PipeTransport(Transport):
    """Reads from one pipe, writes to another."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd = read_fd
        self.write_fd = write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)

    def fileno(self) -> int:
        return self.read_fd

    def read_into(self, buf: memoryview) -> tuple[int, list[int]]:
        return os.readv(self.read_fd, (buf,)), []

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = (), deadline: float | None = None) -> None:
        if fds:
            raise ProtocolError("this channel cannot carry file descriptors")
        try:
            n = os.write(self.write_fd, data)
        except BlockingIOError:
            n = 0
        if n == len(data):
            return
        view = memoryview(data)[n:]
        while view:
            _wait_fd(self.write_fd, select.POLLOUT, deadline)
            try:
                view = view[os.write(self.write_fd, view):]
            except BlockingIOError:
                pass

    def shutdown(self) -> None:
        # Pipes have no shutdown(2). Replacing our ends with /dev/null closes
        # the pipes (the instance sees EOF) without freeing the descriptor
        # numbers, so a thread still using them cannot hit a reused fd.
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        try:
            for fd in (self.read_fd, self.write_fd):
                if fd >= 0:
                    os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.read_fd = self.write_fd = -1


class SocketTransport(Transport):
    """A connected AF_UNIX stream socket; carries descriptors."""

    can_pass_fds = True

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()

    def fileno(self) -> int:
        return self._fd

    def read_into(self, buf: memoryview) -> tuple[int, list[int]]:
        try:
            n, anc, flags, _ = self.sock.recvmsg_into([buf], _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            return 0, []
        fds = fds_from_ancillary(anc)
        if flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("peer sent more file descriptors than a frame may carry")
        return n, fds

    def recv_into(self, buf: memoryview, deadline: float | None) -> tuple[int, list[int]]:
        """Blocking read with a deadline (``TimeoutError`` when it passes)."""
        while True:
            try:
                return self.read_into(buf)
            except BlockingIOError:
                _wait_fd(self._fd, select.POLLIN, deadline)

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = (), deadline: float | None = None) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while view:
            try:
                n = self.sock.sendmsg([view], anc)
            except BlockingIOError:
                _wait_fd(self._fd, select.POLLOUT, deadline)
                continue
            anc = []  # descriptors ride with the first byte only
            view = view[n:]

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def fds_from_ancillary(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - (len(data) % a.itemsize)])
            fds.extend(a)
    return fds


class _Waiter:
    """A thread waiting for its reply while another thread leads."""

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


_DRAIN = _Waiter()  # a waiter that is never done: read what is there, then stop


class Channel:
    """The caller's end of an edge.

    ``request`` sends one call and returns the ``Ok``/``Err`` message that
    answers it, or raises ``CompartmentCrashed`` (the far end died),
    ``ProtocolError`` (it broke the protocol) or ``CallTimeout``.
    ``on_event(kind, detail)`` reports ``timeout``, ``late_reply``,
    ``violation`` and ``broken`` to the monitor.
    """

    def __init__(self, transport: Transport, conn: Connection, peer: str,
                 on_event: Callable[[str, Any], None] | None = None):
        self.transport = transport
        self.conn = conn
        self.peer = peer
        self.on_event = on_event or (lambda kind, detail: None)
        self._mu = threading.Lock()
        self._send_lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._leader = False
        self._leader_rid = 0
        self._leader_reply: Ok | Err | None = None
        self._buf = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buf)
        # Wakes the leader out of poll when the channel fails.
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(transport.fileno(), select.POLLIN)
        self._poll.register(self._wake, select.POLLIN)
        self.failure: CompartmentError | None = None
        self.failure_factory: Callable[[], CompartmentError] | None = None
        self._users = 0  # threads inside request()/drain(); close waits for 0
        self._close_requested = False
        self.closed = False

    @property
    def pending(self) -> int:
        return len(self._waiters) + self._leader

    # -- calling ----------------------------------------------------------------

    def request(self, entrypoint: str, payload: bytes, deadline: float | None) -> Ok | Err:
        conn = self.conn
        rid, frame = conn.send_call(entrypoint, payload)
        mu = self._mu
        mu.acquire()
        if self.failure is not None:
            mu.release()
            conn.forget(rid)
            raise self.failure
        self._users += 1
        try:
            return self._request(rid, entrypoint, frame, deadline)
        finally:
            self._leave()

    def _leave(self) -> None:
        with self._mu:
            self._users -= 1
            close = self._close_requested and self._users == 0 and not self.closed
            if close:
                self.closed = True
        if close:
            self._close_now()

    def _request(self, rid: int, entrypoint: str, frame: bytes, deadline: float | None) -> Ok | Err:
        """Called with ``_mu`` held; releases it."""
        mu = self._mu
        if not self._leader:
            # Fast path: nobody is reading, so we will read our own reply.
            self._leader = True
            self._leader_rid = rid
            self._leader_reply = None
            mu.release()
            waiter = None
        else:
            waiter = _Waiter()
            self._waiters[rid] = waiter
            mu.release()
        try:
            with self._send_lock:
                self.transport.send(frame, (), deadline)
        except TimeoutError:
            # Part of a frame may be on the wire: the stream is unusable.
            self._abandon(rid, waiter)
            self.fail(ProtocolError(f"channel to {self.peer!r} broken: a call could not be "
                                    "sent before its deadline"), reason="send timeout")
            raise CallTimeout(f"call {entrypoint} to {self.peer!r} could not be sent in time") from None
        except OSError as exc:
            self._abandon(rid, waiter)
            self._fail_from_eof(f"send failed: {exc}")
            raise self.failure or CompartmentCrashed(self.peer, None, "closed its channel") from None
        if waiter is None:
            reply = self._lead_for_self(rid, deadline)
            if reply is not None:
                return reply
            # Our reply did not come while we led (timeout or failure).
            return self._finish_leading_without_reply(rid, entrypoint)
        return self._await(rid, entrypoint, waiter, deadline)

    def _lead_for_self(self, rid: int, deadline: float | None) -> Ok | Err | None:
        try:
            self._read_until(None, deadline)
        except TimeoutError:
            pass
        finally:
            # Taken while still leader: the next leader reuses the slot.
            reply = self._release_leadership()
        return reply if self.failure is None else None

    def _finish_leading_without_reply(self, rid: int, entrypoint: str) -> Ok | Err:
        failure = self.failure
        if failure is not None:
            self.conn.forget(rid)
            raise failure
        return self._timed_out(rid, entrypoint)

    def _await(self, rid: int, entrypoint: str, waiter: _Waiter, deadline: float | None) -> Ok | Err:
        while True:
            with self._mu:
                if waiter.done:
                    break
                lead = not self._leader
                if lead:
                    self._leader = True
                    self._leader_rid = 0
            if lead:
                try:
                    self._read_until(waiter, deadline)
                except TimeoutError:
                    pass
                finally:
                    self._release_leadership()
                if waiter.done:
                    break
            elif deadline is None:
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
                    return self._timed_out(rid, entrypoint)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.message is not None
        return waiter.message

    def _timed_out(self, rid: int, entrypoint: str) -> Ok | Err:
        self.cancel(rid)
        self.on_event("timeout", rid)
        raise CallTimeout(f"call {entrypoint} to compartment {self.peer!r} timed out")

    def _release_leadership(self) -> Ok | Err | None:
        """Stop leading; return the fast-path leader's own reply, if any."""
        with self._mu:
            reply, self._leader_reply = self._leader_reply, None
            self._leader = False
            self._leader_rid = 0
            for other in self._waiters.values():
                if not other.done:
                    other.wake()  # it takes over reading
                    break
        return reply

    def cancel(self, rid: int) -> None:
        """Tell the far side to abandon ``rid`` (best effort, bounded)."""
        frame = self.conn.send_cancel(rid)
        try:
            with self._send_lock:
                self.transport.send(frame, (), time.monotonic() + 0.5)
        except (OSError, TimeoutError, ProtocolError):
            pass

    def _abandon(self, rid: int, waiter: _Waiter | None) -> None:
        if waiter is None:
            self._release_leadership()
        else:
            with self._mu:
                self._waiters.pop(rid, None)
        self.conn.forget(rid)

    # -- reading (leader only) -----------------------------------------------

    def _read_until(self, waiter: _Waiter | None, deadline: float | None) -> None:
        """Read and dispatch until ``waiter`` is done (``None``: until the
        leader's own reply arrives; ``_DRAIN``: until nothing is buffered)."""
        conn = self.conn
        frames = conn.frames
        transport = self.transport
        poll = self._poll.poll
        while True:
            if self.failure is not None:
                return  # nothing after a failure is trusted, not even our reply
            if waiter is None:
                if self._leader_reply is not None:
                    return
            elif waiter.done:
                return
            if frames.buffered:
                event = conn.next_event()
                if event is not _NEED_DATA:
                    self._dispatch(event)
                    continue
            if self.failure is not None:
                return
            if deadline is None:
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
            view = frames.want_buffer() or self._view
            try:
                n, fds = transport.read_into(view)
            except BlockingIOError:
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
            if view is not self._view:
                frames.body_written(n)
                conn.bytes_in += n
                if fds:
                    frames.receive_data(b"", fds)
                continue
            event = conn.parse_one(view[:n]) if not fds else self._feed(view[:n], fds)
            if event is not _NEED_DATA:
                self._dispatch(event)

    def _feed(self, data: memoryview, fds: list[int]) -> object:
        self.conn.receive_data(data, fds)
        return self.conn.next_event()

    def _dispatch(self, event: object) -> None:
        cls = event.__class__
        if cls is Ok or cls is Err:
            msg: Any = event
            for fd in self.conn.take_fds():  # descriptors as values come in a later version
                os.close(fd)
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
            # Calls *from* a compartment need a may_call edge; none exist yet.
            call: Any = event
            for fd in self.conn.take_fds():
                os.close(fd)
            self.conn.violations += 1
            from .gate import describe_exception

            info = describe_exception(EntrypointError(
                f"compartment {self.peer!r} may not call into main (not in its may_call)"))
            try:
                with self._send_lock:
                    self.transport.send(self.conn.send_err(call.id, info), (), time.monotonic() + 1)
            except (OSError, TimeoutError):
                pass
            self.on_event("violation", f"refused call {call.entrypoint!r} from {self.peer!r}")
            return
        self.fail(ProtocolError(f"compartment {self.peer!r} sent an unexpected "
                                f"{cls.__name__} message"), reason="unexpected message")

    def drain(self) -> None:
        """Process what has already arrived, without waiting, if no other
        thread is reading. The monitor uses it to notice late replies."""
        with self._mu:
            if self._leader or self.failure is not None:
                return
            self._leader = True
            self._leader_rid = 0
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
        with self._mu:
            self._close_requested = True
            close = self._users == 0 and not self.closed
            if close:
                self.closed = True
        if close:
            self._close_now()

    def _close_now(self) -> None:
        self.transport.close()
        self.conn.close()
        try:
            os.close(self._wake)
        except OSError:
            pass

