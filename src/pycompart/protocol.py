"""The wire protocol, sans-IO (in the manner of h11).

Nothing here touches a socket. Bytes (and file descriptors) go in through
``Connection.receive_data``; events come out of ``Connection.next_event``;
``Connection.send_*`` return the bytes to write. That keeps the trusted parser
small and lets the tests fuzz it without processes.

Frame layout (little endian)::

    u32 payload length | u16 number of fds | u16 reserved (must be 0) | payload

The payload is one msgpack message, a tagged array (see the ``Message``
structs). A frame longer than the connection's ``max_frame`` is refused before
a single byte of it is buffered. File descriptors travel beside the bytes
(SCM_RIGHTS) where the transport can carry them; the header says how many
belong to the frame so a reader can pair them up.

Both ends of a connection may send calls: a caller's reply path and, later,
callbacks use the same channel. Each side tracks the ids it is waiting on and
the ids it owes a reply for; anything else is a protocol violation, counted
and reported as an event, never an exception that kills the reader.
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
from typing import Any, Union

import msgspec

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<IHH")
MAX_FDS_PER_FRAME = 64

# -- messages ---------------------------------------------------------------


class ErrorInfo(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """An exception raised on the far side, described, never pickled."""

    type_name: str
    message: str
    args: list[Union[str, int, float, bool, None]]
    traceback: str


class Hello(msgspec.Struct, array_like=True, tag=0):
    """First frame an instance sends: it is set up and serving."""

    version: int
    pid: int
    compartment: str
    entrypoints: list[str]


class Call(msgspec.Struct, array_like=True, tag=1):
    id: int
    entrypoint: str
    args: msgspec.Raw


class Ok(msgspec.Struct, array_like=True, tag=2):
    id: int
    value: msgspec.Raw


class Err(msgspec.Struct, array_like=True, tag=3):
    id: int
    error: ErrorInfo


class Cancel(msgspec.Struct, array_like=True, tag=4):
    id: int


class Abort(msgspec.Struct, array_like=True, tag=5):
    """An instance that cannot start says why before it exits."""

    error: ErrorInfo


Message = Union[Hello, Call, Ok, Err, Cancel, Abort]

# -- events that are not messages ---------------------------------------------


class NeedData:
    """``next_event`` has nothing more until more bytes arrive."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class Violation(msgspec.Struct, frozen=True):
    """The peer broke the protocol. ``fatal`` means the byte stream can no
    longer be trusted (framing is lost) and the connection must be dropped;
    otherwise the offending message was discarded and reading goes on.
    ``id`` is the request the violation concerns, when known."""

    reason: str
    fatal: bool
    id: int | None = None


class LateReply(msgspec.Struct, frozen=True):
    """The reply to a call this side cancelled arrived after all: the far
    side did yield. Not a violation; the value is discarded."""

    id: int


class FrameReceived(msgspec.Struct):
    """A decoded message with the file descriptors that came with it."""

    message: Any
    fds: list[int]
    size: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_frame(payload: bytes, nfds: int = 0) -> bytes:
    return HEADER.pack(len(payload), nfds, 0) + payload


