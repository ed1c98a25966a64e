"""The monitor's side of edges between compartments (``pycompart.wire.edges``).

Runs on the monitor thread and never blocks it: control sockets are read
without waiting, answers are sent without waiting (an instance that does not
read its answers is killed), and starting a callee is the monitor's usual
asynchronous spawn.

An edge joins one caller instance to one instance of the callee started for
it alone (its ``caller`` in the instance's configuration): no two callers
share a callee instance, so one caller can neither see nor disturb what
another left there, and the callee's instance dies with its caller. The
callee's restart policy is applied per edge: after a crash the caller's next
call gets a fresh instance, within ``max_restarts`` per ``restart_window``;
with ``restart = "never"`` the edge stays down. A ``per-call`` callee gets a
fresh instance per call, counted against its ``max_instances``.

Everything an instance may ask here is checked against the spec: an edge the
spec does not declare is refused by name, audited, and counted as a
violation; a malformed control frame kills the instance that sent it.
"""

from __future__ import annotations

import collections
import itertools
import resource
import time
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import ProtocolError
from ..kernel import process
from ..transport.streams import SocketTransport
from ..wire import edges as wire
from ..wire.config import CANCEL_SIGNAL, InstanceConfig
from ..wire.protocol import close_fds

if TYPE_CHECKING:
    from .monitor import InstanceHandle, Monitor

#: Audit records of edge calls one caller instance may have written per
#: second (they are what the caller reports, so a flood is bounded).
REPORTS_PER_SECOND = 1_000
#: Edge instances one instance main calls may cause, through all the
#: edges below it (its tree): with the depth bound, what a recursion across
#: a cycle of compartments may spawn, and a hostile tree's share.
MAX_EDGE_INSTANCES_PER_TREE = 32
#: Edge instances that may exist at once app-wide, as a fraction of main's
#: descriptor limit (each costs main a pidfd, relay pipes and perhaps a
#: control socket).
EDGE_INSTANCES_PER_FD = 1 / 4
MAX_NAMED = 256


class Link:
    """One edge: a caller instance and the callee instance started for it."""

    __slots__ = ("id", "caller", "callee_name", "seq", "callee", "state", "per_call", "root")

    def __init__(self, edge_id: int, caller: InstanceHandle, callee_name: str, seq: int, per_call: bool):
        self.id = edge_id
        self.caller = caller
        self.callee_name = callee_name
        self.seq = seq
        self.callee: InstanceHandle | None = None
        self.state = "starting"  # -> open -> dead
        self.per_call = per_call
        self.root: InstanceHandle = caller


class CallerControl:
    """What the monitor holds for one instance that may call compartments."""

    def __init__(self, transport: SocketTransport):
        self.transport = transport
        self.reader = wire.reader(for_monitor=True)
        self.links: dict[int, Link] = {}
        #: Per callee: when its instances for this caller failed (restarts).
        self.failures: dict[str, collections.deque[float]] = {}
        #: Per callee: why the last one ended, if the edge is down for good.
        self.down: dict[str, str] = {}
        #: Every edge's callee and pid, kept past its end for the audit
        #: records of calls that ended with it (the newest ``MAX_NAMED``).
        self.named: dict[int, tuple[str, int | None]] = {}
        self.report_window = 0.0
        self.reports = 0
        self.dropped = 0


