"""Stand-ins in ``main`` for what lives in a module compartment.

* ``ModuleProxy``: what ``import yaml`` gives when ``yaml`` is placed in a
  compartment. Attribute reads go to the compartment; functions, classes and
  submodules come back as the stand-ins below and are cached.
* ``PathFunction``: a module-level function of the compartment, called by
  name on any instance (so it survives restarts).
* ``RemoteClass``: a class of the compartment. Calling it makes an instance
  over there and returns a ``RemoteObject``. ``isinstance(obj, cls)`` asks the
  compartment whether the remote object is an instance of the remote class.
  It cannot be subclassed in main.
* ``RemoteObject``: a reference to one object in one instance. It forwards
  attribute reads, method calls and the protocols its type supports (call,
  len, iteration, indexing, ``in``, context manager, bool, ==/hash, ordering,
  repr/str). Its proxy class defines only those, so ``callable()``,
  ``hasattr(x, "__iter__")`` and friends answer as they would locally.
* Exception stand-ins: an exception class of the compartment becomes a
  synthesized subclass of ``RemoteError`` (and of the builtin exception it
  derives from), built from names only; ``except yaml.YAMLError`` catches
  what the compartment raised. Nothing the compartment names is imported.

Requests go through ``Compartment.call``. A call made while this thread is
running a callback for an instance of the same compartment is nested in it
and goes to that instance (see ``pycompart.transport.channel``).
"""

from __future__ import annotations

import builtins
import datetime
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import CallTimeout, EntrypointError, ProtocolError, RemoteError, StaleReference
from ..transport.channel import serving, serving_any
from ..wire import protocols, refs
from ..wire.exceptions import ALLOWED_EXCEPTIONS, attach_traceback, plain, rebuild_exception
from .exceptions import imported_exception_class, standin_init, standin_reduce, standin_str
from .importhook import search_path
from .warn import reissue
from ..wire.protocol import Err, ErrorInfo, close_fds, leave_stack
from ..wire.refs import exposed
from . import subclass
from .subclass import glue_class, make_subclass

if TYPE_CHECKING:
    from ..policy.spec import CompartmentSpec
    from ..supervisor.monitor import InstanceHandle, Pool

def places(spec: CompartmentSpec, module: str, qualname: str = "") -> bool:
    """Whether ``module:qualname`` lives in ``spec``'s compartment."""
    for placed in spec.modules:
        if module == placed or module.startswith(placed + "."):
            return True
    return bool(qualname) and f"{module}:{qualname}" in spec.functions


def dotted_in(spec: CompartmentSpec, dotted: str) -> bool:
    return any(dotted.startswith(placed + ".") for placed in spec.modules) or \
        any(dotted == f.replace(":", ".") for f in spec.functions)


#: The keyword arguments of a call that has none, as the wire carries them.
_NO_KWARGS: dict[str, Any] = {}

#: Entries kept in each cache keyed by what a compartment sends (names,
#: type keys, protocol flags): a compartment must not grow main's memory by
#: naming ever new things.
MAX_CACHED = 4096


