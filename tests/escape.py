"""The escape battery: hostile code inside real compartments.

Every case names the privileges of the compartment, the attack (from
``hostile.py``) and the outcome it must have. Denials come with a *granted
twin*: the same attack with the privilege granted, which must then succeed,
so that a pass proves the rule and not a broken environment. Privileges that
cannot be granted at all (NO_NEW_PRIVS, mount and module loading under
Landlock) have an *unconfined twin* instead, run by ``unconfined_twins()``:
the same action from an unconfined process, which works.

Used by ``test_escape.py`` as root, and by ``escape_runner.py`` under
``setpriv --reuid=65534`` for the unprivileged path. Outcomes:
``ok:...``, ``denied:<ERRNO or exception>``, ``killed:<SIGNAL>``,
``exited:<status>``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from typing import Any

import hostile  # noqa: F401  (imported so entrypoint annotations resolve in main)
import pycompart
from pycompart.errors import CompartmentCrashed

ROOT = os.geteuid() == 0
MAIN_SECRET = b"MAIN-SECRET-" + os.urandom(8).hex().encode()

EXEC = ["execve", "vfork", "fork", "clone"]  # what running a program needs beyond "python"
BIN = ["/bin", "/usr/bin"]
# Without module support (CONFIG_MODULES=n) the kernel answers ENOSYS before
# any permission check; the seccomp kill happens before the kernel either way.
MODULES = os.path.exists("/proc/modules")


@dataclasses.dataclass
class Case:
    name: str
    attack: str
    arg: str
    expect: str  # a prefix of the outcome
    privileges: dict[str, Any] = dataclasses.field(default_factory=dict)
    only: str = "both"  # "root", "user" or "both"
    expect_user: str | None = None  # when the unprivileged outcome differs


def _p(**kw: Any) -> dict[str, Any]:
    return kw


CASES = [
    # -- files --------------------------------------------------------------------
    Case("read secret file", "read_file", "{secret}", "denied:EACCES"),
    Case("read secret file, granted", "read_file", "{secret}", "ok:read TOP-SECRET",
         _p(filesystem={"read": ["{secret}"]})),
    Case("read /etc/shadow", "read_file", "/etc/shadow", "denied:EACCES"),
    Case("read /etc/shadow as root, granted", "read_file", "/etc/shadow", "ok:read root:",
         _p(user="root", filesystem={"read": ["/etc/shadow"]}), only="root"),
    Case("read /etc/shadow as root, path not granted", "read_file", "/etc/shadow", "denied:EACCES",
         _p(user="root"), only="root"),
    Case("write outside filesystem.write", "write_file", "{outside}/note", "denied:EACCES"),
    Case("write outside, granted", "write_file", "{outside}/note", "ok:wrote",
         _p(filesystem={"write": ["{outside}"]})),
    Case("create a file in /tmp", "create_in_tmp", "", "denied:EACCES"),
    Case("create a file in /tmp, granted", "create_in_tmp", "", "ok:created",
         _p(filesystem={"write": ["/tmp"]})),
    # -- network ------------------------------------------------------------------
    Case("TCP connect to main's listener", "tcp_connect", "{tcp}", "denied:EPERM"),
    Case("TCP connect, other port granted", "tcp_connect", "{tcp}", "denied:EACCES",
         _p(network={"connect": [1]})),
    Case("TCP connect, loopback namespace", "tcp_connect", "{tcp}", "denied:ECONNREFUSED",
         _p(network="loopback")),
    Case("TCP connect, port granted", "tcp_connect", "{tcp}", "ok:connected",
         _p(network={"connect": ["{tcp}"]})),
    Case("UDP send", "udp_send", "{udp}", "denied:EPERM"),
    Case("UDP send, TCP port granted", "udp_send", "{udp}", "denied:EPERM",
         _p(network={"connect": ["{tcp}"]})),
    Case("UDP send, host network granted", "udp_send", "{udp}", "ok:sent", _p(network="host")),
    Case("connect to main's abstract socket", "abstract_connect", "{abstract}", "denied:EPERM"),
    Case("connect to main's abstract socket, host network", "abstract_connect", "{abstract}",
         "denied:EPERM", _p(network="host")),
    Case("abstract socket inside the compartment, host network", "own_abstract_socket", "", "ok:",
         _p(network="host")),
    # -- other processes ----------------------------------------------------------
    # main is not even in the instances' pid namespace: its pid names nothing there.
    Case("signal main", "signal_pid", "{main}", "denied:ESRCH"),
    Case("signal the safebox", "signal_pid", "{vault}", "denied:EPERM"),
    Case("signal itself", "signal_self", "", "ok:"),
    Case("ptrace main", "ptrace_attach", "{main}", "killed:SIGSYS"),
    Case("ptrace main, ptrace allowed", "ptrace_attach", "{main}", "denied:ESRCH",
         _p(syscalls={"allow": ["ptrace"]})),
    Case("ptrace the safebox, ptrace allowed", "ptrace_attach", "{vault}", "denied:EPERM",
         _p(syscalls={"allow": ["ptrace"]})),
    Case("process_vm_readv main", "vm_read", "{main}:{main_secret}", "killed:SIGSYS"),
    Case("process_vm_readv main, allowed", "vm_read", "{main}:{main_secret}", "denied:ESRCH",
         _p(syscalls={"allow": ["process_vm_readv"]})),
    Case("process_vm_readv the safebox, allowed", "vm_read", "{vault}:{vault_secret}", "denied:EPERM",
         _p(syscalls={"allow": ["process_vm_readv"]})),
    Case("process_vm_readv itself, allowed", "vm_read", "0:0:0", "ok:read SAFEBOX-SECRET",
         _p(syscalls={"allow": ["process_vm_readv"]})),
    Case("read main's /proc/pid/mem", "proc_mem", "{main}:{main_secret}", "denied:EACCES"),
    Case("read main's /proc/pid/mem, /proc granted", "proc_mem", "{main}:{main_secret}", "denied:E",
         _p(filesystem={"read": ["/proc"]})),
    Case("read the safebox's /proc/pid/mem, /proc granted", "proc_mem", "{vault_host}:{vault_secret}",
         "denied:E", _p(filesystem={"read": ["/proc"]})),
    # -- programs -----------------------------------------------------------------
    Case("run /bin/sh via subprocess", "exec_subprocess", "", "denied:EPERM"),
    Case("run /bin/sh via subprocess, exec allowed but /bin not executable", "exec_subprocess", "",
         "denied:EACCES", _p(syscalls={"allow": EXEC})),
    Case("run /bin/sh via subprocess, granted", "exec_subprocess", "", "ok:shell: <box uid>",
         _p(filesystem={"execute": BIN}, syscalls={"allow": EXEC})),
    Case("os.execv /bin/sh", "exec_replace", "", "denied:EPERM"),
    Case("os.execv /bin/sh, granted", "exec_replace", "", "exited:42",
         _p(filesystem={"execute": BIN}, syscalls={"allow": EXEC})),
    Case("setuid-root binary under NO_NEW_PRIVS", "run_program", "{suid}", "ok:euid <box uid>",
         _p(filesystem={"execute": ["{suid}"]}, syscalls={"allow": EXEC}), only="root"),
    # -- resources ----------------------------------------------------------------
    Case("fork", "fork_bomb", "8", "denied:EPERM"),
    Case("fork bomb, processes = 4", "fork_bomb", "200", "denied:EAGAIN",
         _p(processes=4, syscalls={"allow": ["fork", "clone"]})),
    Case("fork 16, processes = 200", "fork_bomb", "16", "ok:forked 16",
         _p(processes=200, syscalls={"allow": ["fork", "clone"]})),
    Case("memory bomb, memory = 256MiB", "memory_bomb", "512", "denied:MemoryError", _p(memory="256MiB")),
    Case("512 MiB, memory = 1GiB", "memory_bomb", "512", "ok:allocated 512", _p(memory="1GiB")),
    Case("CPU spin, cpu_seconds = 1", "cpu_spin", "5", "killed:SIGKILL", _p(cpu_seconds=1)),
    Case("short CPU spin, cpu_seconds = 10", "cpu_spin", "0.2", "ok:spun", _p(cpu_seconds=10)),
    Case("start a thread", "start_thread", "", "denied:RuntimeError"),
    Case("start a thread, python-threads", "start_thread", "", "ok:thread ran",
         _p(syscalls="python-threads")),
    # -- the kernel ---------------------------------------------------------------
    Case("load a kernel module", "load_module", "", "killed:SIGSYS"),
    Case("load a kernel module, syscall allowed", "load_module", "", "denied:EPERM" if MODULES else "denied:ENOSYS",
         _p(syscalls={"allow": ["finit_module"]})),
    Case("load a kernel module as root with CAP_SYS_MODULE", "load_module", "",
         "denied:EBADF" if MODULES else "denied:ENOSYS",
         _p(user="root", capabilities=["CAP_SYS_MODULE"], syscalls={"allow": ["finit_module"]}),
         only="root"),
    # Every set empty, the bounding set too (what an execve could give
    # back): it must be emptied before the uid drop ends CAP_SETPCAP.
    Case("capability sets", "capability_sets", "", "ok:caps none"),
    Case("capability sets, CAP_SYS_MODULE kept", "capability_sets", "", "ok:caps CapPrm=10000 CapEff=10000",
         _p(user="root", capabilities=["CAP_SYS_MODULE"]), only="root"),
    Case("mount", "mount_tmpfs", "{outside}", "killed:SIGSYS"),
    Case("mount as root with CAP_SYS_ADMIN, syscall allowed", "mount_tmpfs", "{outside}", "denied:EPERM",
         _p(user="root", capabilities=["CAP_SYS_ADMIN"], syscalls={"allow": ["mount"]},
            filesystem={"write": ["{outside}"]}), only="root"),
    # -- file metadata (red team 0.3: Landlock does not govern it) ------------------
    # As root the compartment runs as "root" here, the red team's setup: only
    # seccomp can refuse. As a normal user it keeps the owner's uid.
    Case("make a root file it cannot read setuid", "chmod_path", "{victim}:4755", "denied:EPERM",
         _p(user="root"), only="root"),
    Case("make its owner's 0600 file world-readable", "chmod_path", "{victim}:644", "denied:EPERM",
         only="user"),
    Case("fchmod a file it may read", "fchmod_open", "{victim}:4755", "denied:EPERM",
         _p(user="root", filesystem={"read": ["{victim}"]}), only="root"),
    Case("fchmod a file it may read, as its owner", "fchmod_open", "{victim}:644", "denied:EPERM",
         _p(filesystem={"read": ["{victim}"]}), only="user"),
    Case("set a file's times", "utime_path", "{victim}", "denied:EPERM", _p(user="root"), only="root"),
    Case("set a file's times, as its owner", "utime_path", "{victim}", "denied:EPERM", only="user"),
    Case("set an extended attribute", "setxattr_path", "{victim}", "denied:EPERM"),
    Case("chmod its own new file, file_metadata = own-files", "create_and_chmod", "{outside}",
         "ok:own file mode 0o664", _p(file_metadata="own-files", filesystem={"write": ["{outside}"]}),
         only="root"),
    Case("chmod another uid's file, file_metadata = own-files", "chmod_path", "{others}:777",
         "denied:EPERM", _p(file_metadata="own-files", filesystem={"read": ["{others}"]}), only="root"),
    Case("setuid bit on its own file, file_metadata = own-files", "chmod_path", "{outside}:4777",
         "denied:EPERM", _p(file_metadata="own-files", filesystem={"write": ["{outside}"]}), only="root"),
    # -- locks, leases, dnotify: read access is not lock access ----------------------
    Case("flock a file it may read", "flock_file", "{secret}", "denied:EPERM",
         _p(filesystem={"read": ["{secret}"]})),
    Case("flock a file it may read, file_locks granted", "flock_file", "{secret}", "ok:locked",
         _p(file_locks=True, filesystem={"read": ["{secret}"]})),
    Case("POSIX read lock", "posix_lock", "{secret}", "denied:EPERM", _p(filesystem={"read": ["{secret}"]})),
    Case("POSIX read lock, file_locks granted", "posix_lock", "{secret}", "ok:read-locked",
         _p(file_locks=True, filesystem={"read": ["{secret}"]})),
    Case("lease a file it may read", "lease_file", "{victim}", "denied:EPERM",
         _p(user="root", filesystem={"read": ["{victim}"]}), only="root"),
    Case("lease its owner's file", "lease_file", "{victim}", "denied:EPERM",
         _p(filesystem={"read": ["{victim}"]}), only="user"),
    Case("dnotify on a directory it may read", "dnotify_dir", "{outside}", "denied:EPERM",
         _p(filesystem={"read": ["{outside}"]})),
    Case("shrink a pipe (F_SETPIPE_SZ)", "shrink_pipe", "", "denied:EPERM"),
    # -- outliving main, process attributes -----------------------------------------
    Case("clear the parent-death signal", "prctl_option", "1:0", "denied:EPERM"),
    Case("become dumpable again", "prctl_option", "4:1", "denied:EPERM"),
    # -- links and special files in a granted write directory ----------------------
    Case("plant a symlink in a writable directory", "make_symlink", "{outside}:/etc/passwd",
         "denied:EACCES", _p(filesystem={"write": ["{outside}"]})),
    Case("plant a symlink, filesystem.symlinks granted", "make_symlink", "{outside}:/etc/passwd",
         "ok:linked", _p(filesystem={"write": ["{outside}"], "symlinks": True})),
    Case("make a FIFO in a writable directory", "make_fifo", "{outside}", "denied:E",
         _p(filesystem={"write": ["{outside}"]})),
    Case("make a FIFO, filesystem.fifos granted", "make_fifo", "{outside}", "ok:fifo made",
         _p(filesystem={"write": ["{outside}"], "fifos": True})),
    # -- what the instance learns about main and the host (red team 0.3, finding 14) --
    Case("main's pid on its own command line", "cmdline_names", "{main}", "denied:EACCES"),
    Case("read the host's mount table", "read_file", "/proc/self/mountinfo", "denied:EACCES"),
    Case("read its initial environment", "read_file", "/proc/self/environ", "denied:EACCES"),
    Case("read its own status", "read_file", "/proc/self/status", "ok:read Name:"),
    # -- default bounds on the host's resources --------------------------------------
    Case("thread bomb under the default bounds", "thread_bomb", "400", "denied:EAGAIN",
         _p(syscalls="python-threads")),
    Case("thread bomb, memory unlimited: the default processes bound", "thread_bomb", "400",
         "denied:EAGAIN", _p(syscalls="python-threads", memory="unlimited")),
    Case("400 threads, processes = 1000, memory unlimited", "thread_bomb", "400", "ok:started 400",
         _p(syscalls="python-threads", processes=1000, memory="unlimited")),
    Case("3 GiB under the default bounds", "memory_bomb", "3072", "denied:MemoryError"),
    Case("3 GiB, memory = 8GiB", "memory_bomb", "3072", "ok:allocated 3072", _p(memory="8GiB")),
]


class Targets:
    """What the attacks aim at: a secret file, a directory outside the grant,
    listeners, a secret in main's memory, a setuid binary. All readable by
    uid 65534 where the kernel's DAC checks would otherwise hide a failure
    of pycompart's own rules."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pycompart-escape-", dir="/tmp")
        os.chmod(self.dir, 0o755)
        self.secret = os.path.join(self.dir, "secret.txt")
        with open(self.secret, "w") as f:
            f.write("TOP-SECRET launch codes\n")
        os.chmod(self.secret, 0o644)
        self.outside = os.path.join(self.dir, "outside")
        os.mkdir(self.outside)
        os.chmod(self.outside, 0o777)
        self.tcp = socket.socket()
        self.tcp.bind(("127.0.0.1", 0))
        self.tcp.listen(64)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0)
        self.abstract_name = f"pycompart-escape-{os.getpid()}"
        self.abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.abstract.bind("\0" + self.abstract_name)
        self.abstract.listen(64)
        self._stop = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()
        # A file of the running user's, 0600: what finding 1 made 0644 or setuid.
        self.victim = os.path.join(self.dir, "victim")
        with open(self.victim, "w") as f:
            f.write("VICTIM\n")
        os.chmod(self.victim, 0o600)
        # A file of another uid (root mode only): file_metadata cannot reach it.
        self.others = os.path.join(self.dir, "others")
        with open(self.others, "w") as f:
            f.write("OTHERS\n")
        os.chmod(self.others, 0o644)
        self.suid = ""
        if ROOT:
            os.chown(self.others, 12345, 12345)
            self.suid = os.path.join(self.dir, "suid-id")
            shutil.copy("/usr/bin/id", self.suid)
            os.chown(self.suid, 0, 0)
            os.chmod(self.suid, 0o4755)

    def _accept(self) -> None:
        import select

        while not self._stop:
            ready, _, _ = select.select([self.tcp, self.abstract], [], [], 0.1)
            for s in ready:
                try:
                    conn, _ = s.accept()
                    conn.close()
                except OSError:
                    pass

    def values(self, vault: list[int]) -> dict[str, str]:
        return {"secret": self.secret, "outside": self.outside, "tcp": str(self.tcp.getsockname()[1]),
                "udp": str(self.udp.getsockname()[1]), "abstract": self.abstract_name,
                "main": str(os.getpid()),
                "main_secret": f"{id(MAIN_SECRET) + bytes.__basicsize__ - 1}:{len(MAIN_SECRET)}",
                "vault": str(vault[0]), "vault_secret": f"{vault[1]}:{vault[2]}", "suid": self.suid,
                "vault_host": str(vault[3] if len(vault) > 3 else vault[0]),
                "victim": self.victim, "others": self.others,
                "uid": str(os.geteuid())}

    def udp_received(self) -> bool:
        try:
            return self.udp.recv(100) == b"exfiltrated"
        except BlockingIOError:
            return False

    def close(self) -> None:
        self._stop = True
        self._acceptor.join(2)
        for s in (self.tcp, self.udp, self.abstract):
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _fill(value: Any, values: dict[str, str]) -> Any:
    """Fill placeholders in privileges (ports become numbers)."""
    if isinstance(value, str):
        out = value.format(**values)
        return int(out) if value == "{tcp}" else out
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    return value


