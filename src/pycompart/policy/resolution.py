"""Policy resolution: from a compartment's ``[privileges]`` and this host to
a concrete ``Lockdown`` plan.

This is where every decision is made, in ``main``, before any process is
started: which paths are added read-only, which uid the instance becomes,
which mechanisms are needed for each privilege and whether the host has
them. With ``enforcement = "strict"`` (the default) a privilege that cannot
be enforced raises ``PrivilegeError`` naming it; with ``"best-effort"`` it
is left out and a warning is issued once per missing mechanism. The instance
only executes the plan (``pycompart.compartment.lockdown``).
"""

from __future__ import annotations

import functools
import glob
import os
import platform
import pwd
import stat
import sys
import warnings
from collections.abc import Sequence

import msgspec

from .._version import __version__
from ..errors import PrivilegeError
from ..kernel import credentials, files, host as _host, seccomp
from ..kernel.host import HostSupport
from ..wire.config import Lockdown
from .spec import CompartmentSpec, Privileges

#: Read-only for every instance: shared libraries (extension modules load
#: them), the loader cache, time zone data, harmless devices, and the
#: instance's own /proc entry (resolved inside the instance, so it is its own
#: pid's, never another process's).
SYSTEM_READ = ("/usr/lib", "/lib", "/lib64", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
               "/etc/localtime", "/usr/share/zoneinfo", "/dev/urandom", "/dev/random",
               # Of /proc/self, what a process reads about itself; not its
               # environment, mounts (the host's layout) or cgroup paths.
               *(f"/proc/self/{entry}" for entry in (
                   "fd", "fdinfo", "status", "stat", "statm", "maps", "task")))
SYSTEM_WRITE = ("/dev/null",)


#: The ids a compartment gets when main is root and its spec names no
#: ``user``: one per compartment, like systemd's DynamicUser, in a block
#: systemd's scheme leaves unused (65536-524287: below the container
#: ranges) so that no user, system service or container holds it.
#: ``pycompart.supervisor.identities`` allocates them.
DYNAMIC_IDS = range(0x60000, 0x70000)  # 393216-458751
DYNAMIC = -1  # "allocate one at start" in a plan being resolved

#: Address space an instance maps before it runs compartment code (the
#: interpreter forked from the zygote: 20-24 MiB measured on x86_64 with
#: Python 3.11), plus room to import a module and serve. Below it an
#: instance cannot start (it says so: ``compartment.lockdown``).
MIN_INSTANCE_MEMORY = 48 * 2**20
#: What each further thread reserves: its stack (8 MiB) and, with glibc, a
#: malloc arena of up to 64 MiB of address space.
THREAD_MEMORY = 72 * 2**20


class PrivilegeWarning(UserWarning):
    """A privilege was left unenforced under ``enforcement = "best-effort"``."""


class Resolution(msgspec.Struct):
    """The plan plus what ``pycompart check`` shows about it."""

    lockdown: Lockdown
    auto_read: list[str]
    missing: list[str]  # mechanisms this host lacks (left out under best-effort)
    notes: list[str]
    #: Grants that will likely not work (a limit too small to start in).
    warnings: list[str] = msgspec.field(default_factory=list)


_warned: set[tuple[str, str]] = set()


