"""Warnings an instance's code issues, re-issued in the caller.

Unboxed, ``warnings.warn`` in a library goes through the *program's*
filters: ``-W error``, ``warnings.catch_warnings()``, ``pytest.warns``. An
instance therefore lets every warning through its own filters (``always``,
behind whatever the compartment's code adds itself) and, while it serves a
call, sends each one to the caller as a ``Warn`` frame before the reply;
the caller re-issues it with ``warnings.warn_explicit`` as the call returns
(``pycompart.frontend.warn``). Outside calls (threads between calls) a
warning is printed to the instance's stderr, as Python would.

Bounded: at most ``MAX_WARNINGS`` distinct warnings per call are sent (the
same warning from the same line repeated in a loop is sent once).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from typing import Any

from ..transport.channel import serving
from ..wire.protocol import MAX_ERROR_VALUE, MAX_WARNINGS, Connection, Warn
from .lockdown import original_path

#: pycompart's own source tree: a warning whose stacklevel reaches it points
#: at the compartment's caller.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class CallWarnings:
    """Warnings issued during calls, waiting for the next frame to main."""

    def __init__(self) -> None:
        self.channel: Any = None  # the Channel to main, once serving
        self.current_call: Any = lambda: 0  # set by the serve loop: the call served now
        self._lock = threading.Lock()
        self._pending: list[Warn] = []
        self._seen: dict[int, set[tuple[Any, ...]]] = {}  # call id -> warnings sent
        self._modules: dict[str, str] = {}
        self._original = warnings.showwarning

    def install(self) -> None:
        warnings.simplefilter("always")  # the caller's filters decide
        # Except ResourceWarning: issued when the garbage collector finds an
        # unclosed file or loop of ours, during whatever call runs then; the
        # caller's "error" filter must not fail an unrelated call for it.
        # (Unboxed it would be an unraisable warning; Python ignores it by
        # default.)
        warnings.filterwarnings("ignore", category=ResourceWarning)
        warnings.showwarning = self.show

    def show(self, message: Any, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: Any = None) -> None:
        channel = self.channel
        call = serving(channel) if channel is not None else 0
        if not call and channel is not None:
            call = self.current_call()
        if not call or channel is None or channel.failure is not None or file is not None:
            self._original(message, category, filename, lineno, file, line)
            return
        text = str(message)[:MAX_ERROR_VALUE]
        key = (category, text, filename, lineno)
        with self._lock:
            seen = self._seen.setdefault(call, set())
            if key in seen or len(seen) >= MAX_WARNINGS:
                return
            seen.add(key)
            if len(self._seen) > 64:  # calls long finished
                for old in list(self._seen)[:32]:
                    del self._seen[old]
            mro = [_qualified(c) for c in category.__mro__[:32]]
            shown = original_path(str(filename))[:1000]
            self._pending.append(Warn(call, mro, text, shown, max(0, int(lineno)),
                                      self._module(filename), filename.startswith(_PACKAGE_DIR)))
            first = len(self._pending) == 1
        if first:
            channel.pending_output.append(self)

    def frames(self) -> bytes:
        """The pending warnings as frames (called by the channel when it
        sends its next frame)."""
        with self._lock:
            pending, self._pending = self._pending, []
        return b"".join(Connection.send_warn(w) for w in pending)

    def finished(self, call: int) -> None:
        with self._lock:
            self._seen.pop(call, None)

    def _module(self, filename: str) -> str:
        """The module a warning's file is, as ``warnings.warn`` would name it
        for the filters' ``module`` field."""
        name = self._modules.get(filename)
        if name is None:
            name = next((m for m, mod in list(sys.modules.items())
                         if getattr(mod, "__file__", None) == filename), "")
            if not name:
                name = os.path.splitext(os.path.basename(filename))[0]
            if len(self._modules) < 1024:
                self._modules[filename] = name
        return name[:200]


def _qualified(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
