"""The runtime with real processes: calls, crashes, restarts, timeouts,
concurrency, hostile replies."""

import json
import sys
import os
import threading
import time

import msgspec
import pytest

import boxed
import interrupts
import pycompart
import pycompart.wire.exceptions
from pycompart import (
    CallTimeout,
    CompartmentCrashed,
    CompartmentStartError,
    CompartmentUnavailable,
    ProtocolError,
    RemoteError,
)


def box(make_app, extra=None, **compartment):
    spec = {"compartments": {"box": {"restart_backoff": "10ms", **compartment}}}
    if extra:
        spec.update(extra)
    app = make_app(spec)
    eps = {name: app.entrypoint("box")(getattr(boxed, name)) for name in (
        "null", "echo", "parse", "whoami", "add", "make_shape", "centroid", "fail", "crash",
        "lie", "forge", "spin", "stubborn", "sleepy", "environment", "open_fds", "big", "size")}
    return app, eps


def _parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_call_runs_in_another_process_and_validates(make_app):
    app, ep = box(make_app)
    assert ep["whoami"]() == os.getpid()  # not started: runs locally
    with app:
        pid = ep["whoami"]()
        assert pid != os.getpid() and pid in app.instances("box")
        assert ep["parse"](b"a bb ccc") == {"a": 1, "bb": 2, "ccc": 3}
        assert ep["parse"](b"", strict=False) == {}
        assert ep["add"](1, 2, 3, scale=2, z=1) == 14
        shape = ep["make_shape"]("sq", 4)
        assert isinstance(shape, boxed.Shape) and ep["centroid"](shape) == boxed.Point(1, 3)
        assert ep["null"]() is None
    assert ep["whoami"]() == os.getpid()


def test_instance_is_clean(make_app):
    """Forked from the zygote, not from main: no inherited descriptors, no
    environment beyond the basics."""
    os.environ["PYCOMPART_TEST_SECRET"] = "hunter2"
    try:
        app, ep = box(make_app)
        with app:
            env = ep["environment"]()
            assert "PYCOMPART_TEST_SECRET" not in env
            fds = ep["open_fds"]()
            # stdin/stdout/stderr, the two channel pipes, the listdir fd,
            # the bulk lanes' memory file, and one O_PATH descriptor per
            # import directory that the compartment's uid could not reach by path.
            preopened = len(app._runtime.lockdowns["box"].preopen)
            assert len(fds) <= 8 + preopened, fds
            # The zygote is the parent, not main: it runs as pid 1 of the
            # app's own pid namespace, under the process main started.
            pid = ep["whoami"]()
            zygote = _parent(pid)
            assert _parent(zygote) == app.zygote_pid
            with open(f"/proc/{zygote}/status") as f:
                nspids = next(line for line in f if line.startswith("NSpid:")).split()[1:]
            assert nspids == [str(zygote), "1"]
    finally:
        del os.environ["PYCOMPART_TEST_SECRET"]


def test_exceptions_map_back(make_app):
    app, ep = box(make_app)
    with app:
        with pytest.raises(ValueError) as info:
            ep["fail"]("value")
        assert info.value.args == ("bad value", 42)
        assert "boxed.py" in info.value.remote_traceback
        with pytest.raises(KeyError):
            ep["fail"]("key")
        with pytest.raises(FileNotFoundError) as oinfo:
            ep["fail"]("oserror")
        assert (oinfo.value.errno, oinfo.value.filename) == (2, "/no/such/file")
        assert "/no/such/file" in str(oinfo.value)
        with pytest.raises(RemoteError) as rinfo:
            ep["fail"]("custom")
        assert rinfo.value.type_name == "boxed.CustomError"
        with pytest.raises(TypeError, match="do not match"):
            ep["parse"]("str instead of bytes")
        assert ep["parse"](b"still works") == {"still": 5, "works": 5}


