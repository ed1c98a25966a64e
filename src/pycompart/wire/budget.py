"""What one message may cost the receiver: a bound on objects, not only bytes.

A frame's size bounds bytes on the wire, not what decoding them builds: an
empty msgpack array is one byte and a Python list of ~60, so a 29 MiB reply
of empty lists took main from 21 MiB to 2 GiB. ``check`` counts the objects
a msgpack value would allocate, without building any, and refuses a value
with more than ``limit`` before the decoder sees it.

Cheap first: every msgpack object takes at least one byte, so a value of at
most ``limit`` bytes passes at once; a bigger one is counted only if the
bytes that can start an allocating object (containers, strings, binaries,
extensions, floats, wide ints) are more than ``limit``. Only then is it
walked, object by object (binaries and strings skipped by their length), and
the walk stops as soon as the count passes the limit. Extension payloads are
msgpack themselves (``pycompart.wire.refs``), except big ints and bytearrays,
and are walked too.
"""

from __future__ import annotations

import struct
from typing import Any

from ..errors import ProtocolError

#: Objects one message may make the receiver allocate (``[app]
#: max_message_objects``): ~60-100 bytes each, so ~100 MB at the most.
DEFAULT_MAX_OBJECTS = 1_000_000

#: Extension codes whose payload is raw bytes, not msgpack (refs.EXT_BIGINT,
#: refs.EXT_BYTEARRAY).
RAW_EXTENSIONS = frozenset({4, 6})

# Bytes that may begin an object that allocates: fixmap, fixarray, fixstr
# (0x80-0xbf), bin/ext/float/uint/int/fixext/str/array/map (0xc4-0xdf).
_ALLOCATING = bytes(range(0x80, 0xC0)) + bytes(range(0xC4, 0xE0))
_OTHER = bytes(b for b in range(256) if b not in _ALLOCATING)

#: Objects walked before falling back to the cheap bound.
_QUICK = 64

_U8 = struct.Struct(">B").unpack_from
_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from

# Fixed sizes (header included) of scalar types that carry no length.
_FIXED = {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}


def check(data: Any, limit: int, what: str = "a value") -> None:
    """Raise ``ProtocolError`` if decoding ``data`` (bytes, or anything with
    the buffer protocol, ``msgspec.Raw`` included) would build more than
    ``limit`` objects."""
    n = len(data)
    if n <= limit:
        return
    data = memoryview(data).cast("B")
    try:
        # A few big objects (a 64 MiB bytes value) are counted at once;
        # many small ones are bounded by their header bytes first.
        if count_objects(data, _QUICK) <= _QUICK:
            return
        if len(bytes(data).translate(None, _OTHER)) <= limit:
            return
        count = count_objects(data, limit)
    except (struct.error, IndexError):
        return  # truncated: the decoder refuses it as malformed
    if count > limit:
        raise ProtocolError(f"{what} would build more than {limit} objects when decoded "
                            f"({n} bytes; [app] max_message_objects)")


