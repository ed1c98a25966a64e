"""seccomp: which system calls an instance may make at all.

Built with libseccomp (through ``pyseccomp``), which emits the architecture
check every filter needs: a call made with a foreign ABI (x32 on x86_64,
i386 through ``int 0x80``) kills the process instead of slipping past rules
written for native numbers.

A filter is an allowlist (a named profile plus ``allow``), with ``deny``
answered by EPERM and ``kill`` (plus ``ALWAYS_KILL``) ending the process with
SIGSYS. Anything else gets the default action: EPERM. The filter is the last
lock applied, after Landlock, so nothing after it can loosen it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from collections.abc import Iterable

#: What a single-threaded pure-Python worker needs once it is running:
#: memory, descriptors it already has or opens (Landlock decides which
#: files), time, signals, polling. No fork, exec, sockets or threads. Not
#: here, because Landlock does not govern them and read access must not
#: become more: changing file modes, owners, times or extended attributes,
#: and file locks. ``fcntl`` and ``prctl`` are allowed only with the
#: arguments in ``FCNTL_ALLOWED`` and ``PRCTL_ALLOWED``.
_PYTHON = """
read readv pread64 preadv preadv2 write writev pwrite64 pwritev pwritev2 close close_range
lseek fstat newfstatat statx stat lstat fstatfs statfs openat openat2 open getdents64 getdents
readlink readlinkat access faccessat faccessat2 getcwd ioctl dup dup2 dup3 pipe pipe2
mmap munmap mprotect mremap brk madvise mlock munlock msync membarrier
rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigtimedwait rt_sigsuspend sigaltstack
poll ppoll select pselect6 epoll_create epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2
eventfd eventfd2 futex futex_waitv
clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time times getrusage
getpid getppid gettid getuid geteuid getgid getegid getresuid getresgid getgroups getpgrp getpgid
getsid getrandom uname sysinfo getrlimit prlimit64 sched_yield sched_getaffinity
sched_getparam sched_getscheduler sched_get_priority_max sched_get_priority_min
exit exit_group restart_syscall set_tid_address set_robust_list get_robust_list rseq
arch_prctl kill tgkill tkill
mkdir mkdirat rmdir unlink unlinkat rename renameat renameat2 link linkat symlink symlinkat
ftruncate truncate fsync fdatasync fallocate
umask getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr
wait4 waitid sendfile copy_file_range splice tee
"""

#: fcntl commands any compartment may use on its own descriptors: duplicate,
#: descriptor and status flags, asking about locks, pipe size, memfd seals.
#: Not: taking locks (F_SETLK/F_SETLKW/F_OFD_SETLK*), leases (F_SETLEASE),
#: directory notification (F_NOTIFY), signal ownership (F_SETOWN*,
#: F_SETSIG) or resizing a pipe (F_SETPIPE_SZ: a pipe to main it shrank
#: would make main's writes block).
FCNTL_ALLOWED = {
    "F_DUPFD": 0, "F_GETFD": 1, "F_SETFD": 2, "F_GETFL": 3, "F_SETFL": 4, "F_GETLK": 5,
    "F_GETOWN": 9, "F_GETSIG": 11, "F_GETOWN_EX": 16, "F_OFD_GETLK": 36, "F_GETLEASE": 1025,
    "F_DUPFD_CLOEXEC": 1030, "F_GETPIPE_SZ": 1032, "F_ADD_SEALS": 1033, "F_GET_SEALS": 1034,
}
#: With ``file_locks``: the lock commands too (and the flock system call).
FCNTL_LOCKS = {"F_SETLK": 6, "F_SETLKW": 7, "F_OFD_SETLK": 37, "F_OFD_SETLKW": 38}
#: prctl options: only reading process attributes and naming things. Not:
#: clearing the parent-death signal (outliving main), becoming dumpable
#: again, subreaping, ptracer exceptions, speculation controls, ...
PRCTL_ALLOWED = {
    "PR_GET_PDEATHSIG": 2, "PR_GET_DUMPABLE": 3, "PR_GET_KEEPCAPS": 7, "PR_SET_NAME": 15,
    "PR_GET_NAME": 16, "PR_GET_SECCOMP": 21, "PR_CAPBSET_READ": 23, "PR_GET_TIMERSLACK": 30,
    "PR_GET_NO_NEW_PRIVS": 39, "PR_GET_THP_DISABLE": 42, "PR_GET_SPECULATION_CTRL": 52,
    "PR_SET_VMA": 0x53564D41,
}
#: ``file_metadata = "own-files"``: mode and time changes, never a setuid,
#: setgid or sticky bit (checked on the mode argument, by index). Ownership
#: (DAC) keeps them to files the compartment's own uid owns.
METADATA_MODE_ARG = {"chmod": 1, "fchmod": 1, "fchmodat": 2}
METADATA_TIMES = ("utimensat", "futimesat", "utime", "utimes")
_SPECIAL_MODE_BITS = 0o7000
_S_IFMT, _S_IFIFO = 0o170000, 0o010000

#: Threads: clone only with CLONE_THREAD (enforced by argument check);
#: clone3 answers ENOSYS so glibc falls back to clone.
_THREADS = "sched_setaffinity"

#: Calls on sockets a process already has. Which sockets it may *create*
#: (``socket()``) is decided separately, by argument: see ``SOCKET_RULES``.
SOCKET_CALLS = frozenset("""
connect getsockname getpeername getsockopt setsockopt sendto recvfrom sendmsg recvmsg
sendmmsg recvmmsg shutdown socketpair bind listen accept accept4
""".split())

#: Every profile may make a connected pair of AF_UNIX *stream* sockets (an
#: event loop's self-pipe: ``asyncio`` needs one) and use sockets it has:
#: with no ``socket()`` and nothing inherited, those reach only each other
#: (a stream socket takes no destination address; a datagram pair could
#: name another socket, so it is refused), or what main handed over as a
#: value (``descriptors = true``): a connected socket to serve, or a
#: listening one to ``accept`` on. Not ``connect``, ``bind`` or ``listen``:
#: where a socket goes is main's to decide.
UNIX_PAIR_CALLS = frozenset("""
getsockname getpeername getsockopt setsockopt sendto recvfrom sendmsg recvmsg shutdown
accept accept4
""".split())
_AF_UNIX = 1

#: What ``socket()`` may create, by (domain, type) argument checks:
#:   none         no socket() at all
#:   inet-stream  AF_INET/AF_INET6 SOCK_STREAM only (TCP: what Landlock's port
#:                rules govern; UDP and raw sockets would bypass them)
#:   inet         AF_INET/AF_INET6, any type
#:   any          any domain (AF_UNIX, AF_NETLINK, ...)
SOCKET_RULES = ("none", "inet-stream", "inet", "any")
_AF_INET, _AF_INET6 = 2, 10
_SOCK_STREAM, _SOCK_TYPE_MASK = 1, 0xF
#: TCP Fast Open connects from sendto()/sendmsg() without a connect() call;
#: refuse the flag so every outgoing TCP connection passes connect().
MSG_FASTOPEN = 0x20000000

PROFILES: dict[str, frozenset[str]] = {
    "python": frozenset(_PYTHON.split()),
    "python-threads": frozenset(_PYTHON.split() + _THREADS.split()),
    "network-client": frozenset(_PYTHON.split() + _THREADS.split()) | SOCKET_CALLS,
}
THREADED_PROFILES = frozenset({"python-threads", "network-client"})

#: Never needed by a compartment, and each a classic escalation or escape
#: path: trying one kills the instance (SIGSYS) rather than returning EPERM.
ALWAYS_KILL = frozenset("""
ptrace process_vm_readv process_vm_writev kexec_load kexec_file_load bpf
init_module finit_module delete_module mount umount2 pivot_root move_mount open_tree fsopen
fsconfig fsmount fspick mount_setattr swapon swapoff reboot setns unshare chroot
open_by_handle_at name_to_handle_at userfaultfd perf_event_open keyctl add_key request_key
iopl ioperm acct quotactl syslog settimeofday clock_settime clock_adjtime adjtimex
personality uselib lookup_dcookie vhangup
""".split())

CLONE_THREAD = 0x00010000


class SeccompError(OSError):
    pass


#: The largest BPF program the kernel loads (4096 instructions of 8 bytes).
MAX_PROGRAM_BYTES = 4096 * 8


def available() -> bool:
    """Whether filters can be compiled here: pyseccomp is installed and
    libseccomp (which it loads) is found. Checked without loading either (a
    compiled filter may be cached: ``policy.resolution``)."""
    import importlib.util

    if importlib.util.find_spec("pyseccomp") is None:
        return False
    return any(os.path.exists(os.path.join(d, "libseccomp.so.2")) for d in _LIB_DIRS) or _loads()


_LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
             "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/lib64", "/usr/lib", "/lib")


def _loads() -> bool:
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def known(name: str) -> bool:
    """Whether libseccomp knows ``name`` as a system call of this architecture."""
    import pyseccomp as sc

    try:
        return sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0
    except (ValueError, RuntimeError, OSError):
        return False


#: The flags glibc's ``fork()`` passes to clone: a plain child process (no
#: shared memory, files or namespaces), what a template forks an instance with.
FORK_FLAGS = 0x01200011  # CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID | SIGCHLD
#: What a template (``pycompart.compartment.template``) may do beyond its
#: instances' filter: fork them, and give each one restrictions of its own
#: (a Landlock layer, its parent-death signal; neither can loosen anything).
TEMPLATE_CALLS = frozenset({"landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
                            "pidfd_open"})
PR_SET_PDEATHSIG = 1


def build(profile: str, allow: Iterable[str] = (), deny: Iterable[str] = (),
          kill: Iterable[str] = (), sockets: str = "none", metadata: str = "none",
          locks: bool = False, fifos: bool = False, template: bool = False):  # type: ignore[no-untyped-def]
    """A loaded-ready libseccomp filter for ``profile`` (see PROFILES).

    ``ALWAYS_KILL`` applies unless a call is named in ``allow`` (an explicit
    grant); ``kill`` wins over everything. ``sockets`` is one of
    ``SOCKET_RULES``; ``metadata`` ("none" or "own-files") and ``locks``
    add the file-mode and file-lock calls, ``fifos`` ``mknod`` of FIFOs
    (never device nodes; where Landlock lets it). Naming ``fcntl`` or ``prctl`` in
    ``allow`` lifts their argument checks. ``template``: the filter of the
    compartment's template, which also forks (``clone`` with exactly
    ``FORK_FLAGS``) and restricts its children (``TEMPLATE_CALLS``,
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, a seccomp filter); each child then adds
    ``compile_no_fork`` on top."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:
        raise SeccompError(0, f"seccomp filters need libseccomp (pyseccomp): {exc}") from None
    if profile not in PROFILES:
        raise SeccompError(0, f"unknown syscall profile {profile!r} (known: {', '.join(PROFILES)})")
    if sockets not in SOCKET_RULES:
        raise SeccompError(0, f"unknown socket rule {sockets!r}")
    allowed = set(PROFILES[profile]) | set(allow) | UNIX_PAIR_CALLS
    if sockets != "none":
        allowed |= SOCKET_CALLS
    denied = set(deny)
    killed = set(kill) | (ALWAYS_KILL - set(allow))
    allowed -= denied | killed
    guarded = {"socket", "sendto", "sendmsg", "sendmmsg"} - set(allow) - denied - killed
    if sockets != "none":
        allowed -= guarded
    handed_sends: set[str] = set()
    if sockets == "none":
        # Sockets it was handed: sends are checked for TCP Fast Open below.
        handed_sends = allowed & (guarded - {"socket"})
        allowed -= handed_sends
    f = sc.SyscallFilter(defaction=sc.ERRNO(errno.EPERM))
    # Foreign architectures (x32, i386 via int 0x80) are never legitimate here.
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in sorted(allowed):
        _rule(sc, f, sc.ALLOW, name)
    # Denied calls need no rule: EPERM is the default action (and libseccomp
    # refuses rules that repeat the default).
    for name in sorted(killed):
        _rule(sc, f, sc.KILL_PROCESS, name)
    if template:
        allowed |= TEMPLATE_CALLS
    if profile in THREADED_PROFILES and "clone" not in killed | denied | allowed:
        f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    if template:
        for name in sorted(TEMPLATE_CALLS):
            _rule(sc, f, sc.ALLOW, name)
        if "clone" not in killed | denied | allowed:
            f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.EQ, FORK_FLAGS))
        if "prctl" not in killed | denied | allowed:
            f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, PR_SET_PDEATHSIG), sc.Arg(1, sc.EQ, 9))
        if "seccomp" not in killed | denied | allowed:  # (a filter on top only restricts)
            f.add_rule(sc.ALLOW, "seccomp", sc.Arg(0, sc.EQ, _SECCOMP_SET_MODE_FILTER),
                       sc.Arg(1, sc.EQ, 0))
    if "clone3" not in allowed | killed:
        # clone3 passes its flags in memory, which seccomp cannot inspect;
        # ENOSYS makes glibc fall back to clone, whose flags it can.
        _rule(sc, f, sc.ERRNO(errno.ENOSYS), "clone3")
    if sockets != "none":
        _socket_rules(sc, f, sockets, guarded)
    else:
        if "socketpair" not in allowed | killed | denied:
            f.add_rule(sc.ALLOW, "socketpair", sc.Arg(0, sc.EQ, _AF_UNIX),
                       sc.Arg(1, sc.MASKED_EQ, _SOCK_TYPE_MASK, _SOCK_STREAM))
        # Never a TCP Fast Open send, which connects an unconnected socket (a
        # handed listener, shut down) without connect().
        _socket_rules(sc, f, sockets, handed_sends)
    blocked = killed | denied | allowed
    if "fcntl" not in blocked:
        commands = dict(FCNTL_ALLOWED, **(FCNTL_LOCKS if locks else {}))
        for cmd in sorted(commands.values()):
            f.add_rule(sc.ALLOW, "fcntl", sc.Arg(1, sc.EQ, cmd))
    if "prctl" not in blocked:
        for option in sorted(PRCTL_ALLOWED.values()):
            f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, option))
    if locks and "flock" not in blocked:
        _rule(sc, f, sc.ALLOW, "flock")
    if fifos:
        for name, index in (("mknod", 1), ("mknodat", 2)):
            if name not in blocked:
                try:
                    f.add_rule(sc.ALLOW, name, sc.Arg(index, sc.MASKED_EQ, _S_IFMT, _S_IFIFO))
                except (ValueError, RuntimeError, OSError):
                    pass  # a call this architecture lacks
    if metadata == "own-files":
        for name, index in METADATA_MODE_ARG.items():
            if name not in blocked:
                f.add_rule(sc.ALLOW, name, sc.Arg(index, sc.MASKED_EQ, _SPECIAL_MODE_BITS, 0))
        for name in METADATA_TIMES:
            if name not in blocked:
                _rule(sc, f, sc.ALLOW, name)
    elif metadata != "none":
        raise SeccompError(0, f"unknown file_metadata rule {metadata!r}")
    return f


