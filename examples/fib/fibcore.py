"""The computation, placed in a compartment allowed nothing but computing
(``app.toml``): no files beyond its own code, no network, no processes, no
threads."""

from __future__ import annotations

import sys


def _pair(n: int) -> tuple[int, int]:
    """(fib(n), fib(n + 1)) by fast doubling: O(log n) multiplications."""
    if n == 0:
        return 0, 1
    a, b = _pair(n >> 1)
    c = a * (2 * b - a)
    d = a * a + b * b
    return (d, c + d) if n & 1 else (c, d)


def fib(n: int) -> str:
    """The nth Fibonacci number (fib(0) = 0, fib(1) = 1), in decimal: an
    exact int of any size crosses as its digits."""
    if n < 0:
        raise ValueError("n must be non-negative")
    sys.set_int_max_str_digits(0)  # a big result is the point, not an attack
    return str(_pair(n)[0])
