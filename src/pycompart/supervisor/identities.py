"""A uid and gid of its own for each compartment, when main is root.

Like systemd's ``DynamicUser=``: with no ``privileges.user`` in the spec, a
compartment runs under an id from ``policy.resolution.DYNAMIC_IDS`` that no
user, group, running process or other pycompart app holds. So compartments
of one app cannot touch each other's files by DAC (compartment A cannot
``chmod`` B's file), ``processes`` counts one compartment's tasks, and
nothing on the host is reachable through the "owner" bits of a shared
``nobody``.

An id is held for the app's life by an exclusive ``flock`` on
``/run/pycompart/ids/<id>``; a second app (or a crashed one's successor)
probes past it. The starting point is a hash of the app's and the
compartment's names, so an app usually gets the same ids each run (files it
left in a granted directory stay its own), without ever sharing one.
"""

from __future__ import annotations

import fcntl
import grp
import os
import pwd
from typing import Any

from ..errors import PrivilegeError
from ..policy.resolution import DYNAMIC_IDS

LOCK_DIR = "/run/pycompart/ids"



def _sha256(data: bytes) -> Any:
    """hashlib's SHA-256 (the uids it picks must not change), from CPython's
    own module where it can be: ``hashlib`` loads OpenSSL's libcrypto, some
    3 ms of a start."""
    try:
        from _sha256 import sha256  # CPython 3.11
    except ImportError:
        try:
            from _sha2 import sha256  # type: ignore[no-redef]  # 3.12 and later
        except ImportError:
            from hashlib import sha256
    return sha256(data)


class Identities:
    """The ids this app holds (one lock descriptor each) until ``release``."""

    def __init__(self, lock_dir: str = LOCK_DIR):
        self.lock_dir = lock_dir
        self._held: dict[int, int] = {}  # id -> lock fd

    def allocate(self, app: str, compartment: str) -> int:
        try:
            os.makedirs(self.lock_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise PrivilegeError(f"compartment {compartment!r}: cannot allocate a uid of its own: "
                                 f"{self.lock_dir}: {exc} (or set privileges.user)") from None
        size = len(DYNAMIC_IDS)
        digest = _sha256(f"{app}\0{compartment}".encode()).digest()
        start = int.from_bytes(digest[:4], "little") % size
        used = None
        for step in range(size):
            candidate = DYNAMIC_IDS.start + (start + step) % size
            if candidate in self._held or _named(candidate):
                continue
            fd = self._lock(candidate)
            if fd is None:
                continue
            if used is None:
                used = _process_uids()
            if candidate in used:
                os.close(fd)
                continue
            self._held[candidate] = fd
            return candidate
        raise PrivilegeError(f"compartment {compartment!r}: no free uid left in "
                             f"{DYNAMIC_IDS.start}-{DYNAMIC_IDS.stop - 1} (set privileges.user)")

    def _lock(self, candidate: int) -> int | None:
        path = os.path.join(self.lock_dir, str(candidate))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None  # another app holds it
        return fd

    def release(self) -> None:
        held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)


def _named(uid: int) -> bool:
    """Whether a user or group with this number exists (NSS: passwd, LDAP...)."""
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


def _process_uids() -> set[int]:
    """The uids that own a running process right now (by /proc's owners;
    pycompart's own non-dumpable instances show as root, and are covered by
    the locks)."""
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                out.add(os.stat(f"/proc/{name}").st_uid)
            except OSError:
                pass
    return out
