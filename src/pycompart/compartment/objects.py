"""The home side of remote references, inside an instance: serving
operations on the compartment's objects, and references to main's.

* ``ObjectServer`` answers ``@import``, ``@getattr``, ``@setattr``,
  ``@call``, ``@callmethod`` and ``@op`` requests on the compartment's own
  objects (reached by a handle it exported, or by a ``module:qualname`` path
  inside the modules placed in it). The **exposure policy** is applied here:
  private and dunder names are refused unless the spec's ``expose`` lists
  them, and setting attributes needs ``allow_setattr``.
* ``MainRef`` and its kinds (``Callback``, ``MainStream``) are what the
  compartment holds of main's objects: opaque, callable, or a stream. What
  main serves for them is decided in main (``pycompart.frontend.callbacks``).
"""

from __future__ import annotations

import collections
import copy
import datetime
import importlib
import os
import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import EntrypointError
from ..wire import protocols, refs
from ..wire.exceptions import ALLOWED_EXCEPTIONS, plain, raised_by_runpy, rebuild_exception
from ..wire.protocol import ErrorInfo, close_fds
from ..wire.refs import exposed

_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType)


def qualified(cls: type) -> str:
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


#: Entries of main's ``sys.path`` an import request may carry.
MAX_SEARCH_PATH = 1000


def _follow_search_path(search_path: list[str]) -> None:
    """Add the entries of main's ``search_path`` that ``sys.path`` lacks,
    each after the nearest entry before it in main's that we have."""
    added = False
    for i, entry in enumerate(search_path):
        if entry in sys.path:
            continue
        at = 0
        for before in reversed(search_path[:i]):
            if before in sys.path:
                at = sys.path.index(before) + 1
                break
        sys.path.insert(at, entry)
        added = True
    if added:
        importlib.invalidate_caches()


