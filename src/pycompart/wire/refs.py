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
import collections
import datetime
import decimal
import io
import itertools
import os
import socket
import sys
import threading
import time
import types
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import CallTimeout, ProtocolError, StaleReference
from . import budget
from .protocol import close_fds
from .stdlib import standard_only, stdlib_import
from .protocols import (  # noqa: F401  (re-exported: the vocabulary of references)
    ALL_FLAGS, CLASS_FLAGS, END, F_CALL, F_ITER, F_NEXT, F_STREAM, MAX_BATCH, STREAM_ATTRS, STREAM_METHODS,
    F_PRIVATE, Private, Pushback, runs_alone, type_flags,
)

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
EXT_SLICE = 15  # [start, stop, step]
EXT_ELLIPSIS = 16
EXT_STD = 17  # [kind, fields]: an immutable value of the standard library (STD_VALUES)
EXT_BUILTIN = 18  # qualname: a class of builtins (str, ValueError, ...): the receiver's own
EXT_CONTAINER = 19  # [kind, ...]: a container of the standard library (CONTAINERS), by value
EXT_PUSHBACK = 20  # [handle, items]: the receiver's iterator, with items read ahead of it
EXT_FD = 21  # [index, kind, fields]: a descriptor that came with the frame (SCM_RIGHTS)
EXT_BULK = 22  # index: a bytes value that came beside the frame (transport.bulk), typed calls only
EXT_NOTIMPLEMENTED = 23  # NotImplemented: an operand's answer, for the caller to try the other's
EXT_SURROGATES = 24  # a str msgpack cannot hold (lone surrogates: os.fsdecode), as UTF-8 "surrogatepass"

#: Flags of a reference that is a class (besides its protocols): the
#: receiver builds a class stand-in, an exception class for F_EXCEPTION.
F_CLASS = 1 << 28
F_EXCEPTION = 1 << 29

#: Nesting depth of a value sent by value.
MAX_DEPTH = 100
#: Objects one side may have exported to one peer at a time.
MAX_EXPORTS = 1_000_000
#: Types one side numbers for a peer (type keys).
MAX_TYPES = 4096
#: Releases held back while replies wait to be decoded.
MAX_DEFERRED = 100_000
#: Bytes of items a peer may hand back with our iterators (``EXT_PUSHBACK``),
#: held until it releases them: what it read ahead, but its bytes, not ours.
MAX_PUSHBACK_BYTES = 16 * 1024 * 1024

_SCALARS = frozenset({str, float, bool, type(None), bytes})
_KEY_SCALARS = frozenset({str, int, float, bool, type(None), bytes})
#: The types ``Peer.to_wire`` found that only ``reference`` or ``export``
#: encode, whatever the value (``_only_by_reference``): the next value of
#: one goes there without the other checks. Bounded (it holds the types).
_BY_REFERENCE: set[type] = set()
MAX_BY_REFERENCE = 4096


#: Path references (``EXT_PATH``) a peer's decoder keeps resolved, each
#: peer its own: the peer chooses the names, so bounded in number and in
#: size (a longer one, padded with class names say, is resolved each time).
MAX_PATHS = 1024
MAX_PATH_BYTES = 512
#: What a path resolves to that stays what it is (modules, classes,
#: functions), and so may be kept (``Peer._path``).
_STAYS_PUT = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)


def plain(values: tuple[Any, ...] | list[Any]) -> bool:
    """Whether each of ``values`` crosses as itself (None, bool, float,
    str, bytes, an int of 64 bits): what ``to_wire`` returns unchanged, with
    nothing to export, describe or collect. A request of such arguments
    may skip that bookkeeping (``encode_wire``)."""
    for value in values:
        tp = type(value)
        if tp not in _SCALARS and (tp is not int or not -(2**63) <= value < 2**64):
            return False
    return True


def encode_wire(value: Any) -> bytes:
    """``Peer.encode`` of a value already in wire form: plain values (``plain``)
    and exts (a path or handle of the peer's own), in lists and dicts."""
    try:
        return _encoder.encode(value)
    except UnicodeEncodeError:
        return _encoder.encode(_without_surrogates(value))


def _without_surrogates(wire: Any) -> Any:
    """A value in wire form whose encoding failed on a str with lone
    surrogates (a file name ``os.fsdecode`` kept, pyparsing's character
    ranges): each such str as an ``EXT_SURROGATES``, a dict with such a key
    as an ``EXT_DICT``. Rare, so only tried once the plain encoding failed."""
    tp = type(wire)
    if tp is str:
        try:
            wire.encode()
            return wire
        except UnicodeEncodeError:
            return Ext(EXT_SURROGATES, wire.encode("utf-8", "surrogatepass"))
    if tp is list:
        return [_without_surrogates(v) for v in wire]
    if tp is dict:
        fixed = [(_without_surrogates(k), _without_surrogates(v)) for k, v in wire.items()]
        if any(type(k) is Ext for k, _ in fixed):
            return Ext(EXT_DICT, encode_wire([x for kv in fixed for x in kv]))
        return dict(fixed)
    return wire


def _only_by_reference(tp: type) -> bool:
    """Whether no value of ``tp`` is one of ``to_wire``'s other kinds:
    those decided by type alone were ruled out on the way to its last
    lines; this rules out those decided by the value too."""
    return not (tp is type or tp is type(END) or issubclass(tp, (types.ModuleType, socket.socket, io.IOBase))
                or tp is Fd or tp is Handover or _std_encoder(tp) is not None)

_encoder = msgspec.msgpack.Encoder()
_nesting = threading.local()
_BUILTINS_DICT = builtins.__dict__


#: Dunder attributes that are data, not machinery: reachable unless the
#: compartment's spec says otherwise.
ALWAYS_EXPOSED = frozenset({"__version__", "__doc__", "__name__", "__qualname__", "__all__",
                            "__module__"})


#: In an ``expose`` set: every name (a ``sandbox`` compartment's default).
EXPOSE_ALL = "*"


def exposed(name: str, expose: frozenset[str] | tuple[str, ...]) -> bool:
    return not name.startswith("_") or name in ALWAYS_EXPOSED or name in expose \
        or EXPOSE_ALL in expose


def type_name(tp: type) -> str:
    module = getattr(tp, "__module__", None)
    qualname = getattr(tp, "__qualname__", tp.__name__)
    return qualname if module in (None, "builtins") else f"{module}.{qualname}"


class Lent:
    """An object lent to the peer *weakly* (``Lent(weakref.ref(obj))``):
    the export table does not keep it alive. Once it is gone, the peer's
    references to it are stale."""

    __slots__ = ("ref", "key")

    def __init__(self, ref: Any, key: int | None = None):
        self.ref = ref
        self.key = key  # id() of the object, once exported: forgotten with it


#: Descriptors one message may carry (the frame layer's bound).
MAX_FDS = 16

_fd_context = threading.local()
_decoding = threading.local()