def resolve(comp: CompartmentSpec, sys_path: Sequence[str], main_path: str | None,
            host: HostSupport | None = None, euid: int | None = None) -> Resolution:
    """The lock-down for ``comp``. Raises ``PrivilegeError`` (strict) or
    warns (best-effort) for each privilege this host cannot enforce."""
    p = comp.privileges
    host = host or _host.probe()
    euid = os.geteuid() if euid is None else euid
    missing: list[str] = []
    #: Mistakes only this host can show (a user it lacks, a system call
    #: its architecture lacks): all reported at once, one per line.
    wrong: list[str] = []
    notes: list[str] = []
    lock = Lockdown(compartment=comp.name)

    def need(ok: bool, what: str) -> bool:
        if not ok:
            missing.append(what)
        return ok

    # -- who ---------------------------------------------------------------------
    uid, gid = _identity(comp, p, euid, need, notes, wrong)
    lock.uid, lock.gid = uid, gid
    if uid == DYNAMIC:
        # A uid of its own, allocated when the app starts; for the checks
        # below any id of the range stands for it (it owns nothing).
        lock.uid = lock.gid = None
        lock.dynamic_user = True
        uid = gid = DYNAMIC_IDS.start
    target_uid = euid if uid is None else uid
    # As non-root, every instance gets a user namespace of its own (mapping
    # only its uid): the other namespaces are made in it, and the kernel
    # counts RLIMIT_NPROC per user namespace, so ``processes`` bounds this
    # instance's tasks alone rather than every process of main's user.
    lock.user_namespace = euid != 0 and host.net_namespace
    caps = []
    for name in p.capabilities:
        if name not in credentials.CAPABILITIES:
            wrong.append(f"compartment {comp.name!r}: privileges.capabilities: unknown capability "
                         f"{name!r}{_did_you_mean(name, credentials.CAPABILITIES)}")
            continue
        caps.append(credentials.CAPABILITIES[name])
    if caps and need(euid == 0, "capabilities (only a process started as root has any to keep)"):
        lock.keep_capabilities = sorted(caps)

    # -- limits ------------------------------------------------------------------
    limits = {k: v for k, v in (("memory", p.memory), ("cpu_seconds", p.cpu_seconds),
                                ("open_files", p.open_files), ("file_size", p.file_size))
              if v is not None}
    if p.processes is not None:
        defaulted = "processes" in p.defaulted
        unbounded = target_uid == 0 or {"CAP_SYS_RESOURCE", "CAP_SYS_ADMIN"} & set(p.capabilities)
        shared_uid = euid != 0 and not lock.user_namespace
        if unbounded or shared_uid:
            why = ("RLIMIT_NPROC does not bind uid 0 or CAP_SYS_RESOURCE/CAP_SYS_ADMIN: run the "
                   "compartment as a non-root user" if unbounded else
                   "without a user namespace RLIMIT_NPROC would count every process of main's user")
            if defaulted:
                notes.append(f"the default bound of {p.processes} processes and threads is not "
                             f"applied ({why})")
            else:
                need(False, f"processes ({why})")
        else:
            limits["processes"] = p.processes
            whose = ("this instance alone (its own user namespace)" if lock.user_namespace else
                     "every instance of this compartment (its own uid)" if lock.dynamic_user else
                     f"every process and thread of uid {target_uid}, including other instances "
                     "running as that user")
            notes.append(f"processes = {p.processes}{' (default)' if defaulted else ''}: the processes "
                         f"and threads its code may start, counted for {whose} (the instances "
                         "themselves are the monitor's to bound: instances, max_instances, edges)")
    if p.memory is not None and "memory" in p.defaulted:
        notes.append(f"memory = {p.memory // 2**20} MiB of address space (default; "
                     '"unlimited" lifts it)')
    lock.limits = limits
    warnings_: list[str] = []
    if p.memory is not None:
        mib = p.memory // 2**20
        if p.memory < MIN_INSTANCE_MEMORY:
            warnings_.append(f"memory = {mib} MiB is below the ~{MIN_INSTANCE_MEMORY // 2**20} MiB of "
                             "address space an instance needs to start (the interpreter alone maps "
                             "~24 MiB); it will refuse to start")
        elif p.syscalls != "python" and p.memory < MIN_INSTANCE_MEMORY + THREAD_MEMORY:
            warnings_.append(f"memory = {mib} MiB leaves no room for a thread: each reserves ~"
                             f"{THREAD_MEMORY // 2**20} MiB of address space (stack and malloc arena)")

    # -- files -------------------------------------------------------------------
    auto_read, too_wide = _auto_read(sys_path, main_path)
    for path in too_wide:
        warnings_.append(f"{path} is on sys.path (as the working directory is, under -m) but is "
                         f"{'the root directory' if path == os.sep else 'a home directory'}: it is "
                         "not made readable (everything in it would be); a module there is "
                         "importable in a compartment only if privileges.filesystem.read grants it")
    if need(host.landlock_abi >= 3, f"filesystem rules (Landlock ABI 3, this kernel has "
                                    f"{host.landlock_abi})"):
        lock.fs = True
        lock.fs_read = _dedupe(auto_read + list(SYSTEM_READ) + list(p.read))
        lock.fs_write = _dedupe(list(SYSTEM_WRITE) + list(p.write))
        lock.fs_symlinks, lock.fs_fifos = p.symlinks, p.fifos
        lock.fs_execute = list(p.execute)
        if p.execute:
            lock.fs_execute += _dynamic_loaders()
    if p.file_metadata == "own-files" and not lock.dynamic_user:
        need(False, "file_metadata = 'own-files' (only a compartment with a uid of its own owns "
             "only the files it made: main must run as root, and privileges.user must not be set)")
    if uid is not None and uid != euid:
        who = "its uid" if lock.dynamic_user else f"uid {uid}"
        for d in _dedupe([os.path.abspath(e) for e in sys_path if e]):
            if not os.path.isdir(d):
                continue
            reach = reachability(d, uid, gid)
            if reach == "ancestors":
                lock.preopen.append(d)
                notes.append(f"{who} cannot reach {d}; it is opened before the uid drop and "
                             "imported through /proc/self/fd (imports work; opening files there by "
                             "path does not)")
            elif reach == "denied":
                notes.append(f"{who} may not read the directory {d} itself (its mode): modules "
                             "there cannot be imported by this compartment; make it readable "
                             "(chmod o+rx) or set privileges.user")

    # -- network -----------------------------------------------------------------
    mode = p.network.mode
    if mode in ("none", "loopback"):
        if need(host.net_namespace, f"network = {mode!r} (a network namespace: {host.namespace_detail})"):
            lock.net_namespace = True
            lock.loopback = mode == "loopback"
        if mode == "none" and need(host.landlock_tcp, "network = 'none' (Landlock TCP rules, ABI 4)"):
            lock.tcp = True
        lock.sockets = "inet" if mode == "loopback" else "none"
    elif mode == "ports":
        if need(host.landlock_tcp, f"network ports (Landlock TCP rules need ABI 4, this kernel has "
                                   f"{host.landlock_abi})"):
            lock.tcp = True
            lock.tcp_connect = list(p.network.connect)
            lock.tcp_bind = list(p.network.bind)
        lock.sockets = "inet-stream"
        notes.append("network ports: TCP only (UDP, raw and unix-domain sockets cannot be created, "
                     "so name resolution over UDP DNS fails; use addresses)")
    else:
        lock.sockets = "any"
        notes.append("network = 'host': the host's network, unrestricted")
    # IPC namespace: as root always; as non-root inside its user namespace.
    lock.ipc_namespace = host.net_namespace

    # -- scopes and syscalls ------------------------------------------------------
    if need(host.landlock_scopes, f"signal and abstract-socket isolation (Landlock scopes, ABI 6; "
                                  f"this kernel has {host.landlock_abi})"):
        lock.scopes = True
    if p.syscalls not in seccomp.PROFILES:
        wrong.append(f"compartment {comp.name!r}: privileges.syscalls: unknown profile {p.syscalls!r}"
                     f"{_did_you_mean(p.syscalls, seccomp.PROFILES)} (known: {', '.join(seccomp.PROFILES)})")
    for key, names in (("allow", p.syscalls_allow), ("deny", p.syscalls_deny), ("kill", p.syscalls_kill)):
        unknown = [n for n in names if not seccomp.known(n)] if host.seccomp else []
        if unknown:
            wrong.append(f"compartment {comp.name!r}: privileges.syscalls.{key}: unknown system call(s) "
                         f"on this architecture: {', '.join(unknown)}")
    if wrong:
        raise PrivilegeError("\n".join(wrong))
    if need(host.seccomp, f"syscalls (seccomp: {host.seccomp_detail})"):
        lock.seccomp = True
        lock.syscall_profile = p.syscalls
        lock.syscalls_allow = list(p.syscalls_allow)
        lock.syscalls_deny = list(p.syscalls_deny)
        lock.syscalls_kill = list(p.syscalls_kill)
        lock.file_metadata, lock.file_locks = p.file_metadata, p.file_locks
        try:
            lock.seccomp_bpf = _compiled(p.syscalls, tuple(p.syscalls_allow), tuple(p.syscalls_deny),
                                         tuple(p.syscalls_kill), lock.sockets, p.file_metadata,
                                         p.file_locks, p.fifos)
        except seccomp.SeccompError as exc:  # libseccomp missing or unusable: not enforceable here
            lock.seccomp = False
            need(False, f"syscalls (seccomp: {exc.strerror or exc})")
        if p.file_locks:
            notes.append("file_locks: may lock (flock, fcntl) every file it may open, read-only ones "
                         "included; grant read access narrowly")
        granted = seccomp.ALWAYS_KILL & set(p.syscalls_allow)
        if granted:
            notes.append("explicitly allowed, normally fatal: " + ", ".join(sorted(granted)))

    if comp.on_demand is not None and comp.template and lock.seccomp:
        why_not = template_obstacle(lock)
        if why_not is None:
            try:
                lock.template_bpf = _compiled(p.syscalls, tuple(p.syscalls_allow), tuple(p.syscalls_deny),
                                              tuple(p.syscalls_kill), lock.sockets, p.file_metadata,
                                              p.file_locks, p.fifos, True)
                lock.no_fork_bpf = _compiled("no-fork", tuple(p.syscalls_allow), (), (), "", "", False,
                                             False, False)
            except seccomp.SeccompError:
                lock.template_bpf = lock.no_fork_bpf = b""
        else:
            notes.append(f"instances start afresh, not forked from a template: {why_not}")

    if comp.mechanism == "inline":
        missing.append("every privilege (mechanism = 'inline' runs the compartment inside main)")
        if not p.explicit:
            missing.clear()  # nothing was asked for; inline is a debugging aid

    _settle(comp, p, missing)
    return Resolution(lock, auto_read, missing, notes, warnings_)