class Compartment:
    """``main``'s view of one module compartment: its pool and stand-ins."""

    def __init__(self, spec: CompartmentSpec, pool: Pool, on_timeout: Any = None, audit: Any = None,
                 monitor: Any = None):
        self.name = spec.name
        self.monitor = monitor
        self.audit = audit
        self.spec = spec
        self.pool = pool
        self.expose = frozenset(spec.expose)
        self.on_timeout = on_timeout
        # Keyed by names the compartment may choose: bounded (MAX_CACHED),
        # beyond that stand-ins are made afresh and not kept.
        self._paths: dict[tuple[str, str], Any] = {}
        self._standins: dict[str, type] = {}
        self._path_exts: dict[tuple[str, ...], refs.Ext] = {}
        self._glue: dict[tuple[str, ...], tuple[type, list[type]]] = {}
        #: Per module of the compartment's: warnings already shown (warn.py).
        self.warning_registry: dict[str, dict[Any, Any]] = {}
        self.warning_chars = 0  # of text its warning registries keep (frontend.warn)
        _live[self.name] = self
        self._lock = threading.RLock()
        #: ``call_plain`` may be used: no audit record to write, no fresh
        #: instance to start per call, and ``call`` not wrapped by a
        #: subclass (an edge's reports and cancel deferral) that it would skip.
        self.direct = audit is None and spec.on_demand is None and type(self).call is Compartment.call

    def _call_on_demand(self, op: str, args: list[Any]) -> Any:
        """``instances = "per-call"``: a fresh instance for this call, retired
        after it (what it returned by reference dies with it: such
        compartments should return plain data)."""
        if self.spec.on_demand != "per-call":
            raise EntrypointError(f"compartment {self.name!r} serves the connections a Broker hands "
                                  "it (instances = \"per-connection\"); it takes no calls of its own")
        timeout = self.spec.call_timeout
        with self.monitor.lease(self.name, None if timeout is None else time.monotonic() + timeout) as inst:
            return self._call(inst, op, args)

    def module(self, name: str) -> ModuleProxy:
        """A placed module as a proxy, without the import hook."""
        if not places(self.spec, name):
            raise ModuleNotFoundError(f"module {name!r} is not placed in compartment {self.name!r}")
        module = self.path_object(name, "", "module")
        _, is_package = self.call(None, "@import", [name, search_path()])
        if is_package:
            module.__path__ = []
        return module

    # -- requests -------------------------------------------------------------

    def call(self, inst: InstanceHandle | None, op: str, args: list[Any]) -> Any:
        if self.audit is not None:
            return self._call_audited(inst, op, args)
        return self._call(inst, op, args)

    def _call_audited(self, inst: InstanceHandle | None, op: str, args: list[Any]) -> Any:
        """``call`` with an audit record: the operation, and for a call, the
        name of what was called (never argument values)."""
        started = time.monotonic()
        outcome = "ok"
        try:
            return self._call(inst, op, args)
        except CallTimeout:
            outcome = "timeout"
            raise
        except Exception as exc:
            outcome = f"error:{type(exc).__qualname__}"
            raise
        finally:
            target = args[0] if args else None
            path = getattr(target, "__pycompart_path__", None)
            what = f"{path[1]}:{path[2]}" if path else (
                f"<{target._pc_tname} object>" if _is(target, RemoteObject) else "")
            if op in ("@getattr", "@callmethod") and len(args) > 1 and isinstance(args[1], str):
                what += f".{args[1]}"
            self.audit.record("call", caller="main", callee=self.name, entrypoint=op, target=what,
                              duration_ms=round((time.monotonic() - started) * 1000, 3),
                              outcome=outcome)

    def _call(self, inst: InstanceHandle | None, op: str, args: list[Any]) -> Any:
        parent = 0
        if inst is None and self.spec.on_demand is not None and not serving_any():
            return self._call_on_demand(op, args)
        if inst is None:
            for channel, rid in reversed(serving_any()):
                owner = getattr(channel, "instance", None)
                if owner is not None and owner.pool is self.pool and channel.failure is None:
                    inst, parent = owner, rid  # nested: that instance is waiting on us
                    break
            else:
                timeout = self.spec.call_timeout
                inst = self.pool.pick(None if timeout is None else time.monotonic() + timeout)
        else:
            self.check_alive(inst)
            parent = serving(inst.channel)
        stack = refs.sending_stack()
        handles: set[tuple[refs.Exports, int]] = set()  # what main hands over in this call (see _returned)
        try:
            stack.append(handles)
            payload = inst.peer.encode(args)  # type: ignore[attr-defined]
            fds = refs.take_outgoing_fds()
            try:
                return self._request(inst, op, payload, parent, fds)
            finally:
                close_fds(fds)  # (what an interrupt left before the channel sent them)
        finally:
            if stack and stack[-1] is handles:  # (inline: see ``sending_stack``)
                stack.pop()
            else:
                leave_stack(stack, handles)

    def call_plain(self, inst: InstanceHandle | None, op: str, request: list[Any]) -> Any:
        """``call`` of a request already in wire form (``refs.encode_wire``):
        plain arguments and this compartment's own objects. Main hands
        nothing over, so ``_call``'s bookkeeping of what it exports is
        skipped. For ``direct`` compartments only, outside callbacks (a call
        made inside one is nested in it: ``_call``)."""
        if inst is None:
            timeout = self.spec.call_timeout
            inst = self.pool.pick(None if timeout is None else time.monotonic() + timeout)
        else:
            self.check_alive(inst)
        return self._request(inst, op, refs.encode_wire(request), 0, [])

    def _request(self, inst: InstanceHandle, op: str, payload: bytes, parent: int, fds: list[int]) -> Any:
        """Send one request to ``inst`` and decode its reply."""
        timeout = self.spec.call_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        bound = refs.decode_deadline()  # (a hash or == asked while decoding a value)
        if bound is not None and (deadline is None or bound < deadline):
            deadline = bound
        channel = inst.channel
        try:
            reply = channel.request(op, payload, deadline, parent, fds=fds)
        except CallTimeout:
            if self.on_timeout is not None:
                self.on_timeout(self.name, op, inst.pid, timeout)
            raise
        peer: refs.Peer = inst.peer  # type: ignore[attr-defined]
        try:
            warned = channel.call_warnings
            if warned:
                found = warned.pop(reply.id, None)
                if found:
                    reissue(self, found)  # may raise (a filter says "error")
            got = channel.take_message_fds(("r", reply.id))
            if reply.__class__ is Err:
                close_fds(got)
                raise self.exception(reply.error)  # type: ignore[union-attr]
            try:
                return peer.decode(reply.value, got)  # type: ignore[union-attr]
            except ProtocolError as exc:
                # A value main refuses to build: the instance that sent it is
                # replaced (with whatever state it had), as for a broken frame.
                channel.fail(ProtocolError(f"compartment {self.name!r} sent a value main refused: "
                                           f"{exc}"), reason="refused value")
                raise
        finally:
            peer.decoded(("r", reply.id))

    def check_alive(self, inst: InstanceHandle) -> None:
        failure = inst.channel.failure
        if failure is None:
            return
        if any(other.generation > inst.generation for other in self.pool.ready):
            raise StaleReference(f"this reference points into an instance of compartment "
                                 f"{self.name!r} (pid {inst.pid}) that {inst.status_text} and was "
                                 "replaced; the object died with it")
        raise failure

    # -- exceptions -----------------------------------------------------------

    def exception(self, info: ErrorInfo) -> Exception:
        owner: Compartment | None = None
        if info.mro and info.mro[0] == info.type_name:
            # One of its classes, or (raised on through it from a compartment
            # it calls) a class of another compartment's: that one's stand-in.
            owner = self if dotted_in(self.spec, info.type_name) else _placing(info.type_name)
        if owner is not None:
            cls = owner.standin(info.mro)
            exc = cls.__new__(cls)
            BaseException.__init__(exc, *(plain(a) for a in info.args))
            exc.type_name, exc.message, exc.remote_traceback = (
                info.type_name, info.message, info.traceback)
            for key, value in info.attributes.items():
                if key.isidentifier() and not key.startswith("_") and key not in _RESERVED:
                    try:
                        setattr(exc, key, plain(value))
                    except Exception:  # a typed slot of the builtin base: the far side lied
                        pass
            attach_traceback(exc, info, self.name)
            return exc
        return rebuild_exception(info, self.name, self.spec.allow_exit, imported_exception_class)

    def places_name(self, dotted: str) -> bool:
        """Whether ``module.Name`` is in a module placed in this compartment."""
        return dotted_in(self.spec, dotted)

    def standin(self, mro: list[str], built: dict[str, type] | None = None) -> type:
        """The stand-in class for the compartment's exception class ``mro[0]``.
        ``built``: the stand-ins made so far for one message, by name, kept
        whatever the cache's bound (``MAX_CACHED``): without it, a cache the
        compartment had filled left each base of a made-up MRO to be made
        again for every class after it (2**n: 3 s a warning)."""
        name = mro[0]
        built = {} if built is None else built
        with self._lock:
            cls = self._standins.get(name) or built.get(name)
            if cls is not None:
                return cls
            # Every base the class has that main can stand for: the
            # compartment's own (stand-ins) and builtins, in MRO order, each
            # once (an ancestor already in an earlier base's MRO is skipped).
            # Multiple inheritance (``class ParseError(ValueError,
            # TOMLKitError)``) keeps both sides: ``except TOMLKitError``.
            bases: list[type] = []
            covered: set[str] = set()
            for i, ancestor in enumerate(mro[1:], 1):
                if ancestor in covered:
                    continue
                base: type | None = None
                if dotted_in(self.spec, ancestor):
                    base = self.standin(mro[i:], built)
                else:
                    builtin = ALLOWED_EXCEPTIONS.get(ancestor)
                    if builtin is not None and builtin is not Exception:
                        base = builtin
                if base is not None:
                    bases.append(base)
                    covered.update(_names(base))
            if not any(issubclass(b, RemoteError) for b in bases):
                bases.insert(0, RemoteError)
            module, _, qualname = name.rpartition(".")
            ns = {"__module__": module, "__qualname__": qualname, "__str__": standin_str,
                  "__init__": standin_init, "__reduce__": standin_reduce,
                  "__pycompart_standin__": (self.name, name)}
            cls = None
            for candidate in (tuple(bases), tuple(bases[:2]), (RemoteError,)):
                try:
                    cls = type(qualname.rpartition(".")[2], candidate, ns)
                    break
                except TypeError:  # no consistent MRO, or incompatible builtin layouts
                    continue
            assert cls is not None
            built[name] = cls
            if len(self._standins) < MAX_CACHED:
                self._standins[name] = cls
            return cls

    # -- stand-ins by name ----------------------------------------------------------

    def from_path(self, peer: refs.Peer, module: str, qualname: str, kind: str, mro: list[str],
                  flags: int = 0) -> Any:
        if kind == "stdlib" and not qualname:
            # A module of the standard library a guarded compartment names:
            # ours, if we have imported it (nothing is imported on its word).
            found = sys.modules.get(module)
            if module.partition(".")[0] in sys.stdlib_module_names and isinstance(found, types.ModuleType):
                return found
            raise ProtocolError(f"compartment {self.name!r} named the module {module!r}, which is "
                                "not a module of the standard library imported here")
        if not places(self.spec, module, qualname):
            raise ProtocolError(f"compartment {self.name!r} named {module}:{qualname}, which is not "
                                "placed in it")
        return self.path_object(module, qualname, kind, mro, flags)

    def path_object(self, module: str, qualname: str, kind: str, mro: list[str] | None = None,
                    flags: int = 0) -> Any:
        key = (module, qualname)
        with self._lock:
            obj = self._paths.get(key)
            if obj is not None:
                return obj
            if kind == "module":
                existing = sys.modules.get(module)
                obj = existing if isinstance(existing, ModuleProxy) else ModuleProxy(self, module)
            elif kind == "exception" and mro:
                obj = self.standin(mro)
            elif kind == "class":
                obj = _remote_class(self, module, qualname, flags)
            else:
                obj = PathFunction(self, module, qualname, binds=kind == "function")
            if len(self._paths) < MAX_CACHED:
                self._paths[key] = obj
            return obj

    # -- subclasses in main of the compartment's classes -----------------------------

    def glue(self, box_class: type) -> tuple[type, list[type]]:
        """Main's class standing for ``box_class`` in the bases of a subclass
        main defines (``pycompart.frontend.subclass``), made once."""
        key = box_class.__pycompart_path__
        with self._lock:
            found = self._glue.get(key)
        if found is None:
            info = self.call(None, "@classinfo", [box_class])
            if type(info) is not dict or type(info.get("attrs")) is not dict:
                raise ProtocolError(f"compartment {self.name!r} described a class badly")
            found = glue_class(self, box_class, info)
            with self._lock:
                self._glue.setdefault(key, found)
        return found

    # -- the peer of one instance ---------------------------------------------------

    def make_peer(self) -> refs.Peer:
        peer = refs.Peer(self.name, self._make_proxy, self._reference, self.from_path)
        if not self.spec.allow_returned_callables:
            peer.returned = _returned
        return peer

    def _make_proxy(self, peer: refs.Peer, handle: int, type_key: str, flags: int, tname: str) -> Any:
        proxy = object.__new__(_proxy_class(flags))
        set_ = object.__setattr__
        set_(proxy, "_pc_peer", peer)
        set_(proxy, "_pc_handle", handle)
        set_(proxy, "_pc_count", 1)
        set_(proxy, "_pc_type", type_key)
        set_(proxy, "_pc_tname", tname)
        set_(proxy, "_pc_comp", self)
        set_(proxy, "_pc_inst", peer.instance)  # type: ignore[attr-defined]
        set_(proxy, "_pc_buffer", None)
        set_(proxy, "_pc_batch", protocols.initial_batch(flags))
        set_(proxy, "_pc_hash", None)
        return proxy

    def path_ext(self, path: tuple[str, ...]) -> refs.Ext:
        """The wire form of this compartment's module, class or function at
        ``path`` (its ``__pycompart_path__``)."""
        ext = self._path_exts.get(path)
        if ext is None:
            ext = refs.path_ext(path[1], path[2], path[3])
            if len(self._path_exts) < MAX_CACHED:
                self._path_exts[path] = ext
        return ext

    def _reference(self, peer: refs.Peer, value: Any) -> Any:
        if _is(value, RemoteObject):
            if value._pc_peer is peer:
                return refs.going_home(peer, value)
            return None  # another instance's object: passed on as one of main's
        if _is(value, (ModuleProxy, PathFunction)) or _is(value, RemoteClassMeta):
            path = value.__pycompart_path__
            if path[0] != self.name:
                return None  # another compartment's stand-in: passed on as one of main's
            return self.path_ext(path)
        if _is(value, types.ModuleType) and _stdlib_module(value):
            # A module of the standard library crosses by name: the
            # compartment uses its own copy (it reads the same stdlib).
            return refs.path_ext(value.__name__, "", "stdlib")
        if subclass.is_subclass_instance(value, self.name):
            # Main's instance of a subclass of one of our classes: the
            # compartment gets its twin, which is an instance of that class.
            twin = subclass.twin_of(value, peer.instance)  # type: ignore[attr-defined]
            if twin._pc_peer is peer:
                return refs.yours_ext(twin._pc_handle)
            return None
        if _is(value, type) and "__pycompart_standin__" in value.__dict__:
            comp, name = value.__pycompart_standin__
            if comp == self.name:
                module, _, qualname = name.rpartition(".")
                return refs.path_ext(module, qualname, "exception")
        return None  # exported (main's modules never get here: to_wire refuses them)


