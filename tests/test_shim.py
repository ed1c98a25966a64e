"""Module compartments: the import hook, remote references, callbacks,
exposure policy, shared data, and what happens when instances die."""

import gc
import os
import sys
import threading
import time
import types

import pytest

import interrupts
import pycompart
from pycompart.frontend.proxy import ModuleProxy, RemoteObject


def box_app(make_app, **extra):
    spec = {"modules": ["boxlib"], "may_call": ["main"], "restart_backoff": "10ms"}
    privileges = extra.pop("privileges", {"syscalls": "python-threads"})
    spec.update(extra)
    spec["privileges"] = privileges
    app = make_app({"compartments": {"box": spec}})
    return app


@pytest.fixture
def boxed(make_app):
    """A started app with boxlib placed in compartment "box"; yields the
    proxy module."""
    app = box_app(make_app)
    app.start(import_hook=True)
    import boxlib

    yield boxlib
    del sys.modules["boxlib"]
    app.stop()


def test_import_gives_a_proxy_module_run_elsewhere(boxed):
    import boxlib
    from boxlib import VERSION, make

    assert isinstance(boxlib, ModuleProxy) and boxlib is boxed
    assert VERSION == "1.2"
    assert boxlib.TABLE == {"a": [1, 2, (3, 4)], (1, 2): {5}}  # containers keep their types
    assert boxlib.pid() != os.getpid()
    assert make("c", 1).total() == 1
    assert "boxlib" not in {m.__name__ for m in sys.modules.values()
                           if isinstance(m, types.ModuleType) and not isinstance(m, ModuleProxy)}
    with pytest.raises(AttributeError):
        boxlib.no_such_name
    assert "make" in dir(boxlib)


def test_missing_placed_module_is_an_import_error(make_app):
    app = make_app({"compartments": {"box": {"modules": ["boxlib"]}}})
    app.start(import_hook=True)
    with pytest.raises(ModuleNotFoundError):
        import boxlib.nothing_here  # noqa: F401
    del sys.modules["boxlib"]


def test_remote_objects_forward_methods_attributes_and_protocols(boxed):
    c = boxed.make("c", 3, 1, 2)
    assert isinstance(c, RemoteObject)
    assert c.name == "c" and c.values == [3, 1, 2]  # attributes by value
    assert c.total(scale=2) == 12
    assert c.add(5) is c  # the same remote object gives the same proxy
    assert len(c) == 4 and list(c) == [3, 1, 2, 5] and c[0] == 3 and 5 in c and 9 not in c
    c[0] = 10
    assert c[0] == 10
    assert repr(c) == "Counter('c', [10, 1, 2, 5])" and str(c) == "counter c" and f"{c}" == "counter c"
    with c as inner:
        assert inner is c and c.entered == 1
    assert c.entered == 0
    with c:
        raise KeyError("swallowed by the remote __exit__")
    with pytest.raises(ValueError):
        with c:
            raise ValueError("not swallowed")
    d = boxed.make("d", 10, 1, 2, 5)
    assert c == d and hash(c) == hash(d) and c != boxed.make("e")
    assert boxed.make("small", 1) < c
    assert callable(boxed.make) and not callable(c)
    assert hasattr(c, "__len__") and not hasattr(boxed.make("o").add(1), "__call__")


def test_isinstance_against_proxied_classes(boxed):
    c = boxed.make("c")
    assert isinstance(c, boxed.Counter)
    assert not isinstance(c, boxed.Opaque) and not isinstance(3, boxed.Counter)
    assert isinstance(boxed.Counter("x"), boxed.Counter)
    assert issubclass(boxed.Counter, boxed.Counter)


def test_a_class_stand_in_has_its_metaclass_protocols(boxed):
    # enum.EnumMeta's: members by iteration, name, value and membership,
    # each asked of the class in the compartment; a plain class has none.
    Colour = boxed.Colour
    assert [c.name for c in Colour] == ["RED", "GREEN"] and len(Colour) == 2
    assert Colour["RED"] is Colour.RED and Colour(2) is Colour.GREEN
    assert Colour.RED in Colour and [c.name for c in reversed(Colour)] == ["GREEN", "RED"]
    assert bool(Colour) and boxed.is_red(list(Colour)[0])
    with pytest.raises(KeyError):
        Colour["BLUE"]
    assert not hasattr(type(boxed.Counter), "__iter__")
    with pytest.raises(TypeError):
        iter(boxed.Counter)
    with pytest.raises(TypeError):
        len(boxed.Counter)


def test_exceptions_become_catchable_stand_ins(boxed):
    with pytest.raises(boxed.BoxError) as info:
        boxed.fail(deep=True)
    exc = info.value
    assert type(exc) is boxed.DeepError and isinstance(exc, ValueError)
    assert isinstance(exc, pycompart.RemoteError) and str(exc) == "('it failed', 7)"
    assert exc.args == ("it failed", 7) and "Traceback" in exc.remote_traceback
    assert type(exc).__module__ == "boxlib" and type(exc).__name__ == "DeepError"


def test_callbacks_run_in_main(boxed):
    main_pid = os.getpid()
    assert boxed.apply(lambda x, y=0: (os.getpid(), x + y), 2, y=3) == (main_pid, 5)
    items = [boxed.make(n, v) for n, v in (("a", 3), ("b", 1), ("c", 2))]
    ordered = boxed.sort_with(items, key=lambda c: c.total())  # the key calls back into the box
    assert [c.name for c in ordered] == ["b", "c", "a"]
    assert ordered[0] is items[1]
    with pytest.raises(ZeroDivisionError):
        boxed.apply(lambda: 1 / 0)


def test_callbacks_nest_without_deadlock(boxed):
    def fn(depth):
        return 0 if depth == 0 else boxed.nest(fn, depth - 1) + 1

    assert boxed.nest(fn, 6) == 6


def test_callbacks_from_16_threads_each_side(boxed):
    """16 threads in main call the box; the box calls back from 4 threads of
    its own, and each callback calls into the box again."""
    errors = []

    def callback(i):
        return boxed.nest(lambda d: d * 10 + i, 1)

    def worker(t):
        try:
            for _ in range(3):
                assert boxed.threaded(callback, 4) == [10, 11, 12, 13]
                assert boxed.nest(lambda d: boxed.apply(lambda: d + t), 2) == 2 + t
        except BaseException as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors, errors


def test_callbacks_need_may_call(make_app):
    app = box_app(make_app, may_call=[])
    app.start(import_hook=True)
    import boxlib

    try:
        with pytest.raises(pycompart.EntrypointError, match="may_call"):
            boxlib.apply(lambda: 1)
        # The instance's own check can be bypassed by its code: main refuses too.
        assert boxlib.forge("@call", 1, [], {})[0] == "error"
    finally:
        del sys.modules["boxlib"]


def test_a_callback_outside_any_call_is_refused(boxed):
    boxed.keep(lambda: "kept")
    assert boxed.call_kept() == ["kept"]  # later, inside another call: fine
    # From the box's own thread with no call from main in flight there is no
    # thread in main to run it: the box gets an error, main is not disturbed.
    boxed.call_later(lambda: "late")
    time.sleep(0.6)
    result = boxed.late_result()
    assert result and result[0][:2] == ("error", "EntrypointError"), result
    assert "while main is calling" in result[0][2]


