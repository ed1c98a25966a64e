"""The reference codec without processes (sans-IO): what crosses by value,
handle accounting, and hostile payloads from a compartment."""

import os
import sys

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from pycompart.wire import protocols, refs
from pycompart.errors import ProtocolError, StaleReference
from pycompart.frontend.proxy import Compartment, RemoteObject
from pycompart.policy.spec import load_spec

Ext = msgspec.msgpack.Ext
enc = msgspec.msgpack.Encoder()


class _Pool:
    ready = ()


def main_peer():
    spec = load_spec({"compartments": {"box": {"modules": ["boxlib"]}}}).compartments["box"]
    comp = Compartment(spec, _Pool())
    peer = comp.make_peer()
    peer.instance = None
    peer.pending_release = []
    return comp, peer


VALUES = [None, True, 0, -1, 2**63, -(2**63) - 1, 2**200, 1.5, 3 + 4j, "s", b"b", bytearray(b"ba"),
          [1, [2, (3, {4})]], (1,), (), {"a": 1}, {(1, 2): "t", 3: frozenset({4})}, set(), frozenset()]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_plain_values_round_trip_with_their_types(value):
    _, peer = main_peer()
    back = peer.decode(peer.encode(value))
    assert back == value and type(back) is type(value)
    assert len(peer.exports) == 0  # nothing was exported


def test_module_globals_and_modules_are_refused():
    _, peer = main_peer()
    for value in (globals(), vars(sys.modules["os"]), __builtins__ if isinstance(__builtins__, dict)
                  else vars(__builtins__), [sys.modules[__name__]], {"x": pytest}):
        with pytest.raises(TypeError):
            peer.encode(value)
    # Modules of the standard library cross by name (the far side's own copy).
    assert len(peer.encode([os, sys])) < 64 and len(peer.exports) == 0


def test_other_objects_are_exported_and_counted():
    _, peer = main_peer()
    obj = object()
    f = lambda: 1  # noqa: E731
    peer.encode([obj, obj, f])
    assert len(peer.exports) == 2
    handle = next(h for h, e in peer.exports._by_handle.items() if e[0] is obj)
    assert peer.exports._by_handle[handle][1] == 2
    assert peer.exports.release(handle, 1) and len(peer.exports) == 2
    assert peer.exports.release(handle, 1) and len(peer.exports) == 1
    # A peer that releases what it never had, or too much, changes nothing.
    assert not peer.exports.release(handle, 1)
    assert not peer.exports.release(10**9, 1) and not peer.exports.release("x", 1)
    assert not peer.exports.release(1, -5)


def test_export_table_is_bounded():
    exports = refs.Exports(limit=3)
    for _ in range(3):
        exports.export(object())
    with pytest.raises(ProtocolError, match="not releasing"):
        exports.export(object())


def test_references_become_one_proxy_each_and_release_their_count():
    comp, peer = main_peer()
    ref = Ext(refs.EXT_REF, enc.encode([7, "boxlib.Thing#1", protocols.F_LEN, "boxlib.Thing"]))
    a, b = peer.decode(enc.encode([ref, ref]))
    assert a is b and isinstance(a, RemoteObject) and hasattr(a, "__len__") and not callable(a)
    del a, b
    assert peer.pending_release == [(7, 2)]


def test_a_compartment_cannot_name_what_is_not_placed_in_it():
    _, peer = main_peer()
    for module, qualname in (("os", "system"), ("builtins", "eval"), ("boxlibx", "f")):
        payload = enc.encode(Ext(refs.EXT_PATH, enc.encode([module, qualname, "function", []])))
        with pytest.raises(ProtocolError, match="not placed"):
            peer.decode(payload)
    ok = peer.decode(enc.encode(Ext(refs.EXT_PATH, enc.encode(["boxlib.sub", "f", "function", []]))))
    assert ok.__qualname__ == "f"


def test_handles_main_never_exported_are_stale():
    _, peer = main_peer()
    with pytest.raises(StaleReference):
        peer.decode(enc.encode(Ext(refs.EXT_YOURS, enc.encode(42))))