@pytest.mark.parametrize("how, status", [("exit", "exited with status 7"),
                                         ("sigkill", "SIGKILL"),
                                         ("segfault", "SIGSEGV"),
                                         ("abort", "SIGABRT")])
def test_crash_mid_call_fails_promptly_and_restarts(make_app, how, status):
    terminations = []
    app, ep = box(make_app)
    app.on_termination(terminations.append)
    with app:
        first = ep["whoami"]()
        t0 = time.monotonic()
        with pytest.raises(CompartmentCrashed) as info:
            ep["crash"](how)
        assert time.monotonic() - t0 < 2.0
        assert status in str(info.value) and info.value.pid == first
        assert info.value.compartment == "box"
        second = ep["whoami"]()  # waits for the replacement
        assert second != first
    assert terminations[0].pid == first and terminations[0].restarting


def test_system_exit_in_entrypoint_ends_the_instance(make_app):
    app, ep = box(make_app)
    with app:
        with pytest.raises(CompartmentCrashed, match="exited with status 5"):
            ep["fail"]("systemexit")
        assert ep["null"]() is None


def test_restart_never_makes_compartment_unavailable(make_app):
    app, ep = box(make_app, restart="never")
    with app:
        with pytest.raises(CompartmentCrashed):
            ep["crash"]("exit")
        with pytest.raises(CompartmentUnavailable, match="restart is 'never'"):
            ep["null"]()


def test_restart_budget_is_bounded(make_app):
    app, ep = box(make_app, max_restarts=2, restart_window="60s")
    with app:
        for _ in range(3):
            with pytest.raises(CompartmentCrashed):
                ep["crash"]("exit")
        with pytest.raises(CompartmentUnavailable, match="gave up after 2 restarts"):
            ep["null"]()


def test_restart_always_replaces_a_clean_exit(make_app):
    app, ep = box(make_app, restart="always")
    with app:
        first = ep["whoami"]()
        with pytest.raises(CompartmentCrashed, match="exited with status 0"):
            ep["crash"]("clean")
        assert ep["whoami"]() != first


def test_on_failure_does_not_restart_a_clean_exit(make_app):
    app, ep = box(make_app, restart="on-failure")
    with app:
        with pytest.raises(CompartmentCrashed, match="exited with status 0"):
            ep["crash"]("clean")
        with pytest.raises(CompartmentUnavailable, match="restart is 'on-failure'"):
            ep["null"]()


def test_timeout_cancels_a_python_loop_without_killing(make_app):
    timeouts = []
    app, ep = box(make_app, call_timeout="300ms", cancel_grace="2s")
    app.on_call_timeout(timeouts.append)
    with app:
        pid = ep["whoami"]()
        t0 = time.monotonic()
        with pytest.raises(CallTimeout):
            ep["spin"](30.0)
        assert time.monotonic() - t0 < 1.5
        # The loop was interrupted cooperatively: same instance serves on.
        assert ep["whoami"]() == pid
    assert timeouts and timeouts[0].entrypoint == "boxed:spin"


def test_timeout_kills_an_instance_that_does_not_yield(make_app):
    app, ep = box(make_app, call_timeout="300ms", cancel_grace="300ms")
    with app:
        pid = ep["whoami"]()
        with pytest.raises(CallTimeout):
            ep["stubborn"](30.0)
        # Killed after the grace period and replaced.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.02)
        assert not os.path.exists(f"/proc/{pid}")
        assert ep["whoami"]() != pid


def test_per_call_timeout_override(make_app):
    app, ep = box(make_app, call_timeout="none")
    with app:
        with pytest.raises(CallTimeout):
            ep["sleepy"].options(timeout=0.2)(5.0)
        assert ep["sleepy"].options(timeout=5)(0.01) == 0.01


def test_sixteen_threads_get_their_own_answers(make_app):
    app, ep = box(make_app, instances=2)
    errors = []

    def worker(n):
        try:
            for i in range(200):
                payload = f"t{n}-{i}".encode() * (1 + i % 7)
                assert ep["echo"](payload) == payload
                assert ep["add"](n, i) == n + i
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with app:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]


