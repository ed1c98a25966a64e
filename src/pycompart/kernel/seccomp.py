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

import errno
from collections.abc import Iterable

#: What a single-threaded pure-Python worker needs once it is running:
#: memory, descriptors it already has or opens (Landlock decides which
#: files), time, signals, polling. No fork, exec, sockets or threads.
_PYTHON = """
read readv pread64 preadv preadv2 write writev pwrite64 pwritev pwritev2 close close_range
lseek fstat newfstatat statx stat lstat fstatfs statfs openat open getdents64 getdents
readlink readlinkat access faccessat faccessat2 getcwd fcntl ioctl dup dup2 dup3 pipe pipe2
mmap munmap mprotect mremap brk madvise mlock munlock msync membarrier
rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigtimedwait rt_sigsuspend sigaltstack
poll ppoll select pselect6 epoll_create epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2
eventfd eventfd2 futex futex_waitv
clock_gettime clock_getres clock_nanosleep nanosleep gettimeofday time times getrusage
getpid getppid gettid getuid geteuid getgid getegid getresuid getresgid getgroups getpgrp getpgid
getsid getrandom uname sysinfo getrlimit prlimit64 sched_yield sched_getaffinity
sched_getparam sched_getscheduler sched_get_priority_max sched_get_priority_min
exit exit_group restart_syscall set_tid_address set_robust_list get_robust_list rseq
arch_prctl prctl kill tgkill tkill
mkdir mkdirat rmdir unlink unlinkat rename renameat renameat2 link linkat symlink symlinkat
chmod fchmod fchmodat ftruncate truncate fsync fdatasync fallocate utimensat futimesat
umask flock getxattr lgetxattr fgetxattr listxattr llistxattr flistxattr
wait4 waitid sendfile copy_file_range splice tee
"""

#: Threads: clone only with CLONE_THREAD (enforced by argument check);
#: clone3 answers ENOSYS so glibc falls back to clone.
_THREADS = "sched_setaffinity"

_NETWORK_CLIENT = """
socket connect getsockname getpeername getsockopt setsockopt sendto recvfrom sendmsg recvmsg
sendmmsg recvmmsg shutdown socketpair bind
"""

PROFILES: dict[str, frozenset[str]] = {
    "python": frozenset(_PYTHON.split()),
    "python-threads": frozenset(_PYTHON.split() + _THREADS.split()),
    "network-client": frozenset(_PYTHON.split() + _THREADS.split() + _NETWORK_CLIENT.split()),
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


def available() -> bool:
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def build(profile: str, allow: Iterable[str] = (), deny: Iterable[str] = (),
          kill: Iterable[str] = ()):  # type: ignore[no-untyped-def]
    """A loaded-ready libseccomp filter for ``profile`` (see PROFILES)."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError) as exc:
        raise SeccompError(0, f"seccomp filters need libseccomp (pyseccomp): {exc}") from None
    if profile not in PROFILES:
        raise SeccompError(0, f"unknown syscall profile {profile!r} (known: {', '.join(PROFILES)})")
    allowed = set(PROFILES[profile]) | set(allow)
    denied = set(deny)
    killed = set(kill) | ALWAYS_KILL
    allowed -= denied | killed
    f = sc.SyscallFilter(defaction=sc.ERRNO(errno.EPERM))
    # Foreign architectures (x32, i386 via int 0x80) are never legitimate here.
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for name in sorted(allowed):
        _rule(sc, f, sc.ALLOW, name)
    # Denied calls need no rule: EPERM is the default action (and libseccomp
    # refuses rules that repeat the default).
    for name in sorted(killed):
        _rule(sc, f, sc.KILL_PROCESS, name)
    if profile in THREADED_PROFILES and "clone" not in killed | denied:
        f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
        _rule(sc, f, sc.ERRNO(errno.ENOSYS), "clone3")
    return f


def _rule(sc, f, action, name: str) -> None:  # type: ignore[no-untyped-def]
    try:
        f.add_rule(action, name)
    except (ValueError, RuntimeError, OSError) as exc:
        # A name this libseccomp does not know on this architecture (e.g. an
        # old call that x86_64 lacks) cannot be made anyway.
        if "resolve" in str(exc).lower() or isinstance(exc, ValueError):
            return
        raise


def apply(profile: str, allow: Iterable[str] = (), deny: Iterable[str] = (), kill: Iterable[str] = ()) -> None:
    """Build and load the filter on the calling thread (NO_NEW_PRIVS must be
    set, or the caller must have CAP_SYS_ADMIN)."""
    build(profile, allow, deny, kill).load()
