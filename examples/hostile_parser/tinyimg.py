"""A tiny image-header parser with the kind of bugs real decoders have.

Format: b"TIMG" | u16 width | u16 height | u8 channels | u8 flags | payload.
flags bit 0: payload is run-length encoded as (count, byte) pairs.

Two deliberate bugs stand in for a parser's zero-days:
* a "fast path" trusts a 64-bit offset from the file and reads memory there
  through ctypes, as a C decoder trusting a header field would: a crafted
  file makes it read an unmapped address and the process dies of SIGSEGV;
* the RLE decoder never advances on a run of length 0: a crafted file makes
  it loop forever.
"""

from __future__ import annotations

import ctypes
import dataclasses
import struct
import zlib


@dataclasses.dataclass
class Header:
    width: int
    height: int
    channels: int
    checksum: int


def parse(data: bytes) -> Header:
    if len(data) < 10 or data[:4] != b"TIMG":
        raise ValueError("not a TIMG file")
    width, height, channels, flags = struct.unpack_from("<HHBB", data, 4)
    payload = data[10:]
    if flags & 0x80 and len(payload) >= 8:
        # "Fast path": the header carries a pointer hint. Never do this.
        (hint,) = struct.unpack_from("<Q", payload)
        payload = ctypes.string_at(hint, 16)
    if flags & 0x01:
        out = bytearray()
        i = 0
        while i + 1 < len(payload):
            count, byte = payload[i], payload[i + 1]
            out += bytes([byte]) * count
            if count:  # bug: a zero-length run never advances
                i += 2
        payload = bytes(out)
    return Header(width, height, channels, zlib.crc32(payload))
