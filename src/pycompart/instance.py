"""Inside an instance: prepare the process, lock it down, import, serve.

This runs in a child forked from the zygote. The order matters and is the
design's: process hygiene first, then the privilege lock-down, and only then
any import of the compartment's own code, so that not even import-time code of
an untrusted module runs with more than the compartment's privileges.

Calls are executed one at a time on the main thread, which keeps the null call
cheap (no thread hand-off) and makes cancellation possible: the caller sends a
``Cancel`` frame and the monitor a ``CANCEL_SIGNAL``; the handler reads the
frame and raises ``CallCancelled`` inside the running entrypoint. Code that
does not yield (a C loop, a blocked signal) is killed by the monitor after the
grace period instead; a process can always be stopped, a thread cannot.
"""

from __future__ import annotations

import collections
import importlib
import os
import runpy
import signal
import sys
import types
from typing import NoReturn

import msgspec

from .errors import CallCancelled, EntrypointError
from .gate import Contract, describe_exception
from .kernel import process
from .lockdown import Lockdown
from . import lockdown as _lockdown
from .protocol import NEED_DATA, Call, Cancel, Connection, Violation

CANCEL_SIGNAL = signal.SIGRTMIN + 1

EXIT_START_FAILED = 70
EXIT_PROTOCOL = 71

_main_source: bytes | None = None

#: The configuration of the instance this process is, or None in ``main``.
CURRENT: InstanceConfig | None = None


class InstanceConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Everything an instance needs, sent by the monitor through the zygote.
    Holds names and paths, never code or objects."""

    compartment: str
    index: int
    sys_path: list[str]
    cwd: str
    main_path: str | None
    main_module: str | None
    modules: list[str]
    entrypoints: list[str]
    max_frame: int
    environment: dict[str, str]
    lockdown: Lockdown = msgspec.field(default_factory=Lockdown)


def run(config: InstanceConfig, read_fd: int, write_fd: int) -> NoReturn:
    """Become an instance, serving calls read from ``read_fd`` with replies
    written to ``write_fd``. Never returns."""
    global CURRENT
    CURRENT = config
    code = 0
    try:
        try:
            _prepare_process({read_fd, write_fd})
            apply_privileges(config)
            table = _load(config)
        except BaseException as exc:  # report any start failure, then die
            try:
                os.set_blocking(write_fd, True)
                os.write(write_fd, Connection.send_abort(describe_exception(exc)))
            except OSError:
                pass
            code = EXIT_START_FAILED
        else:
            Server(config, read_fd, write_fd, table).serve()
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


def _prepare_process(keep: set[int]) -> None:
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
    # Keep stdout/stderr (so prints and tracebacks are visible) and the
    # channel; everything else inherited is closed. stdin becomes /dev/null.
    process.close_fds_except(keep | {1, 2})
    null = os.open(os.devnull, os.O_RDONLY)
    if null != 0:
        os.dup2(null, 0)
        os.close(null)


def apply_privileges(config: InstanceConfig) -> None:
    """The lock-down step (see ``pycompart.lockdown``): after it, this
    process has only what the compartment's spec grants."""
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
        _reroute_packages(reach)
    _lockdown.apply(lock)


def _reroute_packages(reach: dict[str, str]) -> None:
    """Packages imported before the drop (by the zygote: ``encodings``,
    ``json``, ...) find their submodules through ``__path__``; point those
    at the pre-opened descriptors too."""
    prefixes = sorted(reach, key=len, reverse=True)
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if not isinstance(paths, list):
            continue
        for i, entry in enumerate(paths):
            for prefix in prefixes:
                if entry == prefix or entry.startswith(prefix + os.sep):
                    paths[i] = reach[prefix] + entry[len(prefix):]
                    break
    sys.path_importer_cache.clear()


def _load(config: InstanceConfig) -> dict[str, _LazyContract]:
    sys.path[:] = config.sys_path
    if any(key.startswith("__main__:") for key in config.entrypoints):
        _load_main(config)
    for name in config.modules:
        importlib.import_module(name)
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


class _LazyContract:
    """Builds the entrypoint's Contract on its first call. Main has already
    checked the annotations at start; building every codec up front would
    only slow the instance's start."""

    __slots__ = ("fn", "key", "contract")

    def __init__(self, fn: object, key: str):
        self.fn = fn
        self.key = key
        self.contract: Contract | None = None

    def invoke(self, raw_args: object) -> bytes:
        if self.contract is None:
            self.contract = Contract(self.fn, self.key)  # type: ignore[arg-type]
        return self.contract.invoke(raw_args)  # type: ignore[arg-type]


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


