"""Subclassing a compartment's class in main.

``class MyCase(boxed.TestCase): ...`` in main makes a real class of main's.
Each of its instances has a *twin* in the compartment: an instance of a
class made there for it, a subclass of the compartment's own class, in which
every method main defines is a stub that calls back into main. So:

* main's code calls main's overrides directly, and everything the
  compartment's classes define (methods, properties, class attributes,
  special methods) is forwarded to the twin, where the compartment's code
  runs with the twin as ``self``;
* the compartment's code calling ``self.method()`` reaches main's override
  through the stub (a callback: it needs ``may_call = ["main"]``), and
  ``super()`` on either side goes up the other side's chain;
* classes of the standard library in the compartment class's ancestry
  (``unittest.TestCase``, ``collections.abc.Mapping``, ...) are main's own
  ones in main's class: a test runner in main drives main's ``unittest``;
* ``isinstance``/``issubclass`` hold on both sides.

Instance state lives where it was first set: an attribute the compartment's
code set first (in the package's ``__init__``, say) is the twin's, one
main's code set first is main's instance's. Reading or writing it from the
other side goes there: each side learns the other's names as it meets them
(the first write of a new name from main costs one round trip to settle
whose it is).

The compartment may call on main's instance only the methods main's
classes define (the overrides it handed over) and read its instance
attributes and main-defined data (``pycompart.frontend.callbacks``).
"""

from __future__ import annotations

import sys
import types
import weakref
from typing import TYPE_CHECKING, Any

from ..errors import ProtocolError
from ..wire import refs

if TYPE_CHECKING:
    from .proxy import Compartment

#: Never forwarded or stubbed: the machinery of classes and instances.
_MACHINERY = frozenset({
    "__new__", "__init__", "__init_subclass__", "__class_getitem__", "__getattr__",
    "__getattribute__", "__setattr__", "__delattr__", "__dict__", "__weakref__", "__module__",
    "__qualname__", "__doc__", "__slots__", "__del__", "__reduce__", "__reduce_ex__",
    "__getstate__", "__setstate__", "__class__", "__subclasshook__", "__abstractmethods__",
    "_abc_impl", "__parameters__", "__orig_bases__", "__annotations__", "__firstlineno__",
    "__static_attributes__", "__match_args__", "__dataclass_fields__", "__dataclass_params__",
})


def is_subclass_instance(obj: Any, compartment: str) -> bool:
    """Whether ``obj`` is an instance of a main class that subclasses a
    class of ``compartment``."""
    bases = getattr(type(obj), "__pycompart_remote_bases__", None)
    return bool(bases) and type(obj).__pycompart_compartment__ == compartment


def is_main_subclass(obj: Any, compartment: str) -> bool:
    """Whether ``obj`` is main's subclass of a class of ``compartment``."""
    return issubclass(type(obj), type) and "__pycompart_handed__" in obj.__dict__ \
        and obj.__dict__.get("__pycompart_compartment__") == compartment


