"""``App``: the library face of pycompart.

An App holds a validated spec, the entrypoints registered against it, and,
while started, a ``Monitor``. Calling an ``Entrypoint`` while the app runs
crosses the call gate into an instance of its compartment; calling it when
the app is not running (or inside an instance) runs the function locally.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Generic, ParamSpec, TypeVar

from .. import compartment as _instance
from ..errors import (
    CallTimeout,
    CompartmentCrashed,
    CompartmentError,
    EntrypointError,
    PrivilegeError,
    PycompartError,
    ProtocolError,
)
from ..policy import resolution as policy
from ..policy.spec import AppSpec, CompartmentSpec, load_spec, load_spec_file
from ..supervisor import confine as main_lockdown
from ..supervisor.audit import AuditLog
from ..supervisor.identities import Identities
from ..supervisor.monitor import CommBreakEvent, Hooks, InstanceEvent, Monitor, Pool, TimeoutEvent
from ..wire import refs
from ..wire.config import EdgePlan, InstanceConfig, Lockdown
from ..wire.contract import Contract, function_key
from ..wire.exceptions import describe_exception, rebuild_exception
from ..wire.protocol import Err, close_fds
from .callbacks import CallbackGate
from .importhook import CompartmentFinder, UnboxedImportWarner
from .proxy import Compartment

P = ParamSpec("P")
R = TypeVar("R")

_UNSET: Any = object()


class Entrypoint(Generic[P, R]):
    """A function exposed by a compartment. Call it like the function."""

    def __init__(self, app: App, compartment: str, fn: Callable[P, R], key: str | None = None):
        self.app = app
        self.compartment = compartment
        self.__pycompart_function__ = fn
        self.key = key or function_key(fn)
        self._contract: Contract | None = None
        #: How an exception class it raises is found in main: never (it
        #: arrives as RemoteError), or (a rewritten program's segment,
        #: ``frontend.segments``) among the modules main has imported.
        self.resolve: Callable[[str], Any] | None = None
        functools.update_wrapper(self, fn)

    @property
    def contract(self) -> Contract:
        if self._contract is None:
            self._contract = Contract(self.__pycompart_function__, self.key)
        return self._contract

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        runtime = self.app._runtime
        if runtime is None:
            return self._without_runtime(args, kwargs, ...)
        return runtime.call(self, args, kwargs, _UNSET)

    def _without_runtime(self, args: Any, kwargs: Any, timeout: Any) -> R:
        """Not in a running app's main: in its own compartment's instance
        (or with no app running) the function itself; in an instance of
        another compartment, a call over the edge to this one
        (``pycompart.compartment.edges``), refused if there is none."""
        here = _instance.CURRENT
        if here is None or here.compartment == self.compartment:
            return self.__pycompart_function__(*args, **kwargs)
        from ..compartment import edges as _edges  # (an instance's: imported there already)

        return _edges.call(here, self.compartment, self.key, self.contract, args, kwargs, timeout)

    def options(self, *, timeout: float | None = _UNSET) -> Callable[P, R]:
        """This entrypoint with per-call options, e.g.
        ``parse.options(timeout=0.5)(data)``; ``timeout=None`` waits forever."""

        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            runtime = self.app._runtime
            if runtime is None:
                return self._without_runtime(args, kwargs, ... if timeout is _UNSET else timeout)
            return runtime.call(self, args, kwargs, timeout)
        return call

    def __repr__(self) -> str:
        return f"<entrypoint {self.key} in compartment {self.compartment!r}>"


class App:
    """A compartmentalized application.

    ``App(spec_dict)`` or ``App.from_spec("app.toml")`` (``App("app.toml")``
    is the same); register entrypoints with ``@app.entrypoint("compartment")``;
    ``with app:`` runs it.
    """

    def __init__(self, spec: Mapping[str, Any] | AppSpec | str | os.PathLike[str] | None = None, *,
                 on_termination: Callable[[InstanceEvent], Any] | None = None,
                 on_call_timeout: Callable[[TimeoutEvent], Any] | None = None,
                 on_comm_break: Callable[[CommBreakEvent], Any] | None = None):
        if isinstance(spec, AppSpec):
            self.spec = spec
        elif isinstance(spec, (str, os.PathLike)):
            self.spec = App.from_spec(spec).spec
        else:
            self.spec = load_spec(spec or {})
        self.hooks = Hooks()
        for hooks, fn in ((self.hooks.on_termination, on_termination),
                          (self.hooks.on_call_timeout, on_call_timeout),
                          (self.hooks.on_comm_break, on_comm_break)):
            if fn is not None:
                hooks.append(fn)
        self._entrypoints: dict[str, Entrypoint[Any, Any]] = {}
        self._runtime: _Runtime | None = None
        self._lock = threading.Lock()
        # Spec-declared functions, callable via app.function(...).
        for comp in self.spec.compartments.values():
            for key in comp.functions:
                self._entrypoints.setdefault(key, _declared(self, comp.name, key))

    @classmethod
    def from_spec(cls, path: str | os.PathLike[str], **hooks: Any) -> App:
        if _instance.CURRENT is not None:
            # Inside an instance the module defining entrypoints is being
            # imported only to find them: nothing here may start anything.
            return cls(AppSpec(name="instance", source=os.fspath(path), compartments=_Anything()))
        return cls(load_spec_file(path), **hooks)

    # -- declaring ----------------------------------------------------------------

    def entrypoint(self, compartment: str) -> Callable[[Callable[P, R]], Entrypoint[P, R]]:
        """Decorator: run this function inside ``compartment``."""
        if compartment not in self.spec.compartments:
            raise EntrypointError(f"compartment {compartment!r} is not defined in "
                                  f"{self.spec.source} (defined: "
                                  f"{', '.join(self.spec.compartments) or 'none'})")

        def register(fn: Callable[P, R]) -> Entrypoint[P, R]:
            if not callable(fn) or "<locals>" in getattr(fn, "__qualname__", "<locals>"):
                raise EntrypointError(f"{fn!r}: an entrypoint must be a module-level function")
            ep: Entrypoint[P, R] = Entrypoint(self, compartment, fn)
            with self._lock:
                if self._runtime is not None:
                    raise EntrypointError(f"{ep.key}: entrypoints must be registered before the "
                                          "app starts")
                old = self._entrypoints.get(ep.key)
                if old is not None and old.compartment != compartment:
                    raise EntrypointError(f"{ep.key} is already an entrypoint of compartment "
                                          f"{old.compartment!r}")
                self._entrypoints[ep.key] = ep
            return ep
        return register

    def function(self, key: str) -> Entrypoint[..., Any]:
        """The entrypoint declared in the spec as ``functions = [key]``.

        Its contract comes from the function's annotations if its module is
        already imported in this process; otherwise the return value is
        decoded without a declared type (plain data only: dict, list, str,
        bytes, numbers, bool, None)."""
        ep = self._entrypoints.get(key)
        if ep is None:
            raise EntrypointError(f"{key!r} is not an entrypoint of any compartment in "
                                  f"{self.spec.source}")
        return ep

    def on_termination(self, fn: Callable[[InstanceEvent], Any]) -> Callable[[InstanceEvent], Any]:
        self.hooks.on_termination.append(fn)
        return fn

    def on_call_timeout(self, fn: Callable[[TimeoutEvent], Any]) -> Callable[[TimeoutEvent], Any]:
        self.hooks.on_call_timeout.append(fn)
        return fn

    def on_comm_break(self, fn: Callable[[CommBreakEvent], Any]) -> Callable[[CommBreakEvent], Any]:
        self.hooks.on_comm_break.append(fn)
        return fn

    # -- running ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._runtime is not None

    def start(self, *, lazy: bool = False, import_hook: bool = False, confine_main: bool = False,
              main_path: str | None = None, read_also: list[str] | None = None, warm: bool = False) -> None:
        """Start the monitor and the instances.

        ``lazy``: start each compartment's instances on its first use instead
        (``shared`` data is then read from main at that moment).
        ``import_hook``: from now on, importing a module placed in a
        compartment gives a proxy module (what ``pycompart run`` does).
        ``confine_main``: lock this process down with the spec's
        ``[compartments.main.privileges]`` (it must have one thread).
        ``main_path``: the file instances load ``__main__`` entrypoints from,
        if not ``__main__``'s own (``pycompart run`` of a rewritten program).
        ``warm`` (with ``lazy``): start the instances now without waiting for
        them (replaced at first use if the configuration changed meanwhile)."""
        if _instance.CURRENT is not None:
            raise PycompartError("an App cannot be started inside a compartment instance (an instance "
                                 "imports the program's module: start the app under "
                                 "`if __name__ == \"__main__\":`)")
        with self._lock:
            if self._runtime is not None:
                raise PycompartError("the app is already running")
            runtime = _Runtime(self)
            if main_path is not None:
                runtime._main_path, runtime._main_module = os.path.abspath(main_path), None
            runtime.read_also = list(read_also or ())
            runtime.start(lazy, confine_main, warm)
            self._runtime = runtime
            if import_hook:
                finder: CompartmentFinder | UnboxedImportWarner = CompartmentFinder(runtime)
                try:
                    finder.install()
                except BaseException:
                    self._runtime = None
                    runtime.stop()
                    raise
                runtime.finder = finder
            elif any(comp.spec.modules for comp in runtime.compartments.values()):
                runtime.finder = finder = UnboxedImportWarner(runtime)
                finder.install()

    def stop(self) -> None:
        with self._lock:
            runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.stop()

    def _stop_before_exit(self) -> None:
        """``stop``, for a main that exits next (``pycompart run``): every
        instance ends and is reaped as in ``stop``, but the zygote's own
        process is not waited for (main's exit ends it: its parent-death
        signal), ~3 ms."""
        runtime = self._runtime
        if runtime is not None and runtime.monitor is not None:
            runtime.monitor.wait_for_zygote = False
        self.stop()

    def compartment(self, name: str) -> Any:
        """main's handle on a running module compartment
        (``pycompart.frontend.proxy.Compartment``): ``.module("yaml")`` imports a
        placed module as a proxy without the import hook."""
        runtime = self._runtime
        if runtime is None or name not in runtime.compartments:
            raise PycompartError(f"compartment {name!r} is not running in this app")
        return runtime.compartments[name]

    def __enter__(self) -> App:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def instances(self, compartment: str) -> list[int]:
        """The pids of the ready instances of ``compartment`` (for tests and
        tooling)."""
        runtime = self._runtime
        if runtime is None or runtime.monitor is None or compartment not in runtime.monitor.pools:
            return []
        return [i.pid for i in runtime.monitor.pools[compartment].ready if i.pid]

    @property
    def zygote_pid(self) -> int | None:
        runtime = self._runtime
        proc = runtime.monitor.zygote_proc if runtime and runtime.monitor else None
        return proc.pid if proc else None


class _Anything(dict):  # type: ignore[type-arg]
    """Compartment table of an inert App inside an instance: any name goes."""

    def __contains__(self, key: object) -> bool:
        return True


def _declared(app: App, compartment: str, key: str) -> Entrypoint[..., Any]:
    module_name, _, qualname = key.partition(":")
    module = sys.modules.get(module_name)
    fn: Any = module
    for part in qualname.split("."):
        fn = getattr(fn, part, None) if fn is not None else None
    if fn is None or not callable(fn):
        # Its signature is unknown here: the arguments go as they are given
        # and the callee binds them (``Contract._generic``).
        def fn(*__pycompart_args__: Any, **__pycompart_kwargs__: Any) -> Any:
            raise EntrypointError(f"{key} runs only inside compartment {compartment!r}; start the app")
        fn.__module__, fn.__qualname__, fn.__name__ = module_name, qualname, qualname.rsplit(".", 1)[-1]
    fn = getattr(fn, "__pycompart_function__", fn)
    return Entrypoint(app, compartment, fn, key)


class _Runtime:
    """The running state of an App: monitor, pools, audit log."""

    def __init__(self, app: App):
        self.app = app
        self.spec = app.spec
        self.audit = AuditLog(self.spec.audit_log) if self.spec.audit_log else None
        self.monitor: Monitor | None = None
        self.inline = {n for n, c in self.spec.compartments.items() if c.mechanism == "inline"}
        self.entrypoints = dict(app._entrypoints)
        self._main_path, self._main_module = _main_location()
        self.compartments: dict[str, Any] = {}
        self.finder: Any = None
        self.identities = Identities()
        self.max_objects = self.spec.max_message_objects
        #: Annotated modules main imported rewritten (``segments.ModuleRewriter``).
        self.rewritten: dict[str, str] = {}
        #: Directories every compartment may read besides the import path.
        self.read_also: list[str] = []

    def _resolve_all(self) -> dict[str, Lockdown]:
        """Every compartment's lock-down on this host, or one
        ``PrivilegeError`` naming the spec's file and every privilege that
        cannot be enforced (as ``pycompart check`` lists them), not only
        the first compartment's."""
        lockdowns, failed = {}, []
        for name, comp in self.spec.compartments.items():
            try:
                lockdowns[name] = policy.resolve(comp, sys.path + self.read_also, self._main_path).lockdown
            except PrivilegeError as exc:
                failed.extend(str(exc).splitlines())
        if failed:
            where = "" if self.spec.source.startswith("<") else f"{self.spec.source}: "
            raise PrivilegeError("\n".join(where + text for text in failed))
        return lockdowns

    def start(self, lazy: bool = False, confine_main: bool = False, warm: bool = False) -> None:
        # Instances get main's import path as it is now (main's own lock-down
        # may rewrite it to descriptors that mean nothing in another process).
        self.sys_path = list(sys.path)
        for ep in self.entrypoints.values():
            _ = ep.contract  # resolve annotations now: errors belong to start, not first call
        # Every privilege decision, before any process starts (fail closed).
        main_lock = None
        try:
            self.lockdowns = self._resolve_all()
            for name, lock in self.lockdowns.items():
                if lock.dynamic_user and self.spec.compartments[name].mechanism == "process":
                    lock.uid = lock.gid = self.identities.allocate(self.spec.name, name)
            if confine_main:
                if self.spec.main_privileges is None:
                    raise PycompartError(f"{self.spec.source} has no [compartments.main.privileges]")
                if threading.active_count() > 1:
                    raise PycompartError("main can only be locked down while it has one thread")
                main_lock = main_lockdown.plan(self.spec.main_privileges, sys.path,
                                               self._main_path).lockdown
        except BaseException:
            self._release()
            raise
        before_threads = None
        if main_lock is not None:
            before_threads = lambda: main_lockdown.confine(main_lock)  # noqa: E731
        if len(self.inline) < len(self.spec.compartments):
            self.monitor = Monitor(self.spec, self._config_for, self.app.hooks, self.audit,
                                   prepare=self._prepare)
            self.compartments = {name: Compartment(self.spec.compartments[name], pool, self._timed_out,
                                                   self.audit, self.monitor)
                                 for name, pool in self.monitor.pools.items()}
            try:
                self.monitor.start(lazy, before_threads, warm)
            except BaseException:
                self._release()
                raise
            _live.add(self.app)
        elif before_threads is not None:
            before_threads()
        # What every call of an entrypoint needs, looked up once.
        self.plans: dict[str, tuple[Pool | None, Contract, float | None]] = {
            key: (None if ep.compartment in self.inline else self.monitor.pools[ep.compartment],  # type: ignore[union-attr]
                  ep.contract, self.spec.compartments[ep.compartment].call_timeout)
            for key, ep in self.entrypoints.items()}

    def stop(self) -> None:
        if self.finder is not None:
            self.finder.uninstall()
        if self.monitor is not None:
            self.monitor.stop()
        _live.discard(self.app)
        self._release()

    def _release(self) -> None:
        """What the runtime holds beyond processes: the audit log, the ids."""
        if self.audit is not None:
            self.audit.close()
        self.identities.release()

    def add_function(self, compartment: str, key: str) -> None:
        """A spec-declared-like entrypoint found after the start (an annotated
        module imported under ``pycompart run``): instances started from now
        on serve it."""
        if key in self.entrypoints or compartment not in self.spec.compartments:
            return
        ep = _declared(self.app, compartment, key)
        self.app._entrypoints[key] = self.entrypoints[key] = ep
        pool = None if compartment in self.inline else self.monitor.pools[compartment]  # type: ignore[union-attr]
        self.plans[key] = (pool, ep.contract, self.spec.compartments[compartment].call_timeout)

    def _prepare(self, inst: Any) -> None:
        """Equip a new instance's channel for remote references and callbacks."""
        comp = self.compartments[inst.pool.spec.name]
        peer = comp.make_peer()
        peer.max_objects = self.max_objects
        peer.decode_timeout = comp.spec.call_timeout
        # The instance's proxies of main's tzinfos are tzinfos, served (as
        # protocols) if it may call main.
        peer.tz_by_reference = "main" in comp.spec.may_call
        peer.instance = inst
        peer.pending_release = inst.channel.pending_release
        peer.can_pass_fds = inst.channel.transport.can_pass_fds
        inst.peer = peer
        inst.channel.server = CallbackGate(comp.name, "main" in comp.spec.may_call, peer, self.audit,
                                            stdin=comp.spec.stdin == "main")
        # Releases wait for decodes only where values can name objects: a
        # compartment with typed entrypoints alone passes none.
        inst.channel.track_arrivals = bool(comp.spec.modules or comp.spec.functions)
        inst.channel.call_warnings = {}  # re-issued by the caller (pycompart.frontend.warn)

    def _timed_out(self, compartment: str, op: str, pid: int | None, timeout: float | None) -> None:
        Hooks.fire(self.app.hooks.on_call_timeout, TimeoutEvent(compartment, op, pid, timeout))

    def _shared(self, comp: CompartmentSpec) -> list[tuple[str, str, bytes]]:
        """IA2_SHARED_DATA: main's current values of the declared names."""
        out = []
        for key in comp.shared:
            module_name, _, name = key.partition(":")
            module = sys.modules.get(module_name)
            if module is None or not hasattr(module, name):
                raise EntrypointError(f"compartment {comp.name!r}: shared data {key!r} does not exist "
                                      "in main (not imported or not yet defined)")
            try:
                out.append((module_name, name, refs.encode_plain(getattr(module, name))))
            except TypeError as exc:
                raise EntrypointError(f"compartment {comp.name!r}: shared data {key!r}: {exc}") from None
        return out

    def _config_for(self, comp: CompartmentSpec, index: int) -> InstanceConfig:
        keys = sorted(k for k, ep in self.entrypoints.items() if ep.compartment == comp.name)
        return InstanceConfig(
            compartment=comp.name, index=index, sys_path=list(self.sys_path), cwd=os.getcwd(),
            main_path=self._main_path, main_module=self._main_module, modules=list(comp.modules),
            entrypoints=keys, max_frame=self.spec.max_message_size,
            environment={k: os.environ[k] for k in comp.privileges.environment if k in os.environ},
            lockdown=self.lockdowns[comp.name],
            functions=list(comp.functions), expose=list(comp.expose),
            allow_setattr=comp.allow_setattr, may_call_main="main" in comp.may_call,
            trusts_main=comp.trust == "sandbox",
            shared=self._shared(comp),
            elsewhere={m: other.name for other in self.spec.compartments.values()
                       if other.name != comp.name for m in other.modules},
            output=comp.output, stdin=comp.stdin, descriptors=comp.descriptors,
            edges={name: EdgePlan(
                call_timeout=callee.call_timeout, cancel_grace=callee.cancel_grace,
                start_timeout=callee.start_timeout, descriptors=callee.descriptors,
                per_call=callee.on_demand is not None,
                per_connection=callee.on_demand == "per-connection",
                max_instances=callee.max_instances, functions=list(callee.functions),
                modules=list(callee.modules), expose=list(callee.expose),
                allow_exit=callee.allow_exit, allow_returned_callables=callee.allow_returned_callables)
                for name in comp.may_call if name != "main"
                for callee in (self.spec.compartments[name],)},
            foreign={key: other.name for other in self.spec.compartments.values()
                     if other.name != comp.name and other.name not in comp.may_call
                     for key in other.functions},
            audit_edges=self.audit is not None,
            rewritten=dict(self.rewritten),
        )

    def call(self, ep: Entrypoint[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             timeout: Any) -> Any:
        pool, contract, default_timeout = self.plans[ep.key]
        if timeout is _UNSET:
            timeout = default_timeout
        if pool is None:
            return self._call_inline(ep, contract, contract.encode_args(args, kwargs))
        spec = pool.spec
        if self.audit is not None or spec.descriptors or spec.on_demand is not None:
            return self._call_general(ep, pool, contract, args, kwargs, timeout)
        payload = contract.encode_args(args, kwargs, True)  # the hot path: none of that
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            channel = pool.pick(deadline).channel
            reply = channel.request(ep.key, payload, deadline)
        except CallTimeout as exc:
            Hooks.fire(self.app.hooks.on_call_timeout, TimeoutEvent(ep.compartment, ep.key, None, timeout))
            raise exc from None
        if channel.track_arrivals:
            # (A compartment of modules too: the peer's releases wait for
            # every reply that may name main's objects to be decoded. A
            # typed result names none.)
            channel.server.decoded(channel, ("r", reply.id))
        if reply.__class__ is Err:
            raise rebuild_exception(reply.error, ep.compartment, resolve=ep.resolve)
        bulk = channel.take_message_bulk(("r", reply.id)) if channel.message_bulk else None
        return contract.decode_result(reply.value, ep.compartment, self.max_objects, bulk)

    def _call_general(self, ep: Entrypoint[Any, Any], pool: Pool, contract: Contract,
                      args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        """A typed call with the audit log, descriptors as values (those in
        the arguments go with the frame, those in the result come back) or a
        fresh instance per call (``instances = "per-call"``)."""
        comp = ep.compartment
        spec = pool.spec
        if spec.on_demand == "per-connection":
            raise EntrypointError(f"compartment {comp!r} serves the connections a Broker hands it "
                                  "(instances = \"per-connection\"); it takes no calls")
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        # Large values beside the frame, unless descriptors are collected
        # (encoding inline again would collect them twice).
        payload = refs.encode_collecting(lambda: contract.encode_args(args, kwargs, not spec.descriptors),
                                         spec.descriptors)
        fds = refs.take_outgoing_fds()
        lease = None
        inst = None
        outcome = "ok"
        reply_size = 0
        try:
            if spec.on_demand is not None:
                lease = self.monitor.lease(comp, deadline)
                inst = lease.inst
            else:
                inst = pool.pick(deadline)
            # The channel closes each as it is sent (or not); what is left in
            # the list (interrupted first) is closed below.
            reply = inst.channel.request(ep.key, payload, deadline, fds=fds)
            if inst.channel.track_arrivals:
                inst.channel.server.decoded(inst.channel, ("r", reply.id))  # (as ``call``)
            with refs.receiving(inst.channel.take_message_fds(("r", reply.id))):
                if isinstance(reply, Err):
                    outcome = f"error:{reply.error.type_name}"
                    raise rebuild_exception(reply.error, comp, resolve=ep.resolve)
                reply_size = len(reply.value)
                bulk = inst.channel.take_message_bulk(("r", reply.id))
                try:
                    return contract.decode_result(reply.value, comp, self.max_objects, bulk)
                except ProtocolError:
                    outcome = "protocol_error"
                    raise
        except CallTimeout:
            outcome = "timeout"
            Hooks.fire(self.app.hooks.on_call_timeout,
                       TimeoutEvent(comp, ep.key, inst.pid if inst else None, timeout))
            raise
        except CompartmentCrashed:
            outcome = "crashed"
            raise
        except CompartmentError as exc:
            if outcome == "ok":
                outcome = f"failed:{type(exc).__name__}"
            raise
        finally:
            close_fds(fds)  # not handed to the channel (no instance to call, or interrupted)
            if lease is not None:
                lease.__exit__(None, None, None)
            if self.audit is not None:
                self.audit.record("call", caller="main", callee=comp, entrypoint=ep.key,
                                  pid=inst.pid if inst else None,
                                  duration_ms=round((time.monotonic() - started) * 1000, 3),
                                  outcome=outcome, bytes_out=len(payload), bytes_in=reply_size)

    def _call_inline(self, ep: Entrypoint[Any, Any], contract: Contract, payload: bytes) -> Any:
        """No isolation, but the same encoding, validation and error mapping."""
        started = time.monotonic()
        outcome = "ok"
        result = b""
        try:
            try:
                result = contract.invoke(payload)
            except Exception as exc:
                info = describe_exception(exc)
                outcome = f"error:{info.type_name}"
                raise rebuild_exception(info, ep.compartment) from None
            return contract.decode_result(result, ep.compartment)
        finally:
            if self.audit is not None:
                self.audit.record("call", caller="main", callee=ep.compartment, entrypoint=ep.key,
                                  pid=os.getpid(), mechanism="inline",
                                  duration_ms=round((time.monotonic() - started) * 1000, 3),
                                  outcome=outcome, bytes_out=len(payload), bytes_in=len(result))


def _main_location() -> tuple[str | None, str | None]:
    """Where the instance can re-import ``__main__`` from (as multiprocessing does)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", None) and spec.name != "__main__":
        return None, spec.name
    path = getattr(main, "__file__", None)
    return (os.path.abspath(path) if path else None), None


_live: weakref.WeakSet[App] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for app in list(_live):
        try:
            app.stop()
        except Exception:
            pass