def decode_deadline() -> float | None:
    """The ``time.monotonic()`` by which the decode this thread is in must
    end (``Peer.decode_timeout``): a round trip it makes (a hash, an
    equality test) waits no longer. None: no bound."""
    return getattr(_decoding, "deadline", None)


class Fd:
    """A bare file descriptor as a value: ``pycompart.Fd(os.open(...))``.
    Passed to or returned from a compartment over a channel that carries
    descriptors (``descriptors = true``), the receiver gets a descriptor of
    its own for the same open file (SCM_RIGHTS); the receiver's is
    close-on-exec. An ``Fd`` owns its descriptor, as a socket or file
    object does: it is closed with ``close()``, at the end of a ``with``, or
    when the ``Fd`` is garbage-collected; ``detach()`` takes it back."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        if type(fd) is not int or fd < 0:
            raise ValueError("a file descriptor (a non-negative int)")
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def detach(self) -> int:
        """The descriptor, which the caller now owns."""
        fd, self.fd = self.fd, -1
        return fd

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    def __enter__(self) -> Fd:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Fd({self.fd})"


class receiving:
    """Decodes on this thread may use ``fds`` (the descriptors that came
    with the message); those no value named are closed at the end."""

    def __init__(self, fds: list[int]):
        self.fds = list(fds)

    def __enter__(self) -> receiving:
        self.previous = getattr(_fd_context, "incoming", None)
        _fd_context.incoming = self.fds
        return self

    def __exit__(self, *exc: Any) -> None:
        _fd_context.incoming = self.previous
        close_fds(fd for fd in self.fds if fd is not None)


class Handover:
    """``handover(sock)``: the socket (or ``Fd``) is given away: it crosses
    as a value and the sender's own is closed once the message is sent (a
    broker hands a connection to a handler: when the handler closes it, the
    peer sees the end)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any):
        self.obj = obj


def handover(obj: Any) -> Handover:
    return Handover(obj)


def take_outgoing_fds() -> list[int]:
    """The descriptors the last ``Peer.encode`` on this thread collected."""
    out = getattr(_fd_context, "out", None)
    _fd_context.out = None
    return out or []


_FILE_MODES = frozenset({"r", "rb", "w", "wb", "a", "ab", "r+", "rb+", "r+b", "w+", "wb+", "w+b",
                         "a+", "ab+", "a+b", "x", "xb", "x+", "xb+"})


def descriptor_from(fields: Any) -> Any:
    incoming = getattr(_fd_context, "incoming", None)
    if type(fields) is not list or len(fields) != 3 or type(fields[0]) is not int \
            or type(fields[2]) is not list:
        raise ProtocolError("malformed descriptor")
    index, kind, args = fields
    if incoming is None or not 0 <= index < len(incoming) or incoming[index] is None:
        raise ProtocolError("a value names a descriptor that did not come with it")
    fd, incoming[index] = incoming[index], None
    try:
        if kind == "fd" and not args:
            return Fd(fd)
        if kind == "socket" and len(args) == 3 and all(type(a) is int for a in args):
            sock = socket.socket(fileno=fd)  # the kernel's word on what it is, not the sender's
            if sock.type != socket.SOCK_STREAM:
                sock.detach()
                raise ValueError("only stream sockets cross as values")
            return sock
        if kind == "file" and len(args) == 3 and args[0] in _FILE_MODES and type(args[1]) is bool:
            mode = args[0].replace("b", "")
            if args[1]:
                encoding = args[2] if type(args[2]) is str and len(args[2]) < 64 else None
                return open(fd, mode, encoding=encoding)  # noqa: SIM115 (the receiver's to close)
            return open(fd, mode + "b")  # noqa: SIM115
    except Exception as exc:  # OverflowError, TypeError: whatever the claim breaks
        os.close(fd)
        raise ProtocolError(f"a descriptor that cannot be what it claims: "
                            f"{type(exc).__name__}: {exc}") from None
    os.close(fd)
    raise ProtocolError("malformed descriptor")


class AsReference:
    """``obj`` sent as a reference whatever its type would say: a list read
    from an attribute (shared state), a twin (itself, not main's instance).
    ``private``: a generator a call returns that nobody but the reply holds
    and that ``runs_alone``, which the peer batches from the start."""

    __slots__ = ("obj", "private")

    def __init__(self, obj: Any, private: bool = False):
        self.obj = obj
        self.private = private


class Pinned:
    """A lent object the peer asked us to keep alive for now (its twin is
    held by the peer's code: ``Exports.pin``)."""

    __slots__ = ("obj", "lent")

    def __init__(self, obj: Any, lent: Lent):
        self.obj = obj
        self.lent = lent


