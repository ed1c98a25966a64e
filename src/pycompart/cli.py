"""The command line: ``pycompart check | bench | --version``."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import SpecError
from .spec import AppSpec, load_spec_file


def describe(spec: AppSpec) -> str:
    """A readable summary of compartments, edges and policy."""
    lines = [f"app {spec.name!r} ({spec.source})",
             f"  mechanism: {spec.mechanism}; max message size: {spec.max_message_size} bytes",
             f"  audit log: {spec.audit_log or 'off'}"]
    if not spec.compartments:
        lines.append("  no compartments")
    for c in spec.compartments.values():
        timeout = "none" if c.call_timeout is None else f"{c.call_timeout:g}s"
        lines += [
            f"\ncompartment {c.name!r}  [trust: {c.trust}, mechanism: {c.mechanism}]",
            f"  instances: {c.instances}; restart: {c.restart} (at most {c.max_restarts} in "
            f"{c.restart_window:g}s, backoff from {c.restart_backoff * 1000:g}ms)",
            f"  call timeout: {timeout}; cancel grace: {c.cancel_grace:g}s; start timeout: "
            f"{c.start_timeout:g}s",
            f"  functions: {', '.join(c.functions) or '(declared in code with @app.entrypoint)'}",
            f"  modules imported only here: {', '.join(c.modules) or 'none'}",
            "  privileges: none enforced in this version (a spec that asks for any is refused)",
        ]
    lines.append("\nedges (caller -> callee; no other channel exists):")
    lines += [f"  {a} -> {b}" for a, b in spec.edges()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pycompart", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pycompart {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a spec and summarize it, without running anything")
    check.add_argument("spec")
    bench = sub.add_parser("bench", help="measure call and start-up costs against raw baselines")
    bench.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args(argv)
    if args.command == "check":
        try:
            spec = load_spec_file(args.spec)
        except SpecError as exc:
            print(f"pycompart check: {exc}", file=sys.stderr)
            return 1
        print(describe(spec))
        print("\nOK")
        return 0
    if args.command == "bench":
        from . import bench as _bench

        _bench.run(quick=args.quick)
        return 0
    return 2
