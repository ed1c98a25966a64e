"""A hostile compartment cannot hurt main through the channel: the monitor
survives anything an instance sends, main's memory and time stay bounded,
and only documented exception types come out of the boundary. Each test
drives a real instance running ``redteam.py``."""

import errno
import json
import os
import resource
import time

import pytest

import bystander  # noqa: F401  (so main knows the functions' signatures)
import pycompart
import redteam  # noqa: F401
from pycompart import CompartmentUnavailable, ProtocolError

FNS = ["redteam:ping", "redteam:whoami", "redteam:deep_reply", "redteam:empty_lists_reply",
       "redteam:flood_unknown_replies", "redteam:ignore_cancel_and_flood",
       "redteam:stop_reading_and_call", "redteam:crash", "redteam:claim_crash"]


def app_with(make_app, extra=None, **evil):
    spec = {"compartments": {
        "evil": {"functions": FNS, "restart_backoff": "10ms", "call_timeout": "5s", **evil},
        "good": {"functions": ["bystander:ping", "bystander:crash", "bystander:whoami"],
                 "restart_backoff": "10ms"}}}
    spec.update(extra or {})
    return make_app(spec)


def monitor_alive(app):
    return app._runtime.monitor._thread.is_alive()


def test_a_deep_first_frame_before_hello_does_not_kill_the_monitor(make_app):
    """Finding 2: import-time code of a boxed module sends a reply nested
    5000 deep before Hello; msgspec raised RecursionError on the monitor
    thread and every compartment was gone ("the app has stopped")."""
    app = make_app({"compartments": {
        "evil": {"modules": ["redteam_import"]},
        "good": {"functions": ["bystander:ping"]}}})
    app.start(lazy=True)
    with pytest.raises((CompartmentUnavailable, pycompart.CompartmentStartError)) as info:
        app.compartment("evil").module("redteam_import")
    assert "protocol" in str(info.value).lower() or "bad start" in str(info.value), info.value
    assert monitor_alive(app)
    assert app.function("bystander:ping")() == "pong"


def test_a_deep_reply_is_a_protocol_error_and_the_instance_is_replaced(make_app):
    """Findings 2 and 11: a RecursionError must not reach the caller or the
    monitor; the instance is killed and replaced."""
    app = app_with(make_app)
    with app:
        before = app.function("redteam:whoami")()
        with pytest.raises(ProtocolError):
            app.function("redteam:deep_reply")()
        assert monitor_alive(app)
        deadline = time.monotonic() + 5
        while app.function("redteam:whoami")() == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.function("redteam:whoami")() != before
        assert app.function("redteam:ping")() == "pong"


def test_a_reply_of_millions_of_empty_lists_does_not_inflate_main(make_app):
    """Finding 7: 29 MiB of empty lists took main from 21 to 2,088 MiB.
    Decoding is refused before it allocates (ProtocolError)."""
    app = app_with(make_app)
    with app:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(ProtocolError, match="objects"):
            app.function("redteam:empty_lists_reply")(29)
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mib < 300, f"main grew by {grown_mib:.0f} MiB"
        assert app.function("redteam:ping")() == "pong"


def test_a_flood_of_unknown_replies_is_bounded_in_the_audit_log_and_killed(make_app, tmp_path):
    """Finding 10: each reply to an unknown id was an audit line (~100 MiB
    in 5 s) and the instance was never replaced."""
    log = tmp_path / "audit.jsonl"
    app = app_with(make_app, {"app": {"audit_log": str(log)}})
    with app:
        pid = app.function("redteam:whoami")()
        try:
            app.function("redteam:flood_unknown_replies")(100_000)
        except pycompart.CompartmentError:
            pass  # killed while flooding: that is the point
        deadline = time.monotonic() + 5
        while pid in app.instances("evil") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid not in app.instances("evil")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    violations = [r for r in lines if r["event"] == "violation"]
    assert len(violations) <= 20, len(violations)
    kills = [r for r in lines if r["event"] == "instance_kill" and r.get("pid") == pid]
    assert kills and "violations" in kills[0]["reason"], kills


