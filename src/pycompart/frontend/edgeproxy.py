"""Modules of another compartment, imported over an edge.

Inside an instance of ``web`` whose ``may_call`` lists ``parser``, importing
a module placed in ``parser`` gives the same stand-ins main gets under
``pycompart run`` (``pycompart.frontend.proxy``): a proxy module, functions
called by name, remote classes and objects, exception stand-ins. Only the
channel differs: requests go over ``web``'s edge to its own instance of
``parser`` (``pycompart.compartment.edges``), not over one of main's.

This is caller-side code that runs in an instance: the one place the
compartment layer reaches into this one, and only when such an import
happens (``tests/test_layout.py`` names the exception). What it adds to the
instance is exactly what main trusts for the same job.

Over an edge, the callee cannot call back (no callbacks across an edge), and
its instance trusts the caller in nothing (no pickling of its objects for
it). A per-call compartment's modules cannot be imported across an edge
(what a module returns by reference would die with its instance).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import threading
import time
import types
from typing import TYPE_CHECKING, Any

from ..errors import CompartmentUnavailable, StaleReference
from ..wire import edges as wire
from ..wire import refs
from ..wire.config import EdgePlan
from .callbacks import CallbackGate
from .proxy import Compartment

if TYPE_CHECKING:
    from ..compartment.edges import EdgeClient

_lock = threading.Lock()
_compartments: dict[str, EdgeCompartment] = {}


def loader(client: EdgeClient, callee: str) -> importlib.abc.Loader:
    """The loader of a module placed in ``callee``, for this instance."""
    return _EdgeModuleLoader(client, callee)


class CalleeSpec:
    """The callee's settings a ``proxy.Compartment`` (and a ``Broker``)
    reads, as this instance knows them."""

    def __init__(self, name: str, plan: EdgePlan):
        self.name = name
        self.modules = tuple(plan.modules)
        self.functions = tuple(plan.functions)
        self.expose = tuple(plan.expose)
        self.allow_exit = plan.allow_exit
        self.allow_returned_callables = plan.allow_returned_callables
        self.call_timeout = plan.call_timeout
        self.descriptors = plan.descriptors
        self.max_instances = plan.max_instances
        self.on_demand = "per-connection" if plan.per_connection else "per-call" if plan.per_call else None
        # The callee refuses attribute writes from an edge, and pickles
        # nothing for it (``supervisor.edges.EdgeBook.edge_config``): say so here.
        self.allow_setattr = False
        self.trust = "mutual"


class _EdgeInstance:
    """Stands for the callee instance behind one edge, as main's
    ``InstanceHandle`` does for its instances (what the proxies use)."""

    def __init__(self, pool: _EdgePool, edge: Any, generation: int):
        self.pool = pool
        self.edge = edge
        self.channel = edge.channel
        self.pid = edge.pid
        self.generation = generation
        self.status_text = "ended"
        comp = pool.comp
        peer = comp.make_peer()
        peer.instance = self
        peer.pending_release = self.channel.pending_release
        peer.can_pass_fds = self.channel.transport.can_pass_fds
        self.peer = peer
        # Releases and arrivals of what this side lent; callbacks refused.
        self.channel.server = CallbackGate(comp.name, False, peer)
        self.channel.track_arrivals = True
        self.channel.call_warnings = {}
        self.channel.instance = self


class _EdgePool:
    def __init__(self, client: EdgeClient, callee: str):
        self.client = client
        self.callee = callee
        self.comp: EdgeCompartment = None  # type: ignore[assignment]
        self.ready: tuple[_EdgeInstance, ...] = ()
        self._generation = 0

    def pick(self, deadline: float | None) -> _EdgeInstance:
        edge = self.client.edge(self.callee, deadline)
        current = self.ready[0] if self.ready else None
        if current is None or current.edge is not edge:
            self._generation += 1
            current = _EdgeInstance(self, edge, self._generation)
            self.ready = (current,)
        return current


class EdgeCompartment(Compartment):
    """``proxy.Compartment`` over this instance's edge to ``callee``."""

    def __init__(self, client: EdgeClient, callee: str, plan: EdgePlan):
        pool = _EdgePool(client, callee)
        super().__init__(CalleeSpec(callee, plan), pool)  # type: ignore[arg-type]
        pool.comp = self
        self.client = client

    def check_alive(self, inst: Any) -> None:
        # An edge's next instance is made only when next needed: an object
        # of one that ended is gone for good, whether or not it exists yet.
        if inst.channel.failure is not None:
            raise StaleReference(f"this reference points into an instance of compartment "
                                 f"{self.name!r} (pid {inst.pid}) that ended "
                                 f"({inst.channel.failure}); the object died with it")

    def call(self, inst: Any, op: str, args: list[Any]) -> Any:
        started = time.monotonic()
        outcome = "ok"
        try:
            # The serve thread defers a cancel of its own call meanwhile.
            return self.client.around(lambda: self._call(inst, op, args))
        except Exception as exc:
            outcome = f"error:{type(exc).__qualname__}"
            raise
        finally:
            if self.client.config.audit_edges:
                edge = inst.edge if inst is not None else \
                    self.pool.ready[0].edge if self.pool.ready else None
                if edge is not None:
                    self.client._tell(wire.Report(edge.id, op, outcome,
                                                  round((time.monotonic() - started) * 1000, 3), 0, 0))


def compartment(client: EdgeClient, callee: str, broker: bool = False) -> EdgeCompartment:
    with _lock:
        comp = _compartments.get(callee)
        if comp is None:
            plan = client.config.edges[callee]
            if plan.per_call and not broker:
                raise ImportError(f"compartment {callee!r} makes a fresh instance per call: its "
                                  "modules cannot be imported across an edge (call its "
                                  "entrypoints instead)")
            comp = _compartments[callee] = EdgeCompartment(client, callee, plan)
        return comp


def serve_connection(client: EdgeClient, callee: str, handler: str, resource: Any,
                     args: tuple[Any, ...], wait: float) -> None:
    """A ``Broker`` in this instance: hand ``resource`` (given away) to
    ``handler`` in a fresh instance of ``callee``, over an edge of its own
    that ends with the call."""
    comp = compartment(client, callee, broker=True)
    module, _, qualname = handler.partition(":")
    target = comp.path_object(module, qualname, "function")
    plan = client.config.edges[callee]
    edge = client._ask_for(callee, plan, time.monotonic() + wait)
    try:
        inst = _EdgeInstance(comp.pool, edge, 0)
        comp.call(inst, "@call", [target, [refs.handover(resource), *args], {}])
    finally:
        client._discard(edge)


class _EdgeModuleLoader(importlib.abc.Loader):
    def __init__(self, client: EdgeClient, callee: str):
        self.client, self.callee = client, callee

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        try:
            return compartment(self.client, self.callee).module(spec.name)
        except CompartmentUnavailable as exc:
            raise ImportError(f"cannot import {spec.name!r} from compartment {self.callee!r}: "
                              f"{exc}", name=spec.name) from exc

    def exec_module(self, module: types.ModuleType) -> None:
        pass  # it ran in the callee
