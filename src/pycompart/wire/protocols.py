"""The protocols an object offers across a boundary, both ways.

An object that crosses by handle (``pycompart.wire.refs``) is used on the
other side through a proxy whose class defines exactly the special methods
the object's type has (``type_flags``), so ``len(x)``, ``x[1:2]``, ``a + b``,
``iter(x)``, ``hasattr(x, "__iter__")`` and ``callable(x)`` behave as they
would locally. Each special method becomes an operation (``@op`` with a
name from ``OPS``) that the object's owner carries out at home.

Both directions use this: main's proxies of a compartment's objects
(``pycompart.frontend.proxy``) and a compartment's proxies of main's
(``pycompart.compartment.objects``). What each owner *serves* is its own
decision: a compartment serves every operation on its objects; main serves
them only to compartments it lets call it (``may_call = ["main"]``), and
never attributes (``pycompart.frontend.callbacks``).

Iteration is batched, carefully. An iterator the owner made to answer
``iter()`` (``Private``: nobody else can see it run ahead), or a generator
not started yet that takes only plain values nobody else holds
(``runs_alone``: ``sieve(n)``, ``dft(a_list_main_passed)``), is pulled in
batches from the start, ``FIRST_BATCH`` items then doubling up to
``MAX_BATCH``; the owner stops filling a batch ``BATCH_SECONDS`` after its
first item, so a producer slow per item is not run far ahead. So is
any iterator once its consumer announces that it takes everything: the
consumers that do (``list()``, ``tuple()``, ``sorted()``, ``str.join``,
``list.extend``) ask ``__length_hint__`` first, and the proxy answers
"unknown" and switches to full batches. Any other iterator (an argument or
a return value, which its owner may use again: a generator main's code
keeps, a ``peekable``, a ``groupby`` whose groups share it) is pulled
exactly one item per ``next`` for its first ``EXACT_PULLS`` items, and
only then in doubling batches: a consumer that takes a few items and hands
it back, or calls its methods, sees exactly what it would unboxed. Handing
a proxy back with items read ahead sends those items along
(``EXT_PUSHBACK``): the owner's uses of it yield them first
(``Pushback``). The cost of the rule: a ``for`` loop over a generator
returned by a call costs a round trip per item for its first
``EXACT_PULLS`` items; past them, a consumer that stops early may have
taken up to ``MAX_BATCH - 1`` items more from a generator than it used.
"""

from __future__ import annotations

import collections
import datetime
import io
import operator
import sys
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

from .exceptions import ALLOWED_EXCEPTIONS
from .stdlib import stdlib_import

# -- which protocols a type has --------------------------------------------------

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
F_STREAM = 1 << 13  # an io object: STREAM_METHODS/STREAM_ATTRS
F_ARITH = 1 << 14  # + - * / // % ** divmod, reflected and in place
F_BITS = 1 << 15  # & | ^ << >>, reflected and in place
F_UNARY = 1 << 16  # - + abs ~
F_MATMUL = 1 << 17  # @
F_NUMBER = 1 << 18  # int() float() complex() operator.index() round()
F_FORMAT = 1 << 19  # format() (only when the type overrides it)
F_BYTES = 1 << 20
F_REVERSED = 1 << 21
F_FSPATH = 1 << 22
F_PRIVATE = 1 << 23  # an iterator made to answer iter(): batches from the start
F_BINDS = 1 << 24  # a Python function: a class attribute binds it as a method
#: An iterator whose ``__iter__`` returns itself (a generator, ``return
#: self``): ``iter(proxy)`` is the proxy. Without it, ``iter()`` asks the
#: owner (jinja2's TokenStream has ``__next__`` but iterates with another
#: object).
F_ITER_SELF = 1 << 25
#: A ``datetime.tzinfo``: the proxy is one too (a ``datetime`` takes only
#: those), its ``utcoffset``/``dst``/``tzname``/``fromutc`` asked of the owner.
F_TZINFO = 1 << 26
#: The protocols of a class's *metaclass* a class stand-in takes on
#: (``enum.EnumMeta``: ``list(Color)``, ``Color["RED"]``, ``len(Color)``).
CLASS_FLAGS = F_LEN | F_ITER | F_GETITEM | F_CONTAINS | F_BOOL | F_REVERSED

