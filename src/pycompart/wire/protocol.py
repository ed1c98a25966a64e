"""The wire protocol, sans-IO (in the manner of h11).

Nothing here touches a socket. Bytes (and file descriptors) go in through
``Connection.receive_data``; events come out of ``Connection.next_event``;
``Connection.send_*`` return the bytes to write. That keeps the trusted parser
small and lets the tests fuzz it without processes.

Frame layout (little endian)::

    u32 payload length | u16 number of fds | u16 number of bulk segments | payload

The payload is one msgpack message, a tagged array (see the ``Message``
structs), or a top-level call or its reply in *compact form*: a fixed binary
envelope, then the value's msgpack::

    call:  0xC1 0x01 | u64 id | u64 parent | u8 concurrent | u16 n | entrypoint (n bytes, UTF-8) | args
    reply: 0xC1 0x02 | u64 id | value

0xC1 is the one byte msgpack never uses, so no msgpack message starts with
it. The call gate's native byte loop (``pycompart.transport.gate``) writes
and reads this envelope itself, so a typed call's hot path decodes and
encodes only its values. Main sends a typed call on a pipe in compact form
(``pycompart.fastpaths``: ``compact``); an instance answers a compact call it
serves directly in compact form; everything else is msgpack, and both forms
are read anywhere, the value checked to be exactly one msgpack object.

A frame longer than the connection's ``max_frame`` is refused before a
single byte of it is buffered. File descriptors travel beside the bytes
(SCM_RIGHTS) where the transport can carry them; the header says how many
belong to the frame so a reader can pair them up. Large values may travel in
shared memory beside the stream (``pycompart.transport.bulk``): the header
counts the segments, which the reader copies out through ``bulk_source``
before the message is decoded; without a bulk source the count must be 0.

Both ends of a connection may send calls: a caller's reply path and, later,
callbacks use the same channel. Each side tracks the ids it is waiting on and
the ids it owes a reply for; anything else is a protocol violation, counted
and reported as an event, never an exception that kills the reader.
"""

import itertools
import os
import struct
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Union

import msgspec

from ..errors import ProtocolError

PROTOCOL_VERSION = 2
HEADER = struct.Struct("<IHH")
#: The first byte of a compact call or reply (module docstring).
COMPACT = 0xC1
COMPACT_CALL = 1
COMPACT_OK = 2
#: A compact call's envelope, up to its entrypoint: marker, kind, id, parent,
#: concurrent, entrypoint length; a compact reply's: marker, kind, id.
CALL_ENVELOPE = struct.Struct("<BBQQBH")
OK_ENVELOPE = struct.Struct("<BBQ")
#: A compact call's and a compact reply's whole frame up to the entrypoint
#: and the value (header and envelope).
CALL_FRAME = struct.Struct("<IHHBBQQBH")
OK_FRAME = struct.Struct("<IHHBBQ")
MAX_FDS_PER_FRAME = 16
MAX_BULK_PER_FRAME = 16

# -- messages ---------------------------------------------------------------


#: Bounds on what an error description may hold, checked by the decoder
#: before it allocates (the sender truncates to them: ``wire.exceptions``).
MAX_ERROR_TEXT = 64 * 1024
MAX_ERROR_VALUE = 4096
_Name = Annotated[str, msgspec.Meta(max_length=200)]
_Text = Annotated[str, msgspec.Meta(max_length=MAX_ERROR_TEXT)]


class Blob(msgspec.Struct, array_like=True):
    """A ``bytes`` value among the simple values of an ``ErrorInfo``
    (msgspec unions hold one string-like type; this keeps ``str`` apart)."""

    data: Annotated[bytes, msgspec.Meta(max_length=MAX_ERROR_VALUE)]


#: An exception argument or attribute as it may cross.
Simple = Union[Annotated[str, msgspec.Meta(max_length=MAX_ERROR_VALUE)], int, float, bool, None, Blob]


