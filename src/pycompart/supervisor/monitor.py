"""The monitor: supervision of instances. Runs no compartment code.

One thread in ``main``'s process (domain 0). It owns the zygote, every
instance's pidfd and the timers, and is the only thread that signals or kills
an instance (so a pidfd is never used after it is closed). Callers talk to it
by ``submit``-ting small functions that run on its thread.

Life of an instance::

    spawning --Spawned(pid, pidfd)--> starting --Hello--> ready --exit--> dead
                                          |--Abort/exit/start timeout--> dead

A dead instance fails every call pending on it at once (its channel is shut
down; the leader thread wakes with ``CompartmentCrashed`` carrying the exit
status the zygote reaped), then the restart policy decides whether and when a
replacement is spawned.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import socket
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ..errors import (
    CallTimeout,
    CompartmentCrashed,
    CompartmentStartError,
    CompartmentUnavailable,
    ProtocolError,
)
from ..kernel import process
from ..policy.spec import AppSpec, CompartmentSpec
from ..transport import bulk
from ..transport.bulk import Lanes
from ..transport.channel import Channel
from ..transport.streams import PipeTransport, SocketTransport, make_pipe
from ..wire.config import CANCEL_SIGNAL, EXIT_START_FAILED, InstanceConfig
from ..wire.exceptions import rebuild_exception
from ..wire.protocol import NEED_DATA, Abort, Connection, Hello, Ok, Violation
from . import launcher, zygote
from .audit import AuditLog
from .edges import EdgeBook
from .relay import OutputRelay, Sink


#: Non-fatal protocol violations (replies to calls never made, refused
#: nested calls, ...) an instance may commit: the first ``AUDITED`` are
#: audit records, and at ``MAX`` it is killed and replaced.
AUDITED_VIOLATIONS = 10
#: How often the monitor looks at idle instances' CPU time (seconds).
IDLE_CHECK = 1.0
#: The largest first frame (Hello, or Abort with its traceback) an instance may send.
HELLO_MAX = 256 * 1024
MAX_VIOLATIONS = 100


class InstanceEvent(msgspec.Struct, frozen=True):
    """Passed to ``on_termination``: an instance ended."""

    compartment: str
    pid: int | None
    status: str
    restarting: bool


class TimeoutEvent(msgspec.Struct, frozen=True):
    """Passed to ``on_call_timeout``."""

    compartment: str
    entrypoint: str
    pid: int | None
    timeout: float | None


class CommBreakEvent(msgspec.Struct, frozen=True):
    """Passed to ``on_comm_break``: a channel broke (protocol violation,
    failed send)."""

    compartment: str
    pid: int | None
    reason: str


class Hooks(msgspec.Struct):
    on_termination: list[Callable[[InstanceEvent], Any]] = msgspec.field(default_factory=list)
    on_call_timeout: list[Callable[[TimeoutEvent], Any]] = msgspec.field(default_factory=list)
    on_comm_break: list[Callable[[CommBreakEvent], Any]] = msgspec.field(default_factory=list)

    @staticmethod
    def fire(hooks: list[Callable[[Any], Any]], event: Any) -> None:
        for hook in hooks:
            try:
                hook(event)
            except Exception as exc:  # a broken hook must not take the monitor down
                print(f"pycompart: hook {getattr(hook, '__name__', hook)!r} raised {exc!r}",
                      file=sys.stderr)


class InstanceHandle:
    """What domain 0 knows about one instance."""

    def __init__(self, pool: Pool, index: int, channel: Channel, generation: int):
        self.pool = pool
        self.index = index
        self.channel = channel
        self.generation = generation
        #: The configuration it was started with (on-demand instances: ``_take_spare``).
        self.fingerprint = b""
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.state = "spawning"
        self.started_at = time.monotonic()
        self.status: int | None = None
        self.status_text = "is still running"
        self.dead = threading.Event()
        self.start_error: str | None = None
        self.start_exception: Exception | None = None
        self.kill_reason: str | None = None
        self.request = 0
        self.on_ready: Callable[[InstanceHandle], None] | None = None
        #: (On demand.) Told when it fails to start, with the reason.
        self.on_failed: Callable[[InstanceHandle, str], None] | None = None
        self.retired = False
        self.violations = 0
        self.ns_pid: int | None = None  # its pid in the app's pid namespace
        self.idle_calls = -1  # calls sent when it was last seen idle
        self.idle_cpu_base: float | None = None
        self.usage: dict[str, Any] = {}
        #: Edges (``pycompart.supervisor.edges``): its control socket, if its
        #: compartment may call others; the edge it serves, if it is the
        #: instance started for one caller; how deep in a chain of edges.
        self.control: Any = None
        self.edge_link: Any = None
        self.edge_depth = 0
        self.edge_root: Any = None  # the instance main calls whose edges led to this one
        self.handed_over = False  # its channel's far end is its caller's now

    def crash_error(self) -> CompartmentCrashed:
        """Built by a caller that saw the channel close: wait (briefly) for the
        monitor to learn the exit status, so the error can name it."""
        self.dead.wait(1.0)
        status = self.status_text if self.dead.is_set() else "closed its channel"
        if self.kill_reason:
            status += f" ({self.kill_reason})"
        return CompartmentCrashed(self.pool.spec.name, self.pid, status)


class _Lease:
    def __init__(self, monitor: Monitor, pool: Pool, inst: InstanceHandle):
        self.monitor, self.pool, self.inst = monitor, pool, inst

    def __enter__(self) -> InstanceHandle:
        return self.inst

    def __exit__(self, *exc: Any) -> None:
        try:
            self.monitor.retire(self.inst)
        finally:
            self.pool.on_demand.release()  # type: ignore[union-attr]


class Pool:
    """The live instances of one compartment, and its restart accounting."""

    def __init__(self, spec: CompartmentSpec):
        self.spec = spec
        self.ready: tuple[InstanceHandle, ...] = ()
        #: On-demand compartments: how many more instances may exist.
        self.on_demand = threading.BoundedSemaphore(spec.max_instances) \
            if spec.on_demand is not None else None
        self.cond = threading.Condition()
        self.unavailable: str | None = None
        self.unavailable_cause: BaseException | None = None
        self.restarts: collections.deque[float] = collections.deque()
        self.rr = itertools.count()
        #: Lazy start: spawns the instances on first use (set by the monitor).
        self.launch: Callable[[], None] | None = None
        self.ever_ready = False
        #: On-demand: ready spares (``spec.spares``), and those still starting.
        self.spares: collections.deque[InstanceHandle] = collections.deque()
        self.spares_starting: set[InstanceHandle] = set()
        #: Instances started before this (``InstanceHandle.generation``) were
        #: started with an older configuration (``Monitor._spawn_warm``).
        self.min_generation = 0

    def pick(self, deadline: float | None) -> InstanceHandle:
        if self.launch is not None:  # the first use of a lazily started pool
            with self.cond:
                launch, self.launch = self.launch, None
            if launch is not None:
                launch()
        ready = self.ready
        if len(ready) == 1 and ready[0].channel.failure is None:
            return ready[0]
        if any(inst.channel.failure is not None for inst in ready):
            # Broken but not yet reaped: never hand it out again.
            for inst in ready:
                if inst.channel.failure is not None:
                    self.remove(inst)
            ready = self.ready
        if ready:
            start = next(self.rr) % len(ready)
            best = ready[start]
            for inst in ready[start:] + ready[:start]:
                if inst.channel.pending < best.channel.pending:
                    best = inst
            return best
        with self.cond:
            while not self.ready:
                if self.unavailable:
                    raise CompartmentUnavailable(f"compartment {self.spec.name!r} is unavailable: "
                                                 f"{self.unavailable}") from self.unavailable_cause
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise CallTimeout(f"no instance of compartment {self.spec.name!r} became "
                                      "ready before the call's deadline")
                self.cond.wait(remaining)
        return self.pick(deadline)

    def add(self, inst: InstanceHandle) -> bool:
        """Take a ready instance into the pool; False (it is not) if it
        was started before the pool's configuration last changed."""
        with self.cond:
            if inst.generation < self.min_generation:
                return False
            self.ready = self.ready + (inst,)
            self.cond.notify_all()
            return True

    def remove(self, inst: InstanceHandle) -> None:
        with self.cond:
            self.ready = tuple(i for i in self.ready if i is not inst)

    def make_unavailable(self, reason: str) -> None:
        with self.cond:
            self.unavailable = reason
            self.cond.notify_all()