def test_compartment_cannot_reach_mains_objects(boxed):
    secret = {"key": "main's secret"}
    cb = lambda: secret["key"]  # noqa: E731
    assert boxed.keep(cb) >= 1
    # Main's objects are usable through their protocols (repr, len, +, ...),
    # never through attributes or anything else.
    for op, rest in (("@getattr", ["__globals__"]), ("@op", ["dir", []]),
                     ("@op", ["__getattribute__", ["__globals__"]]), ("@op", ["getattr", ["x"]]),
                     ("@callmethod", ["__call__", [], {}]), ("@import", [])):
        for handle in range(1, 8):
            outcome = boxed.forge(op, handle, *rest)
            assert outcome[0] == "error", (op, handle, outcome)
    # Forged handles that main never exported are refused.
    assert boxed.forge("@call", 10_000, [], {})[0] == "error"
    # A callback cannot hand over main's modules or globals (a module of the
    # standard library goes by name: the box gets its own copy).
    with pytest.raises(TypeError, match="module"):
        boxed.apply(lambda: sys.modules[__name__])
    with pytest.raises(TypeError, match="module"):
        boxed.apply(lambda: pycompart)
    assert boxed.apply(lambda: os).getpid() != os.getpid()
    with pytest.raises(TypeError, match="globals"):
        boxed.apply(lambda: globals())
    with pytest.raises(TypeError, match="globals"):
        boxed.apply(lambda: vars(sys.modules[__name__]))


def test_a_sandbox_exposes_its_internals_to_main(boxed):
    """main is the trusted side of a sandbox: it may reach private names and
    set attributes, as it could unboxed (a test suite does both)."""
    c = boxed.make("c")
    assert boxed._private_value == "hidden" and c._hidden == "hidden"
    c.name = "changed"
    assert c.name == "changed"
    boxed.VERSION = "2.0"
    assert boxed.VERSION == "2.0" and boxed.apply(lambda: 1) == 1


def test_exposure_policy(make_app):
    """A safebox is protected from main: private names and setattr refused."""
    app = box_app(make_app, trust="safebox")
    app.start(import_hook=True)
    import boxlib as boxed

    try:
        _check_exposure(boxed)
    finally:
        del sys.modules["boxlib"]


def _check_exposure(boxed):
    c = boxed.make("c")
    for get in (lambda: boxed._private_value, lambda: boxed.__secret__, lambda: c._hidden,
                lambda: c.__dict__, lambda: boxed.__builtins__, lambda: boxed.__dict__["x"],
                lambda: boxed.make.__globals__, lambda: boxed.Counter.__secret__):
        with pytest.raises((AttributeError, KeyError)):
            get()
    assert c.__class__.__module__ == "pycompart.frontend.proxy"  # the local proxy class, not the remote one
    with pytest.raises(AttributeError, match="allow_setattr"):
        c.name = "changed"
    assert c.name == "c"
    with pytest.raises(AttributeError, match="allow_setattr"):
        boxed.VERSION = "changed"
    with pytest.raises(AttributeError, match="allow_setattr"):
        boxed.Counter.LIMIT = 3  # (a class as a module: never only the stand-in's)
    with pytest.raises(AttributeError, match="allow_setattr"):
        del boxed.Counter.add


def test_expose_and_allow_setattr(make_app):
    app = box_app(make_app, trust="safebox", expose=["_private_value", "_hidden"], allow_setattr=True)
    app.start(import_hook=True)
    import boxlib

    try:
        assert boxlib._private_value == "hidden"
        c = boxlib.make("c")
        assert c._hidden == "hidden"
        c.name = "renamed"
        assert c.name == "renamed"
        with pytest.raises(AttributeError):
            c.__dict__
        # A class attribute set from main is the class's in the compartment
        # (it was set on main's stand-in only, and the package never saw it).
        boxlib.Counter.LIMIT = 7
        assert c.LIMIT == 7 and boxlib.make("d").LIMIT == 7
        del boxlib.Counter.LIMIT
        with pytest.raises(AttributeError):
            c.LIMIT
    finally:
        del sys.modules["boxlib"]


def test_shared_data_is_copied_in_at_instance_start(make_app):
    cfg = types.ModuleType("pc_test_config")
    cfg.LIMIT = {"max": 5}
    cfg.OTHER = "not shared"
    sys.modules["pc_test_config"] = cfg
    try:
        app = box_app(make_app, shared=["pc_test_config:LIMIT"])
        app.start(lazy=True, import_hook=True)
        cfg.LIMIT = {"max": 7}  # the value at instance start counts
        import boxlib

        assert boxlib.read_shared() == ({"max": 7}, ["LIMIT"])  # only the shared name
        del sys.modules["boxlib"]
    finally:
        del sys.modules["pc_test_config"]


def test_shared_data_must_be_plain_and_exist(make_app):
    app = box_app(make_app, shared=["pc_no_such_module:X"])
    app.start(lazy=True, import_hook=True)
    try:
        with pytest.raises(pycompart.CompartmentUnavailable, match="does not exist in main"):
            import boxlib  # noqa: F401  (the import asks the compartment, which cannot start)
    finally:
        sys.modules.pop("boxlib", None)


def test_released_references_do_not_accumulate(boxed):
    """100k remote objects created and dropped: both export tables stay small."""
    for _ in range(100):
        batch = boxed.make_many(1000)
        assert len(batch) == 1000
        del batch
    assert boxed.exported() < 1100
    for i in range(2000):
        boxed.make("x", i)
    assert boxed.exported() < 10
    for i in range(300):
        boxed.apply(lambda: i)
    assert boxed.held_callbacks() < 10


def test_references_survive_gc_while_held(boxed):
    c = boxed.make("keep", 1)
    for _ in range(50):
        boxed.make_many(10)
    gc.collect()
    assert c.total() == 1


def test_dead_compartment_then_stale_reference(make_app):
    app = box_app(make_app, restart_backoff="300ms")
    app.start(import_hook=True)
    import boxlib

    try:
        c = boxlib.make("c", 1)
        old = app.instances("box")
        with pytest.raises(pycompart.CompartmentCrashed):
            boxlib.crash()
        with pytest.raises(pycompart.CompartmentCrashed):
            c.total()  # dead, not yet replaced
        deadline = time.monotonic() + 10
        while (not app.instances("box") or app.instances("box") == old) and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(pycompart.StaleReference, match="replaced"):
            c.total()
        assert boxlib.make("new", 2).total() == 2  # module proxies move on
    finally:
        del sys.modules["boxlib"]


def test_functions_placement(make_app, tmp_path, monkeypatch):
    (tmp_path / "pc_fnmod.py").write_text(
        "import os\n"
        "def where():\n    return os.getpid()\n"
        "def here():\n    return os.getpid()\n")
    tmp_path.chmod(0o755)  # the compartment runs as nobody
    (tmp_path / "pc_fnmod.py").chmod(0o644)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = make_app({"compartments": {"box": {"functions": ["pc_fnmod:where"]}}})
    app.start(import_hook=True)
    try:
        import pc_fnmod

        assert pc_fnmod.here() == os.getpid()
        assert pc_fnmod.where() != os.getpid()
    finally:
        sys.modules.pop("pc_fnmod", None)


def test_module_already_imported_in_main_cannot_be_boxed(make_app):
    app = make_app({"compartments": {"box": {"modules": ["json"]}}})
    with pytest.raises(pycompart.PycompartError, match="already imported"):
        app.start(import_hook=True)
    app.stop()


def test_endless_callbacks_cannot_hold_main_past_the_timeout(make_app):
    app = box_app(make_app, call_timeout="1s", cancel_grace="200ms")
    app.start(import_hook=True)
    import boxlib

    def recovered():
        # The instance yields (its next callback is refused) or is killed
        # after the grace period and replaced; either way it serves again.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                return boxlib.pid() > 0
            except pycompart.CompartmentError:
                time.sleep(0.05)
        return False

    try:
        for attempt in (lambda: boxlib.spin_callbacks(lambda: None),
                        # From several threads at once, so that main never runs out
                        # of callbacks to serve and never has to wait (and look at
                        # the clock) in between.
                        lambda: boxlib.spin_threads(lambda: None, 6)):
            time.sleep(0.5)  # past any kill of the previous round's instance
            assert recovered()
            started = time.monotonic()
            with pytest.raises(pycompart.CallTimeout):
                attempt()
            assert time.monotonic() - started < 10
        assert recovered()
    finally:
        del sys.modules["boxlib"]


