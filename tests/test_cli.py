import subprocess
import sys

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


def test_bench_quick_runs():
    proc = subprocess.run([sys.executable, "-m", "pycompart", "bench", "--quick"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for row in ("raw pipe round trip", "multiprocessing.Pipe", "null typed call", "64 MiB",
                "instance ready, default lock-down", "python -c pass", "summary",
                "proxied module function call", "remote-reference method call",
                "call that makes one callback into main", "pycompart run app.toml -- show_config.py"):
        assert row in proc.stdout


def test_check_shows_the_resolved_privileges(tmp_path, capsys):
    spec = tmp_path / "app.toml"
    spec.write_text(GOOD + '\n[compartments.parser.privileges]\nnetwork = { connect = [443] }\n'
                    'filesystem.read = ["/etc/hostname"]\nmemory = "64MiB"\n')
    assert main(["check", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "TCP connect [443]" in out and "/etc/hostname" in out and "memory 67108864" in out
    assert "added read-only automatically:" in out and sys.prefix.split("/")[1] in out


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