def _socket_rules(sc, f, sockets: str, guarded: set[str]) -> None:  # type: ignore[no-untyped-def]
    if "socket" in guarded:
        if sockets == "any":
            f.add_rule(sc.ALLOW, "socket")
        else:
            for family in (_AF_INET, _AF_INET6):
                if sockets == "inet":
                    f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, family))
                else:
                    f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, family),
                               sc.Arg(1, sc.MASKED_EQ, _SOCK_TYPE_MASK, _SOCK_STREAM))
    flags_arg = {"sendto": 3, "sendmsg": 2, "sendmmsg": 3}
    for name in ("sendto", "sendmsg", "sendmmsg"):
        if name in guarded:
            f.add_rule(sc.ALLOW, name, sc.Arg(flags_arg[name], sc.MASKED_EQ, MSG_FASTOPEN, 0))


def _rule(sc, f, action, name: str) -> None:  # type: ignore[no-untyped-def]
    try:
        f.add_rule(action, name)
    except (ValueError, RuntimeError, OSError) as exc:
        # A name this libseccomp does not know on this architecture (e.g. an
        # old call that x86_64 lacks) cannot be made anyway.
        if "resolve" in str(exc).lower() or isinstance(exc, ValueError):
            return
        raise


def compile_bpf(profile: str, allow: Iterable[str] = (), deny: Iterable[str] = (), kill: Iterable[str] = (),
                sockets: str = "none", metadata: str = "none", locks: bool = False,
                fifos: bool = False, template: bool = False) -> bytes:
    """The filter as raw BPF (``struct sock_filter`` array) for this
    machine: built once in main, loaded by each instance with one system
    call instead of a libseccomp compile per instance."""
    return _export(build(profile, allow, deny, kill, sockets, metadata, locks, fifos, template))


