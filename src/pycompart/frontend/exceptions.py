"""Exceptions from compartments, as main raises them.

What a compartment raises crosses as a description (``ErrorInfo``), never
a pickle. Main raises, in this order of preference:

* the stand-in class of an exception class placed in that compartment
  (``Compartment.standin``: a subclass of ``RemoteError`` and of the
  builtin exception the class derives from);
* the builtin exception itself, for the builtins on
  ``pycompart.wire.exceptions.ALLOWED_EXCEPTIONS`` (and ``SystemExit`` /
  ``KeyboardInterrupt`` where the spec allows them: ``allow_exit``);
* the class itself if it is an exception class of a module main has
  *already* imported (``json.JSONDecodeError``,
  ``dataclasses.FrozenInstanceError``, a third-party library's error):
  found by looking in ``sys.modules`` and the class dictionaries, never by
  importing or by running a module's ``__getattr__``, and built without
  running the class's own code (``build_without_init``);
* ``RemoteError`` otherwise.

Stand-in classes behave as exception classes in main's own code too: they
can be constructed (``raise boxed.ParseError("bad")``) and pickled.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ..errors import RemoteError


def imported_exception_class(type_name: str) -> type[BaseException] | None:
    """The exception class called ``type_name`` (``module.Qual.Name``) in a
    module main has imported itself, or None. Only a class whose own
    ``__module__`` and ``__qualname__`` say that name (not an alias), that
    derives from ``Exception``, and not one of a module that is a
    compartment's (a proxy)."""
    if type(type_name) is not str or len(type_name) > 200:
        return None
    parts = type_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:cut]))
        if type(module) is not types.ModuleType:
            continue  # absent, or a compartment's module (a proxy), or a fake
        obj: Any = module
        for part in parts[cut:]:
            obj = _static(obj, part)
            if obj is None:
                break
        if isinstance(obj, type) and issubclass(obj, Exception) \
                and f"{obj.__module__}.{obj.__qualname__}" == type_name:
            return obj
    return None


def _static(obj: Any, name: str) -> Any:
    """``obj.name`` from a module's or class's own dictionary: no
    ``__getattr__``, no descriptor runs."""
    try:
        return vars(obj).get(name)
    except TypeError:
        return None


def standin_init(self: RemoteError, *args: Any, **kwargs: Any) -> None:
    """``__init__`` of stand-in classes: built by main's own code, a
    stand-in is an ordinary exception (``ParseError("bad", 3)``). The real
    class's ``__init__`` is the compartment's code and never runs in main:
    keyword arguments become attributes of the same names, as most
    exception classes keep them (``LibError("x", code=7).code``)."""
    BaseException.__init__(self, *args)
    for key, value in kwargs.items():
        if key.startswith("_") or key in ("type_name", "message", "remote_traceback", "args"):
            raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {key!r}")
        setattr(self, key, value)
    self.type_name = type(self).__pycompart_standin__[1]  # type: ignore[attr-defined]
    self.message = str(args[0]) if len(args) == 1 else str(args) if args else ""
    self.remote_traceback = ""


def standin_str(self: RemoteError) -> str:
    return self.message


def standin_reduce(self: RemoteError) -> Any:
    """Pickled by class name and arguments, like any exception: unpickling
    looks the class up in the compartment's module proxy (the same stand-in)."""
    state = {k: v for k, v in vars(self).items() if not k.startswith("_")}
    return (type(self), self.args, state)
