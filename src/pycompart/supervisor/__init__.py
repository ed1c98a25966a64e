"""The supervisor: the trusted core that starts, watches and polices
instances. Runs in ``main`` (the monitor thread, the audit log, main's own
lock-down) and in the zygote. Runs no compartment code.

``monitor`` owns the zygote, every instance's pidfd, the timers, restarts,
cancellation and kills; ``zygote`` is the clean interpreter that forks every
instance (and hands the child to ``pycompart.compartment``); ``audit`` is the
JSONL audit log; ``confine`` locks ``main`` itself down.

May import: ``pycompart.policy``, ``kernel``, ``wire``, ``transport``,
``compartment`` (the zygote starts it in each child; ``confine`` reuses its
lock-down executor) and ``errors``. Never the front ends. Brokers and
per-connection instances land here.
"""
