"""Hostile code for the escape battery. Runs *inside* compartments.

``attempt(attack, arg)`` performs one escape attempt and reports what the
kernel said: ``"ok:<detail>"`` when it worked, ``"denied:<ERRNO>"`` (or the
exception type) when it was refused. Attempts that the kernel answers by
killing the process (seccomp's SIGSYS, RLIMIT_CPU's SIGKILL) end the
instance; the caller sees ``CompartmentCrashed``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import time

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

#: A secret held in this process's memory (for the safebox tests).
SECRET = b"SAFEBOX-SECRET-" + os.urandom(8).hex().encode()


def _errno(res: int) -> None:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def read_file(path: str) -> str:
    with open(path, "rb") as f:
        return "read " + f.read(40).decode(errors="replace").strip()


def write_file(path: str) -> str:
    with open(path, "w") as f:
        f.write("written by a compartment\n")
    return "wrote " + path


def create_in_tmp(_: str) -> str:
    path = f"/tmp/pycompart-escape-{os.getpid()}-{time.monotonic_ns()}"
    with open(path, "w") as f:
        f.write("x")
    os.unlink(path)
    return "created " + path


def tcp_connect(port: str) -> str:
    with socket.create_connection(("127.0.0.1", int(port)), timeout=3) as s:
        return f"connected to {s.getpeername()}"


def udp_send(port: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"exfiltrated", ("127.0.0.1", int(port)))
    return "sent"


def abstract_connect(name: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect("\0" + name)
    return "connected"


def own_abstract_socket(_: str) -> str:
    """Listen and connect inside this compartment: what the scope allows."""
    name = f"\0pycompart-own-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(name)
        server.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(name)
    return "connected to own socket"


def signal_pid(pid: str) -> str:
    os.kill(int(pid), 0)  # the kernel's full permission check, without harm
    return f"may signal {pid}"


def signal_self(_: str) -> str:
    os.kill(os.getpid(), 0)
    return "may signal self"


def _target(arg: str) -> tuple[int, int, int]:
    pid, address, length = (int(x) for x in arg.split(":"))
    return (os.getpid() if pid == 0 else pid), address, length


def vm_read(arg: str) -> str:
    """process_vm_readv of ``pid:address:length`` (pid 0 = self)."""
    pid, address, length = _target(arg)
    if pid == os.getpid() and address == 0:
        address, length = secret_address()
    buf = ctypes.create_string_buffer(length)

    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), length)
    remote = iovec(address, length)
    _libc.process_vm_readv.restype = ctypes.c_ssize_t
    n = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    _errno(n)
    return "read " + buf.raw[:n].decode(errors="replace")


def proc_mem(arg: str) -> str:
    """Read ``/proc/<pid>/mem`` at address (pid 0 = self, address 0 = SECRET)."""
    pid, address, length = _target(arg)
    if pid == os.getpid() and address == 0:
        address, length = secret_address()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
        f.seek(address)
        return "read " + f.read(length).decode(errors="replace")


def ptrace_attach(pid: str) -> str:
    PTRACE_SEIZE, PTRACE_DETACH = 0x4206, 17
    target = int(pid) or os.getppid()
    _errno(_libc.ptrace(ctypes.c_long(PTRACE_SEIZE), ctypes.c_long(target), None, None))
    _libc.ptrace(ctypes.c_long(PTRACE_DETACH), ctypes.c_long(target), None, None)
    return f"attached to {target}"


def exec_subprocess(_: str) -> str:
    out = subprocess.run(["/bin/sh", "-c", "echo shell: $(id -u)"], capture_output=True, timeout=10)
    return out.stdout.decode().strip() or f"exit {out.returncode}"


def exec_replace(_: str) -> str:
    os.execv("/bin/sh", ["sh", "-c", "exit 42"])  # on success this process is gone (status 42)


def run_program(path: str) -> str:
    out = subprocess.run([path, "-u"], capture_output=True, timeout=10)
    return f"euid {out.stdout.decode().strip()} (exit {out.returncode})"


def fork_bomb(limit: str) -> str:
    """Fork until refused (at most ``limit`` children); report how many."""
    r, w = os.pipe()
    children = []
    refused = 0
    try:
        for _ in range(int(limit)):
            try:
                pid = os.fork()
            except OSError as exc:
                refused = exc.errno or errno.EAGAIN
                break
            if pid == 0:
                os.close(w)
                os.read(r, 1)  # wait until the parent is done counting
                os._exit(0)
            children.append(pid)
    finally:
        os.close(w)
        os.close(r)
        for pid in children:
            os.waitpid(pid, 0)
    if refused:
        raise OSError(refused, f"fork refused after {len(children)} children")
    return f"forked {len(children)}"


def memory_bomb(mib: str) -> str:
    block = bytearray(int(mib) * 1024 * 1024)
    return f"allocated {len(block) >> 20} MiB"


def cpu_spin(seconds: str) -> str:
    end = time.process_time() + float(seconds)
    while time.process_time() < end:
        pass
    return f"spun {seconds}s of CPU"


def load_module(_: str) -> str:
    SYS_finit_module = 313
    _errno(_libc.syscall(ctypes.c_long(SYS_finit_module), ctypes.c_int(-1), b"", ctypes.c_int(0)))
    return "module loaded"


def mount_tmpfs(target: str) -> str:
    _errno(_libc.mount(b"none", target.encode(), b"tmpfs", ctypes.c_ulong(0), None))
    return "mounted"


def start_thread(_: str) -> str:
    import threading

    t = threading.Thread(target=lambda: None)
    t.start()
    t.join()
    return "thread ran"


# -- file metadata, locks, process attributes (red team, 0.3) -------------------


def chmod_path(arg: str) -> str:
    """``path:mode`` (octal): change a file's mode by path."""
    path, mode = arg.rsplit(":", 1)
    os.chmod(path, int(mode, 8))
    return f"mode {oct(os.stat(path).st_mode & 0o7777)}"


