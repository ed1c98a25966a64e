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

#: Extension codes whose payload is itself msgpack (``pycompart.wire.refs``:
#: EXT_TUPLE, SET, FROZENSET, COMPLEX, DICT, REF, YOURS, PATH, SLICE, STD,
#: CONTAINER, PUSHBACK, FD, BULK), walked too. Any other payload is raw
#: bytes (a big int's digits, a bytearray, a builtin's name, a str with
#: lone surrogates, msgspec's timestamps) or empty, and is skipped.
MSGPACK_EXTENSIONS = frozenset({1, 2, 3, 5, 7, 10, 11, 12, 15, 17, 19, 20, 21, 22})
#: msgspec's timestamp extension (-1, as a byte): a datetime, which may be
#: a typed dict's key.
TIMESTAMP = 0xFF
#: refs.EXT_BIGINT (its digits) and refs.EXT_STD (a Decimal's or a
#: Fraction's digits, in its strs): parsing a number costs like building
#: objects (~20 ns a digit: 128 MiB of 4300-digit fractions held main
#: 2.7 s), so every so many digits count as one object more.
BIGINT, STD = 4, 17
DIGITS_PER_OBJECT = 16

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
_EXT_WIDTH = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_LENGTH = {0xC4: (_U8, 2), 0xD9: (_U8, 2), 0xC5: (_U16, 3), 0xDA: (_U16, 3),
           0xC6: (_U32, 5), 0xDB: (_U32, 5)}


class _Malformed(Exception):
    """What a walk found is not msgpack (the decoder would refuse it too)."""


# What one element is, for the walkers.
_PLAIN, _ALLOCATES, _ARRAY, _MAP, _EXT = range(5)


def _element(buf: memoryview, pos: int, end: int) -> tuple[int, int, int, int, int]:
    """The element at ``pos`` of a region ending at ``end``: (where it ends,
    kind, items for an array or map, extension code, payload start). Never
    past ``end``: a length that runs past it is malformed."""
    if pos >= end:
        raise _Malformed
    b = buf[pos]
    if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
        return pos + 1, _PLAIN, 0, 0, 0
    if b <= 0x8F:
        return pos + 1, _MAP, b & 0x0F, 0, 0
    if b <= 0x9F:
        return pos + 1, _ARRAY, b & 0x0F, 0, 0
    if b <= 0xBF:
        after = pos + 1 + (b & 0x1F)
    elif b in _LENGTH:
        unpack, head = _LENGTH[b]
        if pos + head > end:
            raise _Malformed
        after = pos + head + unpack(buf, pos + 1)[0]
    elif b in (0xDC, 0xDD, 0xDE, 0xDF):
        head = 3 if b in (0xDC, 0xDE) else 5
        if pos + head > end:
            raise _Malformed
        n = (_U16 if head == 3 else _U32)(buf, pos + 1)[0]
        return pos + head, _MAP if b in (0xDE, 0xDF) else _ARRAY, n, 0, 0
    elif b in _FIXED:
        after = pos + _FIXED[b]
    elif b in _FIXEXT or b in _EXT_WIDTH:
        if b in _FIXEXT:
            size, head = _FIXEXT[b], 2
        else:
            width = _EXT_WIDTH[b]
            if pos + 2 + width > end:
                raise _Malformed
            size = (_U8, _U16, _U32)[width // 2](buf, pos + 1)[0]
            head = 2 + width
        if pos + head > end:
            raise _Malformed
        after = pos + head + size
        if after > end:
            raise _Malformed
        return after, _EXT, 0, buf[pos + head - 1], pos + head
    else:
        raise _Malformed  # 0xc1, never used
    if after > end:
        raise _Malformed
    return after, _ALLOCATES, 0, 0, 0


def check(data: Any, limit: int, what: str = "a value") -> None:
    """Raise ``ProtocolError`` if decoding ``data`` (bytes, or anything with
    the buffer protocol, ``msgspec.Raw`` included) would build more than
    ``limit`` objects, or if it is not msgpack."""
    n = len(data)
    if n <= limit:
        return
    data = memoryview(data).cast("B")
    try:
        # A few big objects (a 64 MiB bytes value) are counted at once;
        # many small ones are bounded by their header bytes first.
        if count_objects(data, _QUICK) <= _QUICK:
            return
        if len(bytes(data).translate(None, _OTHER)) + n // DIGITS_PER_OBJECT <= limit:
            return
        count = count_objects(data, limit)
    except _Malformed:
        raise ProtocolError(f"{what} is not well-formed msgpack") from None
    if count > limit:
        raise ProtocolError(f"{what} would build more than {limit} objects when decoded "
                            f"({n} bytes; [app] max_message_objects)")


def count_objects(data: bytes | bytearray | memoryview, limit: int) -> int:
    """Objects that allocate in ``data`` (a msgpack stream, extension
    payloads included), counting up to just past ``limit``. Raises
    ``_Malformed`` for what is not msgpack."""
    buf = memoryview(data).cast("B")
    count = 0
    regions = [(0, len(buf), False)]
    while regions:
        pos, end, digits = regions.pop()
        while pos < end:
            begin = pos
            pos, kind, _, code, start = _element(buf, pos, end)
            if kind == _PLAIN:
                continue
            count += 1
            if digits and kind == _ALLOCATES:
                count += (pos - begin) // DIGITS_PER_OBJECT  # a number's digits, parsed
            if count > limit:
                return count
            if kind == _EXT:
                if code == BIGINT:
                    count += (pos - start) // DIGITS_PER_OBJECT
                elif code in MSGPACK_EXTENSIONS and start < pos:
                    regions.append((start, pos, code == STD))
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
    payloads included) has a key that is an array, a map or an extension
    (a timestamp apart), or if it is not msgpack."""
    if len(data) <= KEY_CHECK_BYTES:
        return
    buf = memoryview(data).cast("B")
    try:
        if count_objects(buf, _QUICK) <= _QUICK:
            return  # a few big objects (a 64 MiB bytes value): no map of many keys
        if not bytes(buf).translate(None, _NOT_BIG_MAP):
            return
        bad = _bad_map_key(buf)
    except _Malformed:
        raise ProtocolError(f"{what} is not well-formed msgpack") from None
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
            at_key = False
            if frames:
                top = frames[-1]
                at_key = top[1] and top[2] % 2 == 0
                top[2] += 1
                top[0] -= 1
                if top[0] == 0:
                    frames.pop()
            pos, kind, n, code, start = _element(buf, pos, end)
            if at_key and (kind in (_ARRAY, _MAP) or (kind == _EXT and code != TIMESTAMP)):
                return True
            if kind in (_ARRAY, _MAP) and n:
                frames.append([2 * n if kind == _MAP else n, kind == _MAP, 0])
            elif kind == _EXT and code in MSGPACK_EXTENSIONS and start < pos:
                regions.append((start, pos))
        if frames:
            raise _Malformed  # a container the region ends inside
    return False
