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
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any

import msgspec

from ..kernel import credentials, namespaces, process
from ..transport.streams import SocketTransport
from ..wire.config import InstanceConfig
from ..wire.control import (
    Exited, Forked, Shutdown, Spawn, Spawned, TemplateReady, control_decoder, encode_control,
)
from ..wire.protocol import MessageReader


_MAX_CONTROL = 16 * 1024 * 1024

# -- monitor side ---------------------------------------------------------------


def control_reader() -> MessageReader:
    """The monitor's reader of what the zygote sends."""
    return MessageReader(control_decoder, _MAX_CONTROL)


# -- zygote side ----------------------------------------------------------------


def main() -> None:
    control_fd = int(sys.argv[1])
    # Nothing of main's but the control socket (and stdio): a descriptor
    # another of main's threads made inheritable while main was starting us
    # may have come along.
    os.closerange(3, control_fd)
    os.closerange(control_fd + 1, 1 << 20)
    bound = sys.argv[2:3] == ["bound"]
    if bound:
        process.set_parent_death_signal(signal.SIGKILL)
    control = socket.socket(fileno=control_fd)
    # Who started us is the peer of the control socket: nothing about main
    # is on our command line, which every instance can read as its own.
    main_pid = struct.unpack("3i", control.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    if os.getppid() != main_pid:
        os._exit(1)  # main died before we armed PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    isolated = _become_init(control)
    # What an execve could give back, gone for every instance at once (each
    # checks, and finds nothing left to drop): the zygote never executes a
    # program, and keeps its own effective capabilities to lock instances down.
    credentials.drop_bounding_set()
    # (No libseccomp here: instances load filters main compiled, with one
    # system call.)
    zygote = Zygote(control, isolated)
    # Here, not at the top: main imports this module for its messages only.
    from ..compartment import serve as _instance
    from ..compartment import template as _template  # noqa: F401 - forked into templates

    _instance.preload()
    # Everything imported so far is shared by every instance: keep the
    # collector from touching (and so copying) those pages after each fork.
    # (No collection first: imports leave next to no cyclic garbage, and a
    # full pass over every object is ~3-5 ms before the zygote is ready.)
    gc.freeze()
    zygote.run()


def _become_init(control: socket.socket) -> bool:
    """Continue as pid 1 of a new pid namespace (inside a new user namespace
    as non-root), so that nothing can outlive the zygote: when the init of a
    pid namespace dies the kernel kills every process in it, whatever they
    did to their parent-death signal, and whatever they forked.

    The process main started stays outside, waits for the new one and
    exits with its status; the new one dies with it (PDEATHSIG, checked
    through a pipe the outer one holds). Returns False where the kernel
    refuses (no user namespaces for this uid): then the zygote is a child
    subreaper, and orphans of instances are its children to kill."""
    try:
        namespaces.enter_pid_namespace()
    except OSError:
        process.set_child_subreaper()
        return False
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid:
        os.close(alive_r)
        # Only the new one speaks to main: its end (when it has reaped every
        # instance) is main's end of file, not this process's exit after it.
        control.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        os._exit(os.waitstatus_to_exitcode(status) & 0xFF if os.WIFEXITED(status) else 1)
    os.close(alive_w)
    process.set_parent_death_signal(signal.SIGKILL)
    if select.select([alive_r], [], [], 0)[0]:  # the outer one is already gone
        os._exit(1)
    os.close(alive_r)
    return True


#: Spawns waiting for a template that is still starting; beyond, they are
#: started afresh.
MAX_QUEUED_SPAWNS = 64
#: Spawns a template may leave unanswered (``_TemplateHandle.pending``).
MAX_UNANSWERED = 1024
#: Compartment configurations whose template failed to start (their
#: instances start afresh, and report why); bounded.
MAX_FAILED_TEMPLATES = 64


class _TemplateHandle:
    """The zygote's view of one compartment's template."""

    def __init__(self, compartment: str, pid: int, sock: socket.socket, key: bytes):
        self.compartment = compartment
        self.pid = pid
        self.sock = sock
        self.transport = SocketTransport(sock)
        self.reader = MessageReader(control_decoder, _MAX_CONTROL)
        self.key = key
        self.ready = False
        self.queued: list[tuple[Spawn, list[int]]] = []
        #: Requests passed on and not yet answered: the only ones its
        #: ``Forked`` may answer (it has run the compartment's code).
        self.pending: set[int] = set()
        #: The instances it forked (its ``Exited`` may name only these).
        self.children: set[int] = set()


def _template_key(config: InstanceConfig) -> bytes:
    """What instances of one template have in common: all of their config
    but their index."""
    return msgspec.msgpack.encode(msgspec.structs.replace(config, index=0))


class Zygote:
    def __init__(self, control: socket.socket, isolated: bool = False):
        self.control = control
        #: pid 1 of its own pid namespace (else a subreaper).
        self.isolated = isolated
        self.transport = SocketTransport(control)
        self.reader = control_reader()
        #: Instances, ours or our templates' (whose ends they report).
        self.children: set[int] = set()
        #: Templates by compartment, and by pid.
        self.templates: dict[str, _TemplateHandle] = {}
        self.template_pids: dict[int, _TemplateHandle] = {}
        self.failed_templates: set[bytes] = set()
        self.selector: selectors.BaseSelector | None = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.buf = bytearray(65536)

    def run(self) -> None:
        sel = self.selector = selectors.DefaultSelector()
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
                if isinstance(key.data, _TemplateHandle):
                    self.from_template(key.data)
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
        """Fork an instance, from its compartment's template where its plan
        has one (``pycompart.compartment.template``: not for an edge's
        instance, nor where the zygote has no pid namespace to keep a
        template's orphans in). ``fds``: its channel's two ends, then (when
        its output is relayed) the write ends of its stdout and stderr
        pipes, then (``msg.bulk``) its bulk memory file, then
        (``msg.control``) its edge control socket."""
        if msg.config.lockdown.template_bpf and self.isolated and not msg.control \
                and msg.config.caller == "main" and len(fds) == 2 + 2 * (msg.config.output in (
                    "relay", "prefixed")) + msg.bulk:
            key = _template_key(msg.config)
            if key not in self.failed_templates:
                template = self.templates.get(msg.config.compartment)
                if template is not None and template.key != key:
                    self.retire(template)  # the config changed (main's sys.path, shared data, ...)
                    template = None
                if template is None:
                    template = self.start_template(msg.config, key)
                if template is not None:
                    if template.ready:
                        self.pass_on(template, msg, fds)
                        return
                    if len(template.queued) < MAX_QUEUED_SPAWNS:
                        template.queued.append((msg, fds))
                        return
        self.fork(msg, fds)

    def fork(self, msg: Spawn, fds: list[int]) -> None:
        """Fork an instance from the zygote itself (it starts afresh)."""
        channel_fds = list(fds)
        control = channel_fds.pop() if msg.control and channel_fds else None
        bulk = channel_fds.pop() if msg.bulk and channel_fds else None
        if len(channel_fds) not in (2, 4):
            for fd in fds:
                os.close(fd)
            self.send(Spawned(msg.request, 0, f"expected 2 or 4 descriptors, got {len(fds)}"))
            return
        read_fd, write_fd = fds[:2]
        output = (fds[2], fds[3]) if len(channel_fds) == 4 else None
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                os.close(self.wake_r)
                os.close(self.wake_w)
                self.control.close()
                from ..compartment import serve as _instance  # (imported by main())

                _instance.run(msg.config, read_fd, write_fd, output, control, bulk)
            finally:
                os._exit(1)
        # The child's copies must be the only ones: its death is the caller's EOF.
        for fd in fds:
            os.close(fd)
        self.children.add(pid)
        pidfd = process.pidfd_open(pid)
        try:
            self.send(Spawned(msg.request, pid), [pidfd])
        finally:
            os.close(pidfd)

    # -- templates ----------------------------------------------------------------

    def start_template(self, config: InstanceConfig, key: bytes) -> _TemplateHandle | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                os.close(self.wake_r)
                os.close(self.wake_w)
                self.control.close()
                ours.close()
                for other in self.templates.values():
                    other.sock.close()
                from ..compartment import template as _template

                _template.run(config, theirs.detach())
            finally:
                os._exit(1)
        theirs.close()
        ours.setblocking(False)
        handle = _TemplateHandle(config.compartment, pid, ours, key)
        self.templates[config.compartment] = handle
        self.template_pids[pid] = handle
        if self.selector is not None:
            self.selector.register(ours, selectors.EVENT_READ, handle)
        return handle

    def pass_on(self, template: _TemplateHandle, msg: Spawn, fds: list[int]) -> None:
        try:
            template.transport.send(encode_control(msg, len(fds)), fds, time.monotonic() + 5.0)
        except (OSError, TimeoutError):
            self.forget_template(template)
            self.fork(msg, fds)
            return
        template.pending.add(msg.request)
        for fd in fds:
            os.close(fd)
        if len(template.pending) > MAX_UNANSWERED:
            self.retire(template, "its template left more than "  # (the next go afresh)
                        f"{MAX_UNANSWERED} starts unanswered (it was retired)")

    def from_template(self, template: _TemplateHandle) -> None:
        try:
            n, fds = template.transport.read_into(memoryview(self.buf))
        except BlockingIOError:
            return
        except OSError:
            n, fds = 0, []
        if n == 0:
            self.forget_template(template)
            return
        template.reader.feed(bytes(self.buf[:n]), fds)
        try:
            messages = template.reader.messages()
        except ValueError:
            # Malformed: it has run the compartment's code. Retired (it ends
            # with its instances), not a reason for the zygote, and with it
            # every instance of every compartment, to die.
            self.forget_template(template)
            return
        for msg, fds in messages:
            if isinstance(msg, TemplateReady):
                template.ready = True
                queued, template.queued = template.queued, []
                for spawn, spawn_fds in queued:
                    self.pass_on(template, spawn, spawn_fds)
            elif isinstance(msg, Forked) and msg.request not in template.pending:
                pass  # not a start it was given: another's, or none
            elif isinstance(msg, Forked) and msg.pid <= 0:
                template.pending.discard(msg.request)
                # (A template's words: bounded and printable, and only ever an error.)
                why = "".join(c if c.isprintable() else "?" for c in msg.error[:300])
                self.send(Spawned(msg.request, 0, f"its template could not fork it: {why}"))
            elif isinstance(msg, Forked):
                template.pending.discard(msg.request)
                self.take_forked(template, msg.request, msg.pid)
            elif isinstance(msg, Exited) and msg.pid in template.children:
                template.children.discard(msg.pid)
                self.children.discard(msg.pid)
                self.send(msg)
            for fd in fds:
                os.close(fd)

    def take_forked(self, template: _TemplateHandle, request: int, pid: int) -> None:
        """A template's word that ``pid`` is the instance it forked for
        ``request``. Main will signal that process as the instance, so the
        zygote checks it and opens the pidfd itself: a template has run its
        compartment's code, and could name the zygote or another
        compartment's instance. One that does is retired."""
        if pid <= 1 or pid in self.children or pid in self.template_pids:
            self._refuse_forked(template, request)
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:  # (ProcessLookupError: ended already, and reaped by the template)
            self.send(Spawned(request, 0, "the instance ended before it was known"))
            return
        try:
            # (Before Linux 6.13 the kernel cannot say whose child it is:
            # the checks above are all there is.)
            parent = process.pidfd_parent(pidfd)
            if parent is not None and parent != template.pid:
                self._refuse_forked(template, request)
                return
            self.children.add(pid)
            template.children.add(pid)
            self.send(Spawned(request, pid), [pidfd])
        except OSError:
            self.send(Spawned(request, 0, "the instance ended before it was known"))
        finally:
            os.close(pidfd)

    def _refuse_forked(self, template: _TemplateHandle, request: int) -> None:
        why = "its template named a process that is not its instance (the template was retired)"
        self.send(Spawned(request, 0, why))
        self.retire(template, why)

    def retire(self, template: _TemplateHandle,
               why: str = "its template was retired before it reported the instance") -> None:
        """No more instances from ``template``: it exits once those it
        forked have ended. The starts it was given and did not answer fail
        now, saying ``why`` (its socket closed, no answer can come)."""
        if self.templates.get(template.compartment) is template:
            del self.templates[template.compartment]
        if self.selector is not None:
            try:
                self.selector.unregister(template.sock)
            except (KeyError, ValueError):
                pass
        template.sock.close()
        for request in sorted(template.pending):
            self.send(Spawned(request, 0, why))
        template.pending.clear()
        for msg, fds in template.queued:
            self.fork(msg, fds)
        template.queued = []

    def forget_template(self, template: _TemplateHandle) -> None:
        """Its socket closed (it died): what waited for it starts afresh, and
        so does the rest of its compartment's instances if it never came up."""
        if not template.ready and len(self.failed_templates) < MAX_FAILED_TEMPLATES:
            self.failed_templates.add(template.key)
        if template.sock.fileno() >= 0:
            self.retire(template)

    def reap(self, timeout: float = 5.0) -> None:
        """Collect every child that ended. An instance's process group is
        killed before it is reaped: until then its pid, and so the group's
        id, cannot be reused, so the signal reaches exactly its processes
        (what it forked), never a stranger that took the number. Orphans
        of instances are reaped here too (we are their init or subreaper)."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                self.children.clear()
                return
            if info is None:
                return
            pid = info.si_pid
            template = self.template_pids.pop(pid, None)
            if pid in self.children or template is not None:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if template is not None and template.sock.fileno() >= 0:
                self.forget_template(template)
            try:
                _, status, usage = os.wait4(pid, 0)
            except ChildProcessError:
                continue
            if pid in self.children:
                self.children.discard(pid)
                self.send(Exited(pid, status, round((usage.ru_utime + usage.ru_stime) * 1000, 3),
                                 usage.ru_maxrss), timeout=timeout)

    def shutdown(self, grace: float) -> None:
        """End every child (politely if ``grace``), reap them all, exit."""
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap(timeout=0.2)
            for template in list(self.templates.values()):
                self.from_template(template)  # (the ends of its instances)
            if self.children:
                _wait_for_any(self.children, deadline)
        for pid in [*self.children, *self.template_pids]:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not self.isolated:
            # A subreaper's orphans do not die with it: end them first.
            for pid in _children_of(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid in self.children:
                self.children.discard(pid)
                self.send(Exited(pid, status), timeout=0.2)
        # Main's end of file now, not after this process's memory is torn
        # down: every instance is reaped, nothing more will be said.
        self.control.close()
        os._exit(0)


def _wait_for_any(pids: set[int], deadline: float) -> None:
    """Sleep until one of ``pids`` ends (their pidfds become readable), 10 ms
    at most, not past ``deadline``: an app's stop waits for its instances'
    exits, not for a polling interval."""
    wait_ms = max(0, min(10, int((deadline - time.monotonic()) * 1000) + 1))
    fds = []
    try:
        poller = select.poll()
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:  # already reaped, or no pidfds here
                continue
            fds.append(fd)
            poller.register(fd, select.POLLIN)
        if fds:
            poller.poll(wait_ms)
        else:
            time.sleep(0.002)
    finally:
        for fd in fds:
            os.close(fd)


def _children_of(parent: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                out.append(int(name))
    return out
