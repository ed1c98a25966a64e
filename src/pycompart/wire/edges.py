"""The edge control protocol: how an instance asks the monitor for a channel
to another compartment. Sans-IO, both sides.

Calls between compartments go straight over an edge (a unix socketpair the
monitor made); the monitor is not on their path. What does go through the
monitor is the edge's life: an instance whose compartment's ``may_call``
names another compartment holds a *control socket* to the monitor, on which
it may say only these few things:

``Open(seq, callee)``
    "give me a channel to ``callee``". The monitor checks the spec (an
    undeclared edge does not exist: ``Refused``), starts an instance of the
    callee whose only caller is this instance, and once that instance is
    ready answers ``Opened(seq, edge, pid)`` with the caller's end of the
    channel attached (SCM_RIGHTS). ``Refused(seq, message, busy)`` names
    why not; ``busy`` means "at ``max_instances``, try again" (the caller
    retries until its call's deadline).
``Cancel(edge)``
    a call on ``edge`` timed out: interrupt the callee (the monitor sends it
    the cancel signal; the ``Cancel`` frame went over the edge itself).
``Kill(edge)``
    the cancelled call did not yield within ``cancel_grace``: end it.
``Report(...)``
    one call made over an edge, for the audit log (what the *caller* says:
    the monitor is not on the path to see it).

Every message is small: frames are bounded by ``MAX_CONTROL_FRAME`` and an
instance has at most ``MAX_EDGES`` edges open. The monitor reads control
sockets without blocking and treats anything malformed as a protocol
violation of the instance that sent it.
"""

from typing import Union

import msgspec

from .protocol import MessageReader, encode_frame

#: The largest control frame either side accepts.
MAX_CONTROL_FRAME = 4096
#: Edges one instance may have open at once (one per callee for pooled
#: callees; per-call callees open one per call in flight).
MAX_EDGES = 64
#: How deep a chain of edge instances may go (A -> B -> C ...): a cycle in
#: the call graph (A may call B, B may call A) gets fresh instances at each
#: level, so the depth bounds what a recursion across compartments spawns.
MAX_EDGE_DEPTH = 8


class Open(msgspec.Struct, array_like=True, tag=1):
    seq: int
    callee: str


class Opened(msgspec.Struct, array_like=True, tag=2):
    seq: int
    edge: int
    pid: int


class Refused(msgspec.Struct, array_like=True, tag=3):
    seq: int
    message: str
    busy: bool = False


class Cancel(msgspec.Struct, array_like=True, tag=4):
    edge: int


class Kill(msgspec.Struct, array_like=True, tag=5):
    edge: int


class Report(msgspec.Struct, array_like=True, tag=6):
    edge: int
    entrypoint: str
    outcome: str
    duration_ms: float
    bytes_out: int
    bytes_in: int


ToMonitor = Union[Open, Cancel, Kill, Report]
ToInstance = Union[Opened, Refused]

_encoder = msgspec.msgpack.Encoder()
_to_monitor = msgspec.msgpack.Decoder(ToMonitor)
_to_instance = msgspec.msgpack.Decoder(ToInstance)


def encode(msg: object, nfds: int = 0) -> bytes:
    return encode_frame(_encoder.encode(msg), nfds)


def reader(for_monitor: bool) -> MessageReader:
    """A reader of control messages: those an instance sends (the
    monitor's), or the monitor's answers (an instance's)."""
    return MessageReader(_to_monitor if for_monitor else _to_instance, MAX_CONTROL_FRAME)
