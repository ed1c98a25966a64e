"""Which fast paths are on.

Each fast path has a plain one beside it that does the same thing more
slowly, and the test suite runs both ways. ``PYCOMPART_FASTPATHS`` picks:
unset or ``all`` for every one, ``none`` for none, or a comma-separated list
of names (``bulk``: large values in shared memory, ``native``: the C call
gate, ``compact``: typed calls and their replies in compact form on pipes,
``pycompart.wire.protocol``). Main hands the choice to the zygote, and so to
every instance.
"""

from __future__ import annotations

import os

NAMES = ("bulk", "native", "compact")


def _chosen() -> frozenset[str]:
    value = os.environ.get("PYCOMPART_FASTPATHS", "all").strip().lower()
    if value in ("", "all"):
        return frozenset(NAMES)
    if value == "none":
        return frozenset()
    return frozenset(name.strip() for name in value.split(",")) & frozenset(NAMES)


_ON = _chosen()


def enabled(name: str) -> bool:
    return name in _ON
