"""Entrypoints for ``pycompart bench``, in a module of their own so that an
instance imports nothing more than it needs."""


def null() -> None:
    return None


def size(data: bytes) -> int:
    return len(data)


def fn() -> None:
    return None


def call(callback):  # type: ignore[no-untyped-def]
    return callback()


class Obj:
    def ping(self) -> None:
        return None


#: A module's list main reads: shared state (main gets a proxy of it).
TABLE = list(range(100))


def table() -> list:  # type: ignore[type-arg]
    """The same list returned by a call: a copy."""
    return TABLE


def count_up(n: int):  # type: ignore[no-untyped-def]
    """A generator a call returns (plain arguments: batched from the start)."""
    yield from range(n)


def consume(items) -> int:  # type: ignore[no-untyped-def]
    """Iterate an iterable of main's (pulled from main in batches)."""
    total = 0
    for _ in items:
        total += 1
    return total


def echo_conn(conn) -> None:  # type: ignore[no-untyped-def]
    """One echo connection (a Broker's handler): echo until EOF."""
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            conn.sendall(data)


def edge_loop(n: int) -> list[float]:
    """Runs in compartment ``caller``: ``n`` null calls over its edge to
    ``bench`` (``null`` is bench's there), each one's time in microseconds."""
    import time

    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        null()
        out.append((time.perf_counter_ns() - t) / 1000)
    return out


_BLOBS: dict[int, bytes] = {}


def blob(n: int) -> bytes:
    """``n`` bytes, made once (what is measured is the way back)."""
    if n not in _BLOBS:
        _BLOBS.clear()
        _BLOBS[n] = b"x" * n
    return _BLOBS[n]