class Exports:
    """Our objects the peer holds references to."""

    def __init__(self, limit: int = MAX_EXPORTS):
        self.limit = limit
        self._by_handle: dict[int, list[Any]] = {}  # handle -> [object, times sent]
        self._by_id: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.pinned = 0  # lent objects the peer keeps alive for now (``pin``)
        self.pushed_back = 0  # bytes of items pushed back, of exports not yet released

    def __len__(self) -> int:
        return len(self._by_handle)

    def export(self, obj: Any) -> int:
        return self._export(obj, None)

    def export_weak(self, obj: Any) -> int:
        """Export ``obj`` lent weakly (``Lent``): the table does not keep it alive."""
        return self._export(obj, lambda: Lent(weakref.ref(obj), id(obj)))

    def _export(self, obj: Any, lent: Callable[[], Lent] | None) -> int:
        with self._lock:
            handle = self._live_handle(obj)
            if handle is None:
                if len(self._by_handle) >= self.limit:
                    raise ProtocolError(f"more than {self.limit} objects are referenced from the "
                                        "other side; it is not releasing them")
                handle = next(self._ids)
                self._by_handle[handle] = [obj if lent is None else lent(), 0]
                self._by_id[id(obj)] = handle
            self._by_handle[handle][1] += 1
            return handle

    def _live_handle(self, obj: Any) -> int | None:
        """``obj``'s handle if it is exported now (not a dead lent object
        whose id ``obj`` reuses). Called with the lock held."""
        handle = self._by_id.get(id(obj))
        if handle is None:
            return None
        entry = self._by_handle.get(handle)
        return handle if entry is not None and self._get(entry) is obj else None

    @staticmethod
    def _get(entry: list[Any]) -> Any:
        obj = entry[0]
        tp = type(obj)
        if tp is Lent:
            return obj.ref()
        return obj.obj if tp is Pinned else obj

    def push_back(self, handle: Any, items: list[Any], size: int) -> Any:
        """The peer hands our iterator ``handle`` back with ``items`` it had
        read ahead (``size`` bytes on the wire): from now on, what decodes
        that handle gets a ``Pushback`` yielding them first (one per export,
        so identity holds on our side), and the peer's later pulls take them
        first too. Only an iterator, and what the peer may make us hold so
        is bounded (``MAX_PUSHBACK_BYTES``) until it releases them."""
        obj = self.get(handle)
        tp = type(obj)
        if tp is not Private and not (hasattr(tp, "__next__") and hasattr(tp, "__iter__")):
            raise ProtocolError("items pushed back with an object that is not an iterator")
        with self._lock:
            entry = self._by_handle[handle]
            if len(entry) < 3:
                entry += [Pushback([], obj), 0]
            wrapper: Pushback = entry[2]
            if len(wrapper.items) + len(items) > 4 * MAX_BATCH:
                raise ProtocolError("more items pushed back than were ever read ahead")
            if self.pushed_back + size > MAX_PUSHBACK_BYTES:
                raise ProtocolError(f"more than {MAX_PUSHBACK_BYTES} bytes of items pushed back "
                                    "with iterators it holds")
            self.pushed_back += size
            entry[3] += size
            wrapper.items.extendleft(reversed(items))
        return wrapper

    def get_for_use(self, handle: Any) -> Any:
        """``get``, but an iterator with items pushed back is its ``Pushback``."""
        entry = self._by_handle.get(handle) if type(handle) is int else None
        obj = self._get(entry) if entry is not None else None
        if obj is None:
            _stale(handle)
        if len(entry) > 2 and entry[2].items:  # type: ignore[arg-type]
            return entry[2]  # type: ignore[index]
        return obj

    def contains(self, obj: Any) -> bool:
        if type(obj) is Pushback:
            obj = obj.it
        return self._live_handle(obj) is not None

    def pin(self, obj: Any, strong: bool) -> bool:
        """Make the export of a *lent* object strong (the peer keeps it
        alive) or weak again. False if ``obj`` was not lent. ``pinned``
        counts the strong ones."""
        with self._lock:
            handle = self._live_handle(obj)
            if handle is None:
                return False
            entry = self._by_handle[handle]
            if strong and type(entry[0]) is Lent:
                entry[0] = Pinned(obj, entry[0])
                self.pinned += 1
            elif not strong and type(entry[0]) is Pinned:
                entry[0] = entry[0].lent
                self.pinned -= 1
            return type(entry[0]) in (Lent, Pinned)

    def get(self, handle: Any) -> Any:
        entry = self._by_handle.get(handle) if type(handle) is int else None
        obj = self._get(entry) if entry is not None else None
        if obj is None:
            _stale(handle)
        return obj

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
                held = entry[0]
                if type(held) is Pinned:
                    held = held.lent
                    self.pinned -= 1
                key = held.key if type(held) is Lent else id(held)
                if key is not None and self._by_id.get(key) == handle:
                    del self._by_id[key]
                if len(entry) > 3:
                    self.pushed_back -= entry[3]
                dropped = entry  # freed outside the lock: __del__ may run
        del dropped
        return True

    def clear(self) -> None:
        with self._lock:
            entries, self._by_handle, self._by_id = self._by_handle, {}, {}
            self.pinned = self.pushed_back = 0
        entries.clear()


def start_collecting_fds(on: bool) -> None:
    """Encodes on this thread collect descriptors (``take_outgoing_fds``)
    if ``on``; otherwise they refuse them."""
    _drop_untaken()
    _fd_context.out = [] if on else None


def _drop_untaken() -> None:
    """Descriptors an earlier encode on this thread collected and nobody
    took (an interrupt came first) are copies of our own: closed."""
    left = getattr(_fd_context, "out", None)
    if left:
        close_fds(left)


def encode_collecting(encode: Callable[[], bytes], on: bool) -> bytes:
    """``encode()``, collecting the descriptors it meets if ``on`` (the
    channel carries them) for ``take_outgoing_fds``; on failure, the copies
    it made are closed."""
    _drop_untaken()
    _fd_context.out = [] if on else None
    try:
        return encode()
    except BaseException:
        close_fds(take_outgoing_fds())
        raise


def descriptor_ext(value: Any, tp: type) -> Ext | None:
    """A descriptor as a value, if this thread's encode collects them (the
    channel carries them); None for a file object otherwise (it crosses as
    a stream); an error for a bare descriptor or a socket, which cannot
    cross any other way."""
    out = getattr(_fd_context, "out", None)
    if out is None:
        if tp is Fd or tp is Handover or issubclass(tp, socket.socket):
            raise TypeError(f"a {tp.__name__} cannot cross: the channel does not carry "
                            "descriptors (spec: descriptors = true)")
        return None
    if len(out) >= MAX_FDS:
        raise TypeError(f"more than {MAX_FDS} descriptors in one message")
    transfer = tp is Handover
    if transfer:
        value = value.obj
        tp = type(value)
        if tp is not Fd and not issubclass(tp, socket.socket):
            raise TypeError("handover() takes a socket or a pycompart.Fd")
    if tp is Fd:
        kind, fields, fd = "fd", [], value.fileno()
    elif issubclass(tp, socket.socket):
        if value.type != socket.SOCK_STREAM:
            # A datagram socket takes a destination with every send: it
            # would reach any address, whatever the receiver may do.
            raise TypeError(f"only stream sockets (TCP, unix) cross as values, not {value.type!r}")
        kind, fields, fd = "socket", [int(value.family), int(value.type), value.proto], value.fileno()
    else:
        try:
            fd = value.fileno()
        except (OSError, ValueError, AttributeError):
            return None  # no descriptor beneath (StringIO): a stream handle
        text = issubclass(tp, io.TextIOBase)
        kind = "file"
        fields = [str(getattr(value, "mode", "rb"))[:8], text,
                  getattr(value, "encoding", None) if text else None]
        if hasattr(value, "flush"):
            value.flush()  # what the sender wrote reaches the file first
    if fd < 0:
        raise TypeError("a closed descriptor cannot cross")
    if transfer:
        out.append(value.detach())  # ours no more: the frame's, closed once sent
    else:
        # A copy of our own rides with the frame (the channel closes it
        # once sent): the value may be gone, and its descriptor closed, first.
        out.append(os.dup(fd))
    return Ext(EXT_FD, _encoder.encode([len(out) - 1, kind, fields]))


