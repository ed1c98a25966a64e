"""The call gate: what may cross a compartment boundary, and in what shape.

An entrypoint's annotations are its contract. ``Contract`` turns a function's
signature into msgspec codecs:

* arguments travel as a msgpack map ``{parameter: value}`` and are decoded by
  the *callee* into a Struct built from the parameter annotations, so an
  instance never runs user code on arguments of the wrong type;
* the return value is decoded by the *caller* into the return annotation, so
  the trusted side never receives a value the contract does not allow
  (RLBox's tainted values, with the type checker of the wire as the check).

Exceptions cross as descriptions (``ErrorInfo``). Only the builtin types on
``ALLOWED_EXCEPTIONS`` are rebuilt; anything else becomes ``RemoteError``. No
class named by the far side is ever imported.
"""

from __future__ import annotations

import builtins
import inspect
import os
import traceback
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from . import errors
from .errors import EntrypointError, ProtocolError, RemoteError, RemoteTraceback
from .protocol import ErrorInfo

_encoder = msgspec.msgpack.Encoder()

MAX_ERROR_TEXT = 64 * 1024

#: Builtin exceptions that arrive as themselves. BaseExceptions such as
#: SystemExit/KeyboardInterrupt are deliberately absent: a compartment must not
#: be able to make ``main`` exit. StopIteration is absent because raising it
#: into a caller's generator changes control flow.
ALLOWED_EXCEPTIONS: dict[str, type[Exception]] = {
    name: getattr(builtins, name)
    for name in (
        "Exception ArithmeticError AssertionError AttributeError BufferError EOFError "
        "FloatingPointError ImportError ModuleNotFoundError IndexError KeyError LookupError "
        "MemoryError NameError NotImplementedError OSError BlockingIOError ChildProcessError "
        "ConnectionError BrokenPipeError ConnectionAbortedError ConnectionRefusedError "
        "ConnectionResetError FileExistsError FileNotFoundError InterruptedError "
        "IsADirectoryError NotADirectoryError PermissionError ProcessLookupError TimeoutError "
        "OverflowError RecursionError ReferenceError RuntimeError TypeError UnboundLocalError "
        "UnicodeError UnicodeDecodeError UnicodeEncodeError ValueError ZeroDivisionError"
    ).split()
}

#: pycompart's own errors that an instance may report (for example a reply
#: that was too large to send).
_OWN_EXCEPTIONS: dict[str, type[Exception]] = {
    "pycompart.ProtocolError": errors.ProtocolError,
    "pycompart.EntrypointError": errors.EntrypointError,
}

_SIMPLE = (str, int, float, bool, type(None))
_EMPTY_MAP = _encoder.encode({})


def function_key(fn: Callable[..., Any]) -> str:
    """``module:qualname``, the name an entrypoint is known by on the wire."""
    return f"{fn.__module__}:{fn.__qualname__}"


def describe_exception(exc: BaseException) -> ErrorInfo:
    cls = type(exc)
    name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    if isinstance(exc, errors.PycompartError) and cls.__module__.startswith("pycompart"):
        name = f"pycompart.{cls.__qualname__}"
    args = list(exc.args) if all(isinstance(a, _SIMPLE) for a in exc.args) else []
    try:
        message = str(exc)
    except Exception:  # a hostile __str__ must not break error reporting
        message = "<unprintable>"
    tb = "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))
    mro = [c.__qualname__ if c.__module__ == "builtins" else f"{c.__module__}.{c.__qualname__}"
           for c in cls.__mro__[:32]]
    attributes = {}
    for key, value in list(getattr(exc, "__dict__", {}).items())[:64]:
        if isinstance(key, str) and key.isidentifier() and not key.startswith("_") \
                and isinstance(value, _SIMPLE) and len(attributes) < 32:
            attributes[key[:100]] = value[:4096] if isinstance(value, str) else value
    return ErrorInfo(name[:200], message[:MAX_ERROR_TEXT], args[:16], tb[-MAX_ERROR_TEXT:],
                     [m[:200] for m in mro], attributes)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_frames(tb: Any) -> Any:
    """Skip the serving frames at the top (the instance's loop, the call
    gate): a remote traceback starts in the compartment's own code."""
    start = tb
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return tb if tb is not None else start


def rebuild_exception(info: ErrorInfo, where: str) -> Exception:
    """Turn an ``ErrorInfo`` from ``where`` (a compartment name) into the
    exception to raise in the caller."""
    cls = ALLOWED_EXCEPTIONS.get(info.type_name) or _OWN_EXCEPTIONS.get(info.type_name)
    exc: Exception | None = None
    if cls is not None:
        for ctor_args in ((tuple(info.args), (info.message,)) if info.args else ((info.message,),)):
            try:
                exc = cls(*ctor_args)
                break
            except Exception:
                continue
    if exc is None:
        exc = RemoteError(info.type_name, info.message, info.traceback)
    tb = info.traceback or f"{info.type_name}: {info.message}\n"
    exc.__cause__ = RemoteTraceback(f'"""\nTraceback from compartment {where!r}:\n{tb}"""')
    exc.remote_traceback = tb  # type: ignore[attr-defined]
    exc.remote_compartment = where  # type: ignore[attr-defined]
    return exc