class Server:
    """The serve loop of an instance: one call at a time, cancellable."""

    def __init__(self, config: InstanceConfig, read_fd: int, write_fd: int, table: dict[str, _LazyContract]):
        self.config = config
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.table = table
        self.conn = Connection(config.max_frame)
        self.queue: collections.deque[Call] = collections.deque()
        self.current: int | None = None
        self.cancel_current = False
        self.in_user_code = False
        self.buf = bytearray(64 * 1024)
        self.view = memoryview(self.buf)

    def serve(self) -> None:
        os.set_blocking(self.read_fd, True)
        os.set_blocking(self.write_fd, True)
        signal.signal(CANCEL_SIGNAL, self._on_cancel_signal)
        self._reply(Connection.send_hello(os.getpid(), self.config.compartment, sorted(self.table)))
        conn = self.conn
        frames = conn.frames
        while True:
            if self.queue:
                self._execute(self.queue.popleft())
                continue
            if frames.buffered:
                event = conn.next_event()
                if event is not NEED_DATA:
                    self._handle(event)
                    continue
            view = frames.want_buffer() or self.view
            n = os.readv(self.read_fd, (view,))
            if n == 0:
                return  # the caller closed the channel: orderly shutdown
            if view is not self.view:
                frames.body_written(n)
                continue
            event = conn.parse_one(view[:n])
            if event is not NEED_DATA:
                self._handle(event)

    def _handle(self, event: object) -> None:
        cls = event.__class__
        if cls is Call:
            self.queue.append(event)  # type: ignore[arg-type]
        elif cls is Cancel:
            rid = event.id  # type: ignore[attr-defined]
            if rid == self.current:
                self.cancel_current = True
                return
            for queued in self.queue:
                if queued.id == rid:
                    self.queue.remove(queued)
                    self._reply(self.conn.send_err(rid, describe_exception(
                        CallCancelled("cancelled by the caller before it started"))))
                    break
        elif cls is Violation and event.fatal:  # type: ignore[attr-defined]
            print(f"pycompart: instance of {self.config.compartment!r}: protocol violation "
                  f"from caller: {event.reason}", file=sys.stderr)  # type: ignore[attr-defined]
            os._exit(EXIT_PROTOCOL)
        for fd in self.conn.take_fds():
            os.close(fd)
        # Anything else from a caller (a Hello, a reply to a call never made)
        # is ignored; the connection counted it.

    def _execute(self, call: Call) -> None:
        contract = self.table.get(call.entrypoint)
        if contract is None:
            self.conn.violations += 1
            self._reply(self.conn.send_err(call.id, describe_exception(EntrypointError(
                f"{call.entrypoint!r} is not an entrypoint of compartment "
                f"{self.config.compartment!r}"))))
            return
        self.current = call.id
        self.cancel_current = False
        try:
            self.in_user_code = True
            try:
                result = contract.invoke(call.args)
            finally:
                self.in_user_code = False
            reply = self.conn.send_ok(call.id, result)
        except CallCancelled as exc:
            reply = self.conn.send_err(call.id, describe_exception(exc))
        except Exception as exc:
            reply = self.conn.send_err(call.id, describe_exception(exc))
        finally:
            self.current = None
        self._reply(reply)

    def _reply(self, frame: bytes) -> None:
        try:
            n = os.write(self.write_fd, frame)
            if n < len(frame):
                view = memoryview(frame)[n:]
                while view:
                    view = view[os.write(self.write_fd, view):]
        except BrokenPipeError:
            os._exit(0)  # the caller is gone; nothing left to serve

    def _on_cancel_signal(self, signum: int, frame: object) -> None:
        if not self.in_user_code:
            return  # the serve loop will read the Cancel frame itself
        # We interrupted user code, so the loop is not inside the decoder:
        # it is safe to read what has arrived and look for our Cancel.
        os.set_blocking(self.read_fd, False)
        try:
            while True:
                view = self.conn.frames.want_buffer() or self.view
                n = os.readv(self.read_fd, (view,))
                if n == 0:
                    break
                if view is self.view:
                    self.conn.receive_data(view[:n])
                else:
                    self.conn.frames.body_written(n)
                while (event := self.conn.next_event()) is not NEED_DATA:
                    self._handle(event)
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            os.set_blocking(self.read_fd, True)
        if self.cancel_current and self.in_user_code:
            raise CallCancelled("the caller timed out and cancelled this call")