def make_subclass(remote_meta: type, name: str, bases: tuple[type, ...], ns: dict[str, Any],
                  kwargs: dict[str, Any]) -> type:
    """Build main's class for ``class name(bases): ns`` where some bases are
    stand-ins of a compartment's classes (instances of ``remote_meta``)."""
    RemoteClassMeta = remote_meta  # noqa: N806 - passed in, so this module need not import proxy

    remote = [b for b in bases if isinstance(b, RemoteClassMeta)]
    comps = {b._pc_comp for b in remote}
    remote_ancestry = [b for base in bases if not isinstance(base, RemoteClassMeta)
                       for b in getattr(base, "__pycompart_remote_bases__", ())]
    comps |= {b._pc_comp for b in remote_ancestry}
    if len(comps) != 1:
        raise TypeError(f"class {name}: its bases live in more than one compartment")
    comp: Compartment = comps.pop()
    new_bases: list[type] = []
    tail: list[type] = []
    for base in bases:
        if isinstance(base, RemoteClassMeta):
            glue, stdlib = comp.glue(base)
            new_bases.append(glue)
            tail.extend(c for c in stdlib if c not in tail)
        else:
            new_bases.append(base)
    candidates = [tuple(new_bases + [c for c in tail if c not in new_bases]), tuple(new_bases)]
    cls = None
    for candidate in candidates:
        metaclass = _metaclass(candidate)
        try:
            cls = metaclass(name, candidate, dict(ns), **kwargs)
            break
        except TypeError:
            if candidate is candidates[-1]:
                raise
    assert cls is not None
    cls.__pycompart_compartment__ = comp.name
    cls.__pycompart_remote_bases__ = tuple(dict.fromkeys(remote + remote_ancestry))
    cls.__pycompart_twinclasses__ = {}
    # A unittest.TestCase main itself put among the bases (``class
    # T(boxed.Mixin, unittest.TestCase)``): the mixin's code calls its
    # assertions on self (``self.assertEqual``), as main's. Only those:
    # other public methods of the standard library's would act for main
    # with the compartment's arguments (``ElementTree.write(path)``,
    # ``TestLoader.discover``).
    import unittest

    chosen = {c for base in bases if not isinstance(base, RemoteClassMeta)
              for c in getattr(base, "__mro__", ()) if c is unittest.TestCase and c not in tail}
    cls.__pycompart_handed__ = _handed(cls, chosen)
    cls.__pycompart_handed_std__ = frozenset(
        name for name in cls.__pycompart_handed__
        if any(name in c.__dict__ for c in chosen) and not any(
            name in k.__dict__ for k in _main_classes(cls)))
    return cls


def _metaclass(bases: tuple[type, ...]) -> type:
    winner: type = type
    for base in bases:
        meta = type(base)
        if issubclass(meta, winner):
            winner = meta
    return winner


def _main_classes(cls: type) -> list[type]:
    """The classes of main's own in ``cls``'s MRO: everything but glue,
    the standard library's and builtins."""
    out = []
    for klass in cls.__mro__:
        if "__pycompart_glue__" in klass.__dict__ or klass is object:
            continue
        module = sys.modules.get(klass.__module__)
        if klass.__module__ == "builtins" or (module is not None and _stdlib(klass.__module__)):
            continue
        out.append(klass)
    return out


#: The methods of a TestCase main chose that a mixin of the box may call.
_ASSERTIONS = ("assert", "fail")
#: ... but not those whose cost the arguments alone set, whatever their
#: size: a regular expression main would run (``(a+)+$``), the ``places``
#: of ``round`` on a Fraction (10**places digits).
_UNBOUNDED = ("Regex", "Regexp", "AlmostEqual", "AlmostEquals")


def _handed(cls: type, chosen: set[type] | frozenset[type] = frozenset()) -> dict[str, str]:
    """What main hands over with this class: name -> kind, for every
    attribute main's own classes define, as the MRO resolves it, and the
    public methods of the standard-library classes main ``chosen`` as bases."""
    import inspect  # (here: ~5 ms of main's start-up, for a program that hands no subclass)

    handed: dict[str, str] = {}
    seen: set[str] = set()
    own = _main_classes(cls)
    for klass in cls.__mro__:
        for name, value in klass.__dict__.items():
            if name in seen:
                continue
            seen.add(name)
            if name in _MACHINERY:
                continue
            if klass not in own and not (klass in chosen and name.startswith(_ASSERTIONS)
                                         and not any(w in name for w in _UNBOUNDED)):
                continue
            if isinstance(value, staticmethod):
                handed[name] = "staticmethod"
            elif isinstance(value, classmethod):
                handed[name] = "classmethod"
            elif isinstance(value, property):
                handed[name] = "property"
            elif inspect.isfunction(value) or inspect.ismethoddescriptor(value):
                handed[name] = "method"
    return handed


def _stdlib(module: str) -> bool:
    return module.partition(".")[0] in sys.stdlib_module_names


def class_data(cls: type) -> dict[str, Any]:
    """Plain-data class attributes main's classes define (copied into the
    twin class, so the compartment's code reads them locally)."""
    out: dict[str, Any] = {}
    for klass in reversed(_main_classes(cls)):
        for name, value in klass.__dict__.items():
            if name in _MACHINERY or name in cls.__pycompart_handed__:
                continue
            if refs.is_plain(value):
                out[name] = value
    return out