class EdgeBook:
    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self._ids = itertools.count(1)
        self._buf = memoryview(bytearray(2 * wire.MAX_CONTROL_FRAME))
        self.live = 0  # links starting or open, app-wide
        self.per_tree: collections.Counter[int] = collections.Counter()  # by the tree's root's id
        #: Per (caller compartment, per-call callee): links it holds.
        self.per_call_held: collections.Counter[tuple[str, str]] = collections.Counter()
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_live = max(16, int((soft if soft != resource.RLIM_INFINITY else 65536)
                                    * EDGE_INSTANCES_PER_FD))

    # -- configuration of new instances ---------------------------------------------

    @staticmethod
    def edge_config(config: InstanceConfig, caller: InstanceHandle) -> InstanceConfig:
        """``config`` for an instance serving ``caller`` only: it calls no
        one back, reads no stdin, and trusts its caller in nothing. A
        sandbox shows main its internals because main is the trusted side;
        another compartment is not: it reaches only public names (and those
        the spec's ``expose`` lists by name) and sets no attributes, which
        would let it rewire the callee's code to use the callee's
        privileges for it."""
        return msgspec.structs.replace(
            config, caller=caller.pool.spec.name, edge_depth=caller.edge_depth + 1,
            may_call_main=False, stdin="null", trusts_main=False,
            expose=[name for name in config.expose if name != "*"], allow_setattr=False)

    def attach(self, inst: InstanceHandle, transport: SocketTransport) -> None:
        inst.control = CallerControl(transport)
        self.monitor._watch(transport.fileno(), "edges", inst)

    # -- reading what an instance asks ---------------------------------------------

    def on_readable(self, inst: InstanceHandle) -> None:
        ctl: CallerControl = inst.control
        try:
            n, fds = ctl.transport.read_into(self._buf)  # closes any descriptors, and raises
        except BlockingIOError:
            return
        except ProtocolError as exc:
            self._violation(inst, f"control socket: {exc}", fatal=True)
            return
        except OSError:
            n, fds = 0, []
        if n == 0:
            close_fds(fds)
            self.monitor._unwatch(ctl.transport.fileno())
            return  # it is gone, or closed its end: its exit cleans up
        try:
            ctl.reader.feed(bytes(self._buf[:n]), fds)
            messages = ctl.reader.messages()
        except ValueError as exc:
            self._violation(inst, f"control socket: {exc}", fatal=True)
            return
        for msg, _ in messages:  # (no descriptors: the transport refuses them)
            if isinstance(msg, wire.Open):
                self._open(inst, msg)
            elif isinstance(msg, wire.Cancel):
                link = ctl.links.get(msg.edge)
                if link is not None and link.state == "open" and link.callee.pidfd is not None:
                    process.pidfd_kill(link.callee.pidfd, CANCEL_SIGNAL)
            elif isinstance(msg, wire.Kill):
                link = ctl.links.get(msg.edge)
                if link is not None and link.callee is not None:
                    link.callee.kill_reason = link.callee.kill_reason or (
                        f"a call from {inst.pool.spec.name!r} timed out and it did not yield "
                        "within cancel_grace")
                    self.monitor._kill(link.callee, link.callee.kill_reason)
            elif isinstance(msg, wire.Report):
                self._report(inst, msg)
            if inst.state == "dead":
                return

    # -- opening an edge ---------------------------------------------------------------

    def _open(self, inst: InstanceHandle, msg: wire.Open) -> None:
        monitor = self.monitor
        ctl: CallerControl = inst.control
        here = inst.pool.spec.name
        callee = msg.callee
        if callee == "main" or callee not in inst.pool.spec.may_call or callee not in monitor.pools:
            monitor._audit("edge_refused", caller=here, callee=callee[:100], pid=inst.pid,
                           reason="not in may_call")
            self._answer(inst, wire.Refused(msg.seq, f"compartment {here!r} may not call compartment "
                                                     f"{callee[:100]!r}: its spec's may_call does not "
                                                     "list it"))
            self._violation(inst, f"asked for an undeclared edge to {callee[:100]!r}")
            return
        pool = monitor.pools[callee]
        spec = pool.spec
        if monitor.stopping or pool.unavailable:
            self._answer(inst, wire.Refused(msg.seq, f"compartment {callee!r} is unavailable: "
                                                     f"{pool.unavailable or 'the app is stopping'}"))
            return
        if inst.edge_depth + 1 > wire.MAX_EDGE_DEPTH:
            self._answer(inst, wire.Refused(msg.seq, f"compartment {callee!r}: a chain of calls "
                                                     f"between compartments may be at most "
                                                     f"{wire.MAX_EDGE_DEPTH} deep"))
            return
        if len(ctl.links) >= wire.MAX_EDGES:
            self._answer(inst, wire.Refused(msg.seq, f"compartment {here!r} has {wire.MAX_EDGES} "
                                                     "edges open already"))
            return
        root = inst.edge_root or inst
        if self.per_tree[id(root)] >= MAX_EDGE_INSTANCES_PER_TREE:
            self._answer(inst, wire.Refused(msg.seq, f"compartment {callee!r}: the calls below one "
                                                     f"of main's calls into {root.pool.spec.name!r} "
                                                     f"already have {MAX_EDGE_INSTANCES_PER_TREE} "
                                                     "instances serving edges", busy=True))
            return
        if self.live >= self.max_live:
            self._answer(inst, wire.Refused(msg.seq, f"compartment {callee!r}: {self.max_live} "
                                                     "instances serving edges exist already (a "
                                                     "quarter of main's descriptor limit)",
                                            busy=True))
            return
        per_call = spec.on_demand is not None
        share = (here, callee)
        # A per-connection compartment is only ever a Broker's: its caller
        # may use them all.
        most = spec.max_instances if spec.on_demand == "per-connection" else max(1, spec.max_instances // 2)
        if per_call and self.per_call_held[share] >= most:
            # Main's own calls keep the other half: one caller cannot
            # starve them by holding edges it does not use.
            self._answer(inst, wire.Refused(msg.seq, f"compartment {callee!r}: {here!r} holds "
                                                     f"{self.per_call_held[share]} of its "
                                                     f"{spec.max_instances} instances (max_instances)"
                                                     ", the most one caller may", busy=True))
            return
        delay = 0.0
        if not per_call:
            # One edge to a pooled compartment per caller instance: asking
            # again (its edge broke, or a hostile caller asks over and over)
            # ends the one it had, and that counts against the restarts.
            for old in list(ctl.links.values()):
                if old.callee_name == callee:
                    if old.callee is not None and old.callee.state != "dead":
                        old.callee.kill_reason = old.callee.kill_reason or "replaced by a new edge"
                        monitor._kill(old.callee, old.callee.kill_reason)
                    # It ends now, and counts now: the caller may have seen
                    # its crash (EOF) before we saw its exit.
                    reason = old.callee.status_text if old.callee is not None and \
                        old.callee.state == "dead" else "replaced by a new edge"
                    self._ended(old, reason, failed=True)
        if per_call:
            assert pool.on_demand is not None
            if not pool.on_demand.acquire(blocking=False):
                self._answer(inst, wire.Refused(
                    msg.seq, f"compartment {callee!r}: all {spec.max_instances} instances "
                             "(max_instances) stayed busy until the call's deadline", busy=True))
                return
        else:
            down = ctl.down.get(callee)
            if down is not None:
                self._answer(inst, wire.Refused(msg.seq, f"compartment {callee!r} is unavailable to "
                                                         f"{here!r}: {down}"))
                return
            failures = ctl.failures.get(callee)
            if failures:
                delay = min(5.0, spec.restart_backoff * (2 ** (len(failures) - 1)))
        link = Link(next(self._ids), inst, callee, msg.seq, per_call)
        link.root = root
        ctl.links[link.id] = link
        self.live += 1
        self.per_tree[id(root)] += 1
        if per_call:
            self.per_call_held[share] += 1

        def spawn() -> None:
            if link.state != "starting":
                return
            started = monitor._spawn(pool, 0, on_ready=lambda ci: self._ready(link, ci), caller=inst)
            if started is None:  # the app is stopping
                self._ended(link, "the app is stopping", failed=False)
                return
            link.callee = started
            started.edge_link = link
            if started.state == "dead":  # it could not even be sent to the zygote
                self._ended(link, started.start_error or "it failed to start", failed=True)
        if delay:
            monitor._after(delay, spawn)
        else:
            spawn()

    def _ready(self, link: Link, callee: InstanceHandle) -> None:
        monitor = self.monitor
        caller = link.caller
        if link.state != "starting" or caller.state == "dead":
            monitor.retire(callee)
            return
        fd = callee.channel.transport.fileno()
        if not self._answer(caller, wire.Opened(link.seq, link.id, callee.pid or 0), [fd]):
            monitor.retire(callee)
            return
        callee.channel.hand_over()
        callee.handed_over = True
        link.state = "open"
        spec = callee.pool.spec
        if link.per_call and spec.call_timeout is not None:
            # Its one call must end within its timeout: a caller holding a
            # per-call instance it does not use gives it back then.
            def expire() -> None:
                if link.state == "open" and callee.state != "dead":
                    callee.kill_reason = callee.kill_reason or "its one call did not end within " \
                        "call_timeout + cancel_grace of its start"
                    monitor._kill(callee, callee.kill_reason)
            monitor._after(spec.call_timeout + spec.cancel_grace + 1.0, expire)
        named = caller.control.named
        named[link.id] = (link.callee_name, callee.pid)
        if len(named) > MAX_NAMED:
            del named[next(iter(named))]
        monitor._audit("edge_open", caller=caller.pool.spec.name, caller_pid=caller.pid,
                       callee=link.callee_name, pid=callee.pid, edge=link.id)

    # -- the end of an edge --------------------------------------------------------------

    def callee_ended(self, callee: InstanceHandle, reason: str, failed: bool) -> None:
        """The monitor saw an edge instance end (or fail to start)."""
        link: Link | None = getattr(callee, "edge_link", None)
        if link is not None:
            self._ended(link, reason, failed)

    def _ended(self, link: Link, reason: str, failed: bool) -> None:
        if link.state == "dead":
            return
        was = link.state
        link.state = "dead"
        self.live -= 1
        key = id(link.root)
        self.per_tree[key] -= 1
        if self.per_tree[key] <= 0:
            del self.per_tree[key]
        if link.per_call:
            share = (link.caller.pool.spec.name, link.callee_name)
            self.per_call_held[share] -= 1
            if self.per_call_held[share] <= 0:
                del self.per_call_held[share]
        caller = link.caller
        ctl: CallerControl | None = getattr(caller, "control", None)
        if ctl is not None:
            ctl.links.pop(link.id, None)
        pool = self.monitor.pools[link.callee_name]
        if link.per_call:
            assert pool.on_demand is not None
            pool.on_demand.release()
        if was == "starting" and caller.state != "dead":
            self._answer(caller, wire.Refused(link.seq, f"compartment {link.callee_name!r} failed "
                                                        f"to start: {reason}"))
        if link.per_call or ctl is None or caller.state == "dead" or not failed:
            return
        spec = pool.spec
        if spec.restart == "never":
            ctl.down[link.callee_name] = f"its instance {reason} and restart is 'never'"
            return
        now = time.monotonic()
        failures = ctl.failures.setdefault(link.callee_name, collections.deque())
        while failures and failures[0] < now - spec.restart_window:
            failures.popleft()
        failures.append(now)
        if len(failures) > spec.max_restarts:
            ctl.down[link.callee_name] = (f"gave up after {spec.max_restarts} restarts within "
                                          f"{spec.restart_window:g}s (last: {reason})")

    def caller_ended(self, inst: InstanceHandle) -> None:
        """A caller instance ended: so do the callee instances it had."""
        ctl: CallerControl | None = getattr(inst, "control", None)
        if ctl is None:
            return
        self.monitor._unwatch(ctl.transport.fileno())
        ctl.transport.close()
        ctl.reader.close()
        for link in list(ctl.links.values()):
            if link.callee is not None and link.callee.state != "dead":
                self.monitor.retire(link.callee)
        # Their exits release what they hold (``_ended``).

    # -- helpers -------------------------------------------------------------------------

    def _answer(self, inst: InstanceHandle, msg: object, fds: list[int] | None = None) -> bool:
        """Send without waiting: an instance that leaves its answers unread
        until its socket's buffer is full is killed."""
        ctl: CallerControl = inst.control
        try:
            ctl.transport.send(wire.encode(msg, len(fds or ())), fds or (), time.monotonic())
            return True
        except (OSError, TimeoutError):
            inst.kill_reason = inst.kill_reason or "did not read its control socket"
            self.monitor._kill(inst, inst.kill_reason)
            return False

    def _violation(self, inst: InstanceHandle, reason: str, fatal: bool = False) -> None:
        if fatal:
            inst.kill_reason = inst.kill_reason or f"protocol violation: {reason}"
            self.monitor._audit("comm_break", compartment=inst.pool.spec.name, pid=inst.pid,
                                reason=reason)
            self.monitor._kill(inst, inst.kill_reason)
            return
        self.monitor.channel_event(inst, "violation", reason)

    def _report(self, inst: InstanceHandle, msg: wire.Report) -> None:
        ctl: CallerControl = inst.control
        named = ctl.named.get(msg.edge)
        if named is None:
            self._violation(inst, f"a report on edge {msg.edge}, which it never had")
            return
        now = time.monotonic()
        if now - ctl.report_window >= 1.0:
            if ctl.dropped:
                self.monitor._audit("edge_reports_dropped", caller=inst.pool.spec.name,
                                    pid=inst.pid, count=ctl.dropped)
            ctl.report_window, ctl.reports, ctl.dropped = now, 0, 0
        ctl.reports += 1
        if ctl.reports > REPORTS_PER_SECOND:
            ctl.dropped += 1
            return
        self.monitor._audit("call", caller=inst.pool.spec.name, caller_pid=inst.pid,
                            callee=named[0], edge=msg.edge, pid=named[1],
                            entrypoint=msg.entrypoint[:200], outcome=msg.outcome[:100],
                            duration_ms=msg.duration_ms, bytes_out=msg.bytes_out,
                            bytes_in=msg.bytes_in, reported_by=inst.pool.spec.name)
