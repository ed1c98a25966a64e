"""beep, privilege-separated as in the seeds: only compartment
``Privileged`` may open the speaker device, and it does nothing else.

    python examples/beep/beep.py [-f HZ] [-l MS] [--device PATH]

Opens the device (Linux evdev; default the PC speaker's event device),
writes one ``struct input_event`` (type EV_SND, code SND_TONE, value HZ),
waits MS milliseconds, and writes a second one with value 0. Everything
else runs with no filesystem access: ``main`` locks itself down before the
first call (``[compartments.main.privileges]``), and ``Privileged`` may
write the device and nothing more. Defaults: -f 440 -l 200.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DEVICE = "/dev/input/by-path/platform-pcspkr-event-spkr"

sys.path.insert(0, os.path.dirname(HERE))
from _venv import ensure_pycompart  # noqa: E402

ensure_pycompart()
import pycompart  # noqa: E402

sys.path.insert(0, HERE)
import speaker  # noqa: E402,F401  (main reads its annotations: the calls' contracts)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="beep.py", description="beep the PC speaker (evdev)")
    parser.add_argument("-f", dest="hz", type=int, default=440, help="frequency in Hz (default 440)")
    parser.add_argument("-l", dest="ms", type=int, default=200, help="length in ms (default 200)")
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=f"evdev device (default {DEFAULT_DEVICE})")
    args = parser.parse_args(argv)
    if not 0 < args.hz < 2**31 or not 0 <= args.ms <= 3_600_000:
        parser.error("-f must be a positive frequency and -l a length from 0 to 3600000 ms")
    return args


def app_for(device: str) -> pycompart.App:
    device = os.path.abspath(device)
    privileged: dict = {"filesystem": {"write": [device]}, "network": "none"}
    gid = os.stat(device).st_gid if os.path.exists(device) else 0
    if os.geteuid() == 0 and gid != 0:
        # As root, Privileged would have a uid and group of its own: give
        # it the device's group (``input`` for evdev), which is how the
        # device is shared, and never root's.
        privileged["user"], privileged["group"] = "nobody", gid
    return pycompart.App({"app": {"name": "beep"}, "compartments": {
        "Privileged": {
            "functions": ["speaker:open_device", "speaker:tone", "speaker:close_device"],
            "privileges": privileged,
        },
        # main: no files at all once the app runs (its imports are done).
        "main": {"privileges": {"filesystem": {"read": [], "write": []}, "network": "none"}},
    }})


def main(argv: list[str]) -> int:
    args = parse(argv)
    app = app_for(args.device)
    app.start(confine_main=True)
    try:
        open_device = app.function("speaker:open_device")
        tone = app.function("speaker:tone")
        close_device = app.function("speaker:close_device")
        try:
            handle = open_device(os.path.abspath(args.device))
        except OSError as exc:
            print(f"beep.py: cannot open {args.device}: {exc.strerror}", file=sys.stderr)
            return 1
        try:
            tone(handle, args.hz)
            time.sleep(args.ms / 1000)
            tone(handle, 0)
        finally:
            close_device(handle)
    finally:
        app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