class ErrorInfo(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """An exception raised on the far side, described, never pickled."""

    type_name: _Name
    message: _Text
    args: Annotated[list[Simple], msgspec.Meta(max_length=16)]
    traceback: _Text
    #: Qualified names of the exception's classes, most derived first. The
    #: receiver may build stand-in classes from them (``pycompart.frontend.proxy``),
    #: never import them.
    mro: Annotated[list[_Name], msgspec.Meta(max_length=32)] = []
    #: Public instance attributes with simple values (``exc.problem``,
    #: ``exc.lineno``; an ``OSError``'s ``errno``, ``strerror``, ``filename``
    #: and ``filename2``), set on the exception the receiver raises.
    attributes: Annotated[dict[Annotated[str, msgspec.Meta(max_length=100)], Simple],
                          msgspec.Meta(max_length=40)] = {}
    #: A handle of the sender's exception class, exported to the receiver
    #: (0: none): the receiver's stand-in of that class is the one raised.
    origin: int = 0
    #: It was raised ``from None``: the receiver's copy shows no cause either.
    suppress: bool = False


class Hello(msgspec.Struct, array_like=True, tag=0):
    """First frame an instance sends: it is set up and serving."""

    version: int
    pid: int
    compartment: Annotated[str, msgspec.Meta(max_length=64)]
    entrypoints: Annotated[list[Annotated[str, msgspec.Meta(max_length=1000)]], msgspec.Meta(max_length=100_000)]
    #: It mapped the bulk lanes it was given (``transport.bulk``).
    bulk: bool = False


class Call(msgspec.Struct, array_like=True, tag=1):
    """``parent`` is 0 for a top-level call. Otherwise it is the id of a call
    the *receiver* sent and is still waiting on: this call is nested inside
    it (a callback, or a call made by a callback), and the receiver's thread
    that waits on ``parent`` runs it. That is what lets A call B, B call back
    into A, and A call B again, with no extra threads and no deadlock."""

    id: int
    entrypoint: str
    args: msgspec.Raw
    parent: int = 0
    #: Made by another thread of the sender than the one running ``parent``
    #: (a worker thread of a compartment, during main's call): the receiver
    #: runs it on a thread of its own (``CallServer.concurrent``), since the
    #: thread waiting on ``parent`` may be needed for what comes next.
    concurrent: bool = False


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


#: Handles one Release frame may name (a sender splits longer lists).
MAX_RELEASES = 65536


class Release(msgspec.Struct, array_like=True, tag=6):
    """The sender dropped its last proxy of each ``(handle, count)``: the
    owner may forget ``count`` exports of ``handle`` (see ``pycompart.wire.refs``).
    Needs no reply."""

    handles: Annotated[list[tuple[int, int]], msgspec.Meta(max_length=MAX_RELEASES)]


#: Bytes one Output frame may carry (a writer splits longer output).
MAX_OUTPUT = 64 * 1024


class Output(msgspec.Struct, array_like=True, tag=7):
    """What an instance wrote to its stdout (``stream`` 1) or stderr (2)
    while serving a call, sent before the reply so that main writes it
    where and when the program expects (``sys.stdout`` at that moment, in
    order with its own output). Needs no reply."""

    stream: Annotated[int, msgspec.Meta(ge=1, le=2)]
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_OUTPUT)]


#: Warnings one call may report (the sender drops the rest, and repeats).
MAX_WARNINGS = 100


class Warn(msgspec.Struct, array_like=True, tag=8):
    """A warning an instance's code issued while serving call ``call``,
    sent before the reply so that the caller re-issues it, through its own
    warning filters, as the call returns. ``mro``: the category's classes
    (qualified names, most derived first), for the receiver to pick a
    category it knows; ``at_caller``: the warning points at the caller of
    the compartment's code (``stacklevel`` reached the call gate), so the
    receiver puts its own call site there. Needs no reply."""

    call: int
    mro: Annotated[list[_Name], msgspec.Meta(min_length=1, max_length=32)]
    message: Annotated[str, msgspec.Meta(max_length=MAX_ERROR_VALUE)]
    filename: Annotated[str, msgspec.Meta(max_length=1000)]
    lineno: Annotated[int, msgspec.Meta(ge=0, lt=2**31)]
    module: _Name
    at_caller: bool


