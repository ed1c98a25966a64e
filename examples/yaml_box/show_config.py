"""Print a summary of YAML configuration files (an ordinary script: it knows
nothing about pycompart)."""

import json
import sys

import yaml


def load(path):
    if path == "-":
        return yaml.safe_load(sys.stdin)
    with open(path, "rb") as f:
        return yaml.safe_load(f)


def main(paths):
    failures = 0
    for path in paths:
        try:
            doc = load(path)
        except yaml.YAMLError as exc:
            failures += 1
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            print(f"{path}: rejected ({type(exc).__name__}): {problem}")
            continue
        except RecursionError:
            failures += 1
            print(f"{path}: rejected: nested too deeply")
            continue
        print(f"{path}: {json.dumps(doc, sort_keys=True, default=str)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
