"""Functions that tests run inside compartments. Imported by instances, so
it must stay light (no pytest import)."""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import os
import signal
import struct
import time
from typing import Optional

import msgspec


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Shape(msgspec.Struct):
    name: str
    points: list[Point]


class CustomError(Exception):
    pass


def null() -> None:
    return None


def echo(data: bytes) -> bytes:
    return data


def size(data: bytes) -> int:
    return len(data)


def parse(data: bytes, *, strict: bool = True) -> dict[str, int]:
    words = data.split()
    if strict and not words:
        raise ValueError("empty input")
    return {w.decode(): len(w) for w in words}


def whoami() -> int:
    return int(os.readlink("/proc/self"))  # the host's number: instances have a pid namespace


def add(a: int, b: int = 10, *rest: int, scale: int = 1, **named: int) -> int:
    return (a + b + sum(rest) + sum(named.values())) * scale


def make_shape(name: str, n: int) -> Shape:
    return Shape(name, [Point(i, i * i) for i in range(n)])


def centroid(shape: Shape) -> Optional[Point]:
    if not shape.points:
        return None
    return Point(sum(p.x for p in shape.points) // len(shape.points),
                 sum(p.y for p in shape.points) // len(shape.points))


def fail(kind: str) -> int:
    if kind == "value":
        raise ValueError("bad value", 42)
    if kind == "key":
        raise KeyError("missing")
    if kind == "custom":
        raise CustomError("custom failure")
    if kind == "oserror":
        open("/no/such/file")
    if kind == "systemexit":
        raise SystemExit(5)
    if kind == "keyboard":
        raise KeyboardInterrupt
    return 0


def crash(how: str) -> int:
    if how == "exit":
        os._exit(7)
    if how == "clean":
        os._exit(0)
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)
    if how == "abort":
        os.abort()
    return 0


def lie(kind: str) -> int:
    """Returns what the annotation forbids."""
    if kind == "str":
        return "not an int"  # type: ignore[return-value]
    if kind == "float":
        return 1.5  # type: ignore[return-value]
    if kind == "none":
        return None  # type: ignore[return-value]
    return 1


def _channel_write_fd() -> int:
    for fd in range(3, 64):
        try:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
                return fd
        except OSError:
            continue
    raise RuntimeError("no channel found")


def forge(kind: str) -> int:
    """A hostile compartment writing raw bytes into its own channel."""
    fd = _channel_write_fd()
    if kind == "garbage":
        payload = b"\xc1\xc1\xc1 not msgpack"
        os.write(fd, struct.pack("<IHH", len(payload), 0, 0) + payload)
    elif kind == "oversized":
        os.write(fd, struct.pack("<IHH", 0xFFFFFFF0, 0, 0) + b"x" * 64)
    elif kind == "reserved":
        os.write(fd, struct.pack("<IHH", 4, 0, 0xBEEF) + b"abcd")
    elif kind == "wrongshape":
        payload = msgspec.msgpack.encode([2, "not-an-id", b"x"])
        os.write(fd, struct.pack("<IHH", len(payload), 0, 0) + payload)
    elif kind == "unknown_id":
        payload = msgspec.msgpack.encode([2, 987654321, 1])
        os.write(fd, struct.pack("<IHH", len(payload), 0, 0) + payload)
    elif kind == "fds":
        payload = msgspec.msgpack.encode([2, 1, 1])
        os.write(fd, struct.pack("<IHH", len(payload), 3, 0) + payload)
    elif kind.startswith("compact_"):
        # A reply in compact form (the call gate's envelope) to this very
        # call, before the real one: two msgpack objects, or a value bigger
        # than the app's max_message_size (16 KiB in the test).
        from pycompart.transport.channel import serving_any

        rid = serving_any()[-1][1]
        value = b"\x01\x02" if kind == "compact_garbage" else msgspec.msgpack.encode(b"v" * 20000)
        os.write(fd, struct.pack("<IHHBBQ", 10 + len(value), 0, 0, 0xC1, 2, rid) + value)
    return 1


def spin(seconds: float) -> int:
    """A pure-Python busy loop: interruptible by cancellation."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def stubborn(seconds: float) -> int:
    """Busy loop that blocks every signal it can, so it cannot be cancelled:
    the monitor has to kill it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(range(1, signal.SIGRTMAX + 1))
                           - {signal.SIGKILL, signal.SIGSTOP, 32, 33})
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return 0


def half_frame(seconds: float) -> int:
    """A hostile compartment that starts a frame (its header only), holds
    on past its caller's timeout (cancellation blocked), then writes a whole
    compact reply to the caller's *next* call id: bytes that by the stream's
    framing are the body of the frame it began."""
    from pycompart.transport.channel import serving_any

    fd = _channel_write_fd()
    rid = serving_any()[-1][1]
    os.write(fd, struct.pack("<IHH", 50, 0, 0))
    signal.pthread_sigmask(signal.SIG_BLOCK, set(range(1, signal.SIGRTMAX + 1))
                           - {signal.SIGKILL, signal.SIGSTOP, 32, 33})
    time.sleep(seconds)
    value = msgspec.msgpack.encode(777)
    os.write(fd, struct.pack("<IHHBBQ", 10 + len(value), 0, 0, 0xC1, 2, rid + 1) + value)
    time.sleep(0.3)
    return 1


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def environment() -> dict[str, str]:
    return dict(os.environ)


def open_fds() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))


def big(n: int) -> bytes:
    return b"z" * n


def echo_text(text: str) -> str:
    return text


def start_an_app() -> str:
    """What an App started inside an instance says (a program that starts
    its app without the ``__main__`` guard)."""
    import pycompart

    try:
        pycompart.App({"compartments": {"x": {}}}).start()
    except pycompart.PycompartError as exc:
        return str(exc)
    return "started"
