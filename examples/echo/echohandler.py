"""The per-connection handler: runs in a fresh instance for each TCP
connection, with no filesystem and no network privilege of its own. All it
has is the connected socket the broker handed it."""

from __future__ import annotations

import socket

CHUNK = 64 * 1024


def serve(conn: socket.socket) -> int:
    """Echo every byte back until the client closes; the bytes echoed."""
    total = 0
    with conn:
        while True:
            data = conn.recv(CHUNK)
            if not data:
                break
            conn.sendall(data)
            total += len(data)
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    return total
