"""Transport: bytes and descriptors on a stream, and the channel on top.

Used on both sides of the trust boundary. ``streams`` holds the byte
transports (pipes for calls, an AF_UNIX socket where descriptors must
travel); ``channel`` is one end of an edge: the leader/follower ``Channel``
that many threads call through at once, with no reader thread, and that
runs calls nested in its own (callbacks) on the thread that waits for them.

May import: ``pycompart.wire`` and ``pycompart.errors``. A later remote
(SSH) transport and a native fast path live here too, behind the same
interface.
"""