Message = Union[Hello, Call, Ok, Err, Cancel, Abort, Release, Output, Warn]

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


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)
#: Checks that a compact message's value is exactly one msgpack object (as a
#: msgpack message's ``Raw`` fields are), and returns a view of it.
_raw_value = msgspec.msgpack.Decoder(msgspec.Raw).decode


def _compact(body: bytes | bytearray | memoryview) -> Call | Ok:
    """A compact call or reply (module docstring); ``ValueError`` or
    msgspec's ``DecodeError`` if it is not one."""
    n = len(body)
    kind = body[1] if n > 1 else 0
    if kind == COMPACT_OK and n >= OK_ENVELOPE.size:
        return Ok(OK_ENVELOPE.unpack_from(body)[2], _raw_value(memoryview(body)[OK_ENVELOPE.size:]))
    if kind == COMPACT_CALL and n >= CALL_ENVELOPE.size:
        _, _, rid, parent, concurrent, length = CALL_ENVELOPE.unpack_from(body)
        start = CALL_ENVELOPE.size
        if concurrent > 1 or start + length > n:
            raise ValueError("malformed compact call")
        entrypoint = str(body[start:start + length], "utf-8")
        return Call(rid, entrypoint, _raw_value(memoryview(body)[start + length:]), parent, bool(concurrent))
    raise ValueError("malformed compact message")


def compact_ok_frame(rid: int, value: bytes) -> bytes:
    """The frame of a compact reply (what the native serve loop writes)."""
    return OK_FRAME.pack(OK_ENVELOPE.size + len(value), 0, 0, COMPACT, COMPACT_OK, rid) + value



def _text(value: Any) -> Any:
    if type(value) is str:
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode()
    return value


def _escaped(info: ErrorInfo) -> ErrorInfo:
    """``info`` with each str that msgpack cannot hold (lone surrogates: a
    file name ``os.fsdecode`` kept) escaped, ``\\udce9``: an error must
    always be describable, or the side sending it could not answer at all."""
    return ErrorInfo(_text(info.type_name), _text(info.message), [_text(a) for a in info.args],
                     _text(info.traceback), [_text(m) for m in info.mro],
                     {_text(k): _text(v) for k, v in info.attributes.items()},
                     **{f: getattr(info, f) for f in info.__struct_fields__[6:]})

def encode_frame(payload: bytes, nfds: int = 0) -> bytes:
    return HEADER.pack(len(payload), nfds, 0) + payload


