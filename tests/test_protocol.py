"""The sans-IO protocol, without processes."""

import os
import struct

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from pycompart.wire.protocol import (
    HEADER,
    PROTOCOL_VERSION,
    NEED_DATA,
    Call,
    Cancel,
    Connection,
    Err,
    ErrorInfo,
    Hello,
    LateReply,
    Ok,
    Violation,
    encode_frame,
)


def pair(max_frame=1 << 20):
    return Connection(max_frame), Connection(max_frame)


def drain(conn):
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, Violation) and ev.fatal:
            assert conn.next_event() == ev  # it stays broken
            break
    return out


def test_call_and_reply_round_trip():
    caller, callee = pair()
    rid, frame = caller.send_call("m:f", msgspec.msgpack.encode({"x": 1}))
    callee.receive_data(frame)
    [call] = drain(callee)
    assert isinstance(call, Call) and call.id == rid and call.entrypoint == "m:f"
    assert msgspec.msgpack.decode(call.args) == {"x": 1}
    assert rid in callee.owed
    caller.receive_data(callee.send_ok(rid, msgspec.msgpack.encode(5)))
    [ok] = drain(caller)
    assert isinstance(ok, Ok) and msgspec.msgpack.decode(ok.value) == 5
    assert not caller.awaiting and not callee.owed


def test_frames_split_byte_by_byte_and_coalesced():
    caller, callee = pair()
    frames = b"".join(caller.send_call(f"m:f{i}", b"\x80")[1] for i in range(3))
    for i in range(len(frames)):
        callee.receive_data(frames[i:i + 1])
    assert [c.entrypoint for c in drain(callee)] == ["m:f0", "m:f1", "m:f2"]
    callee2 = Connection(1 << 20)
    callee2.receive_data(frames)
    assert len(drain(callee2)) == 3


def test_parse_one_fast_path_matches_general_path():
    caller, callee = pair()
    rid, frame = caller.send_call("m:f", b"\x80")
    msg = callee.parse_one(memoryview(frame))
    assert isinstance(msg, Call) and msg.id == rid
    # A partial frame falls back to buffering.
    rid2, frame2 = caller.send_call("m:g", b"\x80")
    assert callee.parse_one(frame2[:5]) is NEED_DATA
    assert callee.parse_one(frame2[5:]).entrypoint == "m:g"


def test_large_frame_is_read_into_its_own_buffer():
    caller, callee = pair(max_frame=8 << 20)
    payload = msgspec.msgpack.encode(b"x" * (4 << 20))
    rid, frame = caller.send_call("m:f", payload)
    callee.receive_data(frame[:100])
    assert callee.next_event() is NEED_DATA
    pos = 100
    while (view := callee.frames.want_buffer(1)) is not None:
        n = min(len(view), 1 << 20)
        view[:n] = frame[pos:pos + n]
        callee.frames.body_written(n)
        pos += n
    assert pos == len(frame)
    [call] = drain(callee)
    assert msgspec.msgpack.decode(call.args) == b"x" * (4 << 20)


def test_oversized_frame_is_refused_before_buffering():
    _, callee = pair(max_frame=1024)
    callee.receive_data(struct.pack("<IHH", 10_000_000, 0, 0))
    ev = callee.next_event()
    assert isinstance(ev, Violation) and ev.fatal and "exceeds the maximum" in ev.reason
    assert callee.violations == 1
    # The connection stays broken: nothing after a lost frame boundary is trusted.
    callee.receive_data(encode_frame(msgspec.msgpack.encode(Cancel(1))))
    assert isinstance(callee.next_event(), Violation)


def test_sending_oversized_message_raises_protocol_error():
    from pycompart import ProtocolError

    caller = Connection(4096)
    with pytest.raises(ProtocolError, match="max_message_size"):
        caller.send_call("m:f", msgspec.msgpack.encode(b"x" * 10000))


def test_oversized_reply_becomes_an_error_reply():
    caller, callee = pair(max_frame=4096)
    rid, frame = caller.send_call("m:f", b"\x80")
    callee.receive_data(frame)
    drain(callee)
    caller.receive_data(callee.send_ok(rid, msgspec.msgpack.encode(b"x" * 10000)))
    [err] = drain(caller)
    assert isinstance(err, Err) and err.error.type_name == "pycompart.ProtocolError"


@pytest.mark.parametrize("body", [b"\xc1", b"\x93\x02", msgspec.msgpack.encode([99, 1]),
                                  msgspec.msgpack.encode([2, "id", b""]), msgspec.msgpack.encode({"a": 1})])
def test_malformed_messages_are_fatal_violations(body):
    _, callee = pair()
    callee.receive_data(encode_frame(body))
    ev = callee.next_event()
    assert isinstance(ev, Violation) and ev.fatal and callee.violations == 1


