"""Landlock: unprivileged filesystem, TCP and scope restrictions.

A small ctypes layer over the three system calls, because no complete Python
binding exists (PyPI ``landlock`` has no network rules or scopes). Handled
rights are masked by the running kernel's ABI, so a ruleset asks only for
what the kernel understands; ``Ruleset.unsupported`` records what had to be
dropped so the caller can fail closed.

Landlock restricts the calling thread and its future children; it needs
``PR_SET_NO_NEW_PRIVS`` (or CAP_SYS_ADMIN) first. Rules only *allow*: what
is handled and not allowed by a rule is denied.
"""

from __future__ import annotations

import ctypes
import os
import platform
import stat
from collections.abc import Iterable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_SYSCALLS = {
    # landlock_create_ruleset, landlock_add_rule, landlock_restrict_self
    "x86_64": (444, 445, 446),
    "aarch64": (444, 445, 446),
}

CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2

# Filesystem rights, with the ABI that introduced each.
FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
#: Rights that make sense on a file (not a directory) in a path-beneath rule.
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

#: Convenience groups for policies. ``FS_WRITE`` is what a granted write
#: directory allows by default: files and directories, not symbolic links
#: or FIFOs (a link planted there is followed by whoever opens the path
#: next, main included; a FIFO makes its next ``open`` hang) and never
#: device nodes.
FS_READ = FS_READ_FILE | FS_READ_DIR
FS_WRITE = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG
            | FS_MAKE_SOCK | FS_REFER | FS_TRUNCATE)


class LandlockError(OSError):
    pass


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def _numbers() -> tuple[int, int, int]:
    try:
        return _SYSCALLS[platform.machine()]
    except KeyError:
        raise LandlockError(0, f"Landlock syscall numbers unknown on {platform.machine()}") from None


def _call(number: int, *args: object) -> int:
    res = _libc.syscall(ctypes.c_long(number), *args)
    if res < 0:
        err = ctypes.get_errno()  # read at once: any later libc call may change it
        raise LandlockError(err, os.strerror(err))
    return res


def abi_version() -> int:
    """The kernel's Landlock ABI (0 when Landlock is absent or disabled)."""
    try:
        create, _, _ = _numbers()
        return _call(create, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    except LandlockError:
        return 0


def fs_rights(abi: int) -> int:
    return _FS_BY_ABI.get(min(abi, 5), 0) if abi > 0 else 0


def net_rights(abi: int) -> int:
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def scope_flags(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


class Ruleset:
    """Build a ruleset, then ``enforce()`` it on the calling thread.

    ``handle_fs``/``handle_net``/``scopes`` say what is restricted; the
    parts the kernel does not support are left out and listed in
    ``unsupported``.
    """

    def __init__(self, handle_fs: int = 0, handle_net: int = 0, scopes: int = 0, abi: int | None = None):
        self.abi = abi_version() if abi is None else abi
        if self.abi <= 0:
            raise LandlockError(0, "Landlock is not available on this kernel")
        self.unsupported: list[str] = []
        fs, net, sc = fs_rights(self.abi), net_rights(self.abi), scope_flags(self.abi)
        if handle_fs & ~fs:
            self.unsupported.append(f"filesystem rights {handle_fs & ~fs:#x} (Landlock ABI {self.abi})")
        if handle_net & ~net:
            self.unsupported.append(f"TCP rules (need Landlock ABI 4, have {self.abi})")
        if scopes & ~sc:
            self.unsupported.append(f"signal/abstract-socket scopes (need Landlock ABI 6, have {self.abi})")
        self.handled_fs = handle_fs & fs
        self.handled_net = handle_net & net
        self.scopes = scopes & sc
        if not (self.handled_fs or self.handled_net or self.scopes):
            raise LandlockError(0, "a Landlock ruleset must restrict something")
        attr = _RulesetAttr(self.handled_fs, self.handled_net, self.scopes)
        create, self._add, self._restrict = _numbers()
        self.fd = _call(create, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0))

    def allow_path(self, path: str, access: int) -> None:
        """Allow ``access`` on ``path`` and everything beneath it. On a
        regular file only file rights apply. A missing path is skipped: it
        cannot be accessed anyway, and would be created only by a write that
        its parent's rule governs."""
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            self.allow_fd(fd, access, stat.S_ISDIR(os.fstat(fd).st_mode))
        finally:
            os.close(fd)

    def allow_fd(self, fd: int, access: int, is_dir: bool) -> None:
        """``allow_path`` for what ``fd`` (``O_PATH`` will do) has open."""
        if not is_dir:
            access &= FS_FILE_RIGHTS
        access &= self.handled_fs
        if not access:
            return
        rule = _PathBeneathAttr(access, fd)
        _call(self._add, ctypes.c_int(self.fd), ctypes.c_int(RULE_PATH_BENEATH),
              ctypes.byref(rule), ctypes.c_uint32(0))

    def allow_paths(self, paths: Iterable[str], access: int) -> None:
        for path in paths:
            self.allow_path(path, access)

    def allow_port(self, port: int, access: int) -> None:
        access &= self.handled_net
        if not access:
            return
        rule = _NetPortAttr(access, port)
        _call(self._add, ctypes.c_int(self.fd), ctypes.c_int(RULE_NET_PORT),
              ctypes.byref(rule), ctypes.c_uint32(0))

    def enforce(self) -> None:
        """Restrict the calling thread (and its future children) for good.
        Requires NO_NEW_PRIVS to be set already."""
        try:
            _call(self._restrict, ctypes.c_int(self.fd), ctypes.c_uint32(0))
        finally:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
