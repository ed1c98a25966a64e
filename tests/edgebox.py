"""Compartments that call each other (tests/test_edges.py): ``web`` may call
``signer``, which alone may read the key."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from typing import Any

import pycompart

KEY_PATH = os.environ.get("EDGEBOX_KEY", "/nonexistent")


def sign(data: bytes) -> str:
    with open(KEY_PATH, "rb") as f:
        key = f.read()
    return hashlib.sha256(key + data).hexdigest()


def whoami() -> int:
    return os.getpid()


def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def handle(data: bytes) -> dict:
    """web's entrypoint: cannot read the key, asks signer to sign."""
    try:
        open(KEY_PATH, "rb").close()
        can_read = True
    except OSError:
        can_read = False
    return {"signature": sign(data), "web_reads_key": can_read}


def relay(name: str, *args: Any) -> Any:
    """web calls one of signer's functions by name (``sign``, ``crash``...)."""
    return globals()[name](*args)


def try_call(name: str, *args: Any) -> str:
    try:
        return repr(globals()[name](*args))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def forge_edge(callee: str) -> str:
    """What hostile code in web meets asking the monitor itself for an edge
    its spec does not declare (bypassing the check in its own process)."""
    from pycompart.compartment import edges
    from pycompart.wire.config import EdgePlan

    try:
        edges.CLIENT._ask_for(callee, EdgePlan(), time.monotonic() + 5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "granted"


def flood_control() -> str:
    """Garbage on the control socket: the monitor must kill us, nothing else."""
    from pycompart.compartment import edges

    edges.CLIENT.control.send(b"\xff" * 64)
    time.sleep(5)
    return "still alive"


def handed_fd(fd: pycompart.Fd) -> bytes:
    """signer reads what it was handed (descriptors over an edge)."""
    with fd:
        return os.read(fd.fileno(), 100)


def pass_fd(path: str) -> bytes:
    """web opens a file it may read and hands it to signer."""
    return handed_fd(pycompart.Fd(os.open(path, os.O_RDONLY)))


def children() -> int:
    return len(os.listdir("/proc/self/task"))


def open_flood(n: int) -> str:
    """Ask the monitor for the same edge ``n`` times without reading."""
    from pycompart.compartment import edges
    from pycompart.wire import edges as wire

    for seq in range(10_000, 10_000 + n):
        edges.CLIENT._tell(wire.Open(seq, "signer"))
    time.sleep(1.0)
    return "sent"


def chatty(seconds: float) -> str:
    """A hostile callee: streams Output frames on its channel, never replies."""
    from pycompart.compartment import serve
    from pycompart.wire.protocol import Connection

    transport = serve.CALL_OUTPUT.channel.transport
    fd = getattr(transport, "write_fd", None) or transport.fileno()
    frame = Connection.send_output(1, b"x") * 64
    os.set_blocking(fd, True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.write(fd, frame)
    return "done chatting"


def trickle(seconds: float) -> str:
    """A hostile callee: sends the start of a reply frame a byte at a time."""
    from pycompart.compartment import serve

    transport = serve.CALL_OUTPUT.channel.transport
    fd = getattr(transport, "write_fd", None) or transport.fileno()
    os.set_blocking(fd, True)
    from pycompart.wire.protocol import HEADER

    os.write(fd, HEADER.pack(1 << 20, 0, 0))  # a 1 MiB frame, then its body a byte every 0.5 ms
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        os.write(fd, b"x")
        time.sleep(0.0005)
    return "done"


def fds_on_control(count: int) -> str:
    """Send descriptors on the control socket (a frame that claims none)."""
    import array
    import socket

    from pycompart.compartment import edges
    from pycompart.wire import edges as wire

    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(count)]
    frame = wire.encode(wire.Cancel(1))
    edges.CLIENT.control.sock.sendmsg(
        [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    time.sleep(5)
    return "still alive"


_held: list = []


def hold_per_call(n: int) -> str:
    """Ask for ``n`` per-call edges to signer and keep them, unused."""
    from pycompart.compartment import edges

    plan = edges.CLIENT.config.edges["signer"]
    for i in range(n):
        try:
            _held.append(edges.CLIENT._ask_for("signer", plan, time.monotonic() + 1))
        except Exception as exc:
            return f"{i} held, then {type(exc).__name__}: {exc}"
    return f"{n} held"


def ping_a(n: int) -> int:
    """In compartment a: calls b's ping_b until n is 0; the depth reached."""
    return 0 if n == 0 else 1 + ping_b(n - 1)


def ping_b(n: int) -> int:
    return 0 if n == 0 else 1 + ping_a(n - 1)
