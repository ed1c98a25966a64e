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


def drop_bounding_set(keep: frozenset[int] = frozenset()) -> None:
    """Empty the bounding set (what an ``execve`` could ever give back),
    except ``keep``. Shrinking it needs CAP_SETPCAP, which a uid change
    takes away: so this comes before ``drop_to``. A process without
    CAP_SETPCAP (unprivileged, outside a user namespace) holds no
    capability for the set to bound, and NO_NEW_PRIVS stops it from
    gaining one: it is left as it is. Where the drop can be made and does
    not take, ``PermissionError``."""
    status = _status_masks("CapBnd", "CapEff")
    bounding, effective = status["CapBnd"], status["CapEff"]
    if not bounding & ~_mask(keep) or not effective >> CAPABILITIES["CAP_SETPCAP"] & 1:
        return
    for cap in range(bounding.bit_length()):
        if bounding >> cap & 1 and cap not in keep:
            process.prctl(PR_CAPBSET_DROP, cap)
    left = bounding_capabilities() & ~_mask(keep)
    if left:
        raise PermissionError(f"the bounding set kept capabilities {left:#x} after they were dropped")


def _mask(caps: frozenset[int]) -> int:
    return sum(1 << cap for cap in caps)


def clear_capabilities(keep: frozenset[int] = frozenset()) -> None:
    """Empty the ambient, permitted, effective and inheritable sets, and
    the bounding set where that can still be done (``drop_bounding_set``),
    except the capabilities in ``keep`` (numbers)."""
    drop_bounding_set(keep)
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


def _status_masks(*fields: str) -> dict[str, int]:
    """Capability masks from /proc/self/status (0 for a field not found)."""
    out = dict.fromkeys(fields, 0)
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in out:
                out[name] = int(value.split()[0], 16)
    return out


def _status_mask(field: str) -> int:
    return _status_masks(field)[field]


def effective_capabilities() -> int:
    """The effective set as a bitmask, from /proc (for checks and tests)."""
    return _status_mask("CapEff")


def bounding_capabilities() -> int:
    return _status_mask("CapBnd")


def no_new_privs() -> None:
    process.prctl(process.PR_SET_NO_NEW_PRIVS, 1)


def not_dumpable() -> None:
    process.prctl(process.PR_SET_DUMPABLE, 0)
