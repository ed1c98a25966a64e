"""The commands of ``pycompart`` other than ``run`` (``check``, ``doctor``,
``bench``, ``--version``), and what they print. Imported only for them:
``pycompart run`` starts without it (``cli``)."""

from __future__ import annotations

import argparse
import os
import sys

from .._version import __version__
from ..errors import PrivilegeError, SpecError
from ..kernel import credentials
from ..kernel import host as _host
from ..policy import resolution as policy
from ..policy.spec import AppSpec, CompartmentSpec, load_spec_file
from ..supervisor import confine as main_lockdown
from ..supervisor.launcher import runtime_path


def describe(spec: AppSpec) -> str:
    """A readable summary of compartments, edges and policy."""
    lines = [f"app {spec.name!r} ({spec.source})",
             f"  mechanism: {spec.mechanism}; max message size: {spec.max_message_size} bytes",
             f"  audit log: {spec.audit_log or 'off'}", ""]
    lines += describe_call_graph(spec)
    if not spec.compartments:
        lines.append("  no compartments")
    for c in spec.compartments.values():
        timeout = "none" if c.call_timeout is None else f"{c.call_timeout:g}s"
        lines += [
            f"\ncompartment {c.name!r}  [trust: {c.trust}, mechanism: {c.mechanism}]",
            f"  instances: {c.instances if c.on_demand is None else f'{c.on_demand}, at most {c.max_instances} at once'}"
            + (f"; descriptors as values: yes" if c.descriptors else "")
            + f"; restart: {c.restart} (at most {c.max_restarts} in "
            f"{c.restart_window:g}s, backoff from {c.restart_backoff * 1000:g}ms)",
            f"  call timeout: {timeout}; cancel grace: {c.cancel_grace:g}s; start timeout: "
            f"{c.start_timeout:g}s",
            f"  functions: {', '.join(c.functions) or 'none in the spec (entrypoints may be declared in code)'}",
            f"  modules imported only here: {', '.join(c.modules) or 'none'}",
            f"  may call: {', '.join(c.may_call) or 'nothing (no callbacks, no edges)'}; exposes private "
            f"names: {', '.join(c.expose) or 'none'}; setattr from outside: "
            f"{'allowed' if c.allow_setattr else 'refused'}",
            f"  shared data copied in at start: {', '.join(c.shared) or 'none'}",
            f"  output: {c.output}" + {"relay": " (own pipes; main copies them to its stdout/stderr)",
                                       "prefixed": " (relayed, each line prefixed with the name)",
                                       "null": " (discarded)",
                                       "inherit": " (main's own descriptors: UNSAFE, it can take the "
                                                  "terminal over)"}[c.output]
            + "; idle CPU before a kill: " + ("unbounded" if c.idle_cpu is None else f"{c.idle_cpu:g}s"),
        ]
        lines += describe_privileges(c)
    if spec.main_privileges is not None:
        lines.append("\nmain (the program, under pycompart run)")
        lines += describe_privileges(CompartmentSpec(name="main", privileges=spec.main_privileges), main=True)
    return "\n".join(lines)


def describe_call_graph(spec: AppSpec) -> list[str]:
    """Who may call whom: every channel the app can ever have."""
    lines = ["call graph (caller -> callee; no other channel exists):"]
    for a, b in spec.edges():
        if a == "main":
            lines.append(f"  main -> {b}")
        elif b == "main":
            lines.append(f"  {a} -> main  (callbacks, during main's calls)")
        else:
            callee = spec.compartments[b]
            how = "a fresh instance per call" if callee.on_demand == "per-call" else \
                f"one {b} instance for each {a} instance"
            lines.append(f"  {a} -> {b}  (edge: {how})")
    calls = {c.name: [b for b in c.may_call if b != "main"] for c in spec.compartments.values()}
    cycle = _find_cycle(calls)
    if cycle:
        lines.append(f"  cycle: {' -> '.join(cycle)} (each level of a recursion gets fresh "
                     "instances, at most 8 deep)")
    return lines