def test_a_module_placed_elsewhere_cannot_be_imported_in_a_compartment(make_app, tmp_path, monkeypatch):
    (tmp_path / "pc_other.py").write_text("X = 1\n")
    tmp_path.chmod(0o755)
    (tmp_path / "pc_other.py").chmod(0o644)
    monkeypatch.syspath_prepend(str(tmp_path))
    app = make_app({"compartments": {"box": {"modules": ["boxlib"]},
                                     "other": {"modules": ["pc_other"]}}})
    app.start(import_hook=True)
    import boxlib

    try:
        assert "placed in compartment 'other'" in boxlib.import_other("pc_other")
        assert "placed in compartment 'other'" in boxlib.import_other("pc_other.sub")
        assert boxlib.import_other("json") == "imported"  # not placed anywhere
    finally:
        del sys.modules["boxlib"]
        sys.modules.pop("pc_other", None)


def test_file_objects_cross_as_streams(boxed, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("line one\nline two\n")
    with open(path) as f:
        first, rest, name, refused = boxed.read_stream(f)
    assert (first, rest, name) == ("line one\n", "line two\n", str(path))
    # The stream is a capability for I/O on that file, nothing more.
    assert {"fileno", "buffer", "detach", "_checkClosed"} <= set(refused)


def test_module_calls_are_audited(make_app, tmp_path):
    log = tmp_path / "audit.jsonl"
    app = make_app({"app": {"audit_log": str(log)},
                    "compartments": {"box": {"modules": ["boxlib"], "may_call": ["main"]}}})
    app.start(import_hook=True)
    import boxlib

    try:
        boxlib.make("c", 1).total()
        boxlib.apply(lambda: 1)
        with pytest.raises(boxlib.BoxError):
            boxlib.fail()
    finally:
        del sys.modules["boxlib"]
    app.stop()
    import json

    records = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [(r["entrypoint"], r["target"], r["outcome"]) for r in records if r["event"] == "call"]
    assert ("@call", "boxlib:make", "ok") in calls
    assert ("@callmethod", "<boxlib.Counter object>.total", "ok") in calls
    assert ("@call", "boxlib:fail", "error:BoxError") in calls
    assert any(r["event"] == "callback" and r["caller"] == "box" and r["outcome"] == "ok"
               for r in records)


def test_a_star_import_does_not_rebind_mains_builtins(boxed):
    """Finding 12: ``from boxed import *`` bound the module's ``print``,
    ``open`` and ``input`` in main: main's own ``print(token)`` went to the
    compartment."""
    namespace = {}
    with pytest.warns(RuntimeWarning, match="'input', 'open', 'print'"):
        exec("from boxlib import *", namespace)
    assert "make" in namespace and "VERSION" in namespace
    assert not {"print", "open", "input"} & set(namespace)
    exec("print('secret-token')", namespace)  # main's own builtins
    assert boxed.stolen() == []


def test_a_star_import_does_not_rebind_the_modules_main_imported(boxed):
    """Red team: ``import json`` then ``from boxed import *`` whose
    ``__all__`` lists ``json``: main's ``json.dumps(secrets)`` went to the
    compartment. Names bound to something else are rebound, as unboxed."""
    import json

    namespace = {"make": json, "VERSION": 0}
    with pytest.warns(RuntimeWarning, match="'make'"):
        exec("from boxlib import *", namespace)
    assert namespace["make"] is json and namespace["VERSION"] == boxed.VERSION
    with pytest.warns(RuntimeWarning, match="'print'"):
        assert "make" in boxed.__all__  # read otherwise, it is the module's own


def test_main_never_runs_its_own_callable_on_a_compartments_word(boxed):
    """Finding 13: a callable main had handed over came back later as a
    module attribute; main called it (its own shutdown_everything)
    believing it called the box."""
    ran = []

    def shutdown_everything():
        ran.append("ran")
    assert boxed.remember(shutdown_everything) is shutdown_everything  # a decorator: fine
    back = boxed.handed_back()
    assert back is not shutdown_everything
    with pytest.raises(pycompart.EntrypointError, match="allow_returned_callables"):
        back()
    assert ran == []
    # Data main handed over still comes back as itself, later too.
    token = object()
    assert boxed.remember(token) is token and boxed.handed_back() is token


def test_returned_callables_can_be_allowed(make_app):
    app = box_app(make_app, allow_returned_callables=True)
    app.start(import_hook=True)
    try:
        import boxlib

        def fn():
            return "main's"
        boxlib.remember(fn)
        assert boxlib.handed_back() is fn
    finally:
        del sys.modules["boxlib"]
        app.stop()


def test_a_callbacks_exception_tells_the_compartment_only_type_and_message(boxed):
    """Finding 14: tracebacks of main's callbacks (paths, source lines, a
    hard-coded token in one) were sent to the compartment."""
    def leaky():
        api_token = "tok-SECRET-123"  # noqa: F841  (would be in a traceback's source line)
        raise ValueError("lookup failed")
    name, message, traceback_text = boxed.raise_in_callback(leaky)
    assert (name, message) == ("ValueError", "lookup failed")
    assert "tok-SECRET" not in traceback_text and __file__ not in traceback_text


def test_an_object_main_handed_back_through_a_callback_is_not_stale(boxed):
    """Issue 11, bug (a): the box returns a main object that a callback has
    just handed it; its release overtook the reply and main raised
    StaleReference."""
    for _ in range(200):
        token = object()
        assert boxed.apply(lambda x: x, token) is token


def test_standard_library_modules_cross_by_name(boxed):
    import builtins
    import operator
    import os.path

    # Main's module goes by name; the box uses its own copy of it.
    assert boxed.apply(getattr, builtins, "len")([1, 2]) == 2
    assert boxed.apply(getattr, os.path, "join")("a", "b") == "a/b"
    # The box's copy comes back by reference: calls on it run in the box.
    theirs = boxed.apply(lambda m: m, operator)
    assert theirs is not operator and theirs.add(2, 3) == 5
    assert boxed.apply(lambda m: m.getpid(), os) != os.getpid()
    fake = types.ModuleType("json")  # named like a stdlib module, but not main's json
    with pytest.raises(TypeError, match="cannot be passed"):
        boxed.apply(lambda m: m, fake)


def test_system_exit_is_the_callers_and_the_instance_survives(boxed):
    pid = boxed.pid()
    with pytest.raises(SystemExit) as info:
        boxed.exit_with(3)
    assert info.value.code == 3
    with pytest.raises(SystemExit) as info:
        boxed.exit_with(0)
    assert info.value.code == 0
    with pytest.raises(KeyboardInterrupt):
        boxed.interrupt()
    assert boxed.pid() == pid  # the same instance serves on


def test_system_exit_can_be_kept_in_the_box(make_app):
    app = box_app(make_app, allow_exit=False)
    app.start(import_hook=True)
    try:
        import boxlib

        with pytest.raises(pycompart.RemoteError) as info:
            boxlib.exit_with(3)
        assert not isinstance(info.value, SystemExit) and info.value.type_name == "SystemExit"
        assert boxlib.VERSION == "1.2"
    finally:
        del sys.modules["boxlib"]


def test_standard_library_exceptions_arrive_as_themselves(boxed):
    import dataclasses
    import json

    with pytest.raises(json.JSONDecodeError) as info:
        boxed.stdlib_errors("json")
    assert info.value.pos == 1 and info.value.lineno == 1 and "Traceback" in info.value.remote_traceback
    with pytest.raises(dataclasses.FrozenInstanceError):
        boxed.stdlib_errors("frozen")
    with pytest.raises(LookupError) as info:
        boxed.stdlib_errors("from-none")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(StopIteration):
        boxed.stdlib_errors("stop")


def test_stand_in_exceptions_are_ordinary_exceptions_in_main(boxed):
    import pickle

    exc = boxed.BoxError("made in main", 2)
    assert exc.args == ("made in main", 2) and isinstance(exc, ValueError)
    with pytest.raises(boxed.BoxError):
        raise boxed.DeepError("deep")
    assert str(boxed.BoxError("one")) == "one"
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is boxed.BoxError and again.args == exc.args
    with pytest.raises(boxed.BoxError) as info:
        boxed.fail()
    back = pickle.loads(pickle.dumps(info.value))
    assert type(back) is boxed.BoxError and back.args == ("it failed", 7)
    keyed = boxed.BoxError("made in main", code=7)  # keyword arguments: attributes (as most classes keep them)
    assert keyed.args == ("made in main",) and keyed.code == 7
    assert pickle.loads(pickle.dumps(keyed)).code == 7
    with pytest.raises(TypeError, match="unexpected keyword argument 'message'"):
        boxed.BoxError("x", message="y")


def test_the_boxs_exceptions_cross_back_through_callbacks(boxed):
    # box -> main's callback -> box raises -> out of the callback -> box catches it
    assert boxed.catch_in_box(lambda: boxed.fail()) == ["caught", "BoxError", "('it failed', 7)"]
    # ... and if the box does not catch it, main gets the stand-in again
    with pytest.raises(boxed.DeepError):
        boxed.through_callback(lambda: boxed.fail(deep=True))

    def stop():
        raise StopIteration
    with pytest.raises(StopIteration):
        boxed.through_callback(stop)


def test_warnings_are_reissued_in_main(boxed):
    import warnings

    with pytest.warns(UserWarning, match="careful") as record:
        assert boxed.warn("user") == "done"
    assert record[0].filename.endswith("boxlib.py")  # where the box's code warned
    with pytest.warns(DeprecationWarning, match="old api") as record:
        boxed.warn("deprecated")
    assert record[0].filename == __file__  # stacklevel=2: main's call site
    with pytest.warns(boxed.BoxWarning):
        boxed.warn("own")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):
            boxed.warn("user")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        boxed.warn("varying", n=500)
    assert len(caught) == 100  # bounded per call
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert boxed.warn("user") == "done"


