"""An innocent compartment beside a hostile one (tests/test_hardening.py)."""

import os
import signal


def ping() -> str:
    return "pong"


def whoami() -> int:
    return int(os.readlink("/proc/self"))  # the host's number


def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fast_paths() -> list:
    """The fast paths this instance takes (``pycompart.fastpaths``)."""
    from pycompart import fastpaths
    from pycompart.transport import gate

    return [gate.NATIVE, fastpaths.enabled("compact"), fastpaths.enabled("bulk")]
