"""Namespaces: what an instance can see of the host's network and IPC.

An instance that gets ``network = "none"`` moves into a new, empty network
namespace: no interface is up, so no address on the host (its 127.0.0.1
included) is reachable, and abstract unix sockets (which live per network
namespace) of other processes cannot be named. ``"loopback"`` is the same
with the namespace's own ``lo`` brought up. Every instance also gets its own
IPC namespace, so SysV shared memory and POSIX message queues are no channel
to other compartments.

Creating a network or IPC namespace needs CAP_SYS_ADMIN. Root has it; an
unprivileged process first creates a user namespace in which it maps only
its own uid and gid (no privilege is gained over anything outside it), and
is then allowed the others. Both are done here, before capabilities are
dropped.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

NAMES = {"user": CLONE_NEWUSER, "net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "mount": CLONE_NEWNS,
         "uts": CLONE_NEWUTS, "pid": CLONE_NEWPID}

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


def unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare({describe(flags)}): {os.strerror(err)}")


def describe(flags: int) -> str:
    return "|".join(f"CLONE_NEW{name.upper()}" for name, bit in NAMES.items() if flags & bit) or "0"


def enter_user_namespace() -> None:
    """New user namespace mapping only our own uid and gid onto themselves,
    so file ownership and ``getuid()`` look the same inside."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    _write("/proc/self/setgroups", "deny")  # required before an unprivileged gid_map
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def enter_pid_namespace() -> None:
    """Make this process's next child pid 1 of a new pid namespace (as
    non-root, in a new user namespace mapping only our own uid and gid).
    When that child dies, the kernel kills every process left in it."""
    if os.geteuid() == 0:
        unshare(CLONE_NEWPID)
        return
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER | CLONE_NEWPID)
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def bring_up_loopback() -> None:
    """Set ``lo`` up in the current (new) network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh14x", b"lo", 0)
        flags = struct.unpack("16sh14x", fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | _IFF_UP))


def isolate(net: bool, loopback: bool, ipc: bool = True, user: bool = False) -> None:
    """Enter new network (if ``net``) and IPC namespaces; as non-root, inside
    a new user namespace first (always, with ``user``)."""
    flags = (CLONE_NEWNET if net else 0) | (CLONE_NEWIPC if ipc else 0)
    if os.geteuid() != 0 and (flags or user):
        enter_user_namespace()
    if not flags:
        return
    unshare(flags)
    if net and loopback:
        bring_up_loopback()
