#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs pycompart and
# its test dependencies, then runs what you asked for.
#
#   bash scripts/dev.sh demo     # set up, run the main demo
#   bash scripts/dev.sh test     # set up, run the test suite
#   bash scripts/dev.sh bench    # set up, run the benchmark
#   bash scripts/dev.sh box      # set up, run PyYAML boxed by pycompart run on hostile input
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Install (editable) only when the venv is new or what it was built from
# changed (the metadata, or the C module it compiles): the Python source
# tree itself needs no reinstall.
stamp=$(cat pyproject.toml setup.py src/pycompart/transport/_gate.c | sha256sum | cut -d" " -f1)
if [ "$(cat .venv/.pycompart-installed 2>/dev/null)" != "$stamp" ]; then
    # Quiet unless something fails; pip's own output is kept for that case.
    if ! .venv/bin/python -m pip install -q -e ".[test]" >.venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        exit 1
    fi
    echo "$stamp" >.venv/.pycompart-installed
fi

case "${1:-test}" in
    demo)  exec .venv/bin/python examples/hostile_parser/demo.py ;;
    test)  shift || true; exec .venv/bin/python -m pytest "$@" ;;
    bench) shift || true; exec .venv/bin/python -m pycompart bench "$@" ;;
    box)   cd examples/yaml_box
           exec ../../.venv/bin/python -m pycompart run app.toml -- show_config.py inputs/*.yaml ;;
    *)     echo "usage: $0 demo|test|bench|box" >&2; exit 2 ;;
esac
