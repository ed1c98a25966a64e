import os, socket
def read_fd(fd):
    return os.read(fd.fileno(), 100)
def pread_fd(fd):
    return os.pread(fd.fileno(), 100, 0)
def read_file(f):
    return f.read(), type(f).__name__
def open_itself(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        return f"refused: {type(exc).__name__}"
def serve_one(sock):
    conn, _ = sock.accept()
    with conn:
        conn.sendall(conn.recv(100).upper())
    return "served"
def echo_socket(conn):
    data = conn.recv(100)
    conn.sendall(data[::-1])
    conn.close()
    return len(data)
def make_pipe():
    r, w = os.pipe()
    os.write(w, b"from the box")
    os.close(w)
    from pycompart import Fd
    return Fd(r)


def leak_check(n):
    """How many descriptors this instance has open."""
    return len(os.listdir("/proc/self/fd"))


def forge_descriptor(fn, index=0):
    """Call main's fn with a value naming a descriptor that did not come."""
    from pycompart.compartment.objects import Callback
    from pycompart.wire import refs

    server = Callback.call_out.__self__
    ext = refs.Ext(refs.EXT_FD, refs._encoder.encode([index, "fd", []]))
    payload = refs._encoder.encode([refs.yours_ext(fn._pc_handle), [ext], {}])
    reply = server.channel.request("@call", payload, None, server.active[-1])
    return reply.__class__.__name__, getattr(getattr(reply, "error", None), "type_name", None)


def unnamed_fds(fn):
    """Call main's fn, sending it descriptors no value names."""
    from pycompart.compartment.objects import Callback
    from pycompart.wire import refs
    from pycompart.transport.channel import serving

    server = Callback.call_out.__self__
    r, w = os.pipe()
    payload = refs._encoder.encode([refs.yours_ext(fn._pc_handle), [], {}])
    reply = server.channel.request("@call", payload, None, server.active[-1], False, [r, w])
    return reply.__class__.__name__  # (the channel closed r and w once sent)


# -- red team 0.5: descriptor floods, forged kinds ------------------------------------

def _raw(frames):
    """Write frames (bytes, fds) on our channel to main by hand."""
    import array
    import socket as _socket

    from pycompart.compartment.objects import Callback

    channel = Callback.call_out.__self__.channel
    sock = channel.transport.sock
    with channel.send_lock():
        for data, fds in frames:
            anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            sock.sendmsg([data], anc)


def flood(kind, n, per=16):
    """Frames main must not keep descriptors for: Releases that claim them,
    frames that claim none, top-level calls main refuses."""
    from pycompart.wire.protocol import HEADER, Connection

    r, w = os.pipe()
    frames = []
    if kind == "release_claiming":
        frame = Connection.send_release([])
        frame = HEADER.pack(len(frame) - 8, per, 0) + frame[8:]
        frames = [(frame, [r] * per) for _ in range(n)]
    elif kind == "unclaimed":
        frames = [(Connection.send_release([]), [r] * per) for _ in range(n)]
    elif kind == "toplevel":
        conn = Connection(1 << 20)
        conn._ids = iter(range(10**6, 10**6 + n))
        frames = [(conn.send_call("@call", b"\x90", per, 0)[1], [r] * per) for _ in range(n)]
    _raw(frames)
    os.close(r)
    os.close(w)
    return n * per


def forged_socket_kind(fn):
    """A value claiming a socket of an impossible family, with a descriptor."""
    import socket as _socket

    from pycompart.compartment.objects import Callback
    from pycompart.transport.channel import serving
    from pycompart.wire import refs

    server = Callback.call_out.__self__
    a, b = _socket.socketpair()
    ext = refs.Ext(refs.EXT_FD, refs._encoder.encode([0, "socket", [2**40, 1, 0]]))
    payload = refs._encoder.encode([refs.yours_ext(fn._pc_handle), [ext], {}])
    errors = set()
    for _ in range(50):
        reply = server.channel.request("@call", payload, None,
                                       serving(server.channel) or server.active[-1], False,
                                       [os.dup(a.fileno())])
        errors.add(getattr(getattr(reply, "error", None), "type_name", "ok"))
    return sorted(errors)


def fast_open_through(listener, port):
    """Turn a handed listener into an unconnected socket and try a TCP Fast
    Open send (a connect without connect())."""
    import socket as _socket

    out = []
    for step in (lambda: listener.connect(("127.0.0.1", port)),
                 lambda: listener.shutdown(_socket.SHUT_RD),
                 lambda: listener.sendto(b"x", _socket.MSG_FASTOPEN, ("127.0.0.1", port))):
        try:
            step()
            out.append("ok")
        except OSError as exc:
            out.append(errno_name(exc))
    return out


def errno_name(exc):
    import errno

    return errno.errorcode.get(exc.errno, str(exc.errno))


def too_big_with_fd(size):
    """A reply too big to send, holding a descriptor: it becomes an error."""
    from pycompart import Fd

    r, w = os.pipe()
    os.write(w, b"stale")
    os.close(w)
    return Fd(r), b"x" * size
