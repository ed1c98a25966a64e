"""Calls between compartments: ``may_call = ["signer"]`` gives ``web`` an
edge to ``signer`` that the monitor makes and hands over; an edge the spec
does not declare does not exist. Crash, restart, timeout and audit work per
edge as they do for main's calls."""

import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

import pytest

import pycompart
import edgebox


@pytest.fixture
def key(monkeypatch):
    # Outside pytest's 0700 tmp_path: each compartment has a uid of its own.
    d = pathlib.Path(tempfile.mkdtemp(prefix="pycompart-edges-"))
    d.chmod(0o755)
    path = d / "key"
    path.write_bytes(b"k3y")
    path.chmod(0o644)  # the signer's uid may read it; web's Landlock rules do not let it
    monkeypatch.setenv("EDGEBOX_KEY", str(path))
    monkeypatch.setattr(edgebox, "KEY_PATH", str(path))
    yield str(path)
    shutil.rmtree(d)


@pytest.fixture
def public(key):
    """A file web may be allowed to read."""
    path = pathlib.Path(key).parent / "data.txt"
    path.write_text("handed over")
    path.chmod(0o644)
    return path


SIGNER = ["edgebox:sign", "edgebox:whoami", "edgebox:crash", "edgebox:sleep", "edgebox:handed_fd",
          "edgebox:chatty", "edgebox:trickle"]
WEB = ["edgebox:handle", "edgebox:relay", "edgebox:try_call", "edgebox:forge_edge",
       "edgebox:flood_control", "edgebox:pass_fd", "edgebox:open_flood", "edgebox:fds_on_control",
       "edgebox:hold_per_call"]


def spec(key, signer=None, web=None, app=None):
    return {"app": app or {}, "compartments": {
        "signer": {"functions": SIGNER, "restart_backoff": "10ms",
                   "privileges": {"filesystem": {"read": [key]}, "environment": ["EDGEBOX_KEY"]},
                   **(signer or {})},
        "web": {"functions": WEB, "may_call": ["signer"], "call_timeout": "20s",
                "privileges": {"environment": ["EDGEBOX_KEY"]}, **(web or {})},
        "other": {"functions": ["edgebox:children"]}}}


def test_web_calls_signer_over_its_edge_and_cannot_read_the_key(make_app, key):
    import hashlib

    app = make_app(spec(key))
    with app:
        result = app.function("edgebox:handle")(b"hello")
        assert result == {"signature": hashlib.sha256(b"k3yhello").hexdigest(), "web_reads_key": False}
        # The edge's callee is an instance of its own, not main's signer.
        relay = app.function("edgebox:relay")
        edge_pid = relay("whoami")
        assert relay("whoami") == edge_pid  # one edge per caller instance, reused
        assert app.function("edgebox:whoami")() != edge_pid


def test_an_undeclared_edge_is_refused_by_name_on_both_ends(make_app, key, tmp_path):
    log = tmp_path / "audit.jsonl"
    app = make_app(spec(key, app={"audit_log": str(log)}))
    with app:
        try_call = app.function("edgebox:try_call")
        # In web's own process: it may not call "other".
        app_other = app.function("edgebox:children")  # an entrypoint of "other"
        assert app_other() >= 1
        out = app.function("edgebox:relay")
        with pytest.raises(pycompart.EntrypointError, match="'web' may not call compartment 'other'"):
            out("children")  # edgebox.children is other's: web has no edge to it
        # At the monitor: hostile code asking for the edge itself.
        forged = app.function("edgebox:forge_edge")("other")
        assert forged.startswith("CompartmentUnavailable") and \
            "'web' may not call compartment 'other'" in forged, forged
        assert app.function("edgebox:forge_edge")("main").startswith("CompartmentUnavailable")
        assert try_call("whoami")  # web goes on working
        # A compartment with no may_call has no way to ask at all.
        other_pids = app.instances("other")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    refused = [r for r in records if r["event"] == "edge_refused"]
    assert {r["callee"] for r in refused} == {"other", "main"}
    assert other_pids


