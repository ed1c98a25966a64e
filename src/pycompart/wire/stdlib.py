"""Standard modules imported on the other side's account, from the standard
library only.

Decoding a value may need a module the process has not imported yet (a
``Fraction`` needs ``fractions``, a path ``pathlib``, a named time zone
``zoneinfo``): imported then, at a moment the sender picks. Through
``sys.path`` that import would search the program's own directory (or the
working directory) first, and a compartment allowed to write there could
plant ``fractions.py`` and have main run it. ``stdlib_import`` finds the
module, and every module it imports in turn, in the interpreter's own
library directories only (builtin and frozen modules as always), and so
does the work done with it (``standard_only``); other threads' imports
are not affected.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import os
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

#: The interpreter's library directories: where ``os`` is (``sysconfig``'s
#: "stdlib" path, without importing ``sysconfig``: ~2 ms of a start), and
#: its extension modules.
DIRECTORIES = [os.path.dirname(os.__file__), os.path.join(os.path.dirname(os.__file__), "lib-dynload")]

_local = threading.local()
_install = threading.Lock()


class _StandardOnly:
    """A meta path finder that, in a thread inside ``standard_only``, finds
    top-level modules in ``DIRECTORIES`` only (a package's submodules come
    from its own ``__path__``, as always). Outside it finds nothing."""

    @staticmethod
    def find_spec(fullname: str, path: Any = None, target: Any = None) -> Any:
        if not getattr(_local, "depth", 0) or path is not None:
            return None
        for special in (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter):
            if special.find_spec(fullname) is not None:
                return None  # theirs, next in sys.meta_path
        spec = importlib.machinery.PathFinder.find_spec(fullname, DIRECTORIES)
        if spec is None:
            raise ModuleNotFoundError(f"no module named {fullname!r} in the standard library",
                                      name=fullname)
        return spec


_FINDER = _StandardOnly()


@contextlib.contextmanager
def standard_only() -> Iterator[None]:
    """Within: this thread imports top-level modules from the standard
    library only (what is imported already is taken as it is). Around all
    the work a value needs, not just the first import: a module may import
    others as it runs (``zoneinfo`` imports ``importlib.resources``,
    ``tempfile``, ``pathlib`` and the ``tzdata`` package for a zone not in
    the system's data)."""
    if sys.meta_path[:1] != [_FINDER]:  # (once, usually: the lock only until then)
        with _install:
            # Installed once and never removed: a thread iterating sys.meta_path
            # as it grows at the front sees a finder twice, never one less.
            if not any(finder is _FINDER for finder in sys.meta_path):
                sys.meta_path.insert(0, _FINDER)
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def stdlib_import(name: str) -> types.ModuleType:
    """The standard module ``name``, imported from the standard library
    only if not imported yet (through the import system even then: a
    module another thread is still importing is waited for, not taken
    half made)."""
    with standard_only():
        return importlib.import_module(name)
