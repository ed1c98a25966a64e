"""The main demo: a parser compartment handles hostile input; main survives.

    python examples/hostile_parser/demo.py
"""

from __future__ import annotations

import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pycompart  # noqa: E402
import tinyimg  # noqa: E402,F401  (imported in main only for its annotations)

INPUTS = [
    ("good image", b"TIMG" + struct.pack("<HHBB", 64, 48, 3, 0) + b"\x01\x02\x03" * 10),
    ("not an image", b"GIF89a...."),
    ("crafted pointer (segfault)", b"TIMG" + struct.pack("<HHBB", 1, 1, 1, 0x80) + struct.pack("<Q", 0x10)),
    ("good RLE image", b"TIMG" + struct.pack("<HHBB", 8, 8, 1, 1) + bytes([64, 0xAA])),
    ("crafted RLE (infinite loop)", b"TIMG" + struct.pack("<HHBB", 8, 8, 1, 1) + bytes([0, 0xAA, 4, 1])),
    ("another good image", b"TIMG" + struct.pack("<HHBB", 32, 32, 4, 0) + b"\xff" * 16),
]


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    app = pycompart.App.from_spec(os.path.join(here, "app.toml"))
    ended = []
    app.on_termination(lambda event: ended.append(event))
    parse = app.function("tinyimg:parse")
    with app:
        print(f"main pid {os.getpid()}; parser instance pids {app.instances('parser')}\n")
        for label, data in INPUTS:
            try:
                header = parse(data)
                print(f"  {label:30s} -> {header}")
            except pycompart.CompartmentCrashed as exc:
                print(f"  {label:30s} -> parser crashed: {exc}")
            except pycompart.CallTimeout:
                print(f"  {label:30s} -> parser timed out; the call was cancelled")
            except ValueError as exc:
                print(f"  {label:30s} -> rejected: {exc}")
    crashes = [e for e in ended if e.restarting]
    print(f"\nmain survived; parser instances replaced after a crash: {len(crashes)}")
    for event in ended:
        what = "replaced" if event.restarting else "stopped with the app"
        print(f"  pid {event.pid}: {event.status} ({what})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
