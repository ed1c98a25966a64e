"""Resource limits and credential drop, in forked children. Each denial has
a granted twin."""

import errno
import os
import signal
import time

import pytest

from forked import in_child
from pycompart.kernel import credentials, rlimits

ROOT = os.geteuid() == 0
NOBODY = 65534


def test_memory_limit_bounds_allocation():
    def allocate(limit):
        if limit:
            rlimits.apply(rlimits.Limits(memory=limit))
        return len(bytearray(400 * 1024 * 1024))

    assert in_child(lambda: allocate(256 * 1024 * 1024)) == ("errno", "memory")
    assert in_child(lambda: allocate(None)) == ("ok", str(400 * 1024 * 1024))


def test_cpu_limit_kills_a_spinning_process():
    def spin(limit, seconds):
        if limit:
            rlimits.apply(rlimits.Limits(cpu_seconds=limit))
        # CPU time, not wall time: on a loaded machine 5 s of wall time may
        # hold less than a second of CPU.
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass
        return 0

    assert in_child(lambda: spin(1, 3), timeout=60) in (("signal", signal.SIGXCPU), ("signal", signal.SIGKILL))
    assert in_child(lambda: spin(None, 0.3)) == ("ok", "0")


def test_open_files_limit():
    def open_many(limit):
        if limit:
            rlimits.apply(rlimits.Limits(open_files=limit))
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(32)]
        return len(fds)

    assert in_child(lambda: open_many(16)) == ("errno", str(errno.EMFILE))
    assert in_child(lambda: open_many(None)) == ("ok", "32")


def test_file_size_limit(tmp_path):
    def write(limit):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of dying
        if limit:
            rlimits.apply(rlimits.Limits(file_size=limit))
        with open(tmp_path / f"f{limit}", "wb", buffering=0) as f:
            return f.write(b"x" * 8192)

    assert in_child(lambda: write(4096)) in (("errno", str(errno.EFBIG)), ("ok", "4096"))
    assert in_child(lambda: write(None)) == ("ok", "8192")


def test_raising_a_limit_above_hard_is_refused():
    def attempt():
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        if ROOT:
            credentials.drop_to(NOBODY, NOBODY)  # no CAP_SYS_RESOURCE any more
        rlimits.apply(rlimits.Limits(open_files=128))
        return 0

    assert in_child(attempt)[0] == "errno"


@pytest.mark.skipif(not ROOT, reason="dropping uid needs root")
def test_drop_to_nobody_loses_root_powers():
    def as_nobody():
        credentials.drop_to(NOBODY, NOBODY)
        with open("/etc/shadow", "rb"):
            return os.getuid()

    assert in_child(as_nobody) == ("errno", str(errno.EACCES))
    assert in_child(lambda: open("/etc/shadow", "rb").close() or os.getuid()) == ("ok", "0")

    def cannot_go_back():
        credentials.drop_to(NOBODY, NOBODY)
        os.setuid(0)
        return 0

    assert in_child(cannot_go_back) == ("errno", str(errno.EPERM))


@pytest.mark.skipif(not ROOT, reason="dropping uid needs root")
def test_process_limit_bounds_fork_once_unprivileged():
    def fork_after(limit_first):
        credentials.drop_to(NOBODY, NOBODY)
        rlimits.apply(rlimits.Limits(processes=1))
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return 0

    assert in_child(lambda: fork_after(True)) == ("errno", str(errno.EAGAIN))


def test_capabilities_are_emptied():
    def drop():
        credentials.clear_capabilities()
        return f"{credentials.effective_capabilities()}/{credentials.bounding_capabilities()}"

    kind, value = in_child(drop)
    assert kind == "ok"
    eff, bnd = value.split("/")
    assert eff == "0"
    if ROOT:
        assert bnd == "0"


@pytest.mark.skipif(not ROOT, reason="dropping uid needs root")
def test_the_bounding_set_is_emptied_before_the_uid_drop_ends_cap_setpcap():
    def lock_down(first: bool):
        if first:
            credentials.drop_bounding_set()
        credentials.drop_to(NOBODY, NOBODY)
        credentials.clear_capabilities()  # (too late for the bounding set)
        return str(credentials.bounding_capabilities())

    assert in_child(lambda: lock_down(True)) == ("ok", "0")
    assert in_child(lambda: lock_down(False))[1] != "0"  # what the order is for


def test_no_new_privs_and_not_dumpable():
    def lock():
        credentials.no_new_privs()
        credentials.not_dumpable()
        from pycompart.kernel import process
        return f"{process.prctl(39)}/{process.prctl(3)}"  # PR_GET_NO_NEW_PRIVS, PR_GET_DUMPABLE

    assert in_child(lock) == ("ok", "1/0")


def test_a_compartments_own_uid_is_where_sha256_of_its_names_points(tmp_path):
    """The uid a compartment gets (when root and no user is named) starts
    from SHA-256 of the app's and compartment's names, read from CPython's
    own module: it must be the uid hashlib's SHA-256 picks (the same uid
    across runs and versions)."""
    import hashlib

    from pycompart.policy.resolution import DYNAMIC_IDS
    from pycompart.supervisor import identities

    if os.geteuid() != 0:
        pytest.skip("uids of their own are allocated as root")
    ids = identities.Identities(lock_dir=str(tmp_path))
    try:
        got = ids.allocate("show-config", "yaml")
    finally:
        ids.release()
    start = int.from_bytes(hashlib.sha256(b"show-config\0yaml").digest()[:4], "little") % len(DYNAMIC_IDS)
    expected = DYNAMIC_IDS.start + start
    if identities._named(expected) or expected in identities._process_uids():
        pytest.skip("the first candidate is taken on this machine")
    assert got == expected
    assert identities._sha256(b"x").digest() == hashlib.sha256(b"x").digest()
