"""Enforcement: how the Linux kernel is told. One module per mechanism:
``landlock``, ``seccomp``, ``namespaces``, ``credentials``, ``rlimits``,
``process`` (prctl, pidfds, descriptor hygiene), and ``host`` for probing
what this kernel supports.

Nothing in here decides *what* is allowed (that is ``pycompart.policy``) or
*when* (that is ``pycompart.compartment.lockdown`` inside an instance and
``pycompart.supervisor.confine`` for main). Used inside instances, and in
main for probing and main's own lock-down.

May import: ``pycompart.errors`` only (and each other).
"""
