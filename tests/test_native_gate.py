"""The call gate's byte loop (transport.gate): the C module and its Python
twin do the same with any bytes a peer may send, and a sanitizer build of
the C module survives the same (slow)."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import sysconfig
import threading

import pytest
from hypothesis import given, settings, strategies as st

from pycompart.transport import gate

HEADER = struct.Struct("<IHH")


def _native():  # type: ignore[no-untyped-def]
    """The C module, or (``PYCOMPART_TEST_GATE``: the slow test's) a
    sanitizer build of it."""
    path = os.environ.get("PYCOMPART_TEST_GATE")
    if not path:
        return gate._native
    import importlib.util

    spec = importlib.util.spec_from_file_location("pycompart.transport._gate", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


IMPLS = [("python", gate.py_serve, gate.py_receive)]
if _native() is not None:
    IMPLS.append(("native", _native().serve, _native().receive))
CALLS = [("python", gate.py_call)] + ([("native", _native().call)] if _native() is not None else [])
WRITES = [("python", gate.py_write)] + ([("native", _native().write)] if _native() is not None else [])
CALL_ENVELOPE = struct.Struct("<BBQQBH")


def _run_serve(serve, chunks: list[bytes], replies: list[bytes | None], bufsize: int = 4096,  # type: ignore[no-untyped-def]
               fast_replies: list[object] | None = None):
    """Write ``chunks`` into a pipe one read at a time (each followed by a
    reply round), run ``serve`` on it; what it handled, wrote and returned.
    ``fast_replies``: serve compact calls too, answering with these."""
    call_r, call_w = os.pipe()
    reply_r, reply_w = os.pipe()
    os.set_blocking(reply_r, False)
    os.set_blocking(call_r, False)  # an idle serve returns (-1) instead of waiting
    seen: list[bytes] = []
    answers = iter(replies)
    results: list[int] = []
    buf = bytearray(bufsize)

    def handle(body: bytes) -> bytes | None:
        seen.append(body)
        return next(answers, None)

    fast_answers = iter(fast_replies or [])

    def fast(rid: int, name: bytes, args: bytes) -> object:
        seen.append((rid, name, args))  # type: ignore[arg-type]
        return next(fast_answers, None)

    extra = (fast,) if fast_replies is not None else ()
    try:
        for chunk in chunks:
            os.write(call_w, chunk)
            results.append(serve(call_r, reply_w, memoryview(buf), handle, 1000, 0, *extra))
            handled = sum(1 for x in seen if type(x) is bytes)
            if results[-1] != -1 or handled > len(replies) or len(seen) - handled > len(fast_replies or ()):
                break
        written = b""
        while True:
            try:
                data = os.read(reply_r, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            written += data
        return seen, written, results
    finally:
        for fd in (call_r, call_w, reply_r, reply_w):
            os.close(fd)


@pytest.fixture
def pipes():  # type: ignore[no-untyped-def]
    """(call read end, non-blocking: an idle serve returns -1; call write
    end; reply write end), closed after the test."""
    call_r, call_w = os.pipe()
    reply_r, reply_w = os.pipe()
    os.set_blocking(call_r, False)
    yield call_r, call_w, reply_w
    for fd in (call_r, call_w, reply_r, reply_w):
        try:
            os.close(fd)
        except OSError:
            pass


@contextlib.contextmanager
def reply_pipe():  # type: ignore[no-untyped-def]
    """A pipe whose read end does not block (what ``receive`` reads), both
    ends closed after (the test may close the write end itself)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        yield r, w
    finally:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


def frame(body: bytes, nfds: int = 0, nbulk: int = 0) -> bytes:
    return HEADER.pack(len(body), nfds, nbulk) + body


@pytest.mark.parametrize("name,serve,_", IMPLS)
def test_whole_plain_frames_are_handled_and_answered(name, serve, _):
    seen, written, results = _run_serve(serve, [frame(b"a"), frame(b"bc")], [b"R1", b""])
    # The third handle call gets no reply (None): serve returns -1.
    assert seen == [b"a", b"bc"] and written == b"R1"


@pytest.mark.parametrize("name,serve,_", IMPLS)
@pytest.mark.parametrize("data", [
    frame(b"x", nfds=1), frame(b"x", nbulk=1), frame(b"xy")[:5], frame(b"xy")[:9],
    frame(b"a") + frame(b"b"), HEADER.pack(0xFFFFFFFF, 0, 0) + b"zz", b"\x01\x00",
])
def test_anything_else_goes_back_to_python_untouched(name, serve, _, data, pipes):
    call_r, call_w, reply_w = pipes
    buf = bytearray(4096)
    os.write(call_w, data)
    n = serve(call_r, reply_w, memoryview(buf), lambda body: pytest.fail("handled"), 1000, 0)
    assert n == len(data) and bytes(buf[:n]) == data


@pytest.mark.parametrize("name,serve,_", IMPLS)
def test_end_of_stream_and_errors(name, serve, _):
    call_r, call_w = os.pipe()
    reply_r, reply_w = os.pipe()
    os.close(call_w)
    try:
        assert serve(call_r, reply_w, memoryview(bytearray(64)), lambda b: b"", 1000, 0) == 0
        with pytest.raises(OSError):
            serve(-1, reply_w, memoryview(bytearray(64)), lambda b: b"", 1000, 0)
        with pytest.raises(TypeError):
            os_r, os_w = os.pipe()
            os.set_blocking(os_r, False)
            os.write(os_w, frame(b"q"))
            try:
                serve(os_r, reply_w, memoryview(bytearray(64)), lambda b: 42, 1000, 0)
            finally:
                os.close(os_r)
                os.close(os_w)
    finally:
        for fd in (call_r, reply_r, reply_w):
            os.close(fd)


@pytest.mark.parametrize("name,serve,_", IMPLS)
def test_an_exception_in_the_handler_comes_out_as_itself(name, serve, _, pipes):
    def handle(body: bytes) -> bytes:
        raise KeyError(body)
    call_r, call_w, reply_w = pipes
    os.write(call_w, frame(b"k"))
    with pytest.raises(KeyError):
        serve(call_r, reply_w, memoryview(bytearray(64)), handle, 1000, 0)


@pytest.mark.parametrize("name,_,receive", IMPLS)
def test_receive_reads_what_is_there_or_times_out(name, _, receive):
    buf = bytearray(16)
    with reply_pipe() as (r, w):
        assert receive(r, memoryview(buf), 20, 0) == -2  # nothing came
        os.write(w, b"hello")
        assert receive(r, memoryview(buf), 1000, 50) == 5 and buf[:5] == b"hello"
        threading.Timer(0.05, lambda: os.write(w, b"late")).start()
        assert receive(r, memoryview(buf), 2000, 0) == 4
        os.close(w)
        assert receive(r, memoryview(buf), 1000, 0) == 0


def compact_call(rid: int, name: bytes, args: bytes, parent: int = 0, concurrent: int = 0) -> bytes:
    return frame(CALL_ENVELOPE.pack(0xC1, 1, rid, parent, concurrent, len(name)) + name + args)


def compact_ok(rid: int, value: bytes) -> bytes:
    return frame(struct.pack("<BBQ", 0xC1, 2, rid) + value)


@pytest.mark.parametrize("name,serve,_", IMPLS)
def test_compact_calls_go_to_fast_which_answers_with_a_value_a_frame_or_nothing(name, serve, _):
    chunks = [compact_call(7, b"m:f", b"\x80"), compact_call(8, b"m:g", b"A"), compact_call(9, b"", b""),
              frame(b"plain"), compact_call(10, b"m:h", b"B")]
    seen, written, results = _run_serve(serve, chunks, [b"P"], fast_replies=[b"\xc0", (b"WHOLE",), b"", False])
    assert seen == [(7, b"m:f", b"\x80"), (8, b"m:g", b"A"), (9, b"", b""), b"plain", (10, b"m:h", b"B")]
    assert written == compact_ok(7, b"\xc0") + b"WHOLE" + compact_ok(9, b"") + b"P"
    assert results[-1] == -1  # False: answered, back to Python


@pytest.mark.parametrize("name,serve,_", IMPLS)
@pytest.mark.parametrize("data", [
    compact_call(1, b"m:f", b"x", parent=3), compact_call(1, b"m:f", b"x", concurrent=1),
    frame(CALL_ENVELOPE.pack(0xC1, 1, 1, 0, 0, 50) + b"m:f"),  # its name runs past the frame
])
def test_compact_calls_fast_may_not_take_go_to_handle(name, serve, _, data, pipes):
    call_r, call_w, reply_w = pipes
    os.write(call_w, data)
    got = []
    n = serve(call_r, reply_w, memoryview(bytearray(4096)), lambda body: got.append(body),
              1000, 0, lambda *a: pytest.fail("fast"))
    assert n == -1 and got == [data[8:]]


@pytest.mark.parametrize("name,serve,_", IMPLS)
def test_a_compact_call_fast_declines_stays_in_the_buffer(name, serve, _, pipes):
    call_r, call_w, reply_w = pipes
    data = compact_call(5, b"m:f", b"\x80")
    os.write(call_w, data)
    buf = bytearray(4096)
    n = serve(call_r, reply_w, memoryview(buf), lambda body: pytest.fail("handled"), 1000, 0, lambda *a: None)
    assert n == len(data) and bytes(buf[:n]) == data
    os.write(call_w, data)
    with pytest.raises(TypeError):
        serve(call_r, reply_w, memoryview(buf), lambda body: None, 1000, 0, lambda *a: 42)


@pytest.mark.parametrize("name,_,receive", IMPLS)
def test_receive_returns_the_value_of_a_compact_reply_to_its_call_only(name, _, receive):
    buf = bytearray(256)
    with reply_pipe() as (r, w):
        for data, rid, expected in [
            (compact_ok(9, b"\x93\x01\x02\x03"), 9, b"\x93\x01\x02\x03"),
            (compact_ok(9, b""), 9, b""),
            (compact_ok(9, b"v"), 8, None),                      # another call's
            (compact_ok(9, b"v"), 0, None),                      # nothing asked for
            (compact_ok(9, b"v") + b"x", 9, None),               # more than the reply
            (compact_ok(9, b"v")[:-1], 9, None),                 # part of it
            (frame(b"\xc1\x02" + (9).to_bytes(8, "little") + b"v", nfds=1), 9, None),
            (frame(b"\xc1\x01" + (9).to_bytes(8, "little") + b"v"), 9, None),  # a call, not a reply
        ]:
            os.write(w, data)
            got = receive(r, memoryview(buf), 1000, 0, rid)
            assert got == (expected if expected is not None else len(data)), data


@pytest.mark.parametrize("name,_,receive", IMPLS)
def test_receive_marks_what_it_read_the_moment_it_read_it(name, _, receive):
    """``got`` holds the count of a read that returned (a signal handler's
    exception when receive returns would lose those bytes: the channel can
    tell), and is left alone when nothing was read."""
    got = memoryview(bytearray(8)).cast("q")
    got[0] = -1
    buf = bytearray(64)
    with reply_pipe() as (r, w):
        assert receive(r, memoryview(buf), 20, 0, 0, got) == -2 and got[0] == -1
        os.write(w, b"hello")
        assert receive(r, memoryview(buf), 1000, 0, 0, got) == 5 and got[0] == 5
        got[0] = -1
        os.write(w, compact_ok(3, b"\xc0"))
        assert receive(r, memoryview(buf), 1000, 0, 3, got) == b"\xc0" and got[0] == 19
        with pytest.raises(ValueError):
            receive(r, memoryview(buf), 0, 0, 0, bytearray(4))


@pytest.mark.parametrize("name,call", CALLS)
def test_call_writes_a_compact_call_whole_or_not_at_all(name, call):
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        assert call(w, 2**64 - 1, b"m:f", b"\x80") is True
        assert os.read(r, 4096) == compact_call(2**64 - 1, b"m:f", b"\x80")
        assert call(w, 1, b"m:f", b"x" * 5000) is False      # more than one atomic write
        assert call(w, 1, b"n" * 70000, b"") is False         # a name longer than its u16
        while True:  # fill the pipe: then nothing goes out
            try:
                os.write(w, b"z" * 4096)
            except BlockingIOError:
                break
        assert call(w, 1, b"m:f", b"\x80") is False
        with pytest.raises(OSError):
            call(-1, 1, b"m:f", b"\x80")
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("name,write", WRITES)
def test_write_counts_what_went_out(name, write):
    """``sent`` grows by what each write put on the wire (the channel tells
    a whole frame from a torn one by it); nothing is counted when the pipe
    has no room."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    sent = memoryview(bytearray(8)).cast("q")
    try:
        assert write(w, b"hello", sent) == 5 and sent[0] == 5
        assert write(w, memoryview(b"xy"), sent) == 2 and sent[0] == 7
        assert os.read(r, 100) == b"helloxy"
        total = 7
        while True:
            n = write(w, b"z" * 100_000, sent)
            if n == -1:
                break
            total += n
            assert sent[0] == total
        assert write(w, b"more", sent) == -1 and sent[0] == total
        if name == "native":
            with pytest.raises(ValueError):
                write(w, b"x", bytearray(4))  # too small to count in
        with pytest.raises(OSError):
            write(-1, b"x", sent)
    finally:
        os.close(r)
        os.close(w)


_chunk = st.one_of(
    st.binary(max_size=40),
    st.builds(compact_call, st.integers(0, 2**64 - 1), st.binary(max_size=8), st.binary(max_size=12),
              st.sampled_from([0, 0, 1]), st.sampled_from([0, 0, 1, 2])),
    st.builds(lambda b: frame(b"\xc1\x01" + b), st.binary(max_size=30)),
    st.builds(frame, st.binary(max_size=40)),
    st.builds(frame, st.binary(max_size=10), st.integers(0, 3), st.integers(0, 3)),
    st.builds(lambda n, b: HEADER.pack(n, 0, 0) + b, st.integers(0, 2**32 - 1), st.binary(max_size=20)),
)


@settings(max_examples=int(os.environ.get("PYCOMPART_GATE_FUZZ", "300")), deadline=None, database=None)
@given(chunks=st.lists(_chunk, min_size=1, max_size=6),
       replies=st.lists(st.one_of(st.none(), st.binary(max_size=30)), max_size=6),
       bufsize=st.sampled_from([8, 9, 16, 64, 4096]))
def test_native_and_python_agree_on_any_bytes(chunks, replies, bufsize):
    outcomes = [_run_serve(serve, chunks, replies, bufsize) for _, serve, _ in IMPLS]
    assert all(o == outcomes[0] for o in outcomes), outcomes
    fast = [r if i % 3 or r is None else (r,) for i, r in enumerate(replies)] + [False]
    outcomes = [_run_serve(serve, chunks, replies, bufsize, fast) for _, serve, _ in IMPLS]
    assert all(o == outcomes[0] for o in outcomes), outcomes


@settings(max_examples=int(os.environ.get("PYCOMPART_GATE_FUZZ", "300")), deadline=None, database=None)
@given(data=st.one_of(st.binary(min_size=1, max_size=60),
                      st.builds(compact_ok, st.integers(0, 5), st.binary(max_size=20)),
                      st.builds(lambda b: frame(b"\xc1\x02" + b), st.binary(max_size=20))),
       rid=st.integers(0, 5), bufsize=st.sampled_from([8, 18, 19, 64]))
def test_native_and_python_receive_agree_on_any_bytes(data, rid, bufsize):
    outcomes = []
    for _, _, receive in IMPLS:
        with reply_pipe() as (r, w):
            os.write(w, data)
            buf = bytearray(bufsize)
            got = receive(r, memoryview(buf), 1000, 0, rid)
            outcomes.append((got, bytes(buf) if isinstance(got, int) else None))
    assert all(o == outcomes[0] for o in outcomes), outcomes


@pytest.mark.skipif(not os.environ.get("PYCOMPART_TEST_GATE"), reason="only inside the sanitizer run")
def test_the_sanitizer_build_is_the_one_fuzzed():
    """(Inside ``test_a_sanitizer_build_survives_the_fuzz``.) The native
    implementation here is the build with sanitizers, and they are loaded."""
    name, serve, _ = IMPLS[-1]
    assert name == "native" and _native().__file__ == os.environ["PYCOMPART_TEST_GATE"]
    with open("/proc/self/maps") as f:
        assert "libasan" in f.read()


@pytest.mark.slow
@pytest.mark.skipif(gate._native is None, reason="the C module is not built")
def test_a_sanitizer_build_survives_the_fuzz(tmp_path):
    """Build _gate.c with AddressSanitizer and UBSan and run this file's
    fuzz against it (many more examples) in a fresh interpreter."""
    src = os.path.join(os.path.dirname(gate.__file__), "_gate.c")
    include = sysconfig.get_paths()["include"]
    out = tmp_path / ("_gate" + sysconfig.get_config_var("EXT_SUFFIX"))
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
    build = subprocess.run(["gcc", "-shared", "-fPIC", "-O1", *flags, f"-I{include}", src, "-o", str(out)],
                           capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"cannot build with sanitizers: {build.stderr[-500:]}")
    asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=asan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", PYCOMPART_TEST_GATE=str(out),
               PYCOMPART_GATE_FUZZ="3000")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                           os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    assert proc.returncode == 0 and "passed" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    assert "skipped" not in proc.stdout, proc.stdout[-1000:]  # the check of the build ran too


@pytest.mark.parametrize("choice", ["none", "native", "compact", "all"])
def test_instances_take_the_fast_paths_main_takes(choice):
    """PYCOMPART_FASTPATHS reaches the zygote, and so every instance: with
    "none", instances serve calls with the Python twin and plain msgpack,
    and calls still work; the same for each single choice."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import pycompart, bystander; "
            "app = pycompart.App({'compartments': {'b': {'functions': ['bystander:fast_paths', 'bystander:ping']}}}); "
            "app.start(); print(app.function('bystander:fast_paths')(), app.function('bystander:ping')()); app.stop()")
    env = dict(os.environ, PYCOMPART_FASTPATHS=choice,
               PYTHONPATH=os.pathsep.join([here, *sys.path]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=here)
    assert out.returncode == 0, out.stderr[-2000:]
    import importlib.util

    built = importlib.util.find_spec("pycompart.transport._gate") is not None
    expected = {"none": [False, False, False], "native": [built, False, False],
                "compact": [False, True, False], "all": [built, True, True]}[choice]
    assert out.stdout.strip() == f"{expected} pong", out.stdout
