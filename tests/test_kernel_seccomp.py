"""seccomp filters, exercised in forked children. Each denial has a granted
twin (the same action without the filter, or with the call allowed)."""

import ctypes
import errno
import os
import signal
import socket
import threading

import pytest

from forked import in_child
from pycompart.kernel import process, seccomp

pytestmark = pytest.mark.skipif(not seccomp.available(), reason="libseccomp not available")


def locked(profile="python", **kw):
    def wrap(fn):
        def run():
            process.prctl(process.PR_SET_NO_NEW_PRIVS, 1)
            seccomp.apply(profile, **kw)
            return fn()
        return run
    return wrap


def pure_python_work():
    import json
    data = json.dumps({"k": list(range(1000))})
    r, w = os.pipe()
    os.write(w, data.encode()[:100])
    big = bytearray(64 * 1024 * 1024)  # mmap
    return len(os.read(r, 100)) + len(big) // (1 << 20) + os.getpid() * 0


def test_pure_python_work_is_allowed():
    assert in_child(locked()(pure_python_work)) == ("ok", "164")


def test_exec_is_denied():
    def execute():
        os.execv("/bin/true", ["true"])
    assert in_child(locked()(execute)) == ("errno", str(errno.EPERM))


def test_fork_is_denied_in_python_profile():
    def fork():
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return "forked"
    assert in_child(locked()(fork)) == ("errno", str(errno.EPERM))
    assert in_child(fork) == ("ok", "forked")


def make(family, kind):
    def attempt():
        socket.socket(family, kind).close()
        return "socket"
    return attempt


TCP = make(socket.AF_INET, socket.SOCK_STREAM)
TCP6 = make(socket.AF_INET6, socket.SOCK_STREAM)
UDP = make(socket.AF_INET, socket.SOCK_DGRAM)
UNIX = make(socket.AF_UNIX, socket.SOCK_STREAM)


def test_socket_creation_follows_the_socket_rule():
    assert in_child(locked()(TCP)) == ("errno", str(errno.EPERM))
    assert in_child(locked("network-client")(TCP)) == ("errno", str(errno.EPERM))
    assert in_child(locked(sockets="inet-stream")(TCP)) == ("ok", "socket")
    assert in_child(locked(sockets="inet-stream")(TCP6)) == ("ok", "socket")
    # TCP only: UDP and unix sockets would slip past Landlock's port rules.
    assert in_child(locked(sockets="inet-stream")(UDP)) == ("errno", str(errno.EPERM))
    assert in_child(locked(sockets="inet-stream")(UNIX)) == ("errno", str(errno.EPERM))
    assert in_child(locked(sockets="inet")(UDP)) == ("ok", "socket")
    assert in_child(locked(sockets="inet")(UNIX)) == ("errno", str(errno.EPERM))
    assert in_child(locked(sockets="any")(UNIX)) == ("ok", "socket")


