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