def test_deep_nesting_is_refused_both_ways():
    _, peer = main_peer()
    deep: object = []
    for _ in range(refs.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(TypeError, match="nested"):
        peer.encode(deep)
    data = enc.encode(1)
    for _ in range(5000):
        data = enc.encode(Ext(refs.EXT_TUPLE, enc.encode([Ext(refs.EXT_TUPLE, data)])))
    with pytest.raises(ProtocolError):
        peer.decode(data)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=20),
                     st.binary(max_size=20), st.floats(allow_nan=False))


def _ext_payloads():
    inner = st.recursive(_scalars, lambda kids: st.lists(kids, max_size=4), max_leaves=12)
    return st.builds(lambda code, body, raw: Ext(code, raw if raw is not None else enc.encode(body)),
                     st.integers(-128, 127) | st.sampled_from(range(1, 15)), inner,
                     st.none() | st.binary(max_size=30))


@settings(max_examples=400, deadline=None)
@given(st.recursive(_scalars | _ext_payloads(), lambda kids: st.lists(kids, max_size=4),
                    max_leaves=20))
def test_hostile_payloads_only_raise_protocol_errors(value):
    _, peer = main_peer()
    try:
        peer.decode(enc.encode(value))
    except (ProtocolError, StaleReference):
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_raise_protocol_errors(data):
    _, peer = main_peer()
    try:
        peer.decode(data)
    except (ProtocolError, StaleReference):
        pass


def test_caches_keyed_by_what_a_compartment_sends_are_bounded():
    """Finding 7: one proxy class per distinct flags value (40,000 kept),
    stand-ins per name (100,000), exception classes per named ancestor
    (5,000): main's memory was the compartment's to grow."""
    from pycompart.frontend import proxy
    from pycompart.wire.protocol import ErrorInfo

    spec = load_spec({"compartments": {"box": {"modules": ["boxmod"]}}}).compartments["box"]
    comp = Compartment(spec, pool=None)
    peer = comp.make_peer()
    peer.instance = None
    for flags in range(40_000):
        peer.decode(refs._encoder.encode(refs.Ext(refs.EXT_REF, refs._encoder.encode(
            [flags + 1, f"T#{flags}", flags << 3, "T"]))))
    assert len(proxy._classes) <= 2 ** 14 and len(proxy._classes) <= proxy.MAX_CACHED
    for i in range(20_000):
        peer.decode(refs._encoder.encode(refs.path_ext("boxmod", f"f{i}", "function")))
        comp.exception(ErrorInfo(f"boxmod.E{i}", "x", [], "", [f"boxmod.E{i}", f"boxmod.Base{i}",
                                                                 "ValueError", "Exception"]))
    assert len(comp._paths) <= proxy.MAX_CACHED and len(comp._standins) <= proxy.MAX_CACHED


def test_type_keys_carry_no_addresses():
    """Finding 14: type keys were ``name@id(type)``: main's heap and
    libpython addresses, sent to the compartment."""
    peer = refs.Peer("box", lambda *a: None, lambda p, v: None, lambda *a: None)

    class Thing:
        pass
    key = peer.type_key(Thing)
    assert key.endswith("#1") and f"{id(Thing):x}" not in key
    assert peer.type_key(Thing) == key and peer.type_key(dict).endswith("#2")


def test_standard_containers_cross_by_value_with_their_types():
    import collections

    _, peer = main_peer()
    dd = collections.defaultdict(int, {"a": 1, (1, 2): [3]})
    od = collections.OrderedDict([("z", 1), ("a", 2)])
    counter = collections.Counter("abca")
    dq = collections.deque([1, (2, 3)], maxlen=5)
    for value in (dd, od, counter, dq, [dd, {"x": od}]):
        back = peer.decode(peer.encode(value))
        assert back == value and type(back) is type(value)
    back = peer.decode(peer.encode(dd))
    assert back.default_factory is int and back["missing"] == 0
    assert list(peer.decode(peer.encode(od))) == ["z", "a"]
    assert peer.decode(peer.encode(dq)).maxlen == 5
    assert len(peer.exports) == 0


def test_malformed_containers_are_protocol_errors():
    from pycompart.wire import refs

    _, peer = main_peer()
    for fields in (["deque", [1], -1], ["deque", "x", None], ["defaultdict", [1], None],
                   ["defaultdict", [1, 2], 5], ["counter"], ["nope", []], [], ["ordereddict", [1, 2], 3]):
        data = refs._encoder.encode(refs.Ext(refs.EXT_CONTAINER, refs._encoder.encode(fields)))
        with pytest.raises(ProtocolError):
            peer.decode(data)


