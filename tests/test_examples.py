import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hostile_parser_demo_survives():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "hostile_parser", "demo.py")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "parser crashed" in out and "SIGSEGV" in out
    assert "timed out" in out
    assert "rejected: not a TIMG file" in out
    assert out.count("Header(") == 3  # every good image parsed, also after the crash
    assert "main survived; parser instances replaced after a crash: 1" in out


PYCOMPART = [sys.executable, "-m", "pycompart"]


def _stage(tmp_path, name):
    """A world-readable copy of an example: its compartment runs as nobody."""
    import shutil

    dest = tmp_path / name
    shutil.copytree(os.path.join(ROOT, "examples", name), dest,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [tmp_path, *dest.rglob("*"), dest]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def test_yaml_example_same_output_boxed(tmp_path):
    """A real PyPI parser (PyYAML) fed hostile input: malformed documents, a
    code-execution tag, 3000-deep nesting, invalid bytes, a dangling alias.
    Boxed, the unmodified script prints exactly what it prints unboxed."""
    import yaml  # noqa: F401  (a test dependency: this must not be skipped)
    where = _stage(tmp_path, "yaml_box")
    inputs = sorted(str(p.relative_to(where)) for p in (where / "inputs").iterdir())
    plain = subprocess.run([sys.executable, "show_config.py", *inputs], cwd=where,
                           capture_output=True, text=True, timeout=60)
    boxed = subprocess.run([*PYCOMPART, "run", "app.toml", "--", "show_config.py", *inputs],
                           cwd=where, capture_output=True, text=True, timeout=120)
    assert boxed.stdout == plain.stdout, boxed.stderr
    assert boxed.returncode == plain.returncode == 1
    assert "rejected (ConstructorError)" in boxed.stdout and "nested too deeply" in boxed.stdout
    assert '"released": "2026-11-02"' in boxed.stdout  # a date crossed as a remote reference
    good = (where / "inputs" / "good.yaml").read_text()
    piped = subprocess.run([*PYCOMPART, "run", "app.toml", "show_config.py", "-"], cwd=where,
                           input=good, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and '"service": "thumbnailer"' in piped.stdout, piped.stderr


def _victim_home(outside=None):
    """A home directory with an SSH key, outside pytest's 0700 directory and
    readable and writable by anyone: only the kernel sandbox, not file
    permissions, stands between the attack and it. Returns (outside, home)."""
    import pathlib
    import tempfile

    if outside is None:
        outside = pathlib.Path(tempfile.mkdtemp(prefix="pycompart-home-"))
    outside.chmod(0o755)
    home = outside / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("-----BEGIN TEST KEY-----\n")
    (home / ".ssh" / "id_rsa").chmod(0o644)
    (home / ".ssh").chmod(0o755)
    home.chmod(0o777)
    return outside, home


def test_malicious_dependency_is_contained(tmp_path):
    """prettycolors tries, at import and on every call, to read SSH keys and
    environment secrets, write to $HOME and phone home. Unboxed every attempt
    works (the twin); boxed every one fails and the program still works."""
    import shutil
    import socket
    import threading

    where = _stage(tmp_path, "malicious_dep")
    outside, home = _victim_home()
    collector = socket.socket()
    collector.bind(("127.0.0.1", 0))
    collector.listen()
    collector.settimeout(0.2)
    (where / "collector_port").write_text(str(collector.getsockname()[1]))
    (where / "collector_port").chmod(0o644)
    loot: list[bytes] = []
    stop = threading.Event()

    def collect():
        while not stop.is_set():
            try:
                conn, _ = collector.accept()
            except OSError:
                continue
            with conn:
                loot.append(conn.recv(4096))
    thread = threading.Thread(target=collect)
    thread.start()
    env = dict(os.environ, HOME=str(home), API_TOKEN="tok-123-secret")
    try:
        plain = subprocess.run([sys.executable, "app.py", "hello"], cwd=where, env=env,
                               capture_output=True, text=True, timeout=60)
        assert plain.returncode == 0, plain.stderr
        assert plain.stderr.count(": OK (") == 12, plain.stderr  # 4 attempts x (import + 2 calls)
        # All three of its connections taken before the boxed run (one
        # left in the backlog would be counted as the boxed run's).
        taken_by = time.monotonic() + 10
        while len(loot) < 3 and time.monotonic() < taken_by:
            time.sleep(0.01)
        assert len(loot) == 3 and all(b"TEST KEY" in x and b"tok-123-secret" in x for x in loot), loot
        assert "prettycolors" in (home / ".bashrc").read_text()
        (home / ".bashrc").unlink()
        loot.clear()

        boxed = subprocess.run([*PYCOMPART, "run", "app.toml", "--", "app.py", "hello"], cwd=where,
                               env=env, capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        thread.join()
        collector.close()
    try:
        assert not (home / ".bashrc").exists()
    finally:
        shutil.rmtree(outside)
    assert boxed.returncode == 0, boxed.stderr
    assert boxed.stdout == plain.stdout  # the program still works
    attempts = [line for line in boxed.stderr.splitlines() if line.startswith("[prettycolors]")]
    assert len(attempts) == 12 and all("FAILED (PermissionError" in a for a in attempts), attempts
    assert sum("Permission denied: '" + str(home) in a for a in attempts) == 6  # keys + .bashrc
    assert not loot


def test_callbacks_example_same_output_boxed(tmp_path):
    where = _stage(tmp_path, "callbacks")
    plain = subprocess.run([sys.executable, "app.py"], cwd=where, capture_output=True, text=True,
                           timeout=60)
    boxed = subprocess.run([*PYCOMPART, "run", "app.toml", "--", "app.py"], cwd=where,
                           capture_output=True, text=True, timeout=120)
    assert boxed.returncode == 0, boxed.stderr
    assert boxed.stdout == plain.stdout
    assert "restocked gears: 8 -> 12" in boxed.stdout and "is a Record: True" in boxed.stdout


def test_malicious_dependency_contained_when_main_is_not_root(tmp_path):
    """The same attack with pycompart run started by an ordinary user
    (uid 65534): the compartment keeps that uid, so file permissions cannot
    help; Landlock, seccomp and the user+network namespaces must."""
    import pathlib
    import shutil
    import tempfile

    from test_escape import SYSTEM_PYTHON, _stage as stage_runtime

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to become uid 65534")
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} is {version}; the compiled dependencies are for {sys.version_info[:2]}")
    stage, _ = stage_runtime()
    outside = pathlib.Path(tempfile.mkdtemp(prefix="pycompart-home-"))
    try:
        where = pathlib.Path(stage) / "malicious_dep"
        shutil.copytree(os.path.join(ROOT, "examples", "malicious_dep"), where,
                        ignore=shutil.ignore_patterns("__pycache__"))
        (where / "collector_port").write_text("9")  # discard: nothing listens there
        for path in [where, *where.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        home = _victim_home(outside)[1]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "API_TOKEN": "tok-123-secret"}
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        launcher = (f"import sys; sys.path[:0] = [{stage!r}]; from pycompart.frontend.cli import main; "
                    "sys.exit(main(sys.argv[1:]))")
        plain = subprocess.run([*nobody, SYSTEM_PYTHON, "app.py", "hello"], cwd=where, env=env,
                               capture_output=True, text=True, timeout=60)
        assert plain.stderr.count(": OK (") >= 9, plain.stderr  # the twin: the attack works
        (home / ".bashrc").unlink()
        boxed = subprocess.run([*nobody, SYSTEM_PYTHON, "-I", "-c", launcher, "run", "app.toml", "--",
                                "app.py", "hello"], cwd=where, env=env, capture_output=True,
                               text=True, timeout=120)
        assert boxed.returncode == 0, boxed.stderr
        assert boxed.stdout == plain.stdout
        attempts = [line for line in boxed.stderr.splitlines() if line.startswith("[prettycolors]")]
        assert len(attempts) == 12 and all("FAILED (PermissionError" in a for a in attempts), attempts
        assert not (home / ".bashrc").exists()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(outside, ignore_errors=True)


FIB = [sys.executable, os.path.join(ROOT, "examples", "fib", "fib.py")]


@pytest.mark.parametrize("n, expected", [("0", "0"), ("1", "1"), ("2", "1"), ("10", "55"),
                                         ("90", "2880067194370816120")])
def test_fib_prints_the_nth_fibonacci_number(n, expected):
    proc = subprocess.run([*FIB, n], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, expected + "\n", "")


def test_fib_of_a_large_n_is_exact():
    proc = subprocess.run([*FIB, "10000"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    digits = proc.stdout.strip()
    a, b = 0, 1
    for _ in range(10000):
        a, b = b, a + b
    assert len(digits) == 2090 and digits == str(a)


@pytest.mark.parametrize("argv", [["-1"], ["x"], ["1.5"], [""], ["+3"], [], ["3", "4"], ["٣"]])
def test_fib_with_a_bad_n_exits_2_with_usage(argv):
    proc = subprocess.run([*FIB, *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: fib.py N")


@pytest.mark.parametrize("n", [str(2**63), "99999999999999999999"])
def test_fib_of_an_n_too_big_to_pass_fails_in_one_line(n):
    proc = subprocess.run([*FIB, n], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith(f"fib.py: computing fib({n}) failed: N is too big")
    assert "Traceback" not in proc.stderr


def test_examples_run_with_the_interpreter_that_made_the_venv():
    # The README runs examples with a plain `python`; the checkout's .venv
    # python is a symlink to that very interpreter (scripts/dev.sh).
    venv = os.path.join(ROOT, ".venv")
    if os.path.realpath(sys.prefix) != os.path.realpath(venv):
        pytest.skip("the tests do not run in the checkout's .venv")
    base = os.path.realpath(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    lacks = subprocess.run([base, "-c", "import pycompart"], capture_output=True, env=env, cwd="/")
    if lacks.returncode == 0:
        pytest.skip("the base interpreter has pycompart itself: no fallback needed")
    proc = subprocess.run([base, FIB[1], "10"], capture_output=True, text=True, timeout=60, env=env)
    assert (proc.returncode, proc.stdout) == (0, "55\n"), proc.stderr
    segments = os.path.join(ROOT, "examples", "tifftopnm", "tifftopnm_segments.py")
    proc = subprocess.run([base, segments], capture_output=True, text=True, timeout=60, env=env)
    assert (proc.returncode, proc.stderr) == (2, "usage: tifftopnm_segments.py IN.tif > OUT.pnm\n")


def test_fibs_compartment_is_allowed_nothing_but_computing():
    from pycompart.policy.spec import load_spec_file

    comp = load_spec_file(os.path.join(ROOT, "examples", "fib", "app.toml")).compartments["compute"]
    p = comp.privileges
    assert comp.may_call == () and comp.functions == ("fibcore:fib",)
    assert p.syscalls == "python" and not p.syscalls_allow and not p.capabilities
    assert not p.read and not p.write and not p.execute
    assert p.network == type(p.network)()  # none


CP = [sys.executable, os.path.join(ROOT, "examples", "cp", "cp.py")]


def test_cp_copies_contents_and_permission_bits(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 << 20) + b"end")
    src.chmod(0o751)
    proc = subprocess.run([*CP, str(src), str(tmp_path / "dst.bin")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()
    assert (tmp_path / "dst.bin").stat().st_mode & 0o7777 == 0o751
    (tmp_path / "d").mkdir()
    proc = subprocess.run([*CP, str(src), str(tmp_path / "d")], capture_output=True, text=True,
                          timeout=60)  # DST a directory: the file goes in it
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "src.bin").read_bytes() == src.read_bytes()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert subprocess.run([*CP, str(empty), str(tmp_path / "e2")], timeout=60).returncode == 0
    assert (tmp_path / "e2").read_bytes() == b""


def test_cp_errors_name_the_path_and_exit_1(tmp_path):
    missing = tmp_path / "missing.txt"
    proc = subprocess.run([*CP, str(missing), str(tmp_path / "x")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and str(missing) in proc.stderr and not (tmp_path / "x").exists()
    src = tmp_path / "a.txt"
    src.write_text("a")
    bad = tmp_path / "no" / "such" / "dir" / "b.txt"
    proc = subprocess.run([*CP, str(src), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and str(bad) in proc.stderr
    proc = subprocess.run([*CP, str(tmp_path), str(tmp_path / "c")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr
    for argv in ([], [str(src)], [str(src), "b", "c"]):
        proc = subprocess.run([*CP, *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "usage" in proc.stderr


def test_cps_compartments_can_open_nothing():
    """Parsing and copying compartments: no filesystem grant, no network;
    the copier gets descriptors (and can do nothing else with files)."""
    from pycompart.policy.spec import load_spec_file

    spec = load_spec_file(os.path.join(ROOT, "examples", "cp", "app.toml"))
    for name in ("args", "copier"):
        p = spec.compartments[name].privileges
        assert not p.read and not p.write and not p.execute and p.network == type(p.network)()
        assert p.syscalls == "python" and not p.syscalls_allow
    assert spec.compartments["copier"].descriptors and not spec.compartments["args"].descriptors


# -- beep (the seeds' Pitchfork example): only Privileged opens the device ----

BEEP = os.path.join(ROOT, "examples", "beep", "beep.py")


def _beep(argv, device, timeout=30):
    """Run beep.py against ``device`` (a FIFO); what it wrote, and its result."""
    import struct
    import threading

    got = []

    def read():
        with open(device, "rb") as f:
            got.append(f.read())
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, BEEP, *argv, "--device", device],
                          capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - started
    reader.join(5)
    events = [struct.unpack("llHHi", got[0][i:i + 24]) for i in range(0, len(got[0]), 24)] if got else []
    return proc, events, elapsed


@pytest.fixture
def speaker_fifo():
    import tempfile

    d = tempfile.mkdtemp(prefix="pycompart-beep-")
    os.chmod(d, 0o755)
    path = os.path.join(d, "spkr")
    os.mkfifo(path, 0o666)
    os.chmod(path, 0o666)
    yield path
    import shutil

    shutil.rmtree(d)


def test_beep_writes_a_tone_and_its_end_to_the_device(speaker_fifo):
    proc, events, elapsed = _beep(["-f", "880", "-l", "300"], speaker_fifo)
    assert proc.returncode == 0, proc.stderr
    assert [(e[2], e[3], e[4]) for e in events] == [(0x12, 0x02, 880), (0x12, 0x02, 0)]
    assert events[1][0] * 1e6 + events[1][1] - (events[0][0] * 1e6 + events[0][1]) >= 290_000


def test_beep_defaults_to_440_hz(speaker_fifo):
    proc, events, _ = _beep([], speaker_fifo)
    assert proc.returncode == 0, proc.stderr
    assert [e[4] for e in events] == [440, 0]


def test_beep_errors(tmp_path):
    proc = subprocess.run([sys.executable, BEEP, "-f", "-5"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    locked = tmp_path / "locked"
    locked.write_bytes(b"")
    locked.chmod(0o600)  # (and under a 0700 directory): Privileged may not open it
    proc = subprocess.run([sys.executable, BEEP, "--device", str(locked)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and f"cannot open {locked}" in proc.stderr


def test_beeps_main_can_open_no_file_once_its_app_runs(speaker_fifo, tmp_path):
    """What beep.py's spec claims for main, tried: after the app starts,
    main cannot open the device (only Privileged may) nor any other file."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"import sys, runpy\nsys.argv = ['beep.py']\n"
        f"g = runpy.run_path({BEEP!r}, run_name='beep')\n"
        f"app = g['app_for']({speaker_fifo!r})\n"
        "app.start(confine_main=True)\n"
        "out = []\n"
        f"for path in ({speaker_fifo!r}, '/etc/hostname'):\n"
        "    try:\n"
        "        open(path, 'wb' if path.endswith('spkr') else 'rb').close(); out.append('opened')\n"
        "    except OSError as exc:\n"
        "        out.append(type(exc).__name__)\n"
        "app.stop()\nprint(out)\n")
    proc = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['PermissionError', 'PermissionError']"