def _past_extension(buf: memoryview, pos: int, end: int, regions: list[tuple[int, int]]) -> int:
    """Where the extension at ``pos`` ends; its payload, if msgpack, is
    added to ``regions`` to walk."""
    b = buf[pos]
    if b in _FIXEXT:
        size, head = _FIXEXT[b], 2
    else:
        width = {0xC7: 1, 0xC8: 2, 0xC9: 4}[b]
        size = (_U8, _U16, _U32)[width // 2](buf, pos + 1)[0]
        head = 2 + width
    code = buf[pos + head - 1]
    start = pos + head
    after = start + size
    if code not in RAW_EXTENSIONS and start < min(after, end):
        regions.append((start, min(after, end)))
    return after


def count_objects(data: bytes | bytearray | memoryview, limit: int) -> int:
    """Objects that allocate in ``data`` (a msgpack stream), counting up to
    just past ``limit``. Malformed input is left to the decoder to refuse."""
    buf = memoryview(data).cast("B")
    count = 0
    stack = [(0, len(buf))]
    while stack:
        pos, end = stack.pop()
        while pos < end:
            b = buf[pos]
            if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
                pos += 1
                continue
            count += 1
            if count > limit:
                return count
            if b <= 0x9F:  # fixmap, fixarray: their items follow inline
                pos += 1
            elif b <= 0xBF:  # fixstr
                pos += 1 + (b & 0x1F)
            elif b in (0xC4, 0xD9):  # bin8, str8
                pos += 2 + _U8(buf, pos + 1)[0]
            elif b in (0xC5, 0xDA):  # bin16, str16
                pos += 3 + _U16(buf, pos + 1)[0]
            elif b in (0xC6, 0xDB):  # bin32, str32
                pos += 5 + _U32(buf, pos + 1)[0]
            elif b in (0xDC, 0xDE):  # array16, map16
                pos += 3
            elif b in (0xDD, 0xDF):  # array32, map32
                pos += 5
            elif b in _FIXED:
                pos += _FIXED[b]
            elif b in _FIXEXT or b in (0xC7, 0xC8, 0xC9):
                pos = _past_extension(buf, pos, end, stack)
            else:
                return count  # 0xc1 (never used): malformed, the decoder says so
    return count


# -- keys a map may have -----------------------------------------------------------
# pycompart's codec sends a dict with keys other than plain scalars as an
# extension (refs.EXT_DICT, whose keys are hashed and counted before the
# dict is built: refs.spread), never as a msgpack map. msgspec decodes a
# map's array keys as tuples and hashes them as it reads, in C, holding the
# GIL: a peer's map of tuples that share one hash (tuple hashes are the
# same in every process) is quadratic there. So a map key that is an
# array, a map or an extension is refused before the decoder sees it.

#: Bytes past which a message is walked for such keys (below it, the worst
#: a map of colliding keys can cost is ~30 ms).
KEY_CHECK_BYTES = 16 * 1024
# Bytes that may begin a map of 16 entries or more (map16, map32): a
# message without any has none worth checking (a fixmap's at most 15 keys
# cost little however they collide).
_NOT_BIG_MAP = bytes(b for b in range(256) if b not in (0xDE, 0xDF))


def check_map_keys(data: Any, what: str = "a value") -> None:
    """Raise ``ProtocolError`` if a map in ``data`` (msgpack, extension
    payloads included) has a key that is an array, a map or an extension."""
    if len(data) <= KEY_CHECK_BYTES:
        return
    buf = memoryview(data).cast("B")
    try:
        if count_objects(buf, _QUICK) <= _QUICK:
            return  # a few big objects (a 64 MiB bytes value): no map of many keys
        if not bytes(buf).translate(None, _NOT_BIG_MAP):
            return
        bad = _bad_map_key(buf)
    except (struct.error, IndexError):
        return  # truncated: the decoder refuses it as malformed
    if bad:
        raise ProtocolError(f"{what} has a map whose key is an array, a map or an extension "
                            "(pycompart never sends one)")


def _bad_map_key(buf: memoryview) -> bool:
    regions = [(0, len(buf))]
    while regions:
        pos, end = regions.pop()
        # Per open container: [items left, is a map, index of the next item].
        frames: list[list[Any]] = []
        while pos < end:
            b = buf[pos]
            if frames:
                top = frames[-1]
                at_key = top[1] and top[2] % 2 == 0
                top[2] += 1
                top[0] -= 1
                if top[0] == 0:
                    frames.pop()
            else:
                at_key = False
            if at_key and (0x80 <= b <= 0x9F or b in (0xDC, 0xDD, 0xDE, 0xDF, 0xC7, 0xC8, 0xC9)
                           or 0xD4 <= b <= 0xD8):
                return True
            if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
                pos += 1
            elif b <= 0x9F:  # fixmap, fixarray
                n = b & 0x0F
                is_map = b <= 0x8F
                pos += 1
                if n:
                    frames.append([2 * n if is_map else n, is_map, 0])
            elif b <= 0xBF:
                pos += 1 + (b & 0x1F)
            elif b in (0xC4, 0xD9):
                pos += 2 + _U8(buf, pos + 1)[0]
            elif b in (0xC5, 0xDA):
                pos += 3 + _U16(buf, pos + 1)[0]
            elif b in (0xC6, 0xDB):
                pos += 5 + _U32(buf, pos + 1)[0]
            elif b in (0xDC, 0xDE):
                n = _U16(buf, pos + 1)[0]
                pos += 3
                if n:
                    frames.append([2 * n if b == 0xDE else n, b == 0xDE, 0])
            elif b in (0xDD, 0xDF):
                n = _U32(buf, pos + 1)[0]
                pos += 5
                if n:
                    frames.append([2 * n if b == 0xDF else n, b == 0xDF, 0])
            elif b in _FIXED:
                pos += _FIXED[b]
            elif b in _FIXEXT or b in (0xC7, 0xC8, 0xC9):
                pos = _past_extension(buf, pos, end, regions)
            else:
                return False  # 0xc1: malformed, the decoder says so
    return False