#: The methods of the collection protocols (what ``collections.abc``'s
#: Mapping, Sequence and Set families define, duck-typed: a class that
#: defines ``items`` and ``update`` is used as a mapping): as much a
#: protocol as the special methods, ``d.items()``, ``d.update(x)``,
#: ``s.index(v)``. Each has a flag bit (from bit 32) set for a type that
#: defines a method of that name, so that the far side's proxy has exactly
#: those (``hasattr(x, "keys")`` must not lie).
COLLECTION_METHODS = ("keys", "items", "values", "get", "pop", "popitem", "clear", "update",
                      "setdefault", "append", "extend", "insert", "remove", "reverse", "index",
                      "count", "add", "discard", "isdisjoint", "copy")
_METHOD_BITS = {name: 1 << (32 + i) for i, name in enumerate(COLLECTION_METHODS)}
ALL_METHOD_FLAGS = sum(_METHOD_BITS.values())
ALL_FLAGS = (1 << 27) - 1 | ALL_METHOD_FLAGS


def check_arguments(args: Any, kwargs: Any) -> None:
    """A call's arguments as both sides send them: a list and a dict keyed
    by strings (anything else was not made by our encoder)."""
    if type(args) is not list or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
        raise TypeError("malformed call arguments")


def collection_flags(tp: type) -> int:
    flags = 0
    for name, bit in _METHOD_BITS.items():
        if callable(special(tp, name)):
            flags |= bit
    return flags


def abc_call(obj: Any, name: Any, args: Any, kwargs: Any) -> Any:
    """``obj.name(*args, **kwargs)`` for a collection method ``obj``'s type
    defines (``COLLECTION_METHODS``)."""
    if type(name) is not str or name not in _METHOD_BITS or not callable(special(type(obj), name)) \
            or type(args) is not list or type(kwargs) is not dict:
        raise AttributeError(f"{type(obj).__qualname__!r} object has no collection method {name!r}")
    return getattr(obj, name)(*args, **kwargs)

#: What a compartment may do with a file object main passed it: I/O on that
#: stream, nothing else (no ``buffer``, ``raw``, ``detach``, ``fileno``).
STREAM_METHODS = frozenset({"read", "readline", "readlines", "write", "writelines", "flush",
                            "seek", "tell", "readable", "writable", "seekable"})
STREAM_ATTRS = frozenset({"name", "mode", "encoding", "closed", "newlines"})

_ARITH = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "divmod")
_BITS = ("and", "or", "xor", "lshift", "rshift")
_ONE_SLOT = ((F_CALL, "__call__"), (F_LEN, "__len__"), (F_ITER, "__iter__"),
             (F_NEXT, "__next__"), (F_GETITEM, "__getitem__"), (F_SETITEM, "__setitem__"),
             (F_DELITEM, "__delitem__"), (F_CONTAINS, "__contains__"), (F_BOOL, "__bool__"),
             (F_MATMUL, "__matmul__"), (F_BYTES, "__bytes__"), (F_REVERSED, "__reversed__"),
             (F_FSPATH, "__fspath__"))
_GROUPS = ((F_ARITH, [f"__{n}__" for n in _ARITH] + [f"__r{n}__" for n in _ARITH]),
           (F_BITS, [f"__{n}__" for n in _BITS] + [f"__r{n}__" for n in _BITS]),
           (F_UNARY, ["__neg__", "__pos__", "__abs__", "__invert__"]),
           (F_NUMBER, ["__int__", "__float__", "__complex__", "__index__", "__round__"]))
_flag_cache: dict[type, int] = {}


