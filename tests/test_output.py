"""Instances never hold main's stdin, stdout or stderr (finding 3): their
output goes through pipes of their own that main relays, and what they
print during a call comes out where main's own output goes, in order."""

import contextlib
import io
import json
import os
import pty
import subprocess
import sys
import termios
import textwrap
import time


import ttyattack  # noqa: F401  (main knows the signatures)

HERE = os.path.dirname(os.path.abspath(__file__))

ATTACK_MAIN = textwrap.dedent('''
    import json, os, sys, time
    sys.path.insert(0, {here!r})
    import pycompart, ttyattack
    box = {{"functions": ["ttyattack:attack", "ttyattack:shout"]}}
    if {mode!r} != "relay":  # the default
        box["output"] = {mode!r}
    app = pycompart.App({{"compartments": {{"box": box}}}})
    with app:
        results = app.function("ttyattack:attack")()
        for i in range(3001):
            print(f"main line {{i}}")
        sys.stdout.flush()
        print("RESULTS " + json.dumps(results), file=sys.stderr, flush=True)
''')


def _main(tmp_path, mode="relay"):
    script = tmp_path / "main.py"
    script.write_text(ATTACK_MAIN.format(here=HERE, mode=mode))
    return script


def test_the_terminal_is_out_of_reach(tmp_path):
    """Under a terminal, the compartment turned echo off, stopped output
    (main hung in print), made the tty exclusive and read what the user
    typed. Its descriptors are not the terminal any more."""
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, str(_main(tmp_path))], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        import select

        if select.select([master], [], [], 0.1)[0]:
            try:
                out += os.read(master, 65536)
            except OSError:
                break
    stderr = proc.communicate(timeout=30)[1]
    results = json.loads(stderr.split("RESULTS ", 1)[1])
    assert proc.returncode == 0, stderr
    for attempt in results:
        name, _, what = attempt.partition(":")
        if name.startswith(("echo-off", "tcflow", "exclusive")):
            assert what in ("ENOTTY", "EINVAL", "EPERM"), attempt
    assert "stdin:b''" in results  # /dev/null, not the user's keystrokes
    assert out.count(b"main line") == 3001  # main never hung, nothing lost
    # The terminal is as it was (the real pty is still open on our side).
    assert termios.tcgetattr(master)[3] & termios.ECHO == before[3] & termios.ECHO
    os.close(master)


def test_main_stdout_cannot_be_made_nonblocking_or_truncated(tmp_path):
    """O_NONBLOCK on a shared pipe truncated main's output (865 of 3001
    lines arrived); ftruncate and posix_fallocate forged main's log file."""
    log = tmp_path / "out.log"
    with open(log, "wb") as f:
        f.write(b"earlier log line\n")
        f.flush()
        proc = subprocess.run([sys.executable, str(_main(tmp_path))], stdout=f,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert text.startswith("earlier log line\n") and text.count("main line") == 3001
    assert len(text) < 200_000  # no 1 MiB of fallocated zeros
    piped = subprocess.run([sys.executable, str(_main(tmp_path))], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60)
    assert piped.stdout.count("main line") == 3001
    results = json.loads(piped.stderr.split("RESULTS ", 1)[1])
    assert "truncate-1:EINVAL" in results and "fallocate-1:ESPIPE" in results


def test_inherit_is_the_explicit_unsafe_choice(tmp_path):
    """``output = "inherit"`` gives the compartment main's descriptors: the
    attack works again (which is why it is not the default)."""
    log = tmp_path / "out.log"
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, str(_main(tmp_path, "inherit"))], stdout=f,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=60)
    results = json.loads(proc.stderr.split("RESULTS ", 1)[1])
    assert "truncate-1:ok" in results


def test_output_during_a_call_comes_out_in_order_where_main_writes(make_app, capsys):
    app = make_app({"compartments": {"box": {"functions": ["ttyattack:shout", "ttyattack:mixed"]}}})
    with app:
        print("main before")
        assert app.function("ttyattack:shout")(3) == 3
        print("main after")
        captured = capsys.readouterr()
        assert captured.out == "main before\nbox line 0\nbox line 1\nbox line 2\nmain after\n"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            app.function("ttyattack:shout")(2)
        assert buf.getvalue() == "box line 0\nbox line 1\n"
        assert app.function("ttyattack:mixed")() == "done"
        captured = capsys.readouterr()
        assert captured.out == "box out 1\nbox out 2\n" and captured.err == "box err 1\n"


def test_prefixed_and_null_output(make_app, capsys):
    app = make_app({"compartments": {
        "loud": {"functions": ["ttyattack:shout"], "output": "prefixed"},
        "quiet": {"functions": ["ttyattack:mixed"], "output": "null"}}})
    with app:
        app.function("ttyattack:shout")(2)
        app.function("ttyattack:mixed")()
        captured = capsys.readouterr()
    assert captured.out == "[loud] box line 0\n[loud] box line 1\n" and captured.err == ""


def test_output_outside_calls_is_relayed_too(tmp_path):
    """Import-time prints and writes below Python (fd 1 itself) arrive
    through the relay pipes, also when the app stops right after."""
    import pathlib
    import tempfile

    tmp_path = pathlib.Path(tempfile.mkdtemp(dir="/tmp"))  # readable by the compartment's uid
    tmp_path.chmod(0o755)
    mod = tmp_path / "noisy.py"
    mod.write_text("import os, sys\nprint('imported', flush=True)\nos.write(1, b'raw fd write\\n')\n"
                   "def f() -> int:\n    os.write(2, b'raw stderr\\n')\n    return 1\n")
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import pycompart
        app = pycompart.App({{"compartments": {{"n": {{"modules": ["noisy"], "functions": ["noisy:f"]}}}}}})
        with app:
            app.function("noisy:f")()
    '''))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "imported" in proc.stdout and "raw fd write" in proc.stdout and "raw stderr" in proc.stderr
