"""Descriptors as values (``descriptors = true``): files, sockets, pipe ends
and ``pycompart.Fd`` cross with SCM_RIGHTS. A compartment with no filesystem
and no network privilege uses exactly what it was handed, and nothing more."""

import os
import socket
import sys
import threading

import pytest

import pycompart


@pytest.fixture
def fdbox(make_app, tmp_path):
    app = make_app({"compartments": {"box": {"modules": ["fdbox"], "descriptors": True,
                                             "may_call": ["main"]}}})
    app.start(import_hook=True)
    import fdbox

    yield fdbox
    del sys.modules["fdbox"]


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("the secret")
    path.chmod(0o600)
    return str(path)


def test_a_compartment_reads_the_file_it_was_handed_but_cannot_open_it(fdbox, secret):
    assert fdbox.open_itself(secret).startswith("refused: PermissionError")
    with pycompart.Fd(os.open(secret, os.O_RDONLY)) as fd:  # an Fd owns its descriptor
        assert fdbox.read_fd(fd) == b"the secret"
    with open(secret) as f:
        assert fdbox.read_file(f) == ("the secret", "TextIOWrapper")  # the same kind of object


def test_a_compartment_serves_the_socket_it_was_handed_but_cannot_connect(fdbox):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    got = []

    def client():
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"hello")
            got.append(c.recv(100))
    t = threading.Thread(target=client)
    t.start()
    try:
        assert fdbox.serve_one(server) == "served"  # accept() on what it was given
    finally:
        t.join(10)
        server.close()
    assert got == [b"HELLO"]
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"abc")
        assert fdbox.echo_socket(a) == 3 and b.recv(10) == b"cba"


def test_a_returned_descriptor_is_mains_own(fdbox):
    fd = fdbox.make_pipe()
    assert isinstance(fd, pycompart.Fd)
    with fd:
        assert os.read(fd.fileno(), 100) == b"from the box"


def test_no_descriptor_leaks_on_either_side(fdbox, secret):
    def count():
        return len(os.listdir("/proc/self/fd"))
    with open(secret) as f:
        fdbox.read_file(f)
    before, box_before = count(), fdbox.leak_check(0)
    for _ in range(50):
        with open(secret) as f:
            fdbox.read_file(f)
        fdbox.make_pipe().close()
    assert count() == before
    assert fdbox.leak_check(0) == box_before


def test_descriptors_a_value_does_not_name_are_closed_and_forged_names_refused(fdbox):
    before = len(os.listdir("/proc/self/fd"))
    assert fdbox.unnamed_fds(lambda: None) == "Ok"
    assert len(os.listdir("/proc/self/fd")) == before  # main closed what nothing named
    # A value naming a descriptor that never came: refused, main unharmed.
    kind, error = fdbox.forge_descriptor(lambda fd: None)
    assert kind == "Err" and error.endswith("ProtocolError")
    assert fdbox.leak_check(0) > 0


def test_a_pipe_channel_refuses_descriptors_clearly(make_app):
    app = make_app({"compartments": {"box": {"modules": ["fdbox"]}}})
    app.start(import_hook=True)
    import fdbox

    try:
        r, w = os.pipe()
        os.close(w)
        with pytest.raises(TypeError, match="descriptors = true"):
            fdbox.read_fd(pycompart.Fd(r))
        with pytest.raises(TypeError, match="descriptors = true"):
            fdbox.make_pipe()  # the box's Fd cannot come back either
    finally:
        del sys.modules["fdbox"]


def test_typed_entrypoints_take_and_return_descriptors(make_app, secret):
    import fdtyped

    app = make_app({"compartments": {"typed": {"descriptors": True}}})
    read_all = app.entrypoint("typed")(fdtyped.read_all)
    pair_end = app.entrypoint("typed")(fdtyped.pair_end)
    with app:
        assert read_all(pycompart.Fd(os.open(secret, os.O_RDONLY))) == b"the secret"
        sock = pair_end()
        assert isinstance(sock, socket.socket)
        with sock:
            assert sock.recv(100) == b"from a typed entrypoint"
        with pytest.raises(TypeError, match="arguments do not match"):
            read_all(b"not an fd")


