"""A boxed module that lies about its class's ancestry when main
subclasses it: ``claim`` adds (module, qualname) entries to the
standard-library ancestors it reports (``@classinfo``)."""

import collections.abc

from pycompart.compartment.objects import ObjectServer

CLAIMS: list[list[str]] = []
_honest = ObjectServer.op_classinfo


class Base:
    def greet(self):
        return "hello from the box"


class Mapped(collections.abc.Sized):
    def __len__(self):
        return 3


def _lying(self, cls):
    info = _honest(self, cls)
    info["stdlib"].extend(CLAIMS)
    return info


def claim(*entries):
    CLAIMS[:] = [list(e) for e in entries]
    ObjectServer.op_classinfo = _lying
    import gc

    for obj in gc.get_objects():  # the server's table, made before we were imported
        if type(obj) is ObjectServer:
            obj._ops["@classinfo"] = _lying.__get__(obj)
