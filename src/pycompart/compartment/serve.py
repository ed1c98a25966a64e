"""Inside an instance: prepare the process, lock it down, import, serve.

This runs in a child forked from the zygote. The order matters and is the
design's: process hygiene first, then the privilege lock-down, and only then
any import of the compartment's own code, so that not even import-time code of
an untrusted module runs with more than the compartment's privileges.

Top-level calls are executed one at a time on the main thread, which keeps
the null call cheap (no thread hand-off) and makes cancellation possible.
Calls nested in a callback this instance made to main run on the thread that
made it (``pycompart.transport.channel``). Cancellation: the caller sends a
``Cancel`` frame and the monitor a ``CANCEL_SIGNAL``; the handler reads the
frame and raises ``CallCancelled`` inside the running entrypoint. Code that
does not yield (a C loop, a blocked signal) is killed by the monitor after the
grace period instead; a process can always be stopped, a thread cannot.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import runpy
import select
import signal
import socket
import stat
import sys
import threading
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from .. import fastpaths
from ..errors import CallCancelled, EntrypointError, ProtocolError
from ..kernel import process, rlimits
from ..transport.bulk import Lanes
from ..transport import gate
from ..transport.channel import REPLY_SEND_TIMEOUT, CallServer, Channel, serving, serving_stack
from ..transport.streams import PipeTransport, SocketTransport
from ..wire import refs
from ..wire.config import CANCEL_SIGNAL, EXIT_PROTOCOL, EXIT_START_FAILED, InstanceConfig
from ..wire.contract import Contract
from ..wire.exceptions import describe_exception
from ..wire.protocol import OK_ENVELOPE, Call, Connection, Err, close_fds, compact_ok_frame, leave_stack
from .. import compartment as _package
from . import edges as _edges
from . import lockdown as _lockdown
from . import output as _output
from . import warn as _warn
from .objects import MainRef, ObjectServer, instance_peer

if TYPE_CHECKING:
    from ..wire.contract import BulkPayload

_main_source: bytes | None = None

#: What this instance prints while it serves a call, for the reply.
CALL_OUTPUT = _output.CallOutput()
#: The warnings its code issues while it serves a call, for the caller.
CALL_WARNINGS = _warn.CallWarnings()


def preload() -> None:
    """In the zygote, before it forks: what every instance will need, built
    once (``pycompart.compartment.output.prepare``, ``lockdown.index_packages``)."""
    _output.prepare(CALL_OUTPUT)
    _lockdown.index_packages()



def run(config: InstanceConfig, read_fd: int, write_fd: int,
        output_fds: tuple[int, int] | None = None, control_fd: int | None = None,
        bulk_fd: int | None = None) -> NoReturn:
    """Become an instance, serving calls read from ``read_fd`` with replies
    written to ``write_fd``; ``output_fds`` are the write ends of the pipes
    main relays its stdout and stderr from; ``control_fd`` its edge control
    socket to the monitor (``pycompart.compartment.edges``); ``bulk_fd`` the
    memory file of its bulk lanes (``pycompart.transport.bulk``). Never returns."""

    def start() -> dict[str, _LazyContract]:
        keep = {read_fd, write_fd} | {fd for fd in (control_fd, bulk_fd) if fd is not None}
        _prepare_process(keep, config.output, output_fds)
        if control_fd is not None:
            # Before any of the compartment's code: its only way to
            # other compartments is what the monitor hands out here.
            _edges.install(config, control_fd)
        apply_privileges(config)
        return _load(config)
    start_and_serve(config, read_fd, write_fd, bulk_fd, start)


def start_and_serve(config: InstanceConfig, read_fd: int, write_fd: int, bulk_fd: int | None,
                    start: Callable[[], dict[str, _LazyContract]],
                    server: Server | None = None) -> NoReturn:
    """``start()`` (its entrypoints), then serve (with ``server``, built
    ahead over these descriptors, if given); a start that raises is
    reported to the caller (``Abort``). Never returns."""
    _package.CURRENT = config
    code = 0
    try:
        try:
            table = start()
        except BaseException as exc:  # report any start failure, then die
            try:
                os.set_blocking(write_fd, True)
                os.write(write_fd, Connection.send_abort(describe_exception(exc)))
            except OSError:
                pass
            code = EXIT_START_FAILED
        else:
            if server is None:
                server = Server(config, read_fd, write_fd, table, bulk_fd)
            server.serve()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def rehearse(config: InstanceConfig, table: dict[str, _LazyContract], times: int = 12) -> None:
    """In a template, before it forks: build an instance's server a few
    times over a pipe of its own, and drop it. What each instance would
    otherwise do first after its ``Spawn`` (run these code paths cold, so
    that Python specializes their code objects, and build the codecs and
    caches they fill on first use) is then done once, in memory the
    instances share. The globals a server sets are set again by each
    instance's own."""
    for _ in range(times):
        server_on_own_pipe(config, table).channel.close()  # (its descriptors with it)