class Peer:
    """One side's state for one channel: its exports to the peer, and its
    proxies of the peer's objects.

    ``make_proxy(peer, handle, type_key, flags, type_name)`` builds a proxy;
    ``reference(peer, obj)`` turns a local non-plain value into an Ext
    (``EXT_PATH``/``EXT_YOURS``) or returns None to export it;
    ``from_path(peer, module, qualname, kind, mro)`` turns an ``EXT_PATH``
    into an object; ``make_class(peer, handle, flags, name, mro)`` builds the
    stand-in of a class of the peer's. These differ between main and an
    instance.
    """

    def __init__(self, compartment: str,
                 make_proxy: Callable[..., Any],
                 reference: Callable[[Peer, Any], Any],
                 from_path: Callable[..., Any],
                 exports_limit: int = MAX_EXPORTS,
                 make_class: Callable[..., Any] | None = None):
        self.compartment = compartment
        self.exports = Exports(exports_limit)
        self.proxies: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._proxy_lock = threading.Lock()
        self.methods: dict[str, set[str]] = {}  # type key -> names known to be methods
        self.classes: dict[str, Any] = {}  # type key -> the class (``obj.__class__``)
        self.answers: dict[Any, bool] = {}  # (type key, class) -> isinstance, asked of the peer
        # Our types, numbered for the peer: a type key says "same type as
        # before" without showing an address of ours (bounded: past it, no key).
        self._type_numbers: dict[type, int] = {}
        self.pending_release: list[tuple[int, int]] | None = None  # set to the channel's list
        self._arrivals = 0
        self._undecoded: dict[int, int] = {}
        self._deferred: list[tuple[int, int, int]] = []
        self.closed = False
        self._make_proxy = make_proxy
        self._make_class = make_class or (
            lambda peer, handle, flags, tname, mro: make_proxy(peer, handle, "", flags, tname))
        self._reference = reference
        self._from_path = from_path
        self._decoder = msgspec.msgpack.Decoder(ext_hook=self._ext)
        self._paths: dict[bytes, Any] = {}  # an EXT_PATH's bytes -> what it resolved to (``_path``)
        #: Keep what paths resolved to. Off where each use must be checked
        #: again (a guarded server: what it owns may change under it).
        self.keep_paths = True
        #: Objects one decoded value may build (``pycompart.wire.budget``).
        self.max_objects = budget.DEFAULT_MAX_OBJECTS
        #: ``returned(peer, obj, handle)``: what one of our own objects that
        #: the peer sends back becomes (None: itself).
        self.returned: Callable[[Peer, Any, int], Any] | None = None
        #: The channel carries descriptors: encode them as values.
        self.can_pass_fds = False
        #: Called with each of our objects a message hands back to us.
        self.on_yours: Callable[[Any], None] | None = None
        #: The peer's proxies of our tzinfos are tzinfos (main's are): a
        #: datetime of ours with a zone of its own rules crosses as a copy
        #: whose tzinfo is a reference (``_zone_by_reference``).
        self.tz_by_reference = False
        #: Seconds one ``decode`` may take in all, round trips to the peer
        #: included (``decode_deadline``); None: no bound.
        self.decode_timeout: float | None = None

    # -- encoding -------------------------------------------------------------------

    def encode(self, value: Any) -> bytes:
        """``value`` for the wire. Descriptors in it (``Fd``, sockets, files)
        are collected for the frame (``take_outgoing_fds``) when the channel
        carries descriptors."""
        return encode_collecting(lambda: encode_wire(self.to_wire(value, 0)), self.can_pass_fds)


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
        if tp in _BY_REFERENCE:  # (objects, functions, proxies: the last lines, at once)
            ext = self._reference(self, value)
            return ext if ext is not None else self.export(value)
        if tp is dict:
            if not value:
                return value
            if "__builtins__" in value or value is _BUILTINS_DICT:
                raise TypeError("a module's globals cannot be passed to another compartment")
            if all(type(k) in _KEY_SCALARS and (type(k) is not int or -(2**63) <= k < 2**64)
                   for k in value):
                return {k: self.to_wire(v, depth) for k, v in value.items()}
            flat: list[Any] = []
            for k, v in value.items():
                flat.append(self.to_wire(k, depth))
                flat.append(self.to_wire(v, depth))
            return Ext(EXT_DICT, encode_wire(flat))
        if tp is tuple:
            return Ext(EXT_TUPLE, encode_wire([self.to_wire(v, depth) for v in value]))
        if tp is set or tp is frozenset:
            return Ext(EXT_SET if tp is set else EXT_FROZENSET,
                       encode_wire([self.to_wire(v, depth) for v in value]))
        if tp is complex:
            return Ext(EXT_COMPLEX, encode_wire([value.real, value.imag]))
        if tp is bytearray:
            return Ext(EXT_BYTEARRAY, bytes(value))
        if tp is slice:
            return Ext(EXT_SLICE, encode_wire([self.to_wire(value.start, depth),
                                                   self.to_wire(value.stop, depth),
                                                   self.to_wire(value.step, depth)]))
        if value is Ellipsis:
            return ELLIPSIS_EXT
        if value is NotImplemented:
            return NOTIMPLEMENTED_EXT
        if value is END:
            return END_EXT
        if value is METHOD:
            return METHOD_EXT
        if tp in _CONTAINER_KINDS:
            return self._container(value, tp, depth)
        std = _STD_ENCODE.get(tp) or _std_encoder(tp)
        if std is not None:
            kind, fields = std(value)
            if kind:
                return Ext(EXT_STD, encode_wire([kind, fields]))
            if tp is datetime.datetime or tp is datetime.time:
                ext = self._zone_by_reference(value, tp, depth)
                if ext is not None:
                    return ext
        if tp is type and getattr(builtins, value.__name__, None) is value and value.__module__ == "builtins":
            return Ext(EXT_BUILTIN, value.__name__.encode())
        if issubclass(tp, types.ModuleType) and not hasattr(value, "__pycompart_proxy__"):
            ext = self._reference(self, value)
            if ext is None:
                raise TypeError(f"module {value.__name__!r} cannot be passed to another compartment")
            return ext
        # The real type, never isinstance (a proxy answers __class__ itself).
        if tp is Fd or tp is Handover or issubclass(tp, socket.socket) or issubclass(tp, io.IOBase):
            ext = descriptor_ext(value, tp)
            if ext is not None:
                return ext
        if len(_BY_REFERENCE) < MAX_BY_REFERENCE and _only_by_reference(tp):
            _BY_REFERENCE.add(tp)
        ext = self._reference(self, value)
        if ext is not None:
            return ext
        return self.export(value)

    def _zone_by_reference(self, value: Any, tp: type, depth: int) -> Ext | None:
        """A datetime or time whose tzinfo is not a value (a dateutil or
        pytz zone, with rules of its own): a copy, its tzinfo a reference
        (one of the peer's own going home, or, where the peer's proxies are
        tzinfos, ``tz_by_reference``, ours). None: it crosses by reference."""
        tz = value.tzinfo
        ext = self._reference(self, tz)
        if ext is None:
            if not self.tz_by_reference:
                return None
            ext = self.export(tz)
        return Ext(EXT_STD, encode_wire(list((_datetime if tp is datetime.datetime else _time)(value, ext))))

    def _container(self, value: Any, tp: type, depth: int) -> Ext:
        kind = _CONTAINER_KINDS[tp]
        if kind == "deque":
            fields = [[self.to_wire(v, depth) for v in value], value.maxlen]
        else:
            flat: list[Any] = []
            for k, v in value.items():
                flat.append(self.to_wire(k, depth))
                flat.append(self.to_wire(v, depth))
            fields = [flat, self.to_wire(value.default_factory, depth)] if kind == "defaultdict" \
                else [flat]
        return Ext(EXT_CONTAINER, encode_wire([kind, *fields]))

    def export(self, value: Any) -> Ext:
        private = False
        if type(value) is AsReference:
            private = value.private
            value = value.obj
        if type(value) is Pushback:
            value = value.it  # the same object, for the peer
        if type(value) is Lent:
            value = value.ref()
            if value is None:
                raise TypeError("a lent object that is gone")
            handle = self.exports.export_weak(value)
        else:
            handle = self.exports.export(value)
        open_requests = getattr(_nesting, "sent", None)
        if open_requests:
            open_requests[-1].add((self.exports, handle))  # (handles are numbered per peer)
        tp = type(value)
        flags = type_flags(tp)
        if private:
            flags |= F_PRIVATE
        if issubclass(tp, type):
            # A class: the peer makes a class of its own for it, so that
            # isinstance, issubclass, except and raise work there.
            flags |= F_CLASS | (F_EXCEPTION if issubclass(value, BaseException) else 0)
            return Ext(EXT_REF, _encoder.encode([handle, self.type_key(tp), flags, type_name(value),
                                                  [type_name(c) for c in value.__mro__[:32]]]))
        return Ext(EXT_REF, _encoder.encode([handle, self.type_key(tp), flags, type_name(tp)]))

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

    def decode(self, data: bytes | memoryview | msgspec.Raw, fds: list[int] | None = None) -> Any:
        """``data`` as values; ``fds``: the descriptors that came with it
        (each used at most once; those it does not name are closed)."""
        # Not inside another decode: what ``_bound_round_trips`` sets ends with this one.
        outermost = self.decode_timeout is not None and getattr(_decoding, "deadline", None) is None
        try:
            if fds:
                with receiving(fds):
                    return self._decode(data)
            return self._decode(data)
        finally:
            if outermost:
                _decoding.deadline = None

    def _bound_round_trips(self) -> None:
        # Building a set or a dict of the peer's objects hashes and compares
        # them, each a round trip the peer may answer slowly: without one
        # bound for them all, a value of n such objects could hold the
        # decoder (main's caller) for n call timeouts. Set the first time a
        # decode builds one (most decode none), for the rest of it.
        if self.decode_timeout is not None and getattr(_decoding, "deadline", None) is None:
            _decoding.deadline = time.monotonic() + self.decode_timeout

    def _decode(self, data: bytes | memoryview | msgspec.Raw) -> Any:
        if len(data) > self.max_objects:  # smaller cannot hold more objects than bytes
            budget.check(data, self.max_objects, f"a value from {self.compartment!r}")
        if len(data) > budget.KEY_CHECK_BYTES:  # (extension payloads inside it too)
            budget.check_map_keys(data, f"a value from {self.compartment!r}")
        try:
            return self._decoder.decode(data)
        except (ProtocolError, StaleReference, PermissionError, CallTimeout):
            raise  # (PermissionError: a reference the receiver will not take back)
        except Exception as exc:  # DecodeError, and any shape error in an extension
            raise ProtocolError(f"{self.compartment!r}: a malformed value "
                                f"({type(exc).__name__}: {exc})") from None

    def _ext(self, code: int, data: memoryview) -> Any:
        if code == EXT_PATH:  # (the two a call of a module's function or an object's method begins with)
            return self._path(data)
        if code == EXT_YOURS:
            handle = self._decoder.decode(data)
            obj = self.exports.get_for_use(handle)
            if self.on_yours is not None:
                self.on_yours(obj)
            return obj if self.returned is None else self.returned(self, obj, handle)
        if code == EXT_TUPLE:
            return tuple(self._list(data))
        if code == EXT_FD:
            return descriptor_from(self._decoder.decode(data))
        if code == EXT_REF:
            # (A proxy may be hashed where it lands: a key of a msgpack map.)
            self._bound_round_trips()
            fields = self._decoder.decode(data)
            if type(fields) is not list or len(fields) not in (4, 5):
                raise ProtocolError("malformed reference")
            handle, type_key, flags, tname = fields[:4]
            mro = fields[4] if len(fields) == 5 else None
            if type(handle) is not int or type(flags) is not int or not isinstance(type_key, str) \
                    or not isinstance(tname, str) or (mro is not None and not (
                        type(mro) is list and all(isinstance(m, str) for m in mro))):
                raise ProtocolError("malformed reference")
            if mro is not None:
                return self.class_proxy(handle, flags, tname[:300], [m[:300] for m in mro[:32]])
            return self.proxy(handle, type_key[:300], flags, tname[:300])
        if code == EXT_PUSHBACK:
            fields = self._list(data)
            if len(fields) != 2 or type(fields[1]) is not list or len(fields[1]) > MAX_BATCH:
                raise ProtocolError("malformed pushback")
            wrapper = self.exports.push_back(fields[0], fields[1], len(data))
            if self.on_yours is not None:
                self.on_yours(wrapper.it)
            return wrapper if self.returned is None else self.returned(self, wrapper, fields[0])
        if code == EXT_DICT:
            flat = self._list(data)
            if len(flat) % 2:
                raise ProtocolError("malformed dict")
            keys = flat[::2]
            self._bound_round_trips()
            spread(keys)
            return dict(zip(keys, flat[1::2]))
        if code == EXT_CONTAINER:
            self._bound_round_trips()
            return _decode_container(self._list(data))
        if code == EXT_SET:
            self._bound_round_trips()
            return set(spread(self._list(data)))
        if code == EXT_FROZENSET:
            self._bound_round_trips()
            return frozenset(spread(self._list(data)))
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
        if code == EXT_SLICE:
            start, stop, step = self._list(data)
            return slice(start, stop, step)
        if code == EXT_NOTIMPLEMENTED:
            return NotImplemented
        if code == EXT_ELLIPSIS:
            return Ellipsis
        if code == EXT_SURROGATES:
            return bytes(data).decode("utf-8", "surrogatepass")
        if code == EXT_STD:
            kind, fields = self._list(data)
            decode = _STD_DECODE.get(kind) if isinstance(kind, str) else None
            if decode is None:
                raise ProtocolError(f"unknown standard value {kind!r}")
            try:
                return decode(fields)
            except (TypeError, ValueError, OverflowError, ArithmeticError) as exc:
                raise ProtocolError(f"malformed {kind} value: {exc}") from None
        if code == EXT_BUILTIN:
            name = bytes(data).decode("ascii", "replace")
            # The classes the encoder sends: public ones (never ``__loader__``).
            value = getattr(builtins, name, None) if name.isidentifier() and name[0] != "_" else None
            if not issubclass(type(value), type):
                raise ProtocolError(f"builtins has no class {name!r}")
            return value
        raise ProtocolError(f"unknown extension type {code}")

    def _path(self, data: memoryview) -> Any:
        """An ``EXT_PATH``: what ``from_path`` makes of it, kept when it
        stays what it is (a refusal is not kept: it is raised each time)."""
        keep = self.keep_paths and len(data) <= MAX_PATH_BYTES
        key = bytes(data) if keep else b""
        found = self._paths.get(key) if keep else None
        if found is not None:
            return found
        fields = self._decoder.decode(data)
        if type(fields) is not list or len(fields) not in (4, 5):
            raise ProtocolError("malformed path reference")
        module, qualname, kind, mro = fields[:4]
        flags = fields[4] if len(fields) == 5 else 0
        if not (isinstance(module, str) and isinstance(qualname, str) and isinstance(kind, str)
                and isinstance(mro, list) and all(isinstance(m, str) for m in mro)
                and type(flags) is int):
            raise ProtocolError("malformed path reference")
        # (``from_path`` takes the metaclass's flags only from a class with some.)
        extra = (flags & CLASS_FLAGS,) if flags else ()
        found = self._from_path(self, module, qualname, kind, mro[:32], *extra)
        if keep and isinstance(found, _STAYS_PUT) and len(self._paths) < MAX_PATHS:
            self._paths[key] = found
        return found

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

    def class_proxy(self, handle: int, flags: int, tname: str, mro: list[str]) -> Any:
        """A class of the peer's (see ``export``): its stand-in, one per handle."""
        with self._proxy_lock:
            proxy = self.proxies.get(handle)
            if proxy is None:
                proxy = self._make_class(self, handle, flags, tname, mro)
                self.proxies[handle] = proxy
            else:
                # A class stand-in counts on the reference it holds.
                counted = getattr(proxy, "_pc_ref", proxy) if issubclass(type(proxy), type) else proxy
                object.__setattr__(counted, "_pc_count", counted._pc_count + 1)
            return proxy

    def proxy(self, handle: int, type_key: str, flags: int, tname: str) -> Any:
        with self._proxy_lock:
            proxy = self.proxies.get(handle)
            if proxy is None:
                proxy = self._make_proxy(self, handle, type_key, flags, tname)
                self.proxies[handle] = proxy
            else:
                object.__setattr__(proxy, "_pc_count", proxy._pc_count + 1)
            return proxy

    # -- releases that must wait for decodes ---------------------------------------
    # The peer may drop its last proxy of one of our objects right after it
    # sent that object back to us in a reply (a callback returned it): its
    # Release then arrives before we have decoded the reply, which names
    # the handle. A release waits until every reply that arrived before it
    # has been decoded.

    def arrived(self, key: Any) -> None:
        """A message that may name our objects arrived (a reply or a call,
        ``key``), its value not decoded yet."""
        with self._proxy_lock:
            self._arrivals += 1
            self._undecoded[key] = self._arrivals
            if len(self._undecoded) > MAX_DEFERRED:  # a leak must not hold releases for ever
                self._undecoded.pop(next(iter(self._undecoded)))

    def decoded(self, key: Any) -> None:
        """The message ``key`` was decoded (or will never be)."""
        with self._proxy_lock:
            if self._undecoded.pop(key, None) is None or not self._deferred:
                return
            ready = self._ready_releases()
        self._release_all(ready)

    def release_later(self, handles: list[tuple[int, int]]) -> int:
        """Apply a Release from the peer now or once the replies before it
        are decoded. Returns how many were made up (unknown handles)."""
        with self._proxy_lock:
            if self._undecoded:
                ticket = self._arrivals
                self._deferred.extend((ticket, h, c) for h, c in handles)
                if len(self._deferred) > MAX_DEFERRED:  # bounded, whatever the peer does
                    self._deferred = self._deferred[-MAX_DEFERRED:]
                return 0
        return self._release_all(handles)

    def _ready_releases(self) -> list[tuple[int, int]]:
        oldest = min(self._undecoded.values(), default=None)
        if oldest is None:
            ready, self._deferred = self._deferred, []
        else:
            ready = [d for d in self._deferred if d[0] < oldest]
            self._deferred = [d for d in self._deferred if d[0] >= oldest]
        return [(h, c) for _, h, c in ready]

    def _release_all(self, handles: list[Any]) -> int:
        bad = 0
        for handle, count in handles:
            if not self.exports.release(handle, count):
                bad += 1
        return bad

    def released(self, handle: int, count: int) -> None:
        """A proxy died (called from ``__del__``: no locks, no I/O)."""
        pending = self.pending_release
        if pending is not None and not self.closed:
            pending.append((handle, count))

    def close(self) -> None:
        """The channel is gone: drop our exports (the peer cannot use them)."""
        self.closed = True
        self.exports.clear()
        self._paths.clear()