def _placing(dotted: str) -> Compartment | None:
    """The compartment (known here) whose modules hold ``dotted``."""
    for comp in list(_live.values()):
        if dotted_in(comp.spec, dotted):
            return comp
    return None


def _returned(peer: refs.Peer, obj: Any, handle: int) -> Any:
    """One of main's own objects, sent back by the compartment. Data comes
    back as itself. A callable (function, method, class, object with
    ``__call__``) comes back as itself only if main handed it over in the
    call now in progress (a decorator returning the function it was given);
    otherwise main would run whichever of its own functions the compartment
    chose, believing it called the compartment. It then arrives as a
    ``ReturnedCallable`` that refuses to be called."""
    if not callable(obj) or refs.sent_in_open_requests(peer.exports, handle) \
            or subclass.is_subclass_instance(obj, peer.compartment):
        # (An instance of main's subclass of the compartment's class is
        # one main lent it with its overrides: it comes back as itself.)
        return obj
    return ReturnedCallable(peer.compartment, obj)


class ReturnedCallable:
    """A callable of main's that a compartment sent back on its own: main
    never runs it on the compartment's word (spec: allow_returned_callables)."""

    __slots__ = ("_pc_compartment", "_pc_name", "_pc_obj")

    def __init__(self, compartment: str, obj: Any):
        self._pc_compartment = compartment
        self._pc_name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
        self._pc_obj = obj  # for main's callback gate: what the compartment asks to call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise EntrypointError(
            f"compartment {self._pc_compartment!r} returned {self._pc_name!r}, a callable of main's "
            "that main did not pass it in this call; pycompart does not let a compartment choose "
            "which of main's functions main runs (spec: allow_returned_callables = true)")

    def __repr__(self) -> str:
        return f"<callable of main {self._pc_name!r}, returned by compartment {self._pc_compartment!r}>"

    # Comparing it with main's own callable is safe (nothing of main's runs
    # but its __eq__) and what code that stored the callable expects.
    def __eq__(self, other: Any) -> bool:
        if type(other) is ReturnedCallable:
            other = other._pc_obj
        return bool(self._pc_obj == other)

    def __hash__(self) -> int:
        return hash(self._pc_obj)