def server_on_own_pipe(config: InstanceConfig, table: dict[str, _LazyContract]) -> Server:
    """An instance's server over a fresh pipe of its own (a rehearsal's, or
    a server built before its channel comes: ``Server.take_descriptors``)."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        return Server(config, read_fd, write_fd, table)
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise


def _prepare_process(keep: set[int], mode: str = "inherit",
                     output_fds: tuple[int, int] | None = None) -> None:
    # Die with the zygote (itself bound to the monitor). The zygote is
    # single-threaded, so "parent thread" is the whole zygote.
    parent = os.getppid()
    process.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    os.setpgid(0, 0)  # own process group: terminal signals aimed at main miss it
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed channel is EPIPE, handled
    signal.set_wakeup_fd(-1)
    # fds 1 and 2 become the instance's own output pipes (or /dev/null),
    # never main's (unless the spec says "inherit"); stdin is /dev/null. The
    # channel is kept; everything else inherited is closed.
    if mode in ("relay", "prefixed") and output_fds is not None:
        for fd, target in zip(output_fds, (1, 2)):
            if fd != target:
                os.dup2(fd, target)
        for fd in output_fds:
            if fd not in (1, 2):
                os.close(fd)
    elif mode != "inherit":
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    process.close_fds_except(keep | {1, 2})
    null = os.open(os.devnull, os.O_RDONLY)
    if null != 0:
        os.dup2(null, 0)
        os.close(null)
    if mode in ("relay", "prefixed"):
        _output.install(CALL_OUTPUT)


def _drop_outgoing_fds() -> None:
    """A call that failed after its result collected descriptors: close them."""
    close_fds(refs.take_outgoing_fds())


def _same_socket(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return stat.S_ISSOCK(sa.st_mode) and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def apply_privileges(config: InstanceConfig, template: bool = False) -> None:
    """The lock-down step (see ``pycompart.compartment.lockdown``): after it, this
    process has only what the compartment's spec grants (``template``: and
    what its template needs, ``pycompart.compartment.template``)."""
    os.environ.clear()
    os.environ.update(config.environment)
    # Before the uid drop: the new uid may not be able to reach the working
    # directory, and a process may stay where it already is.
    os.chdir(config.cwd)
    lock = config.lockdown
    global _main_source
    if config.main_path and any(key.startswith("__main__:") for key in config.entrypoints):
        # main's own script is trusted (it is domain 0's code): read it while
        # it is surely readable; it is *run* only after the lock-down.
        with open(config.main_path, "rb") as f:
            _main_source = f.read()
    if lock.preopen:
        reach = _lockdown.preopen(lock.preopen)
        config.sys_path = [reach.get(os.path.abspath(p or config.cwd), p) for p in config.sys_path]
        _lockdown.reroute_packages(reach)
    _lockdown.apply(lock, template)


def _load(config: InstanceConfig) -> dict[str, _LazyContract]:
    sys.path[:] = config.sys_path
    if config.elsewhere:
        sys.meta_path.insert(0, _PlacedElsewhere(config.compartment, config.elsewhere, config.edges))
    if config.rewritten:
        sys.meta_path.insert(0, _Rewritten(config.rewritten))
    _install_shared(config.shared)
    _edges.bind_functions(config)
    if any(key.startswith("__main__:") for key in config.entrypoints):
        _load_main(config)
    for name in config.modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not exc.name or not (name == exc.name or name.startswith(exc.name + ".")):
                raise  # found, but something it imports is missing: a real error
            # Not on the import path yet: main may add its directory later
            # (``sys.path.insert(0, "lib")``); main's import of it brings its
            # path (``ObjectServer.op_import``) and fails there as unboxed.
    table: dict[str, _LazyContract] = {}
    for key in config.entrypoints:
        module_name, _, qualname = key.partition(":")
        obj: object = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        fn = getattr(obj, "__pycompart_function__", obj)
        if not callable(fn):
            raise EntrypointError(f"{key} is not callable")
        table[key] = _LazyContract(fn, key)
    return table


class _Rewritten:
    """Modules main imported rewritten (their segments hoisted): imported
    here from the same rewritten files, so both sides have the same
    entrypoints (main's trusted code, read while the file is readable)."""

    def __init__(self, files: dict[str, str]):
        self.files = files

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        where = self.files.get(fullname)
        if where is None:
            return None
        import importlib.util

        return importlib.util.spec_from_file_location(fullname, where)


class _PlacedElsewhere:
    """A module the spec placed in another compartment never runs here,
    under this compartment's privileges: importing it gives a proxy over
    the edge to that compartment if ``may_call`` declares one, and fails
    otherwise."""

    def __init__(self, here: str, elsewhere: dict[str, str], edges: object = ()):
        self.here = here
        self.elsewhere = elsewhere
        self.edges = edges

    def find_spec(self, fullname: str, path: object, target: object = None) -> object:
        for module, owner in self.elsewhere.items():
            if fullname == module or fullname.startswith(module + "."):
                if owner in self.edges and _edges.CLIENT is not None:
                    return importlib.machinery.ModuleSpec(fullname, _edges.CLIENT.module_loader(owner))
                raise ImportError(f"module {fullname!r} is placed in compartment {owner!r}; "
                                  f"compartment {self.here!r} cannot import it: its spec's "
                                  f"may_call does not list {owner!r}", name=fullname)
        return None


def _install_shared(shared: list[tuple[str, str, bytes]]) -> None:
    """IA2_SHARED_DATA for Python: main's declared values, copied in before
    any of the compartment's modules is imported. A module not already here
    becomes a stand-in holding only the shared names: none of main's code
    runs in the compartment."""
    for module_name, name, data in shared:
        module = sys.modules.get(module_name)
        if module is None:
            module = types.ModuleType(module_name, "shared data from main (pycompart)")
            sys.modules[module_name] = module
        setattr(module, name, refs.decode_plain(data))


class _LazyContract:
    """Builds the entrypoint's Contract on its first call. Main has already
    checked the annotations at start; building every codec up front would
    only slow the instance's start."""

    __slots__ = ("fn", "key", "contract")

    def __init__(self, fn: object, key: str):
        self.fn = fn
        self.key = key
        self.contract: Contract | None = None

    def invoke(self, raw_args: object, bulk: list[bytes] | None = None, bulk_out: bool = False) -> bytes:
        if self.contract is None:
            self.contract = Contract(self.fn, self.key)  # type: ignore[arg-type]
        return self.contract.invoke(raw_args, bulk, bulk_out)  # type: ignore[arg-type]


def _load_main(config: InstanceConfig) -> None:
    """Make ``__main__`` functions importable, as multiprocessing's spawn does:
    run the main script (or module) under the name ``__mp_main__`` so its
    ``if __name__ == "__main__":`` block does not run here."""
    module = types.ModuleType("__mp_main__")
    if config.main_module:
        namespace = runpy.run_module(config.main_module, run_name="__mp_main__", alter_sys=True)
    elif config.main_path and _main_source is not None:
        module.__file__ = config.main_path
        module.__builtins__ = __builtins__  # type: ignore[attr-defined]
        sys.modules["__mp_main__"] = module
        code = compile(_main_source, config.main_path, "exec", dont_inherit=True)
        exec(code, module.__dict__)
        namespace = module.__dict__
    else:
        raise EntrypointError("an entrypoint is defined in __main__, but the main program has no "
                              "file to import it from (interactive session or -c)")
    module.__dict__.update(namespace)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


class Server(CallServer):
    """The serve loop of an instance: top-level calls run one at a time on
    the main thread, cancellable. Calls nested in a callback this instance
    made run on the thread that made it (``pycompart.transport.channel``)."""

    def __init__(self, config: InstanceConfig, read_fd: int, write_fd: int, table: dict[str, _LazyContract],
                 bulk_fd: int | None = None):
        self.config = config
        self.table = table
        transport: PipeTransport | SocketTransport
        if _same_socket(read_fd, write_fd):
            # descriptors = true: one unix socket, which carries descriptors.
            os.close(write_fd)
            # An edge is a socket whatever the spec: whether it carries
            # descriptors as values is the spec's.
            transport = SocketTransport(socket.socket(fileno=read_fd), carry_fds=config.descriptors)
            transport.sock.setblocking(True)
        else:
            transport = PipeTransport(read_fd, write_fd)
            os.set_blocking(read_fd, True)  # see Channel.blocking_reads
        self.channel = Channel(transport, Connection(config.max_frame), config.caller, server=self)
        self.channel.blocking_reads = True
        if bulk_fd is not None:
            self.use_bulk_fd(bulk_fd)
        # Module compartments pass references: releases wait for decodes.
        self.channel.track_arrivals = bool(config.modules or config.functions)
        self.objects = ObjectServer(config.compartment, config.modules, config.functions,
                                    config.expose, config.allow_setattr, config.trusts_main,
                                    shares_containers=config.caller == "main")
        self.objects.main_zones = config.may_call_main
        self.peer = instance_peer(self.objects)
        self.peer.can_pass_fds = transport.can_pass_fds
        self.peer.pending_release = self.channel.pending_release
        self.current: int | None = None
        self.active: list[int] = []  # calls the serve thread runs, innermost last
        self.serve_ident = threading.get_ident()
        #: Typed entrypoints by their names' bytes, for calls in compact form
        #: (``_direct_compact``); None: not taken (``pycompart.fastpaths``).
        compact = fastpaths.enabled("compact")
        self._by_name: dict[bytes, _LazyContract] | None = (
            {key.encode(): lazy for key, lazy in table.items()} if compact else None)
        #: A module compartment's operations (``@call``, ...) the same way.
        self._ops_by_name: dict[bytes, str] = (
            {op.encode(): op for op in self.objects.operations()}
            if compact and self.channel.track_arrivals else {})
        #: The biggest value a compact reply may carry (the message size limit).
        self._max_value = config.max_frame - OK_ENVELOPE.size
        #: Built before its channel came (``take_descriptors``).
        self.built_ahead = False
        self.cancel_current = False
        self.in_user_code = False
        self.depth = 0  # > 0 while the main thread is inside a channel (a callback, an edge call)
        self.cancel_signalled = False  # the cancel signal came while depth > 0
        if _edges.CLIENT is not None:
            _edges.CLIENT.around = self._around_edge_call
        MainRef.call_out = self.call_out
        CALL_OUTPUT.channel = self.channel
        CALL_OUTPUT.in_call = lambda: self.current is not None
        if config.stdin == "main":
            sys.stdin = sys.__stdin__ = _output.Stdin(self.call_out, CALL_OUTPUT.in_call)
        if self.channel.track_arrivals:  # module compartments: main re-issues warnings
            CALL_WARNINGS.channel = self.channel
            CALL_WARNINGS.current_call = lambda: self.active[-1] if self.active else 0
            CALL_WARNINGS.install()

    def use_bulk_fd(self, bulk_fd: int) -> None:
        """Map the memory file of the channel's bulk lanes (and close it)."""
        try:
            lanes = Lanes(bulk_fd, side=1)
        except (OSError, ValueError):  # e.g. no address space left for it: all inline
            os.close(bulk_fd)
        else:
            self.channel.use_bulk(lanes, Call)
            # What comes through a lane is copied into fresh bytes: from
            # memory the last one freed, not from new pages.
            rlimits.reuse_large_allocations(2 * lanes.size)

    def take_descriptors(self, config: InstanceConfig, read_fd: int, write_fd: int) -> None:
        """(A server built ahead over placeholder pipes, ``template``.) Its
        instance's own channel, ``config`` and descriptors from now on: they
        take the placeholders' numbers (closed here), so that everything
        built on those numbers reads and writes the instance's pipes."""
        transport = self.channel.transport
        assert isinstance(transport, PipeTransport)
        for fd, placeholder in ((read_fd, transport.read_fd), (write_fd, transport.write_fd)):
            os.dup2(fd, placeholder, inheritable=False)
            os.close(fd)
        os.set_blocking(transport.write_fd, False)
        os.set_blocking(transport.read_fd, True)  # (as built: see Channel.blocking_reads)
        self.config = config
        self.built_ahead = True

    def serve(self) -> None:
        signal.signal(CANCEL_SIGNAL, self._on_cancel_signal)
        channel = self.channel
        channel.reply(Connection.send_hello(os.getpid(), self.config.compartment, sorted(self.table),
                                            channel.bulk is not None))
        self._warm_up()
        next_call = channel.next_call
        reply = channel.reply
        direct = isinstance(channel.transport, PipeTransport)
        while True:
            if direct and channel.idle() and threading.active_count() == 1:
                self._serve_direct()
            call = next_call()
            if call is None:
                failure = channel.failure
                if isinstance(failure, ProtocolError):
                    print(f"pycompart: instance of {self.config.compartment!r}: protocol violation "
                          f"from caller: {failure}", file=sys.stderr)
                    os._exit(EXIT_PROTOCOL)
                return  # the caller closed the channel: orderly shutdown
            reply(self._run_top(call))
            if channel.failure is not None and not isinstance(channel.failure, ProtocolError):
                os._exit(0)  # the caller is gone; nothing left to serve

    def _warm_up(self) -> None:
        """Build the typed entrypoints' codecs now, while no call waits (a
        spare's idle time), not on each one's first call. A call that
        arrives first is served first; an entrypoint whose codec cannot be
        built says why when it is called."""
        poll = select.poll()
        poll.register(self.channel.transport.fileno(), select.POLLIN)
        for lazy in self.table.values():
            if poll.poll(0):
                return
            if lazy.contract is None:
                try:
                    lazy.contract = Contract(lazy.fn, lazy.key)  # type: ignore[arg-type]
                except Exception:
                    pass

    def _run_top(self, call: Call) -> bytes:
        """Run a top-level call on the serve thread; its reply frame."""
        channel = self.channel
        self.current = call.id
        self.cancel_current = False
        stack = serving_stack()
        entry = (channel, call.id)
        try:
            stack.append(entry)
            return self.execute(channel, call, True)
        finally:
            leave_stack(stack, entry)
            self.current = None
            if channel.track_arrivals:
                self.peer.decoded(("c", call.id))
                CALL_WARNINGS.finished(call.id)

    def _serve_direct(self) -> None:
        """Serve calls straight off the pipe (``transport.gate.serve``: in
        C where built) while this process has one thread and nothing else
        is going on: each read one whole plain frame, decoded and run by
        ``_direct_frame``. Anything else goes back to the general loop."""
        channel = self.channel
        transport = channel.transport
        try:
            n = gate.serve(transport.read_fd, transport.write_fd, channel._view,  # type: ignore[attr-defined]
                           self._direct_frame, int(REPLY_SEND_TIMEOUT * 1000), int(channel.spin * 1e6),
                           self._direct_compact if self._by_name is not None else None)
        except OSError as exc:  # TimeoutError too: the reply could not be written in time
            channel.send_failed(exc)
            return
        if n == 0:
            channel._fail_from_eof("closed its channel")
        elif n > 0:
            channel.conn.receive_data(channel._view[:n])  # the general loop takes it from here

    def _direct_compact(self, rid: int, name: bytes, args: bytes) -> bytes | tuple[bytes] | bool | None:
        """A top-level call in compact form read by ``_serve_direct``: the
        value to send back as a compact reply (``gate.serve`` frames it), a
        1-tuple holding a whole frame to send, False once answered here
        (and the general loop takes over), or None: not a built typed
        entrypoint's, so the general loop reads the frame itself."""
        channel = self.channel
        if channel.track_arrivals:
            op = self._ops_by_name.get(name)
            if op is None:
                return None  # (a typed entrypoint beside modules: the general path)
            result, frame = self._invoke_operation(rid, op, args)
        else:
            lazy = self._by_name.get(name)  # type: ignore[union-attr]
            if lazy is None or lazy.contract is None:
                return None
            result, frame = self._invoke(rid, lazy.contract.invoke, args, None, channel.bulk is not None, True)
        if frame is None:
            if result.__class__ is not bytes or len(result) > self._max_value:
                # Big values beside the frame, or (too big to send) an error.
                frame = channel.reply_value(rid, result)
            elif threading.active_count() == 1 and channel.idle():
                return result
            else:
                frame = compact_ok_frame(rid, result)  # type: ignore[arg-type]
        frame = self._direct_reply(frame)
        return False if frame is None else (frame,)

    def _direct_frame(self, body: bytes) -> bytes | None:
        """One frame's body read by ``_serve_direct``: the reply to send,
        b"" for none, or None to go back to the general loop."""
        channel = self.channel
        event = channel.conn.receive_body(body)
        if event.__class__ is not Call or event.parent:  # type: ignore[union-attr]
            channel._dispatch(event)  # a cancel of a call already answered, a violation, ...
            return None if channel.failure is not None or not channel.idle() else b""
        lazy = self.table.get(event.entrypoint)  # type: ignore[union-attr]
        if lazy is not None and lazy.contract is not None and not channel.track_arrivals:
            # A typed entrypoint's call on a pipe (no descriptors either way,
            # nothing to track): ``execute`` without the steps that cannot apply.
            result, frame = self._invoke(event.id, lazy.contract.invoke, event.args,  # type: ignore[union-attr]
                                         None, channel.bulk is not None, True)
            if frame is None:
                frame = channel.reply_value(event.id, result)  # type: ignore[union-attr, arg-type]
        else:
            if channel.track_arrivals:
                self.peer.arrived(("c", event.id))  # type: ignore[union-attr]
            frame = self._run_top(event)  # type: ignore[arg-type]
        return self._direct_reply(frame)

    def _direct_reply(self, frame: bytes) -> bytes | None:
        """``frame`` (with what is pending around it) for the direct serve
        loop to send, or None: sent here, because the loop must stop (the
        call left other threads, queued frames or a failure behind)."""
        channel = self.channel
        if channel.pending_output or channel.pending_release:
            frame = channel.with_pending(frame)
        if channel.failure is not None or threading.active_count() != 1 or not channel.idle():
            if channel.failure is None:
                channel.reply(frame)
            return None
        return frame

    def _invoke_operation(self, rid: int, op: str, args: bytes) -> tuple[bytes | None, bytes | None]:
        """A module compartment's top-level operation in compact form, as
        ``_run_top`` runs it, without the steps a pipe rules out (no
        descriptors either way, no bulk values: ``objects`` encodes inline)."""
        peer = self.peer
        peer.arrived(("c", rid))
        try:
            return self._invoke(rid, self.objects.execute, peer, op, args, False)  # type: ignore[return-value]
        finally:
            peer.decoded(("c", rid))
            CALL_WARNINGS.finished(rid)

    def _invoke(self, rid: int, run: Callable[[Any, Any, Any], Any], a: Any, b: Any, c: Any,
                typed: bool) -> tuple[bytes | BulkPayload | None, bytes | None]:
        """``run(a, b, c)`` as call ``rid``, top-level on the serve thread,
        keeping the state cancellation, nested calls and output need: (its
        encoded result, None), or (None, the Err frame). Exceptions end as
        ``execute`` ends them."""
        channel = self.channel
        self.current = rid
        self.cancel_current = False
        stack = serving_stack()
        entry = (channel, rid)
        stack.append(entry)
        active = self.active
        active.append(rid)
        self.in_user_code = True
        try:
            return run(a, b, c), None
        except BaseException as exc:
            self.in_user_code = False
            _drop_outgoing_fds()  # (what its result had collected before it failed)
            return None, self._error_reply(channel.conn, rid, exc, typed=typed)
        finally:
            self.in_user_code = False
            active.pop()
            leave_stack(stack, entry)
            self.current = None

    @staticmethod
    def _error_reply(conn: Connection, rid: int, exc: BaseException, typed: bool) -> bytes:
        """The Err frame for what a call raised, or the exception again for
        what must end the process."""
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            if typed:
                raise exc  # a typed entrypoint's process ends with it (restart policy)
            # A boxed module's code (a package's CLI entry point ending with
            # sys.exit()): the caller's to handle, as unboxed; we serve on.
        elif type(exc) is GeneratorExit:
            raise exc
        # A library's own BaseException subclass (more_itertools'
        # AbortThread) too: the caller's, like any exception; uncaught here
        # it would end the serve loop and the instance.
        return conn.send_err(rid, describe_exception(exc))

    def execute(self, channel: Channel, call: Call, top: bool = False) -> bytes:
        """Run ``call`` in this thread; the reply frame. ``top``: a top-level
        call on the serve thread (cancellable)."""
        conn = channel.conn
        name = call.entrypoint
        # Only the serve thread's calls: a thread the compartment started
        # itself calls back on behalf of the call the serve thread runs.
        on_serve_thread = top or threading.get_ident() == self.serve_ident
        if on_serve_thread:
            self.active.append(call.id)
        try:
            contract = None
            if name[:1] == "@" and self.objects.handles(name):
                pass
            else:
                contract = self.table.get(name)
                if contract is None:
                    conn.violations += 1
                    return conn.send_err(call.id, describe_exception(EntrypointError(
                        f"{name!r} is not an entrypoint of compartment {self.config.compartment!r}")))
            if top:
                self.in_user_code = True
            try:
                if contract is not None:
                    got = channel.take_message_fds(("c", call.id))
                    refs.start_collecting_fds(self.peer.can_pass_fds)
                    with refs.receiving(got):
                        result = contract.invoke(call.args, channel.take_message_bulk(("c", call.id)),
                                                 channel.bulk is not None)
                else:
                    result = self.objects.execute(self.peer, name, call.args,
                                                  channel.take_message_fds(("c", call.id)))
            except BaseException:
                _drop_outgoing_fds()  # what its result had collected before it failed
                raise
            finally:
                if top:
                    self.in_user_code = False
            fds = refs.take_outgoing_fds()
            channel.set_reply_fds(fds)
            return channel.reply_value(call.id, result, len(fds))
        except BaseException as exc:
            return self._error_reply(conn, call.id, exc, typed=contract is not None)
        finally:
            if on_serve_thread:
                self.active.pop()

    def call_out(self, request: list[object], op: str = "@call", plain: bool = False) -> object:
        """Call one of main's callbacks (``objects.Callback``), or use a file
        object main passed (``objects.MainStream``), from any thread.
        ``plain``: ``[callback, args, {}]`` whose args are ``refs.plain``,
        sent without ``to_wire`` when the callback can go home as it is."""
        if op == "@call" and not self.config.may_call_main:
            raise EntrypointError(f"compartment {self.config.compartment!r} may not call back into "
                                  "main (its spec's may_call does not list \"main\")")
        channel = self.channel
        parent = serving(channel)
        concurrent = not parent
        if concurrent:
            # Another thread than the one serving main's call (a worker
            # thread of the module): main runs it on a thread of its own, so
            # it may wait for what main's caller does next.
            active = self.active
            parent = active[-1] if active else 0
        if not parent:
            raise EntrypointError("a callback into main can only be made while main is calling "
                                  f"into compartment {self.config.compartment!r}")
        target = request[0]
        if plain and target._pc_peer is self.peer and not target._pc_buffer:  # type: ignore[attr-defined]
            payload = refs.encode_wire([refs.yours_ext(target._pc_handle), *request[1:]])  # type: ignore[attr-defined]
            fds: list[int] = []
        else:
            payload = self.peer.encode(request)
            fds = refs.take_outgoing_fds()
        on_main = threading.current_thread() is threading.main_thread()
        if on_main:
            self.depth += 1
        try:
            reply = channel.request(op, payload, None, parent, concurrent, fds)
        finally:
            if on_main:
                self.depth -= 1
        try:
            got = channel.take_message_fds(("r", reply.id))
            if reply.__class__ is Err:
                close_fds(got)
                raise self.objects.rebuild(self.peer, reply.error)  # type: ignore[union-attr]
            value = self.peer.decode(reply.value, got)  # type: ignore[union-attr]
            # main pins an instance of its subclass that a callback returns;
            # watch_twins unpins it unless our code keeps it.
            self.objects.touched(value, pinned=True)
            return value
        finally:
            self.peer.decoded(("r", reply.id))

    # -- CallServer: what arrives from main -----------------------------------------

    def top_level(self, channel: Channel, call: Call) -> None:
        channel.deliver(call)

    def release(self, channel: Channel, handles: list[tuple[int, int]]) -> None:
        self.peer.release_later(handles)

    def arrived(self, channel: Channel, key: tuple[str, int]) -> None:
        self.peer.arrived(key)

    def decoded(self, channel: Channel, key: tuple[str, int]) -> None:
        self.peer.decoded(key)

    def cancel(self, channel: Channel, rid: int) -> None:
        if rid == self.current:
            self.cancel_current = True
            if threading.current_thread() is not threading.main_thread():
                signal.pthread_kill(threading.main_thread().ident, CANCEL_SIGNAL)  # type: ignore[arg-type]
            return
        if channel.withdraw(rid):
            channel.reply(channel.conn.send_err(rid, describe_exception(
                CallCancelled("cancelled by the caller before it started"))))

    def _around_edge_call(self, call: Callable[[], object]) -> object:
        """A call the compartment's code makes over an edge: while the serve
        thread is inside the edge's channel, a cancel of *our* call must not
        raise there (it would tear a frame in half); it is acted on when the
        edge call returns."""
        if threading.get_ident() != self.serve_ident:
            return call()
        self.depth += 1
        try:
            return call()
        finally:
            self.depth -= 1
            if self.cancel_signalled and not self.depth:
                self.cancel_signalled = False
                if not self.cancel_current:
                    self.channel.try_drain()
                if self.cancel_current and self.in_user_code:
                    raise CallCancelled("the caller timed out and cancelled this call")

    def _on_cancel_signal(self, signum: int, frame: object) -> None:
        if self.depth:
            self.cancel_signalled = True
        if not self.in_user_code or self.depth:
            return  # the serve loop, or the thread leading the channel, reads the Cancel
        # We interrupted user code, not channel code: it is safe to read what
        # has arrived (if no other thread is reading) and look for our Cancel.
        if not self.cancel_current:
            self.channel.try_drain()
        if self.cancel_current and self.in_user_code and not self.depth:
            raise CallCancelled("the caller timed out and cancelled this call")
