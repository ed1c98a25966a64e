"""Privileges for ``main`` itself: ``[compartments.main.privileges]``.

``pycompart run`` can confine the program it runs, not only its boxed
dependencies. The plan is the same as a compartment's (``pycompart.policy``)
with what the monitor, which lives in main, needs to keep working:

* the ``python-threads`` profile at least (the monitor is a thread),
  ``pidfd_send_signal`` (it cancels and kills instances) and
  ``sendmsg``/``recvmsg`` on its control socket to the zygote;
* no Landlock signal scope (instances live in other Landlock domains, and
  the monitor must be able to signal them);
* no parent-death signal (main's parent is your shell, not a zygote).

Landlock, no_new_privs and namespaces apply to the calling thread only, so
the lock-down runs after the zygote is launched and before the monitor
thread starts (``Monitor.start(before_threads=...)``); every thread created
afterwards inherits it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import msgspec

from ..policy import resolution as policy
from ..policy.spec import CompartmentSpec, Privileges
from ..wire.config import Lockdown

#: What the monitor needs beyond plain Python: signalling instances through
#: pidfds, and messages on its (already open) control socket to the zygote.
#: No socket can be *created* with these (``socket()`` stays per the network mode).
MONITOR_SYSCALLS = ("pidfd_send_signal", "sendmsg", "recvmsg")


def plan(privileges: Privileges, sys_path: Sequence[str], main_path: str | None) -> policy.Resolution:
    profile = "python-threads" if privileges.syscalls == "python" else privileges.syscalls
    allow = tuple(dict.fromkeys(privileges.syscalls_allow + MONITOR_SYSCALLS))
    # The compartments' default bounds are not main's: main is the user's
    # program (its own subprocesses, its own memory); only what the spec
    # names applies. Its user, when root and unnamed, stays "nobody".
    defaults = {key: None for key in privileges.defaulted}
    user = privileges.user if privileges.user is not None or os.geteuid() != 0 else "nobody"
    p = msgspec.structs.replace(privileges, syscalls=profile, syscalls_allow=allow, user=user,
                                defaulted=(), **defaults)
    res = policy.resolve(CompartmentSpec(name="main", privileges=p), sys_path, main_path)
    res.lockdown.signal_scope = False
    res.lockdown.bind_to_parent = False
    return res


def confine(lock: Lockdown) -> None:
    """Lock this process (main) down; call it while it has one thread."""
    from ..compartment import lockdown  # here: a main that is not confined never needs it

    if lock.preopen:
        reach = lockdown.preopen(lock.preopen)
        sys.path[:] = [reach.get(os.path.abspath(p or os.getcwd()), p) for p in sys.path]
        lockdown.reroute_packages(reach)
    lockdown.apply(lock)