class ObjectServer:
    """Operations on a compartment's objects, inside one of its instances.

    For a caller it does not trust (``trusts_main`` false: main, for a
    safebox or mutual compartment; any other compartment, over an edge) it
    is *guarded*: it serves only the compartment's own objects (its placed
    modules, their classes and functions, instances of those classes, and
    the containers and generators they hand out), never an object of the
    standard library or of a module it merely imports (``mod.os.system``
    would otherwise run anything here with this compartment's privileges),
    and it takes no import path from the caller. A module of the standard
    library crosses by name: the caller uses its own copy."""

    def __init__(self, compartment: str, modules: list[str], functions: list[str],
                 expose: list[str], allow_setattr: bool, trusts_main: bool = False,
                 shares_containers: bool = True):
        self.compartment = compartment
        self.trusts_main = trusts_main
        self.guarded = not trusts_main
        #: Main serves its tzinfos' offsets to us (we may call main): its
        #: tzinfos' proxies are tzinfos (set by the serve loop).
        self.main_zones = False
        #: Module dunders main changed, as they were first (``op_setattr``).
        self._dunders: dict[tuple[str, str], Any] = {}
        #: Module-level containers go to the caller by reference (main);
        #: another compartment, over an edge, gets copies.
        self.shares_containers = shares_containers
        self._own_classes: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()
        self.modules = tuple(modules)
        self.functions = frozenset(functions)
        self.expose = frozenset(expose)
        self.allow_setattr = allow_setattr
        self._resolved: dict[tuple[str, str], Any] = {}
        # Twins ``watch_twins`` looks at (id -> weakref): those an operation
        # touched (made, or handed to our code) and those pinned in main.
        self._touched: dict[int, Any] = {}
        self._pinned: dict[int, Any] = {}
        self._ops: dict[str, Callable[..., Any]] = {
            "@import": self.op_import, "@getattr": self.op_getattr, "@setattr": self.op_setattr,
            "@call": self.op_call, "@callmethod": self.op_callmethod, "@op": self.op_protocol,
            "@delattr": self.op_delattr, "@classinfo": self.op_classinfo,
            "@twinclass": self.op_twinclass, "@twin": self.op_twin,
            "@callsuper": self.op_callsuper, "@getsuper": self.op_getsuper,
            "@twinset": self.op_twinset, "@unpickle": self.op_unpickle, "@runmain": self.op_run_main,
        }

    def handles(self, entrypoint: str) -> bool:
        return entrypoint in self._ops

    def operations(self) -> list[str]:
        """The names of the operations a caller may send (``@call``, ...)."""
        return list(self._ops)

    #: Subclasses in main of its classes (``pycompart.frontend.subclass``):
    #: the twin machinery puts what the caller sends into classes of its
    #: own, so only a trusted caller (main, for a sandbox) may use it.
    TRUSTED_OPS = frozenset({"@classinfo", "@twinclass", "@twin", "@twinset", "@callsuper",
                             "@getsuper", "@runmain"})

    def execute(self, peer: refs.Peer, entrypoint: str, raw: Any, fds: list[int] | None = None) -> bytes:
        if self.guarded and entrypoint in self.TRUSTED_OPS:
            close_fds(fds or [])
            raise PermissionError(f"compartment {self.compartment!r} does not let a caller it does "
                                  f"not trust subclass its classes ({entrypoint})")
        args = peer.decode(raw, fds)
        if type(args) is not list:
            raise TypeError(f"{entrypoint}: malformed request")
        try:
            result = self._ops[entrypoint](*args)
        except TypeError as exc:
            if "positional argument" in str(exc) and exc.__traceback__ is not None \
                    and exc.__traceback__.tb_next is None:
                raise TypeError(f"{entrypoint}: malformed request") from None
            raise
        # The request's values are ours alone once the call is done: a
        # generator holding one of them may then batch (``runs_alone``), if
        # nothing but this reply holds the generator itself (the two
        # references: ``result`` and getrefcount's argument).
        del args
        if self._touched or self._pinned:
            self.watch_twins(peer, result)
        if type(result) is types.GeneratorType and sys.getrefcount(result) <= 2 \
                and protocols.runs_alone(result):
            result = refs.AsReference(result, private=True)
        return peer.encode(result)

    # -- names ------------------------------------------------------------------------

    def placed(self, module: str, qualname: str = "") -> bool:
        for placed in self.modules:
            if module == placed or module.startswith(placed + "."):
                return True
        return bool(qualname) and f"{module}:{qualname}" in self.functions

    def check_name(self, name: Any, what: str = "", target: Any = None) -> str:
        """``name``, if the caller may use it on ``target`` (described as
        ``what``, or by ``_describe`` only when refused)."""
        if type(name) is not str:
            raise TypeError("attribute names are strings")
        if not exposed(name, self.expose):
            what = what or _describe(target)
            raise AttributeError(f"{what} does not expose {name!r} in compartment "
                                 f"{self.compartment!r} (private and dunder names need the "
                                 "spec's expose list)")
        return name

    def resolve(self, module: str, qualname: str) -> Any:
        """The object at ``module:qualname``, if the compartment holds it."""
        key = (module, qualname)
        obj = self._resolved.get(key)
        if obj is not None:
            return obj
        obj = self._resolve(module, qualname)
        if len(self._resolved) < 4096 and isinstance(obj, (type, types.ModuleType, *_FUNCTION_TYPES)):
            self._resolved[key] = obj  # modules, classes and functions stay put
        return obj

    def _resolve(self, module: str, qualname: str) -> Any:
        if not self.placed(module, qualname):
            raise LookupError(f"{module}{':' + qualname if qualname else ''} is not placed in "
                              f"compartment {self.compartment!r}")
        obj: Any = importlib.import_module(module)
        if qualname:
            for part in qualname.split("."):
                obj = getattr(obj, self.check_name(part, module))
        return obj

    def path_of(self, obj: Any) -> refs.Ext | None:
        """``obj`` by name, if it is a module, class or function that other
        instances of this compartment can find by the same name."""
        if isinstance(obj, types.ModuleType):
            name = obj.__name__
            return refs.path_ext(name, "", "module") if self.placed(name) else None
        if not isinstance(obj, type) and not isinstance(obj, _FUNCTION_TYPES):
            return None
        module = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", None)
        if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname:
            return None
        if not self.placed(module, qualname):
            return None
        if not all(exposed(part, self.expose) for part in qualname.split(".")):
            return None
        try:
            if self.resolve(module, qualname) is not obj:
                return None
        except Exception:
            return None
        if isinstance(obj, type):
            if issubclass(obj, BaseException):
                return refs.path_ext(module, qualname, "exception", [qualified(c) for c in obj.__mro__[:32]])
            return refs.path_ext(module, qualname, "class", None,
                                 protocols.type_flags(type(obj)) & protocols.CLASS_FLAGS)
        return refs.path_ext(module, qualname, "function" if isinstance(obj, types.FunctionType)
                             else "builtin")

    # -- exceptions from main -----------------------------------------------------------

    def rebuild(self, peer: refs.Peer, info: ErrorInfo) -> BaseException:
        """The exception to raise here for one that main's code raised: main's
        own class as this compartment's stand-in of it (``info.origin``), one
        of this compartment's classes as itself (it crossed back through a
        callback), a builtin as itself (StopIteration included: main is not
        protected from itself), anything else as ``RemoteError``."""
        args = tuple(plain(a) for a in info.args)
        cls: Any = None
        if info.origin:
            cls = peer.class_proxy(info.origin, refs.F_CLASS | refs.F_EXCEPTION, info.type_name,
                                   info.mro or [info.type_name])
        elif info.type_name in BOX_EXCEPTIONS:
            cls = BOX_EXCEPTIONS[info.type_name]
        else:
            module, _, qualname = info.type_name.rpartition(".")
            if module and self.placed(module, qualname):
                try:
                    found = self.resolve(module, qualname)
                except Exception:
                    found = None
                if isinstance(found, type) and issubclass(found, BaseException):
                    cls = found
        if cls is None:
            return rebuild_exception(info, "main")
        try:
            exc = cls(*args) if args else cls(info.message)
        except Exception:
            exc = cls.__new__(cls)
            BaseException.__init__(exc, *(args or (info.message,)))
        return exc

    # -- operations -------------------------------------------------------------------

    def op_import(self, module: Any, search_path: Any = None) -> Any:
        """Import a placed module. ``search_path``: main's ``sys.path`` as it
        is now (absolute); entries main added since this instance started
        are added here too, where main has them, so the module is found as
        main would find it (within what this compartment may read)."""
        if type(module) is not str or not self.placed(module):
            raise ModuleNotFoundError(f"module {module!r} is not placed in compartment "
                                      f"{self.compartment!r}")
        if not self.guarded and type(search_path) is list and len(search_path) <= MAX_SEARCH_PATH \
                and all(type(p) is str and os.path.isabs(p) and len(p) < 4096 for p in search_path):
            _follow_search_path(search_path)
        mod = importlib.import_module(module)
        return [mod, hasattr(mod, "__path__")]

    def op_run_main(self, module: Any, argv: Any) -> list[Any]:
        """``python -m module ARGS`` here: ``pycompart run SPEC -m module``
        of a placed module (a package's ``__main__``) runs its code in this
        compartment, as ``__main__``, with main's arguments. Returns
        ``["exit", code]`` (``SystemExit``'s code, None if it just ended),
        or ``["not-runnable", message]`` if runpy found nothing to run."""
        if type(module) is not str or not self.placed(module):
            raise ModuleNotFoundError(f"module {module!r} is not placed in compartment "
                                      f"{self.compartment!r}")
        if type(argv) is not list or len(argv) > 4096 or not all(type(a) is str for a in argv):
            raise TypeError("@runmain: malformed arguments")
        import runpy

        saved = sys.argv
        sys.argv = [module, *argv]
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
            return ["exit", code if code is None or type(code) in (int, str) else str(code)]
        except ImportError as exc:
            if not raised_by_runpy(exc):
                raise
            return ["not-runnable", str(exc)]
        finally:
            sys.argv = saved
        return ["exit", None]

    def op_getattr(self, target: Any, name: Any) -> Any:
        self._check_target(target)
        self.check_name(name, target=target)
        if not isinstance(target, (type, types.ModuleType)):
            import inspect  # (here: an instance that serves only modules never needs it)

            static = inspect.getattr_static(target, name, None)
            if isinstance(static, types.FunctionType) and name not in _instance_dict(target):
                return refs.METHOD  # called later with @callmethod: one round trip
        value = getattr(target, name)
        if type(value) in SHARED_MUTABLE and not name.startswith("__") and self.shares_containers:
            # A registry, a table, an options dict (``md.block_level_elements``,
            # ``env.filters``): read from an attribute, it is shared state,
            # so main gets the object itself, and its changes are made here.
            # Values a call returns or main passes in are copies. Another
            # compartment, over an edge, gets a copy: it may not change our
            # state in place any more than by setting the attribute.
            return refs.AsReference(value)
        return value

    def op_setattr(self, target: Any, name: Any, value: Any) -> None:
        self._check_target(target)
        if not self.allow_setattr:
            raise PermissionError(f"setting attributes in compartment {self.compartment!r} is not "
                                  "allowed (spec: allow_setattr)")
        name = self.check_name(name, target=target)
        if self._keep_dunder(target, name):
            key = (target.__name__, name)
            if value is refs.END:
                original = self._dunders.get(key, _MISSING)
                if original is _MISSING:
                    target.__dict__.pop(name, None)
                else:
                    setattr(target, name, original)
                return
        setattr(target, name, value)

    # -- main's subclasses of our classes (pycompart.frontend.subclass) ---------------------

    def op_classinfo(self, cls: Any) -> dict[str, Any]:
        """What main needs to subclass ``cls``: the attributes our classes in
        its ancestry define (name -> kind), and the standard-library classes
        of its ancestry (module, qualname), which main supplies itself."""
        self._check_target(cls)
        if not isinstance(cls, type):
            raise TypeError(f"{_describe(cls)} is not a class")
        attrs: dict[str, str] = {}
        stdlib: list[list[str]] = []
        for klass in cls.__mro__:
            if klass is object:
                continue
            module = getattr(klass, "__module__", "") or ""
            if module == "builtins" or module.partition(".")[0] in sys.stdlib_module_names:
                stdlib.append([module, klass.__qualname__])
                continue
            for name, value in klass.__dict__.items():
                if name in attrs or not exposed(name, self.expose):
                    continue
                attrs[name] = _kind(value, name)
        return {"attrs": attrs, "stdlib": stdlib}

    def op_twinclass(self, name: Any, qualname: Any, bases: Any, handed: Any, data: Any,
                     main_class: Any) -> type:
        """The class of the twins of main's subclass ``name``: a subclass of
        ``bases`` (ours) in which each method main defines calls back into
        main, and main's plain class attributes are copied."""
        if not (isinstance(name, str) and isinstance(qualname, str) and type(bases) is list
                and type(handed) is dict and type(data) is dict):
            raise TypeError("malformed twin class request")
        for base in bases:
            self._check_target(base)
            if not isinstance(base, type):
                raise TypeError("twin bases must be classes of this compartment")
        if not isinstance(main_class, MainClass):
            raise TypeError("malformed twin class request")
        ns: dict[str, Any] = {k: v for k, v in data.items() if isinstance(k, str)}
        ns["_pc_main_class"] = main_class
        for attr, kind in handed.items():
            if isinstance(attr, str) and isinstance(kind, str):
                ns[attr] = _stub(attr, kind)
        ns["__getattr__"] = _twin_getattr
        ns["__setattr__"] = _twin_setattr
        ns["__module__"] = "main"
        ns["__qualname__"] = qualname
        ns["__pycompart_twin__"] = True
        return type(name, tuple(bases), ns)

    def op_twin(self, twinclass: Any, main: Any) -> Any:
        """A twin of main's instance ``main`` (not initialised: main's
        ``__init__`` chain runs ours when it gets there)."""
        if not isinstance(twinclass, type) or "__pycompart_twin__" not in twinclass.__dict__ \
                or not isinstance(main, MainRef):
            raise TypeError("malformed twin request")
        twin = twinclass.__new__(twinclass)
        object.__setattr__(twin, "_pc_main", main)
        self.touched(twin)
        return refs.AsReference(twin)

    def touched(self, obj: Any, pinned: bool = False) -> None:
        """``obj`` reached our code in this operation (or main pinned it): if
        it is a twin, ``watch_twins`` looks at it afterwards. Only twins our
        code could have just taken hold of are looked at, not all of them."""
        if "__pycompart_twin__" not in type(obj).__dict__:
            return
        if pinned:
            object.__setattr__(obj, "_pc_pinned", True)
        where = self._pinned if pinned else self._touched
        if len(where) < MAX_WATCHED_TWINS:
            try:
                where[id(obj)] = weakref.ref(obj)
            except TypeError:
                pass  # no weak references (__slots__): lent weakly, as before

    def watch_twins(self, peer: refs.Peer, result: Any) -> None:
        """After an operation main asked for: main lends its instances
        weakly (its instance keeps its twin, not the other way round), so
        the instance of a twin our code now holds (a registry it was added
        to) is pinned in main for as long as we hold it, and unpinned when
        we no longer do. ``result`` is the reply's value, not a holder."""
        touched, self._touched = self._touched, {}
        for key, ref in [*touched.items(), *list(self._pinned.items())]:
            twin = ref()
            if twin is None:
                self._pinned.pop(key, None)
                continue
            main = twin.__dict__.get("_pc_main")
            if not isinstance(main, MainRef) or main._pc_peer is not peer:
                continue
            # Ours when nobody holds it: this frame's ``twin`` and
            # getrefcount's argument, and the export to main.
            base = 2 + peer.exports.contains(twin) \
                + (result is twin or (type(result) is refs.AsReference and result.obj is twin))
            held = sys.getrefcount(twin) > base
            if held != twin.__dict__.get("_pc_pinned", False):
                try:
                    MainRef.call_out([main, held], "@pin")
                except Exception:
                    continue  # main refused (bounded there); try again later
                object.__setattr__(twin, "_pc_pinned", held)
            if held and len(self._pinned) < MAX_WATCHED_TWINS:
                self._pinned[key] = ref
            elif not held:
                self._pinned.pop(key, None)
            del twin

    def op_unpickle(self, data: Any) -> Any:
        """Objects main pickled here before (``pickle`` of a reference): only
        in a sandbox, whose main is trusted; pickle runs what the bytes say."""
        if not self.trusts_main:
            raise EntrypointError(f"compartment {self.compartment!r} is not a sandbox: it does "
                                  "not unpickle what main sends")
        if type(data) is not bytes:
            raise TypeError("pickled bytes")
        import pickle  # here: only a sandbox unpickles, and every instance would pay its import
        return pickle.loads(data)

    def op_twinset(self, twin: Any, name: Any, value: Any) -> bool:
        """Main writes a name new to its instance: set it here if the twin
        has it (True), else record that it is main's (False)."""
        self._check_target(twin)
        if "__pycompart_twin__" not in type(twin).__dict__ or type(name) is not str:
            raise TypeError("malformed twin request")
        d = object.__getattribute__(twin, "__dict__")
        if name in d:
            setattr(twin, name, value)
            return True
        d.setdefault("_pc_main_names", set()).add(name)
        return False

    def op_callsuper(self, twin: Any, cls: Any, name: Any, args: Any, kwargs: Any) -> Any:
        """``cls.name(twin, ...)``: the implementation of ``name`` in ``cls``'s
        ancestry (ours), not the twin's stub of main's override."""
        protocols.check_arguments(args, kwargs)
        return self._super(twin, cls, name)(*args, **kwargs)

    def op_getsuper(self, twin: Any, cls: Any, name: Any) -> Any:
        return self._super(twin, cls, name)

    def _super(self, twin: Any, cls: Any, name: Any) -> Any:
        self._check_target(twin)
        if not isinstance(cls, type) or not isinstance(twin, cls):
            raise TypeError("not a twin of that class")
        self.check_name(name, target=cls)
        for klass in cls.__mro__:
            if name in klass.__dict__:
                raw = klass.__dict__[name]
                return raw.__get__(twin, type(twin)) if hasattr(raw, "__get__") else raw
        raise AttributeError(f"{cls.__qualname__!r} has no attribute {name!r}")

    def op_delattr(self, target: Any, name: Any) -> None:
        self._check_target(target)
        if not self.allow_setattr:
            raise PermissionError(f"deleting attributes in compartment {self.compartment!r} is not "
                                  "allowed (spec: allow_setattr)")
        name = self.check_name(name, target=target)
        self._keep_dunder(target, name)
        delattr(target, name)

    def _keep_dunder(self, target: Any, name: str) -> bool:
        """main's monkeypatch of a module's ``__spec__`` or ``__file__``:
        what it was before main's first change is kept, to be put back
        (``op_setattr`` with END). Whether ``name`` is such a dunder."""
        if not (isinstance(target, types.ModuleType) and name.startswith("__") and name.endswith("__")):
            return False
        key = (target.__name__, name)
        if key not in self._dunders and len(self._dunders) < MAX_DUNDERS:
            self._dunders[key] = target.__dict__.get(name, _MISSING)
        return True

    def op_call(self, target: Any, args: Any, kwargs: Any) -> Any:
        self._check_target(target)
        protocols.check_arguments(args, kwargs)
        if not callable(target):
            raise TypeError(f"{_describe(target)} is not callable")
        return target(*args, **kwargs)

    def op_callmethod(self, target: Any, name: Any, args: Any, kwargs: Any) -> Any:
        self._check_target(target)
        protocols.check_arguments(args, kwargs)
        method = getattr(target, self.check_name(name, target=target))
        if self.guarded and not self.owns(method):
            # ``Store.helper = staticmethod(os.system)``: reached through an
            # object of its own, still not its code.
            raise PermissionError(f"compartment {self.compartment!r} serves its callers only its own "
                                  f"code; {name!r} of {_describe(target)} is not")
        return method(*args, **kwargs)

    def op_protocol(self, target: Any, op: Any, args: Any) -> Any:
        self._check_target(target)
        fn = _PROTOCOL.get(op) if type(op) is str else None
        if fn is None or type(args) is not list:
            raise TypeError(f"unknown operation {op!r}")
        if op == "dir":
            return sorted(n for n in dir(target) if exposed(n, self.expose))
        if op == "type":
            self.check_name("__class__", target=target)
        if op == "pickle" and not self.trusts_main:
            raise EntrypointError(f"compartment {self.compartment!r} is not a sandbox: its objects "
                                  "are not pickled for main")
        if op in ("describe", "describe_method"):
            self.check_name("__signature__", target=target)  # a safebox keeps them
        if op == "describe_method":
            if len(args) != 1:
                raise TypeError("describe_method takes a name")
            return protocols.describe_callable(
                getattr(target, self.check_name(args[0], target=target)))
        return fn(target, *args)

    def _check_target(self, target: Any) -> None:
        if isinstance(target, MainRef):
            raise TypeError("the target of an operation must be an object of this compartment")
        if self.guarded and not self.owns(target):
            raise PermissionError(f"compartment {self.compartment!r} serves its callers only its own "
                                  f"objects (of its modules {', '.join(self.modules) or '(none)'}); "
                                  f"{_describe(target)} is not one")

    def owns(self, obj: Any) -> bool:
        """Whether ``obj`` is the compartment's own: what a guarded server
        lets a caller use, as a target or as an argument. Decided by
        identity, never by what an object says of itself (``__module__``):
        a placed module as ``sys.modules`` holds it; a function whose
        globals are such a module's; a class its module holds under its
        name, or one whose methods are such functions (made by its code);
        an instance of such a class; a method bound to such an object; and
        what can only have come from its code (containers and generators it
        handed out: a caller names objects only by handles the compartment
        gave it, or by paths to its modules, classes and functions)."""
        if isinstance(obj, types.ModuleType):
            name = obj.__name__
            return isinstance(name, str) and self.placed(name) and sys.modules.get(name) is obj
        if isinstance(obj, types.FunctionType):
            return self._own_globals(obj.__globals__)
        if isinstance(obj, types.BuiltinFunctionType):  # also builtin methods
            owner = obj.__self__  # its module, or the object it is bound to
            return owner is not None and owner is not obj and self.owns(owner)
        if isinstance(obj, types.MethodType):
            return self.owns(obj.__self__) and self._own_callable(obj.__func__)
        if isinstance(obj, type):
            return self._own_class(obj)
        cls = type(obj)
        if cls in SHARED_MUTABLE or cls in _OWN_KINDS or cls is protocols.Private:
            return True  # (a Private: the iterator made here for iter() of an object of its own)
        if cls is protocols.Pushback:
            return self.owns(obj.it)
        return self._own_class(cls) or self._own_callable(obj)

    def _own_callable(self, fn: Any) -> bool:
        """A function of its own, or a wrapper of one (``functools.wraps``,
        ``lru_cache``): decorated code of its modules."""
        import inspect

        for _ in range(8):
            if isinstance(fn, types.FunctionType):
                return self._own_globals(fn.__globals__)
            fn = inspect.getattr_static(fn, "__wrapped__", None) if fn is not None else None
            if fn is None:
                return False
        return False

    def _own_globals(self, namespace: Any) -> bool:
        name = namespace.get("__name__") if type(namespace) is dict else None
        module = sys.modules.get(name) if isinstance(name, str) else None
        return module is not None and self.placed(name) and module.__dict__ is namespace

    def _own_class(self, cls: type) -> bool:
        found = self._own_classes.get(cls)
        if found is not None:
            return found
        module, qualname = cls.__dict__.get("__module__"), cls.__dict__.get("__qualname__")
        own = False
        if isinstance(module, str) and self.placed(module):
            try:
                own = isinstance(qualname, str) and self._resolve(module, qualname) is cls
            except Exception:
                own = False
            if not own:  # made by its code (in a function, by a factory): its methods say so
                own = any(self._own_callable(getattr(v, "__func__", v)) for v in list(cls.__dict__.values())[:256])
        self._own_classes[cls] = own
        return own

    def check_used(self, obj: Any) -> None:
        """An object a caller handed back (``EXT_YOURS``): a guarded server
        takes back only its own (a handle to anything else it handed out,
        a generator's code, a logger, is for looking at, not for use)."""
        if self.guarded and not self.owns(obj):
            raise PermissionError(f"compartment {self.compartment!r} takes from its callers only "
                                  f"its own objects; {_describe(obj)} is not one")
        self.touched(obj)