def sending_stack() -> list[set[tuple[Exports, int]]]:
    """This thread's open requests: the handles it exports while a set is
    on top (with the table they are in) are "sent in this request"
    (``sent_in_open_requests``) until the set leaves
    (``protocol.leave_stack``). Nested requests stack: a callback's
    arguments see the enclosing call's too. (Not a context manager: a
    signal handler's exception raised as its ``__enter__`` returned, or as
    its ``__exit__`` was entered, would leave a set here for good, and every
    export after it, in no request, would count as sent in one: main's own
    callables would come back as themselves.)"""
    stack = getattr(_nesting, "sent", None)
    if stack is None:
        stack = _nesting.sent = []
    return stack


def sent_in_open_requests(exports: Exports, handle: int) -> bool:
    """Whether this thread sent ``handle`` of ``exports`` (one peer's) in a
    request it is still in."""
    key = (exports, handle)
    return any(key in handles for handles in getattr(_nesting, "sent", ()) or ())


METHOD = type(END)("METHOD")
ELLIPSIS_EXT = Ext(EXT_ELLIPSIS, b"")
NOTIMPLEMENTED_EXT = Ext(EXT_NOTIMPLEMENTED, b"")


# -- standard values that cross as values -------------------------------------------------
# Immutable, of exact standard-library types, rebuilt from plain fields: the
# receiver constructs its own (never a class the sender names).