def test_an_export_survives_the_id_of_a_dead_lent_object_being_reused():
    """A lent object dies before the peer releases it; a new object then
    gets its id(): exporting that one must work, and nothing of the dead
    one stays behind once released."""
    from pycompart.wire.refs import Exports

    class Thing:
        pass

    exports = Exports()
    first = Thing()
    old_id = id(first)
    handle = exports.export_weak(first)
    del first
    for _ in range(10_000):
        candidate = Thing()
        if id(candidate) == old_id:
            break
        del candidate
    else:
        pytest.skip("the allocator did not reuse the id")
    new_handle = exports.export(candidate)  # 0.4 before the fix: KeyError
    assert new_handle != handle and exports.get(new_handle) is candidate
    assert exports.release(handle, 1)
    assert exports.get(new_handle) is candidate
    assert exports.release(new_handle, 1) and len(exports) == 0 and not exports._by_id


def test_standard_values_cross_by_value_with_their_types_paths_included():
    import datetime
    import decimal
    import fractions
    import pathlib
    import uuid

    _, peer = main_peer()
    values = [decimal.Decimal("1.25"), fractions.Fraction(3, 7), datetime.datetime(2026, 12, 1, 19, 30),
              datetime.date(2026, 12, 1), datetime.time(7, 8, 9), datetime.timedelta(days=2, seconds=5),
              datetime.timezone(datetime.timedelta(hours=2)), uuid.UUID(int=12345), range(1, 10, 3),
              pathlib.PurePosixPath("a/b"), pathlib.PosixPath("/etc/passwd")]
    for value in values:
        back = peer.decode(peer.encode(value))
        assert back == value and type(back) is type(value)
    assert len(peer.exports) == 0  # by value, not as references


def test_aware_datetimes_cross_by_value_when_their_zone_can_be_rebuilt():
    # A ZoneInfo crosses by its key; a well-known package's fixed-offset
    # tzinfo (dateutil's tzoffset: what dateutil.parser gives "+02:00") as
    # a datetime.timezone of that offset. isinstance(d, datetime) holds.
    import datetime
    import zoneinfo

    class tzoffset(datetime.tzinfo):  # dateutil's, as the sender sees its class
        def __init__(self, name, seconds):
            self.name, self.offset = name, datetime.timedelta(seconds=seconds)

        def utcoffset(self, dt):
            return self.offset

        def tzname(self, dt):
            return self.name

        def dst(self, dt):
            return datetime.timedelta(0)
    tzoffset.__module__, tzoffset.__qualname__ = "dateutil.tz.tz", "tzoffset"

    _, peer = main_peer()
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    for value, tz in ((datetime.datetime(2022, 7, 1, 12, tzinfo=paris), paris),
                      (datetime.datetime(2022, 12, 25, 8, 30, tzinfo=tzoffset(None, 7200)),
                       datetime.timezone(datetime.timedelta(hours=2))),
                      (datetime.datetime(2022, 1, 1, tzinfo=tzoffset("EST", -18000)),
                       datetime.timezone(datetime.timedelta(hours=-5), "EST")),
                      (datetime.time(8, tzinfo=tzoffset("UTC", 0)), datetime.timezone.utc)):
        back = peer.decode(peer.encode(value))
        assert type(back) is type(value) and back == value and back.tzinfo == tz
        assert back.utcoffset() == value.utcoffset()
        assert back.tzname() == (value.tzname() if value.tzname() is not None else tz.tzname(None))
    assert len(peer.exports) == 0

    class Rules(datetime.tzinfo):  # a tzinfo with rules of its own: a reference, as before
        def utcoffset(self, dt):
            return datetime.timedelta(hours=1 if dt and dt.month < 6 else 2)
    peer.encode(datetime.datetime(2022, 1, 1, tzinfo=Rules()))
    assert len(peer.exports) == 1
    peer.encode(paris)  # a zone alone (no instant, so no offset to fall back to): a reference too
    assert len(peer.exports) == 2


