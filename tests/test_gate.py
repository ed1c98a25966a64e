"""The typed call gate, in-process."""

import sys
from typing import Any

import msgspec
import pytest

import boxed
import pycompart
from pycompart import EntrypointError, ProtocolError, RemoteError
from pycompart.wire.contract import Contract
from pycompart.wire.exceptions import ALLOWED_EXCEPTIONS, describe_exception, rebuild_exception


def roundtrip(fn, *args, **kwargs):
    c = Contract(fn)
    return c.decode_result(c.invoke(c.encode_args(args, kwargs)), "test")


def test_arguments_bind_like_python():
    assert roundtrip(boxed.add, 1) == 11
    assert roundtrip(boxed.add, 1, 2) == 3
    assert roundtrip(boxed.add, 1, 2, 3, 4, scale=2) == 20
    assert roundtrip(boxed.add, a=1, b=1, extra=5) == 7
    with pytest.raises(TypeError, match="multiple values"):
        Contract(boxed.add).encode_args((1,), {"a": 2})
    with pytest.raises(TypeError, match="missing required"):
        Contract(boxed.add).encode_args((), {})
    with pytest.raises(TypeError, match="positional arguments"):
        Contract(boxed.parse).encode_args((b"a", True), {})
    with pytest.raises(TypeError, match="unexpected keyword"):
        Contract(boxed.parse).encode_args((b"a",), {"loose": True})


def test_structs_dataclasses_and_optional():
    shape = roundtrip(boxed.make_shape, "tri", 3)
    assert isinstance(shape, boxed.Shape) and shape.points[2] == boxed.Point(2, 4)
    assert roundtrip(boxed.centroid, shape) == boxed.Point(1, 1)
    assert roundtrip(boxed.centroid, boxed.Shape("empty", [])) is None


def test_callee_rejects_mistyped_arguments():
    c = Contract(boxed.parse)
    with pytest.raises(TypeError, match="do not match its annotations"):
        c.invoke(msgspec.msgpack.encode({"data": "a str, not bytes"}))
    with pytest.raises(TypeError):
        c.invoke(msgspec.msgpack.encode({"data": b"x", "smuggled": 1}))


def test_caller_rejects_mistyped_result():
    c = Contract(boxed.lie)
    for kind in ("str", "float", "none"):
        with pytest.raises(ProtocolError, match="does not match the declared return type"):
            c.decode_result(c.invoke(c.encode_args((kind,), {})), "liar")


def test_unencodable_argument_is_a_type_error():
    with pytest.raises(TypeError, match="cannot cross a compartment boundary"):
        Contract(boxed.echo).encode_args((object(),), {})


def test_unsupported_annotation_is_reported_at_declaration():
    def weird(x: "set[object] | dict[str, int] | list[int] | tuple[int]") -> int: ...
    weird.__module__ = "m"
    with pytest.raises(EntrypointError, match="cannot be carried"):
        Contract(weird)


class _Unknown:
    pass


def test_a_class_the_wire_does_not_know_is_reported_at_declaration():
    """msgspec would accept the annotation and fail only at the call."""
    import dataclasses
    import socket

    @dataclasses.dataclass
    class Holder:
        items: list[_Unknown]

    def bare(x: _Unknown) -> int: ...
    def nested(x: dict[str, Holder]) -> int: ...
    def result() -> list[_Unknown]: ...
    def fine(fd: pycompart.Fd, s: socket.socket, y: "dict[str, tuple[int, ...]] | None" = None) -> bytes: ...
    for fn in (bare, nested, result):
        fn.__module__ = "m"
        with pytest.raises(EntrypointError, match="_Unknown is a class the wire does not know"):
            Contract(fn)
    fine.__module__ = "m"
    Contract(fine)


def test_builtin_exceptions_come_back_as_themselves():
    for exc in (ValueError("v", 1), KeyError("k"), FileNotFoundError(2, "gone"), ZeroDivisionError("z")):
        back = rebuild_exception(describe_exception(exc), "box")
        assert type(back) is type(exc) and back.args == exc.args
        assert "Traceback from compartment 'box'" in str(back.__cause__)


def test_other_exceptions_become_remote_error_without_import():
    back = rebuild_exception(describe_exception(boxed.CustomError("boom")), "box")
    assert isinstance(back, RemoteError) and back.type_name == "boxed.CustomError" and back.message == "boom"