def special(tp: type, name: str) -> Any:
    """A special method as the interpreter finds it: on the type's MRO, not
    on its metaclass (every class has a ``__call__`` through ``type``)."""
    for klass in tp.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def type_flags(tp: type) -> int:
    """The protocols objects of ``tp`` support."""
    flags = _flag_cache.get(tp)
    if flags is not None:
        return flags
    flags = 0
    for bit, name in _ONE_SLOT:
        if special(tp, name) is not None:
            flags |= bit
    for bit, names in _GROUPS:
        if any(special(tp, name) is not None for name in names):
            flags |= bit
    if special(tp, "__enter__") is not None and special(tp, "__exit__") is not None:
        flags |= F_CONTEXT
    if special(tp, "__eq__") is not object.__dict__["__eq__"]:
        flags |= F_EQ
        if special(tp, "__hash__") is not None:
            flags |= F_HASH
    if special(tp, "__lt__") is not object.__dict__["__lt__"]:
        flags |= F_ORDER
    if special(tp, "__format__") is not object.__dict__["__format__"]:
        flags |= F_FORMAT
    if issubclass(tp, io.IOBase):
        flags |= F_STREAM
    if tp is Private:
        flags |= F_PRIVATE
    if flags & F_NEXT and _iterates_itself(special(tp, "__iter__")):
        flags |= F_ITER_SELF
    if tp is types.FunctionType:
        flags |= F_BINDS
    if issubclass(tp, datetime.tzinfo):
        flags |= F_TZINFO
    flags |= collection_flags(tp)
    if len(_flag_cache) < 4096:
        _flag_cache[tp] = flags
    return flags


def _returns_self(self: Any) -> Any:
    return self


def _iterates_itself(method: Any) -> bool:
    """Whether an iterator type's ``__iter__`` returns the iterator: a C
    slot (generators, ``itertools``, ``map``) or a Python ``return self``."""
    if method is None:
        return False
    code = getattr(method, "__code__", None)
    if code is None:
        return True  # C: the iterator types' slot is PyObject_SelfIter
    reference = _returns_self.__code__
    return code.co_code == reference.co_code and code.co_argcount == 1


# -- at home: carrying an operation out ------------------------------------------

class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The end of an iteration (``next`` found nothing more).
END = _Marker("END")
#: Items one ``next`` asks for at the most.
MAX_BATCH = 256
#: Items of a non-private iterator pulled one at a time before batching.
EXACT_PULLS = 64
#: The first batch of a private iterator.
FIRST_BATCH = 32
#: How long the owner keeps filling a batch after its first item.
BATCH_SECONDS = 0.002


class Private:
    """An iterator made at home to answer ``iter()`` from the far side, held
    by nothing but the far side's proxy: it may run ahead (batches)."""

    __slots__ = ("it",)

    def __init__(self, it: Any):
        self.it = it

    def __iter__(self) -> Private:
        return self

    def __next__(self) -> Any:
        return next(self.it)

    def __repr__(self) -> str:
        return repr(self.it)


class Pushback:
    """An iterator handed back by the far side with items it had read
    ahead: yields those first, then the iterator's own. Other attributes
    (``send``, ``close``, ``gi_frame``) are the iterator's."""

    __slots__ = ("items", "it")

    def __init__(self, items: list[Any], it: Any):
        self.items = collections.deque(items)
        self.it = it

    def __iter__(self) -> Pushback:
        return self

    def __next__(self) -> Any:
        if self.items:
            return self.items.popleft()
        return next(self.it)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.it, name)


_PLAIN_ARGS = (int, float, complex, str, bytes, bool, type(None), range)
_PLAIN_COLLECTIONS = (tuple, frozenset, list, set, dict)
#: Items of a collection argument ``runs_alone`` looks through at most.
_MAX_SCANNED = 4096


def _refcounts(frame: Any) -> list[tuple[Any, int]]:
    out = []
    for value in frame.f_locals.values():
        out.append((value, sys.getrefcount(value)))
    return out


def _probe(arg: Any) -> Any:
    yield arg


#: References to a list held by nothing but a new generator's frame, as
#: ``_refcounts`` counts them (measured, not assumed).
_OWNED_REFS = _refcounts(_probe([]).gi_frame)[0][1]