def _spec(privileges: dict[str, Any]) -> dict[str, Any]:
    return {"compartments": {
        "box": {"functions": ["hostile:attempt"], "restart": "on-failure", "max_restarts": 100,
                "restart_backoff": "10ms", "call_timeout": "30s", "privileges": privileges},
        "vault": {"trust": "safebox", "functions": ["hostile:vault_info", "hostile:vault_uid"]},
    }}


_STATUS = re.compile(r"killed by signal \d+ \((\w+)\)|exited with status (\d+)")


def outcome_of(call) -> str:  # type: ignore[no-untyped-def]
    try:
        return call()
    except CompartmentCrashed as exc:
        m = _STATUS.search(exc.status)
        if m and m.group(1):
            return f"killed:{m.group(1)}"
        if m:
            return f"exited:{m.group(2)}"
        return f"crashed:{exc.status}"


def selected(mode: str) -> list[Case]:
    return [c for c in CASES if c.only in ("both", mode)]


def run(cases: list[Case]) -> dict[str, str]:
    """Run ``cases`` (grouped by privileges, one app per group); return
    case name -> outcome."""
    targets = Targets()
    results: dict[str, str] = {}
    try:
        groups: dict[str, list[Case]] = {}
        for case in cases:
            groups.setdefault(json.dumps(case.privileges, sort_keys=True), []).append(case)
        for group in groups.values():
            # The vault's pid is needed to fill in the privileges (never), and
            # the arguments (often): start with placeholders for privileges.
            values = targets.values([0, 0, 0, 0])
            app = pycompart.App(_spec(_fill(group[0].privileges, values)))
            with app:
                vault = app.function("hostile:vault_info")()
                values = targets.values(vault)
                if "twin: main reads the safebox's memory through /proc/<pid>/mem" not in results:
                    # The attack code is right: main, unconfined, can do it.
                    results["twin: main reads the safebox's memory through /proc/<pid>/mem"] = \
                        _in_child(lambda: _read_mem(vault))
                attempt = app.function("hostile:attempt")
                box_uid = attempt("my_uid", "").split()[1]
                results.setdefault("box uid", box_uid)
                results.setdefault("vault uid", app.function("hostile:vault_uid")())
                for case in group:
                    arg = case.arg.format(**values)
                    outcome = outcome_of(lambda: attempt(case.attack, arg))
                    # Which uid the box runs as is the battery's to check
                    # (test_escape.py), not each case's.
                    results[case.name] = re.sub(rf"\b{box_uid}\b", "<box uid>", outcome)
                    if case.attack == "udp_send" and results[case.name].startswith("ok"):
                        import time

                        time.sleep(0.05)
                        if not targets.udp_received():
                            results[case.name] += " (but nothing arrived)"
        results.update(unconfined_twins(targets))
    finally:
        targets.close()
    return results


