"""Placed in compartment ``reader`` (tests/test_edges.py): the only one that
may read the data file."""

import os

PATH = os.environ.get("EDGEMOD_DATA", "/nonexistent")


class NotFound(LookupError):
    pass


class Store:
    def __init__(self, prefix: str):
        self.prefix = prefix
        self.calls = 0

    def get(self, name: str) -> str:
        self.calls += 1
        if name != "data":
            raise NotFound(name)
        with open(PATH) as f:
            return self.prefix + f.read()


#: Names ``read_named`` serves: module state a caller must not rewrite.
ALLOWED = ["data"]
OPTIONS = {"prefix": ""}


def read_named(name: str) -> str:
    if name not in ALLOWED:
        raise PermissionError(f"{name} is not served")
    with open(PATH) as f:
        return OPTIONS["prefix"] + f.read()


def read() -> str:
    with open(PATH) as f:
        return f.read()


def pid() -> int:
    return os.getpid()


def crash() -> None:
    os._exit(3)


_private = "reader's own"


from os import getuid as whose  # noqa: E402  (a builtin function of the standard library)


def warn_at(filename: str) -> str:
    import warnings

    warnings.warn_explicit("boom", UserWarning, filename, 1)
    return "warned"
