"""examples/echo: a TCP echo server whose every connection is served by a
fresh instance of a compartment with no filesystem and no network privilege
(it gets only its connected socket), under load."""

import concurrent.futures
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = [sys.executable, os.path.join(ROOT, "examples", "echo", "server.py")]


def _zygotes() -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if b"pycompart.supervisor.zygote" in f.read():
                        found.add(int(name))
            except OSError:
                pass
    return found


@pytest.fixture
def server():
    before = _zygotes()
    proc = subprocess.Popen([*SERVER, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    match = re.search(r"listening on \S+:(\d+)", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    yield proc, int(match.group(1))
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    deadline = time.monotonic() + 5
    while _zygotes() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _zygotes() - before, "processes left behind"


def _echo(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := c.recv(65536):
            got += chunk
    return bytes(got)


def _load(port: int, connections: int, at_once: int) -> None:
    rng = random.Random(1234)
    payloads = [rng.randbytes(rng.randint(0, 64 * 1024)) for _ in range(connections)]
    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        results = list(pool.map(lambda p: _echo(port, p), payloads))
    bad = [i for i, (p, r) in enumerate(zip(payloads, results)) if p != r]
    assert not bad, f"{len(bad)} connections got other bytes back (first: {bad[0]})"


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _zombies(root: int) -> list[int]:
    """Zombies among ``root``'s descendants (not the whole machine's: another
    program's child that its parent has not reaped yet is none of ours)."""
    state, parent = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:
                continue
            state[int(name)], parent[int(name)] = fields[0], int(fields[1])

    def below_root(pid: int) -> bool:
        for _ in range(64):  # (a chain of parents, bounded)
            pid = parent.get(pid, 0)
            if pid == root:
                return True
            if pid <= 1:
                return False
        return False
    return [pid for pid, st in state.items() if st == "Z" and below_root(pid)]


def test_every_byte_of_every_connection_comes_back(server):
    proc, port = server
    _load(port, connections=10, at_once=5)
    time.sleep(0.5)  # the retired instances are reaped
    fds = _open_fds(proc.pid)
    _load(port, connections=60, at_once=10)
    assert _echo(port, b"") == b""
    time.sleep(0.5)
    assert _open_fds(proc.pid) <= fds + 2, "descriptors left open in main"
    assert not _zombies(proc.pid)
    proc.send_signal(signal.SIGINT)  # stops cleanly
    assert proc.wait(20) == 0


@pytest.mark.slow
def test_echo_under_load_2000_connections_50_at_once(server):
    proc, port = server
    _load(port, connections=2000, at_once=50)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def test_the_handler_has_nothing_but_its_socket():
    from pycompart.policy.spec import load_spec_file

    spec = load_spec_file(os.path.join(ROOT, "examples", "echo", "app.toml")).compartments["handler"]
    p = spec.privileges
    assert spec.on_demand == "per-connection" and spec.descriptors and spec.instances == 0
    assert not p.read and not p.write and not p.execute and p.network == type(p.network)()
    assert p.syscalls == "python"


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_port_is_a_usage_error(port):
    proc = subprocess.run([*SERVER, "--port", port], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "argument --port" in proc.stderr and "Traceback" not in proc.stderr