_RESERVED = frozenset({"type_name", "message", "remote_traceback", "remote_compartment", "args",
                       "with_traceback", "add_note"})


_BUILTIN_NAMES = frozenset(vars(builtins))


_UNSET: Any = object()  # (a dunder deleted: ``ModuleProxy._pc_dunder``)


class ModuleProxy(types.ModuleType):
    """A module placed in a compartment, as seen from elsewhere."""

    __pycompart_proxy__ = True

    def __init__(self, comp: Compartment, name: str):
        types.ModuleType.__init__(self, name)
        self.__dict__["__pycompart_comp__"] = comp
        self.__dict__["__pycompart_path__"] = (comp.name, name, "", "module")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__pycompart"):
            raise AttributeError(name)
        comp: Compartment = self.__dict__["__pycompart_comp__"]
        if not exposed(name, comp.expose):
            raise AttributeError(f"module {self.__name__!r} (in compartment {comp.name!r}) does "
                                 f"not expose {name!r} (add it to the compartment's expose list)")
        if name == "__all__":
            return self._public_names()
        value = comp.call(None, "@getattr", [self, name])
        if _is(value, (ModuleProxy, PathFunction, RemoteClassMeta)) or (
                _is(value, type) and "__pycompart_standin__" in value.__dict__):
            self.__dict__[name] = value  # functions, classes, submodules do not change
        return value

    def _public_names(self) -> list[str]:
        """``__all__`` as ``from module import *`` in main may use it: the
        module's own ``__all__`` (or, without one, its public names, as
        Python would take them), never a name that would rebind one of
        main's builtins (``print``, ``open``, ``input``: a star import
        would hand the compartment main's own calls), nor a name the
        exposure policy hides."""
        comp: Compartment = self.__dict__["__pycompart_comp__"]
        try:
            names = comp.call(None, "@getattr", [self, "__all__"])
        except AttributeError:
            names = [n for n in comp.call(None, "@op", [self, "dir", []]) if not n.startswith("_")]
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ProtocolError(f"module {self.__name__!r} in compartment {comp.name!r} has an "
                                "__all__ that is not a list of names")
        bound = _star_importer_modules()
        kept = [n for n in names if n.isidentifier() and exposed(n, comp.expose)
                and n not in _BUILTIN_NAMES and n not in bound]
        dropped = sorted(set(names) - set(kept))
        if dropped:
            import warnings

            warnings.warn(f"module {self.__name__!r} (in compartment {comp.name!r}) lists "
                          f"{', '.join(map(repr, dropped[:10]))} in __all__: left out, a star import "
                          "does not rebind main's builtins or the modules main imported, or reach "
                          "hidden names", RuntimeWarning,
                          stacklevel=3)
        return kept

    def __dir__(self) -> list[str]:
        comp: Compartment = self.__dict__["__pycompart_comp__"]
        return list(comp.call(None, "@op", [self, "dir", []]))

    def __setattr__(self, name: str, value: Any) -> None:
        """``mod.FLAG = True``, ``mock.patch.object(mod, "f", ...)``: the
        module in the compartment changes (where its code looks), or the
        assignment fails loudly. Import machinery (dunders) stays local."""
        if name.startswith("__") and name.endswith("__") and self._pc_dunder(name, value):
            return
        comp: Compartment = self.__dict__["__pycompart_comp__"]
        if not comp.spec.allow_setattr:
            raise AttributeError(f"cannot set {name!r} on module {self.__name__!r}: it lives in "
                                 f"compartment {comp.name!r}, whose spec does not allow_setattr")
        self.__dict__.pop(name, None)
        comp.call(None, "@setattr", [self, name, value])

    def _pc_dunder(self, name: str, value: Any) -> bool:
        """A dunder set (or, ``value`` ``_UNSET``, deleted): True if done
        here. The import system's (``__spec__``, ``__file__``) stay on the
        proxy, and once the import is over, a plain value set on one goes to
        the compartment too (``monkeypatch.setattr(mod, "__spec__", None)``:
        the module's code looks at its own), the proxy's own value again
        puts back the compartment's (monkeypatch's undo). Others, as any
        attribute, once imported (``mod.__version__ = ...``)."""
        d = self.__dict__
        mine = d.get("__pycompart_dunders__")
        comp: Compartment = d["__pycompart_comp__"]
        if mine is None or name.startswith("__pycompart") or not comp.spec.allow_setattr \
                or not exposed(name, comp.expose):
            if value is _UNSET:
                super().__delattr__(name)
            else:
                super().__setattr__(name, value)
            return True
        if name not in mine:
            if value is _UNSET:
                d.pop(name, None)
                comp.call(None, "@delattr", [self, name])
                return True
            return False  # as any attribute
        if value is _UNSET:
            d.pop(name, None)
            comp.call(None, "@delattr", [self, name])
        else:
            super().__setattr__(name, value)
            if value is mine[name]:
                comp.call(None, "@setattr", [self, name, refs.END])  # END: as it was
            elif refs.plain((value,)):
                comp.call(None, "@setattr", [self, name, value])
        return True

    def __delattr__(self, name: str) -> None:
        if name.startswith("__") and name.endswith("__") and self._pc_dunder(name, _UNSET):
            return
        comp: Compartment = self.__dict__["__pycompart_comp__"]
        if not comp.spec.allow_setattr:
            raise AttributeError(f"cannot delete {name!r} from module {self.__name__!r} in "
                                 f"compartment {comp.name!r} (spec: allow_setattr)")
        self.__dict__.pop(name, None)
        comp.call(None, "@delattr", [self, name])

    def __repr__(self) -> str:
        comp: Compartment = self.__dict__["__pycompart_comp__"]
        return f"<module {self.__name__!r} in compartment {comp.name!r}>"


