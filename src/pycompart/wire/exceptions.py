"""Exceptions across a boundary: described by the side that raised them,
rebuilt by the side that receives them.

An exception crosses as an ``ErrorInfo`` (type name, message, simple
arguments and attributes, traceback text), never pickled. Only the builtin
types on ``ALLOWED_EXCEPTIONS`` (and two of pycompart's own) are rebuilt as
themselves; anything else becomes ``RemoteError``. No class named by the far
side is ever imported.
"""

from __future__ import annotations

import builtins
import os
import traceback
from collections.abc import Callable
from typing import Any

from .. import errors
from ..errors import RemoteError, RemoteTraceback
from .protocol import MAX_ERROR_TEXT, MAX_ERROR_VALUE, Blob, ErrorInfo


#: Builtin exceptions that arrive as themselves. BaseExceptions such as
#: SystemExit/KeyboardInterrupt are not among them: they arrive as
#: themselves only where the spec says so (``CONTROL_EXCEPTIONS``).
#: StopIteration arrives as itself: a caller iterating by hand stops where it
#: would have unboxed (generators turn it into RuntimeError, PEP 479).
ALLOWED_EXCEPTIONS: dict[str, type[Exception]] = {
    name: getattr(builtins, name)
    for name in (
        "Exception ArithmeticError AssertionError AttributeError BufferError EOFError "
        "StopIteration StopAsyncIteration Warning UserWarning DeprecationWarning "
        "PendingDeprecationWarning SyntaxWarning RuntimeWarning FutureWarning ImportWarning "
        "UnicodeWarning BytesWarning ResourceWarning EncodingWarning "
        "FloatingPointError ImportError ModuleNotFoundError IndexError KeyError LookupError "
        "MemoryError NameError NotImplementedError OSError BlockingIOError ChildProcessError "
        "ConnectionError BrokenPipeError ConnectionAbortedError ConnectionRefusedError "
        "ConnectionResetError FileExistsError FileNotFoundError InterruptedError "
        "IsADirectoryError NotADirectoryError PermissionError ProcessLookupError TimeoutError "
        "OverflowError RecursionError ReferenceError RuntimeError TypeError UnboundLocalError "
        "UnicodeError UnicodeDecodeError UnicodeEncodeError ValueError ZeroDivisionError"
    ).split()
}

#: Control-flow exceptions a compartment's code may raise through a call (a
#: package's CLI entry point ending with ``sys.exit(status)``): raised as
#: themselves in the caller when the spec allows it (``allow_exit``), as
#: unboxed; the instance lives on either way.
CONTROL_EXCEPTIONS: dict[str, type[BaseException]] = {
    "SystemExit": SystemExit, "KeyboardInterrupt": KeyboardInterrupt}

#: pycompart's own errors that an instance may report (for example a reply
#: that was too large to send).
_OWN_EXCEPTIONS: dict[str, type[Exception]] = {
    "pycompart.ProtocolError": errors.ProtocolError,
    "pycompart.EntrypointError": errors.EntrypointError,
    "pycompart.PrivilegeError": errors.PrivilegeError,
    # What a call the compartment made to another compartment ended with
    # (``pycompart.compartment.edges``), raised on through its own call.
    "pycompart.CompartmentCrashed": errors.CompartmentCrashed,
    "pycompart.CompartmentUnavailable": errors.CompartmentUnavailable,
    "pycompart.CallTimeout": errors.CallTimeout,
}

_SIMPLE = (str, bytes, int, float, bool, type(None))
#: An OSError's fields live in C slots, not in ``__dict__``: sent by name.
_OSERROR_FIELDS = ("errno", "strerror", "filename", "filename2")
#: Never set from the far side's attributes: they are the receiver's.
_RESERVED = frozenset({"args", "with_traceback", "add_note", "remote_traceback",
                       "remote_compartment", "type_name", "message", "reported_by", *_OSERROR_FIELDS})


def _bounded(value: Any) -> Any:
    if isinstance(value, bytes):
        return Blob(value[:MAX_ERROR_VALUE])
    return value[:MAX_ERROR_VALUE] if isinstance(value, str) else value


def plain(value: Any) -> Any:
    """A simple value from an ``ErrorInfo`` as a Python value."""
    return value.data if value.__class__ is Blob else value


