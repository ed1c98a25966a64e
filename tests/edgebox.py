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
