"""tifftopnm, privilege-separated as in the seeds (Pitchfork's example):

    python examples/tifftopnm/tifftopnm.py IN.tif > OUT.pnm

Command-line parsing runs in compartment ``cmdparse`` (no filesystem
access), decoding in compartment ``libtiff`` (Pillow with libtiff; no
network, no filesystem: it reads only the descriptor main hands it), and
the output is written by ``main``. Written with the library API, as the
seed's ``compart_register_fn``/``compart_call_fn`` version is; the same
program with segment annotations is ``tifftopnm_segments.py``.

A malformed or hostile TIFF (truncated, a decompression bomb, a decoder
that crashes) makes it print an error and exit with status 1.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from _venv import ensure_pycompart  # noqa: E402

ensure_pycompart()
import pycompart  # noqa: E402

sys.path.insert(0, HERE)
import tiffcore  # noqa: E402  (main reads the entrypoints' annotations, and writes PNM)

SPEC = {"app": {"name": "tifftopnm"}, "compartments": {
    "cmdparse": {"functions": ["tiffcore:parse_args"], "privileges": {"network": "none"}},
    "libtiff": {"functions": ["tiffcore:decode_fd"], "descriptors": True, "call_timeout": "30s",
                "restart": "never",
                "privileges": {"network": "none", "memory": "1GiB", "cpu_seconds": 30}},
}}


def main(argv: list[str]) -> int:
    with pycompart.App(SPEC) as app:
        try:
            path = app.function("tiffcore:parse_args")(argv)  # compart_call_fn("cmdparse", ...)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
        try:
            fd = pycompart.Fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            print(f"tifftopnm.py: cannot open {path}: {exc.strerror}", file=sys.stderr)
            return 1
        try:
            with fd:
                image = app.function("tiffcore:decode_fd")(fd)  # compart_call_fn("libtiff", ...)
            tiffcore.check_pixels(*image)
        except Exception as exc:  # the decoder's error, its crash, its timeout, or a lie
            print(f"tifftopnm.py: cannot convert {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    sys.stdout.buffer.write(tiffcore.pnm_bytes(*image))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
