"""Run the runtime benchmark: ``python benchmarks/run.py [--quick]``.

The same code runs as ``pycompart bench``; it lives in the package so an
installed pycompart can measure the machine it is installed on.
"""

import sys

from pycompart.frontend.bench import run

if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