def expected(case: Case, mode: str) -> str:
    text = case.expect_user if (mode == "user" and case.expect_user) else case.expect
    return text.format(uid=os.geteuid())


# -- unconfined twins: the same action from a process pycompart does not confine --


def _in_child(fn) -> str:  # type: ignore[no-untyped-def]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            out = "ok:" + fn()
        except OSError as exc:
            import errno

            out = "denied:" + errno.errorcode.get(exc.errno or 0, str(exc))
        except BaseException as exc:
            out = f"denied:{type(exc).__name__}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    out = os.read(r, 500).decode()
    os.close(r)
    return out


def _read_mem(vault: list[int]) -> str:
    with open(f"/proc/{vault[3]}/mem", "rb", buffering=0) as f:
        f.seek(vault[1])
        return "read " + f.read(vault[2]).decode(errors="replace")


def unconfined_twins(targets: Targets) -> dict[str, str]:
    out: dict[str, str] = {}
    if ROOT:
        import hostile as h

        def suid() -> str:
            res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                  targets.suid, "-u"], capture_output=True, timeout=10)
            return "euid " + res.stdout.decode().strip()
        out["twin: setuid-root binary without NO_NEW_PRIVS"] = _in_child(suid)

        def mount() -> str:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS: never touch the host's mounts
                raise OSError(ctypes.get_errno(), "unshare")
            libc.mount(b"none", b"/", None, ctypes.c_ulong(0x40000 | 0x4000), None)  # MS_PRIVATE|MS_REC
            return h.mount_tmpfs(targets.outside)
        out["twin: mount as root"] = _in_child(mount)
        out["twin: load a kernel module as root"] = _in_child(lambda: h.load_module(""))
    return out


UNCONFINED = {
    "twin: setuid-root binary without NO_NEW_PRIVS": "ok:euid 0",
    "twin: mount as root": "ok:mounted",
    "twin: load a kernel module as root": "denied:EBADF" if MODULES else "denied:ENOSYS",
    "twin: main reads the safebox's memory through /proc/<pid>/mem": "ok:read SAFEBOX-SECRET",
}


def main() -> None:
    """Entry for escape_runner.py: run the battery for this uid, print JSON."""
    mode = "root" if ROOT else "user"
    cases = selected(mode)
    results = run(cases)
    print(json.dumps({"mode": mode, "results": results,
                      "expected": {c.name: expected(c, mode) for c in cases}}))

