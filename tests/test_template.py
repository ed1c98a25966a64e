"""Instances forked from their compartment's template
(``pycompart.compartment.template``): each ends with exactly its
compartment's restrictions, apart from the template and from its siblings,
and a compartment that cannot have one starts its instances afresh."""

import os
import subprocess
import sys
import threading
import time

import pytest

import pycompart
from pycompart.policy import resolution


def _app(make_app, **spec):
    spec.setdefault("modules", ["templatebox"])
    spec.setdefault("instances", "per-call")
    app = make_app({"compartments": {"box": spec}})
    app.start(import_hook=True)
    import templatebox

    return app, templatebox


@pytest.fixture(autouse=True)
def _forget_module():
    yield
    sys.modules.pop("templatebox", None)


def test_instances_are_forked_from_the_template_and_share_only_import_time_state(make_app):
    app, box = _app(make_app)
    assert app._runtime.lockdowns["box"].template_bpf  # planned
    parents = {box.parent() for _ in range(3)}
    assert len(parents) == 1 and parents != {1}  # the template, not the zygote (pid 1)
    pids = {box.host_pid() for _ in range(3)}
    assert len(pids) == 3  # still a fresh instance per call
    a, b = box.draws(), box.draws()
    assert a[0] != b[0]  # random reseeded by the fork
    assert a[1] != b[1]
    assert a[2] == b[2]  # what the module made when imported: the template's


def test_template_false_starts_each_instance_afresh(make_app):
    app, box = _app(make_app, template=False)
    assert not app._runtime.lockdowns["box"].template_bpf
    assert box.parent() == 1  # the zygote
    a, b = box.draws(), box.draws()
    assert a[2] != b[2]  # each imported the module itself


def test_an_instance_of_a_template_cannot_fork(make_app):
    # The template's filter allows fork; each instance's own takes it away.
    _, box = _app(make_app)
    assert box.try_fork() == "refused"


def test_an_instance_reads_its_own_proc_entries_and_no_one_elses(make_app):
    # The template may read all of /proc (its rules would name its own
    # entries); each instance's Landlock layer narrows that to its own.
    _, box = _app(make_app)
    assert box.read("/proc/self/status") == "read"
    assert box.read("/proc/self/environ") == "refused"
    parent = box.parent()
    assert box.read(f"/proc/{parent}/status") == "refused"  # the template's
    assert box.read("/proc/1/status") == "refused"  # the zygote's
    assert box.read("/etc/passwd") == "refused"


def test_an_instance_cannot_signal_its_template_or_a_sibling(make_app):
    _, box = _app(make_app, max_instances=4, may_call=["main"], call_timeout="20s")
    template = box.parent()
    assert box.signal_pid(template) == "refused"  # a parent Landlock domain
    sibling: list[int] = []
    reported = threading.Event()

    def report(pid):
        sibling.append(pid)
        reported.set()

    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(box.sleep_reporting(report, 1.5)))
    t.start()
    try:
        assert reported.wait(15)
        assert box.signal_pid(sibling[0]) == "refused"  # scoped apart
    finally:
        t.join(20)
    assert result == ["slept"]  # and it was not killed


@pytest.mark.parametrize("template", [True, False])
def test_an_instance_that_cannot_start_says_why_at_once(make_app, template):
    # With a template: the template fails, and the zygote falls back to
    # fresh starts, which report the cause (not a start timeout).
    app = make_app({"compartments": {"box": {"modules": ["broken_on_import"], "instances": "per-call",
                                             "template": template}}})
    app.start(import_hook=True)
    started = time.monotonic()
    try:
        for _ in range(2):
            with pytest.raises(pycompart.CompartmentStartError,
                               match="'box' failed to start: ModuleNotFoundError.*no_such_module_xyz"):
                import broken_on_import  # noqa: F401
    finally:
        sys.modules.pop("broken_on_import", None)
    assert time.monotonic() - started < 8  # (the start timeout is 10 s)