def runs_alone(gen: Any) -> bool:
    """A generator not started yet whose arguments are plain values (a
    list, dict or set only if nothing but the generator holds it: a copy
    main passed in) and that closes over nothing: running it ahead
    computes only its own items, which nobody else can see (it may batch
    from the start, like ``Private``). Its code may still print or read
    globals: the rule's cost, written in the README."""
    try:
        frame = gen.gi_frame
        if frame is None or gen.gi_running or gen.gi_suspended or gen.gi_code.co_freevars:
            return False
        counted = _refcounts(frame)
    except AttributeError:
        return False
    for value, refs in counted:
        tp = type(value)
        if tp in _PLAIN_ARGS:
            continue
        if tp not in _PLAIN_COLLECTIONS or len(value) > _MAX_SCANNED:
            return False
        if tp is not tuple and tp is not frozenset and refs > _OWNED_REFS:
            return False  # someone else holds it and may change it
        items = value.items() if tp is dict else value
        for item in items:
            if tp is dict:
                if type(item[0]) not in _PLAIN_ARGS or type(item[1]) not in _PLAIN_ARGS:
                    return False
            elif type(item) not in _PLAIN_ARGS:
                return False
    return True


def _iter(obj: Any) -> Any:
    it = iter(obj)
    return it if it is obj else Private(it)


#: An exception an iterator raised after items of a batch: raised at the
#: next pull, after the consumer had those items (weak: dies with it).
_RAISED: weakref.WeakKeyDictionary[Any, BaseException] = weakref.WeakKeyDictionary()


def _next_batch(obj: Any, n: Any) -> list[Any]:
    """Up to ``n`` items of an iterator; ``END`` last if it is exhausted.
    Past the first item it stops early once ``BATCH_SECONDS`` have gone:
    a producer slow per item is not run far ahead of its consumer."""
    if type(n) is not int or n < 1:
        raise TypeError("a batch size")
    n = min(n, MAX_BATCH)
    if type(obj) is Private:
        obj = obj.it
    if _RAISED and obj in _RAISED:
        raise _RAISED.pop(obj)
    out = []
    clock = time.perf_counter
    until = 0.0
    for i in range(n):
        try:
            out.append(next(obj))
        except StopIteration:
            out.append(END)
            break
        except Exception as exc:
            if not out:
                raise
            try:  # the items before it first, then the exception, as unboxed
                _RAISED[obj] = exc
            except TypeError:
                raise exc from None  # cannot be kept for later: at once
            break
        if i == 0:
            until = clock() + BATCH_SECONDS
        elif clock() > until:
            break
    return out


def _iter_reversed(obj: Any) -> Any:
    return Private(reversed(obj))


def _round(obj: Any, *ndigits: Any) -> Any:
    return round(obj, *ndigits)


def _pow(obj: Any, other: Any, *mod: Any) -> Any:
    return pow(obj, other, *mod)


def _binary(name: str) -> tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any],
                                Callable[[Any, Any], Any]]:
    """The owner's side of ``o + x``, ``x + o`` and ``o += x``: only ``o``'s
    own special method, its ``NotImplemented`` sent back as itself. The
    caller's interpreter then tries the other operand's, once (with the
    whole operator here, ``x``'s reflected method, a proxy of the caller's,
    asked the caller, which asked back: until RecursionError)."""
    def special(attr: str) -> Callable[[Any, Any], Any]:
        def run(o: Any, x: Any) -> Any:
            method = getattr(type(o), attr, None)
            return NotImplemented if method is None else method(o, x)
        return run
    return special(f"__{name}__"), special(f"__r{name}__"), special(f"__i{name}__")


#: The longest str or bytes whose hash the other side computes itself.
MAX_HASHED_HERE = 1 << 20


def _portable_hash(obj: Any) -> Any:
    """``hash(obj)`` for the proxy's side. Each process hashes str and bytes
    with a seed of its own (which must stay its own), so a str or bytes
    subclass keeping their ``__hash__`` sends its plain value instead, for
    the proxy to hash: its hash then agrees with ``==`` on that side
    (dict and set lookups by the equal plain str work)."""
    tp = type(obj)
    for base in (str, bytes):
        if tp is not base and isinstance(obj, base) and tp.__hash__ is base.__hash__ and len(obj) <= MAX_HASHED_HERE:
            return [str.__str__(obj) if base is str else bytes(memoryview(obj))]
    return hash(obj)