def test_garbage_on_the_control_socket_kills_only_the_sender(make_app, key):
    app = make_app(spec(key))
    with app:
        with pytest.raises(pycompart.CompartmentCrashed):
            app.function("edgebox:flood_control")()
        assert app.function("edgebox:relay")("whoami")  # a fresh web, a fresh edge
        assert app.function("edgebox:whoami")()


def test_asking_for_an_edge_over_and_over_is_bounded(make_app, key, tmp_path):
    log = tmp_path / "audit.jsonl"
    app = make_app(spec(key, app={"audit_log": str(log)}, signer={"max_restarts": 3}))
    with app:
        try:
            app.function("edgebox:open_flood")(300)
        except pycompart.CompartmentCrashed as exc:  # or it is killed for not reading its answers
            assert "did not read its control socket" in str(exc)
        monitor = app._runtime.monitor
        assert monitor.edges.live <= 1
        assert app.function("edgebox:whoami")()  # main's signer is untouched
    records = [json.loads(line) for line in log.read_text().splitlines()]
    started = [r for r in records if r["event"] == "instance_start" and r["compartment"] == "signer"]
    assert len(started) <= 1 + 3 + 1  # main's, then at most max_restarts + 1 for web


@pytest.mark.parametrize("count", [1, 17])
def test_descriptors_on_the_control_socket_kill_the_sender(make_app, key, tmp_path, count):
    log = tmp_path / "audit.jsonl"
    app = make_app(spec(key, app={"audit_log": str(log)}))
    with app:
        app.function("edgebox:relay")("whoami")  # the steady state: web with its edge
        fds_before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(pycompart.CompartmentCrashed, match="control socket"):
            app.function("edgebox:fds_on_control")(count)
        assert app.function("edgebox:relay")("whoami")  # a new web works
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2
    breaks = [json.loads(line) for line in log.read_text().splitlines()
              if json.loads(line)["event"] == "comm_break"]
    assert breaks and "control socket" in breaks[0]["reason"]


def test_a_crashed_callee_fails_its_call_and_the_next_call_gets_a_new_one(make_app, key):
    app = make_app(spec(key))
    with app:
        relay = app.function("edgebox:relay")
        first = relay("whoami")
        with pytest.raises(pycompart.CompartmentCrashed, match="signer"):
            relay("crash")
        second = relay("whoami")
        assert second != first


def test_restart_never_keeps_the_edge_down(make_app, key):
    app = make_app(spec(key, signer={"restart": "never"}))
    with app:
        relay = app.function("edgebox:relay")
        relay("whoami")
        with pytest.raises(pycompart.CompartmentCrashed):
            relay("crash")
        with pytest.raises(pycompart.CompartmentUnavailable, match="restart is 'never'"):
            relay("whoami")
        assert app.function("edgebox:whoami")()  # main's own signer is another matter


def test_max_restarts_bounds_an_edge(make_app, key):
    app = make_app(spec(key, signer={"max_restarts": 2}))
    with app:
        relay = app.function("edgebox:relay")
        for _ in range(3):
            with pytest.raises(pycompart.CompartmentCrashed):
                relay("crash")
        with pytest.raises(pycompart.CompartmentUnavailable, match="gave up after 2 restarts"):
            relay("whoami")


def test_an_edge_call_times_out_and_a_stuck_callee_is_killed(make_app, key):
    app = make_app(spec(key, signer={"call_timeout": "300ms", "cancel_grace": "200ms"}))
    with app:
        relay = app.function("edgebox:relay")
        first = relay("whoami")
        started = time.monotonic()
        with pytest.raises(pycompart.CallTimeout, match="signer"):
            relay("sleep", 30)
        assert time.monotonic() - started < 5
        # time.sleep yields to the cancel: the same instance serves on.
        assert relay("whoami") == first


@pytest.mark.parametrize("attack", ["chatty", "trickle"])
def test_a_callee_that_streams_frames_instead_of_replying_still_times_out(make_app, key, attack):
    """Output frames (or a reply trickled byte by byte) in place of the
    reply must not hold the caller past its deadline: not web over its
    edge, not main over its channel."""
    app = make_app(spec(key, signer={"call_timeout": "500ms", "cancel_grace": "200ms"}))
    with app:
        relay = app.function("edgebox:relay")
        started = time.monotonic()
        with pytest.raises(pycompart.CallTimeout):
            relay(attack, 20)
        assert time.monotonic() - started < 5
        started = time.monotonic()
        with pytest.raises(pycompart.CallTimeout):
            app.function(f"edgebox:{attack}")(20)
        assert time.monotonic() - started < 5