# -- unbound special methods of a stand-in class ----------------------------------------

#: Special methods ``object`` defines: on a stand-in class, ``Base.__init__``
#: would find ``object``'s, never ask the compartment.
OBJECT_SPECIALS = ("__init__", "__repr__", "__str__", "__eq__", "__ne__", "__lt__", "__le__",
                   "__gt__", "__ge__", "__hash__", "__format__", "__setattr__", "__delattr__",
                   "__getattribute__", "__dir__", "__sizeof__")


def unbound_specials(comp: Compartment) -> tuple[dict[str, Any], list[type]]:
    """Functions for a stand-in class's namespace so that ``Base.__init__(self,
    ...)`` in main's subclass (the explicit form of ``super().__init__``)
    runs the compartment's ``Base.__init__`` on the instance's twin; and the
    cell to put the stand-in class into once it exists."""
    cell: list[type] = []

    def make(name: str) -> Any:
        def special(self: Any, *args: Any, **kwargs: Any) -> Any:
            standin = cell[0]
            if is_subclass_instance(self, comp.name):
                twin = twin_of(self)
                return comp.call(twin._pc_inst, "@callsuper", [twin, standin, name, list(args),
                                                                kwargs])
            remote = getattr(self, "_pc_comp", None) is comp and not issubclass(type(self), type)
            if remote:  # an instance of the class in the compartment (a proxy)
                return comp.call(None, "@getattr", [standin, name])(self, *args, **kwargs)
            return getattr(object, name)(self, *args, **kwargs)
        special.__name__ = name
        return special

    return {name: make(name) for name in OBJECT_SPECIALS}, cell


# -- glue: main's class for one of the compartment's classes --------------------------


class _BoxAttr:
    """An attribute a class of the compartment defines, on main's class:
    read from (or, for a method, called on) the instance's twin."""

    def __init__(self, comp: Compartment, box_class: type, name: str, kind: str):
        self.comp = comp
        self.box_class = box_class
        self.name = name
        self.kind = kind

    def __get__(self, inst: Any, owner: type | None = None) -> Any:
        comp, name = self.comp, self.name
        if inst is None:
            if self.kind in ("method", "special"):
                return _unbound(self, owner)
            if owner is not None and owner.__dict__.get("__pycompart_remote_bases__"):
                # Read on main's subclass itself (``Mine.chars``, a class
                # property of the box's): on its twins' class, so that it
                # sees what main's class sets (``_ranges``), as unboxed.
                inst_handle = comp.pool.pick(None)
                return comp.call(inst_handle, "@getattr", [twin_class_of(owner, inst_handle), name])
            return comp.call(None, "@getattr", [self.box_class, name])
        twin = twin_of(inst)
        if self.kind in ("method", "special"):
            def forward(*args: Any, **kwargs: Any) -> Any:
                return comp.call(twin._pc_inst, "@callsuper", [twin, self.box_class, name,
                                                                list(args), kwargs])
            forward.__name__ = name
            # (main's instance lives while its method runs, as a bound
            # method keeps it: ``T("x").check()`` lends it only weakly.)
            forward.__pycompart_self__ = inst  # type: ignore[attr-defined]
            return forward
        return comp.call(twin._pc_inst, "@getsuper", [twin, self.box_class, name])

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name


def _unbound(attr: _BoxAttr, owner: type | None) -> Any:
    def method(inst: Any, *args: Any, **kwargs: Any) -> Any:
        return attr.__get__(inst, owner)(*args, **kwargs)
    method.__name__ = attr.name
    method.__qualname__ = f"{attr.box_class.__qualname__}.{attr.name}"
    return method