OPS: dict[str, Callable[..., Any]] = {
    "len": len, "iter": _iter, "next_batch": _next_batch, "reversed": _iter_reversed,
    "getitem": lambda o, k: o[k], "setitem": lambda o, k, v: o.__setitem__(k, v),
    "delitem": lambda o, k: o.__delitem__(k), "contains": lambda o, k: k in o,
    "repr": repr, "str": str, "bool": bool, "hash": _portable_hash,
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le,
    "gt": operator.gt, "ge": operator.ge,
    "neg": operator.neg, "pos": operator.pos, "abs": abs, "invert": operator.invert,
    "int": int, "float": float, "complex": complex, "index": operator.index, "round": _round,
    "format": format, "bytes": bytes, "fspath": lambda o: o.__fspath__(),
    "matmul": operator.matmul, "rmatmul": lambda o, x: x @ o, "imatmul": operator.imatmul,
    "pow": _pow, "rpow": lambda o, x: x ** o,
    "enter": lambda o: type(o).__enter__(o), "abc": abc_call,
}


def _exit_op(obj: Any, name: Any, message: Any) -> bool:
    """``__exit__`` at home, with an exception rebuilt from its builtin name
    (never a class named by the far side)."""
    if name is None:
        return bool(type(obj).__exit__(obj, None, None, None))
    cls = ALLOWED_EXCEPTIONS.get(name, Exception) if type(name) is str else Exception
    exc = cls(str(message))
    return bool(type(obj).__exit__(obj, cls, exc, None))


OPS["exit"] = _exit_op
#: A tzinfo's methods, served as protocols (``F_TZINFO``): only on a tzinfo.
TZINFO_OPS = ("utcoffset", "dst", "tzname", "fromutc")


def _tz_op(name: str) -> Callable[[Any, Any], Any]:
    def op(obj: Any, dt: Any) -> Any:
        if not isinstance(obj, datetime.tzinfo):
            raise TypeError(f"{type(obj).__name__!r} object is not a tzinfo")
        return getattr(type(obj), name)(obj, dt)
    return op


for _name in TZINFO_OPS:
    OPS[_name] = _tz_op(_name)
for _name in _ARITH + _BITS:
    if _name == "pow":
        _, OPS["rpow"], OPS["ipow"] = _binary("pow")
        continue
    OPS[_name], OPS["r" + _name], OPS["i" + _name] = _binary(_name)


# -- away: the proxy's special methods ----------------------------------------------

def _op(op: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any) -> Any:
        return self._pc_op(op, *args)
    method.__name__ = f"__{op}__"
    return method


def _binop(op: str) -> Callable[..., Any]:
    def method(self: Any, other: Any) -> Any:
        return self._pc_op(op, other)
    method.__name__ = f"__{op}__"
    return method


_set = object.__setattr__  # proxies may forward plain setattr to the owner


def _next(self: Any) -> Any:
    buffer = self._pc_buffer
    if buffer is None:
        buffer = collections.deque()
        _set(self, "_pc_buffer", buffer)
    if not buffer:
        n = self._pc_batch  # < 1: exact pulls still to make, counting up to 0
        items = self._pc_op("next_batch", max(n, 1))
        if type(items) is not list or not items:
            raise TypeError("a malformed batch of items")
        buffer.extend(items)
        _set(self, "_pc_batch", n + 1 if n < 0 else 2 if n == 0 else min(n * 2, MAX_BATCH))
    item = buffer.popleft()
    if item is END:
        buffer.appendleft(END)  # exhausted for good
        raise StopIteration
    return item


def _length_hint(self: Any) -> Any:
    """Asked by consumers that take everything (``list()``, ``tuple()``,
    ``sorted()``, ``str.join``): from now on, pull full batches."""
    _set(self, "_pc_batch", MAX_BATCH)
    return NotImplemented


def _iter_self(self: Any) -> Any:
    return self


def _hash(self: Any) -> int:
    cached = self._pc_hash
    if cached is None:
        value = self._pc_op("hash")
        if type(value) is list and len(value) == 1 and type(value[0]) in (str, bytes):
            value = hash(value[0])  # (a str or bytes subclass's: hashed here, see _portable_hash)
        if type(value) is not int:
            raise TypeError("__hash__ returned a non-integer")
        cached = value
        _set(self, "_pc_hash", value)
    return cached