def test_audit_records_edge_calls(make_app, key, tmp_path):
    log = tmp_path / "audit.jsonl"
    app = make_app(spec(key, app={"audit_log": str(log)}))
    with app:
        relay = app.function("edgebox:relay")
        relay("whoami")
        with pytest.raises(pycompart.CompartmentCrashed):
            relay("crash")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [r for r in records if r["event"] == "call" and r.get("caller") == "web"]
    assert [(r["callee"], r["entrypoint"], r["outcome"]) for r in calls] == [
        ("signer", "edgebox:whoami", "ok"), ("signer", "edgebox:crash", "crashed")]
    assert all(r["reported_by"] == "web" for r in calls)
    assert sum(r["event"] == "edge_open" for r in records) == 1


def test_descriptors_cross_an_edge_to_a_callee_that_takes_them(make_app, key, public):
    data = public
    app = make_app(spec(key, signer={"descriptors": True},
                        web={"privileges": {"filesystem": {"read": [str(data)]},
                                            "environment": ["EDGEBOX_KEY"]}}))
    with app:
        assert app.function("edgebox:pass_fd")(str(data)) == b"handed over"


def test_an_edge_refuses_descriptors_when_the_callee_takes_none(make_app, key, public):
    data = public
    app = make_app(spec(key, web={"privileges": {"filesystem": {"read": [str(data)]},
                                                 "environment": ["EDGEBOX_KEY"]}}))
    with app:
        with pytest.raises(TypeError, match="descriptors"):
            app.function("edgebox:pass_fd")(str(data))


def test_a_per_call_callee_gets_a_fresh_instance_each_call(make_app, key):
    app = make_app(spec(key, signer={"instances": "per-call", "max_instances": 2}))
    with app:
        relay = app.function("edgebox:relay")
        pids = {relay("whoami") for _ in range(3)}
        assert len(pids) == 3


def test_one_caller_cannot_hold_all_of_a_per_call_compartments_instances(make_app, key):
    app = make_app(spec(key, signer={"instances": "per-call", "max_instances": 4}))
    with app:
        held = app.function("edgebox:hold_per_call")(4)
        assert held.startswith("2 held, then CompartmentUnavailable") and "'web' holds 2" in held
        assert app.function("edgebox:whoami")()  # main still gets one


def test_an_unused_per_call_instance_is_taken_back_after_its_timeout(make_app, key):
    app = make_app(spec(key, signer={"instances": "per-call", "max_instances": 2,
                                     "call_timeout": "300ms", "cancel_grace": "100ms"}))
    with app:
        assert app.function("edgebox:hold_per_call")(1) == "1 held"
        time.sleep(2.5)  # call_timeout + cancel_grace + 1s, then it is killed
        assert app._runtime.monitor.edges.per_call_held == {}


def test_the_callees_instances_end_with_their_caller_and_the_app(make_app, key, tmp_path):
    log = tmp_path / "audit.jsonl"
    app = make_app(spec(key, app={"audit_log": str(log)}))

    def edge_pids():
        return [json.loads(line)["pid"] for line in log.read_text().splitlines()
                if json.loads(line)["event"] == "edge_open"]

    with app:
        relay = app.function("edgebox:relay")
        relay("whoami")
        first, = edge_pids()
        with pytest.raises(pycompart.CompartmentCrashed):
            app.function("edgebox:flood_control")()  # web dies: its signer goes with it
        _gone(first)
        relay("whoami")
        second = edge_pids()[-1]
        assert second != first and os.path.exists(f"/proc/{second}")
    _gone(second)


def _gone(pid):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{pid}")


def test_spec_rules_for_may_call():
    with pytest.raises(pycompart.SpecError, match="inline"):
        pycompart.App({"compartments": {"a": {"may_call": ["b"]}, "b": {"mechanism": "inline"}}})


