"""What the monitor sends a new instance: its configuration and its
lock-down plan, as plain data (names, paths, numbers; never code or
objects), plus the signal and exit codes both sides agree on.

``Lockdown`` is computed in ``main`` by ``pycompart.policy`` and executed
inside the instance by ``pycompart.compartment.lockdown``; ``InstanceConfig``
travels from the monitor through the zygote's control socket.
"""

import signal

import msgspec

class Lockdown(msgspec.Struct, forbid_unknown_fields=True):
    """Everything the instance must enforce, as plain data."""

    compartment: str = ""
    #: As non-root: a user namespace of its own (mapping only its uid), in
    #: which the other namespaces are made and RLIMIT_NPROC counts only
    #: this instance's tasks.
    user_namespace: bool = False
    net_namespace: bool = False
    loopback: bool = False
    ipc_namespace: bool = False
    limits: dict[str, int] = {}
    uid: int | None = None
    gid: int | None = None
    #: uid/gid are one of pycompart's dynamic ids, allocated per compartment
    #: when the app starts (``pycompart.supervisor.identities``).
    dynamic_user: bool = False
    keep_capabilities: list[int] = []
    drop_capabilities: bool = True
    fs: bool = False  # Landlock filesystem rules
    fs_read: list[str] = []
    fs_write: list[str] = []
    fs_execute: list[str] = []
    fs_symlinks: bool = False  # may create symbolic links beneath fs_write
    fs_fifos: bool = False  # may create FIFOs beneath fs_write
    tcp: bool = False  # Landlock TCP port rules
    tcp_connect: list[int] = []
    tcp_bind: list[int] = []
    scopes: bool = False  # Landlock signal + abstract unix socket scopes
    #: Off for main: its monitor signals instances, which live in other domains.
    signal_scope: bool = True
    #: Die with the parent (instances: the zygote). Off for main.
    bind_to_parent: bool = True
    seccomp: bool = False
    syscall_profile: str = "python"
    syscalls_allow: list[str] = []
    syscalls_deny: list[str] = []
    syscalls_kill: list[str] = []
    sockets: str = "none"
    file_metadata: str = "none"  # seccomp: chmod/utime family ("own-files")
    file_locks: bool = False  # seccomp: flock and fcntl locks
    seccomp_bpf: bytes = b""  # the compiled filter (built in main by the policy layer)
    preopen: list[str] = []  # import directories to reach through descriptors
    #: Fork instances from a template (``pycompart.compartment.template``):
    #: the template's seccomp filter (the instances' plus forking), and what
    #: each instance loads on top of it (no forking: the instances' own).
    template_bpf: bytes = b""
    no_fork_bpf: bytes = b""


CANCEL_SIGNAL = signal.SIGRTMIN + 1

EXIT_START_FAILED = 70
EXIT_PROTOCOL = 71

class EdgePlan(msgspec.Struct, forbid_unknown_fields=True):
    """What an instance knows of a compartment its ``may_call`` names: how
    to call it (``pycompart.compartment.edges``)."""

    call_timeout: float | None = 60.0
    cancel_grace: float = 0.5
    start_timeout: float = 10.0
    #: The edge carries descriptors as values (the callee's ``descriptors``).
    descriptors: bool = False
    #: A fresh callee instance for each call (``instances = "per-call"``,
    #: and ``"per-connection"``: one per connection a ``Broker`` hands it).
    per_call: bool = False
    #: ``"per-connection"``: only a ``Broker`` in the caller hands it work.
    per_connection: bool = False
    max_instances: int = 16
    #: Its spec-declared functions (``module:qualname``): where the caller's
    #: code imports one, the name is bound to a call over the edge.
    functions: list[str] = []
    #: Its modules: the caller's code imports them as proxies over the edge
    #: (``pycompart.frontend.edgeproxy``), with these settings of the callee's.
    modules: list[str] = []
    expose: list[str] = []
    allow_exit: bool = True
    allow_returned_callables: bool = False


class InstanceConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Everything an instance needs, sent by the monitor through the zygote.
    Holds names and paths, never code or objects."""

    compartment: str
    index: int
    sys_path: list[str]
    cwd: str
    main_path: str | None
    main_module: str | None
    modules: list[str]
    entrypoints: list[str]
    max_frame: int
    environment: dict[str, str]
    lockdown: Lockdown = msgspec.field(default_factory=Lockdown)
    #: Module-compartment settings (``pycompart.compartment.objects``).
    functions: list[str] = []
    expose: list[str] = []
    allow_setattr: bool = False
    may_call_main: bool = False
    #: A sandbox: main is trusted (it may have the compartment's objects
    #: pickled and unpickled there, ``copy``/``pickle`` of a reference).
    trusts_main: bool = False
    #: Shared data: (module, name, value encoded by ``refs.encode_plain``).
    shared: list[tuple[str, str, bytes]] = []
    #: Modules placed in *other* compartments: importing one here fails.
    elsewhere: dict[str, str] = {}
    #: Where fds 1 and 2 go: "relay"/"prefixed" (pipes main relays), "null",
    #: or "inherit" (main's own: unsafe, the spec must say so).
    output: str = "relay"
    #: "main": ``sys.stdin`` reads main's, during main's calls; "null": EOF.
    stdin: str = "null"
    #: Whether its channel carries descriptors as values.
    descriptors: bool = False
    #: Who calls it over its channel: "main", or (an edge instance) the
    #: compartment whose instance is its only caller.
    caller: str = "main"
    #: How many edges lie between main and it (0: main calls it).
    edge_depth: int = 0
    #: The compartments it may call (its ``may_call`` less "main").
    edges: dict[str, EdgePlan] = {}
    #: Spec-declared functions of the compartments it may *not* call (key ->
    #: compartment): bound, where its code imports them, to a refusal.
    foreign: dict[str, str] = {}
    #: Modules main imported rewritten (``pycompart run`` of an annotated
    #: program): module name -> the rewritten file, imported here in its place.
    rewritten: dict[str, str] = {}
    #: Report each call it makes over an edge for the audit log.
    audit_edges: bool = False