def test_a_class_the_receiver_lacks_keeps_its_builtin_bases():
    """``json.JSONDecodeError`` from a compartment, with no json imported
    here: still caught by ``except ValueError``; nothing is imported, and
    the classes made are bounded."""
    from pycompart.wire import exceptions as wire_exceptions
    from pycompart.wire.protocol import ErrorInfo

    info = ErrorInfo("nowhere.mod.DecodeFailed", "Expecting value", ["Expecting value"], "",
                     ["nowhere.mod.DecodeFailed", "ValueError", "Exception", "BaseException", "object"])
    back = rebuild_exception(info, "box")
    assert isinstance(back, ValueError) and isinstance(back, RemoteError)
    assert type(back).__name__ == "DecodeFailed" and str(back) == "Expecting value"
    assert back.args == ("Expecting value",) and "nowhere" not in sys.modules
    assert type(rebuild_exception(info, "box")) is type(back)  # one class per name
    # Incompatible builtin layouts keep the first; no builtin base: RemoteError.
    both = ErrorInfo("m.E", "x", [], "", ["m.E", "KeyError", "OSError", "Exception"])
    assert isinstance(rebuild_exception(both, "box"), KeyError)
    plain_info = ErrorInfo("m.F", "x", [], "", ["m.F", "m.Base", "Exception"])
    assert type(rebuild_exception(plain_info, "box")) is RemoteError
    for i in range(wire_exceptions.MAX_KIN + 10):
        rebuild_exception(ErrorInfo(f"m.E{i}", "x", [], "", [f"m.E{i}", "TypeError"]), "box")
    assert len(wire_exceptions._KIN) <= wire_exceptions.MAX_KIN


def test_control_exceptions_are_rebuilt_only_where_allowed():
    assert "SystemExit" not in ALLOWED_EXCEPTIONS and "KeyboardInterrupt" not in ALLOWED_EXCEPTIONS
    from pycompart.wire.protocol import ErrorInfo
    for name in ("SystemExit", "KeyboardInterrupt", "GeneratorExit", "os.system", "BaseException"):
        back = rebuild_exception(ErrorInfo(name, "x", [], ""), "box")
        assert isinstance(back, RemoteError), name
    for name in ("GeneratorExit", "os.system", "BaseException"):  # never, even allowed
        assert isinstance(rebuild_exception(ErrorInfo(name, "x", [], ""), "box", allow_exit=True),
                          RemoteError)
    back = rebuild_exception(ErrorInfo("SystemExit", "2", [2], ""), "box", allow_exit=True)
    assert type(back) is SystemExit and back.code == 2
    back = rebuild_exception(ErrorInfo("KeyboardInterrupt", "", [], ""), "box", allow_exit=True)
    assert type(back) is KeyboardInterrupt
    # StopIteration arrives as itself (a hand-written __next__ stops as unboxed).
    assert type(rebuild_exception(ErrorInfo("StopIteration", "", [], ""), "box")) is StopIteration


def test_a_resolver_finds_only_real_exception_classes():
    """The resolver (main's: classes of modules it imported) is consulted
    for names that are not builtins; what it returns is built without
    running the class's code."""
    import json

    from pycompart.frontend.exceptions import imported_exception_class
    from pycompart.wire.protocol import ErrorInfo

    info = ErrorInfo("json.decoder.JSONDecodeError", "Expecting value: line 1 column 1 (char 0)",
                     ["Expecting value: line 1 column 1 (char 0)"], "",
                     attributes={"msg": "Expecting value", "pos": 0, "lineno": 1, "colno": 1})
    back = rebuild_exception(info, "box", resolve=imported_exception_class)
    assert type(back) is json.JSONDecodeError and back.pos == 0 and back.lineno == 1
    assert isinstance(back.__cause__, pycompart.RemoteTraceback)
    for name in ("os.system", "json.loads", "json.JSONDecodeError",  # an alias, not its own name
                 "subprocess.Popen", "builtins.SystemExit", "sys.modules", "no.such.Error",
                 "pycompart.frontend.exceptions.x", "json.decoder." + "A" * 300):
        assert imported_exception_class(name) is None, name
    assert imported_exception_class("json.decoder.JSONDecodeError") is json.JSONDecodeError
    # A module main has not imported is never imported for it.
    before = set(sys.modules)
    assert "wsgiref.simple_server" not in before
    assert imported_exception_class("wsgiref.simple_server.ServerError") is None
    assert set(sys.modules) == before