@pytest.mark.parametrize("obstacle, expected", [
    ({"net_namespace": True, "sockets": "inet"}, "loopback"),
    ({"syscalls_allow": ["shmget"]}, "shmget"),
    ({"syscalls_allow": ["clone"]}, "clone"),
    ({"scopes": False}, "scopes"),
    ({"keep_capabilities": [12]}, "capabilities"),
])
def test_what_rules_out_a_template(obstacle, expected):
    from pycompart.wire.config import Lockdown

    lock = Lockdown(scopes=True, seccomp=True)
    assert resolution.template_obstacle(lock) is None
    for key, value in obstacle.items():
        setattr(lock, key, value)
    assert expected in resolution.template_obstacle(lock)


def test_a_loopback_compartment_gets_no_template(make_app):
    app, box = _app(make_app, privileges={"network": "loopback"})
    assert not app._runtime.lockdowns["box"].template_bpf
    assert box.parent() == 1


def test_a_module_whose_import_starts_a_thread_gets_fresh_starts_that_keep_it(make_app):
    app = make_app({"compartments": {"box": {"modules": ["threadimport"], "instances": "per-call",
                                             "privileges": {"syscalls": "python-threads"}}}})
    app.start(import_hook=True)
    try:
        import threadimport

        assert threadimport.state() == (1, 2)  # from the zygote, its thread running
    finally:
        sys.modules.pop("threadimport", None)


def test_templates_work_for_a_user_who_is_not_root():
    from test_escape import run_as_nobody

    report = run_as_nobody(("templatebox.py", "template_runner.py"), "template_runner.py")
    assert report["uid"] == 65534 and report["planned"]
    assert report["parent"] != 1  # forked from the template
    assert report["fork"] == "refused"
    assert report["own_proc"] == "read" and report["template_proc"] == "refused"
    assert report["signal_template"] == "refused" and report["signal_sibling"] == "refused"
    assert report["slept"] == ["slept"]


def test_an_instance_forked_from_its_template_has_none_of_the_templates_extra_calls(make_app):
    """The template's filter also allows what it needs for its children
    (Landlock's calls, its parent-death prctl, pidfd_open); the instance's
    filter on top takes them away again, as a fresh instance never had them
    (Landlock's calls and the prctl were left)."""
    app, box = _app(make_app)
    box.parent()
    assert box.template_calls() == dict.fromkeys(
        ("landlock_create_ruleset", "pidfd_open", "prctl PR_SET_PDEATHSIG"), "refused")


def test_an_instance_forked_ahead_serves_with_the_server_built_before_its_spawn(make_app):
    """A child forked ahead builds its instance's server over placeholder
    pipes while it waits; its channel's descriptors take their places: the
    calls reach it, and no placeholder is left open."""
    import time

    app, box = _app(make_app, spares=0)
    box.parent()  # the template is up, and forks its next child ahead
    time.sleep(0.3)  # (which then waits, its server built)
    assert box.how_served() == [True, 4]
    assert box.draws()[2] == box.AT_IMPORT


def _descendants_cpu(root: int) -> float:
    """CPU seconds used so far by ``root``'s descendants (not ``root``)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    total = 0
    for pid, (_, ticks) in parents.items():
        up, steps = pid, 0
        while up in parents and steps < 64:
            up, steps = parents[up][0], steps + 1
            if up == root:
                total += ticks
                break
    return total / os.sysconf("SC_CLK_TCK")


def _quiet_uid(uid: int = 65534, timeout: float = 10.0) -> None:
    """Wait until no process runs as ``uid``: a ``processes`` limit counts
    every process of the compartment's uid (nobody, under root), so other
    tests' instances still ending would count against this one's."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        busy = False
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/status") as f:
                        busy = any(line.startswith("Uid:") and int(line.split()[1]) == uid for line in f)
                except OSError:
                    continue
                if busy:
                    break
        if not busy:
            return
        time.sleep(0.05)


def test_at_its_processes_limit_a_template_fails_a_start_at_once_and_does_not_spin(make_app):
    """Its compartment's ``processes`` reached, a template can neither fork
    the next instance ahead nor one for a start: that start fails at once,
    naming why (it waited for its start timeout, the template gone), and
    the template tries again later, not in a loop (it took a CPU whole)."""
    _quiet_uid()
    app, box = _app(make_app, spares=0, max_instances=8, privileges={"processes": 3})
    box.parent()
    results: list = []

    def call() -> None:
        try:
            results.append(box.sleep(1.5))
        except pycompart.CompartmentStartError as exc:
            results.append(exc)
    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    before = _descendants_cpu(app.zygote_pid)
    time.sleep(1.0)  # two instances asleep, the limit reached
    spent = _descendants_cpu(app.zygote_pid) - before
    for thread in threads:
        thread.join()
    failed = [r for r in results if isinstance(r, Exception)]
    assert failed and all("could not fork it" in str(e) for e in failed), results
    assert len(failed) < len(results)
    assert spent < 0.5, f"the app's processes took {spent:.2f} s of CPU in 1 s, at rest"


