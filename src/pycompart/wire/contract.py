"""The typed call gate: an entrypoint's annotations as msgspec codecs.

An entrypoint's annotations are its contract. ``Contract`` turns a function's
signature into msgspec codecs:

* arguments travel as a msgpack map ``{parameter: value}`` and are decoded by
  the *callee* into a Struct built from the parameter annotations, so an
  instance never runs user code on arguments of the wrong type;
* the return value is decoded by the *caller* into the return annotation, so
  the trusted side never receives a value the contract does not allow
  (RLBox's tainted values, with the type checker of the wire as the check).

Exceptions cross as descriptions (``pycompart.wire.exceptions``). A large
``bytes``-like top-level argument or result may travel beside the frame
(``BulkPayload``, ``pycompart.transport.bulk``); the receiver then decodes the
rest generically and converts it, with the same strict checks, to the same types.
"""

from __future__ import annotations

import io
import socket
import types
import typing
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import EntrypointError, ProtocolError
from . import budget, refs


def _enc_hook(obj: Any) -> Any:
    """Descriptors (``pycompart.Fd``, sockets, files) as values, when the
    channel carries them (``refs.descriptor_ext``)."""
    tp = type(obj)
    if tp is refs.Fd or tp is refs.Handover or issubclass(tp, (socket.socket, io.IOBase)):
        ext = refs.descriptor_ext(obj, tp)
        if ext is not None:
            return ext
    raise TypeError(f"Encoding objects of type {tp.__name__} is unsupported")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == refs.EXT_FD:
        return refs.descriptor_from(msgspec.msgpack.decode(data))
    raise TypeError(f"unexpected extension type {code}")


def _dec_hook(tp: Any, obj: Any) -> Any:
    if isinstance(tp, type) and isinstance(obj, tp) and (
            tp is refs.Fd or issubclass(tp, (socket.socket, io.IOBase))):
        return obj
    raise TypeError(f"expected {getattr(tp, '__name__', tp)}, got {type(obj).__name__}")


def _foreign_classes(types: tuple[Any, ...]) -> list[type]:
    """The classes in annotations ``types`` that msgspec would take only
    with a hook (anything but descriptors: an error at the call, not now)."""
    import msgspec.inspect as mi

    found: list[type] = []
    seen: set[int] = set()

    def walk(t: Any) -> None:
        if id(t) in seen:
            return
        seen.add(id(t))
        if isinstance(t, mi.CustomType):
            cls = t.cls
            if not (cls is refs.Fd or cls is refs.Handover or issubclass(cls, (socket.socket, io.IOBase))):
                found.append(cls)
            return
        for name in getattr(t, "__struct_fields__", ()):
            value = getattr(t, name)
            for item in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(item, (mi.Type, mi.Field)):
                    walk(item)

    for info in mi.multi_type_info(types):
        walk(info)
    return found


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_EMPTY_MAP = _encoder.encode({})
_plain_args = msgspec.msgpack.Decoder(dict[str, Any], ext_hook=_ext_hook)

#: Smallest value sent beside the frame (``pycompart.transport.bulk``):
#: smaller ones are cheaper inline.
BULK_MIN = 256 * 1024
_BULK_TYPES = (bytes, bytearray, memoryview)


class BulkPayload:
    """An encoded message whose large values are placeholders (``EXT_BULK``
    with their index in ``buffers``), for a channel with bulk lanes;
    ``inline()`` encodes it whole instead, for any other channel or a busy
    lane."""

    __slots__ = ("payload", "buffers", "_inline")

    def __init__(self, payload: bytes, buffers: list[memoryview], inline: Callable[[], bytes]):
        self.payload = payload
        self.buffers = buffers
        self._inline = inline

    def inline(self) -> bytes:
        return self._inline()

    def __len__(self) -> int:
        return len(self.payload) + sum(b.nbytes for b in self.buffers)


def _bulk_view(value: Any) -> memoryview | None:
    """``value`` as a byte view if it is big enough to go beside the frame."""
    if value.__class__ not in _BULK_TYPES or len(value) < BULK_MIN // 8:
        return None
    view = memoryview(value)
    if view.nbytes < BULK_MIN or not view.c_contiguous:
        return None
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _bulk_decoder(bulk: list[bytes]) -> msgspec.msgpack.Decoder:  # type: ignore[type-arg]
    def hook(code: int, data: memoryview) -> Any:
        if code == refs.EXT_BULK:
            index = msgspec.msgpack.decode(data)
            if type(index) is not int or not 0 <= index < len(bulk):
                raise TypeError(f"bulk value {index!r} did not come with the frame")
            return bulk[index]
        return _ext_hook(code, data)
    return msgspec.msgpack.Decoder(ext_hook=hook)


