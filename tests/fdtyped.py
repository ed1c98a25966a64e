"""Typed entrypoints that take and return descriptors (tests/test_descriptors.py)."""

import os
import socket

import pycompart


def read_all(fd: pycompart.Fd) -> bytes:
    with fd:
        return os.read(fd.fileno(), 1000)


def pair_end() -> socket.socket:
    a, b = socket.socketpair()
    b.sendall(b"from a typed entrypoint")
    b.close()
    return a
