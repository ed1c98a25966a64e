"""Enforcement: how the Linux kernel is told. One module per mechanism.

Nothing in here decides *what* is allowed (that is ``pycompart.spec``) or
*when* (that is ``pycompart.instance`` and ``pycompart.monitor``).
"""
