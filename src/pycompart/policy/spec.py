"""The spec: what the application's compartments are and what they may do.

This module is *policy* only: it turns a TOML file (or a dict built in code)
into frozen structs (``msgspec.Struct``) and rejects anything it does not
understand. It never starts a process. Every error names the source, the
dotted key path, what was expected and what was found, because a spec is
security configuration and a silently ignored typo is a hole.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from ..errors import SpecError

#: No value given (``None`` may be one).
_MISSING: Any = object()

TRUST_MODELS = ("sandbox", "safebox", "mutual")
RESTART_POLICIES = ("never", "on-failure", "always")
MECHANISMS = ("process", "inline")

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}\Z")
_DOTTED_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_FUNCTION_RE = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z"
)
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|m|h)\s*\Z")
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*\Z")
_SIZE_UNITS = {
    None: 1, "B": 1, "k": 1024, "K": 1024, "KiB": 1024, "M": 1024**2, "MiB": 1024**2,
    "G": 1024**3, "GiB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

DEFAULT_MAX_MESSAGE = 128 * 1024**2  # room for a 64 MiB argument plus envelope


NETWORK_MODES = ("none", "loopback", "host")
FILE_METADATA = ("none", "own-files")
OUTPUT_MODES = ("relay", "prefixed", "null", "inherit")
STDIN_MODES = ("main", "null")
#: Default bounds on what one compartment may take from the host, so that a
#: thread or memory bomb cannot take it down; ``"unlimited"`` lifts them.
DEFAULT_MEMORY = 2 * 1024**3  # address space
DEFAULT_PROCESSES = 128  # tasks: processes and threads
ENFORCEMENT = ("strict", "best-effort")
#: Variables every instance gets from main's environment unless the spec's
#: ``environment`` list says otherwise: locale and time zone, nothing secret.
DEFAULT_ENVIRONMENT = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")


class Network(msgspec.Struct, frozen=True):
    """``mode`` is none, loopback or host; with ``ports`` mode is "ports" and
    ``connect``/``bind`` list the TCP ports allowed on the host's network."""

    mode: str = "none"
    connect: tuple[int, ...] = ()
    bind: tuple[int, ...] = ()


class Privileges(msgspec.Struct, frozen=True):
    """What an instance of one compartment may do. The defaults grant
    nothing beyond running Python: no files but the interpreter's and the
    compartment's code (read-only), no network, the ``python`` syscall
    profile, user ``nobody`` (when started as root), no capabilities."""

    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    execute: tuple[str, ...] = ()
    network: Network = Network()
    syscalls: str = "python"
    syscalls_allow: tuple[str, ...] = ()
    syscalls_deny: tuple[str, ...] = ()
    syscalls_kill: tuple[str, ...] = ()
    user: str | int | None = None  # None: nobody when root, else unchanged
    group: str | int | None = None
    capabilities: tuple[str, ...] = ()
    memory: int | None = DEFAULT_MEMORY  # None: unlimited
    cpu_seconds: int | None = None
    open_files: int | None = None
    processes: int | None = DEFAULT_PROCESSES  # None: unlimited
    file_size: int | None = None
    environment: tuple[str, ...] = DEFAULT_ENVIRONMENT
    enforcement: str = "strict"
    #: Changing file modes and times: "none", or "own-files" (chmod and utime
    #: without setuid/setgid bits, on files its own uid owns: the ones it made).
    file_metadata: str = "none"
    #: flock/fcntl locks on files it may open (read access is not lock access).
    file_locks: bool = False
    #: Creating symbolic links / FIFOs beneath ``write`` (Landlock rights).
    symlinks: bool = False
    fifos: bool = False
    #: Limits left at their defaults (enforced where the host can, noted where not).
    defaulted: tuple[str, ...] = ("memory", "processes")
    explicit: bool = False  # the spec had a [privileges] table


