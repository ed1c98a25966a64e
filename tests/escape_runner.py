"""Run the escape battery as whoever runs this script and print JSON.

``test_escape.py`` runs it under ``setpriv --reuid=65534 ...`` with a
world-readable interpreter and a world-readable copy of pycompart, its
dependencies and the battery (argv[1:] are the directories to import from).
"""

import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), *sys.argv[1:]]

import escape  # noqa: E402

escape.main()