def _checked(op: str, kind: Any) -> Callable[..., Any]:
    what = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)

    def method(self: Any, *args: Any) -> Any:
        value = self._pc_op(op, *args)
        if not issubclass(type(value), kind):  # (a proxy's __class__ would ask the far side)
            raise TypeError(f"__{op}__ returned {type(value).__name__}, not {what}")
        return value
    method.__name__ = f"__{op}__"
    return method


def _exit(self: Any, exc_type: Any, exc: Any, tb: Any) -> bool:
    if exc is None:
        return bool(self._pc_op("exit", None, None))
    name = type(exc).__qualname__ if type(exc).__module__ == "builtins" else "Exception"
    try:
        message = str(exc)
    except Exception:
        message = ""
    return bool(self._pc_op("exit", name, message))


def proxy_namespace(flags: int) -> dict[str, Any]:
    """The special methods of a proxy class for objects with ``flags``.
    The class provides ``_pc_op(op, *args)`` and the slots ``_pc_buffer``,
    ``_pc_batch`` and ``_pc_hash``."""
    ns: dict[str, Any] = {}
    if flags & F_LEN:
        ns["__len__"] = _checked("len", int)
    if flags & F_ITER:
        ns["__iter__"] = _iter_self if flags & F_NEXT and flags & F_ITER_SELF else _op("iter")
    if flags & F_NEXT:
        ns["__next__"] = _next
        ns["__length_hint__"] = _length_hint
    if flags & F_GETITEM:
        ns["__getitem__"] = _op("getitem")
    if flags & F_SETITEM:
        ns["__setitem__"] = _op("setitem")
    if flags & F_DELITEM:
        ns["__delitem__"] = _op("delitem")
    if flags & F_CONTAINS:
        ns["__contains__"] = _checked("contains", bool)
    if flags & F_CONTEXT:
        ns["__enter__"] = _op("enter")
        ns["__exit__"] = _exit
    if flags & F_BOOL:
        ns["__bool__"] = _checked("bool", bool)
    if flags & F_EQ:
        ns["__eq__"] = _binop("eq")
        ns["__ne__"] = _binop("ne")
        ns["__hash__"] = _hash if flags & F_HASH else None
    if flags & F_ORDER:
        for op in ("lt", "le", "gt", "ge"):
            ns[f"__{op}__"] = _binop(op)
    if flags & F_ARITH:
        for name in _ARITH:
            ns[f"__{name}__"] = _binop(name) if name != "pow" else _op("pow")
            ns[f"__r{name}__"] = _binop("r" + name)
            if name != "divmod":
                ns[f"__i{name}__"] = _binop("i" + name)
    if flags & F_BITS:
        for name in _BITS:
            ns[f"__{name}__"] = _binop(name)
            ns[f"__r{name}__"] = _binop("r" + name)
            ns[f"__i{name}__"] = _binop("i" + name)
    if flags & F_UNARY:
        for name in ("neg", "pos", "abs", "invert"):
            ns[f"__{name}__"] = _op(name)
    if flags & F_MATMUL:
        for name in ("matmul", "rmatmul", "imatmul"):
            ns[f"__{name}__"] = _binop(name)
    if flags & F_NUMBER:
        ns["__int__"] = _checked("int", int)
        ns["__float__"] = _checked("float", float)
        ns["__complex__"] = _checked("complex", complex)
        ns["__index__"] = _checked("index", int)
        ns["__round__"] = _op("round")
    if flags & F_FORMAT:
        ns["__format__"] = _checked("format", str)
    if flags & F_BYTES:
        ns["__bytes__"] = _checked("bytes", bytes)
    if flags & F_REVERSED:
        ns["__reversed__"] = _op("reversed")
    if flags & F_BINDS:
        ns["__get__"] = _bind
    if flags & F_FSPATH:
        ns["__fspath__"] = _checked("fspath", (str, bytes))  # type: ignore[arg-type]
    return ns


def _bind(self: Any, inst: Any, owner: Any = None) -> Any:
    """A function of the other side stored on a class: ``obj.f`` is a
    bound method, as it would be for a local function."""
    return self if inst is None else types.MethodType(self, inst)


