"""Run by tests/test_template.py as uid 65534 (``setpriv``): instances of a
per-call compartment forked from its template, for a user who is not root
(the template in a user namespace of its own). Prints one JSON line."""

import json
import os
import sys
import threading

sys.path[:0] = sys.argv[1:]

import pycompart  # noqa: E402

app = pycompart.App({"compartments": {"box": {"modules": ["templatebox"], "instances": "per-call",
                                              "max_instances": 4, "may_call": ["main"]}}})
app.start(import_hook=True)
try:
    import templatebox as box

    sibling = []
    reported = threading.Event()

    def report(pid):
        sibling.append(pid)
        reported.set()

    slept = []
    t = threading.Thread(target=lambda: slept.append(box.sleep_reporting(report, 1.5)))
    t.start()
    reported.wait(15)
    parent = box.parent()
    out = {
        "uid": os.getuid(),
        "planned": bool(app._runtime.lockdowns["box"].template_bpf),
        "parent": parent,
        "fork": box.try_fork(),
        "own_proc": box.read("/proc/self/status"),
        "template_proc": box.read(f"/proc/{parent}/status"),
        "signal_template": box.signal_pid(parent),
        "signal_sibling": box.signal_pid(sibling[0]) if sibling else "no sibling",
    }
    t.join(20)
    out["slept"] = slept
    print(json.dumps(out))
finally:
    app.stop()