def test_raised_from_none_has_no_cause_on_this_side_either():
    from pycompart.wire.protocol import ErrorInfo

    try:
        try:
            raise KeyError("a")
        except KeyError:
            raise ValueError("b") from None
    except ValueError as exc:
        info = describe_exception(exc)
    assert info.suppress
    back = rebuild_exception(info, "box")
    assert back.__cause__ is None and back.__suppress_context__ and "ValueError" in back.remote_traceback
    assert isinstance(rebuild_exception(ErrorInfo("ValueError", "x", [], ""), "box").__cause__,
                      pycompart.RemoteTraceback)


def test_unprintable_exception_is_described():
    class Nasty(Exception):
        def __str__(self):
            raise RuntimeError("no")
    assert describe_exception(Nasty()).message == "<unprintable>"


def test_untyped_entrypoint_only_returns_plain_data():
    def untyped(x):
        return x
    untyped.__module__ = "m"
    c = Contract(untyped)
    assert c.return_type is Any
    assert c.decode_result(c.invoke(c.encode_args(({"a": [1, b"x"]},), {})), "t") == {"a": [1, b"x"]}


def test_no_argument_fast_path_still_refuses_arguments():
    c = Contract(boxed.null)
    assert c.invoke(msgspec.Raw(c.encode_args((), {}))) == msgspec.msgpack.encode(None)
    with pytest.raises(TypeError):
        c.invoke(msgspec.msgpack.encode({"smuggled": 1}))


def test_oserror_keeps_errno_strerror_and_file_names():
    """``str(e)`` of a failed open names the path; so must the rebuilt one."""
    for exc in (FileNotFoundError(2, "No such file or directory", "/data/in.txt"),
                PermissionError(13, "Permission denied", "/a", None, "/b"),
                OSError(5, "I/O error", b"/raw/bytes"), IsADirectoryError(21, "Is a directory", 3)):
        back = rebuild_exception(describe_exception(exc), "box")
        assert type(back) is type(exc), (back, exc)
        assert (back.errno, back.strerror, back.filename, back.filename2) == \
            (exc.errno, exc.strerror, exc.filename, exc.filename2)
        assert str(back) == str(exc)


def test_bytes_arguments_and_attributes_cross():
    exc = UnicodeDecodeError("utf-8", b"\xff\xfe", 0, 1, "invalid start byte")
    exc.detail = b"raw"
    back = rebuild_exception(describe_exception(exc), "box")
    assert type(back) is UnicodeDecodeError and back.object == b"\xff\xfe" and back.detail == b"raw"
    assert str(back) == str(exc)


def test_rebuild_never_raises_on_lying_attributes():
    """A typed slot given a value of the wrong type (the red team's
    ``characters_written = "x"`` on a BlockingIOError) is left alone."""
    from pycompart.wire.protocol import ErrorInfo
    info = ErrorInfo("BlockingIOError", "x", [11, "would block"], "", ["BlockingIOError"],
                     {"characters_written": "x", "errno": "not a number", "args": "forged"})
    back = rebuild_exception(info, "box")
    assert type(back) is BlockingIOError and back.args == (11, "would block")


def test_a_deep_traceback_is_described_by_its_outermost_frames():
    """A RecursionError's thousand frames are not formatted (that took the
    compartment longer than the call): only TRACEBACK_FRAMES of them."""
    from pycompart.wire.exceptions import TRACEBACK_FRAMES

    def down(n: int) -> int:  # two functions in turn: no repeated line to collapse
        return across(n + 1)

    def across(n: int) -> int:
        return down(n + 1)
    try:
        down(0)
    except RecursionError as exc:
        info = describe_exception(exc)
    frames = info.traceback.count("File ")
    assert 0 < frames <= TRACEBACK_FRAMES + 1, frames


def _raised(fn: Any) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - each case's exception, whatever it is
        return exc
    raise AssertionError("did not raise")


def _chained() -> None:
    try:
        {}["key"] + 1
    except KeyError as exc:
        raise ValueError("from a cause") from exc


def _in_handling() -> None:
    try:
        [][1]
    except IndexError:
        raise TypeError("while handling")  # noqa: B904 - the implicit context is the case


def _suppressed() -> None:
    try:
        [][1]
    except IndexError:
        raise TypeError("context suppressed") from None


def _noted() -> None:
    exc = ValueError("with a note")
    exc.add_note("the note")
    raise exc


def _cycle() -> None:
    a, b = ValueError("a"), TypeError("b")
    a.__context__, b.__context__ = b, a
    raise a


def _group() -> None:
    raise ExceptionGroup("two", [ValueError("one"), KeyError("other")])