def test_after_a_spell_at_its_processes_limit_a_template_forks_ahead_again(make_app):
    """The back-off after failed forks is a deadline, not a wait for a
    quiet moment: calls coming faster than the longest back-off (250 ms)
    did not let it fork ahead again, and every start was a cold fork."""
    _quiet_uid()
    app, box = _app(make_app, spares=0, max_instances=8, privileges={"processes": 3})
    box.parent()
    spell = [threading.Thread(target=box.sleep, args=(1.0,)) for _ in range(2)]
    for thread in spell:
        thread.start()
        time.sleep(0.1)
    for thread in spell:
        thread.join()
    served = []
    for _ in range(6):
        served.append(box.how_served()[0])
        time.sleep(0.15)
    assert all(served[-3:]), served


def test_at_exactly_its_processes_limit_back_to_back_starts_wait_for_the_instance_before(make_app):
    """``processes = 2``: the template and one instance. The instance
    before a per-call start still counts while it ends; the start waits
    for it to be reaped instead of failing with EAGAIN (1 to 40 starts of
    40 failed, the first of them the import)."""
    _quiet_uid()
    app, box = _app(make_app, spares=0, privileges={"processes": 2})
    pids = {box.host_pid() for _ in range(30)}
    assert len(pids) == 30  # (each a fresh instance: none shared a place)


def _zygote_and_template():  # type: ignore[no-untyped-def]
    """A zygote's state as far as ``from_template`` uses it, with one
    template's socket: what a hostile template writes, and what main sees."""
    import socket

    from pycompart.supervisor import zygote as z
    from pycompart.wire.control import control_decoder
    from pycompart.wire.protocol import MessageReader

    main_end, zygote_end = socket.socketpair()
    main_end.settimeout(0.3)
    zyg = z.Zygote.__new__(z.Zygote)  # (no signals, no children of its own)
    zyg.control, zyg.transport = zygote_end, z.SocketTransport(zygote_end)
    zyg.children, zyg.templates, zyg.template_pids, zyg.failed_templates = set(), {}, {}, set()
    zyg.selector, zyg.buf = None, bytearray(65536)
    template_end, ours = socket.socketpair()
    ours.setblocking(False)
    handle = z._TemplateHandle("evil", 12345, ours, b"key")
    handle.ready = True
    zyg.templates["evil"] = handle
    reader = MessageReader(control_decoder, 1 << 24)

    def main_sees() -> list:
        got = []
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(main_end, 65536, 16)
                if not data:
                    break
                reader.feed(data, fds)
                for m, fds in reader.messages():
                    got.append(m)
                    for fd in fds:
                        os.close(fd)
        except (TimeoutError, BlockingIOError):
            pass
        return got
    return zyg, handle, template_end, main_sees


def test_a_template_answers_only_the_starts_it_was_given_and_cannot_kill_the_zygote():
    """It has run its compartment's code: a ``Forked`` for a request the
    zygote did not pass it (another compartment's start, numbered 1, 2, 3
    by main) is ignored, its error text reaches main bounded and printable,
    an ``Exited`` only for an instance it forked reaches main (main ends
    the instance it names), and a malformed message retires it without
    taking the zygote along."""
    from pycompart.wire.control import Exited, Forked, encode_control
    from pycompart.wire.protocol import encode_frame

    zyg, handle, template_end, main_sees = _zygote_and_template()
    for request in (1, 2, 3):
        template_end.sendall(encode_control(Forked(request, 0, "forged")))
    zyg.from_template(handle)
    assert main_sees() == []
    handle.pending.add(4)  # (as pass_on records it)
    template_end.sendall(encode_control(Forked(4, 0, "\x1b[31mEAGAIN\nforged line" + "x" * 5000)))
    zyg.from_template(handle)
    [spawned] = main_sees()
    assert spawned.request == 4 and spawned.pid == 0
    assert spawned.error.isprintable() and len(spawned.error) < 400, spawned.error
    assert 4 not in handle.pending and not zyg.children
    zyg.children.add(777)  # another template's instance
    template_end.sendall(encode_control(Exited(777, 9)))
    zyg.from_template(handle)
    assert main_sees() == [] and 777 in zyg.children  # (not its own: not reported ended)
    template_end.sendall(encode_frame(b"\xc1", 0))  # not msgpack
    zyg.from_template(handle)  # retires it; does not raise
    assert "evil" not in zyg.templates


