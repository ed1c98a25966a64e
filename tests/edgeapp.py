"""Decorated entrypoints calling each other across compartments
(tests/test_edges.py)."""

from __future__ import annotations

import os

import pycompart

app = pycompart.App({"compartments": {"web": {"may_call": ["signer"]}, "signer": {}}})
closed = pycompart.App({"compartments": {"web": {}, "signer": {}}})  # no edge


@app.entrypoint("signer")
def double(x: int) -> int:
    return 2 * x


@app.entrypoint("signer")
def where() -> int:
    return os.getpid()


@app.entrypoint("web")
def quad(x: int) -> int:
    return double(double(x))


@app.entrypoint("web")
def pids() -> list[int]:
    return [os.getpid(), where(), where.options(timeout=5)()]


@closed.entrypoint("signer")
def triple(x: int) -> int:
    return 3 * x


@closed.entrypoint("web")
def nine(x: int) -> int:
    return triple(triple(x))


class BadToken(Exception):
    pass


@app.entrypoint("signer")
def check(token: str) -> str:
    if token != "good":
        raise BadToken(f"bad token {token!r}")
    return "ok"


@app.entrypoint("web")
def check_through(token: str) -> str:
    return check(token)  # signer's BadToken goes on through web