class Described:
    """A stand-in of a callable of the other side, which describes it
    (``describe_callable``) when asked: ``_pc_described()`` gives the
    description, and code that inspects callables gets the real signature
    and docstring."""

    __slots__ = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # In each subclass's own dictionary: its docstring would hide ours.
        cls.__doc__ = _described_doc  # type: ignore[assignment]

    def _pc_described(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def __signature__(self) -> Any:
        return signature_from(self._pc_described())


_described_doc = property(lambda self: self._pc_described().get("doc"))


def describe_callable(fn: Any) -> dict[str, Any]:
    """What the other side may know of a callable it was handed, so that
    its stand-in looks like the callable to code that inspects it
    (``inspect.signature``, ``functools.wraps``): names, docstring and
    parameters. Defaults that are plain data are sent as values, others
    only by their type's name: never a reference to one of main's objects."""
    if not callable(fn):
        raise TypeError(f"{type(fn).__qualname__!r} object of main is not callable")

    def text(value: Any, limit: int) -> str | None:
        return value[:limit] if isinstance(value, str) else None

    out: dict[str, Any] = {
        "name": text(getattr(fn, "__name__", None), 200),
        "qualname": text(getattr(fn, "__qualname__", None), 400),
        "module": text(getattr(fn, "__module__", None), 200),
        "doc": text(getattr(fn, "__doc__", None), 8192),
        "params": None,
    }
    # Here, not at the top: asked of few callables, and ~5 ms of every
    # start-up; main is asked by a compartment, at a moment it picks.
    inspect: Any = stdlib_import("inspect")

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return out
    params = []
    for p in list(signature.parameters.values())[:256]:
        if p.default is p.empty:
            default: list[Any] = []
        elif _simple_default(p.default):
            default = [True, p.default]
        else:
            default = [False, type(p.default).__qualname__[:200]]
        params.append([p.name, int(p.kind), default])
    out["params"] = params
    return out


_SIMPLE_DEFAULTS = (int, float, complex, str, bytes, bool, type(None))


def _simple_default(value: Any, depth: int = 0) -> bool:
    """Whether a parameter default may cross as a value (small plain data)."""
    tp = type(value)
    if tp in _SIMPLE_DEFAULTS:
        return not isinstance(value, (str, bytes)) or len(value) <= 1024
    if tp in (tuple, frozenset) and depth < 3 and len(value) <= 32:
        return all(_simple_default(v, depth + 1) for v in value)
    return False


class _OpaqueDefault:
    """A parameter default of the other side's that is not plain data:
    shown by its type's name."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name} of the other side>"


def signature_from(description: Any) -> inspect.Signature | None:
    """The ``inspect.Signature`` a ``describe_callable`` answer describes."""
    inspect: Any = stdlib_import("inspect")
    params = description.get("params") if type(description) is dict else None
    if type(params) is not list:
        return None
    out = []
    try:
        for name, kind, default in params:
            if default and default[0]:
                value = default[1]
            elif default:
                value = _OpaqueDefault(str(default[1]))
            else:
                value = inspect.Parameter.empty
            out.append(inspect.Parameter(name, inspect._ParameterKind(kind), default=value))
        return inspect.Signature(out)
    except (TypeError, ValueError):
        return None


def abc_namespace(flags: int) -> dict[str, Any]:
    """Methods of a proxy for the collection methods its object's type
    defines (``COLLECTION_METHODS``), each carried out by the owner."""
    return {name: _abc_method(name) for name, bit in _METHOD_BITS.items() if flags & bit}


def _abc_method(name: str) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._pc_op("abc", name, list(args), kwargs)
    method.__name__ = name
    return method


def initial_batch(flags: int) -> int:
    """A new proxy's ``_pc_batch``: a private iterator batches at once
    (``FIRST_BATCH`` items, bounded in time by the owner)."""
    return FIRST_BATCH if flags & F_PRIVATE else 1 - EXACT_PULLS


#: Slots every proxy class has for the protocols above.
PROXY_SLOTS = ("_pc_buffer", "_pc_batch", "_pc_hash")