def test_calls_spread_over_instances(make_app):
    app, ep = box(make_app, instances=3)
    seen = set()
    barrier = threading.Barrier(6)

    def worker():
        barrier.wait()
        for _ in range(5):
            seen.add(ep["sleepy"](0.05) and ep["whoami"]())

    with app:
        assert len(app.instances("box")) == 3
        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(seen) >= 2


def test_crash_fails_all_pending_calls_from_many_threads(make_app):
    app, ep = box(make_app, call_timeout="10s")
    results = []

    def waiter():
        try:
            ep["sleepy"](5.0)
            results.append("ok")
        except CompartmentCrashed as exc:
            results.append(exc)

    with app:
        threads = [threading.Thread(target=waiter) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        os.kill(app.instances("box")[0], 9)
        t0 = time.monotonic()
        for t in threads:
            t.join(5)
        assert time.monotonic() - t0 < 3
    assert len(results) == 4 and all(isinstance(r, CompartmentCrashed) for r in results)


@pytest.mark.parametrize("kind", ["garbage", "oversized", "reserved", "wrongshape", "fds"])
def test_hostile_frames_give_protocol_error_and_main_survives(make_app, kind):
    breaks = []
    app, ep = box(make_app)
    app.on_comm_break(breaks.append)
    with app:
        pid = ep["whoami"]()
        with pytest.raises((ProtocolError, CompartmentCrashed)) as info:
            ep["forge"](kind)
        assert isinstance(info.value, ProtocolError), info.value
        # The misbehaving instance is killed and replaced.
        assert ep["whoami"]() != pid
    assert breaks and breaks[0].compartment == "box"


@pytest.mark.parametrize("kind", ["compact_garbage", "compact_big"])
def test_hostile_compact_replies_give_protocol_error_and_main_survives(make_app, kind):
    """A reply in the call gate's compact form to the very call it answers,
    written by the compartment's own code: not exactly one msgpack object,
    or bigger than max_message_size (which main's fast path must enforce as
    its frame decoder does)."""
    app, ep = box(make_app, extra={"app": {"max_message_size": "16KiB"}})
    with app:
        pid = ep["whoami"]()
        with pytest.raises(ProtocolError):
            ep["forge"](kind)
        assert ep["whoami"]() != pid


def test_a_compact_reply_inside_a_begun_frame_is_never_taken_for_one(make_app):
    """Red team: after a frame's header (and none of its body) had been read,
    main's fast path took a compact reply that followed for a whole frame of
    its own: a reply to the next call, accepted while the stream was
    misframed. Those bytes are the begun frame's body."""
    app = make_app({"compartments": {"box": {"call_timeout": "300ms", "cancel_grace": "20s",
                                             "restart_backoff": "10ms"}}})
    half = app.entrypoint("box")(boxed.half_frame)
    size = app.entrypoint("box")(boxed.size)
    with app:
        with pytest.raises(CallTimeout):
            half(0.6)
        try:
            got = size(b"ok")
        except (CallTimeout, ProtocolError):
            got = None  # the stream is misframed: never an answer from it
        assert got != 777
        for _ in range(3):
            try:
                answer = size.options(timeout=10)(b"abc")
            except ProtocolError:
                continue  # the misframed stream breaks the channel; a new instance answers
            assert answer == 3
            break
        else:
            pytest.fail("no instance answered after the misframed stream")


def test_reply_for_unknown_id_is_ignored_and_counted(make_app):
    app, ep = box(make_app)
    with app:
        assert ep["forge"]("unknown_id") == 1
        assert ep["null"]() is None
        inst = app._runtime.monitor.pools["box"].ready[0]
        assert inst.channel.conn.violations == 1


@pytest.mark.parametrize("kind", ["str", "float", "none"])
def test_mistyped_reply_is_a_protocol_error_channel_survives(make_app, kind):
    app, ep = box(make_app)
    with app:
        pid = ep["whoami"]()
        with pytest.raises(ProtocolError, match="declared return type"):
            ep["lie"](kind)
        assert ep["whoami"]() == pid


def test_large_arguments_and_limits(make_app):
    app, ep = box(make_app, extra={"app": {"max_message_size": "4MiB"}})
    with app:
        data = os.urandom(3 << 20)
        assert ep["echo"](data) == data
        with pytest.raises(ProtocolError, match="max_message_size"):
            ep["echo"](b"x" * (5 << 20))
        with pytest.raises(ProtocolError, match="exceeds the maximum"):
            ep["big"](5 << 20)
        assert ep["size"](b"ok") == 2


def test_a_small_reply_over_the_message_limit_is_an_error_and_the_channel_survives(make_app):
    """Below the bulk lanes' threshold a reply goes inline (in compact form
    on the call gate's fast path): one bigger than max_message_size comes
    back as an error naming the limit, and the next call works."""
    app, ep = box(make_app, extra={"app": {"max_message_size": "16KiB"}})
    with app:
        pid = ep["whoami"]()
        assert ep["big"](16000) == b"z" * 16000
        with pytest.raises(ProtocolError, match="exceeds the maximum"):
            ep["big"](20000)
        assert ep["whoami"]() == pid and ep["size"](b"ok") == 2


def test_start_failure_names_compartment_and_cause(make_app):
    app = make_app({"compartments": {"box": {"modules": ["broken_on_import"]}}})
    with pytest.raises(CompartmentStartError, match="'box' failed to start.*ModuleNotFoundError") as info:
        app.start()
    assert "no_such_module_xyz" in str(info.value.__cause__)
    assert not app.running


def test_a_placed_module_not_found_fails_at_mains_import(make_app):
    """Not (yet) on the import path: main may add its directory later, so the
    start goes on; importing it fails as it would unboxed."""
    app = make_app({"compartments": {"box": {"modules": ["no_such_module_xyz"]}}})
    app.start(import_hook=True)
    with pytest.raises(ModuleNotFoundError, match="no_such_module_xyz"):
        import no_such_module_xyz  # noqa: F401
    import sys

    assert "no_such_module_xyz" not in sys.modules


def test_a_memory_limit_too_small_to_start_names_the_cause(make_app):
    """Not "cannot enforce capabilities: " with an empty reason: the limit,
    what the instance already maps, and what to give it."""
    app = make_app({"compartments": {"box": {"privileges": {"memory": "16MiB"}}}})
    with pytest.raises(CompartmentStartError) as info:
        app.start()
    text = str(info.value)
    assert "memory = 16 MiB" in text and "already maps" in text and "give it at least" in text, text
    assert isinstance(info.value.__cause__, pycompart.PrivilegeError)


def test_audit_log(make_app, tmp_path):
    log = tmp_path / "audit.jsonl"
    app, ep = box(make_app, extra={"app": {"audit_log": str(log)}})
    with app:
        ep["parse"](b"a b")
        with pytest.raises(ValueError):
            ep["fail"]("value")
        with pytest.raises(CompartmentCrashed):
            ep["crash"]("exit")
        ep["null"]()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [r for r in records if r["event"] == "call"]
    assert [c["outcome"] for c in calls] == ["ok", "error:ValueError", "crashed", "ok"]
    first = calls[0]
    assert first["caller"] == "main" and first["callee"] == "box" and first["entrypoint"] == "boxed:parse"
    assert first["bytes_out"] > 0 and first["bytes_in"] > 0 and first["duration_ms"] >= 0
    events = {r["event"] for r in records}
    assert {"instance_start", "instance_exit", "instance_restart"} <= events


def test_inline_mechanism_same_api_same_validation(make_app):
    app, ep = box(make_app, mechanism="inline")
    with app:
        assert ep["whoami"]() == os.getpid()
        with pytest.raises(ProtocolError):
            ep["lie"]("str")
        with pytest.raises(RemoteError):
            ep["fail"]("custom")
        assert ep["make_shape"]("x", 2).points[1] == boxed.Point(1, 1)


def test_spec_declared_function(make_app):
    app = make_app({"compartments": {"box": {"functions": ["boxed:parse"]}}})
    parse = app.function("boxed:parse")
    with app:
        assert parse(b"x yy") == {"x": 1, "yy": 2}
    with pytest.raises(pycompart.EntrypointError):
        app.function("boxed:nothere")


def test_entrypoint_declaration_errors(make_app):
    app = make_app()
    with pytest.raises(pycompart.EntrypointError, match="not defined"):
        app.entrypoint("ghost")

    def local():
        pass
    with pytest.raises(pycompart.EntrypointError, match="module-level"):
        app.entrypoint("box")(local)
    app.entrypoint("box")(boxed.null)
    with app:
        with pytest.raises(pycompart.EntrypointError, match="before the app starts"):
            app.entrypoint("box")(boxed.echo)


def test_stop_fails_pending_calls_and_reaps(make_app):
    app, ep = box(make_app, call_timeout="10s")
    out = []
    app.start()
    pids = app.instances("box") + [app.zygote_pid]
    t = threading.Thread(target=lambda: out.append(pytest.raises(pycompart.CompartmentError, ep["sleepy"], 5)))
    t.start()
    time.sleep(0.2)
    app.stop()
    t.join(5)
    assert out
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


def test_leaving_the_app_ends_instances_cleanly(make_app):
    """Instances see end-of-stream and exit 0; nobody has to be killed."""
    ended = []
    app, ep = box(make_app, instances=3)
    app.on_termination(ended.append)
    with app:
        ep["null"]()
    assert len(ended) == 3
    assert all(e.status == "exited with status 0" and not e.restarting for e in ended), ended


def test_undeclared_entrypoint_is_refused_and_counted(make_app):
    """Only the table main fixed at spawn is callable: naming any other
    function, even one that exists in the instance, is refused."""
    app, ep = box(make_app)
    with app:
        inst = app._runtime.monitor.pools["box"].ready[0]
        for name in ("boxed:CustomError", "os:system", "boxed:_channel_write_fd", "nonsense"):
            reply = inst.channel.request(name, b"\x80", time.monotonic() + 5)
            err = pycompart.wire.exceptions.rebuild_exception(reply.error, "box")
            assert isinstance(err, pycompart.EntrypointError) and "not an entrypoint" in str(err)
        assert ep["null"]() is None  # the instance kept serving


def test_spawn_on_demand_and_retire(make_app):
    app, ep = box(make_app)
    with app:
        monitor = app._runtime.monitor
        extra = monitor.spawn_on_demand("box")
        assert extra.pid not in app.instances("box")
        reply = extra.channel.request("boxed:whoami", b"\x80", time.monotonic() + 5)
        assert msgspec.msgpack.decode(reply.value) == extra.pid
        monitor.retire(extra)
        assert extra.dead.wait(5)
        assert len(app.instances("box")) == 1 and ep["null"]() is None


@pytest.mark.slow
def test_stress_calls_under_random_kills(make_app):
    """Many threads calling while instances are killed at random: every call
    either succeeds with its own answer or fails with CompartmentCrashed."""
    import random

    app, ep = box(make_app, instances=3, max_restarts=1000)
    stop = time.monotonic() + 20
    bad = []

    def worker(n):
        i = 0
        while time.monotonic() < stop:
            i += 1
            try:
                if ep["add"](n, i) != n + i:
                    bad.append((n, i))
            except (CompartmentCrashed, CompartmentUnavailable):
                pass

    with app:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        while time.monotonic() < stop:
            time.sleep(random.uniform(0.05, 0.3))
            pids = app.instances("box")
            if pids:
                os.kill(random.choice(pids), 9)
        for t in threads:
            t.join(30)
        assert ep["null"]() is None
    assert not bad


def test_restarts_do_not_leak_descriptors(make_app):
    app, ep = box(make_app, max_restarts=100, restart_window="50ms")

    def fds():
        return len(os.listdir("/proc/self/fd"))

    with app:
        ep["null"]()
        before = fds()
        for _ in range(20):
            with pytest.raises(CompartmentCrashed):
                ep["crash"]("exit")
            ep["null"]()
        after = fds()
    assert after - before <= 2, (before, after)


def test_a_declared_function_whose_module_main_never_imports(make_app, monkeypatch):
    """main calls ``functions = ["mod:fn"]`` without importing ``mod`` (its
    import-time code never runs in main): the callee binds the arguments by
    its own signature and validates them by its annotations."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="pycompart-declared-")
    os.chmod(d, 0o755)
    with open(os.path.join(d, "never_in_main.py"), "w") as f:
        f.write("import dataclasses\n"
                "@dataclasses.dataclass\nclass P:\n    x: int\n"
                "def scale(p: P, *rest: int, by: int = 2) -> dict:\n"
                "    return {'x': p.x * by, 'rest': list(rest)}\n")
    os.chmod(os.path.join(d, "never_in_main.py"), 0o644)
    monkeypatch.syspath_prepend(d)
    try:
        app = make_app({"compartments": {"box": {"functions": ["never_in_main:scale"]}}})
        with app:
            scale = app.function("never_in_main:scale")
            assert scale({"x": 3}, 7, 8, by=5) == {"x": 15, "rest": [7, 8]}
            with pytest.raises(TypeError, match="arguments do not match its annotations"):
                scale({"x": "three"})
            with pytest.raises(TypeError):
                scale({"x": 1}, nope=1)
        assert "never_in_main" not in sys.modules
    finally:
        shutil.rmtree(d)


def test_big_calls_from_many_threads_to_one_instance_do_not_deadlock(make_app):
    """Each thread's frame is bigger than the pipe: the one reading for the
    channel must read while it waits to write (the instance writes a big
    reply and reads nothing meanwhile). Strings: never sent beside the
    frame, always through the pipe."""
    app, _ = box(make_app, call_timeout="30s")
    echo = app.entrypoint("box")(boxed.echo_text)
    results: list[bool] = []
    with app:
        def worker(tag: int) -> None:
            for i in range(6):
                value = f"{tag}:{i}:" + "x" * (256 * 1024 * (1 + (tag + i) % 5))
                results.append(echo(value) == value)
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    assert results == [True] * 36


def test_an_exception_from_a_signal_handler_during_a_call_leaves_the_channel_usable(make_app):
    """main's own signal handler raising while it waits for a reply (Ctrl-C):
    the exception comes out at once, and later calls are served."""
    import signal as _signal

    class Interrupted(Exception):
        pass

    def handler(signum, frame):  # type: ignore[no-untyped-def]
        raise Interrupted

    app, ep = box(make_app, call_timeout="none")
    sleepy = ep["sleepy"]
    with app:
        old = _signal.signal(_signal.SIGALRM, handler)
        try:
            _signal.setitimer(_signal.ITIMER_REAL, 0.3)
            t0 = time.monotonic()
            with pytest.raises(Interrupted):
                sleepy(3.0)
            assert time.monotonic() - t0 < 2.0  # not after the reply
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            _signal.signal(_signal.SIGALRM, old)
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(ep["null"]()), daemon=True)
        t.start()
        t.join(15)
        assert result == [None], "the channel was left with a leader that never reads"


def test_a_timeout_of_a_month_is_a_timeout(make_app):
    app, ep = box(make_app, call_timeout=30 * 86400)
    with app:
        assert ep["add"](2, 3) == 5
        assert ep["add"].options(timeout=40 * 86400)(1, 1) == 2


def test_an_interrupt_while_a_big_call_is_written_breaks_the_channel_not_the_next_call(make_app, monkeypatch):
    """Red team: a signal handler's exception (Ctrl-C) while main waited for
    room to write the rest of an 8 MB frame left half a frame on the wire;
    the instance took the next call as the rest of it. The channel is now
    broken (the instance replaced), and the next call works."""
    from pycompart.transport import gate

    app = make_app({"compartments": {"box": {"restart_backoff": "10ms"}}})
    echo = app.entrypoint("box")(boxed.echo_text)
    real = gate.wait_fd
    fired = []

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with app:
        assert echo("warm") == "warm"
        monkeypatch.setattr(gate, "wait_fd", interrupted)
        with pytest.raises(KeyboardInterrupt):
            echo("x" * (8 << 20))
        monkeypatch.setattr(gate, "wait_fd", real)
        assert fired
        assert echo.options(timeout=10)("hello") == "hello"


@pytest.mark.parametrize("rounds", [20])
def test_interrupts_at_random_moments_of_big_calls_never_wedge_the_channel(rounds):
    """Red team: a timer's KeyboardInterrupt during a call with a 500 KB
    argument hung every later call (raised right after a lock of the
    channel was taken, before anything could release it). Each interrupted
    call ends; the next one works (or fails cleanly), and nothing hangs."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = """
import random, signal, pycompart, boxed
random.seed(7)
signal.signal(signal.SIGALRM, signal.default_int_handler)
# (An interrupt that breaks the channel replaces the instance: no backoff
# building up across the rounds.)
app = pycompart.App({"compartments": {"box": {"restart_backoff": "1ms", "restart_window": "1ms",
                                              "max_restarts": 1000}}})
echo = app.entrypoint("box")(boxed.echo_text)
with app:
    echo("warm")
    big = "x" * 500_000
    ok = 0
    for i in range(ROUNDS):
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, random.uniform(0.00005, 0.003))
                echo(big)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except KeyboardInterrupt:
            pass  # (the timer may also fire after the call, anywhere up to here)
        for attempt in range(2):
            try:
                ok += echo.options(timeout=10)("after") == "after"
                break
            except KeyboardInterrupt:
                continue  # a timer that fired just before it was disarmed
            except (pycompart.CompartmentCrashed, pycompart.ProtocolError) as exc:
                # A channel broken by the interrupt (the next instance
                # answers), never by a misread frame.
                assert "interrupted" in str(exc) or "closed its channel" in str(exc), exc
                break
    print("ok", ok)
