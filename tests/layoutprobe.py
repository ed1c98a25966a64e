"""A module that does not import pycompart: what does an instance serving it
have loaded? (tests/test_layout.py)"""

import sys


def loaded():
    return sorted(name for name in sys.modules if name == "pycompart" or name.startswith("pycompart."))
