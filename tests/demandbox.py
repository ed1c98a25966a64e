"""Placed in on-demand compartments by tests/test_on_demand.py."""

import os
import socket
import time

_calls = []


def pid():
    return int(os.readlink("/proc/self"))


def calls():
    _calls.append(1)
    return len(_calls)


def sleep(seconds):
    time.sleep(seconds)
    return "slept"


def serve(conn):
    with conn:
        data = conn.recv(100)
        if data == b"crash":
            os.kill(os.getpid(), 9)
        conn.sendall(data.upper())
        conn.shutdown(socket.SHUT_WR)


def serve_and_fail(conn):
    with conn:
        conn.sendall(b"bye")
    raise ValueError("the handler's own error")


def hang(conn):
    time.sleep(30)
