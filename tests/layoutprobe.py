"""A module that does not import pycompart: what does an instance serving it
have loaded? (tests/test_layout.py)"""

import sys


def loaded():
    return sorted(name for name in sys.modules if name == "pycompart" or name.startswith("pycompart."))


def which_loaded(names):
    """Which of ``names`` this process has imported."""
    return [name for name in names if name in sys.modules]
