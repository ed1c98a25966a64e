"""Starting the zygote (``pycompart.supervisor.zygote``), cheaply.

This module imports next to nothing, so that ``pycompart run`` can start the
zygote first thing (``prelaunch``) and let it come up while main imports the
rest of pycompart and the program; the monitor then takes that zygote
(``take_prelaunched``) instead of starting one.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any

ZYGOTE_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")

_prelaunched: tuple[Any, socket.socket] | None = None


def prelaunch() -> None:
    """Start a zygote now, for the first monitor of this process to take.
    Best effort: if it cannot start, the monitor tries again and says why."""
    global _prelaunched
    if _prelaunched is None and threading.current_thread() is threading.main_thread():
        try:
            _prelaunched = launch()
        except OSError:
            _prelaunched = None


def take_prelaunched() -> tuple[Any, socket.socket] | None:
    """The zygote ``prelaunch`` started, if it is still there (once)."""
    global _prelaunched
    found, _prelaunched = _prelaunched, None
    if found is not None and found[0].poll() is not None:
        found[1].close()
        return None
    return found


def launch(python: str | None = None) -> tuple[Any, socket.socket]:
    """Start a zygote from ``python`` (default: this interpreter). Must be
    called from the thread that will outlive it: PDEATHSIG is bound to the
    parent *thread*."""
    import subprocess  # here, not at the top: the zygote itself never needs it

    python = python or sys.executable
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {k: os.environ[k] for k in ZYGOTE_ENV_KEEP if k in os.environ}
    # -I: no environment variables, no user site, no script directory. Only
    # the directories holding pycompart and its dependencies are added, so
    # a source checkout or PYTHONPATH install works without importing
    # anything else of main's path.
    runtime = runtime_path()
    # PDEATHSIG is bound to the thread that starts the zygote: arm it only
    # from the main thread (another may end before main does). Either way
    # the zygote ends when main's end of the control socket closes.
    bound = ["bound"] if threading.current_thread() is threading.main_thread() else []
    code = f"import sys; sys.path[:0] = {runtime!r}; import pycompart.supervisor.zygote as z; z.main()"
    try:
        proc = subprocess.Popen(
            [python, "-I", "-c", code, str(theirs.fileno()), *bound],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    except OSError as exc:
        ours.close()
        from ..kernel.host import runtime_problems

        problems = runtime_problems(python, runtime)
        raise OSError(exc.errno, "; ".join(problems) if problems else f"{python}: {exc}") from None
    finally:
        theirs.close()
    return proc, ours


def runtime_path() -> list[str]:
    """The directories holding pycompart and its dependencies: the zygote's
    whole import path."""
    import importlib.util

    dirs: list[str] = []
    for name in ("pycompart", "msgspec", "pyseccomp"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        origin = os.path.dirname(spec.origin)
        parent = os.path.dirname(origin) if spec.submodule_search_locations else origin
        if parent not in dirs:
            dirs.append(parent)
    return dirs


