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
        venv = os.path.join(here, "..", ".venv", "bin", "python")
        if os.path.exists(venv) and os.path.realpath(venv) != os.path.realpath(sys.executable):
            os.execv(venv, [venv, *sys.argv])
        raise
