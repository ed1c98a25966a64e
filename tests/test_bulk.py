"""Large values beside the stream, in shared memory (transport.bulk): what
crosses is what was sent, the types are checked as inline, and a hostile
instance can neither crash main, nor change a value main already holds, nor
resize the memory both sides map."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import threading

import pytest

import bulkbox
from pycompart import ProtocolError
from pycompart.kernel import memfd
from pycompart.transport import bulk
from pycompart.transport.bulk import Lanes
from pycompart.wire.protocol import HEADER, Connection, FrameDecoder, Violation

MIB = 1 << 20


def sha(data) -> str:  # type: ignore[no-untyped-def]
    return hashlib.sha256(data).hexdigest()


# -- the lanes alone, in one process -------------------------------------------------


def _pair(size=4 * MIB):  # type: ignore[no-untyped-def]
    fd = bulk.create(size)
    return Lanes(os.dup(fd), side=0), Lanes(fd, side=1)


def test_lanes_copy_out_what_was_sent_and_refuse_while_busy():
    main, inst = _pair()
    try:
        a, b = os.urandom(MIB), os.urandom(300_000)
        assert main.send([memoryview(a), memoryview(b)])
        assert not main.send([memoryview(a)])  # the first frame is not copied out yet
        got = inst.receive(2, 8 * MIB)
        assert got == [a, b] and all(type(g) is bytes for g in got)
        assert main.send([memoryview(b)])  # copied out: free again
        assert inst.receive(1, 8 * MIB) == [b]
        # The other direction is a lane of its own.
        assert inst.send([memoryview(a)]) and main.receive(1, 8 * MIB) == [a]
    finally:
        main.close()
        inst.close()


def test_lanes_refuse_what_does_not_fit():
    main, inst = _pair(1 * MIB)
    try:
        assert not main.send([memoryview(bytes(main.size))])  # larger than the data area
        assert not main.send([memoryview(b"x")] * (bulk.MAX_SEGMENTS + 1))
        assert main.send([memoryview(b"y" * 1000)])
        with pytest.raises(ValueError, match="more than 10 bytes"):
            inst.receive(1, 10)
    finally:
        main.close()
        inst.close()


@pytest.mark.parametrize("table", [(0, 10), (100, 10), (4096, 1 << 62), (1 << 40, 1), (2 * MIB - 1, 2)])
def test_a_forged_table_is_refused(table):
    fd = bulk.create(1 * MIB)
    m = mmap.mmap(fd, 2 * MIB)
    main, inst = Lanes(os.dup(fd), side=0), Lanes(fd, side=1)
    try:
        m[64:80] = HEADER.__class__("<QQ").pack(*table)
        with pytest.raises(ValueError, match="outside|more than"):
            inst.receive(1, 1 << 40)
        for count in (0, bulk.MAX_SEGMENTS + 1):
            with pytest.raises(ValueError, match="bulk segments"):
                inst.receive(count, 1 << 40)
        m.close()
    finally:
        main.close()
        inst.close()


def test_the_memory_file_cannot_be_resized_or_sealed_further():
    fd = bulk.create(1 * MIB)
    try:
        assert memfd.is_sealed(fd)
        for attempt in (lambda: os.ftruncate(fd, 0), lambda: os.ftruncate(fd, 4 * MIB)):
            with pytest.raises(PermissionError):
                attempt()
        import fcntl

        with pytest.raises(PermissionError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        os.close(fd)


def test_frames_naming_bulk_segments_need_a_source():
    frames = FrameDecoder(1 << 20)
    frames.receive_data(HEADER.pack(1, 0, 1) + b"\xc0")
    event = frames.next_frame()
    assert isinstance(event, Violation) and event.fatal and "no bulk lanes" in event.reason
    frames = FrameDecoder(1 << 20)
    frames.bulk_source = lambda n: [b"v"] * n
    frames.receive_data(HEADER.pack(1, 0, 17) + b"\xc0")
    assert "at most 16" in frames.next_frame().reason  # type: ignore[union-attr]


def test_only_this_ends_kind_of_message_has_its_bulk_values_copied():
    from pycompart.wire.protocol import Call, Cancel

    copies: list[int | None] = []

    def source(count):  # type: ignore[no-untyped-def]
        copies.append(count)
        return [b"w"] * (count or 0)

    sender = Connection(1 << 20)
    instance = Connection(1 << 20)
    instance.frames.bulk_source, instance.bulk_kind = source, Call
    _, frame = sender.send_call("m:f", b"\x80", nbulk=2)
    instance.receive_data(frame)
    assert isinstance(instance.next_event(), Call) and instance.take_bulk() == [b"w", b"w"]
    # A nested call, a cancel: never copied, and the stream is broken.
    for frame in (sender.send_call("m:f", b"\x80", parent=7, nbulk=1)[1],
                  HEADER.pack(3, 0, 1) + b"\x92\x04\x01"):
        peer = Connection(1 << 20)
        peer.frames.bulk_source, peer.bulk_kind = source, Call
        peer.receive_data(frame)
        event = peer.next_event()
        assert isinstance(event, Violation) and event.fatal and "may not come with bulk" in event.reason
        assert peer.take_bulk() is None
    assert copies == [2, None, None]
    assert Cancel  # (the frame above is one)


# -- through an app --------------------------------------------------------------------


def _app(make_app, **comp):  # type: ignore[no-untyped-def]
    app = make_app({"compartments": {"box": {"restart_backoff": "10ms", **comp}}})
    eps = {name: app.entrypoint("box")(getattr(bulkbox, name)) for name in (
        "digest", "two", "make", "make_view", "wrong_type", "as_text", "resize_lanes",
        "forge_table", "lie_consumed", "scribble_after", "nested_bulk", "reply_text_as_bytes")}
    return app, eps


def _lanes_in_use(app) -> bool:  # type: ignore[no-untyped-def]
    inst = app._runtime.monitor.pools["box"].ready[0]
    return inst.channel.bulk is not None


def test_big_arguments_and_results_cross_intact(make_app):
    app, ep = _app(make_app)
    with app:
        if bulk.ENABLED:
            assert _lanes_in_use(app)
        for n in (bulk.BULK_MIN, 3 * MIB + 7, 64 * MIB):
            data = os.urandom(n)
            assert ep["digest"](data) == sha(data)
            assert ep["digest"](bytearray(data)) == sha(data)
            assert ep["digest"](memoryview(data)) == sha(data)
        a, b = os.urandom(2 * MIB), os.urandom(MIB)
        assert ep["two"](a, 5, b, tag="t") == [sha(a), 5, sha(b), "t"]
        assert ep["two"](a, n=6, b=b) == [sha(a), 6, sha(b), ""]
        out = ep["make"](8 * MIB, 3)
        assert type(out) is bytes and out == bulkbox.make(8 * MIB, 3)
        view = ep["make_view"](2 * MIB)  # declared memoryview: arrives as bytes' view
        assert bytes(view) == b"\x07" * (2 * MIB)


def test_big_values_are_checked_against_the_annotations(make_app):
    app, ep = _app(make_app)
    with app:
        with pytest.raises(ProtocolError, match="does not match the declared return type"):
            ep["wrong_type"](2 * MIB)
        with pytest.raises(TypeError, match="do not match its annotations"):
            ep["as_text"](b"q" * (2 * MIB))
        assert ep["digest"](b"ok" * MIB) == sha(b"ok" * MIB)  # the channel is fine


def test_concurrent_big_calls_share_the_lane_or_go_inline(make_app):
    app, ep = _app(make_app, instances=2)
    results: list[bool] = []
    with app:
        def worker(seed: int) -> None:
            for i in range(6):
                data = bulkbox.make(MIB + 64 * i, seed * 100 + i)
                results.append(ep["digest"](data) == sha(data))
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == [True] * 24


@pytest.mark.skipif(not bulk.ENABLED, reason="bulk lanes forced off")
def test_hostile_instance_cannot_resize_the_memory_file(make_app):
    app, ep = _app(make_app)
    with app:
        got = ep["resize_lanes"]()
    assert got == [f"{name}: {errno.EPERM}" for name in
                   ("shrink", "grow", "seal writes", "seal future writes")], got


@pytest.mark.skipif(not bulk.ENABLED, reason="bulk lanes forced off")
@pytest.mark.parametrize("kind", ["outside", "header", "huge", "count"])
def test_a_forged_segment_table_breaks_only_that_instance(make_app, kind):
    app, ep = _app(make_app)
    with app:
        pid = app.instances("box")[0]
        with pytest.raises(ProtocolError, match="bulk segments"):
            ep["forge_table"](kind)
        data = os.urandom(2 * MIB)
        assert ep["digest"](data) == sha(data)  # a fresh instance, lanes and all
        assert app.instances("box")[0] != pid
        assert _lanes_in_use(app)


@pytest.mark.skipif(not bulk.ENABLED, reason="bulk lanes forced off")
def test_a_lie_about_the_lane_only_sends_inline(make_app):
    app, ep = _app(make_app)
    with app:
        assert ep["lie_consumed"]() == 1
        data = os.urandom(3 * MIB)
        assert ep["digest"](data) == sha(data)
        inst = app._runtime.monitor.pools["box"].ready[0]
        assert not inst.channel.bulk.send([memoryview(data)])  # it thinks the lane is busy


@pytest.mark.skipif(not bulk.ENABLED, reason="bulk lanes forced off")
def test_a_value_main_holds_is_its_own_copy(make_app):
    app, ep = _app(make_app, privileges={"syscalls": "python-threads"})
    with app:
        value = ep["scribble_after"](2 * MIB)
        before = sha(value)  # garbled, maybe (the instance wrote over it before we copied it out)
        assert type(value) is bytes and len(value) == 2 * MIB
        import time

        time.sleep(0.3)  # the instance is still overwriting its lane
        assert sha(value) == before
        inst = app._runtime.monitor.pools["box"].ready[0]
        assert inst.channel.bulk._copied == 1  # it did come through the lane


def test_lanes_shrink_with_the_address_space_and_bigger_values_go_inline(make_app):
    assert bulk.lane_size(128 * MIB, 128 * MIB) == 16 * MIB
    assert bulk.lane_size(128 * MIB, MIB) == 0
    app, ep = _app(make_app, privileges={"memory": "256MiB"})
    with app:
        if bulk.ENABLED:
            assert app._runtime.monitor.pools["box"].ready[0].channel.bulk.size == 32 * MIB
        for n in (MIB, 40 * MIB):
            data = os.urandom(n)
            assert ep["digest"](data) == sha(data)


@pytest.mark.skipif(not bulk.ENABLED, reason="bulk lanes forced off")
def test_bulk_segments_on_calls_into_main_are_never_copied(make_app):
    import resource

    app, ep = _app(make_app)
    with app:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(ProtocolError, match="may not come with bulk values"):
            ep["nested_bulk"](8)  # 8 x 100 MiB, were they copied
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown < 50 * 1024, f"main grew by {grown} KiB"
        inst = app._runtime.monitor.pools["box"].ready
        data = os.urandom(MIB)
        assert ep["digest"](data) == sha(data)  # a fresh instance
        assert not any(i.channel.message_bulk for i in app._runtime.monitor.pools["box"].ready)
        assert inst is not None


@pytest.mark.skipif(not bulk.ENABLED, reason="bulk lanes forced off")
def test_a_string_is_not_bytes_on_the_bulk_path_either(make_app):
    app, ep = _app(make_app)
    with app:
        with pytest.raises(ProtocolError, match="does not match the declared return type"):
            ep["reply_text_as_bytes"]()


def test_each_on_demand_instance_gets_lanes_of_its_own(make_app):
    """The monitor makes an on-demand compartment's next lanes ahead of its
    next instance: still each memory file is mapped by one instance only,
    and a stop leaves main no memory file open."""
    def memory_files() -> int:
        return sum("pycompart-bulk" in os.readlink(f"/proc/self/fd/{fd}")
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

    before = memory_files()
    app = make_app({"compartments": {"box": {"instances": "per-call", "spares": 0}}})
    lane_file = app.entrypoint("box")(bulkbox.lane_file)
    digest = app.entrypoint("box")(bulkbox.digest)
    with app:
        files = [lane_file() for _ in range(4)]
        data = os.urandom(3 * MIB)
        assert [digest(data) for _ in range(3)] == [sha(data)] * 3
    if bulk.ENABLED:
        assert all(files) and len(set(files)) == len(files), files
    assert memory_files() == before
