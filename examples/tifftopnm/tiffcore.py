"""The two compartments of tifftopnm (the seeds' Pitchfork example).

``cmdparse``: the command line, with no filesystem access at all.
``libtiff``: decoding, with Pillow's libtiff-backed TIFF plugin, boxed with
no network and no filesystem access: it reads only the descriptor main
hands it. It returns plain pixels (mode, size, bytes), which main checks
and writes out as PNM.
"""

from __future__ import annotations

import os
import warnings

import pycompart

USAGE = "usage: tifftopnm.py IN.tif > OUT.pnm"
#: Pixels a decoded image may have: beyond, a decompression bomb.
MAX_PIXELS = 40_000_000
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def parse_args(argv: list[str]) -> str:
    """The input file of ``tifftopnm.py IN.tif`` (``ValueError``: bad use)."""
    if len(argv) != 1 or not argv[0] or argv[0].startswith("-"):
        raise ValueError(USAGE)
    return argv[0]


def pnm_mode(mode: str) -> str:
    """PGM for greyscale images, PPM for the rest (as netpbm's tifftopnm)."""
    return "L" if mode in GREY_MODES else "RGB"


def decode_fd(fd: pycompart.Fd) -> tuple[str, int, int, bytes]:
    """Decode the TIFF behind ``fd``: (PNM mode, width, height, pixels)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with fd, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with os.fdopen(os.dup(fd.fileno()), "rb") as f:
            image = Image.open(f, formats=["TIFF"])
            image.load()
            converted = image.convert(pnm_mode(image.mode))
            return converted.mode, converted.width, converted.height, converted.tobytes()


def pnm_bytes(mode: str, width: int, height: int, pixels: bytes) -> bytes:
    """The PNM file Pillow's own PPM encoder writes for these pixels."""
    magic = b"P5" if mode == "L" else b"P6"
    return magic + b"\n%d %d\n255\n" % (width, height) + pixels


def check_pixels(mode: object, width: object, height: object, pixels: object) -> None:
    """What main takes from the decoder: exactly an image, nothing else."""
    if mode not in ("L", "RGB") or type(width) is not int or type(height) is not int \
            or not 0 < width <= 1 << 20 or not 0 < height <= 1 << 20 or type(pixels) is not bytes \
            or len(pixels) != width * height * (1 if mode == "L" else 3):
        raise ValueError("the decoder returned something that is not an image")
