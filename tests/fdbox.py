import os, socket
def read_fd(fd):
    return os.read(fd.fileno(), 100)
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
