"""The command line: ``pycompart run | check | doctor | bench | --version``.

Kept small: ``pycompart run`` starts the zygote before it imports anything
big (the zygote's own start-up then overlaps main's), and the other commands
live in ``commands``.
"""

from __future__ import annotations

import os
import sys

from ..errors import PrivilegeError, SpecError

RUN_USAGE = """usage: pycompart run SPEC [--] SCRIPT [ARGS...]
       pycompart run SPEC -m MODULE [ARGS...]

Run a program like `python SCRIPT ARGS...` (or `python -m MODULE ARGS...`),
with the modules and functions that SPEC places in compartments imported only
inside those compartments, under their privileges."""


def run_command(argv: list[str]) -> int:
    """``pycompart run``: parsed by hand, since everything after the script
    belongs to the script."""
    if not argv or argv[0] in ("-h", "--help"):
        print(RUN_USAGE)
        return 0 if argv else 2
    spec, rest = argv[0], argv[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    as_module = rest[:1] == ["-m"]
    if as_module:
        rest = rest[1:]
    if not rest:
        print(RUN_USAGE, file=sys.stderr)
        return 2
    from ..supervisor import launcher

    launcher.prelaunch()  # before the imports below: the zygote starts meanwhile
    from . import run as shim

    try:
        return shim.run(spec, rest[0], rest[1:], as_module=as_module)
    except (SpecError, PrivilegeError) as exc:
        for line in str(exc).splitlines():  # (each mistake on a line of its own)
            print(f"pycompart run: {line}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return run_command(argv[1:])
    try:
        from .commands import command

        return command(argv)
    except BrokenPipeError:  # `pycompart check app.toml | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