def describe_exception(exc: BaseException, brief: bool = False) -> ErrorInfo:
    """``exc`` as it crosses. ``brief``: only what a less trusted receiver
    needs to handle it (type name, message, the builtin classes it derives
    from, and the arguments of a builtin type): main describes its own
    exceptions this way to compartments, without its traceback (paths,
    source lines, values in them) or attributes."""
    if brief:
        return _describe_brief(exc)
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(exc, errors.PycompartError) and cls.__module__.startswith("pycompart"):
        name = f"pycompart.{cls.__qualname__}"
    args = [_bounded(a) for a in exc.args] if all(isinstance(a, _SIMPLE) for a in exc.args) else []
    try:
        message = str(exc)
    except Exception:  # a hostile __str__ must not break error reporting
        message = "<unprintable>"
    if cls is errors.RemoteError:
        # Another compartment's exception, raised on through this one's
        # code (a call over an edge): it goes on as what it was.
        name, message, args = str(exc.type_name), str(exc.message), []
    # The outermost frames only: a RecursionError's thousand would cost the
    # compartment more to format than the call took (and be cut anyway).
    tb = format_traceback(exc, _user_frames(exc.__traceback__), TRACEBACK_FRAMES)
    mro = [c.__qualname__ if c.__module__ == "builtins" else f"{c.__module__}.{c.__qualname__}"
           for c in cls.__mro__[:32]]
    attributes = {}
    if isinstance(exc, OSError):
        for key in _OSERROR_FIELDS:
            value = getattr(exc, key, None)
            if value is not None and isinstance(value, _SIMPLE):
                attributes[key] = _bounded(value)
    for key, value in list(getattr(exc, "__dict__", {}).items())[:64]:
        if isinstance(key, str) and key.isidentifier() and not key.startswith("_") \
                and isinstance(value, _SIMPLE) and len(attributes) < 36:
            attributes[key[:100]] = _bounded(value)
    for key, value in _slots_and_properties(exc):
        if key not in attributes and len(attributes) < 36:
            attributes[key] = _bounded(value)
    suppress = bool(exc.__suppress_context__) and exc.__cause__ is None
    return ErrorInfo(name[:200], message[:MAX_ERROR_TEXT], args[:16], tb[-MAX_ERROR_TEXT:],
                     [m[:200] for m in mro], attributes, suppress=suppress)


def _slots_and_properties(exc: BaseException) -> list[tuple[str, Any]]:
    """Public values an exception keeps in ``__slots__`` (pyparsing's
    ``loc``, ``msg``, ``pstr``) or computes in properties of its own
    classes (``lineno``, ``col``, ``line``), simple ones only: the
    receiver's stand-in has neither the slots nor the code."""
    out: list[tuple[str, Any]] = []
    for klass in type(exc).__mro__:
        if klass.__module__ == "builtins":
            continue
        slots = klass.__dict__.get("__slots__", ())
        names = [slots] if isinstance(slots, str) else list(slots) if isinstance(slots, (tuple, list)) else []
        names += [n for n, v in klass.__dict__.items() if isinstance(v, property)]
        for name in names[:64]:
            if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") \
                    or name in _OSERROR_FIELDS or name == "args":
                continue
            try:
                value = getattr(exc, name)
            except Exception:  # unset, or a property that fails: not sent
                continue
            if isinstance(value, _SIMPLE):
                out.append((name[:100], value))
        if len(out) >= 36:
            break
    return out


def _describe_brief(exc: BaseException) -> ErrorInfo:
    cls = type(exc)
    builtin = cls.__module__ == "builtins"
    name = cls.__qualname__ if builtin else f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(exc)
    except Exception:
        message = "<unprintable>"
    args = [_bounded(a) for a in exc.args] if builtin and all(isinstance(a, _SIMPLE) for a in exc.args) else []
    mro = [name] + [c.__qualname__ for c in cls.__mro__[1:32] if c.__module__ == "builtins"]
    attributes = {}
    if builtin and isinstance(exc, OSError):
        for key in _OSERROR_FIELDS:
            value = getattr(exc, key, None)
            if value is not None and isinstance(value, _SIMPLE):
                attributes[key] = _bounded(value)
    return ErrorInfo(name[:200], message[:MAX_ERROR_TEXT], args[:16], "", [m[:200] for m in mro],
                     attributes)


#: pycompart's own source tree: frames in it are the serving machinery.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


#: Frames of a compartment's traceback described to its caller.
TRACEBACK_FRAMES = 64


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"

#: Exceptions of one chain (causes, contexts) described.
_CHAIN = 16


