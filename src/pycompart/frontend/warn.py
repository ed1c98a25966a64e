"""Warnings from compartments, re-issued in main as the call returns.

The instance side (``pycompart.compartment.warn``) sends each warning its
code issued during a call; here the caller re-issues it through main's own
filters, so ``-W error``, ``warnings.catch_warnings(record=True)``,
``pytest.warns`` and ``filterwarnings`` see it as they would unboxed. Its
category is the one main knows: a builtin warning class, the stand-in of a
class placed in that compartment, or a warning class of a module main has
imported itself (``pycompart.frontend.exceptions``); else the nearest
builtin base. A warning that pointed at the compartment's caller
(``stacklevel=2`` in a library function) points at main's call site.

What differs from unboxed: the warning is raised (under an ``error``
filter) when the call returns, not where it was issued, so the call's
effects in the compartment have happened.
"""

from __future__ import annotations

import linecache
import os
import stat
import sys
import warnings
from typing import TYPE_CHECKING, Any

from ..wire.exceptions import ALLOWED_EXCEPTIONS
from .exceptions import imported_exception_class

if TYPE_CHECKING:
    from .proxy import Compartment

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
#: Registries of warnings already shown, per compartment and module (the
#: "default" action shows a warning once per location), bounded: in all,
#: a compartment's registries hold at most this many characters of
#: warning text (past it they are emptied, and such warnings show again).
MAX_REGISTERED_CHARS = 1 << 21
#: Modules per compartment with a registry of their own; past it, one
#: shared registry (a compartment names the module of each warning).
_MAX_REGISTRIES = 1024


def reissue(comp: Compartment, found: list[Any]) -> None:
    for warn in found:
        category = _category(comp, warn.mro)
        if warn.at_caller:
            # As ``warnings.warn(stacklevel=...)`` would, but into a registry
            # of ours: the caller module's own ``__warningregistry__`` would
            # keep every distinct text the compartment sends, for ever.
            frame = sys._getframe(_caller_level() - 1)  # (stacklevel counts from 1: this frame)
            module = frame.f_globals.get("__name__")
            module = module if type(module) is str else "<unknown>"
            registry = _registry(comp, "\0caller:" + module)
            before = len(registry)
            warnings.warn_explicit(warn.message, category, frame.f_code.co_filename, frame.f_lineno,
                                   module=module, registry=registry, module_globals=frame.f_globals)
        else:
            registry = _registry(comp, warn.module)
            before = len(registry)
            warnings.warn_explicit(warn.message, category, _where(comp, warn.filename), warn.lineno,
                                   module=warn.module or None, registry=registry)
        if len(registry) > before:  # what the registry now keeps of it
            comp.warning_chars += len(str(warn.message)) + 64


def _registry(comp: Compartment, module: Any) -> dict[Any, Any]:
    """The registry a warning of ``comp``'s is recorded in, within the
    compartment's bounds (``MAX_REGISTERED_CHARS``, ``_MAX_REGISTRIES``)."""
    registries = comp.warning_registry
    if comp.warning_chars > MAX_REGISTERED_CHARS:
        registries.clear()
        comp.warning_chars = 0
    registry = registries.get(module)
    if registry is None:
        key = module if len(registries) < _MAX_REGISTRIES else "\0shared"
        registry = registries.setdefault(key, {})
    return registry


#: The largest source file main reads to show the line a warning points at,
#: and how many it reads for compartments at most (each stays in linecache).
MAX_SOURCE = 1 << 20
MAX_PRIMED = 256
#: ... and in all, at most so many lines (each a str object in main:
#: a file of short lines costs ~40 times its size).
MAX_PRIMED_LINES = 100_000
_PRIMED: set[str] = set()
_primed_lines = [0]


def _where(comp: Compartment, filename: Any) -> str:
    """The file name to show a compartment's warning under. Showing it reads
    the file (``linecache``), here in main: only a Python source file that
    is a regular file of bounded size is read (and cached), so that a
    compartment cannot make main read ``/dev/zero`` or block on a FIFO or
    its own stdin; any other name is shown as ``<compartment: name>``,
    which ``linecache`` leaves alone."""
    name = str(filename)[:4096]
    if name in linecache.cache:
        return name
    if name.endswith(".py") and os.path.isabs(name) and len(_PRIMED) < MAX_PRIMED:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size <= MAX_SOURCE:
                    data = os.read(fd, MAX_SOURCE + 1)
                    if len(data) <= MAX_SOURCE:
                        count = data.count(b"\n") + 1
                        if _primed_lines[0] + count <= MAX_PRIMED_LINES:
                            lines = data.decode("utf-8", "replace").splitlines(keepends=True)
                            linecache.cache[name] = (len(data), st.st_mtime, lines, name)
                            _PRIMED.add(name)
                            _primed_lines[0] += count
                            return name
            except OSError:
                pass
            finally:
                os.close(fd)
    return f"<{comp.name}: {name}>"


def _category(comp: Compartment, mro: list[str]) -> type[Warning]:
    built: dict[str, type] = {}  # (shared: each stand-in made once for this warning)
    for i, name in enumerate(mro):
        cls: Any = ALLOWED_EXCEPTIONS.get(name)
        if cls is None and comp.places_name(name):
            cls = comp.standin(mro[i:], built)
        if cls is None:
            cls = imported_exception_class(name)
        if isinstance(cls, type) and issubclass(cls, Warning):
            return cls
    return UserWarning


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside pycompart: main's code
    that called into the compartment."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