class PathFunction(protocols.Described):
    """A function of a module compartment, called by name."""

    def __init__(self, comp: Compartment, module: str, qualname: str, binds: bool = False):
        self._pc_comp = comp
        self._pc_binds = binds  # a Python function (not a builtin): binds as a method
        self.__pycompart_path__ = (comp.name, module, qualname, "function")
        self.__module__ = module
        self.__qualname__ = qualname
        self.__name__ = qualname.rpartition(".")[2]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        comp = self._pc_comp
        if not kwargs and comp.direct and refs.plain(args) and not serving_any():
            return comp.call_plain(None, "@call", [comp.path_ext(self.__pycompart_path__), list(args), _NO_KWARGS])
        return comp.call(None, "@call", [self, list(args), kwargs])

    def __get__(self, inst: Any, owner: Any = None) -> Any:
        if inst is None or not self._pc_binds:
            return self
        return types.MethodType(self, inst)

    def _pc_described(self) -> dict[str, Any]:
        found = self.__dict__.get("_pc_description")
        if found is None:
            found = _describe_remote(self)
            self.__dict__["_pc_description"] = found
        return found

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("_pc_", "__pycompart")) or not exposed(name, self._pc_comp.expose):
            raise AttributeError(name)
        return self._pc_comp.call(None, "@getattr", [self, name])

    def __repr__(self) -> str:
        return f"<function {self.__module__}.{self.__qualname__} in compartment {self._pc_comp.name!r}>"

    def __reduce__(self) -> Any:
        raise TypeError("a function of another compartment cannot be pickled")