def test_reserved_header_bits_are_refused():
    _, callee = pair()
    callee.receive_data(HEADER.pack(1, 0, 7) + b"\xc0")
    ev = callee.next_event()
    assert isinstance(ev, Violation) and ev.fatal


def test_reply_for_unknown_id_is_counted_not_fatal():
    caller, callee = pair()
    caller.receive_data(encode_frame(msgspec.msgpack.encode(Ok(12345, msgspec.Raw(b"\x01")))))
    ev = caller.next_event()
    assert isinstance(ev, Violation) and not ev.fatal and caller.violations == 1


def test_duplicate_call_id_is_fatal():
    _, callee = pair()
    frame = encode_frame(msgspec.msgpack.encode(Call(7, "m:f", msgspec.Raw(b"\x80"))))
    callee.receive_data(frame + frame)
    first, second = drain(callee)
    assert isinstance(first, Call) and isinstance(second, Violation) and second.fatal


def test_late_reply_after_cancel():
    caller, callee = pair()
    rid, frame = caller.send_call("m:f", b"\x80")
    cancel = caller.send_cancel(rid)
    callee.receive_data(frame + cancel)
    call, c = drain(callee)
    assert isinstance(c, Cancel) and c.id == rid
    caller.receive_data(callee.send_ok(rid, b"\x01"))
    assert drain(caller) == [LateReply(rid)]
    assert caller.violations == 0 and not caller.awaiting and not caller.cancelled


def test_descriptors_are_paired_with_their_frame():
    caller, callee = pair()
    r, w = os.pipe()
    try:
        payload = msgspec.msgpack.encode(Call(1, "m:f", msgspec.Raw(b"\x80")))
        callee.receive_data(encode_frame(payload, nfds=1), [r])
        [call] = drain(callee)
        assert callee.take_fds() == [r] and callee.take_fds() == []
    finally:
        os.close(r)
        os.close(w)


def test_frame_claiming_missing_descriptors_is_fatal():
    _, callee = pair()
    payload = msgspec.msgpack.encode(Call(1, "m:f", msgspec.Raw(b"\x80")))
    callee.receive_data(encode_frame(payload, nfds=2))
    ev = callee.next_event()
    assert isinstance(ev, Violation) and ev.fatal and "descriptors" in ev.reason


def test_hello_and_error_info_round_trip():
    caller, _ = pair()
    caller.receive_data(Connection.send_hello(42, "parser", ["m:f"]))
    [hello] = drain(caller)
    assert hello == Hello(PROTOCOL_VERSION, 42, "parser", ["m:f"])
    caller2, callee = pair()
    rid, frame = caller2.send_call("m:f", b"\x80")
    callee.receive_data(frame)
    drain(callee)
    info = ErrorInfo("ValueError", "bad", ["bad"], "tb")
    caller2.receive_data(callee.send_err(rid, info))
    [err] = drain(caller2)
    assert err.error == info


def _fuzz_random_bytes(data, chunk):
    """Whatever a hostile peer sends, the reader returns events; it never
    raises and never buffers past the maximum."""
    conn = Connection(4096)
    conn.awaiting.update(range(1, 5))
    for i in range(0, len(data), chunk):
        conn.receive_data(data[i:i + chunk])
        for _ in range(100):
            ev = conn.next_event()
            if ev is NEED_DATA or (isinstance(ev, Violation) and ev.fatal):
                break
    assert conn.frames.buffered <= 4096 + 8 + len(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_fuzz_random_bytes_never_raise(data, chunk):
    """Whatever a hostile peer sends, the reader returns events; it never
    raises and never buffers past the maximum."""
    _fuzz_random_bytes(data, chunk)


@pytest.mark.slow
@settings(max_examples=20000, deadline=None)
@given(st.binary(max_size=4096), st.integers(min_value=1, max_value=512))
def test_fuzz_random_bytes_long(data, chunk):
    _fuzz_random_bytes(data, chunk)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-2, 2**40), st.text(max_size=20),
                          st.binary(max_size=40)), max_size=8))
def test_fuzz_well_framed_random_messages(items):
    conn = Connection(1 << 16)
    conn.awaiting.update(range(0, 6))
    for tag, rid, text, blob in items:
        body = msgspec.msgpack.encode([tag, rid, text, blob])
        conn.receive_data(encode_frame(body))
        ev = conn.next_event()
        assert ev is not NEED_DATA
        if isinstance(ev, Violation) and ev.fatal:
            break


# -- compact calls and replies (the call gate's envelope) ---------------------

from pycompart.wire.protocol import CALL_ENVELOPE, COMPACT, compact_ok_frame  # noqa: E402


