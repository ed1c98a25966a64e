"""A compartment's template: the process its on-demand instances fork from.

An instance started afresh is forked from the zygote, then prepares its
process, locks itself down and imports its compartment's modules: most of
a fresh start's ~10 ms, paid by every per-call instance. A template pays it
once. The zygote forks it for the first instance of an on-demand
compartment (``instances = "per-call"`` or ``"per-connection"``) whose
lock-down allows one (``policy.resolution.template_obstacle``); it

1. prepares its process as an instance does (``serve._prepare_process``);
2. locks itself down with the compartment's restrictions, less two:
   forking (its seccomp filter allows ``clone`` with exactly fork's flags,
   and its instances' own restrictions) and reading /proc beyond its own
   entries, which name the template's pid, not an instance's
   (``lockdown.apply(template=True)``);
3. imports the compartment's modules and builds its entrypoints' codecs;
4. forks an instance for each ``Spawn`` the zygote passes on, reports it
   (``Forked``) and, as its parent, its end (``Exited``).

Each instance then adds what takes those two away, before it reads its
first call (``lockdown.restrict_instance``): a Landlock domain of its own,
nested in the template's (it reads only what the compartment may, its own
/proc entries included, and cannot signal, or reach the abstract sockets of,
the template or another instance), and a seccomp filter without forking. It
ends with exactly its compartment's restrictions.

What instances of one template share, which is why not every compartment
gets one (``template = false`` in the spec turns it off):

* what the compartment's modules did when imported: a value computed at
  import (a key, a random token) is the same in every instance, as in a
  pre-forking server. ``random`` is reseeded by the fork (CPython's at-fork
  hook); ``os.urandom`` and ``secrets`` ask the kernel each time;
* the template's network and IPC namespaces (no instance can make a
  socket there, or use System V or POSIX IPC, or the template is not used),
  its user namespace as non-root (``processes`` counts them together),
  its process group and its uid.

The template never runs a call and never reads anything but the zygote's
messages. If it cannot start (an import fails, or leaves a thread running,
which a fork would not take along), it exits, and the zygote starts the
instances afresh: they report why, or run as they would unboxed.
"""

from __future__ import annotations

import gc
import os
import select
import selectors
import signal
import socket
import time
from typing import NoReturn

from ..kernel import process
from ..transport.streams import SocketTransport
from ..wire.config import EXIT_START_FAILED, InstanceConfig
from ..wire.control import Exited, Forked, Spawn, TemplateReady, control_decoder, encode_control
from ..wire.contract import Contract
from ..wire.protocol import MessageReader
from . import lockdown as _lockdown
from . import serve as _serve

#: The biggest control message a template reads (a ``Spawn``: a config).
MAX_CONTROL = 16 * 1024 * 1024
#: Seconds without a ``Spawn`` after which the next instance is forked
#: ahead: a fork (and the child's lock-down) takes a CPU for a millisecond
#: or more, not to be taken from the instance just handed over as it
#: starts. Unless ``Spawn``s come closer than ``BUSY_WITHIN`` apart: then
#: the next is forked at once, to be ready for the one after.
FORK_AHEAD_AFTER = 0.001
BUSY_WITHIN = 0.01
#: After a child forked ahead could not be (its compartment's ``processes``
#: reached, say) or died unused, the next try waits twice as long as the
#: last, up to this: not a fork a millisecond, a CPU spent on failing.
FORK_AHEAD_RETRY_MAX = 0.25
#: How long a start at its compartment's ``processes`` limit waits for a
#: place before it fails: the instance before it (a per-call one, retired
#: as the next call comes) counts until it has ended and been reaped.
FORK_RETRY_FOR = 0.1


def run(config: InstanceConfig, control_fd: int) -> NoReturn:
    """Become the template of ``config``'s compartment, taking ``Spawn``
    messages from the zygote on ``control_fd``. Never returns."""
    from .. import compartment as _package

    _package.CURRENT = config
    try:
        # (fds 1 and 2: /dev/null until an instance puts its own there.)
        _serve._prepare_process({control_fd}, config.output, None)
        _serve.apply_privileges(config, template=True)
        table = _serve._load(config)
        if len(os.listdir("/proc/self/task")) != 1:
            # Its import started threads (Python's or a library's own): a
            # fork would leave them behind (and whatever locks they hold),
            # so its instances would not be what a fresh start makes; nor
            # may they spin here unwatched.
            os._exit(EXIT_START_FAILED)
        for lazy in table.values():
            try:
                lazy.contract = Contract(lazy.fn, lazy.key)  # type: ignore[arg-type]
            except Exception:
                pass  # the call says why
        _serve.rehearse(config, table)  # type: ignore[arg-type]
        # What every instance shares, not copied by the collector's visits.
        gc.collect()
        gc.freeze()
        template = _Template(config, control_fd, table)
    except BaseException:
        os._exit(EXIT_START_FAILED)
    try:
        template.run()
    finally:
        os._exit(0)


