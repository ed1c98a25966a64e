"""Bulk lanes: large values beside the byte stream, in shared memory.

A ``bytes``, ``bytearray`` or ``memoryview`` of ``BULK_MIN`` bytes or more,
as a top-level argument or the result of a typed entrypoint, is not pushed
through a pipe 64 KiB at a time. A channel between main and an instance has a
sealed memory file (``kernel.memfd``) of two *lanes*, one per direction. The
sender copies the value into its lane and sends a small frame whose header
counts the lane's segments; the receiver copies every segment out, into
``bytes`` of its own, the moment it reads that header, and only then decodes
or checks anything. The sender can go on writing to the lane (an instance is
never trusted): that changes nothing the receiver looked at. Shared memory
read in place is a time-of-check-to-time-of-use hole; copied out first, it is
message passing with one copy fewer.

Lane layout (little endian, offsets from the lane's start)::

    0     u64  frames whose segments the receiver has copied out (receiver writes)
    64    16 x (u64 offset, u64 length): the frame in flight's segments (sender writes)
    4096  data

The sender writes a lane only when every frame it sent through it has been
copied out (the count at 0 equals its own); otherwise the value goes inline,
in the frame. A peer that lies about the count only garbles what is sent to
itself. Lanes are mapped once per channel and keep their pages, so a big value
costs a copy each way and no fresh page faults.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence

from .. import fastpaths
from ..kernel import memfd
from ..wire.contract import BULK_MIN
from ..wire.protocol import MAX_BULK_PER_FRAME as MAX_SEGMENTS

#: Off with ``PYCOMPART_FASTPATHS`` naming others (``pycompart.fastpaths``).
ENABLED = fastpaths.enabled("bulk")

#: Where a lane's data starts (the header's page before it).
DATA_START = 4096
#: Largest lane, whatever the message size allows.
MAX_LANE = 128 * 1024**2

_COUNT = struct.Struct("<Q")
_TABLE = 64
_PAGE = mmap.PAGESIZE


def lane_size(max_message: int, memory: int | None) -> int:
    """Bytes per lane for a compartment: room for the largest message, but
    at most an eighth of its address-space limit (both lanes are mapped in
    the instance) and ``MAX_LANE``; 0 means no lanes."""
    size = min(max_message + DATA_START, MAX_LANE)
    if memory is not None:
        size = min(size, memory // 8)
    size -= size % _PAGE
    return size if size >= DATA_START + BULK_MIN else 0


def create(size: int) -> int:
    """Main: the memory file for one instance's two lanes of ``size`` bytes."""
    return memfd.create_sealed("pycompart-bulk", 2 * size)


class Lanes:
    """One end's view of a channel's two lanes, mapped from the memory file
    ``fd`` (which it closes: the mapping holds the file). ``side`` 0 is
    main's end (it sends in the first lane), 1 the instance's."""

    def __init__(self, fd: int, side: int):
        try:
            total = os.fstat(fd).st_size
            size = total // 2
            if size < DATA_START + BULK_MIN or size % _PAGE:
                raise ValueError(f"bulk memory file of {total} bytes is not two lanes")
            self._map = mmap.mmap(fd, 2 * size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.size = size
        self._view = memoryview(self._map)
        self._out = 0 if side == 0 else size
        self._in = size if side == 0 else 0
        self._sent = 0  # frames sent through our lane
        self._copied = 0  # frames copied out of theirs

    # -- sending ---------------------------------------------------------------

    def send(self, buffers: Sequence[memoryview]) -> bool:
        """Copy ``buffers`` (byte-format, contiguous) into our lane for the
        next frame; False when the lane is busy, too small or closed (send
        inline). One sender at a time: the channel's lane token
        (``Channel._place_bulk``), not a lock in here, which a signal
        handler's exception could leave taken (raised as the lock's acquire
        returns) and then stall ``close`` in the monitor for ever."""
        if len(buffers) > MAX_SEGMENTS:
            return False
        if sum(b.nbytes for b in buffers) > self.size - DATA_START:
            return False
        view = self._view
        base = self._out
        try:
            if view is None or _COUNT.unpack_from(view, base)[0] != self._sent:
                return False  # the frame before is not copied out yet
            table: list[int] = []
            at = DATA_START
            for buf in buffers:
                n = buf.nbytes
                view[base + at:base + at + n] = buf
                table += (at, n)
                at += n
            struct.pack_into(f"<{len(table)}Q", view, base + _TABLE, *table)
        except ValueError:
            return False  # (closed meanwhile: the view was released)
        self._sent += 1
        return True

    def unsend(self) -> None:
        """The frame the last ``send`` was for did not go out."""
        self._sent -= 1

    # -- receiving -------------------------------------------------------------

    def receive(self, count: int | None, limit: int) -> list[bytes]:
        """Copy out the ``count`` segments of the frame just read, at most
        ``limit`` bytes in all; ``None``: pass them by unread. ``ValueError``
        if the table is impossible."""
        if count is None:
            self._copied += 1
            if self._view is not None:
                _COUNT.pack_into(self._view, self._in, self._copied)
            return []
        if not 0 < count <= MAX_SEGMENTS:
            raise ValueError(f"a frame names {count} bulk segments (at most {MAX_SEGMENTS})")
        view = self._view
        if view is None:
            raise ValueError("the bulk lanes are closed")
        base = self._in
        # Read once: the values checked are the values used.
        table = struct.unpack_from(f"<{2 * count}Q", view, base + _TABLE)
        total = 0
        out: list[bytes] = []
        for i in range(count):
            at, n = table[2 * i], table[2 * i + 1]
            if at < DATA_START or at > self.size or n > self.size - at:
                raise ValueError(f"bulk segment {i} ({n} bytes at {at}) lies outside the "
                                 f"{self.size}-byte lane")
            total += n
            if total > limit:
                raise ValueError(f"bulk segments of more than {limit} bytes")
            out.append(bytes(view[base + at:base + at + n]))
        self._copied += 1
        _COUNT.pack_into(view, base, self._copied)
        return out

    def close(self) -> None:
        view, self._view = self._view, None
        if view is not None:
            try:
                view.release()
                self._map.close()
            except BufferError:
                pass  # a sender's copy holds it this moment: unmapped when freed
