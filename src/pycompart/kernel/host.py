"""What this host can enforce, found by asking the kernel (not by version
numbers): used by the policy layer to fail closed and by ``pycompart doctor``.

Namespace support is probed in a short-lived forked child, because the only
reliable test of "may this process create a network namespace" is to try.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Sequence

import msgspec

from . import landlock, namespaces, seccomp


class HostSupport(msgspec.Struct, frozen=True):
    root: bool
    landlock_abi: int
    seccomp: bool
    seccomp_detail: str
    net_namespace: bool  # for this process's uid (as non-root: inside a user namespace)
    namespace_detail: str
    cgroup_v1: tuple[str, ...]  # writable v1 controllers (memory, pids, ...)
    cgroup_v2: bool

    @property
    def landlock_fs(self) -> bool:
        return self.landlock_abi >= 1

    @property
    def landlock_tcp(self) -> bool:
        return self.landlock_abi >= 4

    @property
    def landlock_scopes(self) -> bool:
        return self.landlock_abi >= 6


def _seccomp() -> tuple[bool, str]:
    try:
        with open("/proc/self/status") as f:
            has_field = any(line.startswith("Seccomp:") for line in f)
    except OSError:
        has_field = False
    if not has_field:
        return False, "the kernel has no seccomp (CONFIG_SECCOMP_FILTER)"
    if not seccomp.available():
        return False, "libseccomp (the pyseccomp package and libseccomp2) is not installed"
    return True, "seccomp filters via libseccomp"


def _probe_namespaces() -> tuple[bool, str]:
    """Try, in a forked child, exactly what an instance will do."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            namespaces.isolate(net=True, loopback=True)
        except OSError as exc:
            os.write(w, str(exc).encode()[:500])
            code = 1
        except BaseException:
            code = 2
        os._exit(code)
    os.close(w)
    try:
        message = os.read(r, 600).decode(errors="replace")
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        how = "as root" if os.geteuid() == 0 else "inside an unprivileged user namespace"
        return True, f"network and IPC namespaces ({how})"
    return False, message or f"namespace probe failed (status {status:#x})"


def _cgroups() -> tuple[tuple[str, ...], bool]:
    v1 = tuple(c for c in ("memory", "pids", "cpu")
               if os.path.isdir(f"/sys/fs/cgroup/{c}") and os.access(f"/sys/fs/cgroup/{c}", os.W_OK))
    v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
    return v1, v2


@functools.lru_cache(maxsize=1)
def probe() -> HostSupport:
    """Probe once per process (the namespace probe forks)."""
    ok, detail = _seccomp()
    ns, ns_detail = _probe_namespaces()
    v1, v2 = _cgroups()
    return HostSupport(root=os.geteuid() == 0, landlock_abi=landlock.abi_version(), seccomp=ok,
                       seccomp_detail=detail, net_namespace=ns, namespace_detail=ns_detail,
                       cgroup_v1=v1, cgroup_v2=v2)


def runtime_problems(executable: str | None = None, runtime_dirs: Sequence[str] = ()) -> list[str]:
    """What stops this process's user from starting a zygote at all: the
    interpreter it is exec'd from, or the directories holding pycompart and
    its dependencies, out of this uid's reach (a virtualenv whose
    ``bin/python`` links into a 0700 home directory, say)."""
    exe = executable or sys.executable
    uid = os.geteuid()
    problems = []
    if not exe:
        return ["this interpreter does not know its own executable (sys.executable is empty), so "
                "no zygote can be started from it"]
    if not os.access(exe, os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        real = os.path.realpath(exe)
        where = _blocking_directory(exe) or _blocking_directory(real)
        why = (f"the directory {where} on its way is not searchable by this uid" if where
               else "it is not executable by this uid")
        problems.append(
            f"the interpreter {exe}" + (f" (-> {real})" if real != exe else "")
            + f" cannot be executed by uid {uid}: {why}. The zygote is started from it. Use an "
            "interpreter and virtualenv this user can reach (for example `python3 -m venv "
            "/opt/app-venv` from /usr/bin/python3)" + (f", or make {where} searchable (chmod o+x)"
                                                       if where else ""))
    for d in runtime_dirs:
        if not os.access(d, os.R_OK | os.X_OK):
            problems.append(f"the directory {d} (pycompart or one of its dependencies) cannot be "
                            f"read by uid {uid}; the zygote imports from it")
    return problems


def _blocking_directory(path: str) -> str | None:
    """The first directory above ``path`` that this process may not search."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(1, len(parts)):
        d = os.sep.join(parts[:i]) or os.sep
        if not os.access(d, os.X_OK):
            return d
    return None
