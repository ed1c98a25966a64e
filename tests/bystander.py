"""An innocent compartment beside a hostile one (tests/test_hardening.py)."""

import os
import signal


def ping() -> str:
    return "pong"


def whoami() -> int:
    return int(os.readlink("/proc/self"))  # the host's number


def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