def _instance_dict(obj: Any) -> Any:
    """The instance's own attributes (a function stored there is not a
    method: it does not bind)."""
    try:
        d = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return ()
    return d if type(d) is dict else ()


#: Twins whose holders ``watch_twins`` follows.
MAX_WATCHED_TWINS = 4096


#: Objects of builtin types a guarded server still serves (they are what
#: the compartment's own code returned or made: its generators, iterators).
_OWN_KINDS = frozenset({types.GeneratorType, types.AsyncGeneratorType, types.CoroutineType,
                        tuple, frozenset, type(iter([])), type(iter(())), type(iter({})),
                        type(iter(range(0))), type({}.items()), type({}.keys()), type({}.values())})

#: Module dunders main may change and put back (``op_setattr``), at most.
MAX_DUNDERS = 256
_MISSING = object()

#: Mutable containers an attribute read hands over by reference.
SHARED_MUTABLE = frozenset({list, dict, set, bytearray, collections.defaultdict,
                            collections.OrderedDict, collections.Counter, collections.deque})


def _kind(value: Any, name: str) -> str:
    if isinstance(value, staticmethod):
        return "staticmethod"
    if isinstance(value, classmethod):
        return "classmethod"
    if isinstance(value, property):
        return "property"
    import inspect

    # (A function, or a builtin's method: not any object with __get__, which
    # a lazy class property is too, whose value is what is read.)
    if inspect.isfunction(value) or isinstance(value, _METHOD_KINDS):
        return "special" if name.startswith("__") and name.endswith("__") else "method"
    return "data"