class CompartmentSpec(msgspec.Struct, frozen=True):
    """One compartment's policy. Durations are seconds, sizes bytes."""

    name: str
    trust: str = "sandbox"
    functions: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    #: Instances started with the app (0 for the on-demand kinds).
    instances: int = 1
    #: "per-call" (a fresh instance for each call, discarded after) or
    #: "per-connection" (one per connection a ``Broker`` hands over), or None:
    #: a fixed pool of ``instances``.
    on_demand: str | None = None
    #: On-demand instances that may exist at once; beyond, a call or a
    #: connection waits (up to its timeout) for one to end.
    max_instances: int = 16
    #: On-demand kinds: instances started ahead of need and kept ready, so
    #: that a call or a connection takes one instead of waiting for a start
    #: (each costs an idle instance's memory; they are not counted in
    #: ``max_instances``).
    spares: int = 1
    #: On-demand kinds: fork instances from a template of the compartment
    #: that imported its modules and locked itself down once
    #: (``pycompart.compartment.template``), where the lock-down allows.
    template: bool = True
    restart: str = "on-failure"
    max_restarts: int = 5
    restart_window: float = 60.0
    restart_backoff: float = 0.05
    call_timeout: float | None = 60.0
    cancel_grace: float = 0.5
    start_timeout: float = 10.0
    may_call: tuple[str, ...] = ()
    mechanism: str = "process"
    privileges: Privileges = Privileges()
    #: Private/dunder names of the compartment's objects that others may
    #: reach; ``("*",)`` for all (the default of a ``sandbox``, whose
    #: internals are main's to see: main is the trusted side).
    expose: tuple[str, ...] = ("*",)
    #: Whether others may set attributes on the compartment's objects and
    #: modules (default: yes for a ``sandbox``, no for ``safebox``/``mutual``).
    allow_setattr: bool = True
    #: Whether main may call a callable of its own that the compartment sent
    #: back unasked (not passed in that same call): by default it may not.
    allow_returned_callables: bool = False
    #: Whether a ``SystemExit`` or ``KeyboardInterrupt`` the compartment's
    #: code raises through a call is raised as itself in the caller (as it
    #: would be unboxed: a CLI entry point's ``sys.exit(2)``), or arrives as
    #: ``RemoteError``. The instance survives either way.
    allow_exit: bool = True
    #: ``module:name`` values of main copied into each instance at its start.
    shared: tuple[str, ...] = ()
    #: CPU seconds an instance may burn while no call is in flight (a thread
    #: left spinning after its call returned) before it is killed and
    #: replaced; None: no bound.
    idle_cpu: float | None = 10.0
    #: Where the instances' stdout/stderr go: relayed by main ("relay",
    #: "prefixed" with the compartment's name), "null", or "inherit" (main's
    #: own descriptors: unsafe, the compartment can take the terminal over).
    output: str = "relay"
    #: What the instances' ``sys.stdin`` reads: "main" (main's ``sys.stdin``
    #: as it is at the time, only while main is calling in: ``input()`` in a
    #: boxed module), or "null" (end of file). Default: "main" for a
    #: compartment of modules, "null" otherwise.
    stdin: str = "null"
    #: Its channel to main is a unix socket that carries descriptors as
    #: values (files, sockets, ``pycompart.Fd``) instead of a pair of pipes
    #: (faster, but refusing them).
    descriptors: bool = False


class AppSpec(msgspec.Struct, frozen=True):
    """The whole application: ``[app]`` plus every ``[compartments.NAME]``."""

    name: str = "app"
    source: str = "<dict>"
    audit_log: str | None = None
    mechanism: str = "process"
    max_message_size: int = DEFAULT_MAX_MESSAGE
    #: Objects one message from a compartment may make main build (see
    #: ``pycompart.wire.budget``).
    max_message_objects: int = 1_000_000
    compartments: Mapping[str, CompartmentSpec] = msgspec.field(default_factory=dict)
    #: ``[compartments.main.privileges]``: what main itself may do, enforced
    #: by ``pycompart run`` (None: main is not confined).
    main_privileges: Privileges | None = None

    def edges(self) -> list[tuple[str, str]]:
        """Every (caller, callee) pair that gets a channel. ``main`` may call
        every compartment; a compartment may call what its ``may_call`` lists."""
        out = [("main", name) for name in self.compartments]
        for c in self.compartments.values():
            out.extend((c.name, callee) for callee in c.may_call)
        return out


def parse_duration(value: Any) -> float:
    """``"5s"``, ``"250ms"``, ``"2m"``, ``"1h"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError("a positive duration")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            if seconds > 0:
                return seconds
    raise ValueError('a positive duration such as "5s", "250ms" or a number of seconds')


def parse_size(value: Any) -> int:
    """``"256MiB"``, ``"64KiB"``, ``"1GB"`` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size")
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m and int(m.group(1)) > 0:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError('a positive size such as "256MiB", "64KiB" or a number of bytes')


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


