"""Argument parsing for cp, in a compartment with no filesystem access
(beyond its own code) and no network: whatever a hostile argument does to
the parser, it can reach nothing."""

from __future__ import annotations

USAGE = "usage: cp.py SRC DST   (DST may be a directory)"


class UsageError(ValueError):
    pass


def parse(argv: list[str]) -> tuple[str, str]:
    """SRC and DST, as given. ``--`` ends options; no option is known."""
    args = list(argv)
    if args[:1] == ["--"]:
        args = args[1:]
    elif any(a.startswith("-") and a != "-" for a in args[:1]):
        raise UsageError(f"unknown option {args[0]!r}\n{USAGE}")
    if len(args) != 2 or not all(args):
        raise UsageError(USAGE)
    return args[0], args[1]