def test_tcp_fast_open_is_refused():
    """sendto(MSG_FASTOPEN) connects without connect(): refused, while a
    plain sendto on the same kind of socket reaches the kernel."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def fast_open():
        s = socket.socket()
        s.sendto(b"x", socket.MSG_FASTOPEN, ("127.0.0.1", port))
        return "sent"

    def plain_sendto_unconnected():
        s = socket.socket()
        s.sendto(b"x", 0, ("127.0.0.1", port))
        return "sent"
    try:
        assert in_child(locked(sockets="inet-stream")(fast_open)) == ("errno", str(errno.EPERM))
        # Without the flag the call passes the filter and the kernel answers
        # for itself (EPIPE: not connected).
        assert in_child(locked(sockets="inet-stream")(plain_sendto_unconnected)) == ("errno", str(errno.EPIPE))
    finally:
        listener.close()


def test_threads_only_with_threads_profile():
    def start_thread():
        t = threading.Thread(target=lambda: None)
        t.start()
        t.join()
        return "thread"
    assert in_child(locked()(start_thread))[0] in ("errno", "error")
    assert in_child(locked("python-threads")(start_thread)) == ("ok", "thread")
    # Threads yes, processes no: clone without CLONE_THREAD is refused.
    def fork():
        os.fork()
        return "forked"
    assert in_child(locked("python-threads")(fork)) == ("errno", str(errno.EPERM))


@pytest.mark.parametrize("name, args", [("ptrace", (0, 0, 0, 0)), ("bpf", (0, 0, 0)),
                                        ("process_vm_readv", (1, 0, 0, 0, 0, 0))])
def test_kill_list_ends_the_process(name, args):
    import pyseccomp
    number = pyseccomp.resolve_syscall(pyseccomp.system_arch(), name)
    libc = ctypes.CDLL(None, use_errno=True)

    def attempt():
        libc.syscall(number, *args)
        return "survived"
    assert in_child(locked()(attempt)) == ("signal", signal.SIGSYS)


def test_deny_and_allow_lists():
    assert in_child(locked()(lambda: os.uname().sysname)) == ("ok", "Linux")
    assert in_child(locked(deny=["uname"])(lambda: os.uname().sysname)) == ("errno", str(errno.EPERM))

    def make_socket():
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        return "socket"
    assert in_child(locked()(make_socket)) == ("errno", str(errno.EPERM))
    assert in_child(locked(allow=["socket"])(make_socket)) == ("ok", "socket")
    # The kill list wins over allow.
    assert in_child(locked(allow=["socket"], kill=["socket"])(make_socket)) == ("signal", signal.SIGSYS)


def test_x32_syscalls_are_rejected():
    libc = ctypes.CDLL(None, use_errno=True)
    x32_getpid = 0x40000000 | 39

    def attempt():
        res = libc.syscall(x32_getpid)
        return f"returned {res}"
    result = in_child(locked()(attempt))
    assert result == ("signal", signal.SIGSYS), result


def test_compiled_bpf_behaves_like_the_libseccomp_filter():
    """Instances load the BPF program main compiled, with one syscall."""
    program = seccomp.compile_bpf("python", sockets="inet-stream")
    assert len(program) % 8 == 0

    def bpf_locked(fn):
        def run():
            process.prctl(process.PR_SET_NO_NEW_PRIVS, 1)
            seccomp.load_bpf(program)
            return fn()
        return run
    assert in_child(bpf_locked(pure_python_work)) == ("ok", "164")
    assert in_child(bpf_locked(lambda: os.execv("/bin/true", ["true"]))) == ("errno", str(errno.EPERM))
    assert in_child(bpf_locked(TCP)) == ("ok", "socket")
    assert in_child(bpf_locked(UDP)) == ("errno", str(errno.EPERM))
    libc = ctypes.CDLL(None, use_errno=True)
    assert in_child(bpf_locked(lambda: libc.syscall(0x40000000 | 39))) == ("signal", signal.SIGSYS)
    assert in_child(bpf_locked(lambda: libc.syscall(101, 16, 1, 0, 0))) == ("signal", signal.SIGSYS)  # ptrace


def test_load_bpf_rejects_garbage():
    with pytest.raises(seccomp.SeccompError):
        seccomp.load_bpf(b"123")


def test_fcntl_and_prctl_are_allowed_only_with_harmless_arguments():
    import fcntl

    def use():
        r, w = os.pipe()
        flags = fcntl.fcntl(r, fcntl.F_GETFL)  # allowed: descriptor flags
        os.set_blocking(r, False)
        out = [flags >= 0]
        for attempt in (lambda: fcntl.flock(r, fcntl.LOCK_EX),      # locks
                        lambda: fcntl.fcntl(w, 1031, 4096),          # F_SETPIPE_SZ
                        lambda: process.prctl(process.PR_SET_PDEATHSIG, 0),
                        lambda: process.prctl(process.PR_SET_DUMPABLE, 1)):
            try:
                attempt()
                out.append("allowed")
            except OSError as exc:
                out.append(errno.errorcode[exc.errno])
        out.append(process.prctl(3) in (0, 1))  # PR_GET_DUMPABLE: reading is fine
        return out
    assert in_child(locked()(use)) == ("ok", str([True, "EPERM", "EPERM", "EPERM", "EPERM", True]))
    assert in_child(locked(locks=True)(use))[1].startswith("[True, 'allowed'")
    assert in_child(use) == ("ok", str([True, "allowed", "allowed", "allowed", "allowed", True]))


def test_own_files_metadata_never_sets_special_bits(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")

    def chmod(mode):
        def run():
            os.chmod(path, mode)
            return oct(os.stat(path).st_mode & 0o7777)
        return run
    assert in_child(locked()(chmod(0o640))) == ("errno", str(errno.EPERM))
    assert in_child(locked(metadata="own-files")(chmod(0o640))) == ("ok", "0o640")
    assert in_child(locked(metadata="own-files")(chmod(0o4755))) == ("errno", str(errno.EPERM))


def test_a_unix_stream_pair_is_allowed_and_reaches_only_itself():
    """An event loop's self-pipe (asyncio) needs a socketpair: a connected
    AF_UNIX stream pair is allowed in every profile; datagram pairs (which
    could name another socket) and socket() itself are not."""
    def stream_pair():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.send(b"ping")
        got = b.recv(4)
        try:
            a.sendto(b"x", "/dev/log")  # a stream socket takes no address
            named = "sent"
        except OSError as exc:
            named = errno.errorcode[exc.errno]
        return f"{got.decode()} {named}"

    def dgram_pair():
        socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        return "pair"

    def event_loop():
        import asyncio

        async def main():
            await asyncio.sleep(0)
            return "loop"
        return asyncio.run(main())
    assert in_child(locked()(stream_pair)) == ("ok", "ping EISCONN")
    assert in_child(locked()(event_loop)) == ("ok", "loop")
    assert in_child(locked()(dgram_pair)) == ("errno", str(errno.EPERM))
    assert in_child(dgram_pair) == ("ok", "pair")
    assert in_child(locked()(UNIX)) == ("errno", str(errno.EPERM))