#: tzinfo classes of well-known packages that are a fixed offset and
#: nothing else: a datetime carrying one crosses as a copy whose tzinfo is
#: a ``datetime.timezone`` of that offset (and name). Checked by the sender
#: on its own values; the receiver only ever builds standard types.
_FIXED_OFFSET_TZ = frozenset({("dateutil.tz.tz", "tzoffset"), ("dateutil.tz.tz", "tzutc"),
                              ("pytz", "UTC"), ("pytz", "_FixedOffset")})
#: The longest IANA zone key a ZoneInfo may cross by (the longest real one
#: is ~30 characters).
MAX_ZONE_KEY = 255


def _tz_fields(tz: Any, at: Any = None) -> Any:
    """``tz`` as plain fields: an offset and name, or a ZoneInfo's key; False
    if it is not a value the other side can rebuild (it crosses by
    reference). ``at``: the datetime or time it belongs to."""
    if tz is None:
        return None
    tp = type(tz)
    kind = "timezone" if tp is datetime.timezone else (tp.__module__, tp.__qualname__)
    zone = kind == ("zoneinfo", "ZoneInfo")
    if kind != "timezone" and not zone and kind not in _FIXED_OFFSET_TZ:
        return False  # another tzinfo (its own rules): not a value we can rebuild
    try:
        offset = tz.utcoffset(at)
        name = tz.tzname(at)
    except Exception:
        return False
    if type(offset) is not datetime.timedelta or not -datetime.timedelta(hours=24) < offset \
            < datetime.timedelta(hours=24):
        return False  # (a ZoneInfo of a time: no offset without a date)
    fields = [offset.days, offset.seconds, offset.microseconds, name if isinstance(name, str) else None]
    if not zone:
        return fields
    key = tz.key
    if not isinstance(key, str) or not 0 < len(key) <= MAX_ZONE_KEY:
        return False
    # The offset too: a receiver that cannot read the time zone data (its
    # lock-down) keeps the instant and its offset.
    return ["zoneinfo", key, *fields]