_METHOD_KINDS = (types.MethodDescriptorType, types.WrapperDescriptorType, types.BuiltinFunctionType,
                 types.ClassMethodDescriptorType)


def _stub(name: str, kind: str) -> Any:
    """A method of main's subclass, in the twin's class: a call into main."""
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return MainRef.call_out([self._pc_main, name, list(args), kwargs], "@callmethod")
    method.__name__ = name
    if kind == "property":
        return property(lambda self: MainRef.call_out([self._pc_main, name], "@getattr"))
    if kind in ("staticmethod", "classmethod"):
        # Main's class runs them (as main's class: ``cls`` is main's).
        def on_class(cls: Any, *args: Any, **kwargs: Any) -> Any:
            return MainRef.call_out([cls._pc_main_class, name, list(args), kwargs], "@callmethod")
        on_class.__name__ = name
        return classmethod(on_class)
    return method


def _twin_getattr(self: Any, name: str) -> Any:
    """An attribute the twin lacks: main's instance may have it."""
    if name.startswith(("_pc_", "__pycompart")) or name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    try:
        main = object.__getattribute__(self, "_pc_main")
    except AttributeError:
        raise AttributeError(name) from None
    value = MainRef.call_out([main, name], "@getattr")
    names = self.__dict__.setdefault("_pc_main_names", set())
    names.add(name)
    return value