#: System calls with which instances forked from one template could reach
#: each other through what they share (its IPC namespace; forking itself).
_SHARED_REACH = frozenset("""
shmget shmat shmctl shmdt msgget msgsnd msgrcv msgctl semget semop semtimedop semctl
mq_open mq_unlink mq_timedsend mq_timedreceive mq_notify mq_getsetattr clone fork vfork clone3
""".split())


def template_obstacle(lock: Lockdown) -> str | None:
    """Why instances of a compartment locked down by ``lock`` cannot be
    forked from one template (``pycompart.compartment.template``), or None.
    Instances of one template share its network and IPC namespaces and
    its process group; each gets a Landlock domain of its own, nested in
    the template's, so that none can signal another or reach its abstract
    sockets. That is only as good as each instance's own would be where
    they cannot make sockets in a private network namespace or use
    System V / POSIX IPC, and where Landlock scopes them apart."""
    if not lock.scopes or not lock.signal_scope:
        return "no Landlock scopes to keep its instances apart"
    if lock.net_namespace and lock.sockets != "none":
        return "its instances could reach each other over a shared loopback network"
    reach = _SHARED_REACH & set(lock.syscalls_allow)
    if reach:
        return f"privileges.syscalls.allow names {', '.join(sorted(reach))}"
    if lock.keep_capabilities:
        return "it keeps capabilities"
    return None