def _find_cycle(calls: dict[str, list[str]]) -> list[str]:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in calls.get(node, ()):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in calls:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def describe_privileges(comp: CompartmentSpec, main: bool = False) -> list[str]:
    """The resolved lock-down of one compartment on this host, as main
    would start it (same sys.path as this process)."""
    p = comp.privileges
    try:
        res = main_lockdown.plan(p, sys.path, None) if main else policy.resolve(comp, sys.path, None)
    except PrivilegeError as exc:
        return [f"  privileges: CANNOT START HERE: {exc}"]
    lock = res.lockdown
    names = {v: k for k, v in credentials.CAPABILITIES.items()}
    if lock.dynamic_user:
        who = "a uid and gid of its own (allocated at start)"
    elif lock.uid is None:
        who = "main's uid (main is not root), in a user namespace of its own" if lock.user_namespace \
            else "main's uid (main is not root)"
    else:
        who = f"uid {lock.uid}, gid {lock.gid}"
    net = p.network.mode if p.network.mode != "ports" else (
        f"TCP connect {list(p.network.connect)}, bind {list(p.network.bind)}")
    out = [f"  privileges ({p.enforcement}):",
           f"    user: {who}; capabilities kept: "
           f"{', '.join(names[c] for c in lock.keep_capabilities) or 'none'}",
           f"    network: {net}" + (" (own network namespace)" if lock.net_namespace else ""),
           f"    syscalls: profile {lock.syscall_profile!r}" if lock.seccomp else "    syscalls: NOT FILTERED"]
    if lock.seccomp and (lock.syscalls_allow or lock.syscalls_deny or lock.syscalls_kill):
        out.append(f"      allow {lock.syscalls_allow}, deny {lock.syscalls_deny}, kill {lock.syscalls_kill}")
    if lock.fs:
        granted = [x for x in p.read]
        out.append(f"    filesystem read: {granted or 'nothing beyond the automatic set'}")
        out.append(f"    filesystem write: {list(p.write) or 'nothing'}; execute: {list(p.execute) or 'nothing'}")
        if p.write:
            made = [k for k, on in (("symlinks", lock.fs_symlinks), ("FIFOs", lock.fs_fifos)) if on]
            out.append(f"      beneath write: files and directories{', ' + ', '.join(made) if made else ''}"
                       f"{'' if made else ' (no symlinks, no FIFOs)'}")
        out.append("    added read-only automatically: " + ", ".join(res.auto_read + list(policy.SYSTEM_READ)))
    else:
        out.append("    filesystem: NOT RESTRICTED")
    limits = ", ".join(f"{k} {_size(v) if k == 'memory' else v}" for k, v in lock.limits.items()) or "none"
    out.append(f"    limits: {limits}")
    out.append(f"    file modes, owners, times: {'own files (no setuid/setgid bits)' if lock.file_metadata == 'own-files' else 'refused'}"
               f"; file locks: {'allowed' if lock.file_locks else 'refused'}")
    out.append(f"    environment passed in: {', '.join(p.environment) or 'nothing'}")
    out.append("    always: NO_NEW_PRIVS, non-dumpable, own process group, the app's own pid namespace, "
               "inherited fds closed, no prctl that loosens anything"
               + (", Landlock signal/abstract-socket scopes" if lock.scopes else ""))
    for what in res.missing:
        out.append(f"    WARNING: not enforced on this host: {what}")
    for what in res.warnings:
        out.append(f"    WARNING: {what}")
    for note in res.notes:
        out.append(f"    note: {note}")
    return out


def _size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return f"{n} bytes"


def _unenforceable(spec: AppSpec) -> list[str]:
    problems = _host.runtime_problems(sys.executable, runtime_path())
    for comp in spec.compartments.values():
        try:
            policy.resolve(comp, sys.path, None)
        except PrivilegeError as exc:
            problems.append(str(exc))
    if spec.main_privileges is not None:
        try:
            main_lockdown.plan(spec.main_privileges, sys.path, None)
        except PrivilegeError as exc:
            problems.append(str(exc))
    return problems


