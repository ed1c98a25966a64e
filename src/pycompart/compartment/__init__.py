"""The compartment side: code that runs inside an instance.

``serve`` turns a child of the zygote into an instance: process hygiene,
then ``lockdown`` (the plan from ``pycompart.policy``, applied in the
design's order: namespaces, rlimits, uid and capabilities, NO_NEW_PRIVS,
non-dumpable, Landlock, seccomp), and only then imports the compartment's
modules and serves calls. ``objects`` serves operations on the compartment's
own objects (under the exposure policy) and holds its references to main's.

May import: ``pycompart.kernel``, ``wire``, ``transport`` and ``errors``.
Never the policy, the supervisor or the front ends: an instance holds none
of main's machinery (tested: ``tests/test_layout.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..wire.config import InstanceConfig

#: The configuration of the instance this process is (set by ``serve.run``
#: before any of the compartment's code runs), or None in main. Here, not in
#: ``serve``, so that main can ask without importing the instance side.
CURRENT: InstanceConfig | None = None