def test_stand_ins_keep_every_base(boxed):
    for base in (boxed.LibError, ValueError, boxed.ParseError, pycompart.RemoteError):
        with pytest.raises(base):
            boxed.parse_fail()
    assert issubclass(boxed.ParseError, boxed.LibError) and issubclass(boxed.ParseError, ValueError)


def test_callbacks_have_their_real_signature_in_the_box(boxed):
    sentinel = object()

    def handler(a, b=2, *rest, key=None, flag=sentinel, **extra):
        """Handle things."""
    sig, name, qualname, doc, module, wrapped_name, wrapped_sig = boxed.describe_callable(handler)
    assert sig == "(a, b=2, *rest, key=None, flag=<object of the other side>, **extra)"
    assert name == "handler" and qualname.endswith("handler") and doc == "Handle things."
    assert module == __name__ and wrapped_name == "handler" and wrapped_sig == sig
    assert boxed.describe_callable(len)[0] == "(obj, /)"


def test_the_boxs_functions_have_their_signature_in_main(boxed):
    import inspect

    sig = inspect.signature(boxed.sort_with)
    assert str(sig) == "(items, key)"
    assert boxed.describe_callable.__doc__ == "What code inspecting main's callable sees here."
    assert str(inspect.signature(boxed.make("c").add)) == "(value)"


def test_a_sandboxs_objects_pickle_and_copy(boxed):
    import copy
    import pickle

    c = boxed.make("c", 1, 2)
    again = pickle.loads(pickle.dumps(c))
    assert again == c and again is not c and again.total() == 3
    assert copy.deepcopy(c) == c and copy.copy(c).total() == 3
    assert again.__class__ is boxed.Counter and isinstance(again, boxed.Counter)


def test_only_a_sandbox_unpickles(make_app):
    import pickle

    app = box_app(make_app, trust="safebox")
    app.start(import_hook=True)
    try:
        import boxlib

        with pytest.raises(TypeError, match="sandbox"):
            pickle.dumps(boxlib.make("c"))
        # Forged from main's side: the box refuses both ways.
        comp = app._runtime.compartments["box"]
        with pytest.raises(pycompart.EntrypointError, match="sandbox"):
            comp.call(None, "@unpickle", [pickle.dumps(1)])
    finally:
        del sys.modules["boxlib"]


def test_collection_methods_of_mains_objects_are_protocol(boxed):
    import collections

    class MyMapping(collections.UserDict):
        secret = "not reachable"

    target = MyMapping(a=1)
    items, missing, keys = boxed.merge_into(target, {"b": 2}, {"a": 3})
    assert items == [("a", 3), ("b", 2)] and missing == "none" and sorted(keys) == ["a", "b"]
    assert target == {"a": 3, "b": 2}  # main's object, changed through its protocol
    seq = collections.UserList([1, 2])
    assert boxed.use_sequence(seq) == (2, 1) and seq == [1, 2, 4]

    class NotAMapping:
        def merge(self, other):
            raise AssertionError("reached")
    with pytest.raises(AttributeError):
        boxed.merge_into(NotAMapping(), {})
    # Forged: ABC names only, and only on objects that have the ABC.
    boxed.keep(target)
    for handle in range(1, 6):
        for name in ("__init__", "data", "secret", "__class__", "__reduce__"):
            assert boxed.forge("@op", handle, "abc", [name, [], {}])[0] == "error"


def test_duck_typed_collections_of_main_work_in_the_box(boxed):
    class Duck:  # defines the methods of the mapping protocol, no ABC
        def __init__(self):
            self.d = {}

        def update(self, other):
            self.d.update(other)

        def items(self):
            return list(self.d.items())

        def get(self, key, default=None):
            return self.d.get(key, default)

        def keys(self):
            return list(self.d)

    duck = Duck()
    assert boxed.merge_into(duck, {"x": 1}) == ([("x", 1)], "none", ["x"])
    assert boxed.has(duck, "keys") and not boxed.has(duck, "append") and not boxed.has(duck, "d")


def test_generators_are_pulled_in_batches_and_nothing_is_lost(boxed):
    import itertools

    g = boxed.gen(1000)
    assert next(g) == 0 and next(g) == 1  # batches grow: 8, 16, ...
    rest = list(itertools.islice(g, 10))
    assert rest == list(range(2, 12))
    # Handed back with items read ahead: the box sees them first.
    assert boxed.apply(lambda it: it, g) is not None
    assert boxed.take(g, 5) == [12, 13, 14, 15, 16]
    assert list(boxed.gen(3)) == [0, 1, 2] and list(boxed.gen(0)) == []


def test_mains_generators_are_pulled_exactly(boxed):
    def numbers():
        yield from range(100)
    g = numbers()
    # Main's code usually keeps its generator: the box takes exactly what it
    # uses, and main continues where the box stopped.
    got, back = boxed.take_and_return(g, 3)
    assert got == [0, 1, 2] and back is g  # main's generators are pulled exactly
    assert next(g) == 3 and list(g)[:2] == [4, 5]


def test_a_worker_threads_callback_runs_beside_mains_call(boxed):
    """Unboxed, a library's worker thread calling main's function runs beside
    main's thread; boxed, main runs it on a thread of its own, so it may wait
    for what main does after the call that started the worker."""
    go = threading.Event()
    threads = set()

    def wait_for_main():
        threads.add(threading.get_ident())
        return go.wait(10)

    t0 = time.monotonic()
    assert boxed.start_worker(wait_for_main) == "started"
    assert time.monotonic() - t0 < 5, "main's call waited for the worker's callback"
    go.set()
    assert boxed.worker_results() == [("ok", True)]
    assert threading.get_ident() not in threads