class FrameDecoder:
    """Reassembles frames from a byte stream.

    Small frames are sliced out of the bytes received (the common case: one
    read holds one whole frame). For a large frame the decoder allocates the
    body once, and ``want_buffer()`` lets a transport read straight into it,
    so a 64 MiB argument is not copied once more here.
    """

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self._data = b""
        self._body: bytearray | None = None
        self._body_filled = 0
        self._body_nfds = 0
        self._body_nbulk = 0
        self._fds: list[int] = []
        self.broken: str | None = None
        #: Copies out a frame's bulk segments (``transport.bulk.Lanes.receive``
        #: bound to the frame limit), or (None) passes them by
        #: unread; unset: frames may name none.
        self.bulk_source: Callable[[int | None], list[bytes]] | None = None
        #: How many bulk segments the frame ``next_frame`` returned last names.
        self.last_nbulk = 0

    def receive_data(self, data: bytes | bytearray | memoryview, fds: list[int] | tuple[int, ...] = ()) -> None:
        if self.broken is not None:
            close_fds(list(fds))  # framing is lost: nothing after it is trusted
            return
        if fds:
            self._fds.extend(fds)
            if len(self._fds) > MAX_FDS_PER_FRAME:
                # More waiting than any one frame may claim: a peer piling up
                # descriptors no frame asks for (ours arrive with their frame).
                self._break(f"more than {MAX_FDS_PER_FRAME} descriptors arrived that no frame "
                            "claims")
                return
        if self._body is not None and data:
            n = min(len(data), len(self._body) - self._body_filled)
            self._body[self._body_filled:self._body_filled + n] = data[:n]
            self._body_filled += n
            data = data[n:]
        if data:
            self._data = self._data + bytes(data) if self._data else bytes(data)

    @property
    def buffered(self) -> int:
        return len(self._data) + (self._body_filled if self._body is not None else 0)

    @property
    def pending(self) -> bool:
        """Whether any bytes (or descriptors) wait here, or a frame has begun
        (its header read, none of its body yet): what comes next on the stream
        is not the start of a frame, so no fast path may read it as one."""
        return bool(self._data) or self._body is not None or bool(self._fds)

    def want_buffer(self, minimum: int = 65536) -> memoryview | None:
        """A writable view of the unfilled part of the current frame's body,
        if at least ``minimum`` bytes remain; report what was written into it
        with ``body_written``."""
        if self._body is None or len(self._body) - self._body_filled < minimum:
            return None
        return memoryview(self._body)[self._body_filled:]

    def body_written(self, n: int) -> None:
        self._body_filled += n

    def next_frame(self) -> tuple[bytes | bytearray, list[int]] | NeedData | Violation:
        if self.broken is not None:
            return Violation(self.broken, fatal=True)
        if self._body is None:
            data = self._data
            if len(data) < 8:
                return NEED_DATA
            length, nfds, nbulk = HEADER.unpack_from(data)
            if nbulk and (self.bulk_source is None or nbulk > MAX_BULK_PER_FRAME):
                return self._break(f"frame names {nbulk} bulk segments, but "
                                   + ("this channel has no bulk lanes" if self.bulk_source is None
                                      else f"at most {MAX_BULK_PER_FRAME} are allowed"))
            if length > self.max_frame:
                return self._break(f"frame of {length} bytes exceeds the maximum of {self.max_frame}")
            if nfds > MAX_FDS_PER_FRAME:
                return self._break(f"frame claims {nfds} file descriptors, more than {MAX_FDS_PER_FRAME}")
            end = 8 + length
            if len(data) >= end:
                body = data[8:end]
                self._data = data[end:]
                self.last_nbulk = nbulk
                if nfds or self._fds:
                    return self._with_fds(body, nfds)
                return body, _NO_FDS
            self._body = bytearray(length)
            have = len(data) - 8
            self._body[:have] = data[8:]
            self._body_filled = have
            self._body_nfds = nfds
            self._body_nbulk = nbulk
            self._data = b""
        if self._body_filled < len(self._body):
            return NEED_DATA
        body, self._body = self._body, None
        self.last_nbulk = self._body_nbulk
        return self._with_fds(body, self._body_nfds)

    def _with_fds(self, body: bytes | bytearray, nfds: int) -> tuple[bytes | bytearray, list[int]] | Violation:
        if nfds > len(self._fds):
            return self._break(f"frame claims {nfds} file descriptors but {len(self._fds)} arrived")
        if nfds == 0:
            return body, _NO_FDS
        fds, self._fds = self._fds[:nfds], self._fds[nfds:]
        return body, fds

    def _break(self, reason: str) -> Violation:
        self.broken = reason
        self._data = b""
        self._body = None
        self.last_nbulk = 0
        self.close_fds()
        return Violation(reason, fatal=True)

    def close_fds(self) -> None:
        """Close descriptors that arrived but were never claimed by a frame."""
        fds, self._fds = self._fds, []
        close_fds(fds)


_NO_FDS: list[int] = []


class MessageReader:
    """Frames of msgspec messages with their descriptors, for the small
    control streams (the zygote's, the edges'): sans-IO, bounded by
    ``max_frame``."""

    def __init__(self, decoder: msgspec.msgpack.Decoder, max_frame: int):  # type: ignore[type-arg]
        self.frames = FrameDecoder(max_frame)
        self._decoder = decoder

    def feed(self, data: bytes, fds: list[int]) -> None:
        self.frames.receive_data(data, fds)

    def messages(self) -> list[tuple[object, list[int]]]:
        """The complete messages so far. Raises ``ValueError`` naming what
        is wrong with a malformed one (the stream is then unusable; the
        descriptors that came with it are closed)."""
        out: list[tuple[object, list[int]]] = []
        while True:
            frame = self.frames.next_frame()
            if isinstance(frame, NeedData):
                return out
            if isinstance(frame, Violation):
                for _, got in out:
                    close_fds(got)
                raise ValueError(frame.reason)
            body, fds = frame
            try:
                out.append((self._decoder.decode(body), fds))
            except msgspec.DecodeError as exc:
                for _, got in out:
                    close_fds(got)
                close_fds(fds)
                raise ValueError(f"malformed control message: {exc}") from None

    def close(self) -> None:
        self.frames.close_fds()


