"""Placed in a compartment by tests/test_hardening.py: hands main's
iterators back with "read-ahead" items of its own making (``EXT_PUSHBACK``),
in hand-made requests nested in main's call."""
from pycompart.compartment.objects import MainRef
from pycompart.transport.channel import serving
from pycompart.wire import refs


def _push_back(obj, item):  # type: ignore[no-untyped-def]
    server = MainRef.call_out.__self__
    handle = object.__getattribute__(obj, "_pc_handle")
    payload = refs._encoder.encode([refs.Ext(refs.EXT_PUSHBACK, refs._encoder.encode([handle, [item]])),
                                    "name"])
    reply = server.channel.request("@getattr", payload, None, serving(server.channel))
    return reply.error.message if reply.__class__.__name__ == "Err" else "ok"


def flood(obj, messages, mib):  # type: ignore[no-untyped-def]
    """What main answered to each of ``messages`` pushbacks of ``mib`` MiB."""
    item = b"A" * (mib << 20)
    return [_push_back(obj, item) for _ in range(messages)]


def keep(obj):  # type: ignore[no-untyped-def]
    global KEPT
    KEPT = obj
