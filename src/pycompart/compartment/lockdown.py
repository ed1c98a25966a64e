"""The lock-down of a new instance: the design's order, applied once.

``Lockdown`` (``pycompart.wire.config``) is the concrete plan that ``pycompart.policy`` computed in
``main`` from the spec and the host (resolved paths, uid numbers, ports,
syscall lists: no decisions left). ``apply()`` runs inside the instance,
after process hygiene and before any import of the compartment's code:

1. prepare, with nothing changed yet: open the Landlock path rules while
   the paths are still reachable (the import directories the new uid could
   not traverse were opened just before);
2. namespaces (network, IPC; as non-root inside a user namespace);
3. resource limits;
4. empty the capability bounding set (while CAP_SETPCAP is still held);
   drop supplementary groups, gid and uid; empty the other capability sets
   (except what the spec keeps); re-arm the parent-death signal, which the
   kernel clears on a credential change;
5. NO_NEW_PRIVS (no setuid binary or file capability can undo 4);
6. non-dumpable (no ptrace or /proc/<pid>/mem access by the same uid);
7. Landlock (files, TCP ports, signal and abstract-socket scopes);
8. seccomp, last, so nothing after it can loosen anything (the BPF program
   was compiled once in main; loading it is one system call).

Any failure raises ``PrivilegeError`` naming the mechanism; the instance
then reports it and exits without running compartment code (fail closed).
"""

from __future__ import annotations

import os
import signal
import stat
import sys

from ..errors import PrivilegeError
from ..kernel import credentials, landlock, namespaces, process, rlimits, seccomp
from ..wire.config import Lockdown


#: The limits applied so far in this process (for naming the cause of a
#: later failure: with a tight ``memory`` every allocation may fail).
_limits_applied: dict[str, int] = {}


class _step:  # noqa: N801 - used as ``with _step("..."):``
    """Names the mechanism in any error raised while enforcing it, and the
    real cause where it is not the mechanism itself."""

    __slots__ = ("what",)

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:  # type: ignore[no-untyped-def]
        if exc is not None and not isinstance(exc, PrivilegeError):
            raise PrivilegeError(f"cannot enforce {self.what}: {_cause(exc)}") from exc
        return False


def _cause(exc: BaseException) -> str:
    if isinstance(exc, MemoryError) and "memory" in _limits_applied:
        return (f"out of memory under the compartment's memory limit of "
                f"{_limits_applied['memory'] // 2**20} MiB (address space, RLIMIT_AS); raise "
                "privileges.memory")
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


#: Address space an instance needs beyond what it maps when the limit is
#: set: room to import the compartment's module and start serving.
MEMORY_HEADROOM = 16 * 2**20


