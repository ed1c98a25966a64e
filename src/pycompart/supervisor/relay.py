"""Instances' stdout and stderr, relayed by main.

An instance never holds main's stdin, stdout or stderr: sharing their open
file descriptions let a compartment read the user's terminal, switch echo
off, stop it (``tcflow``), make main's ``input()`` fail (``O_NONBLOCK``),
truncate or forge main's log file, or steal main's output back from a pipe.
Instead each instance writes into pipes of its own, and main copies what
arrives to *its* ``sys.stdout``/``sys.stderr`` (as they are at that moment:
``redirect_stdout`` and test capture see it):

* what an instance prints *during a call* travels on the call channel, as
  ``Output`` frames sent before the reply; the thread reading the reply
  writes it, so it comes out in order with main's own output, as it would
  without a compartment;
* everything else (import-time prints, threads of the compartment between
  calls, C code writing to fd 1) arrives on the pipes and is copied by one
  relay thread, ``pycompart-output``.

Main never blocks on a compartment for this and its memory does not grow
with what a compartment writes: the relay reads a bounded chunk, writes it
(blocking only itself), and reads the next; a compartment that writes
faster than main's stdout drains simply blocks in ``write``, as a program
does. Output handed over by the monitor thread (which must never wait on a
terminal) goes through a bounded queue; what does not fit is dropped with a
note saying how much.
"""

from __future__ import annotations

import collections
import os
import select
import sys
import threading
from typing import Any

CHUNK = 64 * 1024
#: Bytes the monitor thread may queue for the relay before it drops output.
QUEUE_LIMIT = 1024 * 1024


class Sink:
    """Where one instance's output goes: main's current stdout/stderr, each
    line prefixed with ``[compartment] `` in ``prefixed`` mode."""

    def __init__(self, relay: OutputRelay, compartment: str, prefixed: bool):
        self.relay = relay
        self.prefix = f"[{compartment}] ".encode() if prefixed else b""
        self._line_start = [True, True, True]  # per stream: at a line start?

    def write(self, stream: int, data: bytes) -> None:
        """From a caller thread: write now. From the monitor thread: queue."""
        if threading.current_thread() is self.relay.monitor_thread:
            self.relay.enqueue(self, stream, data)
        else:
            self.emit(stream, data)

    def emit(self, stream: int, data: bytes) -> None:
        if not data:
            return
        if self.prefix:
            data = self._prefixed(stream, data)
        write_to_main(stream, data)

    def _prefixed(self, stream: int, data: bytes) -> bytes:
        lines = data.split(b"\n")
        out = []
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            if line or not last:
                if self._line_start[stream]:
                    out.append(self.prefix)
                out.append(line)
            if not last:
                out.append(b"\n")
                self._line_start[stream] = True
            elif line:
                self._line_start[stream] = False
        return b"".join(out)


def write_to_main(stream: int, data: bytes) -> None:
    """Write bytes to main's ``sys.stdout`` (1) or ``sys.stderr`` (2) as
    they are now, in order with what main itself has written there."""
    target: Any = sys.stdout if stream == 1 else sys.stderr
    if target is None:
        return
    try:
        buffer = getattr(target, "buffer", None)
        if buffer is not None:
            target.flush()  # main's own pending text first
            buffer.write(data)
            buffer.flush()
        else:
            target.write(data.decode("utf-8", "replace"))
            target.flush()
    except (OSError, ValueError):
        pass  # main's stream is closed or broken: nothing to write to


class OutputRelay:
    """The relay thread and the pipes it copies from."""

    def __init__(self) -> None:
        self.monitor_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pipes: dict[int, tuple[Sink, int]] = {}  # read fd -> (sink, stream)
        self._queue: collections.deque[tuple[Sink, int, bytes]] = collections.deque()
        self._queued = 0
        self._dropped: dict[Sink, int] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._wake_r, select.POLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pycompart-output", daemon=True)
        self._thread.start()

    def add(self, sink: Sink, stdout_fd: int, stderr_fd: int, wake: bool = True) -> None:
        """Copy from these read ends (closed here at end of file), from the
        relay thread's next wake-up (``wake``: now; else ``wake_up`` must
        follow, before anything can be written to them)."""
        with self._lock:
            for fd, stream in ((stdout_fd, 1), (stderr_fd, 2)):
                os.set_blocking(fd, False)
                self._pipes[fd] = (sink, stream)
                self._poll.register(fd, select.POLLIN)
        if wake:
            self._wake()

    def wake_up(self) -> None:
        """Make the relay thread look at the pipes ``add`` gave it."""
        self._wake()

    def enqueue(self, sink: Sink, stream: int, data: bytes) -> None:
        with self._lock:
            if self._queued + len(data) > QUEUE_LIMIT:
                self._dropped[sink] = self._dropped.get(sink, 0) + len(data)
            else:
                self._queue.append((sink, stream, data))
                self._queued += len(data)
        self._wake()

    def stop(self, timeout: float = 2.0) -> None:
        """Copy what is left (the instances are gone: every pipe ends), then stop."""
        self._stopping = True
        self._wake()
        self._thread.join(timeout)
        with self._lock:
            for fd in list(self._pipes):
                self._close(fd)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _close(self, fd: int) -> None:
        self._pipes.pop(fd, None)
        try:
            self._poll.unregister(fd)
        except (KeyError, ValueError):
            pass
        try:
            os.close(fd)
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                idle = not self._pipes
            if self._stopping and idle:
                break
            try:
                events = self._poll.poll(100 if self._stopping else None)
            except (OSError, ValueError):
                break
            if self._stopping and not events:
                break  # nothing more arrives: instances are gone or silent
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                    continue
                with self._lock:
                    entry = self._pipes.get(fd)
                if entry is None:
                    continue
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    with self._lock:
                        self._close(fd)
                    continue
                sink, stream = entry
                sink.emit(stream, data)
            self._drain_queue()
        self._drain_queue()

    def _drain_queue(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    dropped, self._dropped = self._dropped, {}
                    break
                sink, stream, data = self._queue.popleft()
                self._queued -= len(data)
            sink.emit(stream, data)
        for sink, n in dropped.items():
            sink.emit(2, f"[pycompart: {n} bytes of output from a compartment were dropped: "
                         "main's stderr did not keep up]\n".encode())