""".replace("ROUNDS", str(rounds))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, *sys.path]))
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=here)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok ") and int(out.stdout.split()[1]) >= rounds * 3 // 4, out.stdout


def test_an_app_started_inside_an_instance_says_how_to_fix_it(make_app):
    app = make_app({"compartments": {"box": {}}})
    start = app.entrypoint("box")(boxed.start_an_app)
    with app:
        said = start()
    assert "cannot be started inside a compartment instance" in said and '__name__ == "__main__"' in said



@pytest.mark.parametrize("value", ["v" * 8, "v" * 300_000, b"v" * 300_000], ids=["small", "text", "bulk"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_at_every_moment_of_a_call_leaves_the_channel_whole(make_app, value):
    """Red team: a Ctrl-C raised right after the channel's lock, its send
    lock or its reading were taken, before the try that gives them back,
    left them taken, and every later call waited for ever (2 in 60 runs of
    a random timer). Here it comes at each moment of a call in turn: a
    small call (the compact fast path), a big one (written while waiting
    for room), bulk data (the shared lane)."""
    app = make_app({"compartments": {"box": {"restart_backoff": "1ms", "restart_window": "1ms",
                                             "max_restarts": 10000}}})
    echo = app.entrypoint("box")(boxed.echo_text if isinstance(value, str) else boxed.echo)
    with app:
        interrupts.at_every_moment(app, lambda: echo(value), value, echo.options(timeout=10))