def decode_with_bulk(raw: bytes | msgspec.Raw, bulk: list[bytes], tp: Any) -> Any:
    """Decode ``raw`` whose placeholders name ``bulk``'s values, then
    convert it to ``tp`` as strictly as decoding into ``tp`` would."""
    plain = _bulk_decoder(bulk).decode(raw)
    # msgpack has bytes of its own: a string is never taken for base64 bytes.
    return msgspec.convert(plain, tp, dec_hook=_dec_hook, strict=True, builtin_types=_BULK_TYPES)


def function_key(fn: Callable[..., Any]) -> str:
    """``module:qualname``, the name an entrypoint is known by on the wire.
    An instance runs main's script as ``__mp_main__`` (as multiprocessing
    does): its functions keep their ``__main__`` name."""
    module = fn.__module__
    return f"{'__main__' if module == '__mp_main__' else module}:{fn.__qualname__}"


# -- hash floods ---------------------------------------------------------------------
# A set, or a dict's keys, of tuples or frozen Structs is built by msgspec, in
# C, holding the GIL: keys that all share a hash (tuple and Struct hashes are
# the same in every process, and easy to collide) make that quadratic (20,000
# tuples: 3.7 s). Where an annotation holds such a set or dict, the value is
# first decoded untyped, and those keys are hashed one by one (linear)
# before msgspec builds the table (``refs.MAX_SHARED_HASHES``).

_SET_ORIGINS = (set, frozenset)
_DICT_ORIGINS = (dict,)
_UNION_ORIGINS = (typing.Union, types.UnionType)


def _strip(ann: Any) -> Any:
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def _struct_fields(ann: Any) -> list[tuple[str, Any]] | None:
    """``(name, annotation)`` of a Struct's or dataclass's fields, else None."""
    if isinstance(ann, type) and issubclass(ann, msgspec.Struct):
        return [(f.encode_name, f.type) for f in msgspec.structs.fields(ann)]
    import dataclasses

    if isinstance(ann, type) and dataclasses.is_dataclass(ann):
        hints = typing.get_type_hints(ann)
        return [(f.name, hints.get(f.name, Any)) for f in dataclasses.fields(ann)]
    return None


def _collidable(ann: Any) -> bool:
    """Whether values of ``ann`` have hashes an attacker can collide."""
    ann = _strip(ann)
    origin = typing.get_origin(ann) or ann
    if origin in _UNION_ORIGINS:
        return any(_collidable(a) for a in typing.get_args(ann))
    return origin in (tuple, frozenset) or (isinstance(ann, type) and issubclass(ann, tuple)) \
        or _struct_fields(ann) is not None


def _may_flood(ann: Any, seen: set[int] | None = None) -> bool:
    """Whether decoding ``ann`` may build a set or dict of collidable keys."""
    seen = set() if seen is None else seen
    ann = _strip(ann)
    if id(ann) in seen:
        return False
    seen.add(id(ann))
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in _SET_ORIGINS:
        return bool(args) and (_collidable(args[0]) or _may_flood(args[0], seen))
    if origin in _DICT_ORIGINS:
        if len(args) == 2 and _collidable(args[0]):
            # msgspec would hash the keys as it reads the map, before any
            # check of ours could count them.
            raise TypeError(f"a dict keyed by {_type_name(args[0])} (keys whose hashes the far "
                            "side could make collide); use a list of pairs")
        return len(args) == 2 and _may_flood(args[1], seen)
    if args:
        return any(_may_flood(a, seen) for a in args if a is not Ellipsis)
    fields = _struct_fields(ann)
    return fields is not None and any(_may_flood(t, seen) for _, t in fields)