#: Compiled seccomp filters, by what they were compiled from (per user:
#: ``kernel.files.own_directory``). Compiling one with libseccomp costs main
#: ~10 ms, loading libseccomp as much again; a program started often pays it
#: once. Delete the directory to have them compiled afresh.
FILTER_CACHE = "/var/tmp/pycompart-seccomp"


@functools.lru_cache(maxsize=64)
def _compiled(profile: str, allow: tuple[str, ...], deny: tuple[str, ...], kill: tuple[str, ...],
              sockets: str, metadata: str, locks: bool, fifos: bool, template: bool = False) -> bytes:
    """(``profile`` "no-fork": ``seccomp.compile_no_fork``.)"""
    inputs = repr((profile, allow, deny, kill, sockets, metadata, locks, fifos, template)).encode()
    maker = files.source_digest(seccomp.__file__).encode()  # the profiles live in its source
    key = files.digest(b"\0".join((inputs, platform.machine().encode(), __version__.encode(),
                                   maker)))[:32]
    path = None
    try:
        path = os.path.join(files.own_directory(f"{FILTER_CACHE}-{os.getuid()}", 0o700), key + ".bpf")
        cached = files.read_own_file(path, seccomp.MAX_PROGRAM_BYTES)
    except OSError:
        cached = None
    if cached and len(cached) % 8 == 0:
        return cached
    if profile == "no-fork":
        program = seccomp.compile_no_fork(allow)
    else:
        program = seccomp.compile_bpf(profile, allow, deny, kill, sockets, metadata, locks, fifos, template)
    if path is not None:
        try:
            files.write_own_file(path, program)
        except OSError:
            pass  # compiled again next time
    return program


