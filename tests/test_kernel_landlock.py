"""Landlock layer, exercised in forked children: every denial has a twin
that is granted, so a pass proves the rule and not a broken environment."""

import errno
import os
import signal
import socket

import pytest

import forked
from pycompart.kernel import landlock, process

pytestmark = pytest.mark.skipif(landlock.abi_version() < 1, reason="no Landlock on this kernel")


def in_child(fn):
    """0 if ``fn`` succeeded in a forked child, else the errno it failed with."""
    kind, value = forked.in_child(fn)
    assert kind in ("ok", "errno"), (kind, value)
    return 0 if kind == "ok" else int(value)


def lock(fs_read=(), fs_write=(), connect=(), handle_fs=True, handle_net=False, scopes=0):
    process.prctl(process.PR_SET_NO_NEW_PRIVS, 1)
    rs = landlock.Ruleset(handle_fs=landlock.FS_READ | landlock.FS_WRITE | landlock.FS_EXECUTE if handle_fs else 0,
                          handle_net=landlock.NET_CONNECT_TCP | landlock.NET_BIND_TCP if handle_net else 0,
                          scopes=scopes)
    rs.allow_paths(fs_read, landlock.FS_READ)
    rs.allow_paths(fs_write, landlock.FS_READ | landlock.FS_WRITE)
    for port in connect:
        rs.allow_port(port, landlock.NET_CONNECT_TCP)
    rs.enforce()


def read(path):
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    return 0


def test_abi_is_reported():
    assert landlock.abi_version() >= 1


def test_read_outside_allowed_tree_is_denied(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "f").write_text("fine")
    (tmp_path / "secret").write_text("key")

    assert in_child(lambda: (lock(fs_read=[str(tmp_path / "ok")]), read(tmp_path / "ok" / "f"))[1]) == 0
    assert in_child(lambda: (lock(fs_read=[str(tmp_path / "ok")]), read(tmp_path / "secret"))[1]) == errno.EACCES
    assert in_child(lambda: (lock(fs_read=[str(tmp_path / "ok")]), read("/etc/passwd"))[1]) == errno.EACCES
    # Granted, the same read works.
    assert in_child(lambda: (lock(fs_read=[str(tmp_path)]), read(tmp_path / "secret"))[1]) == 0


def test_write_and_create_outside_allowed_tree_are_denied(tmp_path):
    (tmp_path / "out").mkdir()

    def create(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        return 0

    assert in_child(lambda: (lock(fs_write=[str(tmp_path / "out")]), create(tmp_path / "out" / "a"))[1]) == 0
    assert in_child(lambda: (lock(fs_write=[str(tmp_path / "out")]), create(tmp_path / "b"))[1]) == errno.EACCES
    assert in_child(lambda: (lock(fs_read=[str(tmp_path)]), create(tmp_path / "c"))[1]) == errno.EACCES
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.skipif(landlock.abi_version() < 4, reason="TCP rules need Landlock ABI 4")
def test_tcp_connect_only_to_allowed_ports():
    a = socket.create_server(("127.0.0.1", 0))
    b = socket.create_server(("127.0.0.1", 0))
    pa, pb = a.getsockname()[1], b.getsockname()[1]

    def connect(port):
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return 0

    try:
        assert in_child(lambda: (lock(handle_fs=False, handle_net=True, connect=[pa]), connect(pa))[1]) == 0
        assert in_child(lambda: (lock(handle_fs=False, handle_net=True, connect=[pa]), connect(pb))[1]) \
            == errno.EACCES
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(landlock.abi_version() < 6, reason="scopes need Landlock ABI 6")
def test_signal_scope_blocks_signalling_outside_the_domain():
    parent = os.getpid()
    scope = landlock.SCOPE_SIGNAL
    # Both lock the filesystem with "/" allowed, so only the scope differs.
    assert in_child(lambda: (lock(fs_write=["/"]), os.kill(parent, 0))[1] or 0) == 0
    assert in_child(lambda: (lock(fs_write=["/"], scopes=scope), os.kill(parent, signal.SIGUSR2))[1] or 0) \
        == errno.EPERM


@pytest.mark.skipif(landlock.abi_version() < 6, reason="scopes need Landlock ABI 6")
def test_abstract_socket_scope_blocks_connecting_out():
    name = f"\0pycompart-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(name)
    server.listen(4)

    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(name)
        s.close()
        return 0

    try:
        assert in_child(lambda: (lock(fs_write=["/"]), connect())[1]) == 0
        assert in_child(lambda: (lock(fs_write=["/"], scopes=landlock.SCOPE_ABSTRACT_UNIX_SOCKET),
                                 connect())[1]) == errno.EPERM
    finally:
        server.close()


def test_unsupported_rights_are_reported_not_silently_dropped():
    rs = landlock.Ruleset(handle_fs=landlock.FS_READ, handle_net=landlock.NET_CONNECT_TCP,
                          scopes=landlock.SCOPE_SIGNAL, abi=3)
    try:
        assert any("TCP" in u for u in rs.unsupported) and any("scope" in u for u in rs.unsupported)
    finally:
        rs.close()


def test_packages_are_rerouted_from_the_zygote_index_and_modules_imported_since():
    import sys
    import types

    from pycompart.compartment import lockdown

    old = types.ModuleType("pycompart_test_old_pkg")
    old.__path__ = ["/hidden/site/old_pkg", "/elsewhere/old_pkg"]  # type: ignore[attr-defined]
    sys.modules[old.__name__] = old
    try:
        lockdown.index_packages()
        reach = {"/hidden/site": "/proc/self/fd/99"}
        lockdown.reroute_packages(reach)  # from the index alone
        assert old.__path__ == ["/proc/self/fd/99/old_pkg", "/elsewhere/old_pkg"]
        new = types.ModuleType("pycompart_test_new_pkg")
        new.__path__ = ["/hidden/site/new_pkg"]  # type: ignore[attr-defined]
        sys.modules[new.__name__] = new  # imported after the index: walked too
        lockdown.reroute_packages(reach)
        assert new.__path__ == ["/proc/self/fd/99/new_pkg"]
        assert old.__path__[0] == "/proc/self/fd/99/old_pkg"  # not rerouted twice
    finally:
        sys.modules.pop("pycompart_test_old_pkg", None)
        sys.modules.pop("pycompart_test_new_pkg", None)
        lockdown.index_packages()
