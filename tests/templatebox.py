"""Placed in per-call compartments by tests/test_template.py: what an
instance forked from its compartment's template may and may not do."""

import os
import random
import signal
import time

#: Made once, when the module is imported (in the template, so the same in
#: every instance of it).
AT_IMPORT = os.urandom(8).hex()


def parent() -> int:
    """The instance's parent, in the app's pid namespace (the zygote is 1)."""
    return os.getppid()


def host_pid() -> int:
    return int(os.readlink("/proc/self"))


def draws() -> list:
    return [random.random(), os.urandom(8).hex(), AT_IMPORT]


def try_fork() -> str:
    try:
        pid = os.fork()
    except PermissionError:
        return "refused"
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return "forked"


def template_calls() -> dict:
    """What the template's filter allows for its children, tried here:
    Landlock's calls, its parent-death ``prctl``, ``pidfd_open``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    out = {}
    for name, number, args in (("landlock_create_ruleset", 444, (0, 0, 1)),  # (its ABI version)
                               ("pidfd_open", 434, (os.getpid(), 0, 0))):
        got = libc.syscall(ctypes.c_long(number), ctypes.c_long(args[0]), ctypes.c_long(args[1]),
                           ctypes.c_long(args[2]))
        out[name] = "refused" if got < 0 and ctypes.get_errno() == 1 else f"allowed ({got})"
    got = libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    out["prctl PR_SET_PDEATHSIG"] = "refused" if got < 0 and ctypes.get_errno() == 1 else "allowed"
    return out


def read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.read(64)
    except PermissionError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__
    return "read"


def signal_pid(pid: int) -> str:
    """Signal 0 (does it exist, may we?), then SIGKILL, to ``pid`` in the
    app's pid namespace."""
    try:
        os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except PermissionError:
        return "refused"
    except ProcessLookupError:
        return "no such process"
    return "killed"


def own_pid() -> int:
    return os.getpid()


def sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def sleep_reporting(report, seconds: float) -> str:
    """Tell main our pid (a callback), then sleep: a sibling to aim at."""
    report(os.getpid())
    time.sleep(seconds)
    return "slept"


def how_served() -> list:
    """Whether this instance's server was built before its channel came,
    and how many pipes it holds (its channel's two, its output's two)."""
    from pycompart.compartment.objects import MainRef

    pipes = sum(os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
                for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))
    return [MainRef.call_out.__self__.built_ahead, pipes]
