"""Remote references: what crosses by value, what stays home, and handles.

The dynamic side of the call gate, used by module compartments (``pycompart
run``, the import hook) where there are no annotations to check against.

* **By value**: ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``,
  ``bytes``, ``bytearray``, and ``list``/``tuple``/``dict``/``set``/
  ``frozenset`` of those (exact types only, nested at most ``MAX_DEPTH``
  deep). The receiver gets a copy.
* **By name** (``EXT_PATH``): modules, classes and functions that live in a
  module placed in the compartment, reachable by ``module:qualname``. The
  receiver gets a stand-in (``pycompart.frontend.proxy``) that any instance of the
  compartment can serve, so it survives restarts.
* **By reference** (``EXT_REF``): everything else stays in the process that
  made it, in that channel's ``Exports`` table, and crosses as a handle. The
  receiver gets a proxy. Passing the proxy back sends ``EXT_YOURS`` with the
  handle, and the owner gets its own object back.

Handles are counted: the owner counts every time it sends a handle; the
receiver counts every time it receives one. When the receiver's proxy is
garbage-collected it queues ``(handle, count)``, sent with the next frame
(``protocol.Release``); the owner subtracts and forgets the object at zero.
A handle sent again while a release is in flight is therefore never lost.

Nothing here imports a module or calls a function named by the other side:
turning names into objects is the job of the side that owns them
(``pycompart.compartment.objects``), under the compartment's exposure policy.
"""

from __future__ import annotations

import builtins
import io
import itertools
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import ProtocolError, StaleReference
from . import budget

Ext = msgspec.msgpack.Ext

EXT_TUPLE = 1
EXT_SET = 2
EXT_FROZENSET = 3
EXT_BIGINT = 4
EXT_COMPLEX = 5
EXT_BYTEARRAY = 6
EXT_DICT = 7  # a dict with keys that are not plain scalars: [k, v, k, v, ...]
EXT_REF = 10  # [handle, type_key, flags, type_name]: an object of the sender's
EXT_YOURS = 11  # handle: an object of the receiver's, coming back
EXT_PATH = 12  # [module, qualname, kind, mro]: an object of the compartment, by name
EXT_END = 13  # an iterator is exhausted
EXT_METHOD = 14  # the attribute is a method of the object's type: use @callmethod

#: Nesting depth of a value sent by value.
MAX_DEPTH = 100
#: Objects one side may have exported to one peer at a time.
MAX_EXPORTS = 1_000_000
#: Types one side numbers for a peer (type keys).
MAX_TYPES = 4096

# Protocols a referenced object's type supports; the receiver's proxy class
# defines exactly these, so hasattr/callable/iter behave as they would locally.
F_CALL = 1 << 0
F_LEN = 1 << 1
F_ITER = 1 << 2
F_NEXT = 1 << 3
F_GETITEM = 1 << 4
F_SETITEM = 1 << 5
F_DELITEM = 1 << 6
F_CONTAINS = 1 << 7
F_CONTEXT = 1 << 8
F_BOOL = 1 << 9
F_EQ = 1 << 10
F_HASH = 1 << 11
F_ORDER = 1 << 12
F_STREAM = 1 << 13  # an io object: the receiver may use STREAM_METHODS/STREAM_ATTRS

#: What a compartment may do with a file object main passed it: I/O on that
#: stream, nothing else (no ``buffer``, ``raw``, ``detach``, ``fileno``).
STREAM_METHODS = frozenset({"read", "readline", "readlines", "write", "writelines", "flush",
                            "seek", "tell", "readable", "writable", "seekable"})
STREAM_ATTRS = frozenset({"name", "mode", "encoding", "closed", "newlines"})

_FLAG_SLOTS = ((F_CALL, "__call__"), (F_LEN, "__len__"), (F_ITER, "__iter__"),
               (F_NEXT, "__next__"), (F_GETITEM, "__getitem__"), (F_SETITEM, "__setitem__"),
               (F_DELITEM, "__delitem__"), (F_CONTAINS, "__contains__"), (F_BOOL, "__bool__"))

_SCALARS = frozenset({str, float, bool, type(None), bytes})
_KEY_SCALARS = frozenset({str, int, float, bool, type(None), bytes})
_encoder = msgspec.msgpack.Encoder()
_flag_cache: dict[type, int] = {}
_nesting = threading.local()
_BUILTINS_DICT = builtins.__dict__


#: Dunder attributes that are data, not machinery: reachable unless the
#: compartment's spec says otherwise.
ALWAYS_EXPOSED = frozenset({"__version__", "__doc__", "__name__", "__qualname__", "__all__",
                            "__module__"})