class RemoteClassMeta(type):
    """Metaclass of the classes of a compartment, as seen from main."""

    def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any], **kwargs: Any) -> Any:  # noqa: N804
        # Only a class statement gets here (stand-ins are made with
        # type.__new__): main subclasses a class of the compartment.
        return make_subclass(RemoteClassMeta, name, bases, ns, kwargs)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._pc_comp.call(None, "@call", [cls, list(args), kwargs])

    def __getattr__(cls, name: str) -> Any:
        if name.startswith(("_pc_", "__pycompart")):
            raise AttributeError(name)
        comp: Compartment = type.__getattribute__(cls, "_pc_comp")
        if not exposed(name, comp.expose):
            raise AttributeError(f"{cls.__qualname__} (in compartment {comp.name!r}) does not "
                                 f"expose {name!r}")
        return comp.call(None, "@getattr", [cls, name])

    def __setattr__(cls, name: str, value: Any) -> None:
        """``Cls.FLAG = True``, ``mock.patch.object(Cls, ...)``: as for a
        module (``ModuleProxy.__setattr__``), the class in the compartment
        changes, or the assignment fails loudly; never only the stand-in."""
        if _local_to_standin(name):
            type.__setattr__(cls, name, value)
            return
        comp: Compartment = type.__getattribute__(cls, "_pc_comp")
        _check_settable(comp, name, f"class {cls.__qualname__!r}", "set")
        comp.call(None, "@setattr", [cls, name, value])

    def __delattr__(cls, name: str) -> None:
        if _local_to_standin(name):
            type.__delattr__(cls, name)
            return
        comp: Compartment = type.__getattribute__(cls, "_pc_comp")
        _check_settable(comp, name, f"class {cls.__qualname__!r}", "delete")
        comp.call(None, "@delattr", [cls, name])

    def __instancecheck__(cls, obj: Any) -> bool:
        remote_bases = getattr(type(obj), "__pycompart_remote_bases__", None)
        if remote_bases:  # an instance of main's subclass of one of its classes
            return any(base is cls or issubclass(base, cls) for base in remote_bases)
        if not _is(obj, RemoteObject) or obj._pc_comp is not cls._pc_comp:
            return False
        # Cached per type and per instance (type keys are the instance's own
        # numbering), on the instance's Peer: it goes with the instance.
        key = (obj._pc_type, cls.__pycompart_path__)
        cache = obj._pc_peer.answers
        answer = cache.get(key) if obj._pc_type else None
        if answer is None:
            answer = bool(obj._pc_comp.call(obj._pc_inst, "@op", [obj, "isinstance", [cls]]))
            if obj._pc_type and len(cache) < MAX_CACHED:
                cache[key] = answer
        return answer

    def __subclasscheck__(cls, sub: Any) -> bool:
        if sub is cls:
            return True
        remote_bases = getattr(sub, "__pycompart_remote_bases__", None) if _is(sub, type) else None
        if remote_bases:
            return any(base is cls or issubclass(base, cls) for base in remote_bases)
        if not _is(sub, RemoteClassMeta) or sub._pc_comp is not cls._pc_comp:
            return False
        return bool(cls._pc_comp.call(None, "@op", [sub, "issubclass", [cls]]))

    def __repr__(cls) -> str:
        return f"<class '{cls.__module__}.{cls.__qualname__}' in compartment {cls._pc_comp.name!r}>"


#: RemoteClassMeta with a metaclass's protocols, by ``protocols.CLASS_FLAGS``
#: bits (at most 64 of them, whatever a compartment sends).
_CLASS_METAS: dict[int, type] = {}


def _class_meta(flags: int) -> type:
    """The metaclass of a stand-in whose class's own metaclass has the
    protocols ``flags`` (``enum.EnumMeta``: iteration, ``len``, lookup by
    name): each carried out on the class in the compartment."""
    flags &= protocols.CLASS_FLAGS
    if not flags:
        return RemoteClassMeta
    meta = _CLASS_METAS.get(flags)
    if meta is None:
        ns = protocols.proxy_namespace(flags)
        ns["_pc_op"] = _class_op
        meta = _CLASS_METAS.setdefault(flags, type(f"RemoteClassMeta_{flags:x}", (RemoteClassMeta,), ns))
    return meta


def _class_op(cls: Any, op: str, *args: Any) -> Any:
    return type.__getattribute__(cls, "_pc_comp").call(None, "@op", [cls, op, list(args)])