def test_the_monitor_is_never_held_by_one_instance(make_app):
    """Finding 5: after a timeout the monitor drained the instance's pipe
    with no deadline; an instance that ignored the cancel and streamed
    replies to unknown ids kept it there: never killed, and another
    compartment's crash was not seen meanwhile."""
    app = app_with(make_app, cancel_grace="300ms")
    with app:
        evil_pid = app.function("redteam:whoami")()
        good_pid = app.function("bystander:whoami")()
        with pytest.raises(pycompart.CompartmentError):
            app.function("redteam:ignore_cancel_and_flood").options(timeout=0.5)()
        time.sleep(0.5)  # the monitor is now dealing with the flooder
        start = time.monotonic()
        with pytest.raises(pycompart.CompartmentCrashed):
            app.function("bystander:crash")()
        assert _wait(lambda: app.function("bystander:whoami")() != good_pid, 5), \
            "a crashed compartment was not replaced while the monitor drained the flooder"
        assert _wait(lambda: evil_pid not in app.instances("evil"), 5), "the flooder was never killed"
        assert time.monotonic() - start < 8
        assert monitor_alive(app)


def _wait(predicate, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_call_timeout_holds_when_the_compartment_stops_reading(make_app):
    """Finding 8: the compartment stopped reading and sent top-level calls;
    main's refusals blocked for 60 s, so a 1 s call returned after 60 s."""
    app = app_with(make_app)
    with app:
        start = time.monotonic()
        with pytest.raises(pycompart.CompartmentError):
            app.function("redteam:stop_reading_and_call").options(timeout=1.0)(20_000)
        assert time.monotonic() - start < 5
        assert monitor_alive(app)


def test_main_opens_what_a_compartment_wrote_without_following_its_links(make_app, tmp_path):
    """Finding 4: a symlink planted in a granted write directory was
    followed by root main, which overwrote the file the link pointed to.
    Links are refused at creation by default (the escape battery); where a
    spec grants them, ``pycompart.open_untrusted`` is how main opens such
    files: no link followed, no escape, no FIFO to hang on."""
    import stat
    import tempfile

    out = tempfile.mkdtemp(dir="/tmp")
    os.chmod(out, 0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    app = make_app({"compartments": {"w": {
        "functions": ["redteam:plant"],
        "privileges": {"filesystem": {"write": [out], "symlinks": True, "fifos": True}}}}})
    with app:
        app.function("redteam:plant")(out, str(victim))
    assert os.path.islink(os.path.join(out, "report.txt"))
    assert stat.S_ISFIFO(os.stat(os.path.join(out, "pipe.txt")).st_mode)
    with pytest.raises(OSError) as info:
        pycompart.open_untrusted(out, "report.txt", "w")
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError) as info:
        pycompart.open_untrusted(out, "pipe.txt")  # would block for ever with open()
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        pycompart.open_untrusted(out, "../" + os.path.basename(out) + "/ok.txt")
    with pycompart.open_untrusted(out, "ok.txt") as f:
        assert f.read() == "written by the compartment\n"
    assert victim.read_text() == "precious\n"


def test_a_thread_left_spinning_after_its_call_is_stopped(make_app, tmp_path):
    """Finding 15: a thread left spinning after its call returned kept
    burning CPU. An instance that uses more than ``idle_cpu`` of CPU while
    no call is in flight is killed and replaced; its use is in the audit."""
    log = tmp_path / "audit.jsonl"
    app = make_app({"app": {"audit_log": str(log)}, "compartments": {"spin": {
        "functions": ["redteam:start_spinner", "redteam:whoami"], "idle_cpu": "1s",
        "restart_backoff": "10ms", "privileges": {"syscalls": "python-threads"}}}})
    with app:
        pid = app.function("redteam:whoami")()
        assert app.function("redteam:start_spinner")() == "spinning"
        assert _wait(lambda: pid not in app.instances("spin"), 8), "the spinner was never stopped"
        assert _wait(lambda: app.instances("spin"), 5)
        assert app.function("redteam:whoami")() != pid
    records = [json.loads(line) for line in log.read_text().splitlines()]
    kill = next(r for r in records if r["event"] == "instance_kill" and r["pid"] == pid)
    assert "while no call was in flight" in kill["reason"]
    exit_ = next(r for r in records if r["event"] == "instance_exit" and r["pid"] == pid)
    assert exit_["cpu_ms"] > 900 and exit_["max_rss_kib"] > 0


def test_a_busy_compartment_is_not_mistaken_for_an_idle_one(make_app):
    """Many short calls between two looks are work, not idling."""
    app = make_app({"compartments": {"busy": {"functions": ["redteam:burn", "redteam:whoami"],
                                               "idle_cpu": "1s"}}})
    with app:
        pid = app.function("redteam:whoami")()
        end = time.monotonic() + 3.5
        while time.monotonic() < end:
            app.function("redteam:burn")(0.05)
        assert app.function("redteam:whoami")() == pid


def test_no_pid_of_mains_on_the_zygotes_command_line(make_app):
    """Finding 14: instances read main's pid from their command line (the
    zygote's, inherited). The zygote learns it from its control socket."""
    app = make_app({"compartments": {"b": {"functions": ["bystander:ping"]}}})
    with app:
        with open(f"/proc/{app.zygote_pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        assert str(os.getpid()).encode() not in args
        assert app.function("bystander:ping")() == "pong"


def test_the_zygote_inherits_none_of_mains_descriptors_but_its_control_socket():
    """The zygote is started with posix_spawn, not subprocess: it must still
    get nothing main made inheritable (what close_fds did), /dev/null for
    stdin, and a session of its own; and its process handle waits and kills."""
    import signal

    from pycompart.supervisor import launcher

    r, w = os.pipe()
    os.set_inheritable(r, True)
    os.set_inheritable(w, True)
    leaked = {os.readlink(f"/proc/self/fd/{r}"), os.readlink(f"/proc/self/fd/{w}")}
    proc, control = launcher.launch()
    try:
        seen = {}
        for name in os.listdir(f"/proc/{proc.pid}/fd"):
            try:
                seen[int(name)] = os.readlink(f"/proc/{proc.pid}/fd/{name}")
            except OSError:
                pass
        assert not leaked & set(seen.values()), seen
        assert seen.get(0) == "/dev/null"
        assert os.getsid(proc.pid) == proc.pid
        assert proc.poll() is None
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
        assert proc.poll() == -signal.SIGKILL
    finally:
        control.close()
        proc.kill()
        proc.wait(10)
        os.close(r)
        os.close(w)


def test_a_zygote_that_does_not_end_in_time_is_a_timeout():
    from pycompart.supervisor import launcher

    proc, control = launcher.launch()
    try:
        with pytest.raises(TimeoutError):
            proc.wait(0.05)
        control.close()  # the zygote ends when main's end closes
        assert proc.wait(10) is not None
    finally:
        proc.kill()
        proc.wait(10)


def test_mains_end_of_the_control_socket_is_never_inheritable(monkeypatch):
    """Red team: main made the zygote's end of the socket inheritable for the
    spawn, so another thread's exec at that moment got it too (and could read
    main's Spawn messages). The child gets a copy; main's stays close-on-exec."""
    from pycompart.supervisor import launcher

    inheritable_sockets = []
    real = os.posix_spawn

    def spy(path, argv, env, **kw):  # main's descriptors at the moment of the spawn
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.get_inheritable(int(name)) and os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    inheritable_sockets.append(int(name))
            except OSError:
                pass
        return real(path, argv, env, **kw)

    monkeypatch.setattr(os, "posix_spawn", spy)
    proc, control = launcher.launch()
    try:
        assert inheritable_sockets == []
        control.sendall(b"")  # the zygote holds the other end: it started with it
        assert proc.poll() is None
    finally:
        control.close()
        proc.wait(10)


def test_a_descriptor_made_inheritable_during_the_launch_does_not_stay_in_the_zygote(monkeypatch):
    """Red team: a descriptor another thread makes inheritable between the
    launcher's listing and the spawn reached the zygote. The zygote closes
    everything but its control socket and stdio itself."""
    from pycompart.supervisor import launcher

    r, w = os.pipe()
    os.set_inheritable(w, True)
    leaked = os.readlink(f"/proc/self/fd/{w}")
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: [n for n in real(path) if n != str(w)]
                        if path == "/proc/self/fd" else real(path))  # as if it came after the listing
    proc, control = launcher.launch()
    monkeypatch.undo()
    try:
        deadline = time.monotonic() + 10
        while True:
            held = set()
            for name in os.listdir(f"/proc/{proc.pid}/fd"):
                try:
                    held.add(os.readlink(f"/proc/{proc.pid}/fd/{name}"))
                except OSError:
                    pass
            if leaked not in held or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert leaked not in held
    finally:
        control.close()
        proc.wait(10)
        os.close(r)
        os.close(w)


_PLANTER = '''
import datetime, fractions, os, pathlib, zoneinfo
HERE = os.path.dirname(os.path.abspath(__file__))

def plant():
    """Plant stand-ins for the modules main imports to decode what this
    returns, in the program's own directory (first on main's sys.path)."""
    os.makedirs(os.path.join(HERE, "tzdata"))
    for name in ("fractions", "pathlib", "zoneinfo", "tzdata/__init__", "tempfile", "shutil"):
        with open(os.path.join(HERE, name + ".py"), "w") as f:
            f.write("open(%r, 'w').write('planted code ran in main')\\n"
                    % os.path.join(HERE, "RAN-" + name.split("/")[0]))
    # A zone not in the system's data: main's zoneinfo looks for it in the
    # tzdata package (through importlib.resources, tempfile, shutil, ...).
    with open("/usr/share/zoneinfo/UTC", "rb") as f:
        elsewhere = zoneinfo.ZoneInfo.from_file(f, key="Not/AZone")
    return [fractions.Fraction(1, 3), pathlib.PurePosixPath("/x"),
            datetime.datetime(2026, 1, 1, tzinfo=zoneinfo.ZoneInfo("UTC")),
            datetime.datetime(2026, 1, 1, tzinfo=elsewhere)]

def describe(callback):
    """Plant inspect.py, then ask main to describe one of its callables."""
    import inspect
    with open(os.path.join(HERE, "inspect.py"), "w") as f:
        f.write("open(%r, 'w').write('planted code ran in main')\\n" % os.path.join(HERE, "RAN-inspect"))
    return str(inspect.signature(callback))
'''

_PLANT_MAIN = '''
import json, os, sys
import pycompart
here = os.path.dirname(os.path.abspath(__file__))
app = pycompart.App({"compartments": {"box": {"modules": ["planter"], "may_call": ["main"],
                     "privileges": {"filesystem": {"write": [here]}}}}})
app.start(import_hook=True)
import planter
before = [m for m in ("fractions", "pathlib", "zoneinfo", "inspect") if m in sys.modules]
values = planter.plant()
values.append(planter.describe(lambda a, b=2: None))
app.stop()
print(json.dumps([before, [type(v).__name__ for v in values],
                  sorted(f for f in os.listdir(here) if f.startswith("RAN-"))]))
'''


def test_a_compartment_cannot_plant_the_modules_main_imports_to_decode_its_values(tmp_path):
    """A Fraction, a path or a zoned datetime from a compartment makes main
    import ``fractions``, ``pathlib`` or ``zoneinfo`` then (and, for a zone
    not in the system's data, ``zoneinfo`` the ``tzdata`` package through
    ``importlib.resources``, ``tempfile``, ...), and describing a callback
    for it ``inspect``, at a moment the compartment picks: a
    compartment that may write to the program's directory (first on main's
    ``sys.path``) plants its own first. Main takes them from the standard
    library only."""
    import subprocess
    import sys

    tmp_path.chmod(0o777)  # (writable by the instance's uid, nobody under root)
    (tmp_path / "planter.py").write_text(_PLANTER)
    (tmp_path / "main.py").write_text(_PLANT_MAIN)
    out = subprocess.run([sys.executable, str(tmp_path / "main.py")], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    before, types_, ran = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == []  # (main had none of them: the import happens on decoding)
    assert types_ == ["Fraction", "PurePosixPath", "datetime", "datetime", "str"]
    assert ran == [], f"planted code ran in main: {ran}"
    assert sorted(p.name for p in tmp_path.glob("*.py")) == [
        "fractions.py", "inspect.py", "main.py", "pathlib.py", "planter.py", "shutil.py", "tempfile.py",
        "zoneinfo.py"]
    assert (tmp_path / "tzdata" / "__init__.py").exists()


def test_a_zone_not_in_the_systems_data_is_looked_up_from_the_standard_library_only(tmp_path):
    """Main's zoneinfo looks a zone it cannot find on its TZPATH up in the
    ``tzdata`` package, importing ``importlib.resources``, ``tempfile``,
    ``shutil``, ... on the way: all from the standard library only, the
    ``tzdata`` package not at all (the zone then keeps its offset)."""
    import subprocess
    import sys

    (tmp_path / "tzdata").mkdir()
    for name in ("tzdata/__init__", "tempfile", "shutil", "importlib_resources"):
        (tmp_path / f"{name}.py").write_text(f"open({str(tmp_path / ('RAN-' + name.split('/')[0]))!r}, 'w')\n")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from pycompart.wire import refs\n"
            "print(refs._zone('Not/AZone'), refs._zone('UTC'))\n") % str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "UTC"]
    assert sorted(p.name for p in tmp_path.glob("RAN-*")) == []


