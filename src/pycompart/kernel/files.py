"""Opening, in main, a file a compartment could have touched.

A compartment granted a write directory controls what is there. By default
it cannot create symbolic links or FIFOs in it (Landlock), but a spec may
grant them (``filesystem.symlinks``/``fifos``), another process may have
left them, and the directory may hold more than the compartment wrote.
Main, which usually has more privileges than the compartment, must not
follow a link planted there (root main overwrote the file a compartment's
link pointed to), block on a FIFO, or open a device.

``open_beneath`` resolves the path with ``openat2`` and
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS``: the
kernel refuses any symbolic link on the way, ``..`` out of the directory
and ``/proc`` magic links; it opens non-blocking (a FIFO cannot hang it)
and refuses anything but a regular file. Without ``openat2`` (Linux < 5.6)
it walks the path one component at a time with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import stat
from typing import IO, Any

try:
    # CPython's own BLAKE2, as hashlib has it, without loading OpenSSL's
    # libcrypto (some 2 ms of every ``pycompart run``).
    from _blake2 import blake2b as _blake2b
except ImportError:  # another Python
    from hashlib import blake2b as _blake2b

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_beneath(directory: str | int, path: str, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """A descriptor for ``path`` inside ``directory`` (a path or an open
    directory descriptor), refusing symbolic links, escapes and anything
    that is not a regular file. Raises ``OSError``."""
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    dirfd = directory if isinstance(directory, int) else os.open(
        directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _openat2(dirfd, path, flags, mode)
        if fd is None:
            fd = _walk(dirfd, path, flags, mode)
    finally:
        if not isinstance(directory, int):
            os.close(dirfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path}: not a regular file (a FIFO, device or socket)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int | None:
    number = _SYS_OPENAT2.get(platform.machine())
    if number is None:
        return None
    how = _OpenHow(flags, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0,
                   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(number), ctypes.c_int(dirfd), os.fsencode(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):  # an old kernel, or a filter that lacks openat2
            return None
        raise OSError(err, os.strerror(err), path)
    return fd


def _walk(dirfd: int, path: str, flags: int, mode: int) -> int:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts or not parts:
        raise OSError(errno.EXDEV, "path escapes the directory", path)
    current = os.dup(dirfd)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=current)
            os.close(current)
            current = nxt
        return os.open(parts[-1], flags, mode, dir_fd=current)
    finally:
        os.close(current)


_MODES = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
          "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "x": os.O_WRONLY | os.O_CREAT | os.O_EXCL}


def open_untrusted(directory: str | int, path: str, mode: str = "r", **kwargs: Any) -> IO[Any]:
    """Like ``open(os.path.join(directory, path), mode, ...)`` for a file
    in a directory a compartment may write: no symbolic link is followed,
    ``path`` cannot leave ``directory``, and only a regular file opens
    (``OSError`` otherwise: ELOOP for a link, EXDEV for an escape, EINVAL
    for a FIFO or device)."""
    kind = mode.replace("b", "").replace("t", "").replace("+", "")
    if kind not in _MODES:
        raise ValueError(f"invalid mode: {mode!r}")
    flags = _MODES[kind]
    if "+" in mode:
        flags = (flags & ~(os.O_WRONLY | os.O_RDONLY)) | os.O_RDWR
    fd = open_beneath(directory, path, flags)
    return os.fdopen(fd, mode, **kwargs)


def owned(st: os.stat_result) -> bool:
    """Whether what ``st`` describes is this user's and nobody else may write it."""
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def digest(data: bytes) -> str:
    """A cache key's hash of ``data``: BLAKE2b-256 in hex."""
    return _blake2b(data, digest_size=32).hexdigest()


@functools.lru_cache(maxsize=None)
def source_digest(path: str) -> str:
    """The ``digest`` of a file of pycompart's own (what a cache key names
    as the code that made an entry), read once per process."""
    with open(path, "rb") as f:
        return digest(f.read())


def own_directory(path: str, mode: int = 0o755) -> str:
    """``path``, made if missing: a directory of this user's that nobody
    else may write. ``PermissionError`` if it is anything else: in a
    directory everybody may write (``/var/tmp``) another user could have made
    it in advance and filled it with what we would then trust as ours."""
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or not owned(st):
        raise PermissionError(f"{path} is not a directory of this user's own that only it may write")
    if st.st_mode & mode != mode:
        os.chmod(path, mode)
    return path


def read_own_file(path: str, limit: int) -> bytes | None:
    """The content of a regular file of this user's that nobody else may
    write, at most ``limit`` bytes; None if it is missing or anything else."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not owned(st) or st.st_size > limit:
            return None
        return os.read(fd, limit + 1)[:limit]
    finally:
        os.close(fd)


def write_own_file(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` at once (a reader sees the old file or
    the new one, never part), in a directory of ours (``own_directory``)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