def _check_spread(value: Any, ann: Any, depth: int = 0) -> None:
    """Raise ProtocolError if ``value`` (decoded untyped) holds, where
    ``ann`` would build a set or dict, more keys of one hash than
    ``refs.MAX_SHARED_HASHES``; each such key is converted to its type
    (exact hashes: a frozen Struct hashes unlike a tuple)."""
    if depth > 64:
        return
    ann = _strip(ann)
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in _SET_ORIGINS and type(value) is list and args:
        if len(value) > refs.MAX_SHARED_HASHES and _collidable(args[0]):
            _spread_keys(value, args[0])
        for item in value:
            _check_spread(item, args[0], depth + 1)
    elif origin in _DICT_ORIGINS and type(value) is dict and len(args) == 2:
        # (Keys that could collide are refused at declaration: ``_may_flood``.)
        for item in value.values():
            _check_spread(item, args[1], depth + 1)
    elif origin in _UNION_ORIGINS:
        for arm in args:
            _check_spread(value, arm, depth + 1)
    elif args and type(value) is list:
        if origin is tuple and Ellipsis not in args:
            for item, arm in zip(value, args):
                _check_spread(item, arm, depth + 1)
        else:
            for item in value:
                _check_spread(item, args[0], depth + 1)
    else:
        fields = _struct_fields(ann)
        if fields is None:
            return
        if type(value) is dict:
            for name, arm in fields:
                if name in value:
                    _check_spread(value[name], arm, depth + 1)
        elif type(value) is list:
            for item, (_, arm) in zip(value, fields):
                _check_spread(item, arm, depth + 1)


def _spread_keys(raw: list[Any], ann: Any) -> None:
    try:
        keys = [msgspec.convert(k, ann, dec_hook=_dec_hook) for k in raw]
    except (msgspec.ValidationError, TypeError, ValueError):
        return  # not of that type: the typed decode refuses it
    refs.spread(keys)