def format_traceback(exc: BaseException, tb: Any, limit: int) -> str:
    """What ``traceback.format_exception(type(exc), exc, tb, limit=limit)``
    prints, less the lines of carets under source lines: to place them,
    Python 3.11+ decodes the whole position table of each frame's code and
    parses its line (``ast``), ~2 ms in a compartment for a RecursionError's
    64 frames, on the path of the call's reply. The caller reads the lines."""
    chain: list[tuple[BaseException, Any]] = []
    joiners: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(chain) < _CHAIN:
        if isinstance(current, BaseExceptionGroup):
            # Its members' tracebacks nest: traceback's own layout.
            return "".join(traceback.format_exception(type(exc), exc, tb, limit=limit))
        seen.add(id(current))
        chain.append((current, tb if current is exc else current.__traceback__))
        if current.__cause__ is not None:
            current, joiner = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, joiner = current.__context__, _CONTEXT
        else:
            break
        joiners.append(joiner)
    out: list[str] = []
    for i in range(len(chain) - 1, -1, -1):
        one, one_tb = chain[i]
        if one_tb is not None:
            out.append("Traceback (most recent call last):\n")
            out.extend(traceback.StackSummary.extract(traceback.walk_tb(one_tb), limit=limit).format())
        out.extend(_exception_only(one))
        if i:
            out.append(joiners[i - 1])
    return "".join(out)


def _exception_only(exc: BaseException) -> list[str]:
    """``traceback.format_exception_only`` of one link of a chain, without
    following the rest of it: in 3.11-3.13 that builds the whole chain's
    tracebacks (every frame of every link, unlimited) for each link it is
    asked of. ``_seen`` (traceback's own, private) marks it a link."""
    try:
        te = traceback.TracebackException(type(exc), exc, None, lookup_lines=False,
                                          _seen={id(exc)})  # type: ignore[call-arg]
    except TypeError:  # a Python without it
        return traceback.format_exception_only(type(exc), exc)
    return list(te.format_exception_only())


def _user_frames(tb: Any) -> Any:
    """Skip the serving frames at the top (the instance's loop, the call
    gate): a remote traceback starts in the compartment's own code."""
    start = tb
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return tb if tb is not None else start


def rebuild_exception(info: ErrorInfo, where: str, allow_exit: bool = False,
                      resolve: Callable[[str], type[BaseException] | None] | None = None,
                      ) -> BaseException:
    """Turn an ``ErrorInfo`` from ``where`` (a compartment name) into the
    exception to raise in the caller. Never raises: whatever the far side
    sent, the result is an allowed builtin, a control exception if
    ``allow_exit``, a class ``resolve`` finds among the receiver's own
    (never importing anything), one of pycompart's own errors, or
    ``RemoteError``."""
    cls: Any = ALLOWED_EXCEPTIONS.get(info.type_name) or _OWN_EXCEPTIONS.get(info.type_name)
    if cls is None and allow_exit:
        cls = CONTROL_EXCEPTIONS.get(info.type_name)
    exc: BaseException | None = None
    if cls is None and resolve is not None:
        found = resolve(info.type_name)
        if found is not None:
            exc = build_without_init(found, info)
    if cls is not None:
        attrs = {k: plain(v) for k, v in info.attributes.items()}
        candidates: list[tuple[Any, ...]] = []
        if issubclass(cls, OSError) and isinstance(attrs.get("errno"), int):
            # The constructor picks the subclass from errno as Python does;
            # keep the sender's type when it is a narrower one.
            fields: tuple[Any, ...] = (attrs["errno"], attrs.get("strerror"))
            if attrs.get("filename2") is not None:
                fields += (attrs.get("filename"), None, attrs["filename2"])
            elif attrs.get("filename") is not None:
                fields += (attrs["filename"],)
            candidates.append(fields)
        if info.args:
            candidates.append(tuple(plain(a) for a in info.args))
        elif not info.message:
            candidates.append(())  # ValueError() stays without arguments
        candidates.append((info.message,))
        for ctor_args in candidates:
            try:
                exc = cls(*ctor_args)
            except Exception:
                continue
            if not isinstance(exc, cls):
                exc = None
                continue
            break
        if exc is None and info.type_name in _OWN_EXCEPTIONS:
            exc = build_without_init(cls, info)  # CompartmentCrashed(compartment, pid, status)
        if exc is not None:
            for key, value in attrs.items():
                if key not in _RESERVED and key.isidentifier() and not key.startswith("_"):
                    try:
                        setattr(exc, key, value)
                    except Exception:  # a read-only or typed slot: the far side lied
                        pass
    if exc is None:
        kin = _kin_class(info)
        if kin is None:
            exc = RemoteError(info.type_name, info.message, info.traceback)
        else:
            args = tuple(plain(a) for a in info.args) if info.args else (info.message,)
            exc = kin.__new__(kin, *args)
            BaseException.__init__(exc, *args)
            exc.type_name, exc.message, exc.remote_traceback = info.type_name, info.message, info.traceback
    if isinstance(exc, errors.PycompartError) and not isinstance(exc, errors.RemoteError) \
            and where != "main":
        # One of pycompart's own, by whatever name it came (``resolve`` finds
        # ``pycompart.errors.CompartmentCrashed`` too): its word, not ours,
        # which may name another compartment that never crashed.
        exc.args = (f"{exc} (reported by compartment {where!r})",)
        exc.reported_by = where  # type: ignore[attr-defined]
    attach_traceback(exc, info, where)
    return exc


