"""Starting the zygote (``pycompart.supervisor.zygote``), cheaply.

This module imports next to nothing, so that ``pycompart run`` can start the
zygote first thing (``prelaunch``) and let it come up while main imports the
rest of pycompart and the program; the monitor then takes that zygote
(``take_prelaunched``) instead of starting one.
"""

from __future__ import annotations

import os
import sys
import threading
import time

# Neither ``socket`` nor ``subprocess`` (nor ``typing``): together some 10 ms
# that the zygote's start would wait for.

#: (``PYCOMPART_FASTPATHS``: instances take the fast paths main takes.)
ZYGOTE_ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYCOMPART_FASTPATHS")

_prelaunched: tuple[ZygoteProcess, object] | None = None


class ZygoteProcess:
    """The zygote's process, as the monitor uses it: ``subprocess.Popen``'s
    ``pid``, ``poll``, ``wait`` and ``kill``, on our own child."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: gone all the same
                pid, status = self.pid, 0
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status; ``TimeoutError`` if it is still running after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the zygote (pid {self.pid}) is still running")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:  # not reaped: the pid is still ours
            import signal

            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def prelaunch() -> None:
    """Start a zygote now, for the first monitor of this process to take.
    Best effort: if it cannot start, the monitor tries again and says why."""
    global _prelaunched
    if _prelaunched is None and threading.current_thread() is threading.main_thread():
        try:
            _prelaunched = launch()
        except OSError:
            _prelaunched = None


def take_prelaunched() -> tuple[ZygoteProcess, object] | None:
    """The zygote ``prelaunch`` started, if it is still there (once)."""
    global _prelaunched
    found, _prelaunched = _prelaunched, None
    if found is not None and found[0].poll() is not None:
        found[1].close()  # type: ignore[attr-defined]
        return None
    return found


def launch(python: str | None = None) -> tuple[ZygoteProcess, object]:
    """Start a zygote from ``python`` (default: this interpreter): its
    process and main's end of its control socket (a ``socket.socket``).
    Must be called from the thread that will outlive it: PDEATHSIG is bound
    to the parent *thread*."""
    import _socket

    python = python or sys.executable
    ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
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
    fd = theirs.fileno()
    # What subprocess's close_fds does: the zygote inherits its control
    # socket and nothing else main may have made inheritable; stdin is
    # /dev/null, and it leads a session of its own. The socket stays
    # close-on-exec in main (another thread's exec must not get it): the
    # child gets a copy (dup2 clears the flag on the copy only). What
    # another thread makes inheritable after this listing, the zygote closes
    # itself (``zygote.main``).
    target = 3 if fd != 3 else 4
    actions: list[tuple[object, ...]] = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    for name in os.listdir("/proc/self/fd"):
        other = int(name)
        if other > 2 and other != fd:
            try:
                inherited = os.get_inheritable(other)
            except OSError:  # the listing's own descriptor, closed by now
                continue
            if inherited:
                actions.append((os.POSIX_SPAWN_CLOSE, other))
    actions.append((os.POSIX_SPAWN_DUP2, fd, target))
    spawn = os.posix_spawn if os.sep in python else os.posix_spawnp
    try:
        pid = spawn(python, [python, "-I", "-c", code, str(target), *bound], env,
                    file_actions=actions, setsid=True)
    except OSError as exc:
        ours.close()
        from ..kernel.host import runtime_problems

        problems = runtime_problems(python, runtime)
        raise OSError(exc.errno, "; ".join(problems) if problems else f"{python}: {exc}") from None
    finally:
        theirs.close()
    import socket  # now: the zygote is starting meanwhile

    return ZygoteProcess(pid), socket.socket(fileno=ours.detach())


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


