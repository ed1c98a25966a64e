"""An annotated program (tests/test_rewrite.py): reads numbers from a file
only compartment ``Reader`` may read, sums them in ``Sum``."""

import os
import sys

import pycompart


@pycompart.entrypoint("Sum")
def total(numbers):
    return sum(numbers), os.getpid()


def main(path):
    label = "tally"
    with pycompart.segment("Reader"):
        with open(path) as f:
            numbers = [int(line) for line in f if line.strip()]
        reader_pid = os.getpid()
    result, sum_pid = total(numbers)
    print(label, result, len({os.getpid(), reader_pid, sum_pid}))


def broken():
    with pycompart.segment("Sum"):
        ratio = 1 / 0
    return ratio


if __name__ == "__main__":
    if sys.argv[1] == "broken":
        broken()
    else:
        main(sys.argv[1])