#: ``_kin_class``'s classes, by type name and builtin bases (bounded: a peer
#: naming ever new types gets plain ``RemoteError`` past it).
_KIN: dict[tuple[str, tuple[type, ...]], type[RemoteError]] = {}
MAX_KIN = 256


def _kin_str(self: RemoteError) -> str:
    return self.message


def _kin_class(info: ErrorInfo) -> type[RemoteError] | None:
    """For a class the receiver does not have (``json.JSONDecodeError``
    with no ``json`` imported here): a ``RemoteError`` of its name that also
    derives from the builtin exceptions among its bases, so that ``except
    ValueError`` catches it as it would unboxed. None if it has none. The
    names are only looked up among the builtins."""
    bases: list[type] = []
    for name in info.mro[1:32]:
        builtin = ALLOWED_EXCEPTIONS.get(name) if type(name) is str else None
        if builtin is not None and builtin is not Exception and not any(issubclass(b, builtin) for b in bases):
            bases.append(builtin)
    if not bases or type(info.type_name) is not str:
        return None
    key = (info.type_name[:200], tuple(bases))
    cls = _KIN.get(key)
    if cls is not None:
        return cls
    if len(_KIN) >= MAX_KIN:
        return None
    module, _, qualname = key[0].rpartition(".")
    ns = {"__module__": module, "__qualname__": qualname, "__str__": _kin_str}
    for candidate in (tuple(bases), tuple(bases[:1])):
        try:
            cls = type(qualname.rpartition(".")[2] or "RemoteError", (RemoteError, *candidate), ns)
            cls.__new__(cls)  # (some builtin bases combine into a class that cannot be made)
            break
        except (TypeError, ValueError):  # incompatible builtin layouts (OSError's), a bad name
            cls = None
    if cls is None:
        return None
    _KIN[key] = cls
    return cls


def is_runpy(filename: str) -> bool:
    """Whether ``filename`` is runpy's own (frozen in 3.11: its frames name
    no file)."""
    if filename == "<frozen runpy>":
        return True
    import runpy

    return os.path.abspath(filename) == os.path.abspath(runpy.__file__)


def raised_by_runpy(exc: BaseException) -> bool:
    """Whether runpy itself raised ``exc`` (the module to run was not
    found), not the module's own code while it ran."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and is_runpy(tb.tb_frame.f_code.co_filename)


def attach_traceback(exc: BaseException, info: ErrorInfo, where: str) -> None:
    """The far side's traceback, as the ``__cause__`` of the exception
    raised here (so both sides show), unless it was raised ``from None``
    there; always as ``exc.remote_traceback``."""
    tb = info.traceback or f"{info.type_name}: {info.message}\n"
    if info.suppress:
        exc.__cause__ = None
        exc.__suppress_context__ = True
    else:
        exc.__cause__ = RemoteTraceback(f'"""\nTraceback from compartment {where!r}:\n{tb}"""')
    try:
        exc.remote_traceback = tb  # type: ignore[attr-defined]
        exc.remote_compartment = where  # type: ignore[attr-defined]
    except AttributeError:  # a class with __slots__
        pass


def build_without_init(cls: type[BaseException], info: ErrorInfo) -> BaseException | None:
    """An instance of ``cls`` (a class of the receiver's own) for ``info``
    without running any of the class's own code: the ``__new__`` and
    ``__init__`` of its builtin base, then the simple attributes the far
    side reported. None if that is not possible."""
    base = next((c for c in cls.__mro__ if c.__module__ == "builtins"), None)
    if base is None or not issubclass(base, BaseException):
        return None
    args = tuple(plain(a) for a in info.args) if info.args else (info.message,)
    try:
        exc = base.__new__(cls, *args)  # type: ignore[call-overload]
        base.__init__(exc, *args)
    except Exception:
        return None
    state = getattr(exc, "__dict__", None)
    for key, value in info.attributes.items():
        if key.isidentifier() and not key.startswith("_") and key not in _RESERVED \
                and state is not None and not any(key in c.__dict__ for c in cls.__mro__):
            state[key] = plain(value)  # into the instance: no setter of the class runs
    return exc