def _did_you_mean(name: object, known: object) -> str:
    import difflib  # (only for a spec with a mistake in it)

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.8)  # type: ignore[attr-defined]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _identity(comp: CompartmentSpec, p: Privileges, euid: int, need, notes: list[str],  # type: ignore[no-untyped-def]
              wrong: list[str]):
    if euid != 0:
        if p.user is not None:
            try:
                uid, _ = credentials.resolve_user(p.user)
            except KeyError:
                wrong.append(f"compartment {comp.name!r}: privileges.user: no such user {p.user!r}")
            else:
                need(uid == euid, f"user = {p.user!r} (changing user needs root; main runs as uid {euid})")
        if p.group is not None:
            need(False, f"group = {p.group!r} (changing group needs root)")
        notes.append(f"main is not root: instances keep uid {euid}; they are kept apart by Landlock, "
                     "seccomp, scopes and non-dumpable, not by uid")
        return None, None
    if p.user is None:
        if p.group is not None:
            wrong.append(f"compartment {comp.name!r}: privileges.group: {p.group!r} without a user (a "
                         "compartment's own uid comes with a group of its own; name a user to choose the group)")
        notes.append(f"a uid and gid of its own (pycompart's range {DYNAMIC_IDS.start}-"
                     f"{DYNAMIC_IDS.stop - 1}, allocated when the app starts): no other compartment, "
                     "app or user shares them")
        return DYNAMIC, DYNAMIC
    user = p.user
    try:
        uid, gid = credentials.resolve_user(user)
    except KeyError:
        wrong.append(f"compartment {comp.name!r}: privileges.user: no such user {user!r}")
        uid = gid = DYNAMIC  # (checked on with any uid of the range)
    if p.group is not None:
        try:
            gid = credentials.resolve_group(p.group)
        except KeyError:
            wrong.append(f"compartment {comp.name!r}: privileges.group: no such group {p.group!r}")
    if uid == 0:
        notes.append("runs as root (user = 'root'): capabilities are still dropped, but root-owned "
                     "files are reachable where Landlock allows, and processes cannot be bounded")
    return uid, gid


def _settle(comp: CompartmentSpec, p: Privileges, missing: list[str]) -> None:
    if not missing:
        return
    if p.enforcement == "strict":
        raise PrivilegeError(
            f"compartment {comp.name!r}: cannot enforce on this host: " + "; ".join(missing)
            + ". Grant less, fix the host (see `pycompart doctor`), or set "
            'privileges.enforcement = "best-effort"')
    for what in missing:
        if (comp.name, what) not in _warned:
            _warned.add((comp.name, what))
            warnings.warn(f"pycompart: compartment {comp.name!r} runs WITHOUT {what} "
                          "(enforcement = best-effort)", PrivilegeWarning, stacklevel=4)


def _auto_read(sys_path: Sequence[str], main_path: str | None) -> tuple[list[str], list[str]]:
    """What every compartment may read so that it can import what main
    can: ``sys.path``, the program and the interpreter; and the entries
    left out as too wide (``_too_wide``)."""
    out, skipped = [], []
    too_wide = _too_wide()
    for entry in sys_path:
        path = os.path.abspath(entry or os.getcwd())
        if os.path.exists(path):
            (skipped if path in too_wide else out).append(path)
    if main_path:
        out.append(main_path)
    out.append(os.path.realpath(sys.executable))
    return _dedupe(out), _dedupe(skipped)


def _too_wide() -> set[str]:
    """The root directory and this user's home directories: on
    ``sys.path`` as the working directory (``python -m`` puts it first),
    they hold far more than code (``~/.ssh``)."""
    homes = [os.environ.get("HOME") or ""]
    try:
        homes.append(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        pass
    return {os.sep} | {os.path.abspath(home) for home in homes if home}


def _dynamic_loaders() -> list[str]:
    """The ELF interpreter is opened for execution by the kernel, so running
    any program needs execute permission on it too."""
    found = []
    for pattern in ("/lib64/ld-linux*.so*", "/lib/ld-linux*.so*", "/lib/*/ld-linux*.so*",
                    "/usr/lib/*/ld-linux*.so*", "/lib/ld-musl*.so*"):
        found += glob.glob(pattern)
    return _dedupe(found)


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def reachability(path: str, uid: int, gid: int | None) -> str:
    """For ``uid``/``gid`` (no supplementary groups) and directory ``path``:
    ``"ok"`` (every directory on the way can be searched and ``path`` read),
    ``"ancestors"`` (only a directory above it is in the way) or
    ``"denied"`` (``path`` itself may not be searched or listed)."""
    parts = os.path.abspath(path).split(os.sep)
    verdict = "ok"
    for i in range(1, len(parts) + 1):
        d = os.sep.join(parts[:i]) or os.sep
        try:
            st = os.stat(d)
        except OSError:
            return "denied"
        if uid == 0 or not stat.S_ISDIR(st.st_mode):
            continue
        last = i == len(parts)
        if st.st_uid == uid:
            shift = 6
        elif gid is not None and st.st_gid == gid:
            shift = 3
        else:
            shift = 0
        need = 0o5 if last else 0o1  # r-x for the directory itself, x on the way
        if (st.st_mode >> shift) & need != need:
            if last:
                return "denied"
            verdict = "ancestors"
    return verdict

