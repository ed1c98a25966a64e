import pytest
import subprocess
import sys
from pathlib import Path

import pycompart
from pycompart.frontend.cli import main

GOOD = '''
[app]
name = "demo"
[compartments.parser]
functions = ["tinyimg:parse"]
instances = 2
call_timeout = "500ms"
'''


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert pycompart.__version__ in capsys.readouterr().out


def test_check_ok(tmp_path, capsys):
    spec = tmp_path / "app.toml"
    spec.write_text(GOOD)
    assert main(["check", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "compartment 'parser'" in out and "main -> parser" in out and "instances: 2" in out
    assert "OK" in out


def test_check_error_names_file_key_expectation(tmp_path, capsys):
    spec = tmp_path / "app.toml"
    spec.write_text(GOOD.replace("instances = 2", "instances = 'lots'"))
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert str(spec) in err and "compartments.parser.instances" in err and "integer" in err


def test_python_dash_m_entry_point(tmp_path):
    spec = tmp_path / "app.toml"
    spec.write_text(GOOD)
    proc = subprocess.run([sys.executable, "-m", "pycompart", "check", str(spec)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "main -> parser" in proc.stdout


def test_bench_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "pycompart", "bench", "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for row in ("raw pipe round trip", "multiprocessing.Pipe", "null typed call", "64 MiB",
                "instance ready, fresh start, default lock-down", "instance ready, a ready spare taken",
                "python -c pass", "summary", "memory per idle instance", "send_bytes", "call gate:",
                "proxied module function call", "remote-reference method call",
                "call that makes one callback into main", "pycompart run app.toml -- show_config.py",
                "null call between two compartments (edge)", "pycompart rewrite of _pydecimal.py",
                "examples/tifftopnm", "floor: bare fork of a zygote-sized python",
                "one page copied on write"):
        assert row in proc.stdout
    import json

    figures = json.loads(out.read_text())
    assert figures["quick"] is True
    for key in ("raw_pipe_pinned", "null_call_pinned", "null_call_unpinned", "edge_call_unpinned",
                "instance_ready", "instance_ready_fresh", "instance_ready_fresh_back_to_back",
                "arg_64mib_gbs", "mp_send_bytes_64mib",
                "idle_pss_kib", "run_overhead_ms", "rewrite_ms", "tifftopnm_boxed_ms", "fork_floor",
                "cow_fault_us"):
        assert figures["results"][key] > 0, key
    if figures["results"]["native"]:  # the byte loop alone, measured with the C module only
        assert "floor: the C call loop" in proc.stdout and figures["results"]["gate_floor"] > 0


def test_template_child_benchmark_runs():
    # The README's figure for a forked template comes from this script.
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "template_child.py"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fork to hello, template-like child" in proc.stdout and "ratio:" in proc.stdout


def test_check_shows_the_resolved_privileges(tmp_path, capsys):
    spec = tmp_path / "app.toml"
    spec.write_text(GOOD + '\n[compartments.parser.privileges]\nnetwork = { connect = [443] }\n'
                    'filesystem.read = ["/etc/hostname"]\nmemory = "64MiB"\n')
    assert main(["check", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "TCP connect [443]" in out and "/etc/hostname" in out and "memory 64MiB" in out
    assert "added read-only automatically:" in out and sys.prefix.split("/")[1] in out


def test_check_warns_of_placed_modules_nothing_provides(tmp_path, capsys, monkeypatch):
    """A typo in ``modules`` or ``functions`` is found without importing
    anything: a package's submodules are looked for in its folders."""
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise SystemExit('imported!')\n")
    (pkg / "real.py").write_text("")
    (tmp_path / "helper.py").write_text("")
    spec = tmp_path / "app.toml"
    spec.write_text('[compartments.box]\nmodules = ["mypkg.real", "mypkg.typo", "jsno", "json.decoder", '
                    '"_socket"]\nfunctions = ["helper:f", "nohelper:f"]\n')
    monkeypatch.chdir("/")
    assert main(["check", str(spec)]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warned) == 3, captured.err
    assert all(any(f"module {name!r}" in line for line in warned) for name in ("mypkg.typo", "jsno", "nohelper"))
    assert "OK (3 warnings)" in captured.out and "mypkg" not in sys.modules


def test_check_warns_of_granted_paths_that_do_not_exist(tmp_path, capsys):
    """Each instance looks its paths up when it starts and grants nothing
    for a missing one: a typo would show only as an EACCES inside."""
    (tmp_path / "data").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    spec = tmp_path / "app.toml"
    spec.write_text('[compartments.box]\nmodules = ["json"]\n[compartments.box.privileges]\n'
                    'filesystem.read = ["data", "dta", "dangling"]\nfilesystem.write = ["/no/such/dir"]\n')
    assert main(["check", str(spec)]) == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warned) == 3, captured.err
    assert "filesystem.read path" in warned[0] and "dta" in warned[0] and "dangling" in warned[1]
    assert "filesystem.write path '/no/such/dir'" in warned[2]
    assert "OK (3 warnings)" in captured.out


def test_check_fails_when_the_host_cannot_enforce(tmp_path, capsys):
    spec = tmp_path / "app.toml"
    spec.write_text(GOOD + '\n[compartments.parser.privileges]\nuser = "no-such-user-here"\n')
    assert main(["check", str(spec)]) == 1
    assert "no such user" in capsys.readouterr().err


def test_doctor_says_what_the_host_enforces(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for words in ("Landlock: ABI", "seccomp:", "namespaces", "cgroups", "running as", "verdict"):
        assert words in out


def test_help_is_plain_text():
    proc = subprocess.run([sys.executable, "-m", "pycompart", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "``" not in proc.stdout and "check" in proc.stdout


def test_check_reports_every_error_in_one_run(tmp_path, capsys):
    spec = tmp_path / "app.toml"
    spec.write_text(GOOD.replace("instances = 2", "instances = 'lots'\nrestart = 'sometimes'")
                    + "\n[compartments.other]\ntypo = 1\n[compartments.other.privileges]\nnetwork = 'wifi'\n")
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err.splitlines()
    for key in ("compartments.parser.instances", "compartments.parser.restart",
                "compartments.other.privileges.network", "compartments.other.typo"):
        assert sum(key in line and str(spec) in line for line in err) == 1, (key, err)
    assert err[-1] == "pycompart check: 4 errors"


def test_check_warns_about_a_memory_limit_too_small_to_start(tmp_path, capsys):
    spec = tmp_path / "app.toml"
    spec.write_text(GOOD + '\n[compartments.parser.privileges]\nmemory = "16MiB"\n')
    main(["check", str(spec)])
    assert "WARNING: memory = 16 MiB is below" in capsys.readouterr().out
    spec.write_text(GOOD + '\n[compartments.parser.privileges]\nmemory = "1GiB"\n')
    main(["check", str(spec)])
    assert "WARNING: memory" not in capsys.readouterr().out


def test_an_interpreter_this_user_cannot_reach_is_named(tmp_path):
    """A program that dropped to another user (or a venv whose python links
    into a 0700 home) cannot exec the zygote: doctor, check and the start
    error say so and what to do, instead of a bare EACCES."""
    import os
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to switch users")
    hidden = tempfile.mkdtemp()  # 0700, owned by root
    link = os.path.join(hidden, "python")
    os.symlink(os.path.realpath(sys.executable), link)
    public = tempfile.mkdtemp(dir="/tmp")
    os.chmod(public, 0o755)
    spec = os.path.join(public, "app.toml")
    with open(spec, "w") as f:
        f.write(GOOD)
    os.chmod(spec, 0o644)
    script = f'''
import os, sys, warnings
import pycompart, pycompart.frontend.app, pycompart.supervisor.monitor, subprocess, importlib.util, shutil  # (argparse imports shutil late)
from pycompart.frontend.cli import main
from pycompart.frontend.commands import doctor
os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
sys.executable = {link!r}
print("DOCTOR", doctor().splitlines()[-1])
print("CHECK", main(["check", {spec!r}]))
warnings.simplefilter("ignore")
app = pycompart.App({{"compartments": {{"b": {{"privileges": {{"enforcement": "best-effort"}}}}}}}})
try:
    app.start()
except pycompart.CompartmentStartError as exc:
    print("START", exc)
'''
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd="/")
    out = proc.stdout + proc.stderr
    assert "DOCTOR verdict: no compartment can start with this interpreter" in out, out
    assert "CHECK 1" in out and f"the directory {hidden} on its way is not searchable" in out, out
    start = [line for line in out.splitlines() if line.startswith("START")]
    assert start and f"{link}" in start[0] and "cannot be executed by uid 65534" in start[0], out


def test_check_shows_the_default_bounds_and_isolation(tmp_path, capsys):
    spec = tmp_path / "app.toml"
    spec.write_text(GOOD)
    assert main(["check", str(spec)]) == 0
    out = capsys.readouterr().out
    for words in ("memory 2GiB", "processes 128", "output: relay", "idle CPU before a kill: 10s",
                  "file modes, owners, times: refused; file locks: refused", "pid namespace",
                  "no prctl that loosens anything"):
        assert words in out, words
    import os
    if os.geteuid() == 0:
        assert "a uid and gid of its own" in out
