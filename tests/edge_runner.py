"""Run by tests/test_edges.py as uid 65534 (``setpriv``): edges work for a
user who is not root, with the same refusals. Prints one JSON line."""

import hashlib
import json
import os
import sys
import tempfile

sys.path[:0] = sys.argv[1:]
keydir = tempfile.mkdtemp(prefix="edgekey-")
key = os.path.join(keydir, "key")
with open(key, "wb") as f:
    f.write(b"k3y")
os.environ["EDGEBOX_KEY"] = key

import edgebox  # noqa: E402
import pycompart  # noqa: E402

edgebox.KEY_PATH = key
app = pycompart.App({"compartments": {
    "signer": {"functions": ["edgebox:sign", "edgebox:whoami", "edgebox:crash"],
               "restart_backoff": "10ms",
               "privileges": {"filesystem": {"read": [key]}, "environment": ["EDGEBOX_KEY"]}},
    "web": {"functions": ["edgebox:handle", "edgebox:relay", "edgebox:forge_edge"], "may_call": ["signer"],
            "privileges": {"environment": ["EDGEBOX_KEY"]}},
    "other": {}}})
report = {"uid": os.getuid()}
with app:
    report["handle"] = app.function("edgebox:handle")(b"x")
    report["expected"] = hashlib.sha256(b"k3yx").hexdigest()
    relay = app.function("edgebox:relay")
    first = relay("whoami")
    try:
        relay("crash")
    except pycompart.CompartmentCrashed as exc:
        report["crash"] = type(exc).__name__
    report["restarted"] = relay("whoami") != first
    report["forged"] = app.function("edgebox:forge_edge")("other")
os.remove(key)
os.rmdir(keydir)
print(json.dumps(report))