class Contract:
    """The typed interface of one entrypoint, shared by both ends of a call."""

    def __init__(self, fn: Callable[..., Any], key: str | None = None):
        self.key = key or function_key(fn)
        self.fn = fn
        import inspect  # here: ~5 ms of start-up where no contract is built

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
            self._result_floods = _may_flood(self.return_type)
            args_flood = any(_may_flood(hints.get(p.name, Any)) for p in self.params)
        except TypeError as exc:
            raise EntrypointError(f"{self.key}: its annotations cannot be carried across a "
                                  f"compartment boundary: {exc}") from None
        try:
            args_struct = msgspec.defstruct(
                "Args", fields, forbid_unknown_fields=True, module=__name__)
            self._args_struct = args_struct
            self._args_flood = args_flood
            self._args_decoder = msgspec.msgpack.Decoder(args_struct, ext_hook=_ext_hook,
                                                         dec_hook=_dec_hook)
            self._result_decoder = msgspec.msgpack.Decoder(self.return_type, ext_hook=_ext_hook,
                                                           dec_hook=_dec_hook)
        except (TypeError, ValueError) as exc:
            raise EntrypointError(
                f"{self.key}: its annotations cannot be carried across a compartment "
                f"boundary: {exc}") from None
        foreign = _foreign_classes((args_struct, self.return_type))
        if foreign:
            raise EntrypointError(
                f"{self.key}: its annotations cannot be carried across a compartment boundary: "
                f"{', '.join(sorted({c.__qualname__ for c in foreign}))} is a class the wire does not "
                "know (annotate with a msgspec.Struct, a dataclass, a TypedDict or plain types)")

    # -- caller side ----------------------------------------------------------

    def encode_args(self, args: tuple[Any, ...], kwargs: dict[str, Any], bulk: bool = False) -> bytes:
        """The arguments, encoded; with ``bulk``, a ``BulkPayload`` when a
        top-level one is big enough to go beside the frame."""
        if not args and not kwargs and not self._required:
            return _EMPTY_MAP
        bound = self._bind(args, kwargs)
        if bulk:
            placed = bound
            views: list[memoryview] = []
            for name, value in bound.items():
                if value.__class__ in _BULK_TYPES:
                    view = _bulk_view(value)
                    if view is not None:
                        if not views:
                            placed = dict(bound)  # ``bound`` stays whole, for inline()
                        placed[name] = msgspec.msgpack.Ext(refs.EXT_BULK, _encoder.encode(len(views)))
                        views.append(view)
            if views:
                return BulkPayload(self._encode_args(placed), views,  # type: ignore[return-value]
                                   lambda: self._encode_args(bound))
        return self._encode_args(bound)

    def _encode_args(self, bound: dict[str, Any]) -> bytes:
        try:
            return _encoder.encode(bound)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"{self.key}(): an argument cannot cross a compartment boundary: "
                            f"{exc}") from None

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments by parameter name, as the function would bind them."""
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
        return bound

    def decode_result(self, raw: bytes | msgspec.Raw, where: str,
                      max_objects: int = budget.DEFAULT_MAX_OBJECTS, bulk: list[bytes] | None = None) -> Any:
        """The reply, validated against the return annotation; anything
        else (a value that does not fit, costs too much to build, or breaks
        the decoder itself) is a ``ProtocolError``."""
        if len(raw) > max_objects:  # smaller cannot hold more objects than bytes
            budget.check(raw, max_objects, f"the reply of {where!r} to {self.key}")
        if len(raw) > budget.KEY_CHECK_BYTES:  # (an Any in the annotation takes any map)
            budget.check_map_keys(raw, f"the reply of {where!r} to {self.key}")
        try:
            if self._result_floods:
                _check_spread(msgspec.msgpack.decode(raw, ext_hook=_ext_hook), self.return_type)
            if bulk is not None:
                return decode_with_bulk(raw, bulk, self.return_type)
            return self._result_decoder.decode(raw)
        except ProtocolError:
            raise
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ProtocolError(
                f"compartment {where!r} returned a value that does not match the declared "
                f"return type of {self.key} ({_type_name(self.return_type)}): {exc}") from None
        except Exception as exc:  # RecursionError from deep nesting, and the like
            raise ProtocolError(f"compartment {where!r} returned a value that cannot be decoded "
                                f"for {self.key} ({type(exc).__name__}: {exc})") from None

    # -- callee side ----------------------------------------------------------

    def invoke(self, raw_args: bytes | msgspec.Raw, bulk: list[bytes] | None = None,
               bulk_out: bool = False) -> bytes:
        """Decode arguments (raising TypeError if they break the contract),
        call the function, encode its result (``bulk``: the values that came
        beside the frame; ``bulk_out``: a big result may go beside the reply,
        as a ``BulkPayload``)."""
        if not self.params and len(raw_args) == 1 and bytes(raw_args) == _EMPTY_MAP:
            return self.encode_result(self.fn(), bulk_out)  # no parameters, no arguments: skip the decoder
        if len(raw_args) > budget.KEY_CHECK_BYTES:
            try:
                budget.check_map_keys(raw_args, f"the arguments of {self.key}")
            except ProtocolError as exc:
                raise TypeError(str(exc)) from None
        try:
            if self._args_flood:
                try:
                    _check_spread(msgspec.msgpack.decode(raw_args, ext_hook=_ext_hook), self._args_struct)
                except ProtocolError as exc:
                    raise TypeError(f"{self.key}(): {exc}") from None
            if bulk is not None:
                decoded = decode_with_bulk(raw_args, bulk, self._args_struct)
            else:
                decoded = self._args_decoder.decode(raw_args)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            decoded = self._generic(raw_args) if bulk is None else None
            if decoded is None:
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
        return self.encode_result(result, bulk_out)

    def _generic(self, raw_args: bytes | msgspec.Raw) -> Any:
        """Arguments from a caller that does not know this function's
        signature (``GENERIC_ARGS``/``GENERIC_KWARGS``: main calling a
        spec-declared function whose module it has not imported): bound here
        by the signature, then validated by the annotations like any others.
        None if they are not that."""
        try:
            data = _plain_args.decode(raw_args)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        if not data or not set(data) <= {GENERIC_ARGS, GENERIC_KWARGS}:
            return None
        args, kwargs = data.get(GENERIC_ARGS, []), data.get(GENERIC_KWARGS, {})
        if type(args) is not list or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            return None
        try:
            # Converted, not re-encoded: descriptors among them stay the ones received.
            return msgspec.convert(self._bind(tuple(args), kwargs), self._args_struct,
                                   dec_hook=_dec_hook, strict=True)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise TypeError(f"{self.key}(): arguments do not match its annotations: {exc}") from None

    def encode_result(self, result: Any, bulk: bool = False) -> bytes:
        if bulk and result.__class__ in _BULK_TYPES:
            view = _bulk_view(result)
            if view is not None:
                return BulkPayload(_encoder.encode(msgspec.msgpack.Ext(refs.EXT_BULK, _encoder.encode(0))),  # type: ignore[return-value]
                                   [view], lambda: self.encode_result(result))
        try:
            return _encoder.encode(result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"{self.key}: its return value cannot cross a compartment boundary: "
                            f"{exc}") from None


#: The parameters of a stand-in for a function whose signature the caller
#: does not know (``Contract._generic``).
GENERIC_ARGS = "__pycompart_args__"
GENERIC_KWARGS = "__pycompart_kwargs__"


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__qualname__
    return repr(tp).replace("typing.", "")
