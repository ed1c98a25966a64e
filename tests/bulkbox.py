"""Entrypoints for tests/test_bulk.py: large values through the bulk lanes,
and a compartment that attacks them from inside."""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
import threading
import time

import msgspec

from boxed import _channel_write_fd


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def two(a: bytes, n: int, b: bytes, tag: str = "") -> list:  # type: ignore[type-arg]
    return [hashlib.sha256(a).hexdigest(), n, hashlib.sha256(b).hexdigest(), tag]


def make(n: int, seed: int) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32)


def make_view(n: int) -> memoryview:
    return memoryview(bytearray(b"\x07" * n))


def wrong_type(n: int) -> int:
    return b"z" * n  # type: ignore[return-value]


def as_text(s: str) -> int:
    return len(s)


def _lanes_fd() -> int:
    for fd in range(3, 256):
        try:
            fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            continue
        return fd
    raise RuntimeError("no bulk memory file found")


def resize_lanes() -> list[str]:
    """Try to change what main relies on: the file's size and its seals."""
    fd = _lanes_fd()
    out = []
    for name, attempt in (
            ("shrink", lambda: os.ftruncate(fd, 4096)),
            ("grow", lambda: os.ftruncate(fd, os.fstat(fd).st_size * 2)),
            ("seal writes", lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)),
            ("seal future writes", lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0x0010))):
        try:
            attempt()
            out.append(f"{name}: done")
        except OSError as exc:
            out.append(f"{name}: {exc.errno}")
    return out


def _map():  # type: ignore[no-untyped-def]
    import mmap

    fd = _lanes_fd()
    size = os.fstat(fd).st_size
    return mmap.mmap(fd, size), size // 2


def forge_table(kind: str) -> int:
    """Name impossible segments in our lane (to main) and send a frame that
    points at them."""
    m, lane = _map()
    base = lane  # the instance's lane is the second
    if kind == "outside":
        struct.pack_into("<QQ", m, base + 64, lane - 10, 1 << 20)
    elif kind == "header":
        struct.pack_into("<QQ", m, base + 64, 0, 100)
    elif kind == "huge":
        struct.pack_into("<QQ", m, base + 64, 4096, 1 << 62)
    count = 40 if kind == "count" else 1
    payload = msgspec.msgpack.encode([2, 1, msgspec.msgpack.Ext(22, b"\x00")])
    os.write(_channel_write_fd(), struct.pack("<IHH", len(payload), 0, count) + payload)
    time.sleep(5)  # main ends us before this
    return 1


def lie_consumed() -> int:
    """Claim main's lane (to us) was copied out more often than it was."""
    m, _ = _map()
    struct.pack_into("<Q", m, 0, 12345)
    return 1


def scribble_after(n: int) -> bytes:
    """Return ``n`` bytes through the lane, and keep overwriting the lane
    from another thread for a while after: main must hold its own copy."""
    m, lane = _map()
    value = b"\x01" * n

    def scribble() -> None:
        end = time.monotonic() + 0.6
        junk = b"\xee" * n
        while time.monotonic() < end:
            m[lane + 4096:lane + 4096 + n] = junk
            time.sleep(0.001)
    threading.Thread(target=scribble, daemon=True).start()
    time.sleep(0.05)  # the thread is running before our reply is written
    return value


def _current_call() -> int:
    from pycompart.transport.channel import serving_stack

    return serving_stack()[-1][1]


def nested_bulk(count: int) -> int:
    """Call back into main ``count`` times, each call naming a 100 MiB bulk
    segment: main must neither copy nor keep them."""
    m, lane = _map()
    struct.pack_into("<QQ", m, lane + 64, 4096, 100 << 20)
    parent = _current_call()
    frames = b""
    for i in range(count):
        payload = msgspec.msgpack.encode([1, 10_000 + i, "@call", msgspec.Raw(b"\xc0"), parent, False])
        frames += struct.pack("<IHH", len(payload), 0, 1) + payload
    os.write(_channel_write_fd(), frames)
    time.sleep(5)  # main ends us before this
    return 1


def reply_text_as_bytes() -> bytes:
    """Answer our own call with a bulk-path reply whose value is a string
    (base64 of bytes): a bytes return type must refuse it."""
    m, lane = _map()
    struct.pack_into("<QQ", m, lane + 64, 4096, 8)
    value = msgspec.msgpack.encode("aGVsbG8gZnJvbSBhIHN0cg==")
    payload = msgspec.msgpack.encode([2, _current_call(), msgspec.Raw(value)])
    os.write(_channel_write_fd(), struct.pack("<IHH", len(payload), 0, 1) + payload)
    time.sleep(5)
    return b""


def lane_file() -> int:
    """The inode of the memory file this instance's lanes are mapped from."""
    with open("/proc/self/maps") as f:
        for line in f:
            if "pycompart-bulk" in line:
                return int(line.split()[4])
    return 0