def test_items_pushed_back_with_mains_iterators_are_bounded_and_only_for_iterators(make_app):
    """A compartment hands main's iterator back with items "read ahead"
    (``EXT_PUSHBACK``): they are its bytes, held in main until it releases
    the iterator, so they are bounded (``MAX_PUSHBACK_BYTES``); and only an
    iterator takes them (it had main hold 16 MiB per message behind any
    object main passed, without bound)."""
    import sys

    app = make_app({"compartments": {"box": {"modules": ["pushbackbox"]}}})
    app.start(import_hook=True)
    try:
        import pushbackbox

        it = iter(range(10))
        pushbackbox.keep(it)
        answers = pushbackbox.flood(it, 12, 4)  # 48 MiB offered
        [inst] = app._runtime.compartments["box"].pool.ready
        held = sum(len(x) for e in inst.peer.exports._by_handle.values() if len(e) > 2 for x in e[2].items)
        assert held <= 16 << 20, held  # (refs.MAX_PUSHBACK_BYTES)
        # (Each request is refused after its value was decoded: the
        # pushback is taken as the value is.)
        assert "pushed back" not in answers[0] and "bytes of items pushed back" in answers[-1], answers
        plain = type("Plain", (), {})()
        pushbackbox.keep(plain)
        [answer] = pushbackbox.flood(plain, 1, 1)
        assert "not an iterator" in answer, answer
        assert pushbackbox.flood(it, 0, 1) == []  # (it serves on)
    finally:
        sys.modules.pop("pushbackbox", None)


