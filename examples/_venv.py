"""Shared by the examples: make ``import pycompart`` work when an example
is run with a Python that lacks it, by re-running it with the checkout's
own ``.venv`` (made by ``bash scripts/dev.sh``)."""

from __future__ import annotations

import os
import sys


def ensure_pycompart() -> None:
    try:
        import pycompart  # noqa: F401
    except ImportError:
        here = os.path.dirname(os.path.abspath(__file__))
        prefix = os.path.join(here, "..", ".venv")
        venv = os.path.join(prefix, "bin", "python")
        # Which environment we run in is sys.prefix, not the executable: a
        # venv's python is a symlink to the very interpreter that made it.
        if os.path.exists(venv) and os.path.realpath(prefix) != os.path.realpath(sys.prefix):
            os.execv(venv, [venv, *sys.argv])
        raise