def test_a_zone_the_receiver_cannot_load_keeps_its_offset():
    # (A compartment whose lock-down hides the time zone data.)
    import datetime

    from pycompart.wire import refs

    _, peer = main_peer()
    fields = [2022, 7, 1, 12, 0, 0, 0, ["zoneinfo", "No/Such_Zone", 0, 7200, 0, "CEST"], 0]
    back = peer.decode(refs._encoder.encode(refs.Ext(refs.EXT_STD, refs._encoder.encode(["datetime", fields]))))
    assert back == datetime.datetime(2022, 7, 1, 12, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert back.tzname() == "CEST"


def test_a_peer_naming_many_zones_costs_one_lookup_each(monkeypatch):
    # zoneinfo keeps only 8 zones: without a cache of our own, every value
    # naming a zone read a file again.
    import zoneinfo

    from pycompart.wire import refs

    made = []
    real = zoneinfo.ZoneInfo

    def counting(key):
        made.append(key)
        return real(key)
    monkeypatch.setattr(zoneinfo, "ZoneInfo", counting)
    monkeypatch.setattr(refs, "_ZONES", {})
    _, peer = main_peer()
    keys = ["Europe/Paris", "Asia/Tokyo", "America/New_York"] + [f"No/Zone_{i}" for i in range(20)]
    for _ in range(3):
        for key in keys:
            fields = [2022, 7, 1, 12, 0, 0, 0, ["zoneinfo", key, 0, 3600, 0, None], 0]
            peer.decode(refs._encoder.encode(refs.Ext(refs.EXT_STD, refs._encoder.encode(["datetime", fields]))))
    assert sorted(made) == sorted(keys)
    monkeypatch.setattr(refs, "MAX_ZONES", 4)
    monkeypatch.setattr(refs, "_ZONES", {})
    for i in range(50):
        refs._zone(f"No/Zone_{i}")
    assert len(refs._ZONES) == 4


def test_malformed_zones_are_protocol_errors():
    from pycompart.wire import refs

    _, peer = main_peer()
    when = [2022, 1, 1, 0, 0, 0, 0]
    for kind, fields in (("zoneinfo", "Europe/Paris"),  # a zone alone never crosses by value
                         ("datetime", [*when, ["zoneinfo", "../../../etc/passwd", 0, 0, 0, None], 0]),
                         ("datetime", [*when, ["zoneinfo", "/etc/localtime", 0, 0, 0, None], 0]),
                         ("datetime", [*when, ["zoneinfo", "x" * 300, 0, 0, 0, None], 0]),
                         ("datetime", [*when, ["zoneinfo", "", 0, 0, 0, None], 0]),
                         ("datetime", [*when, ["zoneinfo", 5, 0, 0, 0, None], 0]),
                         ("datetime", [*when, ["zoneinfo", "Europe/Paris"], 0]),
                         ("timezone", ["zoneinfo", "Europe/Paris", 0, 3600, 0, None]), ("timezone", None)):
        data = refs._encoder.encode(refs.Ext(refs.EXT_STD, refs._encoder.encode([kind, fields])))
        with pytest.raises(ProtocolError):
            peer.decode(data)


def test_references_do_not_import_pathlib_until_a_path_is_seen():
    # pycompart run's start-up does not pay for pathlib; a path the program
    # makes later still crosses by value.
    import subprocess

    code = ("import sys; from pycompart.wire import refs; assert 'pathlib' not in sys.modules; "
            "import pathlib; enc = refs._std_encoder(pathlib.PosixPath); "
            "assert enc is not None and enc(pathlib.PosixPath('/x')) == ('path', '/x'); "
            "assert refs._std_encoder(pathlib.PurePosixPath)(pathlib.PurePosixPath('y')) == ('purepath', 'y')")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))


def test_the_by_type_shortcut_never_changes_how_a_value_crosses():
    """Once a type is known to cross only by reference, its values skip the
    other checks; no type whose values may cross otherwise is taken for one
    (modules, classes, descriptors, file objects, the END/METHOD markers)."""
    import io
    import pathlib
    import types

    _, peer = main_peer()

    class Plain:
        pass

    class MyDict(dict):
        pass

    values = [Plain(), lambda: 1, MyDict(a=1), pathlib.PurePosixPath("/x"), io.BytesIO(b"x"),
              refs.END, refs.METHOD, Ellipsis, int, Plain, types.ModuleType("m"), os]
    first = []
    for value in values:
        try:
            first.append(peer.encode(value))
        except TypeError as exc:
            first.append(str(exc))
    for value, before in zip(values, first):
        try:
            again = peer.encode(value)
        except TypeError as exc:
            again = str(exc)
        assert again == before, value
    for tp in (type, type(refs.END), io.BytesIO, types.ModuleType, pathlib.PurePosixPath):
        assert tp not in refs._BY_REFERENCE
    assert Plain in refs._BY_REFERENCE and MyDict in refs._BY_REFERENCE
    assert peer.decode(peer.encode([refs.END, Ellipsis])) == [refs.END, Ellipsis]