class Contract:
    """The typed interface of one entrypoint, shared by both ends of a call."""

    def __init__(self, fn: Callable[..., Any], key: str | None = None):
        self.key = key or function_key(fn)
        self.fn = fn
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise EntrypointError(f"{self.key}: cannot read its signature: {exc}") from None
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
        except Exception as exc:
            raise EntrypointError(f"{self.key}: cannot resolve its annotations: {exc}") from None
        self.params = list(sig.parameters.values())
        self._positional = [p.name for p in self.params
                            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._posonly = {p.name for p in self.params if p.kind is p.POSITIONAL_ONLY}
        self._keyword = {p.name for p in self.params
                         if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self._required = {p.name for p in self.params
                          if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        self._varargs = next((p.name for p in self.params if p.kind is p.VAR_POSITIONAL), None)
        self._varkw = next((p.name for p in self.params if p.kind is p.VAR_KEYWORD), None)

        fields: list[tuple[Any, ...]] = []
        for p in self.params:
            ann = hints.get(p.name, Any)
            if p.kind is p.VAR_POSITIONAL:
                fields.append((p.name, tuple[ann, ...], ()))  # type: ignore[valid-type]
            elif p.kind is p.VAR_KEYWORD:
                fields.append((p.name, dict[str, ann], {}))  # type: ignore[valid-type]
            elif p.default is p.empty:
                fields.append((p.name, ann))
            else:
                # The callee's own default applies; UNSET means "not passed".
                fields.append((p.name, typing.Union[ann, msgspec.UnsetType], msgspec.UNSET))
        self.return_type = hints.get("return", Any)
        try:
            args_struct = msgspec.defstruct(
                "Args", fields, forbid_unknown_fields=True, module=__name__)
            self._args_decoder = msgspec.msgpack.Decoder(args_struct)
            self._result_decoder = msgspec.msgpack.Decoder(self.return_type)
        except (TypeError, ValueError) as exc:
            raise EntrypointError(
                f"{self.key}: its annotations cannot be carried across a compartment "
                f"boundary: {exc}") from None

    # -- caller side ----------------------------------------------------------

    def encode_args(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        if not args and not kwargs and not self._required:
            return _EMPTY_MAP
        bound: dict[str, Any] = {}
        positional = self._positional
        if len(args) > len(positional):
            if self._varargs is None:
                raise TypeError(f"{self.key}() takes {len(positional)} positional arguments "
                                f"but {len(args)} were given")
            bound[self._varargs] = args[len(positional):]
            args = args[:len(positional)]
        for name, value in zip(positional, args):
            bound[name] = value
        if kwargs:
            extra: dict[str, Any] = {}
            for name, value in kwargs.items():
                if name in self._keyword:
                    if name in bound:
                        raise TypeError(f"{self.key}() got multiple values for argument {name!r}")
                    bound[name] = value
                elif self._varkw is not None and name not in self._posonly:
                    extra[name] = value
                else:
                    raise TypeError(f"{self.key}() got an unexpected keyword argument {name!r}")
            if extra:
                bound[self._varkw] = extra  # type: ignore[index]
        if len(bound) < len(self._required) or not self._required.issubset(bound):
            missing = sorted(self._required - bound.keys())
            raise TypeError(f"{self.key}() missing required arguments: {', '.join(missing)}")
        try:
            return _encoder.encode(bound)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"{self.key}(): an argument cannot cross a compartment boundary: "
                            f"{exc}") from None

    def decode_result(self, raw: bytes | msgspec.Raw, where: str) -> Any:
        try:
            return self._result_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ProtocolError(
                f"compartment {where!r} returned a value that does not match the declared "
                f"return type of {self.key} ({_type_name(self.return_type)}): {exc}") from None

    # -- callee side ----------------------------------------------------------

    def invoke(self, raw_args: bytes | msgspec.Raw) -> bytes:
        """Decode arguments (raising TypeError if they break the contract),
        call the function, encode its result."""
        if not self.params and len(raw_args) == 1 and bytes(raw_args) == _EMPTY_MAP:
            return _encoder.encode(self.fn())  # no parameters, no arguments: skip the decoder
        try:
            decoded = self._args_decoder.decode(raw_args)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise TypeError(f"{self.key}(): arguments do not match its annotations: {exc}") from None
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        # Parameters before *args must go positionally when *args is non-empty.
        positional = bool(self._varargs and getattr(decoded, self._varargs))
        for p in self.params:
            value = getattr(decoded, p.name)
            if value is msgspec.UNSET:
                continue
            kind = p.kind
            if kind is p.POSITIONAL_ONLY or (kind is p.POSITIONAL_OR_KEYWORD and positional):
                args.append(value)
            elif kind is p.VAR_POSITIONAL:
                args.extend(value)
            elif kind is p.VAR_KEYWORD:
                kwargs.update(value)
            else:
                kwargs[p.name] = value
        result = self.fn(*args, **kwargs)
        return self.encode_result(result)

    def encode_result(self, result: Any) -> bytes:
        try:
            return _encoder.encode(result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"{self.key}: its return value cannot cross a compartment boundary: "
                            f"{exc}") from None


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")