def test_a_crash_a_compartment_reports_is_its_word_not_mains(make_app):
    """A compartment raises CompartmentCrashed naming another (which is
    fine and running): main's caller can tell it from a crash main saw."""
    app = app_with(make_app)
    with app:
        with pytest.raises(pycompart.CompartmentCrashed) as info:
            app.function("redteam:claim_crash")("good")
        assert info.value.reported_by == "evil" and info.value.compartment == "good"
        assert "reported by compartment 'evil'" in str(info.value)
        assert app.function("bystander:ping")() == "pong"
        with pytest.raises(pycompart.CompartmentCrashed) as seen:
            app.function("bystander:crash")()
        assert seen.value.reported_by is None and seen.value.compartment == "good"


def test_a_crash_claimed_under_pycomparts_full_class_name_is_marked_too(make_app):
    """Red team: a class of its own named pycompart.errors.CompartmentCrashed
    was found by main (among the classes it imported itself) and raised as
    main's own, reported_by None: a crash main never saw."""
    app = make_app({"compartments": {"liar": {"modules": ["redteam"]}}})
    with app:
        box = app.compartment("liar").module("redteam")
        with pytest.raises(pycompart.CompartmentCrashed) as info:
            box.claim_crash_by_full_name("good")
        assert info.value.reported_by == "liar" and "reported by compartment 'liar'" in str(info.value)
        with pytest.raises(pycompart.CompartmentCrashed) as info:
            box.claim_crash("good")
        assert info.value.reported_by == "liar"
