"""Hostile code that attacks main through the channel itself: raw frames
written on the instance's own end, what a compromised compartment can do.
Runs *inside* compartments (``tests/test_hardening.py``)."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time

import msgspec

HEADER = struct.Struct("<IHH")
OK_TAG, CALL_TAG = 2, 1


def _server():
    from pycompart.compartment.objects import Callback

    return Callback.call_out.__self__


def channel_write_fd() -> int:
    """The write end of this instance's channel to main, found the way
    hostile code would: the O_WRONLY pipe that is not stdout or stderr."""
    import fcntl

    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue
        if target.startswith("pipe:") and flags & os.O_ACCMODE == os.O_WRONLY:
            return fd
    raise RuntimeError("no channel found")


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), 0, 0) + payload


def deep_ok(rid: int, depth: int = 5000) -> bytes:
    """A well-formed Ok whose value is nested ``depth`` arrays deep."""
    return frame(b"\x93\x02" + msgspec.msgpack.encode(rid) + b"\x91" * depth + b"\xc0")


def ping() -> str:
    return "pong"


def whoami() -> int:
    return int(os.readlink("/proc/self"))  # the host's number


def deep_reply() -> int:
    """Answer the current call with a value 5000 arrays deep, then hang."""
    server = _server()
    os.write(channel_write_fd(), deep_ok(server.current))
    time.sleep(30)
    return 0


def empty_lists_reply(mib: int = 29):
    """Answer the current call with ``mib`` MiB of empty lists: one byte
    each on the wire, ~60 bytes each once decoded."""
    server = _server()
    n = mib << 20
    value = b"\xdd" + struct.pack(">I", n) + b"\x90" * n
    payload = b"\x93\x02" + msgspec.msgpack.encode(server.current) + value
    fd = channel_write_fd()
    os.set_blocking(fd, True)
    os.write(fd, frame(payload))
    return None  # a second reply to the same call: counted as a violation


def flood_unknown_replies(n: int) -> int:
    """Send ``n`` replies to calls main never made, then answer normally."""
    fd = channel_write_fd()
    os.set_blocking(fd, True)
    bogus = frame(b"\x93\x02" + msgspec.msgpack.encode(10**9) + b"\xc0")
    chunk = bogus * 1000
    for _ in range(n // 1000):
        os.write(fd, chunk)
    return n


def ignore_cancel_and_flood() -> int:
    """Block the cancel signal, then stream replies to unknown ids forever:
    the monitor must not spend its life draining them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN + 1})
    fd = channel_write_fd()
    os.set_blocking(fd, True)
    bogus = frame(b"\x93\x02" + msgspec.msgpack.encode(10**9) + b"\xc0") * 1000
    while True:
        try:
            os.write(fd, bogus)
        except OSError:
            time.sleep(0.01)


def stop_reading_and_call(n: int) -> int:
    """Stop reading the channel and send ``n`` top-level calls to main: its
    refusals fill the pipe main writes to."""
    fd = channel_write_fd()
    os.set_blocking(fd, True)
    for i in range(n):
        call = b"\x95\x01" + msgspec.msgpack.encode(10**6 + i) + msgspec.msgpack.encode("@call") \
            + b"\x90\x00"
        os.write(fd, frame(call))
    time.sleep(60)
    return n


def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def start_spinner() -> str:
    """Leave a thread burning CPU after the call returns."""
    def spin() -> None:
        while True:
            pass
    threading.Thread(target=spin, daemon=True).start()
    return "spinning"


def plant(directory: str, target: str) -> None:
    """Leave traps for main in a directory it will read from."""
    os.symlink(target, os.path.join(directory, "report.txt"))
    os.mkfifo(os.path.join(directory, "pipe.txt"))
    with open(os.path.join(directory, "ok.txt"), "w") as f:
        f.write("written by the compartment\n")


def burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def claim_crash(name: str) -> None:
    """Tell main that another compartment crashed (it did not)."""
    from pycompart.errors import CompartmentCrashed

    raise CompartmentCrashed(name, 1, "was killed by signal 9 (SIGKILL)")


def claim_crash_by_full_name(name: str) -> None:
    """The same lie, raised as a class of its own named as pycompart's."""
    class CompartmentCrashed(Exception):
        pass

    CompartmentCrashed.__module__ = "pycompart.errors"
    CompartmentCrashed.__qualname__ = "CompartmentCrashed"
    exc = CompartmentCrashed(f"compartment {name!r} (pid 7) was killed by signal 9 (SIGKILL)")
    exc.compartment, exc.pid, exc.status = name, 7, "was killed by signal 9 (SIGKILL)"
    raise exc
