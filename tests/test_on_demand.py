"""Instances on demand: ``instances = "per-call"`` (a fresh instance per
call), ``"per-connection"`` with a ``Broker``, and ``max_instances``."""

import socket
import sys
import threading
import time

import pytest

import pycompart


def _app(make_app, **spec):
    spec.setdefault("modules", ["demandbox"])
    app = make_app({"compartments": {"box": spec}})
    app.start(import_hook=True)
    if spec.get("instances") == "per-connection":
        return app, None  # nothing to import: it serves connections only
    import demandbox

    return app, demandbox


@pytest.fixture(autouse=True)
def _forget_module():
    yield
    sys.modules.pop("demandbox", None)


def test_each_call_gets_a_fresh_instance(make_app):
    app, box = _app(make_app, instances="per-call")
    pids = {box.pid() for _ in range(3)}
    assert len(pids) == 3
    assert [box.calls() for _ in range(3)] == [1, 1, 1]  # no state survives a call
    assert app.instances("box") == []  # none left running


def test_max_instances_bounds_them_with_a_clear_error(make_app):
    app, box = _app(make_app, instances="per-call", max_instances=1, call_timeout="1s")
    monitor = app._runtime.monitor
    with monitor.lease("box", None):  # the only instance there may be, taken
        started = time.monotonic()
        with pytest.raises(pycompart.CompartmentUnavailable,
                           match=r"'box'.*1 instances \(max_instances\)"):
            box.pid()
        assert 0.5 < time.monotonic() - started < 5  # it waited, up to the call's timeout
    assert box.pid() > 0  # and serves again once one is free


def _echo(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(data)
        return c.recv(100)


def test_a_broker_hands_each_connection_to_its_own_instance(make_app):
    app, _ = _app(make_app, instances="per-connection", descriptors=True)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors = []
    broker = pycompart.Broker(app, "box", "demandbox:serve", on_error=errors.append)
    serving = threading.Thread(target=broker.serve, args=(listener,), daemon=True)
    serving.start()
    try:
        assert _echo(port, b"one") == b"ONE"
        assert _echo(port, b"crash") == b""  # this connection's instance died ...
        assert _echo(port, b"two") == b"TWO"  # ... and only it
    finally:
        broker.stop()  # waits for the connections in flight, their reports too
        serving.join(5)
        listener.close()
    # (Checked once the broker has stopped: the crashed connection's handler
    # may report after the next connection, served by a ready spare, ends.)
    assert len(errors) == 1 and isinstance(errors[0], pycompart.CompartmentCrashed)
    assert broker.served == 2 and broker.failed == 1


def test_a_broker_needs_a_per_connection_compartment_that_takes_descriptors(make_app):
    app, _ = _app(make_app, instances="per-connection")
    with pytest.raises(pycompart.EntrypointError, match="descriptors = true"):
        pycompart.Broker(app, "box", "demandbox:serve")
    with pytest.raises(pycompart.EntrypointError, match="per-connection"):
        import demandbox

        demandbox.pid()  # no instance to call: connections only


def test_on_demand_specs_are_checked():
    from pycompart.policy.spec import SpecError, load_spec

    with pytest.raises(SpecError, match="per-call"):
        load_spec({"compartments": {"box": {"instances": "per-thread"}}})
    spec = load_spec({"compartments": {"box": {"instances": "per-call", "max_instances": 3}}})
    box = spec.compartments["box"]
    assert (box.instances, box.on_demand, box.max_instances) == (0, "per-call", 3)


def test_typed_entrypoints_of_a_per_call_compartment(make_app):
    import bench_like

    app = make_app({"compartments": {"fresh": {"instances": "per-call"}}})
    whoami = app.entrypoint("fresh")(bench_like.whoami)
    with app:
        assert len({whoami() for _ in range(3)}) == 3
        assert app.instances("fresh") == []


def test_a_handlers_own_exception_is_reported_not_lost(make_app):
    app, _ = _app(make_app, instances="per-connection", descriptors=True)
    errors = []
    broker = pycompart.Broker(app, "box", "demandbox:serve_and_fail", on_error=errors.append)
    a, b = socket.socketpair()
    broker.handle(a).join(10)
    assert b.recv(10) == b"bye"
    assert len(errors) == 1 and "the handler's own error" in str(errors[0])
    assert broker.failed == 1
    b.close()


def test_a_broker_accepts_no_more_connections_than_instances_may_exist(make_app):
    """0.5 before the fix: a thread per accepted connection, without bound,
    each waiting for an instance; now connections wait in the backlog."""
    app, _ = _app(make_app, instances="per-connection", descriptors=True, max_instances=2)
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    broker = pycompart.Broker(app, "box", "demandbox:hang")
    serving = threading.Thread(target=broker.serve, args=(listener,), daemon=True)
    serving.start()
    base = threading.active_count()
    clients = [socket.create_connection(listener.getsockname()) for _ in range(20)]
    time.sleep(1.5)
    assert threading.active_count() <= base + 2
    for c in clients:
        c.close()
    broker.stop(wait=0.5)
    listener.close()


def test_an_instance_whose_caller_gave_up_waiting_is_retired(make_app):
    app, box = _app(make_app, instances="per-call", spares=0)
    monitor = app._runtime.monitor
    # The monitor thread is held until the caller has given up, so the
    # spawn it queued runs only after that (a template's instance can be
    # ready in ~2 ms: less than a thread switch on a busy machine).
    release = threading.Event()
    monitor.submit(lambda: release.wait(10))
    try:
        with pytest.raises(pycompart.CompartmentStartError):
            monitor.spawn_on_demand("box", timeout=0)
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while monitor._by_pid and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not monitor._by_pid  # it came up later, and was retired, not left running


def test_per_call_and_descriptor_calls_are_audited_like_any_other(make_app, tmp_path):
    import json

    import bench_like

    log = tmp_path / "audit.jsonl"
    app = make_app({"app": {"audit_log": str(log)}, "compartments": {
        "fresh": {"instances": "per-call"}, "fds": {"descriptors": True}}})
    fresh = app.entrypoint("fresh")(bench_like.whoami)
    with_fds = app.entrypoint("fds")(bench_like.whoami_too)
    with app:
        fresh()
        with_fds()
    calls = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "call"]
    assert {(r["callee"], r["outcome"]) for r in calls} == {("fresh", "ok"), ("fds", "ok")}


def test_a_spare_that_burns_cpu_while_waiting_is_killed(make_app):
    """idle_cpu watches ready spares too (their module's import left a
    thread spinning, and no call ever came)."""
    app = make_app({"compartments": {"spin": {
        "instances": "per-call", "spares": 1, "idle_cpu": "1s", "functions": ["spinimport:null"],
        "privileges": {"syscalls": "python-threads"}}}})
    with app:
        pool = app._runtime.monitor.pools["spin"]
        deadline = time.monotonic() + 20
        killed = None
        while time.monotonic() < deadline and killed is None:
            for inst in list(pool.spares):
                if inst.kill_reason:
                    killed = inst.kill_reason
            time.sleep(0.1)
        assert killed is not None and "idle_cpu" in killed, killed
