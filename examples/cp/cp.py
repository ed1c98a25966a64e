"""Copy a regular file like ``cp`` (contents and permission bits), the
seeds' privilege-separated ``cp``:

    python examples/cp/cp.py SRC DST      # DST may be a directory

The command line is parsed in a compartment with no filesystem access; main
opens SRC and DST and hands the two descriptors to a copying compartment
that can open nothing itself. A missing SRC or an unwritable DST exits with
status 1 and a message naming the path.
"""

from __future__ import annotations

import os
import stat
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

sys.path.insert(0, os.path.dirname(HERE))
from _venv import ensure_pycompart  # noqa: E402

ensure_pycompart()
import pycompart  # noqa: E402

sys.path.insert(0, HERE)


def fail(message: str) -> int:
    print(f"cp.py: {message}", file=sys.stderr)
    return 1


def open_pair(src: str, dst: str) -> tuple[int, int, int]:
    """main's part, the only one that opens files: (src fd, dst fd, mode)."""
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise RuntimeError(f"cannot open {src!r}: {exc.strerror}") from None
    try:
        info = os.fstat(src_fd)
        if not stat.S_ISREG(info.st_mode):
            raise RuntimeError(f"{src!r} is not a regular file")
        if os.path.isdir(dst):
            dst = os.path.join(dst, os.path.basename(os.path.normpath(src)))
        try:
            if os.path.samefile(src, dst):
                raise RuntimeError(f"{src!r} and {dst!r} are the same file")
        except FileNotFoundError:
            pass
        mode = stat.S_IMODE(info.st_mode) & 0o777  # not setuid, setgid or sticky (as cp)
        try:
            dst_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOCTTY,
                             mode)
        except OSError as exc:
            raise RuntimeError(f"cannot create {dst!r}: {exc.strerror}") from None
        return src_fd, dst_fd, mode
    except BaseException:
        os.close(src_fd)
        raise


def main(argv: list[str]) -> int:
    app = pycompart.App.from_spec(os.path.join(HERE, "app.toml"))
    with app:
        cpargs = app.compartment("args").module("cpargs")
        try:
            src, dst = cpargs.parse(argv)
        except cpargs.UsageError as exc:
            print(exc, file=sys.stderr)
            return 1
        try:
            src_fd, dst_fd, mode = open_pair(src, dst)
        except RuntimeError as exc:
            return fail(str(exc))
        cpcopy = app.compartment("copier").module("cpcopy")
        keep = os.dup(dst_fd)  # main sets the mode once the copy is done
        try:
            cpcopy.copy(pycompart.Fd(src_fd), pycompart.Fd(dst_fd))
            os.fchmod(keep, mode)  # the permission bits, whatever the umask took
        except (pycompart.CompartmentError, OSError) as exc:
            return fail(f"copying {src!r} to {dst!r} failed: {exc}")
        finally:
            os.close(keep)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