def test_a_traceback_is_described_as_traceback_formats_it_without_carets():
    """Line for line what ``traceback.format_exception`` prints (chains,
    notes, a cycle of contexts, a group), less its lines of carets, which
    3.11 places by parsing every frame's source line."""
    import re
    import traceback

    from pycompart.wire.exceptions import format_traceback

    def carets(text: str) -> bool:
        return bool(re.fullmatch(r"\s*[~^]+\s*", text))

    cases = [lambda: 1 / 0, _chained, _in_handling, _suppressed, _noted, _cycle, _group,
             lambda: exec("x = (1,\n")]
    stripped = 0
    for case in cases:
        exc = _raised(case)
        ours = format_traceback(exc, exc.__traceback__, 64)
        theirs = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=64)
        stripped += sum(map(carets, "".join(theirs).splitlines()))
        assert [line for line in ours.splitlines() if not carets(line)] == \
            [line for line in "".join(theirs).splitlines() if not carets(line)], case
        if not isinstance(exc, (BaseExceptionGroup, SyntaxError)):  # (a SyntaxError's own ^ stays)
            assert not any(carets(line) for line in ours.splitlines()), case
    assert stripped  # (traceback's own carets were there to leave out)


def test_a_long_chain_is_described_by_its_last_links_only(monkeypatch):
    """A compartment's exception whose chain is thousands of links long
    costs it the links described, not the whole chain for each (3.11's
    ``format_exception_only`` builds the rest of the chain, every frame of
    it, each time it is asked of one link)."""
    import traceback

    from pycompart.wire import exceptions as _exceptions

    exc: BaseException = ValueError("first")
    for i in range(300):
        try:
            raise KeyError(i) from exc
        except KeyError as raised:
            exc = raised
    extracted = []
    real = traceback.StackSummary._extract_from_extended_frame_gen.__func__

    def counting(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        extracted.append(1)
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(traceback.StackSummary, "_extract_from_extended_frame_gen", classmethod(counting))
    text = _exceptions.format_traceback(exc, exc.__traceback__, 64)
    assert text.count("KeyError: ") == _exceptions._CHAIN
    assert len(extracted) <= 2 * _exceptions._CHAIN, len(extracted)


def test_a_typed_set_of_keys_sharing_a_hash_is_refused_before_it_is_built():
    """A typed result annotated set[tuple[int, int]] is built by msgspec in
    C: keys of one hash made that quadratic (20,000 tuples: 3.7 s, holding
    the GIL). They are counted first. A dict keyed by tuples cannot be
    checked before msgspec hashes its keys: such an annotation is refused."""
    import typing

    import msgspec

    from pycompart.wire.contract import Contract

    def pairs() -> set[tuple[int, int]]: ...
    def table() -> typing.Optional[dict[tuple[int, int], int]]: ...
    def plain() -> dict[str, list[int]]: ...

    # hash(-1) == hash(-2): each pair of these tuples shares a hash.
    colliding = [(i, -1) for i in range(100)] + [(i, -2) for i in range(100)]
    with pytest.raises(ProtocolError, match="share a hash"):
        Contract(pairs).decode_result(msgspec.msgpack.encode(colliding), "box")
    with pytest.raises(EntrypointError, match="a dict keyed by"):
        Contract(table)
    fine = [(i, i) for i in range(1000)]
    assert Contract(pairs).decode_result(msgspec.msgpack.encode(fine), "box") == set(fine)
    assert not Contract(plain)._result_floods  # nothing to count: decoded once


def test_a_typed_any_result_with_a_map_keyed_by_arrays_is_refused():
    import typing

    import msgspec

    from pycompart.wire.contract import Contract

    def anything() -> typing.Any: ...
    payload = msgspec.msgpack.encode({(i, -1): 1 for i in range(5000)})
    with pytest.raises(ProtocolError, match="map whose key"):
        Contract(anything).decode_result(payload, "box")


def test_a_typed_dict_keyed_by_datetimes_crosses_however_big():
    """msgspec sends a datetime key as its timestamp extension: a map key
    that is an extension, and yet legitimate (red team: refused past 16 KiB)."""
    import datetime

    import msgspec

    from pycompart.wire.contract import Contract

    def series() -> dict[datetime.datetime, int]: ...
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    value = {start + datetime.timedelta(minutes=i): i for i in range(2000)}
    payload = msgspec.msgpack.encode(value)
    assert len(payload) > 16 * 1024
    assert Contract(series).decode_result(payload, "box") == value
