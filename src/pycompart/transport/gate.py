"""The byte loop around a call: native when it can be, Python otherwise.

``serve``, ``receive``, ``call`` and ``write`` (documented in ``_gate.c``) are the only
parts of a call that run in C: reads, writes, the fixed frame header and the
fixed envelope of a compact call or reply (``pycompart.wire.protocol``),
never a value. The C module is built by ``pip install`` where a compiler and the
Python headers are found; without it (or with ``PYCOMPART_FASTPATHS``
leaving out ``native``) the functions below do the same in Python, more
slowly. ``NATIVE`` says which is in use.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

from .. import fastpaths
from ..wire.protocol import (
    CALL_ENVELOPE, CALL_FRAME, COMPACT, COMPACT_CALL, COMPACT_OK, HEADER, OK_FRAME, compact_ok_frame,
)

_native = None
if fastpaths.enabled("native"):
    try:
        from . import _gate as _native  # type: ignore[attr-defined, no-redef]
    except ImportError:
        _native = None

#: Whether the C fast path is in use.
NATIVE = _native is not None
#: The longest wait one call may ask for (a C int of milliseconds, ~24 days);
#: a caller that waits longer asks again.
MAX_TIMEOUT_MS = 2**31 - 1
#: The biggest frame ``call`` writes: PIPE_BUF, all or nothing on a pipe.
ATOMIC_WRITE = 4096


def py_serve(rfd: int, wfd: int, buf: memoryview, handle: Callable[[bytes], bytes | None],
             write_timeout_ms: int, spin_us: int, fast: Callable[[int, bytes, bytes], object] | None = None) -> int:
    """``_gate.serve`` in Python. (A signal's handler runs inside ``readv``,
    which Python then retries, as C returns to Python for it.)"""
    unpack = HEADER.unpack_from
    call_size = CALL_ENVELOPE.size
    while True:
        _spin(rfd, spin_us)
        try:
            n = os.readv(rfd, (buf,))
        except BlockingIOError:
            return -1
        if n < 8:
            return n
        length, nfds, nbulk = unpack(buf)
        if n != 8 + length or nfds or nbulk:
            return n
        reply: object
        if fast is not None and length >= call_size and buf[8] == COMPACT and buf[9] == COMPACT_CALL:
            _, _, rid, parent, concurrent, name_len = CALL_ENVELOPE.unpack_from(buf, 8)
            start = 8 + call_size
            if parent == 0 and concurrent == 0 and name_len <= length - call_size:
                got = fast(rid, bytes(buf[start:start + name_len]), bytes(buf[start + name_len:n]))
                if got is None:
                    return n
                if got is False:
                    return -1
                if isinstance(got, bytes):
                    reply = compact_ok_frame(rid, got)
                elif type(got) is tuple and len(got) == 1 and isinstance(got[0], bytes):
                    reply = got[0]  # type: ignore[index]
                else:
                    raise TypeError("serve: fast must return bytes, a 1-tuple of bytes, None or False")
            else:
                reply = handle(bytes(buf[8:n]))
        else:
            reply = handle(bytes(buf[8:n]))
        if reply is None:
            return -1
        if not isinstance(reply, bytes):
            raise TypeError("serve: handle must return bytes or None")
        if reply:
            deadline = None if write_timeout_ms < 0 else time.monotonic() + write_timeout_ms / 1000
            write_all(wfd, reply, deadline)


def py_receive(rfd: int, buf: memoryview, timeout_ms: int, spin_us: int, rid: int = 0,
               got: bytearray | memoryview | None = None) -> int | bytes:
    """``_gate.receive`` in Python. (``got`` is set to -2 before each read,
    a count not known, and to the count after it: Python cannot set it
    inside the read, so an exception that interrupts one counts as having
    read an unknown amount.)"""
    mark = None
    if got is not None:
        raw = memoryview(got).cast("B")
        if raw.nbytes < 8:
            raise ValueError("receive: got must hold 8 bytes")
        mark = raw[:8].cast("q")
    deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
    _spin(rfd, spin_us)
    while True:
        before = 0
        try:
            if mark is not None:
                before, mark[0] = mark[0], -2
            n = os.readv(rfd, (buf,))
        except BlockingIOError:
            if mark is not None:
                mark[0] = before
        else:
            if mark is not None:
                mark[0] = n
            if rid and n >= OK_FRAME.size:
                length, nfds, nbulk, marker, kind, answers = OK_FRAME.unpack_from(buf)
                if n == 8 + length and not nfds and not nbulk and marker == COMPACT and kind == COMPACT_OK \
                        and answers == rid:
                    return bytes(buf[OK_FRAME.size:n])
            return n
        try:
            wait_fd(rfd, select.POLLIN, deadline)
        except TimeoutError:
            return -2


def py_call(wfd: int, rid: int, name: bytes, args: bytes, parent: int = 0) -> bool:
    """``_gate.call`` in Python."""
    total = CALL_FRAME.size + len(name) + len(args)
    if len(name) > 0xFFFF or total > ATOMIC_WRITE:
        return False
    frame = CALL_FRAME.pack(total - 8, 0, 0, COMPACT, COMPACT_CALL, rid, parent, 0, len(name)) + name + args
    try:
        n = os.write(wfd, frame)
    except BlockingIOError:
        return False
    if n != total:
        raise OSError("call: a partial write (not a pipe?)")
    return True


def py_write(wfd: int, data: bytes | memoryview, sent: memoryview) -> int:
    """``_gate.write`` in Python. (Python cannot count inside the write: an
    exception raised as it returns leaves ``sent`` short, and the caller
    takes the frame for torn.)"""
    try:
        n = os.write(wfd, data)
    except BlockingIOError:
        return -1
    sent[0] += n
    return n


def wait_fd(fd: int, events: int, deadline: float | None,
             readable: tuple[int, Callable[[], None]] | None = None) -> None:
    """Wait for ``events`` on ``fd``; with ``readable`` (a descriptor and
    what to call when it has data), serve that meanwhile."""
    timeout_ms = -1
    if deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        timeout_ms = max(1, int(remaining * 1000 + 0.999))
    p = select.poll()
    p.register(fd, events)
    if readable is not None:
        if readable[0] == fd:
            p.modify(fd, events | select.POLLIN)
        else:
            p.register(readable[0], select.POLLIN)
    ready = p.poll(timeout_ms)
    if not ready:
        raise TimeoutError
    if readable is not None and any(f == readable[0] and e & (select.POLLIN | select.POLLHUP)
                                    for f, e in ready):
        readable[1]()


def write_all(fd: int, data: bytes | memoryview, deadline: float | None,
              readable: tuple[int, Callable[[], None]] | None = None,
              sent: memoryview | None = None) -> None:
    """Write all of ``data`` to the non-blocking ``fd`` by ``deadline``
    (``TimeoutError``), serving ``readable`` meanwhile (``wait_fd``),
    counting what went out in ``sent`` (``write``: exact in C even when a
    signal handler's exception interrupts)."""
    if sent is None:
        sent = memoryview(bytearray(8)).cast("q")
    n = write(fd, data, sent)
    if n == len(data):
        return
    view = memoryview(data)[max(n, 0):]
    while view:
        wait_fd(fd, select.POLLOUT, deadline, readable)
        n = write(fd, view, sent)
        if n > 0:
            view = view[n:]


def _spin(fd: int, spin_us: int) -> None:
    if spin_us <= 0:
        return
    p = select.poll()
    p.register(fd, select.POLLIN)
    end = time.perf_counter() + spin_us / 1e6
    while not p.poll(0) and time.perf_counter() < end:
        pass


serve = _native.serve if _native is not None else py_serve
receive = _native.receive if _native is not None else py_receive
call = _native.call if _native is not None else py_call
write = _native.write if _native is not None else py_write