def fchmod_open(arg: str) -> str:
    """Open ``path`` read-only, then ``fchmod`` it to ``mode``."""
    path, mode = arg.rsplit(":", 1)
    with open(path, "rb") as f:
        os.fchmod(f.fileno(), int(mode, 8))
    return f"mode {oct(os.stat(path).st_mode & 0o7777)}"


def utime_path(path: str) -> str:
    os.utime(path, (0, 0))
    return "times set"


def setxattr_path(path: str) -> str:
    os.setxattr(path, "user.pycompart", b"x")
    return "xattr set"


def create_and_chmod(directory: str) -> str:
    """Create a file of our own in ``directory`` and make it group-writable."""
    path = os.path.join(directory, f"own-{os.getpid()}-{time.monotonic_ns()}")
    with open(path, "w") as f:
        f.write("mine")
    try:
        os.chmod(path, 0o664)
        return f"own file mode {oct(os.stat(path).st_mode & 0o777)}"
    finally:
        os.unlink(path)


def flock_file(path: str) -> str:
    import fcntl

    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    return "locked"


def posix_lock(path: str) -> str:
    import fcntl

    with open(path, "rb") as f:
        fcntl.lockf(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
    return "read-locked"


def lease_file(path: str) -> str:
    import fcntl

    with open(path, "rb") as f:
        fcntl.fcntl(f.fileno(), 1024, fcntl.F_RDLCK)  # F_SETLEASE
    return "leased"


def dnotify_dir(path: str) -> str:
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.fcntl(fd, 1026, 0x80000002)  # F_NOTIFY: DN_MODIFY | DN_MULTISHOT
    finally:
        os.close(fd)
    return "watching"


def shrink_pipe(_: str) -> str:
    import fcntl

    r, w = os.pipe()
    try:
        fcntl.fcntl(w, 1031, 4096)  # F_SETPIPE_SZ
    finally:
        os.close(r)
        os.close(w)
    return "pipe resized"


def prctl_option(arg: str) -> str:
    """``option:value``: e.g. 1:0 clears the parent-death signal."""
    option, value = (int(x) for x in arg.split(":"))
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _errno(_libc.prctl(option, value, 0, 0, 0))
    return f"prctl {option} set"


def capability_sets(_: str) -> str:
    """The capability sets this process holds, as /proc/self/status shows
    them: each one not empty, or "none"."""
    held = []
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb") and int(value, 16):
                held.append(f"{name}={int(value, 16):x}")
    return "caps " + (" ".join(held) or "none")


def make_symlink(arg: str) -> str:
    """``directory:target``: plant a link to ``target`` in ``directory``."""
    directory, target = arg.split(":", 1)
    link = os.path.join(directory, f"link-{os.getpid()}-{time.monotonic_ns()}")
    os.symlink(target, link)
    os.unlink(link)
    return "linked"


def make_fifo(directory: str) -> str:
    path = os.path.join(directory, f"fifo-{os.getpid()}-{time.monotonic_ns()}")
    os.mkfifo(path)
    os.unlink(path)
    return "fifo made"


def thread_bomb(limit: str) -> str:
    """Start up to ``limit`` threads that wait; report how many started."""
    import threading

    stop = threading.Event()
    threads = []
    try:
        for _ in range(int(limit)):
            t = threading.Thread(target=stop.wait)
            try:
                t.start()
            except RuntimeError as exc:
                raise OSError(errno.EAGAIN, f"thread {len(threads) + 1} refused: {exc}") from None
            threads.append(t)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return f"started {len(threads)} threads"


def cmdline_names(pid: str) -> str:
    """Whether this process's command line (the zygote's, inherited) names ``pid``."""
    with open("/proc/self/cmdline", "rb") as f:
        args = f.read().split(b"\0")
    return "present" if pid.encode() in args else "absent"


def my_uid(_: str) -> str:
    return f"uid {os.getuid()} gid {os.getgid()}"


ATTACKS = {fn.__name__: fn for fn in (
    read_file, write_file, create_in_tmp, tcp_connect, udp_send, abstract_connect, own_abstract_socket,
    signal_pid, signal_self, vm_read, proc_mem, ptrace_attach, exec_subprocess, exec_replace, run_program,
    fork_bomb, memory_bomb, cpu_spin, load_module, mount_tmpfs, start_thread,
    chmod_path, fchmod_open, utime_path, setxattr_path, create_and_chmod, flock_file, posix_lock,
    lease_file, dnotify_dir, shrink_pipe, prctl_option, make_symlink, make_fifo, thread_bomb, my_uid,
    cmdline_names, capability_sets)}


def attempt(attack: str, arg: str) -> str:
    """Run one attack by name (only names in ATTACKS)."""
    try:
        return "ok:" + ATTACKS[attack](arg)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        return f"denied:{name or type(exc).__name__}"
    except MemoryError:
        return "denied:MemoryError"
    except (RuntimeError, subprocess.SubprocessError) as exc:
        return f"denied:{type(exc).__name__}:{exc}"


def secret_address() -> tuple[int, int]:
    """Where SECRET's bytes live in this process (CPython bytes layout)."""
    return id(SECRET) + (bytes.__basicsize__ - 1), len(SECRET)


def whoami() -> list[int]:
    """[pid, secret address, secret length, pid as the host numbers it]:
    instances live in a pid namespace of their own; /proc is the host's."""
    address, length = secret_address()
    return [os.getpid(), address, length, int(os.readlink("/proc/self"))]


def secret() -> str:
    return SECRET.decode()



def vault_uid() -> str:
    return str(os.getuid())


def vault_info() -> list[int]:
    """whoami, under another name, for the safebox compartment."""
    return whoami()