def test_the_control_reader_survives_any_bytes():
    """Sans-IO: whatever an instance writes on its control socket, the
    monitor's reader yields messages or raises ValueError, nothing else."""
    import random

    from pycompart.wire import edges as wire

    rng = random.Random(12)
    good = wire.encode(wire.Open(1, "signer")) + wire.encode(wire.Cancel(3))
    for _ in range(3000):
        reader = wire.reader(for_monitor=True)
        data = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = bytearray(rng.randbytes(rng.randrange(1, 64)))
        try:
            reader.feed(bytes(data), [])
            for msg, fds in reader.messages():
                assert type(msg) in (wire.Open, wire.Cancel, wire.Kill, wire.Report) and fds == []
        except ValueError:
            pass
    reader = wire.reader(for_monitor=True)
    reader.feed(wire.encode(wire.Opened(1, 2, 3)), [])  # the monitor's own message is not one it takes
    with pytest.raises(ValueError):
        reader.messages()


def test_check_prints_the_call_graph(tmp_path, capsys):
    from pycompart.frontend import cli

    path = tmp_path / "app.toml"
    path.write_text('[compartments.web]\nmay_call = ["signer", "main"]\n'
                    '[compartments.signer]\nmay_call = ["hsm"]\n'
                    '[compartments.hsm]\ninstances = "per-call"\nmay_call = ["signer"]\n')
    assert cli.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "web -> signer  (edge: one signer instance for each web instance)" in out
    assert "signer -> hsm  (edge: a fresh instance per call)" in out
    assert "web -> main  (callbacks" in out
    assert "cycle: signer -> hsm -> signer" in out


def test_edges_work_for_a_user_who_is_not_root():
    from test_escape import run_as_nobody

    report = run_as_nobody(("edgebox.py", "edge_runner.py"), "edge_runner.py")
    assert report["uid"] == 65534
    assert report["handle"] == {"signature": report["expected"], "web_reads_key": False}
    assert report["crash"] == "CompartmentCrashed" and report["restarted"]
    assert "'web' may not call compartment 'other'" in report["forged"]


# -- modules of another compartment, imported over an edge ----------------------------

EDGEMODS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edgemods")


@pytest.fixture
def data_file(monkeypatch):
    d = pathlib.Path(tempfile.mkdtemp(prefix="pycompart-edgemod-"))
    d.chmod(0o755)
    path = d / "data.txt"
    path.write_text("the data")
    path.chmod(0o644)
    monkeypatch.setenv("EDGEMOD_DATA", str(path))
    monkeypatch.syspath_prepend(EDGEMODS)
    yield str(path)
    shutil.rmtree(d)
    for name in ("edgemod_a", "edgemod_b"):
        sys.modules.pop(name, None)


def module_spec(data, may_call=("reader",)):
    return {"compartments": {
        "app": {"modules": ["edgemod_a"], "may_call": list(may_call),
                "privileges": {"environment": ["EDGEMOD_DATA"]}},
        "reader": {"modules": ["edgemod_b"], "restart_backoff": "10ms",
                   "privileges": {"filesystem": {"read": [data]}, "environment": ["EDGEMOD_DATA"]}}}}


def test_a_module_of_a_compartment_it_may_call_comes_as_proxies(make_app, data_file):
    app = make_app(module_spec(data_file))
    app.start(import_hook=True)
    import edgemod_a

    assert edgemod_a.through_b() == "the data"
    assert edgemod_a.reads_itself() == "refused: PermissionError"  # app's own lock-down
    # b's class, its exception class and isinstance, in app, as proxies
    assert edgemod_a.store_roundtrip() == ("> the data", "NotFound: other", 2, True)
    # b's object, returned through app to main: main's calls reach it via app
    store = edgemod_a.give_store()
    assert store.get("data") == "given the data"
    app_pid, b_pid = edgemod_a.pids()
    assert b_pid != app_pid


