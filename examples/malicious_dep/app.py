"""A program that uses prettycolors (it knows nothing about pycompart)."""

import os
import sys

from prettycolors import paint

token = os.environ.get("API_TOKEN", "")
print(paint("deploy", "green"), "using a token of", len(token), "characters")
for word in sys.argv[1:]:
    print(paint(word, "yellow"))