def _check_settable(comp: Compartment, name: str, what: str, verb: str) -> None:
    """Whether main may set (or delete) ``name`` on ``what`` of ``comp``'s:
    its spec's ``allow_setattr``, and ``expose`` for private names."""
    if not comp.spec.allow_setattr:
        raise AttributeError(f"cannot {verb} {name!r} of {what}: it lives in compartment "
                             f"{comp.name!r}, whose spec does not allow_setattr")
    if not exposed(name, comp.expose):
        raise AttributeError(f"{what} (in compartment {comp.name!r}) does not expose {name!r}")


def _star_importer_modules() -> frozenset[str]:
    """If ``__all__`` is being read by ``from module import *``, the names
    the importing namespace binds to modules (``import json`` before it):
    a compartment's ``__all__`` listing ``json`` would have main's code use
    the compartment's object for it from then on."""
    try:
        frame = sys._getframe(3)  # (_public_names, __getattr__, the importer)
    except ValueError:
        return frozenset()
    import dis  # (here: a cost of main's start-up, and star imports are few)

    code = frame.f_code.co_code
    if not 0 <= frame.f_lasti < len(code) or code[frame.f_lasti] != dis.opmap["IMPORT_STAR"]:
        return frozenset()
    return frozenset(name for name, value in frame.f_locals.items()
                     if isinstance(value, types.ModuleType))


def _local_to_standin(name: str) -> bool:
    """Names a stand-in class keeps for itself: ours, and dunders (what
    ``functools``, ``abc`` and the import system set)."""
    return name.startswith(("_pc_", "__pycompart")) or (name.startswith("__") and name.endswith("__"))


def _remote_class(comp: Compartment, module: str, qualname: str, flags: int = 0) -> type:
    """The stand-in of a class; ``flags``: its metaclass's protocols."""
    specials, cell = subclass.unbound_specials(comp)
    ns = {"__module__": module, "__qualname__": qualname, "_pc_comp": comp,
          "__pycompart_path__": (comp.name, module, qualname, "class"), "__slots__": (),
          **specials}
    cls = type.__new__(_class_meta(flags), qualname.rpartition(".")[2], (), ns)
    cell.append(cls)
    return cls


# -- remote objects -----------------------------------------------------------------


_asking = threading.local()


class RemoteObject:
    """A reference to an object in one instance of a compartment."""

    __slots__ = ("_pc_peer", "_pc_handle", "_pc_count", "_pc_type", "_pc_tname", "_pc_comp",
                 "_pc_inst", *protocols.PROXY_SLOTS, "__weakref__")

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("_pc_", "__pycompart")):
            raise AttributeError(name)  # ours, never the compartment's
        comp = self._pc_comp
        if not exposed(name, comp.expose):
            raise AttributeError(f"{self._pc_tname} object (in compartment {comp.name!r}) does "
                                 f"not expose {name!r}")
        methods = self._pc_peer.methods.get(self._pc_type)
        if methods is not None and name in methods:
            return RemoteMethod(self, name)
        value = comp.call(self._pc_inst, "@getattr", [self, name])
        if value is refs.METHOD:
            peer = self._pc_peer
            if self._pc_type and len(peer.methods) < MAX_CACHED:
                names = peer.methods.setdefault(self._pc_type, set())
                if len(names) < MAX_CACHED:
                    names.add(name)
            return RemoteMethod(self, name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        comp = self._pc_comp
        _check_settable(comp, name, f"a {self._pc_tname} object", "set")
        comp.call(self._pc_inst, "@setattr", [self, name, value])

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete attributes of a {self._pc_tname} object of "
                             f"compartment {self._pc_comp.name!r}")

    def _pc_op(self, op: str, *args: Any) -> Any:
        return self._pc_comp.call(self._pc_inst, "@op", [self, op, list(args)])

    def __repr__(self) -> str:
        try:
            return self._pc_op("repr")
        except Exception:
            return f"<remote {self._pc_tname} object in compartment {self._pc_comp.name!r}>"

    def __str__(self) -> str:
        return self._pc_op("str")

    def __dir__(self) -> list[str]:
        return list(self._pc_op("dir"))

    @property  # type: ignore[misc]
    def __class__(self) -> Any:
        """The object's class in the compartment (its stand-in), as
        ``obj.__class__`` would be unboxed; ``type(obj)`` stays the proxy."""
        peer, key = self._pc_peer, self._pc_type
        cls = peer.classes.get(key) if key else None
        if cls is None:
            if not exposed("__class__", self._pc_comp.expose):
                return type(self)  # a safebox keeps its classes to itself
            if getattr(_asking, "now", False):
                return type(self)  # (isinstance() inside the round trip below)
            _asking.now = True
            try:
                cls = self._pc_op("type")
            except Exception:  # isinstance() asks too: it must not fail on a dead instance
                return type(self)
            finally:
                _asking.now = False
            if key and len(peer.classes) < MAX_CACHED:
                peer.classes[key] = cls
        return cls

    def __copy__(self) -> Any:
        return self._pc_op("copy")  # a copy made in the compartment

    def __deepcopy__(self, memo: Any) -> Any:
        return self._pc_op("deepcopy")

    def __reduce__(self) -> Any:
        comp = self._pc_comp
        if comp.spec.trust != "sandbox":
            raise TypeError(f"a reference to a {self._pc_tname} object of compartment "
                            f"{comp.name!r} cannot be pickled (only a sandbox's objects can)")
        # Pickled *there*: main keeps the bytes without reading them, and
        # unpickling asks that compartment to load them (a new object).
        return (_unpickle, (comp.name, self._pc_op("pickle")))

    def __del__(self) -> None:
        try:
            self._pc_peer.released(self._pc_handle, self._pc_count)
        except Exception:
            pass


