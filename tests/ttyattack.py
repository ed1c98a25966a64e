"""Hostile code that goes for main's terminal and stdout through the
inherited descriptors 0, 1 and 2 (red team 0.3, finding 3). Runs inside a
compartment; each attempt reports what the kernel said."""

import errno
import fcntl
import os
import termios


def _try(name, fn):
    try:
        fn()
        return f"{name}:ok"
    except (OSError, termios.error) as exc:
        code = exc.errno if isinstance(exc, OSError) else exc.args[0]
        return f"{name}:{errno.errorcode.get(code, code)}"


def attack() -> list[str]:
    out = []
    for fd in (0, 1, 2):
        def echo_off(fd=fd):
            attrs = termios.tcgetattr(fd)
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        out.append(_try(f"echo-off-{fd}", echo_off))
        out.append(_try(f"tcflow-{fd}", lambda fd=fd: termios.tcflow(fd, termios.TCOOFF)))
        out.append(_try(f"exclusive-{fd}", lambda fd=fd: fcntl.ioctl(fd, termios.TIOCEXCL)))
    out.append(_try("nonblock-1", lambda: os.set_blocking(1, False)))
    out.append(_try("truncate-1", lambda: os.ftruncate(1, 0)))
    out.append(_try("fallocate-1", lambda: os.posix_fallocate(1, 0, 1 << 20)))
    read = os.read(0, 100) if True else b""
    out.append(f"stdin:{read!r}")
    return out


def shout(n: int) -> int:
    for i in range(n):
        print(f"box line {i}")
    return n


def mixed() -> str:
    import sys

    print("box out 1")
    print("box err 1", file=sys.stderr)
    print("box out 2")
    return "done"