def glue_class(comp: Compartment, box_class: type, info: dict[str, Any]) -> tuple[type, list[type]]:
    """Main's class standing for ``box_class`` in a subclass's bases, and
    the standard-library classes of its ancestry that main provides itself."""
    attrs: dict[str, str] = info["attrs"]
    ns: dict[str, Any] = {"__pycompart_glue__": box_class, "__module__": box_class.__module__,
                          "__qualname__": box_class.__qualname__}
    for name, kind in attrs.items():
        if name not in _MACHINERY:
            ns[name] = _BoxAttr(comp, box_class, name, kind)
    if "__init__" in attrs:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            twin = twin_of(self)
            comp.call(twin._pc_inst, "@callsuper", [twin, box_class, "__init__", list(args), kwargs])
        ns["__init__"] = __init__

    def __getattr__(self: Any, name: str) -> Any:
        if name.startswith(("_pc_", "__pycompart")) or name in _MACHINERY:
            raise AttributeError(name)
        twin = twin_of(self)
        value = getattr(twin, name)  # the twin's own attributes, set by the compartment's code
        self.__dict__.setdefault("__pycompart_twin_names__", set()).add(name)
        return value
    ns["__getattr__"] = __getattr__

    def __setattr__(self: Any, name: str, value: Any) -> None:
        d = self.__dict__
        if name in d or name.startswith("__pycompart"):
            object.__setattr__(self, name, value)
        elif name in d.get("__pycompart_twin_names__", ()):
            setattr(twin_of(self), name, value)  # it came from the twin: it lives there
        else:
            # A name new on this side: the twin keeps it if the
            # compartment's code set it first, else it is main's from now
            # on (and the twin forwards it here). One round trip per name.
            twin = twin_of(self)
            if comp.call(twin._pc_inst, "@twinset", [twin, name, value]):
                d.setdefault("__pycompart_twin_names__", set()).add(name)
            else:
                object.__setattr__(self, name, value)
    ns["__setattr__"] = __setattr__

    stdlib = [_stdlib_base(comp, box_class, entry) for entry in _entries(comp, info.get("stdlib"))]
    return type(box_class.__name__, (), ns), [c for c in stdlib if c is not object]


#: The standard-library modules whose classes main puts into its own
#: class's bases for the ancestry a compartment names (of the bases main
#: names itself, only a TestCase's assertions are handed over): interfaces,
#: containers, values, test cases, parsers of strings main passes. Not a
#: class that would act for main on files, processes or the network with
#: main's arguments (``Mine(path)`` as ``Popen(path)``, ``FileHandler(path)``,
#: ``ProcessPoolExecutor``, ``ConfigParser.read``): an allowlist, so that a
#: module added to the standard library is refused until it is looked at.
_INTERFACE_MODULES = frozenset({
    "builtins", "abc", "collections", "collections.abc", "_collections_abc", "numbers", "enum",
    "typing", "contextlib", "string", "json", "json.encoder", "json.decoder", "html.parser",
    "_markupbase", "codecs", "datetime", "_datetime", "decimal", "_decimal", "_pydecimal",
    "fractions", "dataclasses", "functools", "weakref", "_weakrefset", "queue", "types",
    "textwrap", "pprint", "difflib", "random", "reprlib", "operator", "copy", "struct",
    "unittest", "unittest.case", "unittest.suite", "unittest.result", "unittest.loader",
    "unittest.async_case", "argparse", "xml.sax.handler", "xml.etree.ElementTree",
    "asyncio.protocols", "email.message", "ipaddress", "uuid", "graphlib", "heapq", "bisect",
    "ast", "inspect",
})
#: ... and these classes of other modules, which only declare an interface.
_INTERFACE_CLASSES = frozenset({("os", "PathLike"), ("io", "IOBase"), ("_io", "_IOBase"),
                                ("io", "RawIOBase"), ("io", "BufferedIOBase"), ("io", "TextIOBase"),
                                ("_io", "StringIO"), ("_io", "BytesIO"), ("logging", "Handler"),
                                ("logging", "Filter"), ("logging", "Formatter"),
                                ("logging", "Filterer"), ("logging", "LoggerAdapter")})
MAX_STDLIB_BASES = 64


def _powerful(cls: type) -> bool:
    """Whether main keeps ``cls`` (of the standard library) out of its
    classes' bases and what it hands over (``_INTERFACE_MODULES``)."""
    if issubclass(cls, BaseException):
        return False  # an exception class: raised, caught, its values read
    return cls.__module__ not in _INTERFACE_MODULES \
        and (cls.__module__, cls.__qualname__) not in _INTERFACE_CLASSES