def exposed(name: str, expose: frozenset[str] | tuple[str, ...]) -> bool:
    return not name.startswith("_") or name in ALWAYS_EXPOSED or name in expose


def type_flags(tp: type) -> int:
    flags = _flag_cache.get(tp)
    if flags is not None:
        return flags
    flags = 0
    for bit, name in _FLAG_SLOTS:
        if _special(tp, name) is not None:
            flags |= bit
    if _special(tp, "__enter__") is not None and _special(tp, "__exit__") is not None:
        flags |= F_CONTEXT
    if _special(tp, "__eq__") is not object.__dict__["__eq__"]:
        flags |= F_EQ
        if _special(tp, "__hash__") is not None:
            flags |= F_HASH
    if _special(tp, "__lt__") is not object.__dict__["__lt__"]:
        flags |= F_ORDER
    if issubclass(tp, io.IOBase):
        flags |= F_STREAM
    if len(_flag_cache) < 4096:
        _flag_cache[tp] = flags
    return flags


def _special(tp: type, name: str) -> Any:
    """A special method as the interpreter finds it: on the type's MRO, not
    on its metaclass (every class has a ``__call__`` through ``type``)."""
    for klass in tp.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def type_name(tp: type) -> str:
    module = getattr(tp, "__module__", None)
    qualname = getattr(tp, "__qualname__", tp.__name__)
    return qualname if module in (None, "builtins") else f"{module}.{qualname}"


class Exports:
    """Our objects the peer holds references to."""

    def __init__(self, limit: int = MAX_EXPORTS):
        self.limit = limit
        self._by_handle: dict[int, list[Any]] = {}  # handle -> [object, times sent]
        self._by_id: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_handle)

    def export(self, obj: Any) -> int:
        with self._lock:
            handle = self._by_id.get(id(obj))
            if handle is None:
                if len(self._by_handle) >= self.limit:
                    raise ProtocolError(f"more than {self.limit} objects are referenced from the "
                                        "other side; it is not releasing them")
                handle = next(self._ids)
                self._by_handle[handle] = [obj, 0]
                self._by_id[id(obj)] = handle
            self._by_handle[handle][1] += 1
            return handle

    def contains(self, obj: Any) -> bool:
        handle = self._by_id.get(id(obj))
        entry = self._by_handle.get(handle) if handle is not None else None
        return entry is not None and entry[0] is obj

    def get(self, handle: Any) -> Any:
        entry = self._by_handle.get(handle) if type(handle) is int else None
        if entry is None:
            raise StaleReference(f"no object with handle {handle!r} was exported to this peer "
                                 "(released, or from an earlier instance)")
        return entry[0]

    def release(self, handle: Any, count: Any) -> bool:
        """Forget ``count`` sends of ``handle``; False if the peer made that up."""
        if type(handle) is not int or type(count) is not int or count <= 0:
            return False
        dropped = None
        with self._lock:
            entry = self._by_handle.get(handle)
            if entry is None:
                return False
            entry[1] -= count
            if entry[1] <= 0:
                del self._by_handle[handle]
                del self._by_id[id(entry[0])]
                dropped = entry  # freed outside the lock: __del__ may run
        del dropped
        return True

    def clear(self) -> None:
        with self._lock:
            entries, self._by_handle, self._by_id = self._by_handle, {}, {}
        entries.clear()