def test_a_plain_request_encodes_as_the_general_path_does():
    """``call_plain`` skips ``to_wire``: only for arguments that it would
    return unchanged, so both ways put the same bytes on the wire."""
    import enum

    from pycompart.frontend.proxy import PathFunction

    comp, peer = main_peer()
    fn = PathFunction(comp, "boxlib", "f")
    for args in [(), (None, True, False, 0, -1, 2**64 - 1, -(2**63), 1.5, "s", b"b")]:
        assert refs.plain(args)
        general = peer.encode([fn, list(args), {}])
        assert refs.encode_wire([comp.path_ext(fn.__pycompart_path__), list(args), {}]) == general

    class Colour(enum.IntEnum):
        RED = 1

    class Name(str):
        pass

    for value in (2**64, -(2**63) - 1, Colour.RED, Name("n"), bytearray(b"b"), [1], (1,), {}, 1j, fn):
        assert not refs.plain((1, value)), value


def test_a_peer_keeps_the_paths_it_resolved_but_not_its_refusals():
    """Each path is resolved once (a module-level call names its function
    every time); a refused one is refused every time; the cache is bounded,
    whatever names the other side makes up."""
    import types

    asked = []

    def from_path(peer, module, qualname, kind, mro):
        asked.append(qualname)
        if qualname.startswith("secret"):
            raise PermissionError(f"{qualname} is not the compartment's")
        if qualname == "value":
            return [1, 2]  # not a module, class or function: looked up each time
        return types.FunctionType((lambda: None).__code__, {}, qualname)

    peer = refs.Peer("box", lambda *a: None, lambda p, v: None, from_path)
    payload = lambda q: enc.encode(refs.path_ext("mod", q, "function"))  # noqa: E731
    first = peer.decode(payload("f"))
    assert peer.decode(payload("f")) is first and asked == ["f"]
    for _ in range(2):
        with pytest.raises(PermissionError):
            peer.decode(payload("secret"))
        assert peer.decode(payload("value")) == [1, 2]
    assert asked == ["f", "secret", "value", "secret", "value"]
    for i in range(refs.MAX_PATHS + 100):
        peer.decode(payload(f"g{i}"))
    assert len(peer._paths) == refs.MAX_PATHS


def test_what_a_peer_keeps_of_its_paths_is_bounded_in_size_too():
    """Red team: a path padded with a long class list (ignored for a module)
    was kept whole, ~200 KiB an entry; refused as the key beyond
    MAX_PATH_BYTES. A guarded server keeps none (each use is checked
    against what it owns now); a closed peer drops what it kept."""
    import types

    from pycompart.compartment.objects import ObjectServer, instance_peer

    fn = types.FunctionType((lambda: None).__code__, {}, "f")
    peer = refs.Peer("box", lambda *a: None, lambda p, v: None, lambda *a: fn)
    padded = enc.encode(Ext(refs.EXT_PATH, enc.encode(["mod", "", "module", ["x" * 1000] * 20])))
    for _ in range(3):
        assert peer.decode(padded) is fn
    assert not peer._paths
    assert peer.decode(enc.encode(refs.path_ext("mod", "f", "function"))) is fn and len(peer._paths) == 1
    peer.close()
    assert not peer._paths
    peer.keep_paths = False
    assert peer.decode(enc.encode(refs.path_ext("mod", "f", "function"))) is fn and not peer._paths
    assert instance_peer(ObjectServer("x", ["json"], [], [], False, trusts_main=False)).keep_paths is False
    assert instance_peer(ObjectServer("x", ["json"], [], [], False, trusts_main=True)).keep_paths is True