def test_call_timeout_fires_while_a_workers_callback_blocks(make_app):
    app = box_app(make_app, call_timeout="1s")
    app.start(import_hook=True)
    import boxlib

    release = threading.Event()
    try:
        t0 = time.monotonic()
        with pytest.raises(pycompart.CallTimeout):
            boxlib.start_worker(lambda: release.wait(30), then_wait=True)
        assert time.monotonic() - t0 < 10
    finally:
        release.set()
        del sys.modules["boxlib"]


def test_callbacks_from_worker_threads_are_bounded_in_main(boxed):
    """A compartment's threads cannot make main start threads without end:
    beyond MAX_CONCURRENT_CALLBACKS at once, its callbacks are refused."""
    from pycompart.frontend.callbacks import MAX_CONCURRENT_CALLBACKS

    running, most = [0], [0]
    lock = threading.Lock()

    def slow(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.5)
        with lock:
            running[0] -= 1
        return i
    with pytest.raises(RuntimeError, match=f"more than {MAX_CONCURRENT_CALLBACKS}"):
        boxed.threaded(slow, MAX_CONCURRENT_CALLBACKS + 24)
    assert most[0] <= MAX_CONCURRENT_CALLBACKS
    assert boxed.threaded(slow, 2) == [0, 1]  # and main serves on


def test_the_boxs_stdin_is_mains_as_it_is_at_the_call(boxed, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("alpha\nbeta\n"))
    assert boxed.ask("name? ") == "alpha"
    assert capsys.readouterr().out == "name? "  # the prompt went to main's stdout
    assert boxed.read_stdin("lines") == ["beta\n"]
    assert boxed.read_stdin("all") == ""
    big = "x" * 200_000 + "\nend\n"  # more than one request carries
    monkeypatch.setattr(sys, "stdin", io.StringIO(big))
    assert boxed.read_stdin(150_000) == big[:150_000]
    assert boxed.read_stdin("all") == big[150_000:]
    # Forged requests get bounded, checked answers.
    monkeypatch.setattr(sys, "stdin", io.StringIO("y" * 100_000))
    outcome = boxed.forge_stdin("read", 10**9)
    assert outcome[0] == "ok" and len(outcome[1]) == 64 * 1024
    for bad in (("write", 1), ("read", "1"), ("read",), ("__class__", 1)):
        assert boxed.forge_stdin(*bad)[0] == "error", bad


def test_a_worker_thread_of_the_box_cannot_read_mains_stdin(boxed, monkeypatch):
    # main's thread serving it would wait on main's stdin past the end of
    # the call and take the line main's own code reads next.
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("password\n"))
    [answer] = boxed.read_stdin_from_a_thread()
    assert "worker thread" in answer and "password" not in answer
    assert sys.stdin.readline() == "password\n"


def test_stdin_null_is_end_of_file_and_main_refuses_reads(make_app, monkeypatch):
    import io

    app = box_app(make_app, stdin="null")
    app.start(import_hook=True)
    import boxlib

    monkeypatch.setattr(sys, "stdin", io.StringIO("secret\n"))
    try:
        with pytest.raises(EOFError):
            boxlib.ask("")
        outcome = boxlib.forge_stdin("readline", -1)
        assert outcome[0] == "error" and "stdin" in outcome[2]
        assert sys.stdin.read() == "secret\n"  # nothing of it was read
    finally:
        del sys.modules["boxlib"]


def test_a_directory_main_adds_to_sys_path_is_searched_by_the_box(make_app, monkeypatch):
    import shutil
    import tempfile
    from pathlib import Path

    # Readable by the compartment's own user (pytest's tmp_path is not).
    top = Path(tempfile.mkdtemp(prefix="pycompart-path-"))
    lib = top / "lib"
    lib.mkdir()
    (lib / "latecomer.py").write_text("def where():\n    import os\n    return os.getpid()\n")
    for path in (top, lib, lib / "latecomer.py"):
        path.chmod(0o755)
    app = make_app({"compartments": {"box": {
        "modules": ["latecomer"], "privileges": {"filesystem": {"read": [str(top)]}}}}})
    app.start(import_hook=True)  # the instance starts before main's path has lib
    monkeypatch.chdir(top)
    monkeypatch.syspath_prepend("lib")  # relative, as a program would
    try:
        import latecomer

        assert latecomer.where() != os.getpid()
    finally:
        sys.modules.pop("latecomer", None)
        app.stop()
        shutil.rmtree(top)


def test_attributes_set_on_a_callback_stay_in_the_box(boxed):
    """Decorators set attributes on the functions they wrap (click's
    ``__click_params__``): on main's function they live in the compartment,
    for as long as it holds the function; main's function is untouched."""
    def command():
        """Main's docstring."""
    assert boxed.annotate(command, "__params__", 1) is command
    assert boxed.annotate(command, "__params__", 2) is command
    assert boxed.annotations_of(command, "__params__") == ([1, 2], "Main's docstring.")
    assert not hasattr(command, "__params__") and command.__doc__ == "Main's docstring."
    assert boxed.set_doc(command, "the box's") == "the box's"
    assert command.__doc__ == "Main's docstring."


def test_a_callbacks_keyboard_interrupt_goes_through_the_box(boxed):
    def command(exc):
        def run():
            raise exc("catch me!")
        return run
    assert boxed.catch_interrupt(command(KeyboardInterrupt)) == ["aborted", ("catch me!",)]
    # Not caught there: it reaches main's caller as itself.
    with pytest.raises(SystemExit) as info:
        boxed.catch_interrupt(command(SystemExit))
    assert info.value.args == ("catch me!",)
    assert boxed.apply(lambda: 5) == 5  # and the instance serves on


def test_mutable_attributes_are_shared_state_and_results_are_copies(boxed):
    """The rule: a list/dict/set read from an attribute is the compartment's
    object itself (a registry main extends), one proxy per object; a value a
    call returns, or main passes in, is a copy."""
    registry = boxed.REGISTRY
    registry.append("mine")
    boxed.OPTIONS["strict"] = True
    boxed.OPTIONS.update(extra=1)
    assert boxed.registry_state() == (["builtin", "mine"], {"strict": True, "extra": 1})
    assert boxed.REGISTRY is registry and registry == ["builtin", "mine"]
    assert list(registry) == ["builtin", "mine"] and len(registry) == 2 and "mine" in registry
    assert dict(boxed.OPTIONS) == {"strict": True, "extra": 1}
    copied = boxed.fresh_list()
    assert type(copied) is list and copied == [1, 2]


def test_a_function_stored_on_an_instance_is_the_function(boxed):
    obj = boxed.WithHook()
    assert obj.hook == boxed.double and obj.hook is boxed.double
    assert obj.hook(4) == 8  # not bound: no self


def test_items_before_an_iterators_exception_arrive_first(boxed):
    """A batch that ends in an exception delivers its items, then raises."""
    got = []
    with pytest.raises(ValueError, match="third"):
        for item in boxed.gen_then_fail():
            got.append(item)
    assert got == [1, 2]

    def mine():
        yield "a"
        yield "b"
        raise RuntimeError("kaboom")
    assert boxed.collect_until_error(mine()) == (["a", "b"], "RuntimeError")


def test_a_base_exception_of_the_library_reaches_the_caller(boxed):
    pid = boxed.pid()
    with pytest.raises(boxed.Abort, match="stop"):
        boxed.abort()
    assert boxed.pid() == pid  # the instance did not die of it


def test_a_fresh_generator_of_plain_values_batches_a_kept_one_does_not(boxed):
    g = boxed.counted(1000)
    assert next(g) == 0
    assert 1 < boxed.produced() <= 256  # run ahead: nobody else can see it
    kept = boxed.counted_and_kept(1000)
    assert next(kept) == 0 and next(kept) == 1
    assert boxed.produced() == 2  # the box holds it too: exactly what main took