class FrameDecoder:
    """Reassembles frames from a byte stream.

    ``want_buffer()`` lets a transport ``recv_into`` straight into the body of
    a large frame, so a 64 MiB argument is not copied once more here.
    """

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self._buf = bytearray()
        self._body: bytearray | None = None
        self._body_filled = 0
        self._body_nfds = 0
        self._fds: list[int] = []
        self.broken: str | None = None

    def receive_data(self, data: bytes | bytearray | memoryview, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            self._fds.extend(fds)
        if self._body is not None and data:
            n = min(len(data), len(self._body) - self._body_filled)
            self._body[self._body_filled:self._body_filled + n] = data[:n]
            self._body_filled += n
            data = data[n:]
        if data:
            self._buf += data

    def want_buffer(self, minimum: int = 65536) -> memoryview | None:
        """A writable view of the unfilled part of the current frame's body,
        if it is at least ``minimum`` bytes; the caller must then report what
        it wrote with ``body_written``."""
        if self._body is None or len(self._body) - self._body_filled < minimum:
            return None
        return memoryview(self._body)[self._body_filled:]

    def body_written(self, n: int) -> None:
        self._body_filled += n

    def next_frame(self) -> tuple[bytes | bytearray, list[int]] | NeedData | Violation:
        if self.broken is not None:
            return Violation(self.broken, fatal=True)
        if self._body is None:
            if len(self._buf) < HEADER.size:
                return NEED_DATA
            length, nfds, reserved = HEADER.unpack_from(self._buf)
            if reserved != 0:
                return self._break(f"frame header has reserved field {reserved:#x}, expected 0")
            if length > self.max_frame:
                return self._break(f"frame of {length} bytes exceeds the maximum of {self.max_frame}")
            if nfds > MAX_FDS_PER_FRAME:
                return self._break(f"frame claims {nfds} file descriptors, more than {MAX_FDS_PER_FRAME}")
            end = HEADER.size + length
            if len(self._buf) >= end:
                body = bytes(self._buf[HEADER.size:end])
                del self._buf[:end]
                return self._with_fds(body, nfds)
            self._body = bytearray(length)
            have = len(self._buf) - HEADER.size
            self._body[:have] = self._buf[HEADER.size:]
            self._body_filled = have
            self._body_nfds = nfds
            self._buf.clear()
        if self._body_filled < len(self._body):
            return NEED_DATA
        body, self._body = self._body, None
        return self._with_fds(body, self._body_nfds)

    def _with_fds(self, body: bytes | bytearray, nfds: int) -> tuple[bytes | bytearray, list[int]] | Violation:
        if nfds > len(self._fds):
            return self._break(f"frame claims {nfds} file descriptors but {len(self._fds)} arrived")
        fds, self._fds = self._fds[:nfds], self._fds[nfds:]
        return body, fds

    def _break(self, reason: str) -> Violation:
        self.broken = reason
        self.close_fds()
        return Violation(reason, fatal=True)

    def close_fds(self) -> None:
        """Close descriptors that arrived but were never claimed by a frame."""
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


class Connection:
    """One end of a channel: framing plus request/reply bookkeeping.

    Thread-safe for the pattern the runtime uses: any thread may call
    ``send_*``; one thread at a time calls ``receive_data``/``next_event``.
    """

    _ids = itertools.count(1)

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self.frames = FrameDecoder(max_frame)
        self._lock = threading.Lock()
        self.awaiting: set[int] = set()  # calls we sent, reply not yet seen
        self.owed: set[int] = set()  # calls we received, reply not yet sent
        self.cancelled: set[int] = set()  # calls we sent and gave up on
        self.violations = 0
        self.bytes_in = 0

    # -- sending --------------------------------------------------------------

    def send_call(self, entrypoint: str, args: bytes, nfds: int = 0) -> tuple[int, bytes]:
        rid = next(self._ids)
        payload = _encoder.encode(Call(rid, entrypoint, msgspec.Raw(args)))
        self._check_size(payload)
        with self._lock:
            self.awaiting.add(rid)
        return rid, encode_frame(payload, nfds)

    def send_ok(self, rid: int, value: bytes, nfds: int = 0) -> bytes:
        payload = _encoder.encode(Ok(rid, msgspec.Raw(value)))
        if len(payload) > self.max_frame:
            # The reply is too big: tell the caller instead of breaking the stream.
            return self.send_err(rid, ErrorInfo(
                "pycompart.ProtocolError", f"reply of {len(payload)} bytes exceeds the maximum "
                f"message size of {self.max_frame}", [], ""))
        self._settle(rid)
        return encode_frame(payload, nfds)

    def send_err(self, rid: int, info: ErrorInfo) -> bytes:
        payload = _encoder.encode(Err(rid, info))
        if len(payload) > self.max_frame:
            info = ErrorInfo(info.type_name[:200], info.message[:1000], [], "")
            payload = _encoder.encode(Err(rid, info))
        self._settle(rid)
        return encode_frame(payload)

    def send_cancel(self, rid: int) -> bytes:
        with self._lock:
            if rid in self.awaiting:
                self.cancelled.add(rid)
        return encode_frame(_encoder.encode(Cancel(rid)))

    @staticmethod
    def send_hello(pid: int, compartment: str, entrypoints: list[str]) -> bytes:
        return encode_frame(_encoder.encode(Hello(PROTOCOL_VERSION, pid, compartment, entrypoints)))

    @staticmethod
    def send_abort(info: ErrorInfo) -> bytes:
        return encode_frame(_encoder.encode(Abort(info)))

    def _check_size(self, payload: bytes) -> None:
        if len(payload) > self.max_frame:
            from .errors import ProtocolError

            raise ProtocolError(f"message of {len(payload)} bytes exceeds the maximum message "
                                f"size of {self.max_frame} (set [app] max_message_size)")

    def _settle(self, rid: int) -> None:
        with self._lock:
            self.owed.discard(rid)

    def forget(self, rid: int) -> None:
        """The caller stopped waiting for ``rid`` (timed out and the reply
        arrived, or the connection is being torn down)."""
        with self._lock:
            self.awaiting.discard(rid)
            self.cancelled.discard(rid)

    # -- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, fds: list[int] | tuple[int, ...] = ()) -> None:
        self.bytes_in += len(data)
        self.frames.receive_data(data, fds)

    def next_event(self) -> FrameReceived | LateReply | NeedData | Violation:
        frame = self.frames.next_frame()
        if isinstance(frame, (NeedData, Violation)):
            if isinstance(frame, Violation):
                self.violations += 1
            return frame
        body, fds = frame
        try:
            msg = _decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            _close_all(fds)
            self.violations += 1
            # The frame boundary is intact, but a peer that sends garbage is
            # not following the protocol; the runtime treats this as fatal.
            return Violation(f"malformed message: {exc}", fatal=True)
        with self._lock:
            if isinstance(msg, Call):
                if msg.id in self.owed:
                    self.violations += 1
                    _close_all(fds)
                    return Violation(f"duplicate call id {msg.id}", fatal=True)
                self.owed.add(msg.id)
            elif isinstance(msg, (Ok, Err)):
                if msg.id not in self.awaiting:
                    self.violations += 1
                    _close_all(fds)
                    return Violation(f"reply for unknown call id {msg.id}", fatal=False)
                self.awaiting.discard(msg.id)
                if msg.id in self.cancelled:
                    # A late reply to a call we gave up on: expected, not a violation.
                    self.cancelled.discard(msg.id)
                    _close_all(fds)
                    return LateReply(msg.id)
        return FrameReceived(msg, fds, len(body))

    def close(self) -> None:
        self.frames.close_fds()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
