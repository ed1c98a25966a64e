"""A safebox's module (tests/test_edges.py): what a hostile caller must not
turn against it. It imports the standard library, keeps containers, has
decorated and cached methods, a generator and a logger, as real code does."""

from __future__ import annotations

import functools
import json
import logging
import os

logger = logging.getLogger(__name__)
RECENT: list = []
STATS: dict = {"reads": 0}


class Store:
    helper = staticmethod(os.getuid)  # a function of the standard library, on a class of its own

    def __init__(self, label: str = "default"):
        self.label = label

    @functools.lru_cache(maxsize=8)
    def cached_len(self, s: str) -> int:
        return len(s)

    def summary(self) -> str:
        return json.dumps({"label": self.label})


def count_up(n: int):
    yield from range(n)


def pid() -> int:
    return os.getpid()
