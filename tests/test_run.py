"""``pycompart run`` behaves like ``python app.py``: argv, stdin/stdout/
stderr, exit status, tracebacks, KeyboardInterrupt, ``-m``."""

import os
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = """
[compartments.box]
modules = ["boxlib"]
may_call = ["main"]
"""


@pytest.fixture
def program(tmp_path):
    (tmp_path / "app.toml").write_text(SPEC)
    for path in (tmp_path,):
        path.chmod(0o755)

    def write(source, name="prog.py"):
        (tmp_path / name).write_text(source)
        (tmp_path / name).chmod(0o644)
        return tmp_path
    return write


def run(where, *args, stdin=None):
    env = dict(os.environ, PYTHONPATH=HERE)  # boxlib lives beside the tests
    return subprocess.run([sys.executable, "-m", "pycompart", "run", "app.toml", *args], cwd=where,
                          env=env, input=stdin, capture_output=True, text=True, timeout=120)


def test_argv_stdio_and_exit_status(program):
    where = program(
        "import os, sys, boxlib\n"
        "data = sys.stdin.read()\n"
        "print('argv', sys.argv)\n"
        "print('stdin', data.upper(), 'len', boxlib.apply(len, data))\n"
        "print('to stderr', file=sys.stderr)\n"
        "print('name', __name__, 'in', os.path.basename(__file__))\n"
        "sys.exit(7)\n")
    proc = run(where, "--", "prog.py", "a", "--flag", "-m", stdin="hello")
    assert proc.returncode == 7, proc.stderr
    assert "argv ['prog.py', 'a', '--flag', '-m']" in proc.stdout
    assert "stdin HELLO len 5" in proc.stdout and "name __main__ in prog.py" in proc.stdout
    assert "to stderr" in proc.stderr


def test_uncaught_exception_prints_the_programs_traceback(program):
    where = program("import boxlib\n\ndef f():\n    boxlib.fail()\n\nf()\n")
    proc = run(where, "prog.py")
    assert proc.returncode == 1
    assert 'File "' in proc.stderr and "prog.py\", line 6" in proc.stderr
    assert "boxlib.BoxError: ('it failed', 7)" in proc.stderr or "BoxError" in proc.stderr
    assert "runpy" not in proc.stderr and "shim.py" not in proc.stderr


def test_exit_with_a_message_and_none(program):
    assert run(program("import sys\nsys.exit('bad input')\n"), "prog.py").returncode == 1
    proc = run(program("import sys\nsys.exit('bad input')\n"), "prog.py")
    assert "bad input" in proc.stderr
    assert run(program("import sys\nsys.exit()\n"), "prog.py").returncode == 0


def test_keyboard_interrupt_ends_by_sigint(program):
    where = program("import boxlib\nboxlib.pid()\nraise KeyboardInterrupt\n")
    proc = run(where, "prog.py")
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert "KeyboardInterrupt" in proc.stderr


def test_keyboard_interrupt_during_a_compartment_call(program):
    """Ctrl-C while main waits on a compartment: the program gets
    KeyboardInterrupt like any blocking call, and nothing is left running."""
    where = program(
        "import os, signal, threading, boxlib\n"
        # (Python leaves SIGINT ignored if it started so: a test run in the
        # background of a shell without job control.)
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
        "boxlib.apply(lambda: __import__('time').sleep(5))\n")
    proc = run(where, "prog.py")
    assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in proc.stderr


def test_run_module(program):
    where = program("import sys, boxlib\nprint('module', __name__, sys.argv[1:], boxlib.VERSION)\n",
                    name="progmod.py")
    proc = run(where, "-m", "progmod", "x")
    assert proc.returncode == 0, proc.stderr
    assert "module __main__ ['x'] 1.2" in proc.stdout


def test_run_module_not_found_is_one_line(program):
    where = program("print(1)\n")
    (where / "breaks.py").write_text("import no_such_module_zz\n")
    proc = run(where, "-m", "no_such_module_zz")
    assert proc.returncode == 1 and proc.stderr == "pycompart run: No module named no_such_module_zz\n"
    proc = run(where, "-m", "no_such_pkg_zz.sub")
    assert proc.returncode == 1 and proc.stderr.startswith("pycompart run: Error while finding module")
    # A module that runs and fails to import something is the program's
    # error, with its traceback (none of runpy's frames).
    proc = run(where, "-m", "breaks")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "breaks.py" in proc.stderr
    assert "runpy" not in proc.stderr and "ModuleNotFoundError" in proc.stderr