def _twin_setattr(self: Any, name: str, value: Any) -> None:
    if name in self.__dict__.get("_pc_main_names", ()):
        MainRef.call_out([object.__getattribute__(self, "_pc_main"), name, value], "@setattr")
    else:
        object.__setattr__(self, name, value)


def _describe(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return f"module {obj.__name__!r}"
    if isinstance(obj, type):
        return f"class {obj.__qualname__!r}"
    return f"{type(obj).__qualname__!r} object"


def _isinstance(obj: Any, cls: Any) -> bool:
    if not isinstance(cls, type):
        raise TypeError("isinstance() needs a class of this compartment")
    return isinstance(obj, cls)


def _issubclass(obj: Any, cls: Any) -> bool:
    if not isinstance(cls, type) or not isinstance(obj, type):
        raise TypeError("issubclass() needs classes of this compartment")
    return issubclass(obj, cls)


def _pickle_dumps(obj: Any) -> bytes:
    import pickle  # here: only a sandbox pickles for main, and every instance would pay its import
    return pickle.dumps(obj, 4)


# Each takes exactly what main's proxies send: ``type(obj, bases, ns)`` would
# make a class, ``deepcopy(obj, memo)`` would write into a dict the caller
# chose (and read private state into it).
_PROTOCOL: dict[str, Callable[..., Any]] = dict(
    protocols.OPS, isinstance=_isinstance, issubclass=_issubclass, dir=lambda obj: dir(obj),
    type=lambda obj: type(obj), copy=lambda obj: copy.copy(obj), deepcopy=lambda obj: copy.deepcopy(obj),
    describe=lambda obj: protocols.describe_callable(obj),
    describe_method=lambda obj, name: None, pickle=lambda obj: _pickle_dumps(obj))  # (op_protocol checks the name first)


# -- references to main's objects, inside an instance ---------------------------------


class MainRef:
    """An object of ``main`` held by a compartment. Its proxy class defines
    the protocols the object's type has (``pycompart.wire.protocols``), each
    carried out by main, which serves them only if the compartment may call
    it (``may_call = ["main"]``); never its attributes."""

    __slots__ = ("_pc_peer", "_pc_handle", "_pc_count", "_pc_tname", *protocols.PROXY_SLOTS,
                 "__weakref__")
    call_out: Callable[..., Any]  # set by the instance: (request, op="@call", plain=False)

    def _pc_op(self, op: str, *args: Any) -> Any:
        return MainRef.call_out([self, op, list(args)], "@op")

    def __repr__(self) -> str:
        try:
            return self._pc_op("repr")
        except Exception:
            return f"<{self._pc_tname} object of main>"

    def __str__(self) -> str:
        try:
            return self._pc_op("str")
        except Exception:
            return f"<{self._pc_tname} object of main>"

    def __reduce__(self) -> Any:
        raise TypeError("a reference to an object of main cannot be pickled")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_pc_"):
            raise AttributeError(name)
        raise AttributeError(f"{self._pc_tname!r} object of main has no attribute {name!r} for "
                             "compartments: main's objects are used through their protocols "
                             "(operators, iteration, len, calls), not their attributes")

    def __del__(self) -> None:
        try:
            self._pc_peer.released(self._pc_handle, self._pc_count)
        except Exception:
            pass


class Callback(MainRef, protocols.Described):
    """A callable of ``main``: calling it runs it in main (``may_call``).
    It has the callable's name, docstring and signature (asked of main
    once, when first needed), for code that inspects callables."""

    #: ``__dict__``: attributes the compartment's code sets on it
    #: (``f.__click_params__ = []``, ``f.__doc__ = ...``) live here, in the
    #: compartment, never on main's object (``__setattr__``).
    __slots__ = ("_pc_signature", "__dict__")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not kwargs and refs.plain(args):
            return MainRef.call_out([self, list(args), kwargs], "@call", True)
        return MainRef.call_out([self, list(args), kwargs])

    def __setattr__(self, name: str, value: Any) -> None:
        # Kept alive while it has attributes of ours (so main's next hand-over
        # of the same callable arrives as this proxy, with them), up to a
        # bound; main's object is not touched.
        if name.startswith("_pc_"):
            object.__setattr__(self, name, value)  # the proxy's own slots
            return
        if not self.__dict__:
            if len(_NOTED) >= MAX_NOTED_CALLBACKS:
                raise AttributeError(f"cannot set {name!r}: more than {MAX_NOTED_CALLBACKS} "
                                     "callbacks of main already carry attributes set here")
            _NOTED.append(self)
        self.__dict__[name] = value

    def _pc_described(self) -> dict[str, Any]:
        try:
            found = object.__getattribute__(self, "_pc_signature")
        except AttributeError:
            found = None
        if found is None:
            try:
                found = MainRef.call_out([self, "describe", []], "@op")
            except Exception:
                found = {}
            if type(found) is not dict:
                found = {}
            object.__setattr__(self, "_pc_signature", found)
        return found


    def __getattr__(self, name: str) -> Any:
        # (__name__ and __qualname__ are not in any class dictionary of an
        # instance's: they get here.)
        if name == "__name__":
            return self._pc_described().get("name") or "callback"
        if name == "__qualname__":
            return self._pc_described().get("qualname") or self.__name__
        if name == "__dict__" or name.startswith("_pc_"):
            raise AttributeError(name)
        return MainRef.__getattr__(self, name)


#: Callbacks of main that carry attributes set in the compartment.
MAX_NOTED_CALLBACKS = 4096
_NOTED: list[Callback] = []


def _described(key: str, default: str | None) -> property:
    def get(self: Any) -> Any:
        if key in self.__dict__:
            return self.__dict__[key]
        return self._pc_described().get(key[2:-2]) or default

    def set_(self: Any, value: Any) -> None:
        Callback.__setattr__(self, key, value)
    return property(get, set_)


#: On the classes of callbacks (each proxy class's own dictionary has these
#: names, so they are set there): the callable's docstring and module, as
#: main describes them unless the compartment's code set them.
_CALLBACK_INFO = {
    "__doc__": _described("__doc__", None),
    "__module__": _described("__module__", "main"),
}


class MainStream(MainRef):
    """A file object of ``main``, handed over: its I/O methods and a few
    attributes (``refs.STREAM_METHODS``/``STREAM_ATTRS``) work, served by
    main. Needs no ``may_call``: it is a capability, not code."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name in refs.STREAM_METHODS:
            return lambda *args: MainRef.call_out([self, name, list(args), {}], "@callmethod")
        if name in refs.STREAM_ATTRS:
            return MainRef.call_out([self, name], "@getattr")
        raise AttributeError(f"{name!r}: a file object of main only offers "
                             f"{', '.join(sorted(refs.STREAM_METHODS | refs.STREAM_ATTRS))}")

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __repr__(self) -> str:
        return f"<file object of main: {self._pc_tname}>"


_proxy_classes: dict[int, type] = {}
#: The proxy classes named after main's types, by (flags, type name).
_named_classes: dict[tuple[int, str], type] = {}
#: At most this many named classes (past it, proxies of other types are
#: of their protocol set's class, named MainRef).
MAX_NAMED_CLASSES = 1024


def _named_proxy_class(flags: int, tname: str) -> type:
    """The proxy class for main's objects of type ``tname``: named as that
    type is, so that what Python says of the object (``unsupported operand
    type(s) for +: 'Thing' and 'int'``, ``'Thing' object is not iterable``,
    ``type(x).__name__``) reads as it does unboxed."""
    flags &= refs.ALL_FLAGS
    key = (flags, tname)
    cls = _named_classes.get(key)
    if cls is not None:
        return cls
    base = _main_proxy_class(flags)
    if len(_named_classes) >= MAX_NAMED_CLASSES or not tname or tname.startswith("pycompart."):
        return base  # (pycompart's: main's stand-in for another compartment's object)
    module, _, qualname = tname.rpartition(".")
    ns: dict[str, Any] = {"__slots__": (), "__qualname__": qualname, "__module__": module or "builtins",
                          "__doc__": base.__dict__.get("__doc__")}
    try:
        cls = type(qualname, (base,), ns)
    except (TypeError, ValueError):  # a name Python will not take for a class
        return base
    if issubclass(base, Callback):
        # A callback's docstring and module are the callable's (type() and
        # Described gave the class its own).
        for name, value in _CALLBACK_INFO.items():
            setattr(cls, name, value)
    _named_classes[key] = cls
    return cls


def _main_proxy_class(flags: int) -> type:
    flags &= refs.ALL_FLAGS
    cls = _proxy_classes.get(flags)
    if cls is None:
        if flags & refs.F_STREAM:
            base, ns = MainStream, {}  # a stream is only its I/O
        else:
            base = Callback if flags & refs.F_CALL else MainRef
            ns = protocols.proxy_namespace(flags)
            ns.update(protocols.abc_namespace(flags))  # d.items(), d.update(x), ...
        ns["__slots__"] = ()
        bases: tuple[type, ...] = (base,)
        if flags & protocols.F_TZINFO and base is MainRef:
            # A datetime of ours may carry it: its offsets are main's (``@op``).
            bases = (base, datetime.tzinfo)
            for name in protocols.TZINFO_OPS:
                ns[name] = _main_tz_method(name)
        cls = type(base.__name__, bases, ns)
        if base is Callback:
            for key, value in _CALLBACK_INFO.items():
                setattr(cls, key, value)
        if len(_proxy_classes) < 4096:
            _proxy_classes[flags] = cls
    return cls


def _main_tz_method(name: str) -> Callable[[Any, Any], Any]:
    def method(self: MainRef, dt: Any) -> Any:
        return MainRef.call_out([self, name, [dt]], "@op")
    method.__name__ = name
    return method


class MainClass(type):
    """Metaclass of the stand-ins of main's classes: ``isinstance`` and
    ``issubclass`` are answered by main, calling one makes an instance in
    main (a callback). Exception classes of main's become real exception
    classes here instead (``_main_exception_class``), so that ``raise``
    and ``except`` work."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return MainRef.call_out([cls._pc_ref, list(args), kwargs])

    def __instancecheck__(cls, obj: Any) -> bool:
        if not isinstance(obj, MainRef) or obj._pc_peer is not cls._pc_ref._pc_peer:
            return False
        return bool(obj._pc_op("isinstance", cls._pc_ref))

    def __subclasscheck__(cls, sub: Any) -> bool:
        if sub is cls:
            return True
        if not isinstance(sub, MainClass) or sub._pc_ref._pc_peer is not cls._pc_ref._pc_peer:
            return False
        return bool(sub._pc_ref._pc_op("issubclass", cls._pc_ref))

    def __repr__(cls) -> str:
        return f"<class {cls._pc_name!r} of main>"


#: Builtin exception classes a compartment may see raised from main (main is
#: not protected from itself: StopIteration and friends arrive as themselves).
BOX_EXCEPTIONS = dict(ALLOWED_EXCEPTIONS, StopIteration=StopIteration,
                      StopAsyncIteration=StopAsyncIteration, GeneratorExit=GeneratorExit,
                      KeyboardInterrupt=KeyboardInterrupt, SystemExit=SystemExit,
                      BaseException=BaseException, Warning=Warning, UserWarning=UserWarning,
                      DeprecationWarning=DeprecationWarning, RuntimeWarning=RuntimeWarning,
                      FutureWarning=FutureWarning, PendingDeprecationWarning=PendingDeprecationWarning)


def _main_exception_class(ref: MainRef, name: str, mro: list[str]) -> type:
    base: type = Exception
    for ancestor in mro[1:]:
        builtin = BOX_EXCEPTIONS.get(ancestor)
        if builtin is not None:
            base = builtin
            break
    module, _, qualname = name.rpartition(".")
    ns = {"__module__": module or "main", "__qualname__": qualname, "_pc_ref": ref,
          "_pc_name": name}
    try:
        return type(qualname.rpartition(".")[2] or "MainError", (base,), ns)
    except TypeError:
        return type(qualname.rpartition(".")[2] or "MainError", (Exception,), ns)


def instance_peer(server: ObjectServer) -> refs.Peer:
    """The instance's Peer for its channel to main."""

    def make_proxy(peer: refs.Peer, handle: int, type_key: str, flags: int, tname: str) -> MainRef:
        if not server.main_zones:
            flags &= ~protocols.F_TZINFO  # main would not serve its offsets: not a tzinfo here
        ref = object.__new__(_named_proxy_class(flags, tname))
        set_ = object.__setattr__  # (a Callback's own __setattr__ is for the compartment's code)
        set_(ref, "_pc_peer", peer)
        set_(ref, "_pc_handle", handle)
        set_(ref, "_pc_count", 1)
        set_(ref, "_pc_tname", tname)
        set_(ref, "_pc_buffer", None)
        set_(ref, "_pc_hash", None)
        set_(ref, "_pc_batch", protocols.initial_batch(flags))
        return ref

    def make_class(peer: refs.Peer, handle: int, flags: int, name: str, mro: list[str]) -> type:
        # The class object itself, as a reference (for calls and questions).
        ref = make_proxy(peer, handle, "", flags & ~(refs.F_CLASS | refs.F_EXCEPTION), name)
        if flags & refs.F_EXCEPTION:
            cls = _main_exception_class(ref, name, mro)
        else:
            module, _, qualname = name.rpartition(".")
            cls = MainClass(qualname.rpartition(".")[2] or "MainClass", (), {
                "__module__": module or "main", "__qualname__": qualname, "_pc_ref": ref,
                "_pc_name": name})
        # Counted on the reference (its __del__ releases); the class holds it.
        return cls

    def reference(peer: refs.Peer, value: Any) -> Any:
        if isinstance(value, MainRef) and value._pc_peer is peer:
            return refs.going_home(peer, value)
        if type(value) is refs.AsReference:
            return peer.export(value)
        if "__pycompart_twin__" in type(value).__dict__:
            main = value.__dict__.get("_pc_main")
            if isinstance(main, MainRef) and main._pc_peer is peer:
                return refs.yours_ext(main._pc_handle)  # a twin goes home as main's instance
        ref = getattr(value, "_pc_ref", None) if isinstance(value, type) else None
        if isinstance(ref, MainRef) and ref._pc_peer is peer:
            return refs.yours_ext(ref._pc_handle)  # main's class, going home
        ext = server.path_of(value)
        if ext is None and isinstance(value, types.ModuleType) \
                and value.__name__.partition(".")[0] in sys.stdlib_module_names:
            if server.guarded:
                return refs.path_ext(value.__name__, "", "stdlib")  # the caller's own copy
            return peer.export(value)  # our own copy of a stdlib module, by reference
        return ext

    def from_path(peer: refs.Peer, module: str, qualname: str, kind: str, mro: list[str],
                  flags: int = 0) -> Any:
        if kind == "stdlib":  # a module of the standard library main passed: ours
            if qualname or module.partition(".")[0] not in sys.stdlib_module_names:
                raise LookupError(f"{module!r} is not a module of the standard library")
            found = sys.modules.get(module)
            if server.guarded:
                # Never imported on an untrusted caller's word (``antigravity``,
                # ``unittest.__main__``, or a file planted on the import path).
                if not isinstance(found, types.ModuleType):
                    raise PermissionError(f"module {module!r} is not imported in compartment "
                                          f"{server.compartment!r}")
                return found
            return found if isinstance(found, types.ModuleType) else importlib.import_module(module)
        obj = server.resolve(module, qualname)
        if server.guarded:
            # A path names its own module, class or function, not what it
            # reaches (``mod:os.system``, ``mod:json.codecs.builtins.exec``).
            names = (getattr(obj, "__name__", None), "") if isinstance(obj, types.ModuleType) else \
                (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
            if names != (module, qualname) or not server.owns(obj):
                raise PermissionError(f"{module}:{qualname} is not a module, class or function of "
                                      f"compartment {server.compartment!r}")
        return obj

    peer = refs.Peer(server.compartment, make_proxy, reference, from_path, make_class=make_class)
    # A guarded server checks every path it is sent: what it owns is what
    # its own code makes of its modules, which may change.
    peer.keep_paths = not server.guarded
    peer.tz_by_reference = True  # main's proxies of our tzinfos are tzinfos
    # A twin handed to our code: watch_twins looks at it; a guarded server
    # takes back only its own objects.
    peer.on_yours = server.check_used
    return peer


__all__ = ["ObjectServer", "MainRef", "Callback", "MainStream", "MainClass", "instance_peer"]