class Connection:
    """One end of a channel: framing plus request/reply bookkeeping.

    Not thread-safe by itself; ``channel.Channel`` serializes access (one
    reader at a time; sends under its send lock). Set operations are atomic
    under the GIL, which is all the senders need.
    """

    def __init__(self, max_frame: int):
        self.max_frame = max_frame
        self.frames = FrameDecoder(max_frame)
        self.awaiting: set[int] = set()  # calls we sent, reply not yet seen
        self.owed: set[int] = set()  # calls we received, reply not yet sent
        self.cancelled: set[int] = set()  # calls we sent and gave up on
        self.violations = 0
        self.bytes_in = 0
        self._ids = itertools.count(1)
        self.last_id = 0  # the last call this side sent (how the monitor tells "idle")
        self._fds: list[int] = _NO_FDS
        #: The bulk values of the last message returned (``take_bulk``).
        self.bulk_values: list[bytes] | None = None
        #: The one kind of message that may come with bulk values: a typed
        #: call's reply (main's end, ``Ok``) or a typed call (an instance's, ``Call``).
        self.bulk_kind: type | None = None

    # -- sending --------------------------------------------------------------

    def send_call(self, entrypoint: str, args: bytes, nfds: int = 0, parent: int = 0,
                  concurrent: bool = False, nbulk: int = 0) -> tuple[int, bytes]:
        rid = self.new_call()
        return rid, self.call_frame(rid, entrypoint, args, nfds, parent, concurrent, nbulk)

    def new_call(self) -> int:
        """The id of a call about to be sent (its frame from ``call_frame``,
        or in compact form by ``transport.gate.call``), awaited from now on."""
        rid = self.last_id = next(self._ids)
        self.awaiting.add(rid)
        return rid

    def call_frame(self, rid: int, entrypoint: str, args: bytes, nfds: int = 0, parent: int = 0,
                   concurrent: bool = False, nbulk: int = 0) -> bytes:
        """The msgpack frame of call ``rid`` (no longer awaited if it is too
        big to send)."""
        payload = _encoder.encode(Call(rid, entrypoint, msgspec.Raw(args), parent, concurrent))
        if len(payload) > self.max_frame:
            self.awaiting.discard(rid)
            raise ProtocolError(f"message of {len(payload)} bytes exceeds the maximum message "
                                f"size of {self.max_frame} (set [app] max_message_size)")
        return HEADER.pack(len(payload), nfds, nbulk) + payload

    def reply_to(self, rid: int, value: bytes) -> Ok | Violation:
        """The reply to call ``rid`` that ``transport.gate.receive`` matched
        (a compact reply, all that was read), as ``_message`` takes it: a
        value that is not exactly one msgpack object, or a reply bigger than
        a frame may be, breaks the stream."""
        self.awaiting.discard(rid)
        self.bytes_in += HEADER.size + OK_ENVELOPE.size + len(value)
        if OK_ENVELOPE.size + len(value) > self.frames.max_frame:
            self.violations += 1
            return self.frames._break(f"frame of {OK_ENVELOPE.size + len(value)} bytes exceeds the "
                                      f"maximum of {self.frames.max_frame}")
        try:
            return Ok(rid, _raw_value(value))
        except Exception as exc:  # malformed, too deep: never raised on
            self.violations += 1
            return self.frames._break(f"malformed message: {exc}")

    def send_ok(self, rid: int, value: bytes, nfds: int = 0, nbulk: int = 0) -> bytes:
        payload = _encoder.encode(Ok(rid, msgspec.Raw(value)))
        if len(payload) > self.max_frame:
            # Too big to send: tell the caller instead of breaking the stream.
            return self.send_err(rid, ErrorInfo(
                "pycompart.ProtocolError", f"reply of {len(payload)} bytes exceeds the maximum "
                f"message size of {self.max_frame}", [], ""))
        self.owed.discard(rid)
        return HEADER.pack(len(payload), nfds, nbulk) + payload

    def send_err(self, rid: int, info: ErrorInfo) -> bytes:
        try:
            payload = _encoder.encode(Err(rid, info))
        except UnicodeEncodeError:  # a str with lone surrogates: msgpack cannot hold it
            info = _escaped(info)
            payload = _encoder.encode(Err(rid, info))
        if len(payload) > self.max_frame:
            payload = _encoder.encode(Err(rid, ErrorInfo(info.type_name[:200], info.message[:1000], [], "",
                                                         info.mro[:32], {})))
        self.owed.discard(rid)
        return encode_frame(payload)

    def send_cancel(self, rid: int) -> bytes:
        if rid in self.awaiting:
            self.cancelled.add(rid)
        return encode_frame(_encoder.encode(Cancel(rid)))

    @staticmethod
    def send_release(handles: list[tuple[int, int]]) -> bytes:
        return encode_frame(_encoder.encode(Release(handles)))

    @staticmethod
    def send_output(stream: int, data: bytes) -> bytes:
        return b"".join(encode_frame(_encoder.encode(Output(stream, data[i:i + MAX_OUTPUT])))
                        for i in range(0, len(data), MAX_OUTPUT))

    @staticmethod
    def send_warn(warn: Warn) -> bytes:
        return encode_frame(_encoder.encode(warn))

    @staticmethod
    def send_hello(pid: int, compartment: str, entrypoints: list[str], bulk: bool = False) -> bytes:
        return encode_frame(_encoder.encode(Hello(PROTOCOL_VERSION, pid, compartment, entrypoints, bulk)))

    @staticmethod
    def send_abort(info: ErrorInfo) -> bytes:
        return encode_frame(_encoder.encode(Abort(info)))

    def forget(self, rid: int) -> None:
        """Stop expecting a reply to ``rid`` (the call could not be sent)."""
        self.awaiting.discard(rid)
        self.cancelled.discard(rid)

    # -- receiving ------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, fds: list[int] | tuple[int, ...] = ()) -> None:
        self.bytes_in += len(data)
        self.frames.receive_data(data, fds)

    def next_event(self) -> Message | LateReply | NeedData | Violation:
        """The next message, or NEED_DATA, or a Violation. Descriptors that
        came with the message are collected by ``take_fds()``, its bulk
        values by ``take_bulk()``."""
        frame = self.frames.next_frame()
        if frame.__class__ is not tuple:
            if frame.__class__ is Violation:
                self.violations += 1
            return frame  # type: ignore[return-value]
        body, fds = frame  # type: ignore[misc]
        return self._message(body, fds)

    def receive_body(self, body: bytes) -> Message | LateReply | Violation:
        """The message of one whole frame that names neither descriptors
        nor bulk segments, its header already read and checked by the
        caller (``transport.gate.serve``)."""
        self.bytes_in += 8 + len(body)
        return self._message(body, _NO_FDS)

    def parse_one(self, data: bytes | memoryview) -> Message | LateReply | NeedData | Violation:
        """Fast path for a reader that just got ``data`` with nothing else
        buffered: one whole frame without descriptors is decoded straight
        from ``data``; anything else takes the general path."""
        frames = self.frames
        n = len(data)
        if n >= 8 and frames._body is None and not frames._data and not frames._fds and frames.broken is None:
            length, nfds, reserved = HEADER.unpack_from(data)
            if n == 8 + length and nfds == 0 and reserved == 0 and length <= frames.max_frame:
                self.bytes_in += n
                # A copy: decoded messages hold Raw views of their body, and
                # the reader reuses its buffer for the next read.
                return self._message(bytes(data[8:]), _NO_FDS)
        self.receive_data(data)
        return self.next_event()

    def _message(self, body: bytes | bytearray | memoryview, fds: list[int]) -> Message | LateReply | Violation:
        nbulk = self.frames.last_nbulk
        if nbulk:
            self.frames.last_nbulk = 0
            try:
                return self._bulk_message(body, fds, nbulk)
            except (ValueError, OSError, MemoryError) as exc:
                close_fds(fds)
                self.violations += 1
                return self.frames._break(f"bad bulk segments: {exc}")
        try:
            msg = _compact(body) if body and body[0] == COMPACT else _decoder.decode(body)
        except Exception as exc:  # malformed, mistyped, too deep (RecursionError): never raised on
            close_fds(fds)
            self.violations += 1
            # The frame boundary is intact, but a peer that sends garbage is
            # not following the protocol: nothing after it is trusted either.
            return self.frames._break(f"malformed message: {exc}")
        cls = msg.__class__
        if cls is Ok or cls is Err:
            rid = msg.id
            if rid not in self.awaiting:
                self.violations += 1
                close_fds(fds)
                return Violation(f"reply for unknown call id {rid}", fatal=False)
            self.awaiting.discard(rid)
            if self.cancelled and rid in self.cancelled:
                # A late reply to a call we gave up on: the far side did yield.
                self.cancelled.discard(rid)
                close_fds(fds)
                return LateReply(rid)
        elif cls is Call:
            if msg.id in self.owed:
                self.violations += 1
                close_fds(fds)
                return self.frames._break(f"duplicate call id {msg.id}")
            self.owed.add(msg.id)
        if fds:
            if cls is not Ok and cls is not Err and cls is not Call:
                close_fds(fds)  # only calls and replies carry values, hence descriptors
            else:
                close_fds(self._fds)  # never taken: not ours to keep
                self._fds = fds
        return msg

    def _bulk_message(self, body: bytes | bytearray | memoryview, fds: list[int],
                      nbulk: int) -> Message | LateReply | Violation:
        """A frame that names bulk segments. Only this end's ``bulk_kind``
        of message, awaited or top-level, has them copied out (after the
        frame, which is ours, was decoded; before the values are looked at);
        any other passes them by and breaks the stream."""
        source = self.frames.bulk_source
        assert source is not None
        msg = self._message(body, fds)
        cls = msg.__class__
        if cls is LateReply:
            source(None)  # a reply we gave up on: its values are not wanted
            return msg
        if cls is not self.bulk_kind or (cls is Call and msg.parent):  # type: ignore[union-attr]
            source(None)
            if cls is Call:
                self.owed.discard(msg.id)  # type: ignore[union-attr]
            close_fds(self.take_fds())
            raise ValueError(f"a {cls.__name__} message may not come with bulk values")
        self.bulk_values = source(nbulk)
        return msg

    def take_fds(self) -> list[int]:
        """Descriptors that arrived with the last message returned (the
        caller now owns them)."""
        fds, self._fds = self._fds, _NO_FDS
        return fds

    def take_bulk(self) -> list[bytes] | None:
        """The bulk values that came with the last message returned."""
        bulk, self.bulk_values = self.bulk_values, None
        return bulk

    def close(self) -> None:
        self.frames.close_fds()
        close_fds(self.take_fds())
        self.bulk_values = None


def leave_stack(stack: list[Any], entry: object) -> None:
    """Take ``entry`` off a thread's stack of open calls, by identity (it
    may be gone already). Code that must not be interrupted before the
    entry leaves pops it inline when it is on top (a function's entry is
    where a signal handler's exception can be raised), and calls this for
    anything else."""
    if stack and stack[-1] is entry:
        stack.pop()
        return
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is entry:
            del stack[i]
            return


def close_fds(fds: Iterable[int]) -> None:
    """Close descriptors we own, whatever state each is in. A list is
    emptied as they are closed, each taken out before it is closed: one that
    an interrupt (a signal handler's exception) stops half-way leaves in it
    only descriptors still open, so closing what is left later can never
    close a number that was reused meanwhile (it may leak one)."""
    if fds.__class__ is list:
        while fds:
            fd = fds.pop()  # type: ignore[attr-defined]
            try:
                os.close(fd)
            except OSError:
                pass
        return
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
