"""``pycompart rewrite``: segments hoisted into entrypoints, what it refuses
(each row of the README's table), the rewritten program run directly and
under ``pycompart run``, and tracebacks pointing at the original lines."""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

from pycompart.frontend.rewrite import analyze, rewrite

HERE = os.path.dirname(os.path.abspath(__file__))
TALLY = os.path.join(HERE, "segprogs", "tally.py")


def segs(src):
    result = rewrite(textwrap.dedent(src), "prog.py")
    assert not result.problems, result.problems
    return {s.compartment: (s.params, s.outputs) for s in result.segments}


def test_parameters_are_what_the_block_reads_first_and_outputs_what_the_rest_reads():
    assert segs("""
        import os
        import pycompart
        LIMIT = 3
        def f(a, b, unused):
            c = a + 1
            with pycompart.segment("P"):
                d = os.getpid() + c      # c is read: a parameter; os is the module's
                e = d * 2                # d assigned first: not a parameter
                if b:
                    c = 0                # may not run: c stays a parameter
                tmp = e + LIMIT          # LIMIT: a top-level constant, the compartment's own
            return d, c
        """) == {"P": (["b", "c"], ["c", "d"])}  # c may stay as it was: it goes in too; d is always set


def test_module_level_segments_and_loops():
    assert segs("""
        from pycompart import segment as seg
        if __name__ == "__main__":
            values = [1, 2]
            for v in values:
                with seg("P"):
                    acc = v * 2
                print(acc)
        """) == {"P": (["v"], ["acc"])}


def test_nested_scopes_in_a_block_keep_their_own_names():
    assert segs("""
        import pycompart
        def f(items, k):
            with pycompart.segment("P"):
                out = sorted(items, key=lambda x: x % k)
                squares = [y * y for y in out]
            return squares
        """) == {"P": (["items", "k"], ["squares"])}


#: Every construct the rewriter refuses: (source of a function body, what the
#: message says). The README's table has one row for each.
REFUSED = [
    ("with pycompart.segment('P'):\n    return 1", "'return' inside a segment"),
    ("with pycompart.segment('P'):\n    yield 1", "'yield' inside a segment"),
    ("for i in x:\n    with pycompart.segment('P'):\n        break", "'break' inside a segment"),
    ("for i in x:\n    with pycompart.segment('P'):\n        continue", "'continue' inside a segment"),
    ("global G\nwith pycompart.segment('P'):\n    G = 1", "declares global or nonlocal"),
    ("with pycompart.segment('P'):\n    global G\n    G = 1", "'global' inside a segment"),
    ("with pycompart.segment('P'):\n    x.append(1)", "changes 'x' in place"),
    ("with pycompart.segment('P'):\n    x[0] = 1", "changes 'x' in place"),
    ("with pycompart.segment('P'):\n    x.attr = 1", "changes 'x' in place"),
    ("with pycompart.segment('P'):\n    y = locals()", "locals() inside a segment"),
    ("with pycompart.segment('P'):\n    y = eval('1')", "eval() inside a segment"),
    ("with pycompart.segment('P'):\n    from os import *", "'from ... import *'"),
    ("with pycompart.segment('P'):\n    with pycompart.segment('Q'):\n        pass", "inside a segment of"),
    ("name = 'P'\nwith pycompart.segment(name):\n    pass", "one string literal"),
    ("with pycompart.segment('P') as s:\n    pass", "'with segment(...) as name'"),
    ("with pycompart.segment('P'), open('f'):\n    pass", "with other context managers"),
]


@pytest.mark.parametrize("body, message", REFUSED)
def test_what_cannot_be_hoisted_is_reported_with_file_line_and_fix(body, message):
    src = "import pycompart\ndef f(x):\n" + textwrap.indent(body, "    ") + "\n    return x\n"
    result = rewrite(src, "prog.py")
    assert result.problems and not result.source
    problem = result.problems[0]
    assert message in problem.message, problem
    assert problem.filename == "prog.py" and problem.line >= 3 and problem.fix
    assert str(problem).startswith(f"prog.py:{problem.line}: ")


