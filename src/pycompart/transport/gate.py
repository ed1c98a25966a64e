"""The byte loop around a call: native when it can be, Python otherwise.

``serve`` and ``receive`` (documented in ``_gate.c``) are the only parts of
a call that run in C: reads, writes and the fixed frame header, never the
message. The C module is built by ``pip install`` where a compiler and the
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
from ..wire.protocol import HEADER
from .streams import PipeTransport, wait_fd

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


def py_serve(rfd: int, wfd: int, buf: memoryview, handle: Callable[[bytes], bytes | None],
             write_timeout_ms: int, spin_us: int) -> int:
    """``_gate.serve`` in Python. (A signal's handler runs inside ``readv``,
    which Python then retries, as C returns to Python for it.)"""
    unpack = HEADER.unpack_from
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
        reply = handle(bytes(buf[8:n]))
        if reply is None:
            return -1
        if reply:
            deadline = None if write_timeout_ms < 0 else time.monotonic() + write_timeout_ms / 1000
            PipeTransport.write_all(wfd, reply, deadline)


def py_receive(rfd: int, buf: memoryview, timeout_ms: int, spin_us: int) -> int:
    """``_gate.receive`` in Python."""
    deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
    _spin(rfd, spin_us)
    while True:
        try:
            return os.readv(rfd, (buf,))
        except BlockingIOError:
            pass
        try:
            wait_fd(rfd, select.POLLIN, deadline)
        except TimeoutError:
            return -2


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
