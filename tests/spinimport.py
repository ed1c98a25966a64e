"""A module that starts a spinning thread when imported (only ever imported
inside a compartment: tests/test_on_demand.py)."""

import threading


def _spin() -> None:
    while True:
        pass


threading.Thread(target=_spin, daemon=True).start()


def null() -> None:
    return None