def test_a_template_that_answers_no_start_is_retired_past_a_bound():
    """What the zygote keeps for it (the starts it was given, unanswered)
    is bounded: past ``MAX_UNANSWERED`` the template is retired, and those
    starts fail at once (main would wait its start timeout for each)."""
    from pycompart.supervisor import zygote as z
    from pycompart.wire.config import InstanceConfig
    from pycompart.wire.control import Spawn

    zyg, handle, template_end, main_sees = _zygote_and_template()
    template_end.setblocking(False)
    seen: list = []
    done = threading.Event()
    reader = threading.Thread(target=lambda: [seen.extend(main_sees()) for _ in iter(done.is_set, True)])
    reader.start()  # (what main is told: read as it comes, as the monitor does)
    config = InstanceConfig("evil", 0, [], "/", None, None, [], [], 1 << 20, {})
    try:
        for request in range(1, z.MAX_UNANSWERED + 2):
            zyg.pass_on(handle, Spawn(request, config, False, False), [])
            try:
                template_end.recv(1 << 20)  # (what it is sent, read and ignored)
            except BlockingIOError:
                pass
            if "evil" not in zyg.templates:
                break
    finally:
        done.set()
        reader.join()
    assert "evil" not in zyg.templates and request == z.MAX_UNANSWERED + 1
    assert sorted(m.request for m in seen) == list(range(1, z.MAX_UNANSWERED + 2))
    assert all(m.pid == 0 and "unanswered" in m.error for m in seen)
    template_end.close()
    zyg.control.close()



def _kernel_says_parent(process, pid):  # type: ignore[no-untyped-def]
    pidfd = os.pidfd_open(pid)
    try:
        return process.pidfd_parent(pidfd)
    finally:
        os.close(pidfd)


def test_a_template_cannot_pass_off_another_process_as_its_instance():
    """Main signals what the zygote reports as an instance. A template
    names its instance by pid; the zygote opens the pidfd itself and takes
    only a child of that template: never itself (pid 1), a process it
    knows as something else, or another's child. One that tries is retired
    and its starts fail, naming why. (The monitor killed the zygote, or
    another compartment's instance, through a pidfd the template sent.)"""
    from pycompart.kernel import process
    from pycompart.wire.control import Forked, encode_control

    sleeper = subprocess.Popen(["sleep", "30"])  # our child, not the template's
    try:
        fake = {"the zygote": 1, "another's instance": 777, "not its child": sleeper.pid}
        for what, pid in fake.items():
            zyg, handle, template_end, main_sees = _zygote_and_template()
            zyg.children.add(777)
            handle.pending.update({5, 6})
            template_end.sendall(encode_control(Forked(5, pid)))
            zyg.from_template(handle)
            if what == "not its child" and _kernel_says_parent(process, sleeper.pid) is None:
                continue  # (before Linux 6.13 the kernel cannot say whose child it is)
            seen = main_sees()
            assert sorted(m.request for m in seen) == [5, 6], what
            assert all(m.pid == 0 and "not its instance" in m.error for m in seen), (what, seen)
            assert "evil" not in zyg.templates, what
        # Its own child: taken, with a pidfd the zygote opened.
        child = subprocess.Popen(["sleep", "30"])
        try:
            zyg, handle, template_end, main_sees = _zygote_and_template()
            handle.pid = os.getpid()  # (this process plays the template)
            handle.pending.add(5)
            template_end.sendall(encode_control(Forked(5, child.pid)))
            zyg.from_template(handle)
            [spawned] = main_sees()
            assert spawned.request == 5 and spawned.pid == child.pid, spawned
            assert child.pid in handle.children and "evil" in zyg.templates
        finally:
            child.kill()
            child.wait()
    finally:
        sleeper.kill()
        sleeper.wait()
