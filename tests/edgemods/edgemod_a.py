"""Placed in compartment ``app`` (tests/test_edges.py), which may call
``reader``: it imports ``edgemod_b`` and gets proxies over its edge."""

import os

import edgemod_b


def through_b() -> str:
    return edgemod_b.read()


def reads_itself() -> str:
    try:
        with open(edgemod_b.PATH) as f:
            return "read " + f.read()
    except OSError as exc:
        return f"refused: {type(exc).__name__}"


def store_roundtrip() -> tuple:
    store = edgemod_b.Store("> ")
    got = store.get("data")
    try:
        store.get("other")
    except edgemod_b.NotFound as exc:  # the stand-in of b's class
        missing = f"NotFound: {exc}"
    return got, missing, store.calls, isinstance(store, edgemod_b.Store)


def give_store():
    return edgemod_b.Store("given ")


def pids() -> tuple:
    return os.getpid(), edgemod_b.pid()


def crash_b() -> str:
    try:
        edgemod_b.crash()
    except Exception as exc:
        return type(exc).__name__
    return "no crash"


def stale() -> str:
    store = edgemod_b.Store("")
    crash_b()
    try:
        store.get("data")
    except Exception as exc:
        return type(exc).__name__
    return "no error"


def rewire_b() -> list:
    """Hostile: rewire reader's module to read another file for us."""
    out = []
    try:
        edgemod_b.PATH = "/etc/hostname"
        out.append("set")
    except Exception as exc:
        out.append(type(exc).__name__)
    try:
        out.append(repr(edgemod_b.read.__globals__))
    except Exception as exc:
        out.append(type(exc).__name__)
    try:
        out.append(repr(edgemod_b._private))
    except Exception as exc:
        out.append(type(exc).__name__)
    return out


def rewire_b_in_place() -> list:
    """Hostile: change reader's module-level list and dict in place."""
    out = []
    for change in (lambda: edgemod_b.ALLOWED.append("secret"),
                   lambda: edgemod_b.ALLOWED.__setitem__(0, "secret"),
                   lambda: edgemod_b.OPTIONS.update(prefix="owned:")):
        try:
            change()
            out.append("changed")
        except Exception as exc:
            out.append(type(exc).__name__)
    try:
        out.append(edgemod_b.read_named("secret"))
    except Exception as exc:
        out.append(type(exc).__name__)
    out.append(edgemod_b.read_named("data"))
    return out


def get_through(name: str) -> str:
    return edgemod_b.Store("").get(name)  # b's NotFound goes on through a


def reach_stdlib() -> list:
    """Hostile: reach reader's standard library through its module."""
    out = [edgemod_b.os.getpid() == os.getpid()]  # b's os is ours: it crossed by name
    try:
        out.append(edgemod_b.whose())  # a builtin function b imported: not b's own
    except Exception as exc:
        out.append(type(exc).__name__)
    return out


def read_in_a_thread(times: int) -> list:
    """Calls over the edge from a thread of our own (no call of main's
    being served on it): each is audited as the serve thread's are."""
    import threading

    out = []
    worker = threading.Thread(target=lambda: out.extend(edgemod_b.read() for _ in range(times)))
    worker.start()
    worker.join()
    return out