def test_a_compartment_whose_call_is_wrapped_takes_no_direct_path():
    """An edge's ``call`` writes its report and defers cancels: ``call_plain``
    would skip it, so a subclass overriding ``call`` is never ``direct``."""
    from pycompart.frontend.edgeproxy import EdgeCompartment

    comp, _ = main_peer()
    assert comp.direct
    assert EdgeCompartment.call is not Compartment.call

    class Wrapped(Compartment):
        def call(self, inst, op, args):  # type: ignore[no-untyped-def]
            return super().call(inst, op, args)

    spec = load_spec({"compartments": {"box": {"modules": ["boxlib"]}}}).compartments["box"]
    assert not Wrapped(spec, _Pool()).direct


SURROGATE_VALUES = ["a\udc80b", ["x", "\ud800"], {"k\udcff": "v\udcff"}, ("\udce9",), {"\udce9"},
                    frozenset({"\udce9", "ok"}), __import__("collections").deque(["\udce9"]),
                    __import__("collections").OrderedDict([("\udce9", 1)]),
                    __import__("pathlib").PurePosixPath("caf\udce9.txt")]


@pytest.mark.parametrize("value", SURROGATE_VALUES, ids=repr)
def test_strings_with_lone_surrogates_cross_exactly(value):
    """msgpack holds only valid UTF-8: such a str (os.fsdecode of a name
    that is not UTF-8, pyparsing's character ranges) failed to encode, and
    a compartment returning one died."""
    _, peer = main_peer()
    back = peer.decode(peer.encode(value))
    assert back == value and type(back) is type(value)


def test_an_error_with_lone_surrogates_can_always_be_sent():
    from pycompart.wire.exceptions import describe_exception
    from pycompart.wire.protocol import Connection

    caller, callee = Connection(1 << 20), Connection(1 << 20)
    rid, frame = caller.send_call("m:f", b"\x90")
    callee.receive_data(frame)
    callee.next_event()
    try:
        "a\udc80".encode()
    except UnicodeEncodeError as exc:
        info = describe_exception(exc)
    caller.receive_data(callee.send_err(rid, info))
    event = caller.next_event()
    assert event.error.type_name == "UnicodeEncodeError" and "\\udc80" in event.error.args[1]


def test_a_datetime_whose_zone_is_not_a_tzinfo_is_refused():
    """A datetime's zone may come as a reference (a zone with rules of its
    own): one that is not a tzinfo (main's own object, or the peer's) is a
    malformed value, never an aware datetime."""
    _, peer = main_peer()
    obj = object()
    handle = peer.exports.export(obj)
    for zone in (Ext(refs.EXT_YOURS, enc.encode(handle)),
                 Ext(refs.EXT_REF, enc.encode([99, "t#1", 0, "Thing"]))):
        value = Ext(refs.EXT_STD, enc.encode(["datetime", [2020, 1, 1, 0, 0, 0, 0, zone, 0]]))
        with pytest.raises(ProtocolError):
            peer.decode(enc.encode(value))


P61 = 2**61 - 1  # hash(n) is n mod P61: these ints all share one hash


@pytest.mark.parametrize("kind", ["set", "frozenset", "dict", "counter"])
def test_a_set_or_dict_of_keys_sharing_one_hash_is_refused(kind):
    """Red team: 100,000 tuples of one hash made main build their set for
    100 s, in C, holding the GIL: every thread of main stopped. Keys of
    one hash past a bound are a ProtocolError, found in linear time."""
    _, peer = main_peer()
    keys = [7 + k * P61 for k in range(1, 3000)]
    assert len({hash(k) for k in keys}) == 1
    value = {"set": set(keys), "frozenset": frozenset(keys), "dict": dict.fromkeys(keys, 1),
             "counter": __import__("collections").Counter(dict.fromkeys(keys, 1))}[kind]
    data = peer.encode(value)
    with pytest.raises(ProtocolError, match="share a hash"):
        peer.decode(data)
    fine = {"set": set(range(3000)), "frozenset": frozenset(range(3000)),
            "dict": dict.fromkeys(range(3000), 1),
            "counter": __import__("collections").Counter(range(3000))}[kind]
    assert peer.decode(peer.encode(fine)) == fine