@pytest.mark.parametrize("src, message", [
    ("import pycompart\nasync def f():\n    async with pycompart.segment('P'):\n        pass\n",
     "'async with' a segment"),
    ("import pycompart\nasync def f():\n    with pycompart.segment('P'):\n        await g()\n",
     "'await' inside a segment"),
    ("import pycompart\nclass C:\n    with pycompart.segment('P'):\n        x = 1\n", "class body"),
    ("import pycompart\ndef f():\n    @pycompart.entrypoint('P')\n    def g(): pass\n",
     "not a module-level function"),
    ("import pycompart\n@pycompart.entrypoint('P')\nasync def g(): pass\n", "coroutine function"),
    ("import pycompart\n@pycompart.entrypoint('P')\n@staticmethod\ndef g(): pass\n",
     "with other decorators"),
    ("def f(:\n", "syntax error"),
])
def test_other_refusals(src, message):
    _, problems = analyze(src, "prog.py")
    assert problems and message in problems[0].message, problems


def test_an_unrewritten_annotated_program_runs_as_before(tmp_path):
    data = tmp_path / "n.txt"
    data.write_text("1\n2\n3\n")
    proc = subprocess.run([sys.executable, TALLY, str(data)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "tally 6 1\n"  # one process


@pytest.fixture
def shared_dir():
    """A directory every compartment's uid may traverse (tmp_path is 0700)."""
    d = tempfile.mkdtemp(prefix="pycompart-rewrite-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d)


def _data(folder):
    sub = os.path.join(folder, "data")
    os.makedirs(sub)
    os.chmod(sub, 0o755)
    path = os.path.join(sub, "n.txt")
    with open(path, "w") as f:
        f.write("1\n2\n3\n4\n")
    os.chmod(path, 0o644)
    return path


def test_the_cli_rewrites_and_the_program_runs_compartmentalized(shared_dir):
    out = os.path.join(shared_dir, "out")
    check = subprocess.run([sys.executable, "-m", "pycompart", "rewrite", "--check", TALLY],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "segment 'Reader' becomes _segment_Reader_17(numbers, path) -> numbers, reader_pid" in check.stdout
    assert "total() is an entrypoint of 'Sum'" in check.stdout
    assert not os.path.exists(out)  # --check writes nothing
    proc = subprocess.run([sys.executable, "-m", "pycompart", "rewrite", TALLY, "--out", out],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    spec = open(os.path.join(out, "tally.toml")).read()
    assert '[compartments.Reader]\nfunctions = ["__main__:_segment_Reader_17"]' in spec
    assert '[compartments.Sum]\nfunctions = ["__main__:_segment_Sum_26", "__main__:total"]' in spec
    data = _data(shared_dir)
    # The skeleton grants nothing: Reader cannot read the data yet.
    run = subprocess.run([sys.executable, os.path.join(out, "tally.py"), data],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "PermissionError" in run.stderr
    with open(os.path.join(out, "tally.toml"), "a") as f:
        f.write(f'\n[compartments.Reader.privileges]\nfilesystem.read = ["{os.path.dirname(data)}"]\n')
    run = subprocess.run([sys.executable, os.path.join(out, "tally.py"), data],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "tally 10 3\n"  # main, Reader and Sum: three processes
    # An exception inside a segment points at the original file and line.
    broken = subprocess.run([sys.executable, os.path.join(out, "tally.py"), "broken"],
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1
    assert f'File "{TALLY}", line 27, in _segment_Sum_26' in broken.stderr
    assert "ZeroDivisionError" in broken.stderr
    # The rewritten program under pycompart run, with a spec of the user's
    # (only the compartments and their privileges).
    spec = os.path.join(shared_dir, "user.toml")
    with open(spec, "w") as f:
        f.write(f'[compartments.Reader]\nprivileges.filesystem.read = ["{os.path.dirname(data)}"]\n'
                "[compartments.Sum]\n")
    run = subprocess.run([sys.executable, "-m", "pycompart", "run", spec, "--",
                          os.path.join(out, "tally.py"), data], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "tally 10 3\n"


def test_pycompart_run_rewrites_an_annotated_program_on_the_fly(shared_dir):
    data = _data(shared_dir)
    spec = os.path.join(shared_dir, "app.toml")
    with open(spec, "w") as f:  # only the compartments: the entrypoints are found
        f.write(f'[compartments.Reader]\nprivileges.filesystem.read = ["{os.path.dirname(data)}"]\n'
                "[compartments.Sum]\n")
    run = subprocess.run([sys.executable, "-m", "pycompart", "run", spec, "--", TALLY, data],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "tally 10 3\n"
    broken = subprocess.run([sys.executable, "-m", "pycompart", "run", spec, "--", TALLY, "broken"],
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1
    assert f'File "{TALLY}", line 27, in _segment_Sum_26' in broken.stderr
    with open(spec, "w") as f:
        f.write("[compartments.Reader]\n")
    missing = subprocess.run([sys.executable, "-m", "pycompart", "run", spec, "--", TALLY, data],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "compartment 'Sum', which" in missing.stderr


def _run_program(where, name, spec_text, source):
    """``pycompart run`` of the program ``source`` (written as ``name``)
    with a spec of ``spec_text``: its path and the finished process."""
    prog = os.path.join(where, name)
    with open(prog, "w") as f:
        f.write(source)
    spec = os.path.join(where, os.path.splitext(name)[0] + ".toml")
    with open(spec, "w") as f:
        f.write(spec_text)
    return prog, subprocess.run([sys.executable, "-m", "pycompart", "run", spec, "--", prog],
                                capture_output=True, text=True, timeout=60)


def test_main_frames_of_a_rewritten_program_point_to_the_program_as_written(shared_dir):
    """Not to the rewritten copy in the cache, nor its lines: main's own
    code around and after a segment, and the segment's call."""
    prog, run = _run_program(shared_dir, "frames.py", "[compartments.calc]\n",
                             "import traceback\nimport pycompart\n\n\ndef g(x):\n"
                             "    with pycompart.segment('calc'):\n        y = x * 2\n"
                             "    traceback.print_stack(limit=2)\n    raise RuntimeError(f'after {y}')\n\n\n"
                             "if __name__ == '__main__':\n    g(3)\n")
    assert run.returncode == 1
    assert run.stderr.count(f'File "{prog}", line 13, in <module>') == 2, run.stderr
    assert f'File "{prog}", line 8, in g\n    traceback.print_stack(limit=2)' in run.stderr
    assert f'File "{prog}", line 9, in g\n    raise RuntimeError' in run.stderr
    from pycompart.frontend import segments

    assert segments.cache_root() not in run.stderr


def test_pycompart_run_refuses_a_program_it_cannot_rewrite(shared_dir):
    prog, run = _run_program(shared_dir, "bad.py", "[compartments.P]\n",
                             "import pycompart\ndef f():\n    with pycompart.segment('P'):\n        return 1\n")
    assert run.returncode == 1
    assert f"{prog}:4: 'return' inside a segment of 'P' would leave the block" in run.stderr


def test_names_a_block_binds_for_itself_are_not_parameters():
    assert segs("""
        import pycompart
        def f(path, lines):
            with pycompart.segment("P"):
                with open(path) as fh:
                    first = fh.readline()
                for line in lines:
                    last = line.strip()
                try:
                    n = int(first)
                except ValueError as exc:
                    n = str(exc)
                count = 0
                count += 1
            return first, n, count
        """) == {"P": (["first", "lines", "n", "path"], ["count", "first", "n"])}  # (a with may swallow)


# -- programs that must behave the same rewritten, or be refused ------------------
# (from a hunt for miscompilations: each one was once silently different)

SAME = os.path.join(HERE, "segprogs", "same")
REFUSED_PROGRAMS = os.path.join(HERE, "segprogs", "refused")


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(SAME) if f.endswith(".py")))
def test_a_rewritten_program_behaves_as_the_original(name, shared_dir):
    """Conditional assignments and reads, walrus, match, module globals and
    their current values, closures, loops, except-as, class bodies, for-else,
    sys.exit, and values of every type that crosses by value."""
    prog = os.path.join(shared_dir, f"{name}.py")
    shutil.copy(os.path.join(SAME, f"{name}.py"), prog)
    os.chmod(prog, 0o644)
    spec = os.path.join(shared_dir, "spec.toml")
    with open(spec, "w") as f:
        f.write("[compartments.P]\n[compartments.Q]\n")
    env = dict(os.environ, PYTHONHASHSEED="0")  # sets print in one order in both
    plain = subprocess.run([sys.executable, prog], capture_output=True, text=True, timeout=60, env=env)
    boxed = subprocess.run([sys.executable, "-m", "pycompart", "run", spec, "--", prog],
                           capture_output=True, text=True, timeout=120, env=env)
    assert (boxed.returncode, boxed.stdout) == (plain.returncode, plain.stdout), boxed.stderr


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(REFUSED_PROGRAMS) if f.endswith(".py")))
def test_a_program_that_would_behave_differently_is_refused(name):
    """``del`` of the caller's variable, a stdlib function or method changing
    a received value in place (before any rebinding), ``nonlocal`` to the
    caller's variable, functions/classes/modules that would have to cross,
    ``self``, a module-level segment outside the main guard."""
    prog = os.path.join(REFUSED_PROGRAMS, f"{name}.py")
    check = subprocess.run([sys.executable, "-m", "pycompart", "rewrite", "--check", prog],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 1, check.stdout
    assert f"{prog}:" in check.stderr and "(fix: " in check.stderr, check.stderr


def test_pycompart_run_rewrites_annotated_modules_the_program_imports(shared_dir):
    with open(os.path.join(shared_dir, "annolib.py"), "w") as f:
        f.write("import os\nimport pycompart\n\n\n@pycompart.entrypoint('Q')\ndef where(x):\n"
                "    return x * 2, os.getpid()\n\n\ndef double_in_p(x):\n"
                "    with pycompart.segment('P'):\n        y = x * 2\n        pid = os.getpid()\n"
                "    return y, pid\n")
    with open(os.path.join(shared_dir, "main.py"), "w") as f:
        f.write("import os\nimport annolib\n"
                "y, pid = annolib.double_in_p(21)\nz, qpid = annolib.where(4)\n"
                "print(y, z, len({os.getpid(), pid, qpid}))\n")
    spec = os.path.join(shared_dir, "spec.toml")
    with open(spec, "w") as f:
        f.write("[compartments.P]\n[compartments.Q]\n")
    for name in ("annolib.py", "main.py", "spec.toml"):
        os.chmod(os.path.join(shared_dir, name), 0o644)
    plain = subprocess.run([sys.executable, os.path.join(shared_dir, "main.py")], capture_output=True,
                           text=True, timeout=60, cwd=shared_dir)
    assert plain.stdout == "42 8 1\n", plain.stderr
    boxed = subprocess.run([sys.executable, "-m", "pycompart", "run", spec, "--",
                            os.path.join(shared_dir, "main.py")], capture_output=True, text=True,
                           timeout=60, cwd=shared_dir)
    assert boxed.returncode == 0, boxed.stderr
    assert boxed.stdout == "42 8 3\n"  # main, P and Q


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory another user owns")
def test_the_rewrite_cache_refuses_a_directory_another_user_prepared(tmp_path, monkeypatch):
    """/var/tmp is everybody's: a cache directory (or a "rewritten program")
    another user made in advance would be run as ours."""
    from pycompart.frontend import segments
    from pycompart.policy.spec import load_spec

    monkeypatch.setattr(segments, "CACHE_DIR", str(tmp_path / "cache"))
    planted = segments.cache_root()
    os.mkdir(planted, 0o755)
    os.chown(planted, 65534, 65534)
    spec = load_spec({"compartments": {"Reader": {}, "Sum": {}}})
    with pytest.raises(segments.RewriteFailed, match="not a directory of this user's own"):
        segments.prepare_run(TALLY, spec)
    os.chown(planted, 0, 0)
    target, _ = segments.prepare_run(TALLY, spec)  # ours: used
    os.chown(target, 65534, 65534)  # a file someone else put there
    with pytest.raises(segments.RewriteFailed, match="not a file of this user's own"):
        segments.prepare_run(TALLY, spec)