def compile_no_fork(allow: Iterable[str] = ()) -> bytes:
    """What an instance forked from a template loads on top of the
    template's filter: no new processes (``clone`` without CLONE_THREAD,
    ``fork``, ``vfork``: EPERM) and none of what the template needed for
    its children (``TEMPLATE_CALLS``, ``seccomp``, its ``prctl``) unless
    the compartment's ``allow`` lists them, everything else as the
    template's filter decides. With it the instance has exactly its
    compartment's filter."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:
        raise SeccompError(0, f"seccomp filters need libseccomp (pyseccomp): {exc}") from None
    f = sc.SyscallFilter(defaction=sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    allowed = set(allow)
    for name in ("fork", "vfork"):
        _rule(sc, f, sc.ERRNO(errno.EPERM), name)
    for name in sorted((TEMPLATE_CALLS | {"seccomp"}) - allowed):  # (the template's, for its children)
        _rule(sc, f, sc.ERRNO(errno.EPERM), name)
    if "prctl" not in allowed:
        f.add_rule(sc.ERRNO(errno.EPERM), "prctl", sc.Arg(0, sc.EQ, PR_SET_PDEATHSIG))
    return _export(f)


def _export(f) -> bytes:  # type: ignore[no-untyped-def]
    fd = os.memfd_create("pycompart-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "rb", closefd=True) as dup:
            f.export_bpf(dup)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    program = b"".join(chunks)
    if not program or len(program) % 8:
        raise SeccompError(0, f"libseccomp exported a malformed filter ({len(program)} bytes)")
    return program


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
_SECCOMP_SET_MODE_FILTER = 1


def load_bpf(program: bytes) -> None:
    """Install a filter made by ``compile_bpf`` on the calling thread
    (NO_NEW_PRIVS must be set)."""
    if not program or len(program) % 8 or len(program) > MAX_PROGRAM_BYTES:
        raise SeccompError(0, "not a seccomp BPF program")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    number = _SYS_SECCOMP.get(platform.machine())
    if number is None:
        raise SeccompError(0, f"seccomp syscall number unknown on {platform.machine()}")
    if _libc.syscall(ctypes.c_long(number), ctypes.c_long(_SECCOMP_SET_MODE_FILTER), ctypes.c_long(0),
                    ctypes.byref(prog)) != 0:
        err = ctypes.get_errno()
        raise SeccompError(err, f"seccomp(SET_MODE_FILTER): {os.strerror(err)}")


def apply(profile: str, allow: Iterable[str] = (), deny: Iterable[str] = (), kill: Iterable[str] = (),
          sockets: str = "none", metadata: str = "none", locks: bool = False) -> None:
    """Build and load the filter on the calling thread (NO_NEW_PRIVS must be
    set, or the caller must have CAP_SYS_ADMIN)."""
    build(profile, allow, deny, kill, sockets, metadata, locks).load()
