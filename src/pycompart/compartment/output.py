"""An instance's stdout and stderr: pipes of its own, never main's.

Descriptors 1 and 2 are the write ends of two pipes main relays
(``pycompart.supervisor.relay``). On top of them, ``sys.stdout`` and
``sys.stderr`` are replaced by text streams whose writes, *while a call is
being served*, are collected and sent to main on the call channel just
before the reply (``Output`` frames): main then writes them to its own
``sys.stdout``/``sys.stderr`` in order with its own output. Outside calls
(import time, threads between calls) and for writes below Python (C code,
``os.write(1, ...)``) the pipes carry the bytes, copied by main's relay
thread.
"""

from __future__ import annotations

import io
import os
import threading
from typing import Any

from ..wire.protocol import MAX_OUTPUT, Connection


class CallOutput:
    """Output written during the current call, waiting for the reply."""

    def __init__(self) -> None:
        self.channel: Any = None  # the Channel to main, once serving
        self.in_call: Any = lambda: False  # set by the serve loop
        self._lock = threading.Lock()
        self._chunks: list[tuple[int, bytearray]] = []
        self._size = 0

    def write(self, stream: int, data: bytes) -> bool:
        """Keep ``data`` for the reply if a call is being served; False
        (write it to the pipe instead) otherwise."""
        channel = self.channel
        if channel is None or channel.failure is not None or not self.in_call():
            return False
        with self._lock:
            if self._chunks and self._chunks[-1][0] == stream:
                self._chunks[-1][1].extend(data)
            else:
                self._chunks.append((stream, bytearray(data)))
            first = self._size == 0
            self._size += len(data)
            full = self._size >= MAX_OUTPUT
        if first:
            channel.pending_output.append(self)
        if full:
            channel.send_output()  # bounded in our memory too
        return True

    def frames(self) -> bytes:
        """The collected output as Output frames (called by the channel when
        it sends its next frame)."""
        with self._lock:
            chunks, self._chunks, self._size = self._chunks, [], 0
        return b"".join(Connection.send_output(stream, bytes(data)) for stream, data in chunks)


class _Stream(io.RawIOBase):
    """fd 1 or 2, by way of the call channel while a call is served."""

    def __init__(self, fd: int, stream: int, call_output: CallOutput):
        super().__init__()
        self.fd = fd
        self.stream = stream
        self.call_output = call_output

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        data = bytes(data)
        if not self.call_output.write(self.stream, data):
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        return len(data)


class Stdin(io.TextIOBase):
    """``sys.stdin`` of an instance whose spec says ``stdin = "main"``: reads
    main's ``sys.stdin`` (as it is at that moment) while main is calling in;
    end of file otherwise, as ``/dev/null`` (descriptor 0) is."""

    def __init__(self, call_out: Any, in_call: Any):
        super().__init__()
        self._call_out = call_out
        self._in_call = in_call

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 0

    def isatty(self) -> bool:
        return False

    def _ask(self, method: str, size: int) -> str:
        if not self._in_call():
            return ""
        data = self._call_out([method, size], "@stdin")
        if type(data) is not str:
            raise OSError("main sent no text for stdin")
        return data

    def read(self, size: int | None = -1) -> str:
        if size is not None and size >= 0:
            parts, left = [], size
            while left:  # main sends at most a chunk at a time
                data = self._ask("read", left)
                if not data:
                    break
                parts.append(data)
                left -= len(data)
            return "".join(parts)
        parts = []
        while data := self._ask("read", -1):
            parts.append(data)
        return "".join(parts)

    @property
    def buffer(self) -> io.BufferedReader:
        """The bytes beneath: main's ``sys.stdin.buffer`` (or its text,
        UTF-8 encoded, if main's stdin has no buffer)."""
        found = self.__dict__.get("_buffer")
        if found is None:
            found = self.__dict__["_buffer"] = io.BufferedReader(_StdinBytes(self))
        return found

    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        limit = -1 if size is None else size
        parts: list[str] = []
        got = 0
        while True:
            data = self._ask("readline", limit - got if limit >= 0 else -1)
            if not data:
                break
            parts.append(data)
            got += len(data)
            if data.endswith("\n") or (limit >= 0 and got >= limit):
                break
        return "".join(parts)


class _StdinBytes(io.RawIOBase):
    def __init__(self, stdin: Stdin):
        super().__init__()
        self._stdin = stdin

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        stdin = self._stdin
        if not stdin._in_call():
            return 0
        data = stdin._call_out(["readbytes", len(buffer)], "@stdin")
        if type(data) is not bytes or len(data) > len(buffer):
            raise OSError("main sent no bytes for stdin")
        buffer[:len(data)] = data
        return len(data)


_prepared: list[Any] = []


def prepare(call_output: CallOutput) -> None:
    """Build the instance's ``sys.stdout``/``sys.stderr`` once, in the
    zygote, before it forks: building them in each new instance writes to
    dozens of pages shared with the zygote (copy-on-write faults), which
    costs more than the rest of the output set-up."""
    if not _prepared:
        _prepared.append(io.TextIOWrapper(_Stream(1, 1, call_output), encoding="utf-8",  # type: ignore[arg-type]
                                          errors="strict", write_through=True))
        _prepared.append(io.TextIOWrapper(_Stream(2, 2, call_output), encoding="utf-8",  # type: ignore[arg-type]
                                          errors="backslashreplace", write_through=True))
        # And keep the zygote's own: freeing them in each instance costs too.
        import sys

        _prepared.extend((sys.stdout, sys.stderr))


def install(call_output: CallOutput) -> None:
    """Replace ``sys.stdout`` and ``sys.stderr`` (fds 1 and 2 are already
    this instance's own pipes)."""
    import sys

    prepare(call_output)
    sys.stdout = sys.__stdout__ = _prepared[0]
    sys.stderr = sys.__stderr__ = _prepared[1]
