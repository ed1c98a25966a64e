"""Resource limits (setrlimit): memory, CPU time, processes, open files,
file size. Applied in the instance before anything untrusted runs; hard and
soft limits are set equal, so the compartment cannot raise them again.

Note: RLIMIT_NPROC counts every process of the *user* and is not enforced for
uid 0 (or with CAP_SYS_RESOURCE/CAP_SYS_ADMIN); it bounds a fork bomb only
once the instance has dropped to an unprivileged uid.
"""

from __future__ import annotations

import resource

import msgspec

from .process import _libc


class Limits(msgspec.Struct, frozen=True):
    memory: int | None = None  # bytes of address space (RLIMIT_AS)
    cpu_seconds: int | None = None  # RLIMIT_CPU: soft = hard, so the kernel kills (SIGKILL) at the limit
    processes: int | None = None  # RLIMIT_NPROC
    open_files: int | None = None  # RLIMIT_NOFILE
    file_size: int | None = None  # RLIMIT_FSIZE: SIGXFSZ/EFBIG beyond it

    def items(self) -> list[tuple[str, int, int]]:
        table = (("memory", resource.RLIMIT_AS), ("cpu_seconds", resource.RLIMIT_CPU),
                 ("processes", resource.RLIMIT_NPROC), ("open_files", resource.RLIMIT_NOFILE),
                 ("file_size", resource.RLIMIT_FSIZE))
        return [(name, which, getattr(self, name)) for name, which in table if getattr(self, name) is not None]


_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread a malloc arena of its own, reserving up to
    64 MiB of address space each: under RLIMIT_AS that is what runs out
    first. Best effort (other libcs have no such call)."""
    try:
        _libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass


_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def reuse_large_allocations(keep: int) -> None:
    """glibc serves each allocation over 32 MiB with a fresh mmap and
    unmaps it when freed, so a process that receives a 64 MiB value per call
    takes ~16,000 fresh page faults per call (more time than copying it). Serve
    them from the heap instead and keep up to ``keep`` freed bytes for the
    next one. Best effort."""
    try:
        _libc.mallopt(_M_MMAP_MAX, 0)
        _libc.mallopt(_M_TRIM_THRESHOLD, keep)
    except (OSError, AttributeError):
        pass


def apply(limits: Limits) -> None:
    """Set every given limit, soft = hard. A limit above the current hard
    limit cannot be granted and raises (fail closed)."""
    for name, which, value in limits.items():
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY and value > hard:
            raise PermissionError(f"cannot set {name} to {value}: the hard limit is {hard}")
        resource.setrlimit(which, (value, value))