def unfound_modules(spec: AppSpec, path: list[str]) -> list[str]:
    """The placed modules (``modules``, and the modules of ``functions``)
    that nothing on ``path`` provides: most likely a typo. Found by the
    import system's finders without importing anything (a package's
    submodules are looked for in its folders, not by importing it)."""
    out = []
    for comp in spec.compartments.values():
        names = dict.fromkeys([*comp.modules, *(f.partition(":")[0] for f in comp.functions)])
        for name in names:
            if not _findable(name, path):
                out.append(f"compartment {comp.name!r}: module {name!r} is not found (searched the spec's "
                           "folder, the current one and this interpreter's sys.path); the program must "
                           "be able to import it")
    return out


def missing_paths(spec: AppSpec) -> list[str]:
    """The filesystem paths a spec grants that do not exist here: each
    instance looks them up when it starts, and grants nothing for one that
    is missing then (most likely a typo, or a folder still to be made)."""
    out = []
    granted = [(f"compartment {comp.name!r}", comp.privileges) for comp in spec.compartments.values()]
    if spec.main_privileges is not None:
        granted.append(("main", spec.main_privileges))
    for who, p in granted:
        for kind, paths in (("read", p.read), ("write", p.write), ("execute", p.execute)):
            for path in paths:
                if not os.path.exists(path):  # (a dangling link too: it grants nothing)
                    out.append(f"{who}: filesystem.{kind} path {path!r} does not exist; a process "
                               "locked down while it is missing is granted nothing for it")
    return out


def _findable(name: str, path: list[str]) -> bool:
    from importlib.machinery import PathFinder
    from importlib.util import find_spec

    parts = name.split(".")
    found = PathFinder.find_spec(parts[0], path)
    if found is None:
        try:  # built in, frozen, or provided by a finder on sys.meta_path (an editable install)
            found = find_spec(parts[0])
        except (ImportError, ValueError):
            return False
    for i in range(1, len(parts)):
        if found is None or not found.submodule_search_locations:
            return False
        found = PathFinder.find_spec(".".join(parts[:i + 1]), list(found.submodule_search_locations))
    return found is not None


