"""Policy: what the application's compartments are and what they may do.

Runs in ``main`` only, before any process starts. ``spec`` turns a TOML file
(or a dict) into frozen dataclasses and rejects anything it does not
understand; ``resolution`` resolves each compartment's privileges against
this host into a concrete, plain-data ``Lockdown`` plan (paths, uid numbers,
ports, a compiled seccomp filter), failing closed when the host cannot
enforce what the spec asks. Every decision is made here; the compartment side
only executes the plan.

May import: ``pycompart.errors``, ``pycompart.kernel`` (probing the host,
compiling filters) and ``pycompart.wire`` (the plan's shape). Never the
transport, the supervisor, the compartment side or the front ends.
"""