def test_bad_spec_and_missing_script(program, tmp_path):
    where = program("print(1)\n")
    (tmp_path / "app.toml").write_text("[compartments.box]\nmodules = 3\n")
    proc = run(where, "prog.py")
    assert proc.returncode == 1 and "compartments.box.modules" in proc.stderr
    (tmp_path / "app.toml").write_text(SPEC)
    proc = run(where, "nope.py")
    assert proc.returncode == 2 and "nope.py" in proc.stderr
    usage = subprocess.run([sys.executable, "-m", "pycompart", "run"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: pycompart run" in usage.stdout


PROBE = """
import os, socket, sys, boxlib
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return exc.__class__.__name__ + ":" + str(exc.errno)
print("read", attempt(lambda: open(sys.argv[1]).read()))
print("write", attempt(lambda: open(sys.argv[2], "w").write("x")))
print("socket", attempt(lambda: socket.socket().close()))
print("box", boxlib.apply(lambda: os.getpid()) == os.getpid(), boxlib.pid() != os.getpid())
"""


@pytest.mark.parametrize("granted", [False, True], ids=["denied", "granted-twin"])
def test_main_privileges_confine_the_program(program, tmp_path, granted):
    """[compartments.main.privileges]: the program itself is locked down
    (Landlock, seccomp, namespaces), and its boxed modules still work."""
    import pathlib
    import shutil
    import tempfile

    outside = pathlib.Path(tempfile.mkdtemp(prefix="pycompart-main-"))
    try:
        outside.chmod(0o777)  # world-readable and -writable: only the sandbox can refuse
        (outside / "data.txt").write_text("data")
        (outside / "data.txt").chmod(0o666)
        grant = (f'filesystem.read = ["{outside}"]\nfilesystem.write = ["{outside}"]\n'
                 'network = "host"\n') if granted else ""
        spec = SPEC + f"\n[compartments.main.privileges]\n{grant}"
        where = program(PROBE)
        (tmp_path / "app.toml").write_text(spec)
        proc = run(where, "prog.py", str(outside / "data.txt"), str(outside / "new.txt"))
        assert proc.returncode == 0, proc.stderr
        expect = ("ok", "ok", "ok") if granted else ("PermissionError:13", "PermissionError:13",
                                                     "PermissionError:1")
        assert f"read {expect[0]}\nwrite {expect[1]}\nsocket {expect[2]}\n" in proc.stdout, proc.stdout
        assert "box True True" in proc.stdout
        assert (outside / "new.txt").exists() == granted
    finally:
        shutil.rmtree(outside)


def test_check_shows_mains_privileges(tmp_path):
    (tmp_path / "app.toml").write_text(SPEC + '\n[compartments.main.privileges]\nnetwork = "none"\n')
    proc = subprocess.run([sys.executable, "-m", "pycompart", "check", str(tmp_path / "app.toml")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=HERE))
    assert proc.returncode == 0, proc.stderr
    assert "main (the program, under pycompart run)" in proc.stdout
    assert "may call: main" in proc.stdout


def test_run_starts_its_zygote_before_the_heavy_imports_and_imports_little():
    """What ``pycompart run`` imports before the program runs (start-up is
    a product feature: the zygote is launched before typing and socket are
    imported, and main never imports the instance side, subprocess,
    importlib.abc, pathlib or OpenSSL's hashlib)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    code = ("import sys; import pycompart.frontend.cli, pycompart.supervisor.launcher; "
            "print(' '.join(sorted(sys.modules)))")
    before = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env=env).stdout.split())
    for name in ("typing", "socket", "subprocess"):
        assert name not in before, name
    code = ("import sys; import pycompart.frontend.cli, pycompart.supervisor.launcher, pycompart.frontend.run; "
            "print(' '.join(sorted(sys.modules)))")
    after = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env=env).stdout.split())
    for name in ("subprocess", "importlib.abc", "pathlib", "hashlib", "pickle", "dataclasses",
                 "pycompart.compartment.serve", "pycompart.compartment.objects",
                 "pycompart.compartment.lockdown", "pycompart.compartment.edges"):
        assert name not in after, name


def test_pycompart_defines_no_dataclasses_in_main_or_the_zygote():
    """A dataclass compiles its methods with ``exec`` as its class is
    defined (~0.9 ms each): pycompart's records are ``msgspec.Struct``s, and
    neither main's start (the rewriter included) nor the zygote's imports
    bring ``dataclasses`` in."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for modules in ("pycompart.frontend.run, pycompart.frontend.rewrite, pycompart.frontend.segments, "
                    "pycompart.supervisor.confine",
                    "pycompart.supervisor.zygote, pycompart.compartment.serve, pycompart.compartment.template"):
        code = f"import sys; import {modules}; print('dataclasses' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.strip() == "False", modules


def test_pycompart_s_own_objects_are_out_of_the_collectors_sight_and_the_program_s_are_not(program):
    """``pycompart run`` freezes what it allocated before the program runs
    (``gc.freeze``: the program's full collections and the interpreter's at
    exit need not walk it); what the program allocates is collected as it
    would be unboxed: a cycle of its own, with a finalizer, is collected by
    ``gc.collect()``, and a buffered file it never closed is flushed."""
    where = program(
        "import gc, boxlib\n"
        "frozen = gc.get_freeze_count()\n"
        "died = []\n"
        "class Node:\n"
        "    def __del__(self):\n"
        "        died.append(1)\n"
        "a, b = Node(), Node()\n"
        "a.other, b.other = b, a\n"
        "del a, b\n"
        "gc.collect()\n"
        "print('frozen', frozen > 1000, 'collected', len(died), 'box', boxlib.apply(len, 'abc'))\n"
        "log = open('out.txt', 'w')\n"
        "log.write('kept')\n")
    proc = run(where, "prog.py")
    assert proc.returncode == 0, proc.stderr
    assert "frozen True collected 2 box 3" in proc.stdout
    assert (where / "out.txt").read_text() == "kept"


@pytest.mark.parametrize("how", ["script", "-m"])
def test_the_program_s_globals_are_finalized_at_exit_as_python_does(program, how):
    """The program's ``__main__`` stays in ``sys.modules`` after it ends, as
    python's does, so that the interpreter's exit clears its globals: a
    file it wrote and never closed is flushed, and the ``__del__`` of an
    object it holds runs (both were lost when its module was dropped: its
    globals lived on in the cycle through its own class)."""
    where = program(
        "import sys, boxlib\n"
        "class Held:\n"
        "    def __del__(self):\n"
        "        print('finalized', file=sys.stderr)\n"
        "held = Held()\n"
        "log = open('out.txt', 'w')\n"
        "log.write('kept ' + str(boxlib.apply(len, 'abcd')))\n", name="progfin.py")
    proc = run(where, *(["progfin.py"] if how == "script" else ["-m", "progfin"]))
    assert proc.returncode == 0, proc.stderr
    assert (where / "out.txt").read_text() == "kept 4"
    assert "finalized" in proc.stderr


def test_run_module_without_runpys_private_steps_falls_back_to_run_module(tmp_path, monkeypatch):
    """Where runpy lacks ``_get_module_details``/``_run_code`` (a future
    CPython), ``-m`` still runs the module as ``__main__``, through
    ``runpy.run_module``."""
    import runpy
    import types

    from pycompart.frontend import run as shim

    (tmp_path / "fallbackmod.py").write_text("import sys\nsys.ran_as = __name__\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    # (Hidden from the shim only: run_module itself uses them.)
    monkeypatch.setattr(shim, "runpy", types.SimpleNamespace(run_module=runpy.run_module))
    monkeypatch.setattr(sys, "argv", ["fallbackmod"])
    before = sys.modules.get("__main__")
    try:
        shim._run_module("fallbackmod")
        assert sys.ran_as == "__main__"
        assert sys.modules.get("__main__") is before  # (run_module puts its own back)
    finally:
        sys.__dict__.pop("ran_as", None)


def test_every_privilege_that_cannot_be_enforced_is_named_with_the_file(program):
    """Not only the first compartment's: each on a line of its own, naming
    the spec's file, before the program runs."""
    where = program("print('ran')\n")
    (where / "app.toml").write_text(SPEC + '[compartments.box.privileges]\nuser = "no-such-user-q"\n'
                                    '[compartments.other]\nmodules = ["csv"]\n'
                                    '[compartments.other.privileges]\nsyscalls = { allow = ["no_such_call_q"] }\n')
    out = run(where, "prog.py")
    assert out.returncode == 1 and "ran" not in out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 2, out.stderr
    assert all(line.startswith("pycompart run: app.toml: compartment ") for line in lines)
    assert "no such user 'no-such-user-q'" in lines[0] and "no_such_call_q" in lines[1]


def test_dash_m_of_a_boxed_package_runs_its_main_in_the_compartment(program):
    """``python -m pkg`` semantics for a placed package: its ``__main__``
    runs in the compartment (never in main), with the program's arguments
    and exit status; a package without one says so in one line."""
    where = program("")
    (where / "app.toml").write_text('[compartments.box]\nmodules = ["clipkg", "bare"]\n')
    for name in ("clipkg", "bare"):
        (where / name).mkdir()
        (where / name / "__init__.py").write_text("")
    (where / "clipkg" / "__main__.py").write_text(
        "import os, sys\n"
        "print(__name__, sys.argv[1:], os.getpid())\n"
        "sys.exit(int(sys.argv[1]))\n")
    for path in where.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = run(where, "-m", "clipkg", "7", "x")
    name, args, pid = out.stdout.rsplit(" ", 1)[0], out.stdout.split("[")[1].split("]")[0], out.stdout.split()[-1]
    assert out.returncode == 7, out.stderr
    assert name.startswith("__main__") and args == "'7', 'x'" and pid != str(os.getpid())
    assert int(pid) < 100  # the compartment's pid namespace: it did not run in main
    bare = run(where, "-m", "bare")
    assert bare.returncode == 1
    assert bare.stderr == ("pycompart run: No module named bare.__main__; 'bare' is a package and cannot "
                           "be directly executed\n")