def test_typed_entrypoints_without_descriptors_refuse_them(make_app, secret):
    import fdtyped

    app = make_app({"compartments": {"typed": {}}})
    read_all = app.entrypoint("typed")(fdtyped.read_all)
    with app, pycompart.Fd(os.open(secret, os.O_RDONLY)) as fd:
        with pytest.raises(TypeError, match="descriptors = true"):
            read_all(fd)


# -- red team 0.5 ------------------------------------------------------------------------

def _main_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", ["release_claiming", "unclaimed", "toplevel"])
def test_descriptors_on_frames_that_carry_no_values_are_never_kept(fdbox, kind):
    """0.5 before the fix: Releases claiming descriptors leaked them for
    good (main ran out of descriptors, its monitor thread died); frames
    claiming none piled them up; refused calls kept 64 each."""
    before = _main_fds()
    try:
        fdbox.flood(kind, 200)
    except pycompart.CompartmentError:
        pass  # main broke the channel: a protocol violation
    assert _main_fds() <= before + 2
    with open(os.devnull) as f:  # main can still open files
        assert f.fileno() > 0


def test_a_forged_socket_kind_neither_leaks_nor_breaks_main(fdbox):
    before = _main_fds()
    # The kernel says what the descriptor is (a unix stream socket here), not
    # the claim: the value arrives as that, or is refused; nothing leaks.
    assert fdbox.forged_socket_kind(lambda x: None) in (["ok"], ["pycompart.errors.ProtocolError"])
    assert _main_fds() <= before + 2  # 0.5 before the fix: one descriptor leaked per call


def test_a_handed_listener_cannot_be_made_to_connect(fdbox):
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(1)
    listener = socket.create_server(("127.0.0.1", 0))
    with target, listener:
        outcome = fdbox.fast_open_through(listener, target.getsockname()[1])
        assert outcome[0] == "EPERM" and outcome[2] == "EPERM", outcome  # no connect, no Fast Open
        with pytest.raises(OSError):
            target.accept()  # nothing reached it


def test_datagram_sockets_do_not_cross(fdbox):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with u:
        u.connect(("127.0.0.1", 9))
        with pytest.raises(TypeError, match="only stream sockets"):
            fdbox.echo_socket(u)  # sendto/sendmsg on it could name any address


def test_a_reply_that_became_an_error_sends_no_descriptor(make_app):
    """A reply too big to send turns into an error that names no descriptor:
    the ones its value held must not ride along (the next reply's
    descriptor would be taken for them)."""
    app = make_app({"app": {"max_message_size": "256KiB"},
                    "compartments": {"box": {"modules": ["fdbox"], "descriptors": True}}})
    app.start(import_hook=True)
    import fdbox

    try:
        with pytest.raises(pycompart.ProtocolError, match="exceeds"):
            fdbox.too_big_with_fd(400_000)
        with fdbox.make_pipe() as fd:
            assert os.read(fd.fileno(), 100) == b"from the box"
    finally:
        del sys.modules["fdbox"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_at_every_moment_of_a_call_with_descriptors_leaves_the_channel_whole(make_app, secret):
    """A Ctrl-C at each moment in turn of a call that hands a descriptor
    over (``interrupts``): nothing is left taken, no descriptor of main's
    leaks, and the next call works."""
    import interrupts

    app = make_app({"compartments": {"box": {"modules": ["fdbox"], "descriptors": True,
                                             "may_call": ["main"], "restart_backoff": "1ms",
                                             "restart_window": "1ms", "max_restarts": 10000}}})
    app.start(import_hook=True)
    try:
        import fdbox

        fd = pycompart.Fd(os.open(secret, os.O_RDONLY))

        def once() -> bytes:
            return fdbox.pread_fd(fd)  # (an interrupted call may still read)

        def copies() -> int:
            n = 0
            for name in os.listdir("/proc/self/fd"):
                try:
                    n += os.readlink(f"/proc/self/fd/{name}") == secret
                except FileNotFoundError:
                    pass  # (the listing's own)
            return n

        with fd:
            interrupts.at_every_moment(app, once, b"the secret", lambda expected: once())
            # Ours, and at most one copy for each of the two moments Python
            # cannot close: between ``os.dup`` returning the copy and the
            # list that owns it taking it, and between taking one out of
            # that list and closing it (closing first could close a number
            # reused meanwhile).
            assert copies() <= 1 + 2
    finally:
        sys.modules.pop("fdbox", None)