def doctor() -> str:
    """What this host can enforce, in plain words."""
    import os

    h = _host.probe()
    yes = lambda ok: "yes" if ok else "NO"  # noqa: E731
    lines = [
        f"running as: {'root' if h.root else f'uid {os.geteuid()} (not root)'}",
        f"Landlock: ABI {h.landlock_abi}" + ("" if h.landlock_abi else " (absent or disabled)"),
        f"  filesystem rules (ABI 3+ needed): {yes(h.landlock_abi >= 3)}",
        f"  TCP port rules, network = 'none' and ports (ABI 4+): {yes(h.landlock_tcp)}",
        f"  signal and abstract-socket scopes (ABI 6+): {yes(h.landlock_scopes)}",
        f"seccomp: {yes(h.seccomp)} ({h.seccomp_detail})",
        f"namespaces for network = 'none'/'loopback': {yes(h.net_namespace)} ({h.namespace_detail})",
        f"change user/group, keep capabilities: {yes(h.root)}"
        + ("" if h.root else " (needs root: compartments keep main's uid)"),
        f"processes limit: {'yes (compartments run as a non-root user)' if h.root else 'yes (RLIMIT_NPROC on this uid)'}"
        "; never for a compartment running as root",
        "memory, cpu_seconds, open_files, file_size limits: yes (setrlimit)",
        f"cgroups: v1 writable controllers: {', '.join(h.cgroup_v1) or 'none'}; v2: {yes(h.cgroup_v2)}"
        " (pycompart does not use cgroups yet)",
    ]
    startup = _host.runtime_problems(sys.executable, runtime_path())
    lines.append(f"zygote can start from this interpreter ({sys.executable}): {yes(not startup)}")
    lines += [f"  {problem}" for problem in startup]
    ok = h.landlock_abi >= 6 and h.seccomp and h.net_namespace
    lines.append("")
    if startup:
        lines.append("verdict: no compartment can start with this interpreter and user (see above)")
    else:
        lines.append("verdict: " + (("every privilege pycompart knows can be enforced here" if h.root else
                                     "every privilege pycompart knows can be enforced here but two that "
                                     "need root: a user and group of its own per compartment, and kept "
                                     "capabilities (a spec asking for either refuses to start)") if ok else
                                    "some privileges cannot be enforced here; strict specs that need "
                                    "them will refuse to start (see above)"))
    return "\n".join(lines)


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pycompart", description="Compartmentalize Python programs: run parts of them as "
        "separate least-privilege processes, enforced by the Linux kernel.",
        epilog="Start with `pycompart doctor` (what this host can enforce) and `pycompart check "
        "SPEC` (what a spec grants here). The README has a quick start and the spec reference.")
    parser.add_argument("--version", action="version", version=f"pycompart {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run a program with its dependencies boxed (see: pycompart run -h)")
    check = sub.add_parser("check", help="validate a spec and summarize it, without running anything")
    check.add_argument("spec")
    sub.add_parser("doctor", help="say what this host can enforce")
    bench = sub.add_parser("bench", help="measure call and start-up costs against raw baselines")
    bench.add_argument("--quick", action="store_true", help="fewer iterations")
    bench.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON "
                       "(- for standard output, after the table)")
    bench.add_argument("--markdown", metavar="FILE", help="also write the README's performance "
                       "table, from these figures, to FILE (- for standard output)")
    rewrite = sub.add_parser("rewrite", help="hoist pycompart.segment blocks into entrypoints "
                             "(Pitchfork for Python)")
    rewrite.add_argument("sources", nargs="+", metavar="SRC.py")
    rewrite.add_argument("--out", metavar="DIR", help="where to write the rewritten programs")
    rewrite.add_argument("--spec-out", metavar="FILE",
                         help="the spec skeleton (default: beside each rewritten program, NAME.toml)")
    rewrite.add_argument("--check", action="store_true",
                         help="report what would change, and every problem, without writing")
    args = parser.parse_args(argv)
    if args.command == "rewrite":
        from .rewrite import rewrite_command

        return rewrite_command(args.sources, args.out, args.spec_out, args.check)
    if args.command == "check":
        try:
            spec = load_spec_file(args.spec)
        except SpecError as exc:
            for error in exc.errors:
                print(f"pycompart check: {error.message}", file=sys.stderr)
            if len(exc.errors) > 1:
                print(f"pycompart check: {len(exc.errors)} errors", file=sys.stderr)
            return 1
        print(describe(spec))
        where = os.path.dirname(os.path.abspath(spec.source)) if os.path.isfile(spec.source) else os.getcwd()
        warnings = unfound_modules(spec, [where, os.getcwd(), *sys.path]) + missing_paths(spec)
        for warning in warnings:
            print(f"pycompart check: {spec.source}: warning: {warning}", file=sys.stderr)
        problems = [line for problem in _unenforceable(spec) for line in problem.splitlines()]
        if problems:
            for problem in problems:
                print(f"pycompart check: {spec.source}: {problem}", file=sys.stderr)
            return 1
        print(f"\nOK ({len(warnings)} warning{'s' if len(warnings) > 1 else ''})" if warnings else "\nOK")
        return 0
    if args.command == "doctor":
        print(doctor())
        return 0
    if args.command == "bench":
        from . import bench as _bench

        results = _bench.run(quick=args.quick)
        if args.json:
            import json

            text = json.dumps({"version": __version__, "quick": args.quick, "results": results},
                              indent=2, sort_keys=True)
            if args.json == "-":
                print(text)
            else:
                with open(args.json, "w", encoding="utf-8") as f:
                    f.write(text + "\n")
        if args.markdown:
            table = _bench.markdown(results)
            if args.markdown == "-":
                print(table)
            else:
                with open(args.markdown, "w", encoding="utf-8") as f:
                    f.write(table)
        return 0
    return 2
