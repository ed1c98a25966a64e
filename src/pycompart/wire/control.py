"""The control messages of the processes that start instances.

The monitor and the zygote (``pycompart.supervisor.zygote``) talk over one
control socket; the zygote and a compartment's template
(``pycompart.compartment.template``) over one each. Same framing as calls;
descriptors travel beside a frame, counted in its header.

* monitor -> zygote: ``Spawn`` (+ the instance's descriptors), ``Shutdown``;
* zygote -> monitor: ``Spawned`` (+ a pidfd of the instance), ``Exited``;
* zygote -> template: ``Spawn``, as the monitor sent it;
* template -> zygote: ``TemplateReady`` once it can fork, ``Forked`` for
  each instance, ``Exited`` when one ends (it is their parent).
"""

from typing import Union

import msgspec

from .config import InstanceConfig
from .protocol import encode_frame


class Spawn(msgspec.Struct, array_like=True, tag=10):
    request: int
    config: InstanceConfig
    #: The last descriptor is the instance's edge control socket.
    control: bool = False
    #: The one before that (or the last) is its bulk memory file.
    bulk: bool = False


class Spawned(msgspec.Struct, array_like=True, tag=11):
    request: int
    pid: int
    error: str = ""


class Exited(msgspec.Struct, array_like=True, tag=12):
    """An instance ended: its raw wait status, and what it used (CPU
    milliseconds, peak resident KiB), for the audit log."""

    pid: int
    status: int
    cpu_ms: float = 0.0
    max_rss_kib: int = 0


class Shutdown(msgspec.Struct, array_like=True, tag=13):
    grace: float


class TemplateReady(msgspec.Struct, array_like=True, tag=14):
    """A template imported its compartment's code and locked itself down."""


class Forked(msgspec.Struct, array_like=True, tag=15):
    """A template forked the instance that ``Spawn`` ``request`` asked for
    (or, pid 0, could not: ``error`` says why)."""

    request: int
    pid: int
    error: str = ""


ControlMessage = Union[Spawn, Spawned, Exited, Shutdown, TemplateReady, Forked]
_encoder = msgspec.msgpack.Encoder()
control_decoder = msgspec.msgpack.Decoder(ControlMessage)


def encode_control(msg: object, nfds: int = 0) -> bytes:
    return encode_frame(_encoder.encode(msg), nfds)