class Peer:
    """One side's state for one channel: its exports to the peer, and its
    proxies of the peer's objects.

    ``make_proxy(peer, handle, type_key, flags, type_name)`` builds a proxy;
    ``reference(peer, obj)`` turns a local non-plain value into an Ext
    (``EXT_PATH``/``EXT_YOURS``) or returns None to export it;
    ``from_path(peer, module, qualname, kind, mro)`` turns an ``EXT_PATH``
    into an object. These differ between main and an instance.
    """

    def __init__(self, compartment: str,
                 make_proxy: Callable[..., Any],
                 reference: Callable[[Peer, Any], Any],
                 from_path: Callable[..., Any],
                 exports_limit: int = MAX_EXPORTS):
        self.compartment = compartment
        self.exports = Exports(exports_limit)
        self.proxies: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._proxy_lock = threading.Lock()
        self.methods: dict[str, set[str]] = {}  # type key -> names known to be methods
        self.answers: dict[Any, bool] = {}  # (type key, class) -> isinstance, asked of the peer
        # Our types, numbered for the peer: a type key says "same type as
        # before" without showing an address of ours (bounded: past it, no key).
        self._type_numbers: dict[type, int] = {}
        self.pending_release: list[tuple[int, int]] | None = None  # set to the channel's list
        self.closed = False
        self._make_proxy = make_proxy
        self._reference = reference
        self._from_path = from_path
        self._decoder = msgspec.msgpack.Decoder(ext_hook=self._ext)
        #: Objects one decoded value may build (``pycompart.wire.budget``).
        self.max_objects = budget.DEFAULT_MAX_OBJECTS
        #: ``returned(peer, obj, handle)``: what one of our own objects that
        #: the peer sends back becomes (None: itself).
        self.returned: Callable[[Peer, Any, int], Any] | None = None

    # -- encoding -------------------------------------------------------------------

    def encode(self, value: Any) -> bytes:
        return _encoder.encode(self.to_wire(value, 0))

    def to_wire(self, value: Any, depth: int) -> Any:
        tp = type(value)
        if tp in _SCALARS:
            return value
        if tp is int:
            return value if -(2**63) <= value < 2**64 else Ext(EXT_BIGINT, str(value).encode())
        if depth > MAX_DEPTH:
            raise TypeError(f"a value nested more than {MAX_DEPTH} levels deep cannot cross "
                            "a compartment boundary")
        depth += 1
        if tp is list:
            return [self.to_wire(v, depth) for v in value] if value else value
        if tp is dict:
            if not value:
                return value
            if "__builtins__" in value or value is _BUILTINS_DICT:
                raise TypeError("a module's globals cannot be passed to another compartment")
            if all(type(k) in _KEY_SCALARS for k in value):
                return {k: self.to_wire(v, depth) for k, v in value.items()}
            flat: list[Any] = []
            for k, v in value.items():
                flat.append(self.to_wire(k, depth))
                flat.append(self.to_wire(v, depth))
            return Ext(EXT_DICT, _encoder.encode(flat))
        if tp is tuple:
            return Ext(EXT_TUPLE, _encoder.encode([self.to_wire(v, depth) for v in value]))
        if tp is set or tp is frozenset:
            return Ext(EXT_SET if tp is set else EXT_FROZENSET,
                       _encoder.encode([self.to_wire(v, depth) for v in value]))
        if tp is complex:
            return Ext(EXT_COMPLEX, _encoder.encode([value.real, value.imag]))
        if tp is bytearray:
            return Ext(EXT_BYTEARRAY, bytes(value))
        if isinstance(value, types.ModuleType) and not hasattr(value, "__pycompart_proxy__"):
            ext = self._reference(self, value)
            if ext is None:
                raise TypeError(f"module {value.__name__!r} cannot be passed to another compartment")
            return ext
        ext = self._reference(self, value)
        if ext is not None:
            return ext
        return self.export(value)

    def export(self, value: Any) -> Ext:
        handle = self.exports.export(value)
        open_requests = getattr(_nesting, "sent", None)
        if open_requests:
            open_requests[-1].add(handle)
        tp = type(value)
        return Ext(EXT_REF, _encoder.encode([handle, self.type_key(tp), type_flags(tp), type_name(tp)]))

    def type_key(self, tp: type) -> str:
        """``name#n``: the same for every object of ``tp`` sent to this
        peer, and no address (``""`` once ``MAX_TYPES`` types were numbered:
        the peer then learns nothing per type)."""
        number = self._type_numbers.get(tp)
        if number is None:
            if len(self._type_numbers) >= MAX_TYPES:
                return ""
            number = self._type_numbers[tp] = len(self._type_numbers) + 1
        return f"{type_name(tp)}#{number}"

    # -- decoding -------------------------------------------------------------------

    def decode(self, data: bytes | memoryview | msgspec.Raw) -> Any:
        if len(data) > self.max_objects:  # smaller cannot hold more objects than bytes
            budget.check(data, self.max_objects, f"a value from {self.compartment!r}")
        try:
            return self._decoder.decode(data)
        except (ProtocolError, StaleReference):
            raise
        except Exception as exc:  # DecodeError, and any shape error in an extension
            raise ProtocolError(f"{self.compartment!r}: a malformed value "
                                f"({type(exc).__name__}: {exc})") from None

    def _ext(self, code: int, data: memoryview) -> Any:
        if code == EXT_TUPLE:
            return tuple(self._list(data))
        if code == EXT_REF:
            handle, type_key, flags, tname = self._decoder.decode(data)
            if type(handle) is not int or type(flags) is not int or not isinstance(type_key, str) \
                    or not isinstance(tname, str):
                raise ProtocolError("malformed reference")
            return self.proxy(handle, type_key[:300], flags, tname[:300])
        if code == EXT_YOURS:
            handle = self._decoder.decode(data)
            obj = self.exports.get(handle)
            return obj if self.returned is None else self.returned(self, obj, handle)
        if code == EXT_PATH:
            module, qualname, kind, mro = self._decoder.decode(data)
            if not (isinstance(module, str) and isinstance(qualname, str) and isinstance(kind, str)
                    and isinstance(mro, list) and all(isinstance(m, str) for m in mro)):
                raise ProtocolError("malformed path reference")
            return self._from_path(self, module, qualname, kind, mro[:32])
        if code == EXT_DICT:
            flat = self._list(data)
            if len(flat) % 2:
                raise ProtocolError("malformed dict")
            return dict(zip(flat[::2], flat[1::2]))
        if code == EXT_SET:
            return set(self._list(data))
        if code == EXT_FROZENSET:
            return frozenset(self._list(data))
        if code == EXT_BIGINT:
            text = bytes(data)
            if len(text) > 5000:
                raise ProtocolError("integer too large")
            return int(text)
        if code == EXT_COMPLEX:
            re, im = self._decoder.decode(data)
            return complex(re, im)
        if code == EXT_BYTEARRAY:
            return bytearray(data)
        if code == EXT_END:
            return END
        if code == EXT_METHOD:
            return METHOD
        raise ProtocolError(f"unknown extension type {code}")

    def _list(self, data: memoryview) -> list[Any]:
        # Containers inside extensions re-enter the decoder: bound the depth
        # (per thread: several threads may decode at once).
        depth = getattr(_nesting, "depth", 0)
        if depth >= MAX_DEPTH:
            raise ProtocolError(f"a value nested more than {MAX_DEPTH} levels deep")
        _nesting.depth = depth + 1
        try:
            value = self._decoder.decode(data)
        finally:
            _nesting.depth = depth
        if type(value) is not list:
            raise ProtocolError("malformed container")
        return value

    # -- proxies --------------------------------------------------------------------

    def proxy(self, handle: int, type_key: str, flags: int, tname: str) -> Any:
        with self._proxy_lock:
            proxy = self.proxies.get(handle)
            if proxy is None:
                proxy = self._make_proxy(self, handle, type_key, flags, tname)
                self.proxies[handle] = proxy
            else:
                object.__setattr__(proxy, "_pc_count", proxy._pc_count + 1)
            return proxy

    def released(self, handle: int, count: int) -> None:
        """A proxy died (called from ``__del__``: no locks, no I/O)."""
        pending = self.pending_release
        if pending is not None and not self.closed:
            pending.append((handle, count))

    def close(self) -> None:
        """The channel is gone: drop our exports (the peer cannot use them)."""
        self.closed = True
        self.exports.clear()


