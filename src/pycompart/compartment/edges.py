"""Inside an instance: calls to other compartments, over edges.

A compartment whose ``may_call`` names another compartment gets, at its
start and before any of its code runs, a control socket to the monitor
(``pycompart.wire.edges``). The first call its code makes to a compartment it
may call asks the monitor for an edge: the monitor starts an instance of the
callee whose only caller is this instance and hands over this end of their
channel. Calls then go straight over it, as main's calls go over main's
channels, with the same encoding, validation, errors and timeouts:

- a compartment its spec does not let it call has no edge, and asking for
  one is refused by name (here, before anything is sent, and again by the
  monitor, which is what an attacker holding this process would meet);
- a call past its timeout is cancelled (a ``Cancel`` frame over the edge and
  the cancel signal from the monitor); a callee that does not yield within
  its ``cancel_grace`` is killed, and the next call gets a fresh one;
- a callee that dies fails the calls pending on it with
  ``CompartmentCrashed``; the next call asks for a new edge, which the
  monitor grants as the callee's restart policy allows;
- ``instances = "per-call"``: a fresh callee instance (and edge) per call.

The callee cannot call back over an edge (callbacks go to main only, and
only from instances main calls): values cross, code does not.
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import (
    CallTimeout,
    CompartmentCrashed,
    CompartmentUnavailable,
    EntrypointError,
    ProtocolError,
)
from ..transport.channel import Channel
from ..transport.streams import SocketTransport
from ..wire import edges as wire
from ..wire import refs
from ..wire.config import EdgePlan, InstanceConfig
from ..wire.exceptions import rebuild_exception
from ..wire.protocol import Connection, Err, close_fds

#: This instance's edges (None: its compartment may call no compartment).
CLIENT: EdgeClient | None = None

#: How often a caller asks again for an edge to a per-call compartment that
#: is at its ``max_instances`` (seconds).
BUSY_RETRY = 0.01


def install(config: InstanceConfig, control_fd: int) -> None:
    global CLIENT
    CLIENT = EdgeClient(config, socket.socket(fileno=control_fd))


def refuse(here: str, callee: str) -> EntrypointError:
    return EntrypointError(f"compartment {here!r} may not call compartment {callee!r}: its "
                           f"spec's may_call does not list {callee!r}")


def call(config: InstanceConfig, callee: str, key: str, contract: Any, args: tuple[Any, ...],
         kwargs: dict[str, Any], timeout: Any) -> Any:
    """Call entrypoint ``key`` of compartment ``callee`` from this instance
    (``timeout``: seconds, None for none, or ``...`` for the callee's
    ``call_timeout``)."""
    client = CLIENT
    if client is None or callee not in config.edges:
        raise refuse(config.compartment, callee)
    return client.call(callee, key, contract, args, kwargs, timeout)


class _Edge:
    __slots__ = ("id", "callee", "pid", "channel", "plan")

    def __init__(self, edge_id: int, callee: str, pid: int, channel: Channel, plan: EdgePlan):
        self.id, self.callee, self.pid, self.channel, self.plan = edge_id, callee, pid, channel, plan


class EdgeClient:
    """This instance's side of its edges and of its control socket."""

    def __init__(self, config: InstanceConfig, sock: socket.socket):
        self.config = config
        self.control = SocketTransport(sock)
        self.reader = wire.reader(for_monitor=False)
        self._buf = memoryview(bytearray(wire.MAX_CONTROL_FRAME * 2))
        self._ask = threading.RLock()  # one Open conversation at a time
        self._send_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._edges: dict[str, _Edge] = {}  # pooled callees: the one edge to each
        self._open = 0
        #: Set by the serve loop: wrap a call this thread makes over an edge
        #: (the serve thread defers its own cancellation meanwhile).
        self.around: Callable[[Callable[[], Any]], Any] = lambda fn: fn()

    # -- calls -------------------------------------------------------------------

    def call(self, callee: str, key: str, contract: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any], timeout: Any) -> Any:
        plan = self.config.edges[callee]
        if plan.per_connection:
            raise EntrypointError(f"compartment {callee!r} serves the connections a Broker hands it "
                                  "(instances = \"per-connection\"); it takes no calls")
        if timeout is ...:
            timeout = plan.call_timeout
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        if not plan.descriptors and not plan.per_call and not self.config.audit_edges:
            # The common case, as main's hot path: no descriptors to carry,
            # no record to write, the edge already open.
            edge = self._edges.get(callee)
            if edge is not None and edge.channel.failure is None:
                payload = contract.encode_args(args, kwargs)
                reply = self.around(lambda: edge.channel.request(key, payload, deadline))
                if reply.__class__ is Err:
                    raise rebuild_exception(reply.error, callee)
                return contract.decode_result(reply.value, callee)
        payload = refs.encode_collecting(lambda: contract.encode_args(args, kwargs), plan.descriptors)
        fds = refs.take_outgoing_fds()
        edge: _Edge | None = None
        outcome = "ok"
        reply_size = 0
        try:
            edge = self._edge(callee, plan, deadline)
            sent, fds = fds, []  # the channel's from here on, sent or not
            reply = self.around(lambda: edge.channel.request(key, payload, deadline, fds=sent))
            with refs.receiving(edge.channel.take_message_fds(("r", reply.id))):
                if reply.__class__ is Err:
                    outcome = f"error:{reply.error.type_name}"
                    raise rebuild_exception(reply.error, callee)
                reply_size = len(reply.value)
                try:
                    return contract.decode_result(reply.value, callee)
                except ProtocolError:
                    outcome = "protocol_error"
                    raise
        except CallTimeout:
            outcome = "timeout"
            raise
        except CompartmentCrashed:
            outcome = "crashed"
            raise
        except (CompartmentUnavailable, EntrypointError) as exc:
            if outcome == "ok":
                outcome = f"failed:{type(exc).__name__}"
            raise
        finally:
            close_fds(fds)
            if edge is not None and plan.per_call:
                self._discard(edge)  # its instance ends with its channel
            if self.config.audit_edges and edge is not None:
                self._tell(wire.Report(edge.id, key, outcome,
                                       round((time.monotonic() - started) * 1000, 3),
                                       len(payload), reply_size))

    def edge(self, callee: str, deadline: float | None) -> _Edge:
        """The open edge to ``callee`` (made now if there is none)."""
        return self._edge(callee, self.config.edges[callee], deadline)

    def module_loader(self, callee: str) -> Any:
        """The import loader of a module placed in ``callee``: a proxy over
        the edge. The proxies are the caller's side of module compartments,
        main's and ours alike (``pycompart.frontend.edgeproxy``): imported
        only when this instance imports such a module."""
        from ..frontend import edgeproxy

        return edgeproxy.loader(self, callee)

    def _edge(self, callee: str, plan: EdgePlan, deadline: float | None) -> _Edge:
        if not plan.per_call:
            edge = self._edges.get(callee)
            if edge is not None and edge.channel.failure is None:
                return edge
        with self._ask:
            if not plan.per_call:
                edge = self._edges.get(callee)
                if edge is not None and edge.channel.failure is None:
                    return edge
                if edge is not None:
                    self._discard(edge)
            edge = self._ask_for(callee, plan, deadline)
            if not plan.per_call:
                self._edges[callee] = edge
            return edge

    def _ask_for(self, callee: str, plan: EdgePlan, deadline: float | None) -> _Edge:
        """Ask the monitor for an edge to ``callee``; wait for it as long as
        the callee may take to start (and no longer than ``deadline``)."""
        with self._ask:  # the answers come on one socket, in order
            return self._ask_for_locked(callee, plan, deadline)

    def _ask_for_locked(self, callee: str, plan: EdgePlan, deadline: float | None) -> _Edge:
        if self._open >= wire.MAX_EDGES:
            raise CompartmentUnavailable(f"compartment {self.config.compartment!r} has "
                                         f"{wire.MAX_EDGES} edges open already")
        busy: str | None = None  # the last "at the cap" refusal, while retrying
        while True:
            limit = time.monotonic() + plan.start_timeout + 5.0
            if deadline is not None:
                limit = min(limit, deadline)
            seq = next(self._seq)
            self._tell(wire.Open(seq, callee), required=True)
            try:
                msg, fds = self._answer(seq, limit, callee)
            except CallTimeout:
                if busy is not None:
                    raise CompartmentUnavailable(busy) from None  # the cap, not a slow start
                raise
            if isinstance(msg, wire.Refused):
                if msg.busy and (deadline is None or time.monotonic() + BUSY_RETRY < deadline):
                    busy = msg.message
                    time.sleep(BUSY_RETRY)
                    continue
                raise CompartmentUnavailable(msg.message)
            assert isinstance(msg, wire.Opened)
            if len(fds) != 1:
                close_fds(fds)
                raise ProtocolError(f"the monitor sent {len(fds)} descriptors for an edge to {callee!r}")
            transport = SocketTransport(socket.socket(fileno=fds[0]), carry_fds=plan.descriptors)
            channel = Channel(transport, Connection(self.config.max_frame), callee)
            edge = _Edge(msg.edge, callee, msg.pid, channel, plan)
            channel.on_event = lambda kind, detail, edge=edge: self._event(edge, kind, detail)
            channel.failure_factory = lambda edge=edge: CompartmentCrashed(
                edge.callee, edge.pid, "closed its channel")
            self._open += 1
            return edge

    def _answer(self, seq: int, limit: float, callee: str) -> tuple[object, list[int]]:
        while True:
            for msg, fds in self.reader.messages():
                if getattr(msg, "seq", None) == seq:
                    return msg, fds
                close_fds(fds)  # the answer to an Open we gave up on: that edge dies with it
            try:
                n, fds = self.control.recv_into(self._buf, limit)
            except TimeoutError:
                raise CallTimeout(f"no edge to compartment {callee!r} was ready in time") from None
            except OSError as exc:
                raise CompartmentUnavailable(f"the monitor is unreachable: {exc}") from None
            if n == 0:
                close_fds(fds)
                raise CompartmentUnavailable("the monitor closed this instance's control socket")
            try:
                self.reader.feed(bytes(self._buf[:n]), fds)
            except ValueError as exc:
                raise ProtocolError(f"control socket: {exc}") from None

    def _discard(self, edge: _Edge) -> None:
        if self._edges.get(edge.callee) is edge:
            del self._edges[edge.callee]
        self._open -= 1
        edge.channel.close()

    def _event(self, edge: _Edge, kind: str, detail: Any) -> None:
        """A call on ``edge`` timed out (on the thread that made it, before
        it raises ``CallTimeout``): interrupt the callee, and give it up to
        its ``cancel_grace`` to yield, or have it killed. (Here, and not on a
        timer: a compartment may not be allowed a thread of its own.)"""
        if kind != "timeout":
            return
        if edge.plan.per_call:
            self._tell(wire.Kill(edge.id))  # discarded after this call anyway
            return
        self._tell(wire.Cancel(edge.id))
        channel = edge.channel
        end = time.monotonic() + edge.plan.cancel_grace
        while channel.failure is None:
            channel.drain()  # the late reply clears the call from ``cancelled``
            if detail not in channel.conn.cancelled:
                return
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            select.select([channel.transport.fileno()], [], [], min(remaining, 0.01))
        if channel.failure is None:
            self._tell(wire.Kill(edge.id))
            channel.fail(CompartmentCrashed(edge.callee, edge.pid, "was killed: a cancelled call "
                                            "did not yield within its cancel_grace of "
                                            f"{edge.plan.cancel_grace:g}s"))

    def _tell(self, msg: object, required: bool = False) -> None:
        try:
            with self._send_lock:
                self.control.send(wire.encode(msg), (), time.monotonic() + 1.0)
        except (OSError, TimeoutError) as exc:
            if required:
                raise CompartmentUnavailable(f"the monitor is unreachable: {exc}") from None


