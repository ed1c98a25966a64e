"""Process-level kernel interfaces: prctl, pidfds, descriptor hygiene."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    res = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return res


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Die with ``sig`` when the parent *thread* exits. The caller must check
    ``os.getppid()`` afterwards: the parent may already be gone."""
    prctl(PR_SET_PDEATHSIG, sig)


def set_child_subreaper(on: bool = True) -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0)


def pidfd_open(pid: int) -> int:
    return os.pidfd_open(pid)


def pidfd_pid(pidfd: int) -> int | None:
    """The pid a pidfd refers to, as this process's pid namespace numbers
    it (its ``fdinfo``); None if it has exited or the kernel does not say."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        return None
    return None


#: ``PIDFD_GET_INFO`` (Linux 6.13): ``_IOWR(0xFF, 11, struct pidfd_info)``,
#: the struct's first version (64 bytes); ``PIDFD_INFO_PID`` in its mask.
_PIDFD_GET_INFO = 0xC040FF0B
_PIDFD_INFO_PID = 1
_PIDFD_INFO = struct.Struct("=QQIII")


def pidfd_parent(pidfd: int) -> int | None:
    """The pid of the parent of the process ``pidfd`` refers to, as this
    process's pid namespace numbers it; None where the kernel cannot say
    (before 6.13). ``ProcessLookupError`` if it has ended."""
    buf = bytearray(64)
    _PIDFD_INFO.pack_into(buf, 0, _PIDFD_INFO_PID, 0, 0, 0, 0)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buf, True)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessLookupError(exc.errno, "the process has ended") from None
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            return None
        raise
    mask, _, _, _, ppid = _PIDFD_INFO.unpack_from(buf)
    return ppid if mask & _PIDFD_INFO_PID else None


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of ``pid`` (all its threads), from its
    ``/proc`` stat (readable even for a non-dumpable process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


def pidfd_kill(pidfd: int, sig: int = signal.SIGKILL) -> bool:
    """Signal through a pidfd (no pid-reuse race). False if already gone."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False


def close_fds_except(keep: set[int] | frozenset[int]) -> None:
    """Close every descriptor not in ``keep`` (stdin/out/err included unless
    kept), so an instance inherits nothing by accident."""
    start = 0
    for fd in sorted(keep):
        if fd > start:
            os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 20) if start < (1 << 20) else None


def describe_wait_status(status: int) -> str:
    """Human words for a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        core = " (core dumped)" if os.WCOREDUMP(status) else ""
        return f"was killed by signal {sig} ({name}){core}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status:#x}"


def is_failure(status: int) -> bool:
    return not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)


def ignore_enoent(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ESRCH, errno.EBADF):
            raise
        return None