def test_a_map_keyed_by_arrays_is_refused_before_msgspec_hashes_them():
    """msgspec decodes a map's array keys as tuples, hashing them as it
    reads (in C, holding the GIL): the codec never sends such a map (its
    dicts of tuples are EXT_DICT, counted first), so a peer's is refused,
    nested in an extension too."""
    _, peer = main_peer()
    keyed = {(i, -1): 1 for i in range(5000)}
    for data in (enc.encode(keyed), enc.encode([1, keyed]),
                 enc.encode(Ext(refs.EXT_TUPLE, enc.encode([keyed])))):
        assert len(data) > 16 * 1024
        with pytest.raises(ProtocolError, match="map whose key"):
            peer.decode(data)
    # What the codec itself sends of such a dict, and big plain maps, pass.
    assert peer.decode(peer.encode(keyed)) == keyed
    plain = {f"k{i}": [i, float(i)] for i in range(5000)}
    assert peer.decode(peer.encode(plain)) == plain


def test_hashing_a_peers_object_while_decoding_is_bounded_however_it_comes(monkeypatch):
    """A key's hash is a round trip to its owner: whether the key came in
    a set, an EXT_DICT or (from a hostile peer) a msgpack map, those round
    trips share one deadline (``decode_deadline``), and none is left set
    after the decode."""
    comp, peer = main_peer()
    peer.decode_timeout = 30.0
    seen = []

    def op(self, name, *args):
        seen.append((name, refs.decode_deadline()))
        return 5
    monkeypatch.setattr(RemoteObject, "_pc_op", op)
    flags = protocols.F_EQ | protocols.F_HASH
    ref = Ext(refs.EXT_REF, enc.encode([1, "t#1", flags, "Key"]))
    native_map = b"\x81" + enc.encode(ref) + b"\x01"  # {ref: 1}, as no pycompart sends it
    for data in (native_map, enc.encode(Ext(refs.EXT_SET, enc.encode([ref]))),
                 enc.encode(Ext(refs.EXT_DICT, enc.encode([ref, 1])))):
        seen.clear()
        peer.decode(data)
        assert seen and all(name == "hash" and deadline is not None for name, deadline in seen), seen
        assert refs.decode_deadline() is None


def _trailing_surrogates():
    # A str with lone surrogates whose raw payload ends like a str16 header:
    # walked as msgpack, it ran past the message and the walk gave up.
    return Ext(refs.EXT_SURROGATES, "\ud800\u0680".encode("utf-8", "surrogatepass"))


def test_the_walks_cannot_be_cut_short_by_a_raw_extension_payload():
    """Red team: a trailing extension whose payload is raw bytes made both
    walks (object budget, map keys) read past the message and pass it:
    20,000 colliding keys decoded in 3.6 s, 30 million empty lists (2 GiB)
    came through."""
    _, peer = main_peer()
    keyed = {(i, -1): 1 for i in range(5000)}
    data = enc.encode([Ext(refs.EXT_TUPLE, enc.encode([keyed])), _trailing_surrogates()])
    with pytest.raises(ProtocolError, match="map whose key"):
        peer.decode(data)
    peer.max_objects = 10_000
    data = enc.encode([Ext(refs.EXT_TUPLE, enc.encode([[]] * 20_000)), _trailing_surrogates()])
    with pytest.raises(ProtocolError, match="objects"):
        peer.decode(data)
    peer.max_objects = 1_000_000
    truncated = enc.encode({f"k{i}": i for i in range(3000)})[:-3] + b"\xda\xff\xff"
    with pytest.raises(ProtocolError, match="well-formed"):  # a length past the end
        peer.decode(truncated)


def test_raw_extension_payloads_are_not_mistaken_for_msgpack():
    """Red team: the walks read a str with lone surrogates as msgpack and
    refused Dhivehi text beside one, and long emoji text beside one."""
    _, peer = main_peer()
    for value in (["\u0780\u0781 \udcff"] + [f"w{i}" for i in range(3000)],
                  "\U0001F600" * 400_000 + "\udcff", [2**70 + i for i in range(3000)]):
        assert peer.decode(peer.encode(value)) == value