class RemoteMethod(protocols.Described):
    """``obj.method`` of a remote object: calling it is one round trip."""

    __slots__ = ("obj", "name")

    def __init__(self, obj: RemoteObject, name: str):
        self.obj = obj
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        obj = self.obj
        comp = obj._pc_comp
        if not kwargs and comp.direct and not obj._pc_buffer and refs.plain(args) and not serving_any():
            return comp.call_plain(obj._pc_inst, "@callmethod",
                                   [refs.yours_ext(obj._pc_handle), self.name, list(args), _NO_KWARGS])
        return comp.call(obj._pc_inst, "@callmethod", [obj, self.name, list(args), kwargs])

    def __repr__(self) -> str:
        return f"<remote method {self.obj._pc_tname}.{self.name} in compartment {self.obj._pc_comp.name!r}>"

    def _pc_described(self) -> dict[str, Any]:
        try:
            found = self.obj._pc_op("describe_method", self.name)
        except Exception:
            return {}
        return found if type(found) is dict else {}

    @property
    def __name__(self) -> str:
        return self.name


def _tz_method(name: str) -> Callable[[Any, Any], Any]:
    def method(self: RemoteObject, dt: Any) -> Any:
        return self._pc_comp.call(self._pc_inst, "@callmethod", [self, name, [dt], {}])
    method.__name__ = name
    return method


def _call(self: RemoteObject, *args: Any, **kwargs: Any) -> Any:
    return self._pc_comp.call(self._pc_inst, "@call", [self, list(args), kwargs])


_classes: dict[int, type] = {}


def _proxy_class(flags: int) -> type:
    """The proxy class for a protocol set. Flags come from the compartment:
    only known bits count, and the classes kept are bounded."""
    # (Collection-method bits are for compartments' proxies of main's
    # objects; main reaches a compartment's methods by name anyway.)
    flags &= protocols.ALL_FLAGS & ~protocols.ALL_METHOD_FLAGS
    cls = _classes.get(flags)
    if cls is None:
        ns: dict[str, Any] = {"__slots__": ()}
        ns.update(protocols.proxy_namespace(flags))
        if flags & protocols.F_CALL:
            ns["__call__"] = _call
            ns["__signature__"] = property(lambda self: protocols.signature_from(
                _describe_remote(self)))
        bases: tuple[type, ...] = (RemoteObject,)
        if flags & protocols.F_TZINFO:
            # A datetime of main's may carry it: its offsets are the owner's.
            bases = (RemoteObject, datetime.tzinfo)
            for name in ("utcoffset", "dst", "tzname", "fromutc"):
                ns[name] = _tz_method(name)
        cls = type("RemoteObject", bases, ns)
        cls.__module__ = "pycompart.frontend.proxy"
        if flags & protocols.F_CALL:
            cls.__doc__ = property(lambda self: _describe_remote(self).get("doc"))  # type: ignore[assignment]
        if len(_classes) < MAX_CACHED:
            _classes[flags] = cls
    return cls


#: Compartments of the running App(s) by name, for unpickling references.
_live: weakref.WeakValueDictionary[str, Compartment] = weakref.WeakValueDictionary()


def _unpickle(compartment: str, data: bytes) -> Any:
    comp = _live.get(compartment)
    if comp is None:
        raise RuntimeError(f"cannot unpickle an object of compartment {compartment!r}: no "
                           "running App has a compartment of that name")
    return comp.call(None, "@unpickle", [data])


def _describe_remote(fn: Any) -> dict[str, Any]:
    """Names, docstring and parameters of a callable of a compartment's
    (``protocols.describe_callable``, answered there); {} if it cannot say."""
    try:
        if _is(fn, PathFunction):
            found = fn._pc_comp.call(None, "@op", [fn, "describe", []])
        else:
            found = fn._pc_op("describe")
    except Exception:
        return {}
    return found if type(found) is dict else {}


def _names(cls: type) -> set[str]:
    """The qualified names (as an ``ErrorInfo``'s ``mro`` has them) of the
    classes a stand-in or builtin class derives from."""
    out = set()
    for c in cls.__mro__:
        standin = c.__dict__.get("__pycompart_standin__")
        out.add(standin[1] if standin else c.__qualname__ if c.__module__ == "builtins"
                else f"{c.__module__}.{c.__qualname__}")
    return out


def _stdlib_module(module: types.ModuleType) -> bool:
    name = getattr(module, "__name__", None)
    return type(name) is str and name.partition(".")[0] in sys.stdlib_module_names \
        and sys.modules.get(name) is module


def _is(value: Any, kinds: Any) -> bool:
    """``isinstance`` by the real type: ``mock.Mock(spec=...)`` and friends
    fake ``__class__``, and must never pass for one of our stand-ins."""
    return issubclass(type(value), kinds)


def is_remote(value: Any) -> bool:
    """Whether ``value`` is a stand-in for something in a compartment."""
    return _is(value, (RemoteObject, RemoteMethod, ModuleProxy, PathFunction, RemoteClassMeta))


__all__ = ["Compartment", "ModuleProxy", "PathFunction", "RemoteClassMeta", "RemoteObject",
           "RemoteMethod", "is_remote"]