def _tz(fields: Any) -> Any:
    if fields is None:
        return None
    if issubclass(type(fields), datetime.tzinfo):  # (the real type: a proxy answers __class__)
        return fields  # a reference (``Peer._zone_by_reference``), already decoded
    if len(fields) == 6 and fields[0] == "zoneinfo":
        zone = _zone(fields[1])
        if zone is not None:
            return zone
        fields = fields[2:]
    days, seconds, micro, name = fields
    delta = datetime.timedelta(days=days, seconds=seconds, microseconds=micro)
    if name is None:
        return datetime.timezone(delta)
    return datetime.timezone.utc if delta == datetime.timedelta(0) and name == "UTC" else \
        datetime.timezone(delta, name)


#: Zones by key, as ``_zone`` found them (None: unreadable here, False: not a
#: zone). zoneinfo's own cache keeps only 8: without this, a peer naming
#: many zones in one message would make this process read a file for each
#: value. Bounded (there are ~600 zones).
_ZONES: dict[str, Any] = {}
MAX_ZONES = 1024


#: Lookups of zones not cached (past MAX_ZONES keys: made up by a peer, as
#: there are ~600 zones) per second, at most: each reads the time zone
#: data (~45 us), and 110,000 values of made-up zones in one message held
#: main 5 s.
MAX_ZONE_LOOKUPS_PER_SECOND = 256
_zone_window = [0.0, 0]


def _zone_lookup_allowed() -> bool:
    now = time.monotonic()
    if now - _zone_window[0] >= 1.0:
        _zone_window[0], _zone_window[1] = now, 0
    _zone_window[1] += 1
    return _zone_window[1] <= MAX_ZONE_LOOKUPS_PER_SECOND


def _zone(key: Any) -> Any:
    """The ZoneInfo named ``key``, from this machine's time zone data, or
    None if this process cannot read it. zoneinfo refuses keys that leave
    its data directories."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_ZONE_KEY:
        _bad()
    found = _ZONES.get(key)
    if found is None and key not in _ZONES:
        if len(_ZONES) >= MAX_ZONES and not _zone_lookup_allowed():
            return None  # (the value keeps its offset)
        # (The sender picks when, and which zone: see wire.stdlib. A zone not
        # in the system's data is looked for in the tzdata package, which is
        # not the standard library's: not found here, it keeps its offset.)
        with standard_only():
            zoneinfo: Any = stdlib_import("zoneinfo")
            try:
                found = zoneinfo.ZoneInfo(key)
            except ValueError:
                found = False  # not a zone's key at all
            except (OSError, ImportError, zoneinfo.ZoneInfoNotFoundError):
                found = None
        if len(_ZONES) < MAX_ZONES:
            _ZONES[key] = found
    if found is False:
        _bad()
    return found


def _datetime(v: datetime.datetime, tz: Any = False) -> tuple[str, Any]:
    """``tz``: its zone's fields (or a reference: ``Peer._zone_by_reference``)."""
    tz = _tz_fields(v.tzinfo, v) if tz is False else tz
    return ("datetime", [v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond,
                         tz, v.fold]) if tz is not False else ("", None)


def _time(v: datetime.time, tz: Any = False) -> tuple[str, Any]:
    tz = _tz_fields(v.tzinfo, None) if tz is False else tz
    return ("time", [v.hour, v.minute, v.second, v.microsecond, tz, v.fold]) if tz is not False \
        else ("", None)


_STD_ENCODE: dict[type, Callable[[Any], tuple[str, Any]]] = {
    decimal.Decimal: lambda v: ("decimal", str(v)),
    datetime.datetime: _datetime,
    datetime.date: lambda v: ("date", [v.year, v.month, v.day]),
    datetime.time: _time,
    datetime.timedelta: lambda v: ("timedelta", [v.days, v.seconds, v.microseconds]),
    datetime.timezone: lambda v: ("timezone", _tz_fields(v)),
    uuid.UUID: lambda v: ("uuid", v.bytes),
    range: lambda v: ("range", [str(v.start), str(v.stop), str(v.step)]),
}


def _std_encoder(tp: type) -> Callable[[Any], tuple[str, Any]] | None:
    """How ``_STD_ENCODE`` encodes ``tp``, paths and fractions included:
    ``pathlib``'s (``fractions``') entries are added once a path (a fraction)
    exists, so that a start-up that never sees one never imports it."""
    std = _STD_ENCODE.get(tp)
    if std is None and tp.__module__ == "fractions" and "fractions" in sys.modules:
        import fractions

        _STD_ENCODE[fractions.Fraction] = lambda v: ("fraction", [str(v.numerator), str(v.denominator)])
        std = _STD_ENCODE.get(tp)
    if std is None and tp.__module__ == "pathlib" and "pathlib" in sys.modules:
        import pathlib

        _STD_ENCODE[pathlib.PurePosixPath] = lambda v: _path_fields("purepath", str(v))
        _STD_ENCODE[pathlib.PosixPath] = lambda v: _path_fields("path", str(v))
        std = _STD_ENCODE.get(tp)
    if std is None and _stdlib_int_or_str_enum(tp):
        where = [tp.__module__, tp.__qualname__]
        std = _STD_ENCODE[tp] = lambda v: ("stdenum", [*where, v._value_])
    return std


def _stdlib_int_or_str_enum(tp: type) -> bool:
    """An enum of the standard library whose members are ints or strs
    (``re.IGNORECASE``, ``http.HTTPStatus.OK``, ``signal.SIGTERM``): its
    members cross as a value the receiver rebuilds from its own class, so
    that they stay ints or strs there (a reference is neither, and two
    peers' flags combined by reference bounced ``__and__`` between them)."""
    enum = sys.modules.get("enum")
    return enum is not None and issubclass(tp, enum.Enum) and issubclass(tp, (int, str)) \
        and tp.__module__.partition(".")[0] in sys.stdlib_module_names \
        and not any(part.startswith("<") for part in tp.__qualname__.split("."))


def _stdenum(f: Any) -> Any:
    """A member of a standard-library enum (``_stdlib_int_or_str_enum``): of
    the receiver's own class if its module is imported here (never imported
    on the sender's word), else the plain int or str it stands for."""
    module, qualname, value = f
    if not (isinstance(module, str) and isinstance(qualname, str) and type(value) in (int, str)
            and len(module) <= 300 and len(qualname) <= 300 and (type(value) is str or -(2**63) <= value < 2**64)):
        _bad()
    found: Any = sys.modules.get(module) if module.partition(".")[0] in sys.stdlib_module_names else None
    for part in qualname.split("."):
        if found is None or not part.isidentifier() or part.startswith("_"):
            return value
        found = vars(found).get(part)  # (no module __getattr__ runs)
    if isinstance(found, type) and _stdlib_int_or_str_enum(found) and found.__module__ == module \
            and issubclass(found, type(value)):
        try:
            return found(value)
        except ValueError:
            pass
    return value


