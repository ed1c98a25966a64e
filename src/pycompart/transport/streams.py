"""Transports: the byte streams calls travel on.

A *transport* moves bytes and, where it can, file descriptors:

* ``PipeTransport``: a pair of pipes. The cheapest round trip Linux offers
  between two processes (on the machines we measure, a socketpair costs ~1.7×
  a pipe), so calls use it. It cannot carry descriptors.
* ``SocketTransport``: a connected AF_UNIX stream socket; carries
  descriptors with SCM_RIGHTS. The zygote's control channel uses it.

A later transport (an SSH byte stream) implements the same interface with
``can_pass_fds = False``.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import time
from collections.abc import Callable

from ..errors import ProtocolError
from ..wire.protocol import MAX_FDS_PER_FRAME
from .gate import wait_fd, write_all

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

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = (), deadline: float | None = None,
             readable: Callable[[], None] | None = None) -> None:
        """``readable``: called while the write waits for room whenever the
        read side has data (a caller that is also its channel's only reader
        must read, or two ends that both write a big frame wait for ever)."""
        raise NotImplementedError

    def wrote_all(self, data: bytes | memoryview) -> bool:
        """Whether the last ``send``, interrupted by an exception, had put
        all of ``data`` on the wire all the same (the stream is then still
        framed). False where that cannot be known."""
        return False

    def shutdown(self) -> None:
        """End the stream both ways now (the far side reads EOF), while
        other threads may still hold our descriptors."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


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
        #: What went out of the frame ``send`` is writing (``wrote_all``).
        self.sent = memoryview(bytearray(8)).cast("q")

    def fileno(self) -> int:
        return self.read_fd

    def read_into(self, buf: memoryview) -> tuple[int, list[int]]:
        return os.readv(self.read_fd, (buf,)), []

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = (), deadline: float | None = None,
             readable: Callable[[], None] | None = None) -> None:
        if fds:
            raise ProtocolError("this channel cannot carry file descriptors")
        self.sent[0] = 0
        write_all(self.write_fd, data, deadline, (self.read_fd, readable) if readable is not None else None,
                  self.sent)

    def wrote_all(self, data: bytes | memoryview) -> bool:
        return self.sent[0] == len(data)

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

    def __init__(self, sock: socket.socket, carry_fds: bool = True):
        sock.setblocking(False)
        self.sock = sock
        self._fd = sock.fileno()
        #: False: a socket for speed of set-up only (an edge to a
        #: compartment without ``descriptors = true``): it refuses them.
        self.can_pass_fds = carry_fds

    def fileno(self) -> int:
        return self._fd

    def read_into(self, buf: memoryview) -> tuple[int, list[int]]:
        try:
            n, anc, flags, _ = self.sock.recvmsg_into([buf], _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
        except ConnectionResetError:
            return 0, []
        fds = fds_from_ancillary(anc)
        if flags & socket.MSG_CTRUNC or (fds and not self.can_pass_fds):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("peer sent more file descriptors than a frame may carry"
                                if self.can_pass_fds else
                                "peer sent file descriptors over a channel that carries none")
        return n, fds

    def recv_into(self, buf: memoryview, deadline: float | None) -> tuple[int, list[int]]:
        """Blocking read with a deadline (``TimeoutError`` when it passes)."""
        while True:
            try:
                return self.read_into(buf)
            except BlockingIOError:
                wait_fd(self._fd, select.POLLIN, deadline)

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = (), deadline: float | None = None,
             readable: Callable[[], None] | None = None) -> None:
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        also = (self._fd, readable) if readable is not None else None
        while view:
            try:
                n = self.sock.sendmsg([view], anc)
            except BlockingIOError:
                wait_fd(self._fd, select.POLLOUT, deadline, also)
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