class _Template:
    def __init__(self, config: InstanceConfig, control_fd: int, table: dict[str, object]):
        self.config = config
        self.table = table
        self.sock = socket.socket(fileno=control_fd)
        self.transport = SocketTransport(self.sock)
        self.reader = MessageReader(control_decoder, MAX_CONTROL)
        self.children: set[int] = set()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector = selectors.DefaultSelector()
        self.buf = bytearray(65536)
        #: The child forked ahead (``fork_ahead``): its pid, our end of its
        #: socket, its pidfd.
        self.waiting: tuple[int, socket.socket, int] | None = None
        #: When the last ``Spawn`` came, and whether it came within
        #: ``BUSY_WITHIN`` of the one before.
        self.last_spawn = 0.0
        self.busy = False
        #: Children forked ahead in a row that could not be, or died unused,
        #: and when to fork the next (``_schedule_ahead``).
        self.ahead_failures = 0
        self.ahead_at = 0.0

    def send(self, msg: object) -> None:
        try:
            self.transport.send(encode_control(msg), (), time.monotonic() + 5.0)
        except (OSError, TimeoutError):
            os._exit(1)  # the zygote is gone: so is everything

    def run(self) -> None:
        self.selector.register(self.sock, selectors.EVENT_READ, "control")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "signal")
        self.send(TemplateReady())
        self.fork_ahead()
        while True:
            events = self.selector.select(self._ahead_timeout())
            for key, _ in events:
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
                    self.retire()
                self.reader.feed(bytes(self.buf[:n]), fds)
                for msg, fds in self.reader.messages():
                    if isinstance(msg, Spawn) and msg.config.compartment == self.config.compartment \
                            and not msg.control:
                        self.fork(msg, fds)
                    else:
                        for fd in fds:
                            os.close(fd)
            self.reap()
            if self.waiting is None and time.monotonic() >= self.ahead_at:
                self.fork_ahead()

    def fork(self, msg: Spawn, fds: list[int]) -> None:
        """An instance for ``msg``: the child forked ahead of need, if it
        is still waiting, else one forked now; then the next child ahead."""
        now = time.monotonic()
        self.busy, self.last_spawn = now - self.last_spawn < BUSY_WITHIN, now
        waiting, self.waiting = self.waiting, None
        if waiting is not None and select.select([waiting[2]], [], [], 0)[0]:
            waiting[1].close()  # it died meanwhile
            os.close(waiting[2])
            waiting = None
        if waiting is not None:
            pid, sock, pidfd = waiting
            self.ahead_failures = 0
            try:
                SocketTransport(sock).send(encode_control(msg, len(fds)), fds, time.monotonic() + 1.0)
            except (OSError, TimeoutError):
                os.kill(pid, signal.SIGKILL)  # reported below: the monitor sees it fail to start
            sock.close()
            os.close(pidfd)
            # Reported once it has its Spawn, not before: the monitor reads
            # its Hello only after this report, so the instance's start and
            # the report's way to the monitor (~0.4 ms) overlap. (The zygote
            # opens its own pidfd, and checks the pid is our child.)
            self.send(Forked(msg.request, pid))
        else:
            try:
                pid = self._fork_for_start()
            except OSError as exc:  # (its compartment's processes reached, say): that start fails now
                self.send(Forked(msg.request, 0, str(exc)[:300]))
                for fd in fds:
                    os.close(fd)
                self._schedule_ahead(failed=True)
                return
            if pid == 0:
                try:
                    self._detach()
                    self._become_instance(msg, fds)
                finally:
                    os._exit(1)
            self.children.add(pid)
            self.ahead_failures = 0  # (a fork works again)
            self.send(Forked(msg.request, pid))
        for fd in fds:  # the instance's must be the only copies: its death is the caller's EOF
            os.close(fd)
        self._schedule_ahead()

    def _fork_for_start(self) -> int:
        """``os.fork`` for a start that has no child forked ahead. At the
        ``processes`` limit (EAGAIN), retried as our children end (each is
        reaped at once: until then it counts), for up to ``FORK_RETRY_FOR``."""
        end = time.monotonic() + FORK_RETRY_FOR
        while True:
            try:
                return os.fork()
            except BlockingIOError:
                left = end - time.monotonic()
                if left <= 0 or not self.children:
                    raise  # (none of ours to end: another's processes fill the uid's count)
            # Woken by a child's SIGCHLD (the wakeup descriptor), 5 ms at
            # the most between tries.
            if select.select([self.wake_r], [], [], min(left, 0.005))[0]:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            self.reap()

    def _ahead_timeout(self) -> float | None:
        """How long to wait for a message before forking the next child ahead."""
        if self.waiting is not None:
            return None
        return max(0.0, self.ahead_at - time.monotonic())

    def _schedule_ahead(self, failed: bool = False) -> None:
        """When to fork the next child ahead: after a start, at once when
        starts are close (``busy``), else ``FORK_AHEAD_AFTER`` later; after
        ``failed`` tries, twice as long each time. A deadline, not a wait
        for quiet: messages coming meanwhile do not put it off."""
        if failed:
            self.ahead_failures += 1
        if self.ahead_failures:
            delay = min(FORK_AHEAD_RETRY_MAX, FORK_AHEAD_AFTER * 2 ** min(self.ahead_failures, 16))
        else:
            delay = 0.0 if self.busy else FORK_AHEAD_AFTER
        self.ahead_at = time.monotonic() + delay

    def fork_ahead(self) -> None:
        """Fork the next instance now, while nothing waits for it: it locks
        itself down and waits (with nothing of anyone's yet) for the
        ``Spawn`` that makes it an instance, so that starting one costs
        only handing it over."""
        if self.waiting is not None:
            return
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            self._schedule_ahead(failed=True)
            return
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            self._schedule_ahead(failed=True)
            return
        if pid == 0:
            try:
                ours.close()
                self._detach()
                self._wait_for_spawn(theirs)
            finally:
                os._exit(1)
        theirs.close()
        self.children.add(pid)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            ours.close()
            self._schedule_ahead(failed=True)
            return
        self.waiting = (pid, ours, pidfd)

    def _wait_for_spawn(self, sock: socket.socket) -> NoReturn:
        """(In a child forked ahead.) Lock down, wait for the ``Spawn``, serve it."""
        try:
            _lockdown.restrict_instance(self.config.lockdown)
        except BaseException:
            restricted = False
        else:
            restricted = True
        server = self._build_server() if restricted else None
        transport = SocketTransport(sock)
        reader = MessageReader(control_decoder, MAX_CONTROL)
        buf = memoryview(bytearray(65536))
        while True:
            n, fds = transport.recv_into(buf, None)
            if n == 0:
                os._exit(0)  # the template retired: never used
            reader.feed(bytes(buf[:n]), fds)
            for msg, fds in reader.messages():
                if isinstance(msg, Spawn):
                    sock.close()
                    if not restricted:
                        # Start as a fresh child would, and report why.
                        self._become_instance(msg, fds)
                    self._become_instance(msg, fds, restricted=True, server=server)
                for fd in fds:
                    os.close(fd)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            if self.waiting is not None and self.waiting[0] == pid:
                self.waiting[1].close()
                os.close(self.waiting[2])
                self.waiting = None
                self._schedule_ahead(failed=True)  # (died unused: not forked again at once)
            elif self.ahead_failures:
                self.ahead_failures = 0  # (a place freed: try again soon)
                self._schedule_ahead()
            self.send(Exited(pid, status, round((usage.ru_utime + usage.ru_stime) * 1000, 3),
                             usage.ru_maxrss))

    def retire(self) -> NoReturn:
        """The zygote closed our socket (a newer template replaces us, or
        the app stops): the instances we forked run on until they end
        (the zygote kills them when it stops), then we exit."""
        if self.waiting is not None:
            self.waiting[1].close()  # (it exits)
        while self.children:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.children.discard(pid)
        os._exit(0)

    def _detach(self) -> None:
        """(In a child.) Drop the template's own descriptors and handlers;
        die with the template."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.selector.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        self.sock.close()
        if self.waiting is not None:
            self.waiting[1].close()
            os.close(self.waiting[2])
        parent = os.getppid()
        process.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    def _build_server(self) -> _serve.Server | None:
        """(In a child forked ahead, restricted.) Its instance's server,
        built while nothing waits, over placeholder pipes whose numbers its
        channel's descriptors take when they come (``take_descriptors``):
        its ~0.3 ms and the pages it copies, off the start's path. None if
        it cannot be built here (then it is built after the Spawn, and says
        why there). Not for a channel that is a socket (``descriptors``)."""
        if self.config.descriptors:
            return None
        try:
            return _serve.server_on_own_pipe(self.config, self.table)  # type: ignore[arg-type]
        except Exception:
            return None

    def _become_instance(self, msg: Spawn, fds: list[int], restricted: bool = False,
                         server: _serve.Server | None = None) -> NoReturn:
        """(In the child.) Take the instance's descriptors, add its
        restrictions (unless done already), serve (with ``server``, built
        ahead, if given: the zygote passes on only the Spawns of configs
        equal to ours but for the index)."""
        channel_fds = list(fds)
        bulk = channel_fds.pop() if msg.bulk and channel_fds else None
        read_fd, write_fd = channel_fds[:2]
        if len(channel_fds) == 4:
            for fd, target in zip(channel_fds[2:], (1, 2)):
                os.dup2(fd, target)
            for fd in channel_fds[2:]:
                if fd not in (1, 2):
                    os.close(fd)
        table = self.table
        if server is not None:
            server.take_descriptors(msg.config, read_fd, write_fd)
            read_fd, write_fd = server.channel.transport.read_fd, server.channel.transport.write_fd
            if bulk is not None:
                server.use_bulk_fd(bulk)
                bulk = None

        def start() -> dict[str, object]:
            if not restricted:
                _lockdown.restrict_instance(msg.config.lockdown)
            return table
        _serve.start_and_serve(msg.config, read_fd, write_fd, bulk, start, server)  # type: ignore[arg-type]
