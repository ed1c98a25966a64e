"""tifftopnm with Pitchfork-style annotations: the same program as
``tifftopnm.py``, written as one process with two blocks marked for
compartments. Unrewritten it runs in one process; rewritten it runs
compartmentalized:

    python examples/tifftopnm/tifftopnm_segments.py IN.tif > OUT.pnm          # one process
    pycompart run examples/tifftopnm/segments.toml -- \\
        examples/tifftopnm/tifftopnm_segments.py IN.tif > OUT.pnm              # rewritten on the fly
    pycompart rewrite examples/tifftopnm/tifftopnm_segments.py --out DIR       # or ahead of time
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
try:  # (in the checkout: a Python without pycompart re-runs with .venv's)
    sys.path.insert(0, os.path.dirname(HERE))
    from _venv import ensure_pycompart  # noqa: E402
except ImportError:  # a copy elsewhere (pycompart rewrite --out DIR)
    pass
else:
    ensure_pycompart()
finally:
    del sys.path[0]
import pycompart  # noqa: E402

sys.path.insert(0, HERE)
import tiffcore  # noqa: E402


def convert(argv: list[str]) -> bytes:
    with pycompart.segment("cmdparse"):
        path = tiffcore.parse_args(argv)
    fd = pycompart.Fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    with pycompart.segment("libtiff"):
        mode, width, height, pixels = tiffcore.decode_fd(fd)
    tiffcore.check_pixels(mode, width, height, pixels)
    return tiffcore.pnm_bytes(mode, width, height, pixels)


def main(argv: list[str]) -> int:
    try:
        data = convert(argv)
    except ValueError as exc:
        if str(exc) == tiffcore.USAGE:
            print(tiffcore.USAGE.replace("tifftopnm.py", "tifftopnm_segments.py"), file=sys.stderr)
            return 2
        print(f"tifftopnm_segments.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the decoder's error, its crash, a file that cannot be opened
        print(f"tifftopnm_segments.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