def test_edge_calls_from_a_worker_thread_are_audited(make_app, data_file, tmp_path):
    """Red team: a call with plain arguments from a thread of the caller's
    own took the direct path and skipped the edge's report (and its cancel
    deferral): the audit log lost it."""
    log = tmp_path / "audit.jsonl"
    spec = module_spec(data_file)
    spec["app"] = {"audit_log": str(log)}
    spec["compartments"]["app"]["privileges"]["syscalls"] = "python-threads"
    app = make_app(spec)
    app.start(import_hook=True)
    import edgemod_a

    assert edgemod_a.read_in_a_thread(3) == ["the data"] * 3
    app.stop()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [r for r in records if r["event"] == "call" and r.get("caller") == "app"
             and r["callee"] == "reader" and r["entrypoint"] == "@call"]
    assert len(calls) == 3, calls


def test_an_edge_caller_gets_no_private_names_and_sets_no_attributes(make_app, data_file):
    """A sandbox's internals are main's to see (main is the trusted side),
    not another compartment's: app cannot rewire reader's module to use
    reader's privileges for it, nor walk to its globals."""
    app = make_app(module_spec(data_file))
    app.start(import_hook=True)
    import edgemod_a

    assert edgemod_a.rewire_b() == ["AttributeError", "AttributeError", "AttributeError"]
    assert edgemod_a.through_b() == "the data"  # PATH is untouched
    import edgemod_b  # main itself, the trusted side, sees the sandbox's privates

    assert edgemod_b._private == "reader's own"


def test_an_edge_caller_cannot_change_the_callees_module_state_in_place(make_app, data_file):
    """Red team: attribute writes were refused, but reader's module-level
    list (what it serves) came by reference, and app appended to it. An
    untrusted caller gets copies of module-level containers."""
    app = make_app(module_spec(data_file))
    app.start(import_hook=True)
    import edgemod_a
    import edgemod_b

    outcome = edgemod_a.rewire_b_in_place()
    assert outcome[3] == "PermissionError" and outcome[4] == "the data", outcome
    assert edgemod_b.ALLOWED == ["data"] and edgemod_b.OPTIONS == {"prefix": ""}
    edgemod_b.ALLOWED.append("x")  # main, the trusted side, shares them
    assert edgemod_b.ALLOWED == ["data", "x"]


def test_an_exception_of_the_callee_reaches_main_through_the_caller_as_itself(make_app, data_file):
    app = make_app(module_spec(data_file))
    app.start(import_hook=True)
    import edgemod_a
    import edgemod_b

    with pytest.raises(edgemod_b.NotFound) as info:  # b's class, raised by b, through a
        edgemod_a.get_through("other")
    assert isinstance(info.value, LookupError) and "other" in str(info.value)


def test_an_edge_caller_cannot_reach_the_callees_standard_library(make_app, data_file):
    """``mod.os.sys.modules["builtins"].eval`` would run anything in the
    callee, with its privileges: a standard-library module crosses by name
    (the caller's own copy), and no object that is not the callee's own is
    served to a caller it does not trust."""
    app = make_app(module_spec(data_file))
    app.start(import_hook=True)
    import edgemod_a

    assert edgemod_a.reach_stdlib() == [True, "PermissionError"]


@pytest.mark.parametrize("trust, reached", [("sandbox", True), ("safebox", False)])
def test_main_reaches_a_safeboxs_standard_library_only_as_its_own(make_app, data_file, trust, reached):
    spec = module_spec(data_file)
    spec["compartments"]["reader"]["trust"] = trust
    app = make_app(spec)
    app.start(import_hook=True)
    import edgemod_b

    assert (edgemod_b.os is os) is (not reached)  # a safebox's os is main's own
    if reached:
        assert edgemod_b.whose() != os.getuid()  # main trusts... and is trusted by a sandbox
    else:
        with pytest.raises(PermissionError, match="its callers only its own objects"):
            edgemod_b.whose()


def test_a_guarded_compartment_takes_no_import_path_from_its_caller(tmp_path):
    from pycompart.compartment.objects import ObjectServer

    extra = str(tmp_path / "planted")
    ObjectServer("x", ["json"], [], [], False, trusts_main=False).op_import("json", [extra])
    assert extra not in sys.path
    ObjectServer("x", ["json"], [], [], False, trusts_main=True).op_import("json", [extra])
    assert extra in sys.path  # main, for a sandbox: its import path is followed
    sys.path.remove(extra)


