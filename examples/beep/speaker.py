"""The privileged part of beep, in compartment ``Privileged``: the only code
that opens the speaker device and writes to it (the seeds' ``beep``: Linux
evdev, ``struct input_event`` with ``EV_SND``/``SND_TONE``)."""

from __future__ import annotations

import os
import struct
import time

EV_SND = 0x12
SND_TONE = 0x02
#: struct input_event: struct timeval (long tv_sec, long tv_usec), __u16
#: type, __u16 code, __s32 value.
INPUT_EVENT = struct.Struct("llHHi")

_fds: dict[int, int] = {}


def open_device(path: str) -> int:
    """Open the device for writing; a handle that means something only in
    this instance (the descriptor never leaves it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    _fds[fd] = fd
    return fd


def tone(handle: int, hz: int) -> int:
    """Start a tone of ``hz`` (0: stop it); the bytes written."""
    fd = _fds[handle]
    now = time.time()
    event = INPUT_EVENT.pack(int(now), int((now % 1) * 1_000_000), EV_SND, SND_TONE, hz)
    return os.write(fd, event)


def close_device(handle: int) -> None:
    os.close(_fds.pop(handle))