class sending:
    """Context manager: the handles this thread exports inside it are "sent
    in this request" (``sent_in_open_requests``) until it ends. Nested
    requests stack: a callback's arguments see the enclosing call's too."""

    __slots__ = ("handles",)

    def __enter__(self) -> set[int]:
        stack = getattr(_nesting, "sent", None)
        if stack is None:
            stack = _nesting.sent = []
        self.handles: set[int] = set()
        stack.append(self.handles)
        return self.handles

    def __exit__(self, *exc: object) -> None:
        _nesting.sent.pop()


def sent_in_open_requests(handle: int) -> bool:
    """Whether this thread sent ``handle`` in a request it is still in."""
    return any(handle in handles for handles in getattr(_nesting, "sent", ()) or ())


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


END = _Marker("END")
METHOD = _Marker("METHOD")

END_EXT = Ext(EXT_END, b"")
METHOD_EXT = Ext(EXT_METHOD, b"")


def path_ext(module: str, qualname: str, kind: str, mro: list[str] | None = None) -> Ext:
    return Ext(EXT_PATH, _encoder.encode([module, qualname, kind, mro or []]))


def yours_ext(handle: int) -> Ext:
    return Ext(EXT_YOURS, _encoder.encode(handle))


def _no_references(*args: Any) -> Any:
    raise TypeError("only plain data (None, bool, numbers, str, bytes and containers of them) "
                    "can be shared")


_plain = Peer("shared data", _no_references, lambda peer, value: None, _no_references)
_plain.export = _no_references  # type: ignore[method-assign]


def encode_plain(value: Any) -> bytes:
    """Encode plain data only (shared data, copied into instances)."""
    return _plain.encode(value)


def decode_plain(data: bytes) -> Any:
    return _plain.decode(data)
