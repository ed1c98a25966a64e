"""Credentials: who the instance is and what it may never become.

Order inside an instance (the design's): drop supplementary groups, gid,
uid; empty every capability set (bounding, inheritable, ambient, permitted,
effective); then NO_NEW_PRIVS, so no setuid binary or file capability can
give any of it back; then non-dumpable, so processes of the same uid cannot
ptrace it or read /proc/<pid>/mem.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd

from . import process

_libc = ctypes.CDLL(None, use_errno=True)

PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_KEEPCAPS = 8

#: linux/capability.h, in number order.
CAPABILITIES = {name: number for number, name in enumerate("""
CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_FSETID CAP_KILL CAP_SETGID
CAP_SETUID CAP_SETPCAP CAP_LINUX_IMMUTABLE CAP_NET_BIND_SERVICE CAP_NET_BROADCAST CAP_NET_ADMIN
CAP_NET_RAW CAP_IPC_LOCK CAP_IPC_OWNER CAP_SYS_MODULE CAP_SYS_RAWIO CAP_SYS_CHROOT CAP_SYS_PTRACE
CAP_SYS_PACCT CAP_SYS_ADMIN CAP_SYS_BOOT CAP_SYS_NICE CAP_SYS_RESOURCE CAP_SYS_TIME
CAP_SYS_TTY_CONFIG CAP_MKNOD CAP_LEASE CAP_AUDIT_WRITE CAP_AUDIT_CONTROL CAP_SETFCAP
CAP_MAC_OVERRIDE CAP_MAC_ADMIN CAP_SYSLOG CAP_WAKE_ALARM CAP_BLOCK_SUSPEND CAP_AUDIT_READ
CAP_PERFMON CAP_BPF CAP_CHECKPOINT_RESTORE
""".split())}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def resolve_user(user: str | int) -> tuple[int, int]:
    """(uid, primary gid) of a user name or number."""
    if isinstance(user, int):
        try:
            return user, pwd.getpwuid(user).pw_gid
        except KeyError:
            return user, user
    entry = pwd.getpwnam(user)
    return entry.pw_uid, entry.pw_gid


def resolve_group(group: str | int) -> int:
    return group if isinstance(group, int) else grp.getgrnam(group).gr_gid


def drop_to(uid: int, gid: int, keep_capabilities: bool = False) -> None:
    """Become ``uid``/``gid`` with no supplementary groups, for good (real,
    effective and saved ids all change). Needs CAP_SETUID/CAP_SETGID. With
    ``keep_capabilities`` the permitted set survives the change (the
    effective set is emptied by the kernel; ``clear_capabilities`` then sets
    what is kept)."""
    if keep_capabilities:
        process.prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(f"could not drop to uid {uid} gid {gid}")
    if keep_capabilities:
        process.prctl(PR_SET_KEEPCAPS, 0)


def clear_capabilities(keep: frozenset[int] = frozenset()) -> None:
    """Empty the bounding and ambient sets and the permitted, effective and
    inheritable sets, except the capabilities in ``keep`` (numbers)."""
    for cap in range(last_capability() + 1):
        if cap in keep:
            continue
        try:
            process.prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            pass  # without CAP_SETPCAP the bounding set cannot shrink; checked below
    try:
        process.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for cap in keep:
        data[cap // 32].permitted |= 1 << (cap % 32)
        data[cap // 32].effective |= 1 << (cap % 32)
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def _status_mask(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    return 0


def effective_capabilities() -> int:
    """The effective set as a bitmask, from /proc (for checks and tests)."""
    return _status_mask("CapEff")


def bounding_capabilities() -> int:
    return _status_mask("CapBnd")


def no_new_privs() -> None:
    process.prctl(process.PR_SET_NO_NEW_PRIVS, 1)


def not_dumpable() -> None:
    process.prctl(process.PR_SET_DUMPABLE, 0)