# -- spec-declared functions of the compartments this one may call ------------------


class EdgeFunction:
    """Stands, in the caller's modules, for a function the spec declares in
    another compartment (``functions = ["mod:fn"]``): calling it calls that
    compartment over the edge, with the function's own annotations as the
    contract, or is refused by name if there is no edge. (An
    ``@app.entrypoint`` function does this by itself.)"""

    def __init__(self, config: InstanceConfig, callee: str, key: str, fn: Any):
        self._config, self._callee, self._key, self._fn = config, callee, key, fn
        self._contract: Any = None
        import functools

        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._contract is None:
            from ..wire.contract import Contract

            self._contract = Contract(self._fn, self._key)
        return call(self._config, self._callee, self._key, self._contract, args, kwargs, ...)

    def __repr__(self) -> str:
        return f"<{self._key} in compartment {self._callee!r}, called over an edge>"


def bind_functions(config: InstanceConfig) -> None:
    """Make every module of the caller that defines a callee's declared
    function call it over the edge: those already imported now, the others
    as they are imported."""
    owners: dict[str, list[tuple[str, str, str]]] = {}
    declared = [(callee, key) for callee, plan in config.edges.items() for key in plan.functions]
    declared += [(owner, key) for key, owner in config.foreign.items()]
    for callee, key in declared:
        module, _, qualname = key.partition(":")
        if qualname and "." not in qualname:  # module-level functions
            owners.setdefault(module, []).append((callee, key, qualname))
    if not owners:
        return

    def bind(module: Any) -> None:
        for callee, key, name in owners.get(getattr(module, "__name__", ""), ()):
            fn = module.__dict__.get(name)
            if callable(fn) and not isinstance(fn, EdgeFunction) and \
                    not hasattr(fn, "__pycompart_function__"):
                # A compartment it may not call: the stub refuses by name
                # (running the function here, with this compartment's
                # privileges, would silently be a different program).
                setattr(module, name, EdgeFunction(config, callee, key, fn))

    import sys

    for name in owners:
        if name in sys.modules:
            bind(sys.modules[name])
    sys.meta_path.insert(0, _Binder(set(owners), bind))


class _Binder:
    """Finds nothing itself: wraps the loader the rest of ``sys.meta_path``
    finds for a module that defines a callee's function, to bind it after
    the module's code ran."""

    def __init__(self, names: set[str], bind: Callable[[Any], None]):
        self.names, self.bind = names, bind

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.names:
            return None
        import sys

        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _BindingLoader(spec.loader, self.bind)
                return spec
        return None


class _BindingLoader:
    def __init__(self, loader: Any, bind: Callable[[Any], None]):
        self._loader, self._bind = loader, bind

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._bind(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
