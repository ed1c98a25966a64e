"""Sealed memory files (memfd_create + F_ADD_SEALS): shared memory that the
other side can read and write but never shrink or grow.

Main maps a memory file it shares with an instance. Were the instance able to
shrink it, main's next access past the new end would be a SIGBUS in main: the
seals (shrink, grow, and no further seals) make the size a fact both sides
can rely on. Writes cannot be sealed away (main writes too), so what is in it
is never trusted: readers copy out before they look (``transport.bulk``).
"""

from __future__ import annotations

import fcntl
import os

#: The seals every shared memory file carries.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def create_sealed(name: str, size: int) -> int:
    """A close-on-exec memory file of exactly ``size`` bytes (zero pages,
    costing nothing until touched), sealed against resizing."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_sealed(fd: int) -> bool:
    """Whether ``fd`` is a memory file whose size nobody can change."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return seals & SEALS == SEALS