def test_call_timeout_holds_when_a_stuck_reply_holds_the_channel(make_app):
    """A compartment that makes main's reply sender block (forged calls
    whose errors echo 64 KiB, then no reads) cannot hold main's call past
    its timeout: other senders wait for the channel only until their own
    deadlines."""
    app = box_app(make_app, call_timeout="2s")
    app.start(import_hook=True)
    import boxlib

    try:
        t0 = time.monotonic()
        with pytest.raises(pycompart.CallTimeout):
            boxlib.stall_with_echoed_errors(sleep=8)  # reads again after ~9 s
        assert time.monotonic() - t0 < 6
    finally:
        del sys.modules["boxlib"]


def test_iter_asks_the_owner_unless_the_iterator_returns_itself(boxed):
    assert list(boxed.Stream([1, 2, 3])) == [1, 2, 3]  # 0.4 before: endless
    assert [x for x in boxed.Stream("ab")] == ["a", "b"]
    gen = boxed.counted(3)
    assert iter(gen) is gen  # a generator is its own iterator: no round trip


def test_the_boxs_stdin_has_a_buffer_of_mains_bytes(boxed, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("é\x00\xff".encode("latin-1"))))
    assert boxed.read_stdin_bytes() == "é\x00\xff".encode("latin-1")
    monkeypatch.setattr(sys, "stdin", io.StringIO("text é"))  # no buffer: its text as UTF-8
    assert boxed.read_stdin_bytes() == "text é".encode()
    assert boxed.forge_stdin("readbytes", 10**9)[0] == "ok"


@pytest.mark.skipif(not pycompart.fastpaths.enabled("compact"), reason="compact form is off")
def test_module_calls_and_their_replies_travel_in_compact_form(boxed, monkeypatch):
    """A top-level module call on a pipe goes out as one compact call, and
    the instance answers it in compact form: values, errors, warnings and
    printed output come back as they do in msgpack frames."""
    from pycompart.transport import channel as channel_mod

    sent, compact_replies = [], []
    call, receive = channel_mod.gate.call, channel_mod.gate.receive

    def spy_call(fd, rid, name, args, parent=0):
        sent.append(name)
        return call(fd, rid, name, args, parent)

    def spy_receive(*args):
        got = receive(*args)
        if got.__class__ is bytes:
            compact_replies.append(got)
        return got

    monkeypatch.setattr(channel_mod.gate, "call", spy_call)
    monkeypatch.setattr(channel_mod.gate, "receive", spy_receive)
    counter = boxed.Counter("c", [1, 2])
    counter.add(3)
    assert counter.values == [1, 2, 3]
    assert boxed.pid() != os.getpid()
    with pytest.raises(boxed.BoxError):
        boxed.fail()
    with pytest.warns(UserWarning, match="careful"):
        assert boxed.warn("user") == "done"
    assert b"@call" in sent and b"@callmethod" in sent and b"@getattr" in sent
    assert len(compact_replies) >= 3  # (a call that warned answers in a frame, after the warning)


class Plain:
    pass


class Plain2:
    class Inner:
        pass


def test_mains_objects_are_of_classes_named_as_their_types(boxed):
    """A boxed library's errors about main's objects name them as Python
    would unboxed, not as MainRef."""
    assert boxed.what_python_says(Plain()) == (
        "Plain", "Plain", "unsupported operand type(s) for +: 'Plain' and 'int'")
    assert boxed.what_python_says(Plain2.Inner())[0] == "Inner"
    name, _, message = boxed.what_python_says(lambda: None)
    assert name == "function" and "'function' and 'int'" in message


class _Abort(BaseException):
    """A library's own control exception (more_itertools' AbortThread)."""


def test_a_callbacks_own_base_exception_goes_through_the_box_and_the_box_serves_on(boxed):
    """It escaped main's callback gate, which left the box's call without
    an answer: the box waited for ever, and every later call behind it."""
    ran = []

    def abort(i):
        ran.append(i)
        raise _Abort("stop")
    with pytest.raises(BaseException) as info:
        boxed.call_each(abort, 3)
    assert "stop" in str(info.value) and ran == [0]  # not caught by the box's `except Exception`
    assert boxed.call_each(lambda i: i * 2, 3) == [0, 2, 4]


def test_an_interrupt_while_serving_a_callback_leaves_the_channel_usable(make_app, monkeypatch):
    """Ctrl-C in main while it runs a callback (before the callback's
    answer is out): the call is given up and cancelled; what the box nests
    in it next is refused, not queued for a waiter nobody serves."""
    from pycompart.frontend.callbacks import CallbackGate

    app = box_app(make_app, call_timeout="10s")
    app.start(import_hook=True)
    import boxlib
    try:
        execute = CallbackGate.execute
        hits = []

        def interrupted_once(self, channel, call):
            if not hits:
                hits.append(call.id)
                raise KeyboardInterrupt
            return execute(self, channel, call)
        monkeypatch.setattr(CallbackGate, "execute", interrupted_once)
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            boxlib.call_each(lambda i: i, 3)
        assert boxlib.call_each(lambda i: i + 1, 3) == [1, 2, 3]
        assert time.monotonic() - started < 5  # not by the call's timeout
    finally:
        del sys.modules["boxlib"]
        app.stop()


def test_standard_library_enum_members_cross_as_members_of_the_receivers_own_class(boxed):
    """New user: ``re.IGNORECASE`` into a box that combines it with its own
    ``re.DEBUG`` recursed until it failed (each side's flag a reference
    to the other's, ``__and__`` bouncing between them), and main's
    IntEnum/StrEnum members were not ints or strs in the box. Members of
    the standard library's int and str enums cross as values rebuilt from
    the receiver's own class."""
    import http
    import re
    import signal

    assert boxed.flag_and_debug(re.IGNORECASE) == (re.NOFLAG, True)
    assert boxed.flag_and_debug(re.IGNORECASE | re.MULTILINE)[1] is True
    # (``http`` not imported in the box yet: the int it stands for.)
    assert boxed.kind_of(http.HTTPStatus.OK) == ("builtins", "int", True, False)
    assert boxed.status(404) is http.HTTPStatus.NOT_FOUND  # main's own member
    assert boxed.kind_of(http.HTTPStatus.OK) == ("http", "HTTPStatus", True, False)
    assert boxed.kind_of(signal.SIGTERM) == ("signal", "Signals", True, False)
    assert boxed.apply(lambda flag: flag, re.DOTALL) is re.DOTALL  # and back as itself


def test_a_str_subclass_by_reference_hashes_as_the_equal_str_does(boxed):
    """New user: ``m == "x"`` held but ``hash(m) != hash("x")`` (the owner
    hashed it with its own seed), so dict and set lookups missed, both
    ways. A str or bytes subclass's proxy now hashes the plain value itself."""
    m = boxed.name("x")
    assert type(m) is not str and m == "x"
    assert hash(m) == hash("x") and {"x": 1}.get(m) == 1 and m in {"x"}

    class Key(str):
        pass
    assert boxed.lookup(Key("fast")) == (1, True, True)


def test_a_standard_enum_a_receiver_has_not_imported_arrives_as_its_value():
    """Never imported on the sender's word: the plain int or str instead;
    a made-up class or value is no more than that either."""
    from pycompart.wire import refs
    from test_refs import main_peer

    comp, peer = main_peer()
    Ext = refs.Ext

    def std(module, qualname, value):
        return refs._encoder.encode(Ext(refs.EXT_STD, refs._encoder.encode(["stdenum", [module, qualname, value]])))
    assert peer.decode(std("antigravity", "Flag", 3)) == 3 and "antigravity" not in sys.modules
    assert type(peer.decode(std("re", "RegexFlag", 2))).__name__ == "RegexFlag"
    for module, qualname in (("re", "_compile"), ("re", "Pattern"), ("os", "environ"), ("re", "RegexFlag.x.y")):
        assert type(peer.decode(std(module, qualname, 2))) is int
    with pytest.raises(pycompart.ProtocolError):
        peer.decode(std("re", "RegexFlag", [1]))