def compact_call(rid, entrypoint, args, parent=0, concurrent=0):
    name = entrypoint.encode()
    return encode_frame(CALL_ENVELOPE.pack(COMPACT, 1, rid, parent, concurrent, len(name)) + name + args)


def test_compact_calls_and_replies_are_read_as_their_msgpack_twins():
    caller, callee = pair()
    rid = caller.new_call()
    callee.receive_data(compact_call(rid, "m:f", msgspec.msgpack.encode({"x": 1}), parent=0))
    [call] = drain(callee)
    assert call == Call(rid, "m:f", call.args, 0, False) and msgspec.msgpack.decode(call.args) == {"x": 1}
    assert rid in callee.owed
    callee.receive_data(compact_call(rid + 5, "m:g", b"\x80", parent=3, concurrent=1))
    [nested] = drain(callee)
    assert (nested.id, nested.parent, nested.concurrent) == (rid + 5, 3, True)
    caller.receive_data(compact_ok_frame(rid, msgspec.msgpack.encode([1, "two"])))
    [ok] = drain(caller)
    assert isinstance(ok, Ok) and ok.id == rid and msgspec.msgpack.decode(ok.value) == [1, "two"]
    assert not caller.awaiting
    # A call that could not go out compact goes as msgpack, with the same id.
    rid = caller.new_call()
    callee.receive_data(caller.call_frame(rid, "m:f", b"\x80"))
    assert drain(callee)[0].id == rid
    # The reply the native receive matched is taken as the decoder would.
    rid = caller.new_call()
    assert caller.reply_to(rid, b"\x01") == Ok(rid, msgspec.Raw(b"\x01")) and rid not in caller.awaiting


@pytest.mark.parametrize("body", [
    b"\xc1", b"\xc1\x01", b"\xc1\x02" + b"\0" * 7, b"\xc1\x03" + b"\0" * 30,
    CALL_ENVELOPE.pack(COMPACT, 1, 1, 0, 0, 10) + b"m:f",                       # name past the frame
    CALL_ENVELOPE.pack(COMPACT, 1, 1, 0, 2, 3) + b"m:f\x80",                    # concurrent = 2
    CALL_ENVELOPE.pack(COMPACT, 1, 1, 0, 0, 3) + b"m:f",                        # no arguments
    CALL_ENVELOPE.pack(COMPACT, 1, 1, 0, 0, 3) + b"m:f\x80\x80",                # two objects
    CALL_ENVELOPE.pack(COMPACT, 1, 1, 0, 0, 2) + b"\xff\xfe\x80",               # not UTF-8
    compact_ok_frame(1, b"\xc1")[8:], compact_ok_frame(1, b"")[8:], compact_ok_frame(1, b"\x01\x02")[8:],
])
def test_malformed_compact_messages_are_fatal_violations(body):
    caller, callee = pair()
    caller.new_call()
    for conn in (caller, callee):
        conn.receive_data(encode_frame(body))
        ev = conn.next_event()
        assert isinstance(ev, Violation) and ev.fatal and conn.violations == 1


def test_a_matched_reply_that_is_not_one_msgpack_object_or_too_big_breaks_the_stream():
    caller, _ = pair()
    rid = caller.new_call()
    ev = caller.reply_to(rid, b"\x01\x02")
    assert isinstance(ev, Violation) and ev.fatal and caller.violations == 1
    caller, _ = pair(max_frame=4096)
    rid = caller.new_call()
    assert isinstance(caller.reply_to(rid, msgspec.msgpack.encode(b"x" * 4080)), Ok)
    rid = caller.new_call()
    ev = caller.reply_to(rid, msgspec.msgpack.encode(b"x" * 5000))  # as the frame decoder refuses it
    assert isinstance(ev, Violation) and ev.fatal and "exceeds the maximum" in ev.reason


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=60), st.integers(0, 2**64 - 1), st.integers(0, 2))
def test_any_compact_body_is_a_message_or_a_violation(tail, rid, kind):
    caller, callee = pair()
    body = bytes([COMPACT, kind]) + rid.to_bytes(8, "little") + tail
    for conn in (caller, callee):
        conn.receive_data(encode_frame(body))
        ev = conn.next_event()  # never raises
        assert isinstance(ev, (Call, Ok, Violation, LateReply))


def test_a_begun_frame_is_pending_before_any_of_its_body_arrives():
    """(The fast paths read the stream themselves only when nothing is
    pending: a frame whose header came, and none of its body, is.)"""
    _, callee = pair()
    assert not callee.frames.pending
    callee.receive_data(HEADER.pack(50, 0, 0))
    assert callee.next_event() is NEED_DATA
    assert callee.frames.buffered == 0 and callee.frames.pending