def test_a_warning_cannot_make_main_read_a_file_it_names(make_app, data_file, tmp_path):
    """Showing a warning reads its file (linecache), in main: a compartment
    naming a FIFO (or /dev/zero, or main's stdin) must not block main or
    fill its memory."""
    import threading
    import warnings

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    app = make_app(module_spec(data_file))
    app.start(import_hook=True)
    import edgemod_b

    done = []
    shown = []

    def warn():
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # Formatting is what reads the file (as the default showwarning does).
            warnings.showwarning = lambda *a, **k: shown.append(warnings.formatwarning(*a[:4]))
            done.append(edgemod_b.warn_at(str(fifo)))
            done.append(edgemod_b.warn_at("/dev/zero"))
    t = threading.Thread(target=warn, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():
        with open(fifo, "w"):
            pass  # unblock it
    assert done == ["warned", "warned"]
    assert shown == [f"<reader: {fifo}>:1: UserWarning: boom\n", "<reader: /dev/zero>:1: UserWarning: boom\n"]


def test_a_crash_and_a_stale_reference_over_a_module_edge(make_app, data_file):
    app = make_app(module_spec(data_file))
    app.start(import_hook=True)
    import edgemod_a

    assert edgemod_a.crash_b() == "CompartmentCrashed"
    assert edgemod_a.through_b() == "the data"  # a new instance of reader for app
    assert edgemod_a.stale() == "StaleReference"


def test_a_module_of_a_compartment_it_may_not_call_is_refused_by_name(make_app, data_file):
    app = make_app(module_spec(data_file, may_call=()))
    with pytest.raises(pycompart.CompartmentStartError,
                       match="'edgemod_b' is placed in compartment 'reader'; compartment 'app' "
                             "cannot import it: its spec's may_call does not list 'reader'"):
        app.start(import_hook=True)  # app imports edgemod_a, which imports edgemod_b, at its start


def test_pycompart_run_boxes_two_dependencies_that_use_each_other(data_file, tmp_path):
    import subprocess

    spec = tmp_path / "app.toml"
    spec.write_text(f"""
[compartments.app]
modules = ["edgemod_a"]
may_call = ["reader"]
privileges.environment = ["EDGEMOD_DATA"]

[compartments.reader]
modules = ["edgemod_b"]
privileges.environment = ["EDGEMOD_DATA"]
privileges.filesystem.read = ["{data_file}"]
""")
    prog = tmp_path / "prog.py"
    prog.write_text("import edgemod_a\nprint(edgemod_a.through_b(), edgemod_a.reads_itself())\n")
    env = dict(os.environ, PYTHONPATH=EDGEMODS)
    proc = subprocess.run([sys.executable, "-m", "pycompart", "run", str(spec), "--", str(prog)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "the data refused: PermissionError"


def test_decorated_entrypoints_call_each_other_over_the_edge():
    import edgeapp

    with edgeapp.app:
        assert edgeapp.quad(3) == 12
        web, signer, again = edgeapp.pids()
        assert web != signer == again
        assert signer != edgeapp.where()  # main's signer is another instance
        with pytest.raises(pycompart.RemoteError) as info:
            edgeapp.check_through("evil")  # signer's exception, on through web
        assert info.value.type_name == "edgeapp.BadToken"
        assert info.value.message == "bad token 'evil'"
    with edgeapp.closed:
        with pytest.raises(pycompart.EntrypointError,
                           match="'web' may not call compartment 'signer'"):
            edgeapp.nine(1)


def test_a_recursion_across_a_cycle_of_compartments_is_bounded(make_app):
    app = make_app({"compartments": {
        "a": {"functions": ["edgebox:ping_a"], "may_call": ["b"]},
        "b": {"functions": ["edgebox:ping_b"], "may_call": ["a"]}}})
    with app:
        ping = app.function("edgebox:ping_a")
        assert ping(5) == 5  # a -> b -> a -> b -> a -> b: fresh instances at each level
        with pytest.raises(pycompart.CompartmentUnavailable, match="at most 8 deep"):
            ping(20)
        assert app._runtime.monitor.edges.live <= 8
        assert ping(3) == 3


def test_a_privileged_compartment_brokers_connections_to_fresh_instances(make_app, monkeypatch):
    """The seeds' broker, inside a compartment: only ``listener`` may bind
    the port; it hands each connection to a fresh ``handler`` over its edge;
    main does nothing but start it."""
    import socket
    import threading

    import brokerbox  # noqa: F401  (main knows the entrypoints' annotations)

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(EDGEMODS), "..", "examples", "echo"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = make_app({"compartments": {
        "listener": {"functions": ["brokerbox:listen"], "may_call": ["handler"], "call_timeout": "60s",
                     "privileges": {"network": {"bind": [port]}, "syscalls": "python-threads"}},
        "handler": {"modules": ["echohandler"], "functions": ["brokerbox:try_connect"],
                    "instances": "per-connection", "descriptors": True, "max_instances": 4,
                    "call_timeout": "20s"}}})
    with app:
        result = []
        server = threading.Thread(target=lambda: result.append(app.function("brokerbox:listen")(port, 6)))
        server.start()
        deadline = time.monotonic() + 10
        payloads = [os.urandom(1000 * (i + 1)) for i in range(6)]

        def client(data):
            while True:
                try:
                    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            with conn:
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := conn.recv(65536):
                    got += chunk
            assert got == data
        clients = [threading.Thread(target=client, args=(p,)) for p in payloads]
        for t in clients:
            t.start()
        for t in clients:
            t.join(30)
        server.join(30)
        assert result == [[6, 0]]


def test_entrypoints_in_the_main_script_call_each_other_over_the_edge(tmp_path):
    """The quick start's layout: ``@app.entrypoint`` functions in the script
    itself (an instance imports it as ``__mp_main__``)."""
    import subprocess

    script = tmp_path / "tokens.py"
    script.write_text("""
import pycompart
app = pycompart.App({"compartments": {"web": {"may_call": ["signer"]}, "signer": {}}})

@app.entrypoint("signer")
def sign(data: bytes) -> str:
    return data.hex()

@app.entrypoint("web")
def handle(data: bytes) -> str:
    return "signed " + sign(data)

if __name__ == "__main__":
    with app:
        print(handle(b"ab"))
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "signed 6162"


# -- a guarded compartment: only its own objects, by identity -------------------------


@pytest.fixture
def vault(make_app):
    app = make_app({"compartments": {"vault": {"trust": "safebox", "modules": ["vaultmod"]}}})
    app.start(import_hook=True)
    import vaultmod

    yield app, vaultmod
    sys.modules.pop("vaultmod", None)


def _raw(app, target):
    comp = app.compartment("vault")
    return comp, object.__getattribute__(target, "_pc_inst")


def test_a_path_that_walks_out_of_the_compartment_is_refused_anywhere_in_a_request(vault):
    """``vaultmod:json.codecs.builtins.exec`` as an argument to an owned
    list's ``sort(key=...)`` ran anything in the vault."""
    app, vaultmod = vault
    comp, inst = _raw(app, vaultmod.RECENT)
    for path in ("json.codecs.builtins.exec", "os.system", "Store.helper", "logger.manager"):
        forged = comp.path_object("vaultmod", path, "function")
        with pytest.raises(PermissionError, match="not a module, class or function of compartment"):
            comp.call(inst, "@callmethod", [vaultmod.RECENT, "sort", [], {"key": forged}])
    own = comp.path_object("vaultmod", "pid", "function")
    assert comp.call(inst, "@call", [own, [], {}]) == vaultmod.pid()  # its own function, by path


def test_a_handle_to_what_is_not_its_own_is_for_looking_at_not_for_use(vault):
    app, vaultmod = vault
    comp, inst = _raw(app, vaultmod.RECENT)
    gen = vaultmod.count_up(3)
    code = gen.gi_code  # a public attribute of its generator: handed out, not its own
    with pytest.raises(PermissionError, match="its own objects"):
        comp.call(inst, "@callmethod", [vaultmod.RECENT, "append", [code], {}])
    with pytest.raises(PermissionError):
        vaultmod.Store().helper()  # staticmethod(os.getuid) on its class: not its code
    assert list(gen) == [0, 1, 2]


def test_a_guarded_compartment_takes_no_subclass_machinery(vault):
    app, vaultmod = vault
    comp, inst = _raw(app, vaultmod.RECENT)
    with pytest.raises(PermissionError, match="subclass its classes"):
        comp.call(inst, "@twinclass", ["X", "X", [vaultmod.Store], {}, {"T": type}, None])
    with pytest.raises(PermissionError, match="subclass its classes"):
        comp.call(inst, "@classinfo", [vaultmod.Store])


def test_a_guarded_compartments_own_code_works_as_usual(vault):
    app, vaultmod = vault
    store = vaultmod.Store("v")
    assert store.cached_len("abc") == 3  # an lru_cache method: its own code, decorated
    assert store.summary() == '{"label": "v"}'
    vaultmod.RECENT.append("x")  # a container its module hands out
    assert "x" in vaultmod.RECENT and vaultmod.STATS["reads"] == 0
    assert vaultmod.json is json  # the standard library crosses by name


def test_protocol_operations_take_only_what_the_proxies_send(vault):
    """``deepcopy(obj, memo)`` with a dict of the caller's as the memo read
    private state into it; ``type(obj, bases, ns)`` would make a class."""
    app, vaultmod = vault
    store = vaultmod.Store("mine")
    comp, inst = _raw(app, store)
    with pytest.raises(TypeError):
        comp.call(inst, "@op", [store, "deepcopy", [vaultmod.STATS]])
    assert set(vaultmod.STATS) == {"reads"}
    with pytest.raises(TypeError):
        comp.call(inst, "@op", [store, "copy", [1]])
    import copy

    assert copy.deepcopy(store).summary() == '{"label": "mine"}'  # what the proxy sends still works


def test_a_guarded_compartment_imports_nothing_on_a_callers_word(vault, monkeypatch):
    """A standard-library path to a module it has not imported (``this``,
    ``antigravity``, ``unittest.__main__``) ran its import there."""
    app, vaultmod = vault
    import types as _types

    comp, inst = _raw(app, vaultmod.RECENT)
    for name in ("this", "antigravity"):
        # (in main's sys.modules, so main's proxy sends it by name)
        monkeypatch.setitem(sys.modules, name, _types.ModuleType(name))
        with pytest.raises(PermissionError, match="not imported in compartment 'vault'"):
            comp.call(inst, "@callmethod", [vaultmod.RECENT, "append", [sys.modules[name]], {}])
    assert list(vaultmod.RECENT) == []


def test_warnings_make_main_read_a_bounded_number_of_source_files(monkeypatch, tmp_path):
    """Each file a warning names that main reads stays in linecache: a
    compartment naming ever new files must not grow main without bound."""
    from pycompart.frontend import warn

    class Comp:
        name = "box"
    monkeypatch.setattr(warn, "_PRIMED", set())
    monkeypatch.setattr(warn, "MAX_PRIMED", 3)
    names = []
    for i in range(5):
        path = tmp_path / f"m{i}.py"
        path.write_text("x = 1\n")
        names.append(warn._where(Comp, str(path)))
    assert names[:3] == [str(tmp_path / f"m{i}.py") for i in range(3)]
    assert names[3:] == [f"<box: {tmp_path / f'm{i}.py'}>" for i in (3, 4)]


def test_warnings_make_main_keep_a_bounded_number_of_source_lines(monkeypatch, tmp_path):
    """A file of short lines costs main ~40 times its size in linecache:
    256 files of 1 MiB held 11 GiB. The lines kept are bounded in all."""
    from pycompart.frontend import warn

    class Comp:
        name = "box"
    monkeypatch.setattr(warn, "_PRIMED", set())
    monkeypatch.setattr(warn, "_primed_lines", [0])
    monkeypatch.setattr(warn, "MAX_PRIMED_LINES", 1000)
    small, big = tmp_path / "small.py", tmp_path / "big.py"
    small.write_text("x = 1\n" * 10)
    big.write_text("\xff\n" * 5000)
    assert warn._where(Comp, str(big)) == f"<box: {big}>"
    assert warn._where(Comp, str(small)) == str(small)