@pytest.mark.parametrize("where", ["read", "send"])
def test_ctrl_c_as_a_read_or_write_returns_keeps_the_instance(make_app, monkeypatch, where):
    """Ctrl-C during rapid callbacks killed the instance most times (5 such
    Ctrl-Cs: the compartment was given up): raised as a read returned, its
    bytes were lost; as the callback's answer was written, that frame was
    taken for torn. The bytes read are kept for the next reader; a whole
    frame sent is known to be whole (``gate.write`` counts it)."""
    from pycompart.transport import gate

    app = box_app(make_app, call_timeout="10s")
    app.start(import_hook=True)
    import boxlib
    try:
        pid = boxlib.pid()
        hits = []
        if where == "read":
            real_receive = gate.receive

            def receive(*args):  # type: ignore[no-untyped-def]
                got = real_receive(*args)
                if not hits and type(got) is int and got > 0:  # a nested call read, not our reply
                    hits.append(got)
                    raise KeyboardInterrupt  # (as Python raises it when the read returns)
                return got
            monkeypatch.setattr(gate, "receive", receive)
        else:
            real_write = gate.write

            def write(fd, data, sent):  # type: ignore[no-untyped-def]
                n = real_write(fd, data, sent)
                if not hits and n == len(data) and len(data) < 4096:  # a callback's whole answer
                    hits.append(n)
                    raise KeyboardInterrupt
                return n
            monkeypatch.setattr(gate, "write", write)
        with pytest.raises(KeyboardInterrupt):
            boxlib.call_each(lambda i: i, 50)
        monkeypatch.undo()
        assert hits
        assert boxlib.call_each(lambda i: i + 1, 3) == [1, 2, 3]
        assert boxlib.pid() == pid  # the same instance: nothing was broken
    finally:
        del sys.modules["boxlib"]
        app.stop()