def _entries(comp: Compartment, stdlib: Any) -> list[tuple[str, str]]:
    if type(stdlib) is not list or len(stdlib) > MAX_STDLIB_BASES or not all(
            type(e) is list and len(e) == 2 and type(e[0]) is str and type(e[1]) is str
            and len(e[0]) <= 200 and len(e[1]) <= 300 for e in stdlib):
        raise ProtocolError(f"compartment {comp.name!r} described a class's ancestry badly")
    return [(e[0], e[1]) for e in stdlib]


def _stdlib_base(comp: Compartment, box_class: type, entry: tuple[str, str]) -> Any:
    """The class of main's own that stands for a standard-library class in
    ``box_class``'s ancestry, as the compartment names it. Its word is
    checked: a module of the standard library main has imported itself
    (nothing is imported for it), the class found in that module's own
    namespace (no ``getattr``: no properties or module ``__getattr__`` of
    main's run) and defined there, and not a ``_powerful`` one."""
    module, qualname = entry
    if module != "builtins" and not _stdlib(module):
        raise ProtocolError(f"compartment {comp.name!r} named {module}.{qualname} as a "
                            f"standard-library ancestor of {box_class.__qualname__!r}: "
                            f"{module!r} is not a module of the standard library")
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if type(found) is not types.ModuleType and not isinstance(found, type):
            found = None
            break
        found = vars(found).get(part)
    if not isinstance(found, type) or found.__module__ != module or found.__qualname__ != qualname:
        raise ProtocolError(f"compartment {comp.name!r} named {module}.{qualname} as a "
                            f"standard-library ancestor of {box_class.__qualname__!r}, which main "
                            "has not imported (or which is not a class defined there)")
    if _powerful(found):
        raise TypeError(f"{box_class.__qualname__!r} (in compartment {comp.name!r}) derives from "
                        f"{module}.{qualname}: main does not put that class among its own class's "
                        "bases (its methods would run in main)")
    return found


def twin_class_of(cls: type, inst_handle: Any) -> Any:
    """The class of the twins of ``cls``'s instances in ``inst_handle``
    (made there on first need)."""
    comp: Compartment = cls.__pycompart_remote_bases__[0]._pc_comp  # type: ignore[attr-defined]
    key = id(inst_handle)
    found = cls.__pycompart_twinclasses__.get(key)  # type: ignore[attr-defined]
    twinclass = found[1] if found is not None and found[0] is inst_handle else None
    if twinclass is None:
        box_bases = list(cls.__pycompart_remote_bases__)  # type: ignore[attr-defined]
        twinclass = comp.call(inst_handle, "@twinclass", [
            cls.__name__, cls.__qualname__, box_bases, cls.__pycompart_handed__,  # type: ignore[attr-defined]
            class_data(cls), cls])
        classes = cls.__pycompart_twinclasses__  # type: ignore[attr-defined]
        for k in [k for k, (h, _) in classes.items() if h.channel.failure is not None]:
            del classes[k]  # twin classes of dead instances
        classes[key] = (inst_handle, twinclass)
    return twinclass


def twin_of(inst: Any, instance: Any = None) -> Any:
    """The instance's twin in the compartment (made on first need, in
    ``instance`` if given, else in whichever instance the pool picks; made
    anew if the instance it lived in has died, without the state the
    compartment's code had set on it)."""
    twin = inst.__dict__.get("__pycompart_twin__")
    if twin is not None and twin._pc_inst.channel.failure is None:
        return twin
    cls = type(inst)
    comp: Compartment = cls.__pycompart_remote_bases__[0]._pc_comp
    inst_handle = instance if instance is not None else comp.pool.pick(None)
    twinclass = twin_class_of(cls, inst_handle)
    # Main's instance is lent weakly: the twin must not keep it alive (the
    # twin is main's instance's to keep).
    twin = comp.call(inst_handle, "@twin", [twinclass, refs.Lent(weakref.ref(inst))])
    object.__setattr__(inst, "__pycompart_twin__", twin)
    return twin