class _Reader:
    """Walks one table, converting keys and remembering which were used so
    that unknown keys are reported instead of ignored.

    Mistakes are recorded in ``errors`` (shared by every reader of one spec)
    and reading goes on with the key's default, so one pass finds them all;
    ``load_spec`` raises them together at the end."""

    def __init__(self, source: str, path: str, table: Any, errors: list[SpecError]):
        self.source = source
        self.path = path
        self.errors = errors
        if not isinstance(table, Mapping):
            errors.append(SpecError(source, path or "<top>", "a table", _describe(table)))
            table = {}
        self.table = table
        self.used: set[str] = set()

    def report(self, name: str, expected: str, value: Any = _MISSING) -> None:
        self.errors.append(self.error(name, expected, value))

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, expected: str, value: Any = _MISSING) -> SpecError:
        found = None if value is _MISSING else _describe(value)
        return SpecError(self.source, self.key(name), expected, found)

    def get(self, name: str, convert: Callable[[Any], Any], expected: str, default: Any) -> Any:
        self.used.add(name)
        if name not in self.table:
            return default
        value = self.table[name]
        try:
            return convert(value)
        except (ValueError, TypeError) as exc:
            self.report(name, str(exc) or expected, value)
            return default

    def sub(self, name: str) -> _Reader | None:
        self.used.add(name)
        if name not in self.table:
            return None
        return _Reader(self.source, self.key(name), self.table[name], self.errors)

    def empty(self, name: str) -> _Reader:
        """A reader of an absent sub-table (every key at its default)."""
        return _Reader(self.source, self.key(name), {}, self.errors)

    def finish(self) -> None:
        for name in self.table:
            if name not in self.used:
                import difflib  # (only for a spec with a mistake in it)

                known = sorted(self.used)
                close = difflib.get_close_matches(str(name), known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.errors.append(SpecError(self.source, self.key(str(name)),
                                             f"no such key ({hint}known: {', '.join(known)})", "an unknown key"))


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError("one of " + ", ".join(repr(c) for c in choices))
        return value
    return convert


def _str_list(pattern: re.Pattern[str], what: str) -> Callable[[Any], tuple[str, ...]]:
    def convert(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValueError(f"a list of {what}")
        for item in value:
            if not isinstance(item, str) or not pattern.match(item):
                raise ValueError(f"a list of {what}; {item!r} is not one")
        if len(set(value)) != len(value):
            raise ValueError(f"a list of {what} without duplicates")
        return tuple(value)
    return convert


def _positive_int(limit: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"an integer from 1 to {limit}")
        return value
    return convert


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000:
        raise ValueError("an integer from 0 to 10000")
    return value


def _spares(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 64:
        raise ValueError("an integer from 0 to 64")
    return value


def _instances(value: Any) -> int | str:
    if value in ON_DEMAND:
        return value  # type: ignore[no-any-return]
    if isinstance(value, str):
        raise ValueError('an integer from 1 to 256, "per-call" or "per-connection"')
    return _positive_int(256)(value)


ON_DEMAND = ("per-call", "per-connection")


def _timeout(value: Any) -> float | None:
    if value == "none":
        return None
    return parse_duration(value)


_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _expose(value: Any) -> tuple[str, ...]:
    if value == "all":
        return ("*",)
    if value == "none":
        return ()
    return _str_list(_IDENT_RE, 'attribute names, or "all" or "none"')(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a non-empty string")
    return value


def _compartment(reader: _Reader, name: str, default_mechanism: str, base_dir: str | None,
                 default_enforcement: str) -> CompartmentSpec:
    d = CompartmentSpec(name=name)
    spec = CompartmentSpec(
        name=name,
        trust=reader.get("trust", _one_of(TRUST_MODELS), "", d.trust),
        functions=reader.get("functions", _str_list(_FUNCTION_RE, '"module:function" names'), "", ()),
        modules=reader.get("modules", _str_list(_DOTTED_RE, "dotted module names"), "", ()),
        instances=reader.get("instances", _instances, 'an integer from 1 to 256, "per-call" or '
                             '"per-connection"', d.instances),
        max_instances=reader.get("max_instances", _positive_int(4096), "", d.max_instances),
        spares=reader.get("spares", _spares, "an integer from 0 to 64", d.spares),
        template=reader.get("template", _bool, "true or false", d.template),
        restart=reader.get("restart", _one_of(RESTART_POLICIES), "", d.restart),
        max_restarts=reader.get("max_restarts", _count, "", d.max_restarts),
        restart_window=reader.get("restart_window", parse_duration, "", d.restart_window),
        restart_backoff=reader.get("restart_backoff", parse_duration, "", d.restart_backoff),
        call_timeout=reader.get("call_timeout", _timeout, 'a duration or "none"', d.call_timeout),
        cancel_grace=reader.get("cancel_grace", parse_duration, "", d.cancel_grace),
        start_timeout=reader.get("start_timeout", parse_duration, "", d.start_timeout),
        may_call=reader.get("may_call", _str_list(_NAME_RE, "compartment names"), "", ()),
        mechanism=reader.get("mechanism", _one_of(MECHANISMS), "", default_mechanism),
        expose=reader.get("expose", _expose, "", None),
        allow_setattr=reader.get("allow_setattr", _bool, "true or false", None),
        allow_returned_callables=reader.get("allow_returned_callables", _bool, "true or false", False),
        allow_exit=reader.get("allow_exit", _bool, "true or false", True),
        shared=reader.get("shared", _str_list(_FUNCTION_RE, '"module:name" names'), "", ()),
        output=reader.get("output", _one_of(OUTPUT_MODES), "", d.output),
        stdin=reader.get("stdin", _one_of(STDIN_MODES), "", None),
        descriptors=reader.get("descriptors", _bool, "true or false", False),
        idle_cpu=reader.get("idle_cpu", _timeout, 'a duration or "none"', d.idle_cpu),
    )
    # A sandbox protects main from the compartment, not the compartment from
    # main: main may reach its internals (private names, attributes) as it
    # could unboxed. A safebox or mutual compartment is protected from main.
    sandbox = spec.trust == "sandbox"
    if isinstance(spec.instances, str):
        spec = msgspec.structs.replace(spec, on_demand=spec.instances, instances=0)
    if spec.stdin is None:
        spec = msgspec.structs.replace(spec, stdin="main" if spec.modules else "null")
    if spec.expose is None:
        spec = msgspec.structs.replace(spec, expose=("*",) if sandbox else ())
    if spec.allow_setattr is None:
        spec = msgspec.structs.replace(spec, allow_setattr=sandbox)
    privileges = reader.sub("privileges")
    if privileges is not None:
        spec = msgspec.structs.replace(spec, privileges=_privileges(privileges, base_dir, default_enforcement))
    else:
        spec = msgspec.structs.replace(spec, privileges=Privileges(enforcement=default_enforcement))
    reader.finish()
    return spec


_SYSCALL_RE = re.compile(r"[a-z_][a-z0-9_]{0,63}\Z")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CAP_RE = re.compile(r"(?i)(CAP_)?[a-z_]+\Z")


def _paths(base_dir: str | None) -> Callable[[Any], tuple[str, ...]]:
    def convert(value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError("a list of paths")
        out = []
        for item in value:
            if "\0" in item:
                raise ValueError(f"a list of paths; {item!r} contains a NUL byte")
            path = os.path.expanduser(item)
            if not os.path.isabs(path):
                path = os.path.join(base_dir or os.getcwd(), path)
            out.append(os.path.normpath(path))
        return tuple(dict.fromkeys(out))
    return convert


def _port_list(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in value):
        raise ValueError("a list of TCP port numbers from 1 to 65535")
    return tuple(sorted(set(value)))


def _network(reader: _Reader) -> Network:
    reader.used.add("network")
    if "network" not in reader.table:
        return Network()
    value = reader.table["network"]
    if isinstance(value, str):
        if value not in NETWORK_MODES:
            reader.report("network", '"none", "loopback", "host" or a table '
                          "{ connect = [ports], bind = [ports] }", value)
            return Network()
        return Network(mode=value)
    sub = reader.sub("network")
    assert sub is not None
    net = Network(mode="ports", connect=sub.get("connect", _port_list, "", ()),
                  bind=sub.get("bind", _port_list, "", ()))
    sub.finish()
    return net


def _user(value: Any) -> str | int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 - 1:
        return value
    if isinstance(value, str) and re.match(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z", value):
        return value
    raise ValueError("a user or group name, or a numeric id")


def _unlimited(convert: Callable[[Any], int]) -> Callable[[Any], int | None]:
    """``"unlimited"`` lifts a default bound (None); anything else converts."""
    def wrapped(value: Any) -> int | None:
        if value == "unlimited":
            return None
        try:
            return convert(value)
        except ValueError as exc:
            raise ValueError(f'{exc} or "unlimited"') from None
    return wrapped


def _limit(limit: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"an integer from 1 to {limit}")
        return value
    return convert


def _privileges(reader: _Reader, base_dir: str | None, default_enforcement: str) -> Privileges:
    d = Privileges()
    fs = reader.sub("filesystem") or reader.empty("filesystem")
    read = fs.get("read", _paths(base_dir), "", ())
    write = fs.get("write", _paths(base_dir), "", ())
    execute = fs.get("execute", _paths(base_dir), "", ())
    symlinks = fs.get("symlinks", _bool, "true or false", False)
    fifos = fs.get("fifos", _bool, "true or false", False)
    fs.finish()
    network = _network(reader)
    reader.used.add("syscalls")
    profile, allow, deny, kill = d.syscalls, (), (), ()
    names = _str_list(_SYSCALL_RE, "system call names")
    if isinstance(reader.table.get("syscalls"), str):
        profile = reader.table["syscalls"]
    elif "syscalls" in reader.table:
        sc = reader.sub("syscalls")
        assert sc is not None
        profile = sc.get("profile", _string, "a profile name", d.syscalls)
        allow = sc.get("allow", names, "", ())
        deny = sc.get("deny", names, "", ())
        kill = sc.get("kill", names, "", ())
        sc.finish()
        both = set(allow) & (set(deny) | set(kill))
        if both:
            sc.report("allow", "names not also in deny or kill", sorted(both))
    # The profile names are the enforcement layer's; checked there, against
    # the table it actually has (pycompart.kernel.seccomp.PROFILES).
    enforcement = reader.get("enforcement", _one_of(ENFORCEMENT), "", default_enforcement)
    privileges = Privileges(
        read=read, write=write, execute=execute, network=network,
        syscalls=profile, syscalls_allow=allow, syscalls_deny=deny, syscalls_kill=kill,
        user=reader.get("user", _user, "", None),
        group=reader.get("group", _user, "", None),
        capabilities=tuple(c.upper() if c.upper().startswith("CAP_") else "CAP_" + c.upper()
                           for c in reader.get("capabilities", _str_list(_CAP_RE, "capability names"), "", ())),
        memory=reader.get("memory", _unlimited(parse_size), "", DEFAULT_MEMORY),
        cpu_seconds=reader.get("cpu_seconds", _limit(10**7), "", None),
        open_files=reader.get("open_files", _limit(2**20), "", None),
        processes=reader.get("processes", _unlimited(_limit(2**22)), "", DEFAULT_PROCESSES),
        file_size=reader.get("file_size", parse_size, "", None),
        environment=reader.get("environment", _str_list(_ENV_RE, "environment variable names"), "",
                               DEFAULT_ENVIRONMENT),
        enforcement=enforcement,
        file_metadata=reader.get("file_metadata", _one_of(FILE_METADATA), "", "none"),
        file_locks=reader.get("file_locks", _bool, "true or false", False),
        symlinks=symlinks, fifos=fifos,
        defaulted=tuple(k for k in ("memory", "processes") if k not in reader.table),
        explicit=True,
    )
    reader.finish()
    return privileges


def load_spec(source: Mapping[str, Any], *, origin: str = "<dict>", base_dir: str | None = None) -> AppSpec:
    """Validate a spec given as a mapping (what ``tomllib`` returns)."""
    errors: list[SpecError] = []
    top = _Reader(origin, "", source, errors)
    app = top.sub("app") or top.empty("app")
    name = app.get("name", _string, "a non-empty string", "app")
    audit_log = app.get("audit_log", _string, "a file path", None)
    if audit_log is not None and base_dir is not None:
        audit_log = os.path.join(base_dir, audit_log)
    mechanism = app.get("mechanism", _one_of(MECHANISMS), "", "process")
    enforcement = app.get("enforcement", _one_of(ENFORCEMENT), "", "strict")
    max_message = app.get("max_message_size", parse_size, "", DEFAULT_MAX_MESSAGE)
    if max_message < 4096 or max_message > 2**32 - 1:
        app.report("max_message_size", "a size from 4KiB to 4GiB-1", max_message)
        max_message = DEFAULT_MAX_MESSAGE
    max_objects = app.get("max_message_objects", _positive_int(10**9), "", 1_000_000)
    app.finish()

    comps_reader = top.sub("compartments") or top.empty("compartments")
    compartments: dict[str, CompartmentSpec] = {}
    main_privileges = None
    for cname in comps_reader.table:
        if not isinstance(cname, str) or not _NAME_RE.match(cname):
            comps_reader.report(str(cname), "a compartment name of letters, digits, '_' and '-'")
            comps_reader.used.add(cname)
            continue
        if cname == "main":
            # main is the program itself (domain 0): it has privileges, nothing else.
            main = comps_reader.sub(cname)
            assert main is not None
            others = sorted(str(k) for k in main.table if k != "privileges")
            if others:
                # (Most likely a module meant to be boxed: say so once,
                # rather than "no such key" for each.)
                comps_reader.errors.append(SpecError(
                    comps_reader.source, comps_reader.key(cname),
                    "only a [compartments.main.privileges] table: main is the program itself, not a "
                    "compartment (to box a module, place it in a compartment of its own, such as "
                    "[compartments.box])", ", ".join(others)))
                main.used.update(main.table)
            priv = main.sub("privileges")
            if priv is not None:
                main_privileges = _privileges(priv, base_dir, enforcement)
            elif not others:
                main.report("privileges", "a [compartments.main.privileges] table (main "
                            "takes no other settings)")
            main.finish()
            continue
        sub = comps_reader.sub(cname)
        assert sub is not None
        compartments[cname] = _compartment(sub, cname, mechanism, base_dir, enforcement)
    comps_reader.finish()

    if "domains" in top.table:
        top.used.add("domains")
        top.report("domains", "no [domains]: remote domains are not supported by this version")
    top.finish()

    placed: dict[str, str] = {}
    declared: dict[str, str] = {}
    for comp in compartments.values():
        where = f"compartments.{comp.name}"
        for callee in comp.may_call:
            if callee != "main" and callee not in compartments:
                errors.append(SpecError(origin, f"{where}.may_call", "names of compartments defined "
                                        "in this spec (or 'main')", repr(callee)))
            elif callee == comp.name:
                errors.append(SpecError(origin, f"{where}.may_call", "other compartments (a "
                                        "compartment calls itself directly)", repr(callee)))
            elif callee != "main" and compartments[callee].mechanism == "inline":
                errors.append(SpecError(origin, f"{where}.may_call", "compartments that run as "
                                        f"processes ({callee!r} is inline: it runs in main, and "
                                        "only main calls it)", repr(callee)))
        for field, names, owners, what in (("modules", comp.modules, placed, "modules placed"),
                                           ("functions", comp.functions, declared, "functions declared")):
            for item in names:
                other = owners.get(item)
                if other is not None:
                    errors.append(SpecError(origin, f"{where}.{field}", f"{what} in one compartment "
                                            f"only; {item!r} is also in compartment {other!r}",
                                            repr(item)))
                owners[item] = comp.name
        for key in comp.shared:
            if key.split(":", 1)[0] in comp.modules:
                errors.append(SpecError(origin, f"{where}.shared", "data from main, not from a "
                                        "module placed in this compartment", repr(key)))
    if errors:
        raise SpecError.collect(errors)
    return AppSpec(name=name, source=origin, audit_log=audit_log, mechanism=mechanism,
                   max_message_size=max_message, max_message_objects=max_objects,
                   compartments=compartments,
                   main_privileges=main_privileges)


def load_spec_file(path: str | os.PathLike[str]) -> AppSpec:
    """Read and validate a TOML spec file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SpecError(path, "<file>", "an existing TOML file", "no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(path, "<file>", "valid TOML", str(exc)) from None
    return load_spec(data, origin=path, base_dir=os.path.dirname(os.path.abspath(path)))
