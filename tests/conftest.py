import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def _runtime_dir() -> bytes:
    """Where the pycompart under test lives: its zygotes name it on their
    command line (``launcher.runtime_path``), another checkout's do not."""
    import importlib.util

    spec = importlib.util.find_spec("pycompart")
    return repr(os.path.dirname(os.path.dirname(spec.origin))).encode()


_SRC = _runtime_dir()


def _pycompart_processes() -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"pycompart.supervisor.zygote" in cmd and _SRC in cmd:
            found.add(int(name))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """Every zygote and instance (they share the zygote's command line) that
    the suite started must be gone when it ends."""
    before = _pycompart_processes()
    yield
    import time

    deadline = time.monotonic() + 5
    while True:
        left = _pycompart_processes() - before
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"processes left behind: {sorted(left)}"


@pytest.fixture
def make_app():
    """Build Apps that are always stopped at the end of the test."""
    import pycompart

    apps = []

    def make(spec=None, **kw):
        app = pycompart.App(spec or {"compartments": {"box": {}}}, **kw)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.stop()
