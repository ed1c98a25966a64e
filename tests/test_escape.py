"""The escape battery (see escape.py): hostile code in real compartments,
as root and as an unprivileged user. Each case is one test."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import escape

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM_PYTHON = "/usr/bin/python3"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the root battery runs as root")


@pytest.fixture(scope="module")
def root_results():
    return escape.run(escape.selected("root"))


@needs_root
@pytest.mark.parametrize("case", escape.selected("root"), ids=lambda c: c.name)
def test_as_root(root_results, case):
    assert root_results[case.name].startswith(escape.expected(case, "root")), root_results[case.name]


@needs_root
def test_each_compartment_has_a_uid_of_its_own_as_root(root_results):
    """Not a shared nobody: compartment A cannot chmod or read B's files by
    DAC, and no user or other app holds the id."""
    import pwd

    box, vault = int(root_results["box uid"]), int(root_results["vault uid"])
    assert box != vault and 65534 not in (box, vault) and 0 not in (box, vault)
    for uid in (box, vault):
        assert 393216 <= uid <= 458751
        with pytest.raises(KeyError):
            pwd.getpwuid(uid)


@needs_root
@pytest.mark.parametrize("name", sorted(escape.UNCONFINED))
def test_unconfined_twin_as_root(root_results, name):
    """What pycompart refuses inside a compartment works outside one."""
    assert root_results[name].startswith(escape.UNCONFINED[name]), root_results[name]


def run_as_nobody(files, runner):
    """Run ``runner`` (one of ``files``, staged with pycompart) as uid 65534
    with the system python; its last line of output, parsed as JSON. Skips
    where that cannot be done."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("needs root, setpriv and a world-readable system python to become uid 65534")
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} is {version}, the compiled dependencies are for {sys.version_info[:2]}")
    stage, path = _stage(files)
    try:
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               SYSTEM_PYTHON, "-I", os.path.join(stage, runner), *path],
                              capture_output=True, text=True, timeout=120, cwd="/tmp")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stage(extra=()) -> tuple[str, list[str]]:
    """A world-readable copy of pycompart, msgspec, pyseccomp and the
    battery: the checkout may sit under a 0700 directory (as /root does)."""
    stage = tempfile.mkdtemp(prefix="pycompart-stage-", dir="/tmp")
    os.chmod(stage, 0o755)
    for name in ("pycompart", "msgspec", "pyseccomp"):
        spec = importlib.util.find_spec(name)
        if spec.submodule_search_locations:
            shutil.copytree(spec.submodule_search_locations[0], os.path.join(stage, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(spec.origin, stage)
    for name in ("escape.py", "hostile.py", "escape_runner.py", *extra):
        shutil.copy(os.path.join(HERE, name), stage)
    for root, dirs, files in os.walk(stage):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
    return stage, [stage]


@pytest.fixture(scope="module")
def user_results():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to become uid 65534")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs a world-readable {SYSTEM_PYTHON}")
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"{SYSTEM_PYTHON} is {version}, the compiled dependencies are for {sys.version_info[:2]}")
    stage, path = _stage()
    try:
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-I",
             os.path.join(stage, "escape_runner.py"), *path],
            capture_output=True, text=True, timeout=300, cwd=stage)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mode"] == "user"
    return report


@needs_root
@pytest.mark.parametrize("case", escape.selected("user"), ids=lambda c: c.name)
def test_as_unprivileged_user(user_results, case):
    got = user_results["results"][case.name]
    assert got.startswith(user_results["expected"][case.name]), got


@needs_root
def test_unprivileged_main_cannot_read_a_compartments_memory(user_results):
    """As root, main can read any instance's memory (the root-run twin shows
    it, and the threat model says so). Run by a normal user, instances are
    non-dumpable, so not even main, with the same uid, can."""
    got = user_results["results"]["twin: main reads the safebox's memory through /proc/<pid>/mem"]
    assert got.startswith("denied:"), got
