"""Print the Nth Fibonacci number, computed in a compartment allowed nothing
but computing (the seeds' privilege-separated ``fib``).

    python examples/fib/fib.py N

fib(0) = 0, fib(1) = 1. A bad N (negative, not an integer) exits with
status 2 and a usage message; a computation that fails (its CPU or memory
bound, or an N too big to pass to it: 2**63 and more) exits with status 1.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
USAGE = "usage: fib.py N   (N: a non-negative integer; prints the Nth Fibonacci number)"
#: The biggest N the call takes (its argument crosses as a 64-bit integer);
#: any N near it would run out of the compartment's CPU bound anyway.
MAX_N = 2**63 - 1

sys.path.insert(0, os.path.dirname(HERE))
from _venv import ensure_pycompart  # noqa: E402

ensure_pycompart()
import pycompart  # noqa: E402

sys.path.insert(0, HERE)

import fibcore  # noqa: E402,F401  (main reads its annotations: the call's contract)


def parse(argv: list[str]) -> int | None:
    if len(argv) != 1:
        return None
    text = argv[0].strip()
    if not text.isdigit() or not text.isascii():
        return None  # negative, fractional, empty, or not a number
    return int(text)


def main(argv: list[str]) -> int:
    n = parse(argv)
    if n is None:
        print(USAGE, file=sys.stderr)
        return 2
    if n > MAX_N:
        print(f"fib.py: computing fib({n}) failed: N is too big to pass to the compartment "
              f"(at most {MAX_N})", file=sys.stderr)
        return 1
    app = pycompart.App.from_spec(os.path.join(HERE, "app.toml"))
    fib = app.function("fibcore:fib")
    try:
        with app:
            digits = fib(n)
    except pycompart.CompartmentError as exc:
        print(f"fib.py: computing fib({n}) failed: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(digits + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