#: Sizes of bulk lanes kept made ahead (``Monitor._stock_lanes``).
MAX_SPARE_LANES = 4


def _make_lanes(size: int) -> tuple[Lanes, int] | None:
    """Main's end of two fresh lanes of ``size`` (mapped) and a descriptor
    of their memory file for the instance; None where there can be none."""
    try:
        fd = bulk.create(size)
    except OSError:
        return None  # no memfd: everything goes inline
    try:
        theirs = os.dup(fd)
    except OSError:
        os.close(fd)
        return None
    try:
        return Lanes(fd, side=0), theirs
    except (OSError, ValueError):
        os.close(theirs)
        return None


class Monitor:
    def __init__(self, spec: AppSpec, config_for: Callable[[CompartmentSpec, int], InstanceConfig],
                 hooks: Hooks, audit: AuditLog | None,
                 prepare: Callable[[InstanceHandle], None] | None = None):
        self.spec = spec
        self.prepare = prepare
        self.config_for = config_for
        self.hooks = hooks
        self.audit = audit
        self.pools = {name: Pool(c) for name, c in spec.compartments.items()
                      if c.mechanism == "process"}
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._fd_owner: dict[int, tuple[str, Any]] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        #: Bulk lanes made ahead, by lane size (``_stock_lanes``): main's end, the instance's fd.
        self._spare_lanes: dict[int, tuple[Lanes, int]] = {}
        self._timer_seq = itertools.count()
        self._by_request: dict[int, InstanceHandle] = {}  # spawn sent, no pid yet
        self._by_pid: dict[int, InstanceHandle] = {}
        self._requests = itertools.count(1)
        self._generation = itertools.count(1)
        self._start_failures: list[Exception] = []
        self._start_done = threading.Condition()
        self.stopping = False
        self.zygote_proc: Any = None
        #: Whether ``stop`` waits for the zygote's process to end after it
        #: said its last (every instance reaped): not when main exits next
        #: (``pycompart run``), which ends it anyway (its parent-death signal).
        self.wait_for_zygote = True
        self._control: SocketTransport | None = None
        self._control_buf = memoryview(bytearray(65536))
        self._started = False
        self._control_reader = zygote.control_reader()
        self._thread = threading.Thread(target=self._run, name="pycompart-monitor", daemon=True)
        self.relay: OutputRelay | None = None  # started with the monitor thread
        self.edges = EdgeBook(self)

    # -- public (any thread) ----------------------------------------------------

    def start(self, lazy: bool = False, before_threads: Callable[[], None] | None = None,
              warm: bool = False) -> None:
        """Launch the zygote and every instance; return when all are ready,
        or raise CompartmentStartError (after cleaning up) if any fails.
        ``lazy``: start only the zygote; each pool's instances are spawned
        when it is first used (a start failure then makes it unavailable).
        ``warm`` (with ``lazy``): spawn them now all the same, without
        waiting; if by its first use a pool's configuration has changed (an
        entrypoint registered since, shared data), they are replaced.
        ``before_threads`` runs after the zygote exists and before the
        monitor thread does (main's own lock-down, which is per thread)."""
        try:
            self.zygote_proc, control = launcher.take_prelaunched() or launcher.launch()
            self._control = SocketTransport(control)
        except BaseException as exc:
            raise CompartmentStartError(f"cannot start the zygote: {exc}") from None
        if before_threads is not None:
            try:
                before_threads()
            except BaseException:
                self._control.close()
                self._control = None
                self.zygote_proc.kill()
                self.zygote_proc.wait()
                os.close(self._wake_r)
                os.close(self._wake_w)
                raise
        self.relay = OutputRelay()
        self.relay.monitor_thread = self._thread
        self._thread.start()
        if any(p.spec.idle_cpu is not None for p in self.pools.values()):
            self.submit(lambda: self._after(IDLE_CHECK, self._check_idle))
        if lazy:
            self._started = True
            for pool in self.pools.values():
                if warm and pool.spec.instances:
                    self._spawn_warm(pool)
                    continue
                pool.launch = lambda pool=pool: [
                    self.submit(lambda index=index: self._spawn(pool, index))
                    for index in range(pool.spec.instances)]
            return
        for pool in self.pools.values():
            for index in range(pool.spec.instances):
                self.submit(lambda pool=pool, index=index: self._spawn(pool, index))
        budget = max([p.spec.start_timeout for p in self.pools.values()], default=0) + 5.0
        deadline = time.monotonic() + budget
        with self._start_done:
            while True:
                if self._start_failures:
                    break
                if all(len(p.ready) == p.spec.instances for p in self.pools.values()):
                    self._started = True
                    for pool in self.pools.values():
                        if pool.spec.on_demand is not None and pool.spec.spares:
                            self.submit(lambda pool=pool: self._refill_spares(pool))
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._start_failures.append(CompartmentStartError(
                        f"instances did not become ready within {budget:.1f}s"))
                    break
                self._start_done.wait(remaining)
        error = self._start_failures[0]
        self.stop()
        raise error

    def stop(self, grace: float = 1.0) -> None:
        try:
            self._stop(grace)
        finally:
            if self.relay is not None:
                self.relay.stop()  # the instances are gone: copy what they left, then end

    def _stop(self, grace: float) -> None:
        if not self._thread.is_alive():
            return
        self.stopping = True
        for pool in self.pools.values():
            pool.make_unavailable("the app has stopped")

        def begin() -> None:
            for inst in list(self._by_pid.values()) + list(self._by_request.values()):
                inst.channel.fail(CompartmentUnavailable("the app has stopped"), reason="stop")
            if self._control is not None:
                try:
                    self._send_control(zygote.Shutdown(grace))
                except (OSError, TimeoutError):
                    pass  # the zygote ends anyway when the control socket closes
        self.submit(begin)
        self._thread.join(grace + 5.0)
        proc = self.zygote_proc
        if proc is not None and (self.wait_for_zygote or self._thread.is_alive()):
            try:
                proc.wait(timeout=max(0.1, grace + 2.0))
            except Exception:
                proc.kill()
                proc.wait()
        if self._thread.is_alive():
            self._thread.join(2.0)

    def submit(self, fn: Callable[[], None]) -> None:
        self._commands.append(fn)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already awake

    def spawn_on_demand(self, compartment: str, timeout: float = 10.0,
                        spare: bool = True) -> InstanceHandle:
        """Start one more instance of ``compartment`` outside its pool and
        return it once ready (a ready spare, if there is one, started with
        the configuration it would get now; ``spare`` False: a fresh start).
        It is never restarted; end it with ``retire``. (The building block
        for per-call and per-connection instances.)"""
        pool = self.pools[compartment]
        if pool.spec.on_demand is not None and pool.spec.spares and not self.stopping:
            taken = self._take_spare(pool) if spare else None
            self.submit(lambda: self._refill_spares(pool))
            if taken is not None:
                return taken
        ready: list[InstanceHandle] = []
        failed: list[tuple[InstanceHandle, str]] = []
        done = threading.Event()
        lock = threading.Lock()
        abandoned = [False]

        def on_failed(inst: InstanceHandle, reason: str) -> None:
            failed.append((inst, reason))
            done.set()

        def on_ready(inst: InstanceHandle) -> None:
            with lock:
                late = abandoned[0]
                if not late:
                    ready.append(inst)
                    done.set()
            if late:
                self.retire(inst)  # the caller gave up waiting: nobody will use it

        def spawn() -> None:
            inst = self._spawn(pool, -1, on_ready, on_failed=on_failed)
            with lock:
                late = abandoned[0]
                if not late:
                    spawned.append(inst)
            if late and inst is not None:
                self.retire(inst)  # spawned after the caller gave up
        spawned: list[InstanceHandle] = []
        self.submit(spawn)
        if not done.wait(timeout) or (failed and not ready):
            with lock:
                abandoned[0] = True
                gone = list(spawned)
            if not ready:
                for inst in gone:
                    self.retire(inst)
                if failed:
                    inst, reason = failed[0]
                    error = CompartmentStartError(f"an on-demand instance of {compartment!r} failed "
                                                  f"to start: {inst.start_error or reason}")
                    error.__cause__ = inst.start_exception
                    raise error
                raise CompartmentStartError(f"an on-demand instance of {compartment!r} did not "
                                            f"become ready within {timeout:g}s")
        return ready[0]

    def _spawn_warm(self, pool: Pool) -> None:
        """``start(warm=True)``'s early spawn of a pool, and the check at its
        first use that what was started is what would be started then."""
        try:
            fingerprint = self._fingerprint(pool)
        except Exception:
            fingerprint = b""
        started: list[InstanceHandle | None] = []

        def spawn() -> None:
            started.extend(self._spawn(pool, index) for index in range(pool.spec.instances))

        def first_use() -> None:
            try:
                now = self._fingerprint(pool)
            except Exception:
                now = None
            if now == fingerprint:
                return
            with pool.cond:  # none of those started so far joins the pool from now on
                pool.min_generation = next(self._generation)
            for inst in pool.ready:
                self.retire(inst)  # out of the pool now: this very pick waits for the new ones

            def replace() -> None:
                for inst in started:
                    if inst is not None:
                        self.retire(inst)
                for index in range(pool.spec.instances):
                    self._spawn(pool, index)
            self.submit(replace)
        pool.launch = first_use
        self.submit(spawn)

    def _fingerprint(self, pool: Pool) -> bytes:
        """What an on-demand instance started now would be configured with."""
        return msgspec.msgpack.encode(self.config_for(pool.spec, -1))

    def _take_spare(self, pool: Pool) -> InstanceHandle | None:
        """A ready spare that is what a fresh start would be; spares started
        with another configuration (an entrypoint registered since, shared
        data changed, another working directory) are retired."""
        if not pool.spares:
            return None
        try:
            now = self._fingerprint(pool)
        except Exception:
            return None  # the fresh start reports why
        while True:
            try:
                inst = pool.spares.popleft()
            except IndexError:
                return None
            if inst.fingerprint == now and inst.state == "ready" and inst.channel.failure is None:
                return inst
            self.retire(inst)

    def _refill_spares(self, pool: Pool) -> None:
        """Monitor thread: start spares until ``spec.spares`` are ready or starting."""
        starting = pool.spares_starting
        starting -= {inst for inst in starting if inst.state == "dead"}  # failed to start
        while not self.stopping and len(pool.spares) + len(starting) < pool.spec.spares:
            def ready(inst: InstanceHandle) -> None:
                starting.discard(inst)
                if self.stopping:
                    self.retire(inst)
                else:
                    pool.spares.append(inst)
            inst = self._spawn(pool, -1, ready)
            if inst is None or inst.state == "dead":
                return  # it cannot start now: the next call's own start says why
            starting.add(inst)

    def lease(self, compartment: str, deadline: float | None) -> _Lease:
        """A fresh instance of an on-demand compartment for one call or one
        connection, retired when the ``with`` ends. At most
        ``max_instances`` exist at once; beyond, waits until ``deadline``,
        then ``CompartmentUnavailable`` naming the compartment and the cap."""
        pool = self.pools[compartment]
        if pool.on_demand is None:
            raise CompartmentUnavailable(f"compartment {compartment!r} has a fixed pool of "
                                         "instances, not instances on demand")
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not pool.on_demand.acquire(timeout=timeout):
            raise CompartmentUnavailable(
                f"compartment {compartment!r}: all {pool.spec.max_instances} instances "
                f"(max_instances) stayed busy for {timeout:g}s")
        try:
            inst = self.spawn_on_demand(compartment, pool.spec.start_timeout)
        except BaseException:
            pool.on_demand.release()
            raise
        return _Lease(self, pool, inst)

    def retire(self, inst: InstanceHandle) -> None:
        """End an instance: calls pending on it fail, it is not restarted."""
        inst.pool.remove(inst)
        inst.retired = True
        self.submit(lambda: self._kill(inst, "retired"))

    def channel_event(self, inst: InstanceHandle, kind: str, detail: Any) -> None:
        """Called from caller threads by an instance's Channel."""
        if kind == "broken":
            inst.pool.remove(inst)  # no new call may pick it, even before it is reaped
        if kind == "timeout":
            self.submit(lambda: self._cancel(inst, detail))
        elif kind == "broken":
            exc, reason = detail
            if isinstance(exc, ProtocolError):
                # Set now, not on the monitor thread: the instance may see EOF
                # and exit 0 before the kill, and that is still a failure.
                inst.kill_reason = inst.kill_reason or f"protocol violation: {reason}"
                self.submit(lambda: self._kill(inst, inst.kill_reason or "protocol violation"))
                Hooks.fire(self.hooks.on_comm_break, CommBreakEvent(inst.pool.spec.name, inst.pid, reason))
                self._audit("comm_break", compartment=inst.pool.spec.name, pid=inst.pid, reason=reason)
        elif kind == "violation":
            # Counted, logged up to a point, and fatal past a bound: a flood
            # must neither fill the audit log nor go on for ever.
            inst.violations += 1
            n = inst.violations
            if n <= AUDITED_VIOLATIONS:
                more = " (further violations are counted, not logged)" if n == AUDITED_VIOLATIONS else ""
                self._audit("violation", compartment=inst.pool.spec.name, pid=inst.pid,
                            reason=str(detail)[:500] + more, count=n)
            if n == MAX_VIOLATIONS:
                inst.kill_reason = inst.kill_reason or f"{n} protocol violations (last: {str(detail)[:200]})"
                inst.pool.remove(inst)
                self.submit(lambda: self._kill(inst, inst.kill_reason or "protocol violations"))

    # -- the monitor thread -----------------------------------------------------

    def _run(self) -> None:
        assert self._control is not None
        self._watch(self._control.fileno(), "control", None)
        self._watch(self._wake_r, "wake", None)
        try:
            while self._loop_once():
                pass
        finally:
            self._shutdown_cleanup()

    def _loop_once(self) -> bool:
        timeout_ms = -1
        if self._timers:
            timeout_ms = max(0, int((self._timers[0][0] - time.monotonic()) * 1000) + 1)
        for fd, _mask in self._poll.poll(timeout_ms):
            kind, obj = self._fd_owner.get(fd, (None, None))
            if kind == "wake":
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            elif kind == "control":
                if not self._read_control():
                    return False
            elif kind == "pidfd":
                self._guarded(self._on_pidfd, obj)
            elif kind == "hello":
                self._guarded(self._on_hello, obj)
            elif kind == "edges":
                self._guarded(self.edges.on_readable, obj)
        while self._commands:
            self._guarded(self._commands.popleft())
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            self._guarded(fn)
        return True

    def _guarded(self, fn: Callable[..., None], inst: InstanceHandle | None = None) -> None:
        """Run one piece of the monitor's work. Nothing an instance sends may
        end the monitor loop: whatever escapes is reported, and the instance
        it concerns (if known) is killed and replaced."""
        try:
            fn() if inst is None else fn(inst)
        except Exception as exc:
            print(f"pycompart: monitor: {type(exc).__name__}: {exc}", file=sys.stderr)
            if inst is not None:
                try:
                    inst.kill_reason = inst.kill_reason or f"broke the monitor: {type(exc).__name__}"
                    self._kill(inst, inst.kill_reason)
                except Exception:
                    pass

    def _watch(self, fd: int, kind: str, obj: Any) -> None:
        self._fd_owner[fd] = (kind, obj)
        self._poll.register(fd, select.POLLIN)

    def _unwatch(self, fd: int | None) -> None:
        if fd is not None and self._fd_owner.pop(fd, None) is not None:
            self._poll.unregister(fd)

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))

    def _send_control(self, msg: object, fds: list[int] | None = None) -> None:
        assert self._control is not None
        fds = fds or []
        self._control.send(zygote.encode_control(msg, len(fds)), fds, time.monotonic() + 5.0)

    def _read_control(self) -> bool:
        assert self._control is not None
        try:
            n, fds = self._control.read_into(self._control_buf)
        except BlockingIOError:
            return True
        except OSError:
            n, fds = 0, []
        if n == 0:
            return False  # the zygote is gone
        self._control_reader.feed(bytes(self._control_buf[:n]), fds)
        for msg, fds in self._control_reader.messages():
            if isinstance(msg, zygote.Spawned):
                self._on_spawned(msg, fds)
            elif isinstance(msg, zygote.Exited):
                inst = self._by_pid.pop(msg.pid, None)
                if inst is not None:
                    inst.usage = {"cpu_ms": msg.cpu_ms, "max_rss_kib": msg.max_rss_kib}
                    self._guarded(lambda: self._finalize(inst, msg.status))
            else:
                for fd in fds:
                    os.close(fd)
        return True

    # -- spawning ---------------------------------------------------------------

    def _spawn(self, pool: Pool, index: int,
               on_ready: Callable[[InstanceHandle], None] | None = None,
               caller: InstanceHandle | None = None,
               on_failed: Callable[[InstanceHandle, str], None] | None = None) -> InstanceHandle | None:
        """Start an instance of ``pool``'s compartment. ``on_ready``: an
        instance outside the pool (on demand), given to it once ready.
        ``caller``: an edge instance, serving that instance only."""
        if self.stopping:
            return None
        conn = Connection(self.spec.max_message_size)
        # Until its Hello, an instance has nothing big to say: the first
        # frame is read on this thread and must cost it next to nothing.
        conn.frames.max_frame = min(HELLO_MAX, self.spec.max_message_size)
        transport: PipeTransport | SocketTransport
        if pool.spec.descriptors or caller is not None:
            # One unix socket (both of the instance's ends are it): slower
            # than pipes, but it carries descriptors as values, and an
            # edge's end can be handed to its caller.
            ours, theirs_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            call_r = theirs_sock.detach()
            reply_w = os.dup(call_r)
            os.set_inheritable(reply_w, False)
            transport = SocketTransport(ours)
        else:
            call_r, call_w = make_pipe()
            reply_r, reply_w = make_pipe()
            transport = PipeTransport(reply_r, call_w)
        channel = Channel(transport, conn, pool.spec.name)
        inst = InstanceHandle(pool, index, channel, next(self._generation))
        inst.on_ready = on_ready
        inst.on_failed = on_failed
        if caller is not None:
            inst.edge_depth = caller.edge_depth + 1
            inst.edge_root = caller.edge_root or caller
        channel.on_event = lambda kind, detail: self.channel_event(inst, kind, detail)
        channel.failure_factory = inst.crash_error
        channel.instance = inst  # type: ignore[attr-defined]
        if self.prepare is not None:
            self.prepare(inst)
        request = inst.request = next(self._requests)
        self._by_request[request] = inst
        theirs = [call_r, reply_w]
        try:
            config = self.config_for(pool.spec, index)
            if caller is not None:
                config = self.edges.edge_config(config, caller)
            elif on_ready is not None:
                inst.fingerprint = msgspec.msgpack.encode(config)
        except Exception as exc:  # e.g. shared data missing in main
            self._by_request.pop(request, None)
            os.close(call_r)
            os.close(reply_w)
            inst.start_exception = exc
            inst.start_error = str(exc)
            channel.close()
            self._start_failed(inst, str(exc))
            return inst
        if pool.spec.output in ("relay", "prefixed"):
            # Its stdout and stderr: pipes of its own, which main copies out.
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            theirs += [out_w, err_w]
            sink = Sink(self.relay, pool.spec.name, pool.spec.output == "prefixed")
            channel.output_sink = sink.write
            # Its pipes are looked at once the spawn is sent: waking the relay
            # thread first put a wake-up (and its wait for the GIL) before it.
            self.relay.add(sink, out_r, err_r, wake=False)
            self._after(0.0, self.relay.wake_up)
        lanes = self._bulk_lanes(pool, caller)
        if lanes is not None:
            # Shared memory for its large values; used once it says it mapped it.
            channel.bulk_offer, lanes_fd = lanes
            theirs.append(lanes_fd)
        if config.edges:
            # Its way to the compartments it may call: a socket to us.
            control_ours, control_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            theirs.append(control_theirs.detach())
            self.edges.attach(inst, SocketTransport(control_ours, carry_fds=False))
        try:
            self._send_control(zygote.Spawn(request, config, bool(config.edges), lanes is not None),
                               theirs)
        except (OSError, TimeoutError) as exc:
            self._by_request.pop(request, None)
            self._start_failed(inst, f"cannot reach the zygote: {exc}")
            return inst
        finally:
            # The instance must hold the only copies, or its death is no EOF.
            for fd in theirs:
                os.close(fd)
        self._after(pool.spec.start_timeout, lambda: self._start_timeout(inst))
        return inst

    def _bulk_lanes(self, pool: Pool, caller: InstanceHandle | None) -> tuple[Lanes, int] | None:
        """Bulk lanes for a new instance's channel to main (an edge's
        channel is its caller's, which has none) and the instance's
        descriptor of their memory file, or None. An on-demand
        compartment's come made ahead (``_stock_lanes``): a memory file
        costs ~0.2 ms to make and map, on the path of every fresh start."""
        if caller is not None or not bulk.ENABLED:
            return None
        size = bulk.lane_size(self.spec.max_message_size, pool.spec.privileges.memory)
        if not size:
            return None
        made = self._spare_lanes.pop(size, None) or _make_lanes(size)
        if pool.spec.on_demand is not None:
            self._after(0.0, lambda: self._stock_lanes(size))  # (once this spawn is sent)
        return made

    def _stock_lanes(self, size: int) -> None:
        """The next on-demand instance's lanes of ``size``, made while none
        waits. Each memory file is handed to one instance only, as a fresh
        one is: at most one made ahead per size, for a few sizes."""
        if self.stopping or size in self._spare_lanes or len(self._spare_lanes) >= MAX_SPARE_LANES:
            return
        made = _make_lanes(size)
        if made is not None:
            self._spare_lanes[size] = made

    def _on_spawned(self, msg: zygote.Spawned, fds: list[int]) -> None:
        inst = self._by_request.pop(msg.request, None)
        if inst is None or msg.error or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if inst is not None:
                self._start_failed(inst, msg.error or "zygote sent no pidfd")
            return
        # The zygote names the instance by its pid in the app's pid
        # namespace; main's own view of it (errors, audit, app.instances)
        # comes from the pidfd.
        inst.ns_pid, inst.pidfd = msg.pid, fds[0]
        inst.pid = process.pidfd_pid(inst.pidfd) or msg.pid
        inst.state = "starting"
        self._by_pid[msg.pid] = inst
        self._watch(inst.pidfd, "pidfd", inst)
        self._watch(inst.channel.transport.fileno(), "hello", inst)

    def _on_hello(self, inst: InstanceHandle) -> None:
        channel = inst.channel
        try:
            n, _ = channel.transport.read_into(channel._view)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n == 0:
            self._unwatch(channel.transport.fileno())
            return  # it died; the exit path reports why
        event = channel.conn.parse_one(channel._view[:n])
        if event is NEED_DATA:
            return
        self._unwatch(channel.transport.fileno())
        if isinstance(event, Hello) and event.compartment == inst.pool.spec.name and event.pid == inst.ns_pid:
            offer = channel.bulk_offer
            if offer is not None and event.bulk:
                channel.bulk_offer = None
                channel.use_bulk(offer, Ok)
            self._became_ready(inst)
        elif isinstance(event, Abort):
            inst.start_exception = rebuild_exception(event.error, inst.pool.spec.name)
            inst.start_error = f"{event.error.type_name}: {event.error.message}"
        else:
            reason = event.reason if isinstance(event, Violation) else f"unexpected first message {event!r}"
            self._kill(inst, f"bad start: {reason}")

    def _became_ready(self, inst: InstanceHandle) -> None:
        inst.channel.conn.frames.max_frame = self.spec.max_message_size
        inst.state = "ready"
        inst.pool.ever_ready = True
        ms = (time.monotonic() - inst.started_at) * 1000
        self._audit("instance_start", compartment=inst.pool.spec.name, pid=inst.pid,
                    index=inst.index, generation=inst.generation, ready_ms=round(ms, 3))
        if inst.on_ready is not None:
            inst.on_ready(inst)
        elif not inst.pool.add(inst):
            self.retire(inst)  # of a configuration since replaced
        with self._start_done:
            self._start_done.notify_all()

    def _start_timeout(self, inst: InstanceHandle) -> None:
        if inst.state == "starting":
            inst.start_error = f"did not become ready within {inst.pool.spec.start_timeout:g}s"
            self._kill(inst, "start timeout")  # the exit path reports it
        elif inst.state == "spawning":
            self._by_request.pop(inst.request, None)
            self._start_failed(inst, "the zygote did not fork it in time")

    def _start_failed(self, inst: InstanceHandle, reason: str) -> None:
        inst.state = "dead"
        inst.dead.set()
        self.edges.caller_ended(inst)
        self.edges.callee_ended(inst, inst.start_error or reason, failed=True)
        if inst.on_failed is not None:  # on demand: its caller waits for it
            inst.on_failed(inst, reason)
            return
        if self._started and not inst.pool.ever_ready and inst.on_ready is None:
            # Lazy start, first launch: retrying a module that cannot import
            # would only fail again. Fail the callers with the reason.
            inst.pool.unavailable_cause = inst.start_exception
            inst.pool.make_unavailable(f"it failed to start: {inst.start_error or reason}")
            return
        if self._started:  # a replacement failed: count it against the restart budget
            self._plan_restart(inst, None)
            return
        error = CompartmentStartError(f"compartment {inst.pool.spec.name!r} failed to start: {reason}")
        if inst.start_exception is not None:
            error.__cause__ = inst.start_exception
        with self._start_done:
            self._start_failures.append(error)
            self._start_done.notify_all()

    # -- death and restart --------------------------------------------------------

    def _on_pidfd(self, inst: InstanceHandle) -> None:
        self._unwatch(inst.pidfd)
        # The zygote reaps and reports the status within microseconds; if it
        # cannot, do not leave callers waiting on it.
        self._after(1.0, lambda: self._finalize(inst, None) if inst.state != "dead" else None)

    def _finalize(self, inst: InstanceHandle, status: int | None) -> None:
        if inst.state == "dead":
            return
        was_ready = inst.state == "ready"
        inst.state = "dead"
        inst.status = status
        inst.status_text = (process.describe_wait_status(status) if status is not None
                            else "ended (exit status unknown)")
        if status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == EXIT_START_FAILED:
            inst.status_text = "failed to start"
        inst.dead.set()
        self._by_pid.pop(inst.ns_pid or -1, None)
        self._unwatch(inst.pidfd)
        if not inst.handed_over:  # else that number is no longer ours
            self._unwatch(inst.channel.transport.fileno())
        if inst.pidfd is not None:
            os.close(inst.pidfd)
            inst.pidfd = None
        pool = inst.pool
        pool.remove(inst)
        detail = inst.status_text + (f" ({inst.kill_reason})" if inst.kill_reason else "")
        inst.channel.fail(CompartmentCrashed(pool.spec.name, inst.pid, detail), reason=detail)
        inst.channel.close()  # now, or when the last thread inside it leaves
        self.edges.caller_ended(inst)
        failed = not inst.retired and (status is None or process.is_failure(status)
                                       or inst.kill_reason is not None)
        self.edges.callee_ended(inst, detail, failed)
        if not was_ready and not self.stopping and not inst.retired and (
                not self._started or not pool.ever_ready):
            # (A retired one was ended on purpose: a warm start replaced, a
            # spare of an old configuration. It says nothing of the next.)
            self._audit("instance_exit", compartment=pool.spec.name, pid=inst.pid, status=detail)
            self._start_failed(inst, inst.start_error or detail)
            return
        restarting = self._plan_restart(inst, status)
        self._audit("instance_exit", compartment=pool.spec.name, pid=inst.pid, status=detail,
                    restarting=restarting, **inst.usage)
        Hooks.fire(self.hooks.on_termination, InstanceEvent(pool.spec.name, inst.pid, detail, restarting))

    def _plan_restart(self, inst: InstanceHandle, status: int | None) -> bool:
        pool = inst.pool
        spec = pool.spec
        if self.stopping or inst.retired or inst.on_ready is not None:
            return False  # on-demand and retired instances are not replaced
        failed = status is None or process.is_failure(status) or inst.kill_reason is not None
        if spec.restart == "never" or (spec.restart == "on-failure" and not failed):
            if not pool.ready:
                pool.make_unavailable(f"its instance {inst.status_text} and restart is {spec.restart!r}")
            return False
        now = time.monotonic()
        while pool.restarts and pool.restarts[0] < now - spec.restart_window:
            pool.restarts.popleft()
        if len(pool.restarts) >= spec.max_restarts:
            if not pool.ready:
                pool.make_unavailable(f"gave up after {spec.max_restarts} restarts within "
                                      f"{spec.restart_window:g}s (last: {inst.status_text})")
            return False
        delay = min(5.0, spec.restart_backoff * (2 ** len(pool.restarts)))
        pool.restarts.append(now)
        self._audit("instance_restart", compartment=spec.name, index=inst.index,
                    delay_ms=round(delay * 1000, 3))
        self._after(delay, lambda: self._spawn(pool, inst.index))
        return True

    def _kill(self, inst: InstanceHandle, reason: str) -> None:
        if inst.state == "dead" or inst.pidfd is None:
            return
        # Never hand it out again: between the kill and the zygote's report
        # of its exit, a caller would otherwise pick a dying instance.
        inst.pool.remove(inst)
        inst.kill_reason = inst.kill_reason or reason
        self._audit("instance_kill", compartment=inst.pool.spec.name, pid=inst.pid, reason=reason)
        # Through the pidfd: never a process that reused the number. What
        # the instance forked (its process group) is killed by the zygote
        # when it reaps the instance, while the group's id cannot be reused.
        process.pidfd_kill(inst.pidfd, signal.SIGKILL)

    def _check_idle(self) -> None:
        """Kill an instance that burns CPU while nobody calls it: a thread of
        the compartment left spinning after its call returned (or started at
        import, in a spare waiting to be used)."""
        self._after(IDLE_CHECK, self._check_idle)
        for pool in self.pools.values():
            limit = pool.spec.idle_cpu
            if limit is None:
                continue
            for inst in (*pool.ready, *pool.spares):
                calls = inst.channel.conn.last_id
                if inst.channel.pending or calls != inst.idle_calls:
                    inst.idle_calls, inst.idle_cpu_base = calls, None  # it was working
                    continue
                used = process.cpu_seconds(inst.pid) if inst.pid else None
                if used is None:
                    continue
                if inst.idle_cpu_base is None:
                    inst.idle_cpu_base = used
                elif used - inst.idle_cpu_base > limit:
                    inst.kill_reason = (f"used {used - inst.idle_cpu_base:.1f}s of CPU while no call was "
                                        f"in flight (idle_cpu = {limit:g}s)")
                    self._kill(inst, inst.kill_reason)

    def _cancel(self, inst: InstanceHandle, rid: int) -> None:
        """A call timed out: interrupt it, and kill the instance if it has
        not yielded when the grace period ends."""
        if inst.state != "ready" or inst.pidfd is None:
            return
        process.pidfd_kill(inst.pidfd, CANCEL_SIGNAL)

        def check() -> None:
            if inst.state != "ready":
                return
            inst.channel.drain()
            if rid in inst.channel.conn.cancelled:
                self._kill(inst, f"a cancelled call did not yield within "
                                 f"{inst.pool.spec.cancel_grace:g}s")
        self._after(inst.pool.spec.cancel_grace, check)

    def _shutdown_cleanup(self) -> None:
        for inst in list(self._by_pid.values()) + list(self._by_request.values()):
            inst.channel.fail(CompartmentUnavailable("the app has stopped"), reason="stop")
            self._finalize(inst, None)
        for pool in self.pools.values():
            pool.make_unavailable("the app has stopped")
        for lanes, theirs in self._spare_lanes.values():
            lanes.close()
            os.close(theirs)
        self._spare_lanes.clear()
        if self._control is not None:
            self._control.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)