def test_every_extension_is_walked_or_known_raw():
    """A new extension code must say whether its payload is msgpack (the
    walks of ``budget`` go into it) or raw bytes."""
    from pycompart.wire import budget

    raw_or_empty = {refs.EXT_BIGINT, refs.EXT_BYTEARRAY, refs.EXT_BUILTIN, refs.EXT_SURROGATES,
                    refs.EXT_END, refs.EXT_METHOD, refs.EXT_ELLIPSIS, refs.EXT_NOTIMPLEMENTED}
    codes = {v for k, v in vars(refs).items() if k.startswith("EXT_") and type(v) is int}
    assert codes - raw_or_empty == budget.MSGPACK_EXTENSIONS


def test_a_path_past_path_max_does_not_cross_as_a_value():
    """Red team: a 120 MB PurePosixPath (one str on the wire) made main's
    pathlib split and intern 20 million parts: 14 s past a 1 s timeout,
    2 GiB. Longer than PATH_MAX, a path is a reference (sent) or refused
    (received)."""
    import pathlib

    _, peer = main_peer()
    fine = pathlib.PurePosixPath("a/" * 2000 + "b")
    assert peer.decode(peer.encode(fine)) == fine
    forged = Ext(refs.EXT_STD, enc.encode(["purepath", "a/" * 3000]))
    with pytest.raises(ProtocolError):
        peer.decode(enc.encode(forged))
    long_one = pathlib.PurePosixPath("a/" * 3000)
    assert type(peer.decode(peer.encode(long_one))) is not pathlib.PurePosixPath  # by reference


def test_lookups_of_zones_a_peer_made_up_are_bounded(monkeypatch):
    """Red team: past the zone cache, each made-up key cost main a lookup
    (~45 us): 110,000 values held main 5 s on a 1 s call."""
    import zoneinfo

    looked = []

    def lookup(key):
        looked.append(key)
        raise zoneinfo.ZoneInfoNotFoundError(key)
    monkeypatch.setattr(zoneinfo, "ZoneInfo", lookup)
    monkeypatch.setattr(refs, "_ZONES", {f"Made/Up{i}": None for i in range(refs.MAX_ZONES)})
    monkeypatch.setattr(refs, "_zone_window", [0.0, 0])
    for i in range(1000):
        assert refs._zone(f"Europe/Nowhere{i}") is None  # (the value keeps its offset)
    assert len(looked) == refs.MAX_ZONE_LOOKUPS_PER_SECOND


def test_a_made_up_exception_ancestry_costs_one_stand_in_per_name(monkeypatch):
    """Red team: with the stand-in cache full (the compartment fills it),
    a made-up MRO whose classes fail to combine rebuilt each tail again
    for every class before it: 65,000 classes (~1 s) for 32 names, three
    times a warning, 100 warnings a call (300 s against a 1 s timeout)."""
    from pycompart.frontend import proxy, warn

    comp, _ = main_peer()
    monkeypatch.setattr(proxy, "MAX_CACHED", 0)  # as full as a compartment can make it
    mro = (["boxlib.A0"] + [f"boxlib.A{i % 4 + 1}" for i in range(26)]
           + ["ImportError", "boxlib.A9", "OSError", "boxlib.A8", "UnicodeDecodeError"])
    calls = []
    standin = proxy.Compartment.standin
    monkeypatch.setattr(proxy.Compartment, "standin",
                        lambda self, m, built=None: calls.append(1) or (
                            standin(self, m) if built is None else standin(self, m, built)))
    comp.standin(mro)
    assert len(calls) < 100, len(calls)
    calls.clear()
    warn._category(comp, mro + ["UserWarning"])
    assert len(calls) < 100, len(calls)


def test_the_digits_of_numbers_count_against_the_object_budget():
    """Red team: parsing a number costs ~20 ns a digit: 128 MiB of
    4300-digit fractions (each a few objects) held main ~2.7 s. Every 16
    digits of a big int, Decimal or Fraction count as one object more."""
    from fractions import Fraction

    _, peer = main_peer()
    big = Fraction(int("7" * 4299), int("3" * 4298 + "1"))
    with pytest.raises(ProtocolError, match="objects"):
        peer.decode(peer.encode([big] * 2000))
    assert peer.decode(peer.encode([big] * 50)) == [big] * 50
    ints = [2**14000 + i for i in range(300)]
    assert peer.decode(peer.encode(ints)) == ints
    with pytest.raises(ProtocolError, match="objects"):
        peer.decode(peer.encode([2**14000 + i for i in range(5000)]))
