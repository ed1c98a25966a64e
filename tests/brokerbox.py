"""A Broker inside a compartment (tests/test_edges.py): ``listener`` alone
may bind its port; each connection it accepts goes to a fresh instance of
``handler`` (examples/echo/echohandler.py), which has no network at all."""

from __future__ import annotations

import socket

import pycompart


def listen(port: int, connections: int) -> list[int]:
    """Accept ``connections`` connections on ``port`` and hand each over;
    what the broker served and failed."""
    listener = socket.create_server(("127.0.0.1", port), backlog=64)
    broker = pycompart.Broker(None, "handler", "echohandler:serve")
    with listener:
        for _ in range(connections):
            conn, _ = listener.accept()
            broker.handle(conn)
        broker.stop(wait=20)
    return [broker.served, broker.failed]


def try_connect(port: int) -> str:
    """The handler's own network: none."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError as exc:
        return f"refused: {type(exc).__name__}"
    return "connected"