def mapped_bytes() -> int:
    """This process's address space now (VmSize), what RLIMIT_AS counts."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _check_memory(limit: int | None) -> None:
    if limit is None:
        return
    mapped = mapped_bytes()
    if limit < mapped + MEMORY_HEADROOM:
        need = -(-(mapped + MEMORY_HEADROOM) // 2**20)
        raise PrivilegeError(
            f"cannot enforce memory = {limit // 2**20} MiB: this instance already maps "
            f"{mapped // 2**20} MiB of address space before running any compartment code (the "
            f"interpreter forked from the zygote), so it could not even start; give it at least "
            f"{need} MiB plus what the compartment itself uses (each thread reserves its stack "
            "and a malloc arena as well)")


def preopen(paths: list[str]) -> dict[str, str]:
    """Open each directory with O_PATH and return path -> ``/proc/self/fd/N``.
    The descriptors stay open for the instance's life: a process can always
    resolve its own ``/proc/self/fd`` links, so imports keep working after
    the uid drop even below a directory the new uid cannot traverse (a
    virtualenv in a 0700 home directory, pyenv under /root)."""
    out: dict[str, str] = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY)  # not O_CLOEXEC: no exec happens anyway
        except OSError:
            continue
        out[path] = f"/proc/self/fd/{fd}"
        _REACHED_AS[out[path]] = path
    return out


#: ``/proc/self/fd/N`` -> the directory it stands for (``preopen``).
_REACHED_AS: dict[str, str] = {}


def original_path(path: str) -> str:
    """A path under a pre-opened directory as the directory's own path: what
    a file name means to any other process (a warning's, shown by main)."""
    if path.startswith("/proc/self/fd/"):
        head, sep, rest = path[len("/proc/self/fd/"):].partition("/")
        found = _REACHED_AS.get("/proc/self/fd/" + head)
        if found is not None:
            return found + sep + rest
    return path


def apply(lock: Lockdown, template: bool = False) -> None:
    """Enforce ``lock`` on this process, in the design's order. ``template``:
    as a template of the compartment (``pycompart.compartment.template``),
    which may fork its instances and read all of ``/proc`` (each instance
    it forks adds ``restrict_instance``)."""
    # 1. prepare: every path is opened now, while it is reachable.
    ruleset = None
    if template:
        with _step("filesystem rules of the template's instances (Landlock)"):
            _open_readable(lock)
    if lock.fs or lock.tcp or lock.scopes:
        with _step("filesystem/network rules (Landlock)"):
            ruleset = _landlock_ruleset(lock, template)
    program = lock.template_bpf if template else lock.seccomp_bpf
    if lock.seccomp and not program:
        raise PrivilegeError("cannot enforce syscalls: the plan has no compiled filter")
    # 2. namespaces
    if lock.net_namespace or lock.ipc_namespace or lock.user_namespace:
        with _step("network isolation (user/network/IPC namespaces)"):
            namespaces.isolate(net=lock.net_namespace, loopback=lock.loopback, ipc=lock.ipc_namespace,
                               user=lock.user_namespace)
    # 3. resource limits
    _check_memory(lock.limits.get("memory"))
    if "memory" in lock.limits:
        # Address space is what the limit counts: keep glibc from reserving
        # a 64 MiB malloc arena per thread out of it.
        rlimits.limit_malloc_arenas()
    with _step("resource limits (setrlimit)"):
        rlimits.apply(rlimits.Limits(**lock.limits))
    _limits_applied.update(lock.limits)
    # 4. credentials
    parent = os.getppid()
    if lock.drop_capabilities:
        with _step("capabilities (bounding set)"):
            credentials.drop_bounding_set(frozenset(lock.keep_capabilities))  # (before the uid drop ends CAP_SETPCAP)
    if lock.uid is not None and lock.gid is not None:
        with _step(f"user/group (uid {lock.uid}, gid {lock.gid})"):
            credentials.drop_to(lock.uid, lock.gid, keep_capabilities=bool(lock.keep_capabilities))
    if lock.drop_capabilities:
        with _step("capabilities"):
            credentials.clear_capabilities(frozenset(lock.keep_capabilities))
    if lock.bind_to_parent:
        process.set_parent_death_signal(signal.SIGKILL)  # cleared by the kernel on uid change
        if os.getppid() != parent:
            os._exit(1)
    # 5., 6.
    with _step("no_new_privs"):
        credentials.no_new_privs()
    with _step("non-dumpable"):
        credentials.not_dumpable()
    # 7. Landlock
    if ruleset is not None:
        with _step("filesystem/network rules (Landlock)"):
            ruleset.enforce()
    # 8. seccomp
    if lock.seccomp:
        with _step(f"syscalls (seccomp profile {lock.syscall_profile!r})"):
            seccomp.load_bpf(program)


#: What an instance reads about itself; a template's rules name its own
#: entries, so it may read all of /proc instead, and each instance it forks
#: narrows that to its own (``restrict_instance``).
_PROC_SELF = "/proc/self/"
#: ``O_PATH`` descriptors of what the compartment may read (``fs_read``,
#: ``fs_write``, ``fs_execute`` but its /proc/self entries), opened by its
#: template before it locked itself down, and whether each is a directory.
_READABLE: list[tuple[int, bool]] = []


def _open_readable(lock: Lockdown) -> None:
    if not lock.fs:
        return
    for path in [*lock.fs_read, *lock.fs_write, *lock.fs_execute]:
        if path.startswith(_PROC_SELF):
            continue
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        _READABLE.append((fd, stat.S_ISDIR(os.fstat(fd).st_mode)))


def restrict_instance(lock: Lockdown) -> None:
    """In an instance forked from a template (``apply(template=True)``):
    what it adds to the template's restrictions, which end as its
    compartment's own. A Landlock domain of its own, nested in the
    template's, so that it cannot signal or reach the abstract sockets of
    the template or of another instance, and reads only what the
    compartment may (its own /proc entries, not all of /proc); then a
    seccomp filter that takes forking away."""
    with _step("filesystem rules and scopes of the instance (Landlock)"):
        scopes = landlock.SCOPE_ABSTRACT_UNIX_SOCKET | landlock.SCOPE_SIGNAL if lock.scopes else 0
        rs = landlock.Ruleset(landlock.FS_READ if lock.fs else 0, 0, scopes)
        try:
            if rs.unsupported:
                raise PrivilegeError("this kernel's Landlock lacks " + "; ".join(rs.unsupported))
            for fd, is_dir in _READABLE:
                rs.allow_fd(fd, landlock.FS_READ, is_dir)
            rs.allow_paths([p for p in lock.fs_read if p.startswith(_PROC_SELF)], landlock.FS_READ)
        except BaseException:
            rs.close()
            raise
        rs.enforce()
        while _READABLE:
            os.close(_READABLE.pop()[0])
    if lock.seccomp:
        with _step("syscalls (seccomp: no forking, on top of the template's filter)"):
            seccomp.load_bpf(lock.no_fork_bpf)


def _landlock_ruleset(lock: Lockdown, template: bool = False) -> landlock.Ruleset:
    abi = landlock.abi_version()
    handle_fs = landlock.fs_rights(abi) if lock.fs else 0
    handle_net = landlock.NET_BIND_TCP | landlock.NET_CONNECT_TCP if lock.tcp else 0
    scopes = 0
    if lock.scopes:
        scopes = landlock.SCOPE_ABSTRACT_UNIX_SOCKET | (landlock.SCOPE_SIGNAL if lock.signal_scope else 0)
    rs = landlock.Ruleset(handle_fs, handle_net, scopes, abi)
    if rs.unsupported:
        rs.close()
        raise PrivilegeError("this kernel's Landlock lacks " + "; ".join(rs.unsupported))
    try:
        read = landlock.FS_READ
        if template:
            rs.allow_paths([p for p in lock.fs_read if not p.startswith(_PROC_SELF)] + ["/proc"], read)
        else:
            rs.allow_paths(lock.fs_read, read)
        write = read | landlock.FS_WRITE
        if lock.fs_symlinks:
            write |= landlock.FS_MAKE_SYM
        if lock.fs_fifos:
            write |= landlock.FS_MAKE_FIFO
        rs.allow_paths(lock.fs_write, write)
        rs.allow_paths(lock.fs_execute, read | landlock.FS_EXECUTE)
        for port in lock.tcp_connect:
            rs.allow_port(port, landlock.NET_CONNECT_TCP)
        for port in lock.tcp_bind:
            rs.allow_port(port, landlock.NET_BIND_TCP)
    except BaseException:
        rs.close()
        raise
    return rs


def index_packages() -> None:
    """In the zygote, before it forks: where each imported package finds
    its submodules (``reroute_packages``). After a fork every object an
    instance touches costs it a copied page; walking all of ``sys.modules``
    in each instance cost ~1.5 ms of them."""
    _PACKAGE_PATHS.clear()
    for module in list(sys.modules.values()):
        paths = getattr(module, "__path__", None)
        if isinstance(paths, list):
            _PACKAGE_PATHS.extend((paths, i, entry) for i, entry in enumerate(paths)
                                  if isinstance(entry, str))
    global _INDEXED
    _INDEXED = len(sys.modules)


_PACKAGE_PATHS: list[tuple[list[str], int, str]] = []
_INDEXED = -1  # len(sys.modules) when indexed


def reroute_packages(reach: dict[str, str]) -> None:
    """Packages imported before the drop (by the zygote: ``encodings``,
    ``json``, ...) find their submodules through ``__path__``; point those
    at the pre-opened descriptors too."""
    prefixes = sorted(reach, key=len, reverse=True)
    if len(sys.modules) == _INDEXED:
        entries = _PACKAGE_PATHS  # nothing was imported since the zygote indexed them
    else:
        entries = [(paths, i, entry) for module in list(sys.modules.values())
                   if isinstance(paths := getattr(module, "__path__", None), list)
                   for i, entry in enumerate(paths) if isinstance(entry, str)]
    for paths, i, entry in entries:
        if i >= len(paths) or paths[i] is not entry:
            continue  # changed since it was indexed: left as it is
        for prefix in prefixes:
            if entry == prefix or entry.startswith(prefix + os.sep):
                paths[i] = reach[prefix] + entry[len(prefix):]
                break
    sys.path_importer_cache.clear()