def test_importing_a_placed_module_without_the_hook_says_it_runs_unboxed(make_app, tmp_path, monkeypatch):
    """The spec reads as if the module were boxed; without the import hook
    ``import`` runs it in main. Said once, and only while the app runs."""
    (tmp_path / "unhooked_mod.py").write_text("VALUE = 1\n")
    (tmp_path / "unhooked_mod2.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = make_app({"compartments": {"box": {"modules": ["unhooked_mod", "unhooked_mod2"]}}})
    app.start(lazy=True)
    try:
        with pytest.warns(RuntimeWarning, match="'unhooked_mod' is placed in compartment 'box', but this "
                          "app was started without the import hook"):
            import unhooked_mod  # noqa: F401
        assert unhooked_mod.VALUE == 1 and not isinstance(unhooked_mod, ModuleProxy)
    finally:
        app.stop()
        sys.modules.pop("unhooked_mod", None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import unhooked_mod2  # noqa: F401  (the app is stopped: nothing to say)
    sys.modules.pop("unhooked_mod2", None)


def test_a_call_timed_out_during_its_callback_is_cancelled_once(make_app, monkeypatch):
    from pycompart.errors import CallTimeout
    from pycompart.transport.channel import Channel

    app = box_app(make_app, call_timeout="0.5s")
    app.start(import_hook=True)
    import boxlib
    try:
        cancels = []
        cancel = Channel.cancel
        monkeypatch.setattr(Channel, "cancel", lambda self, rid: (cancels.append(rid), cancel(self, rid)))
        with pytest.raises(CallTimeout):  # (past its deadline in the callback; the box answers later)
            boxlib.call_each(lambda i: time.sleep(1.0), 1, 1.0)
        assert len(cancels) == 1, cancels
    finally:
        del sys.modules["boxlib"]
        app.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_at_every_moment_of_a_callback_call_leaves_the_channel_whole(make_app):
    """A Ctrl-C at each moment in turn of a call into a module box that calls
    back into main (``interrupts``): the channel holds nothing afterwards,
    and the next call works."""
    app = box_app(make_app, restart_backoff="1ms", restart_window="1ms", max_restarts=10000)
    app.start(import_hook=True)
    try:
        import boxlib

        moments = interrupts.at_every_moment(app, lambda: boxlib.apply(len, "abc"), 3,
                                             lambda expected: boxlib.apply(len, "xyz"))
        assert moments > 100
    finally:
        sys.modules.pop("boxlib", None)


def test_a_typed_call_beside_modules_does_not_hold_back_releases(make_app):
    """A compartment with a typed entrypoint and boxed modules: main's
    objects it was handed and dropped are released after a typed call too.
    (Each typed reply was marked arrived and never decoded, so every later
    release waited behind it: main kept every object it ever passed.)"""
    import gc
    import weakref

    import bystander

    app = box_app(make_app)
    typed = app.entrypoint("box")(bystander.ping)
    app.start(import_hook=True)
    try:
        import boxlib

        typed()
        things = [type("Thing", (), {})() for _ in range(3)]
        alive = [weakref.ref(t) for t in things]
        for thing in things:
            boxlib.apply(id, thing)  # handed over, dropped there
        del things, thing
        for _ in range(3):
            boxlib.pid()  # (releases come with replies)
            gc.collect()
        assert [r() for r in alive] == [None, None, None]
    finally:
        sys.modules.pop("boxlib", None)


def test_a_callable_another_compartment_hands_back_inside_a_callback_is_still_refused(make_app):
    """Whether main handed a callable over in the call in progress is
    decided per compartment: handles are numbered per peer, and main's
    ``admin`` that compartment B holds as its handle 1 came back as itself
    inside a callback main had passed compartment A as A's handle 1."""
    ran = []

    def admin() -> str:
        ran.append("admin")
        return "admin ran"

    app = make_app({"compartments": {
        "box": {"modules": ["boxlib"], "may_call": ["main"], "privileges": {"syscalls": "python-threads"}},
        "other": {"modules": ["keeperbox"], "privileges": {"syscalls": "python-threads"}}}})
    app.start(import_hook=True)
    try:
        import boxlib
        import keeperbox

        keeperbox.keep(admin)

        def callback() -> object:
            handed_back = keeperbox.kept()
            return handed_back() if handed_back is admin else "refused"

        try:
            result = boxlib.apply(callback)
        except pycompart.EntrypointError:
            result = "refused"
        assert result == "refused" and ran == []
    finally:
        sys.modules.pop("boxlib", None)
        sys.modules.pop("keeperbox", None)


def test_main_keeps_a_bounded_number_of_warning_registries_per_compartment():
    """A compartment names the module of each warning it sends; main keeps
    a registry of those shown per module, and no more than so many (it
    kept one for every name a compartment made up: 0.5 MiB a call)."""
    import types
    import warnings

    from pycompart.frontend import warn as warn_mod
    from pycompart.wire.protocol import Warn

    comp = types.SimpleNamespace(warning_registry={}, warning_chars=0, spec=None, name="box")
    found = [Warn(1, ["UserWarning"], "made up", "<made up>", 1, f"mod{i}", False) for i in range(3000)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warn_mod.reissue(comp, found)  # type: ignore[arg-type]
    assert len(comp.warning_registry) <= 1025, len(comp.warning_registry)


@pytest.mark.parametrize("at_caller", [False, True], ids=["at-module", "at-caller"])
def test_the_warning_text_main_keeps_for_a_compartment_is_bounded(at_caller):
    """Each distinct text the "default" action shows stays in a registry:
    long texts of astral characters under 1024 made-up module names held
    64 GiB at most (6 GiB seen after 4000 calls); one pointing at main's
    caller went into the caller module's own __warningregistry__, for
    ever. Now a budget of characters per compartment, in registries of its
    own."""
    import types
    import warnings

    from pycompart.frontend import warn as warn_mod
    from pycompart.wire.protocol import Warn

    comp = types.SimpleNamespace(warning_registry={}, warning_chars=0, spec=None, name="box")
    text = "\U0001F600" * 4000
    globals().pop("__warningregistry__", None)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda *a, **k: None
        for i in range(2000):
            warn_mod.reissue(comp, [Warn(1, ["UserWarning"], f"{i}{text}", "<made up>", 1,  # type: ignore[arg-type]
                                         f"mod{i}", at_caller)])
    kept = sum(len(k[0]) for r in comp.warning_registry.values() for k in r if type(k) is tuple)
    assert 0 < kept <= warn_mod.MAX_REGISTERED_CHARS + len(text) + 10, kept
    assert len(globals().get("__warningregistry__", {})) <= 1


def test_a_binary_operator_an_operand_does_not_implement_is_tried_reflected_once(boxed):
    """``boxed + mine``, where the boxed class answers NotImplemented: main
    tries ``mine.__radd__`` as unboxed Python would; the owner no longer
    runs the whole operator (it asked main's ``__radd__`` through its proxy,
    which asked back, until RecursionError)."""
    class NotAValue:
        def __add__(self, other):  # type: ignore[no-untyped-def]
            return self

        __radd__ = __add__

    mine = NotAValue()
    assert boxed.delta() + mine is mine
    assert mine + boxed.delta() is mine
    with pytest.raises(TypeError, match="unsupported operand"):
        boxed.delta() + 1
    total = boxed.delta()
    total += boxed.delta()  # (its own kind: in the compartment)
    assert type(total).__name__ == "RemoteObject"


@pytest.mark.parametrize("as_dict", [False, True], ids=["set", "dict"])
def test_decoding_a_value_is_bounded_by_the_call_timeout(make_app, as_dict):
    # A set (or dict keys) of the compartment's hashable objects is rebuilt
    # in main by asking their hashes, one round trip each: all of them
    # share the call's timeout, not one each (40 x 0.25 s here).
    app = box_app(make_app, call_timeout="1s")
    with app:
        box = app.compartment("box").module("boxlib")
        started = time.monotonic()
        with pytest.raises(pycompart.CallTimeout):
            box.slow_keys(40, as_dict)
        assert time.monotonic() - started < 5
        assert len(box.slow_keys(2, as_dict)) == 2  # served on (replaced if it had to be)


def test_strings_with_lone_surrogates_cross_and_errors_naming_them_arrive(boxed):
    """A str msgpack cannot hold (os.fsdecode of a name that is not UTF-8):
    returning one killed the instance (its error, naming the same str,
    could not be sent either); passing one raised in main."""
    pid = boxed.pid()
    assert boxed.same("caf\udce9") == "caf\udce9" and boxed.same(["\ud800", {"\udcff": 1}]) == \
        ["\ud800", {"\udcff": 1}]
    with pytest.raises(FileNotFoundError) as info:
        boxed.fail_on_name(b"caf\xe9.txt")
    assert "caf" in info.value.filename and info.value.errno == 2
    assert boxed.pid() == pid  # served on, never restarted


def test_no_address_of_mains_objects_reaches_the_compartment(boxed):
    """Red team: the repr of a callback main passed, and its hash (id >> 4),
    gave main's addresses away."""
    def double(x):
        return 2 * x
    shown = boxed.what_main_shows(double)
    address = f"{id(double):x}"
    assert all(address not in str(v) for v in shown), shown
    assert shown[0].startswith("<function ") and "double" in shown[0] and " at 0x..." in shown[0]
    assert shown[2] != hash(double) and shown[2] == boxed.what_main_shows(double)[2]  # stable


def test_a_boxed_tzinfo_is_a_tzinfo_in_main(boxed):
    """dateutil's zones from a box: main's datetime(..., tzinfo=zone) took
    only a real tzinfo (TypeError); a datetime in such a zone came back as
    a reference, not a datetime. Now the zone's proxy is a tzinfo whose
    offsets the compartment computes, and such datetimes cross as copies."""
    import datetime

    zone = boxed.ZONE
    assert isinstance(zone, datetime.tzinfo)
    mine = datetime.datetime(2020, 7, 1, 12, tzinfo=zone)
    assert mine.utcoffset() == datetime.timedelta(hours=3) and mine.tzname() == "ZS"
    assert datetime.datetime(2020, 1, 1, tzinfo=zone).isoformat() == "2020-01-01T00:00:00+02:00"
    theirs = boxed.in_zone(7)
    assert type(theirs) is datetime.datetime and theirs.tzinfo is zone
    assert theirs.astimezone(datetime.timezone.utc).hour == 9
    assert boxed.zone_facts(mine) == [True, datetime.timedelta(hours=3), 12]  # its own zone, back
    assert datetime.time(1, tzinfo=zone).tzname() == "Z"

    class West(datetime.tzinfo):  # main's own zone: the box asks main for its offsets
        def utcoffset(self, dt):
            return datetime.timedelta(hours=-5)

        def dst(self, dt):
            return datetime.timedelta(0)

    facts = boxed.zone_facts(datetime.datetime(2020, 7, 1, 12, tzinfo=West()))
    assert facts == [False, datetime.timedelta(hours=-5), 12]


def test_an_exceptions_slots_and_properties_reach_main(boxed):
    """pyparsing's ParseException keeps loc, msg and pstr in __slots__ and
    computes lineno, col and line in properties: the stand-in had none."""
    with pytest.raises(boxed.SlotError) as info:
        boxed.fail_with_slots("abc def")
    exc = info.value
    assert (exc.loc, exc.pstr, exc.col) == (3, "abc def", 4)
    assert not hasattr(exc, "parser") and not hasattr(exc, "broken")  # not simple; raised


def test_monkeypatching_a_boxed_modules_dunder_reaches_its_code_and_is_undone(boxed, monkeypatch):
    """monkeypatch.setattr(mod, "__spec__", None): the module's own code
    looks at its own __spec__; the change stayed on main's stand-in, and
    humanize's activate() did not raise (174 of its tests then ran in
    Russian). Undone, the compartment's module is as it was."""
    assert boxed.own_spec_name() == "boxlib"
    with monkeypatch.context() as patch:
        patch.setattr(boxed, "__spec__", None)
        assert boxed.own_spec_name() is None and boxed.__spec__ is None
    assert boxed.own_spec_name() == "boxlib" and boxed.__spec__.name == "boxlib"
    with monkeypatch.context() as patch:
        patch.delattr(boxed, "__spec__")  # gone there too (humanize: activate() must raise)
        assert boxed.own_spec_name() == "builtins"  # (the name falls back to builtins')
    assert boxed.own_spec_name() == "boxlib"
    with monkeypatch.context() as patch:
        patch.setattr(boxed, "__version__", "9.9", raising=False)
        assert boxed.__version__ == "9.9"
    assert not hasattr(boxed, "__version__")


def test_an_instance_that_sends_a_value_main_refuses_is_replaced(make_app):
    """Red team: a reply value main refused (a ProtocolError) left the
    instance serving, with whatever state it had built."""
    app = box_app(make_app)
    with app:
        box = app.compartment("box").module("boxlib")
        before = box.pid()
        with pytest.raises(pycompart.ProtocolError, match="share a hash"):
            box.colliding_set(200)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if box.pid() != before:
                    break
            except (pycompart.CompartmentError, pycompart.StaleReference):
                pass
            time.sleep(0.05)
        assert box.pid() != before


def test_mains_tzinfo_is_a_tzinfo_only_where_main_serves_its_offsets(make_app):
    """Without may_call = ["main"], main would refuse to compute the
    offsets of its zones: their proxies are not tzinfos there (a datetime
    the compartment built in one would fail at its first use in main)."""
    import datetime

    class West(datetime.tzinfo):
        def utcoffset(self, dt):
            return datetime.timedelta(hours=-5)

    app = box_app(make_app, may_call=[])
    with app:
        box = app.compartment("box").module("boxlib")
        assert box.is_tzinfo(West()) is False
    app = box_app(make_app)
    with app:
        assert app.compartment("box").module("boxlib").is_tzinfo(West()) is True