#: The longest path that crosses as a value (PATH_MAX): pathlib splits it
#: and interns every part, one object each, past the object budget (20
#: million parts held main 14 s and 2 GiB).
MAX_PATH_CHARS = 4096


def _path_fields(kind: str, text: str) -> tuple[str, Any]:
    return (kind, text) if len(text) <= MAX_PATH_CHARS else ("", None)  # longer: by reference


def _path(kind: str, f: Any) -> Any:
    if not isinstance(f, str) or len(f) > MAX_PATH_CHARS:
        _bad()
    with standard_only():
        pathlib: Any = stdlib_import("pathlib")
        return pathlib.PosixPath(f) if kind == "path" else pathlib.PurePosixPath(f)


def _bounded_int(text: Any) -> int:
    if not isinstance(text, str) or len(text) > 5000:
        raise ValueError("an integer")
    return int(text)


_STD_DECODE: dict[str, Callable[[Any], Any]] = {
    "decimal": lambda f: decimal.Decimal(f) if isinstance(f, str) and len(f) < 5000 else _bad(),
    "fraction": lambda f: _fraction(f),
    "datetime": lambda f: datetime.datetime(*f[:7], tzinfo=_tz(f[7]), fold=f[8]),
    "date": lambda f: datetime.date(*f),
    "time": lambda f: datetime.time(*f[:4], tzinfo=_tz(f[4]), fold=f[5]),
    "timedelta": lambda f: datetime.timedelta(days=f[0], seconds=f[1], microseconds=f[2]),
    "timezone": lambda f: _tz(f) if f is not None and len(f) == 4 else _bad(),
    "uuid": lambda f: uuid.UUID(bytes=f),
    "range": lambda f: range(_bounded_int(f[0]), _bounded_int(f[1]), _bounded_int(f[2])),
    "purepath": lambda f: _path("purepath", f),
    "path": lambda f: _path("path", f),
    "stdenum": _stdenum,
}


def _fraction(fields: Any) -> Any:
    numerator, denominator = _bounded_int(fields[0]), _bounded_int(fields[1])
    with standard_only():
        fractions: Any = stdlib_import("fractions")
        return fractions.Fraction(numerator, denominator)


def _bad() -> Any:
    raise ValueError("malformed")

END_EXT = Ext(EXT_END, b"")
METHOD_EXT = Ext(EXT_METHOD, b"")


def path_ext(module: str, qualname: str, kind: str, mro: list[str] | None = None,
             flags: int = 0) -> Ext:
    """``flags``: of a class, its metaclass's protocols (``CLASS_FLAGS``)."""
    fields = [module, qualname, kind, mro or []]
    if flags:
        fields.append(flags)
    return Ext(EXT_PATH, _encoder.encode(fields))


def _stale(handle: Any) -> None:
    raise StaleReference(f"no object with handle {handle!r} was exported to this peer "
                         "(released, or from an earlier instance, or gone)")


def yours_ext(handle: int) -> Ext:
    return Ext(EXT_YOURS, _encoder.encode(handle))


def going_home(peer: Peer, proxy: Any, depth: int = 0) -> Ext:
    """The ext for one of the peer's objects (our proxy of it) going back:
    with the items our proxy had read ahead of it, if any (they are the
    peer's now: the proxy's buffer is emptied)."""
    buffer = proxy._pc_buffer
    if buffer:
        items = [v for v in buffer if v is not END]
        if items:
            exhausted = len(items) < len(buffer)
            buffer.clear()
            if exhausted:
                buffer.append(END)
            return Ext(EXT_PUSHBACK, _encoder.encode([proxy._pc_handle,
                                                     [peer.to_wire(v, depth) for v in items]]))
    return yours_ext(proxy._pc_handle)


def _no_references(*args: Any) -> Any:
    raise TypeError("only plain data (None, bool, numbers, str, bytes and containers of them) "
                    "can be shared")


_plain = Peer("shared data", _no_references, lambda peer, value: None, _no_references)
_plain.export = _no_references  # type: ignore[method-assign]


#: Containers of the standard library that cross by value, like dict and
#: list (a copy, of the same type, each item crossing as it would alone).
_CONTAINER_KINDS: dict[type, str] = {
    collections.defaultdict: "defaultdict", collections.OrderedDict: "ordereddict",
    collections.Counter: "counter", collections.deque: "deque"}


#: Distinct keys of one set or dict from the peer that may share a hash.
#: int, float and tuple hashes are the same in every process and easy to
#: collide: 100,000 tuples of one hash made main build their set for 100 s,
#: in C, holding the GIL (every thread of main stopped).
MAX_SHARED_HASHES = 64


def spread(keys: list[Any]) -> list[Any]:
    """``keys``, if building a hash table of them is not quadratic."""
    if len(keys) > MAX_SHARED_HASHES:
        hashes = list(map(hash, keys))  # (each distinct hash once: a set of them is linear)
        if len(hashes) - len(set(hashes)) > MAX_SHARED_HASHES:
            raise ProtocolError(f"a set or dict of {len(keys)} keys, more than {MAX_SHARED_HASHES} "
                                "of which share a hash (a hash flood)")
    return keys


def _decode_container(fields: list[Any]) -> Any:
    kind = fields[0] if fields else None
    try:
        if kind == "deque" and len(fields) == 3 and type(fields[1]) is list:
            maxlen = fields[2]
            if maxlen is not None and (type(maxlen) is not int or maxlen < 0):
                raise ValueError("maxlen")
            return collections.deque(fields[1], maxlen)
        if len(fields) >= 2 and type(fields[1]) is list and len(fields[1]) % 2 == 0:
            flat = fields[1]
            spread(flat[::2])
            pairs = zip(flat[::2], flat[1::2])
            if kind == "defaultdict" and len(fields) == 3:
                factory = fields[2]
                if factory is not None and not callable(factory):
                    raise ValueError("default_factory")
                return collections.defaultdict(factory, pairs)
            if kind == "ordereddict" and len(fields) == 2:
                return collections.OrderedDict(pairs)
            if kind == "counter" and len(fields) == 2:
                out: collections.Counter[Any] = collections.Counter()
                dict.update(out, pairs)  # as sent: Counter.update would add counts
                return out
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {kind} value: {exc}") from None
    raise ProtocolError(f"malformed container {kind!r}")


def is_plain(value: Any) -> bool:
    """Whether ``value`` crosses by value (a copy) with no reference in it."""
    try:
        _plain.encode(value)
        return True
    except (TypeError, ValueError, OverflowError):
        return False


def encode_plain(value: Any) -> bytes:
    """Encode plain data only (shared data, copied into instances)."""
    return _plain.encode(value)


def decode_plain(data: bytes) -> Any:
    return _plain.decode(data)
