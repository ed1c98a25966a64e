"""The zygote: a clean interpreter that forks every instance.

Started once per App as ``python -I -c "...zygote.main()"`` with an almost
empty environment, it imports only pycompart's runtime, so what it forks holds
no user state: instances are never forked from the user's process, which would
hand them its memory, secrets included.

It talks to the monitor over one control socket (the same framing as calls):

* ``Spawn`` (+ the instance's ends of its channel pipes) -> fork;
  ``Spawned`` (+ a pidfd of the child) back;
* when a child exits the zygote reaps it and sends ``Exited`` with the raw
  wait status (only the parent can collect it);
* ``Shutdown``, or the control socket closing, ends every child and then the
  zygote. If the monitor's thread dies, PDEATHSIG kills the zygote, and each
  instance's own PDEATHSIG kills it in turn: nothing outlives ``main``.
"""

from __future__ import annotations

import gc
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any, Union

import msgspec

from ..compartment import serve as _instance
from ..kernel import process
from ..kernel.host import runtime_problems
from ..transport.streams import SocketTransport
from ..wire.config import InstanceConfig
from ..wire.protocol import FrameDecoder, NeedData, Violation, encode_frame


class Spawn(msgspec.Struct, array_like=True, tag=10):
    request: int
    config: InstanceConfig


class Spawned(msgspec.Struct, array_like=True, tag=11):
    request: int
    pid: int
    error: str = ""


class Exited(msgspec.Struct, array_like=True, tag=12):
    pid: int
    status: int


class Shutdown(msgspec.Struct, array_like=True, tag=13):
    grace: float


ControlMessage = Union[Spawn, Spawned, Exited, Shutdown]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ControlMessage)
_MAX_CONTROL = 16 * 1024 * 1024

#: Environment the zygote keeps from main's; everything else (API keys in
#: the environment, say) stays behind.
ZYGOTE_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


# -- monitor side ---------------------------------------------------------------


def launch(python: str | None = None) -> tuple[Any, socket.socket]:
    """Start a zygote from ``python`` (default: this interpreter). Must be
    called from the thread that will outlive it: PDEATHSIG is bound to the
    parent *thread*."""
    import subprocess  # here, not at the top: the zygote itself never needs it

    python = python or sys.executable
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {k: os.environ[k] for k in ZYGOTE_ENV_KEEP if k in os.environ}
    # -I: no environment variables, no user site, no script directory. Only
    # the directories holding pycompart and its dependencies are added, so
    # a source checkout or PYTHONPATH install works without importing
    # anything else of main's path.
    runtime = runtime_path()
    code = f"import sys; sys.path[:0] = {runtime!r}; import pycompart.supervisor.zygote as z; z.main()"
    try:
        proc = subprocess.Popen(
            [python, "-I", "-c", code, str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        ours.close()
        problems = runtime_problems(python, runtime)
        raise OSError(exc.errno, "; ".join(problems) if problems else f"{python}: {exc}") from None
    finally:
        theirs.close()
    return proc, ours


def runtime_path() -> list[str]:
    """The directories holding pycompart and its dependencies: the zygote's
    whole import path."""
    import importlib.util

    dirs: list[str] = []
    for name in ("pycompart", "msgspec", "pyseccomp"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        origin = os.path.dirname(spec.origin)
        parent = os.path.dirname(origin) if spec.submodule_search_locations else origin
        if parent not in dirs:
            dirs.append(parent)
    return dirs


def encode_control(msg: object, nfds: int = 0) -> bytes:
    return encode_frame(_encoder.encode(msg), nfds)


class ControlReader:
    """Sans-IO reader of control frames for the monitor."""

    def __init__(self) -> None:
        self.frames = FrameDecoder(_MAX_CONTROL)

    def feed(self, data: bytes, fds: list[int]) -> None:
        self.frames.receive_data(data, fds)

    def messages(self) -> list[tuple[object, list[int]]]:
        out: list[tuple[object, list[int]]] = []
        while True:
            frame = self.frames.next_frame()
            if isinstance(frame, NeedData):
                return out
            if isinstance(frame, Violation):
                raise RuntimeError(f"zygote control stream broken: {frame.reason}")
            body, fds = frame
            out.append((_decoder.decode(body), fds))


# -- zygote side ----------------------------------------------------------------


def main() -> None:
    control_fd, expected_parent = int(sys.argv[1]), int(sys.argv[2])
    process.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(1)  # main died before we armed PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:  # load libseccomp once here rather than in every instance
        import pyseccomp  # noqa: F401
    except (ImportError, OSError):
        pass
    control = socket.socket(fileno=control_fd)
    zygote = Zygote(control)
    # Everything imported so far is shared by every instance: keep the
    # collector from touching (and so copying) those pages after each fork.
    gc.collect()
    gc.freeze()
    zygote.run()


class Zygote:
    def __init__(self, control: socket.socket):
        self.control = control
        self.transport = SocketTransport(control)
        self.reader = ControlReader()
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.buf = bytearray(65536)

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.control, selectors.EVENT_READ, "control")
        sel.register(self.wake_r, selectors.EVENT_READ, "signal")
        while True:
            for key, _ in sel.select():
                if key.data == "signal":
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                    self.reap()
                    continue
                try:
                    n, fds = self.transport.read_into(memoryview(self.buf))
                except BlockingIOError:
                    continue
                if n == 0:
                    self.shutdown(0.0)
                self.reader.feed(bytes(self.buf[:n]), fds)
                for msg, fds in self.reader.messages():
                    if isinstance(msg, Spawn):
                        self.spawn(msg, fds)
                    elif isinstance(msg, Shutdown):
                        self.shutdown(msg.grace)
                    else:
                        for fd in fds:
                            os.close(fd)
            self.reap()

    def send(self, msg: object, fds: list[int] | None = None, timeout: float = 5.0) -> None:
        """Best effort: if the monitor is gone, the next read sees EOF and
        shuts everything down."""
        fds = fds or []
        try:
            self.transport.send(encode_control(msg, len(fds)), fds, time.monotonic() + timeout)
        except (OSError, TimeoutError):
            pass

    def spawn(self, msg: Spawn, fds: list[int]) -> None:
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            self.send(Spawned(msg.request, 0, f"expected 2 channel descriptors, got {len(fds)}"))
            return
        read_fd, write_fd = fds
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                os.close(self.wake_r)
                os.close(self.wake_w)
                self.control.close()
                _instance.run(msg.config, read_fd, write_fd)
            finally:
                os._exit(1)
        # The child's copies must be the only ones: its death is the caller's EOF.
        os.close(read_fd)
        os.close(write_fd)
        self.children.add(pid)
        pidfd = process.pidfd_open(pid)
        try:
            self.send(Spawned(msg.request, pid), [pidfd])
        finally:
            os.close(pidfd)

    def reap(self, timeout: float = 5.0) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send(Exited(pid, status), timeout=timeout)

    def shutdown(self, grace: float) -> None:
        """End every child (politely if ``grace``), reap them all, exit."""
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap(timeout=0.2)
            time.sleep(0.002)
        for pid in list(self.children):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.discard(pid)
            self.send(Exited(pid, status), timeout=0.2)
        os._exit(0)
