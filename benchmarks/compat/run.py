"""Do boxed modules behave like unboxed ones? Real packages' own test suites
say: each runs plainly, then with the package boxed by ``pycompart run``.

    python benchmarks/compat/run.py                 # every package below
    python benchmarks/compat/run.py toolz tomlkit   # some of them
    python benchmarks/compat/run.py --list

For each package it downloads the sdist at the pinned version from PyPI,
installs it (and its tests' dependencies, pinned too) into a venv of its
own beside pycompart (editable, from this checkout), and runs its tests
twice under pytest with a per-test timeout: plainly, and as
``pycompart run SPEC -m pytest ...`` with the plain spec a user would write:

    [compartments.box]
    modules = ["PKG"]
    may_call = ["main"]
    call_timeout = "120s"
    [compartments.box.privileges]
    syscalls = "python-threads"
    filesystem.read = ["<the unpacked sdist>"]

It prints, per package: tests passed plainly and boxed, the ratio, wall time
both ways, and the most common causes of the boxed failures (from the
junit XML pytest writes), and checks that no process was left behind. The
work directory (``--work``, default ``/var/tmp/pycompart-compat``, reachable by
the compartment's own user) keeps
downloads and venvs between runs; results go to ``results.json`` there.
Not part of the test suite: it needs PyPI and takes minutes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTEST = ["pytest==8.3.4", "pytest-timeout==2.3.1"]
PER_TEST_TIMEOUT = 60
SUITE_TIMEOUT = 1800


@dataclass(frozen=True)
class Package:
    name: str  # on PyPI
    version: str
    modules: tuple[str, ...]  # what the spec boxes
    tests: str = "tests"  # inside the sdist
    deps: tuple[str, ...] = ()  # the tests' own dependencies, pinned
    args: tuple[str, ...] = ()  # extra pytest arguments (both runs)
    #: The tests live inside the package (``toolz/tests``): copied out, or
    #: importing them would box them too.
    copy_tests_out: bool = False
    env: dict[str, str] = field(default_factory=dict)


PACKAGES = [
    Package("more-itertools", "10.5.0", ("more_itertools",)),
    Package("tomlkit", "0.13.2", ("tomlkit",), deps=("PyYAML==6.0.2",)),
    Package("markdown", "3.7", ("markdown",), deps=("PyYAML==6.0.2",),
            args=("--ignore=tests/test_legacy.py",)),
    Package("packaging", "24.2", ("packaging",), deps=("pretend==1.0.9",)),
    Package("sqlparse", "0.5.1", ("sqlparse",)),
    Package("tabulate", "0.9.0", ("tabulate",), tests="test"),
    Package("xmltodict", "0.13.0", ("xmltodict",)),
    Package("mistune", "3.0.2", ("mistune",)),
    Package("jinja2", "3.1.4", ("jinja2",)),
    Package("click", "8.1.7", ("click",)),
    Package("itsdangerous", "2.2.0", ("itsdangerous",), deps=("freezegun==1.5.1",)),
    Package("idna", "3.10", ("idna",)),
    Package("six", "1.17.0", ("six",), tests="test_six.py"),
    Package("toolz", "0.12.1", ("toolz", "tlz"), tests="toolz/tests", copy_tests_out=True),
    Package("cachetools", "5.5.0", ("cachetools",)),
    Package("boltons", "24.1.0", ("boltons",)),
    Package("python-dateutil", "2.9.0.post0", ("dateutil",),
            deps=("freezegun==1.5.1", "hypothesis==6.115.0", "pytest-cov==5.0.0")),
    Package("humanize", "4.11.0", ("humanize",), deps=("freezegun==1.5.1", "pytest-cov==5.0.0")),
    Package("parse", "1.20.2", ("parse",)),
    Package("pyparsing", "3.2.0", ("pyparsing",), deps=("railroad-diagrams==3.0.1", "jinja2==3.1.4"),
            args=("--ignore=tests/test_matplotlib_cases.py",)),
    Package("wcwidth", "0.2.13", ("wcwidth",), args=("-o", "addopts=")),
]

SPEC = """\
[compartments.box]
modules = [{modules}]
may_call = ["main"]
call_timeout = "120s"
[compartments.box.privileges]
syscalls = "python-threads"
filesystem.read = ["{source}"]
"""


def sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def prepare(pkg: Package, work: Path) -> tuple[Path, Path]:
    """The package's venv and unpacked sdist (made once, kept)."""
    venv = work / "venvs" / f"{pkg.name}-{pkg.version}"
    python = venv / "bin" / "python"
    src = work / "src" / f"{pkg.name}-{pkg.version}"
    if not (venv / ".ready").exists():
        shutil.rmtree(venv, ignore_errors=True)
        sh([sys.executable, "-m", "venv", str(venv)])
        sh([str(python), "-m", "pip", "install", "-q", "-e", str(REPO), *PYTEST, *pkg.deps,
            f"{pkg.name}=={pkg.version}"])
        (venv / ".ready").touch()
    if not src.exists():
        sdists = work / "sdists"
        sdists.mkdir(parents=True, exist_ok=True)
        sh([str(python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
            "-d", str(sdists), f"{pkg.name}=={pkg.version}"])
        archive = next(p for p in sdists.iterdir()
                       if re.match(rf"{re.escape(pkg.name)}-{re.escape(pkg.version)}\.tar\.gz$",
                                   p.name, re.I) or
                       re.match(rf"{re.escape(pkg.name.replace('-', '_'))}-{re.escape(pkg.version)}"
                                r"\.tar\.gz$", p.name, re.I))
        unpacked = work / "src" / "unpack"
        shutil.rmtree(unpacked, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(unpacked, filter="data")
        (top,) = list(unpacked.iterdir())
        top.rename(src)
        unpacked.rmdir()
        if pkg.copy_tests_out:
            shutil.copytree(src / pkg.tests, src / "tests_out")
        # The installed package, not the sdist's copy, is what the tests
        # import (and what is boxed): move the sdist's away.
        for module in pkg.modules:
            for candidate in (src / module, src / f"{module}.py"):
                if candidate.exists():
                    candidate.rename(src / f"_sdist_{candidate.name}")
        for path in [src, *src.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # the compartment's own user reads it
        for parent in src.parents:
            if parent == work.parent:
                break
            parent.chmod(parent.stat().st_mode | 0o055)
    return python, src


def count(xml: Path) -> dict[str, int]:
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    if not xml.exists():
        return {**totals, "passed": 0}
    for suite in ET.parse(xml).getroot().iter("testsuite"):
        for key in totals:
            totals[key] += int(suite.get(key, 0))
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return {**totals, "passed": passed}


def causes(xml: Path, n: int = 5) -> list[tuple[int, str]]:
    if not xml.exists():
        return []
    found: collections.Counter[str] = collections.Counter()
    for case in ET.parse(xml).getroot().iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                message = (el.get("message") or "").splitlines()
                text = re.sub(r"0x[0-9a-f]+", "0x…", message[0] if message else tag)[:140]
                found[text] += 1
    return [(k, m) for m, k in found.most_common(n)]


def leftovers(python: Path) -> list[str]:
    """Processes of this package's venv still running once its suites ended
    (a zygote or instance left behind)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], text=True, capture_output=True).stdout
    return [line.strip() for line in out.splitlines() if str(python) in line]


def run_suite(pkg: Package, python: Path, src: Path, work: Path, boxed: bool) -> dict[str, object]:
    tests = "tests_out" if pkg.copy_tests_out else pkg.tests
    kind = "boxed" if boxed else "plain"
    xml = work / "results" / f"{pkg.name}.{kind}.xml"
    log = work / "results" / f"{pkg.name}.{kind}.log"
    xml.parent.mkdir(parents=True, exist_ok=True)
    xml.unlink(missing_ok=True)
    pytest = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", str(PER_TEST_TIMEOUT),
              *pkg.args, tests, f"--junitxml={xml}"]
    if boxed:
        spec = work / "results" / f"{pkg.name}.toml"
        spec.write_text(SPEC.format(modules=", ".join(f'"{m}"' for m in pkg.modules), source=src))
        cmd = [str(python), "-m", "pycompart", "run", str(spec), *pytest]
    else:
        cmd = [str(python), *pytest]
    env = {**os.environ, **pkg.env}
    env.pop("PYTHONPATH", None)
    start = time.monotonic()
    with open(log, "w") as out:
        try:
            status = subprocess.run(cmd, cwd=src, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    timeout=SUITE_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
    seconds = time.monotonic() - start
    return {"seconds": round(seconds, 2), "status": status, **count(xml),
            "causes": causes(xml) if boxed else []}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", help="names from the list (default: all)")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/pycompart-compat"))
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        for pkg in PACKAGES:
            print(f"{pkg.name}=={pkg.version}  boxes {', '.join(pkg.modules)}")
        return 0
    chosen = [p for p in PACKAGES if not args.packages or p.name in args.packages]
    unknown = set(args.packages) - {p.name for p in PACKAGES}
    if unknown:
        parser.error(f"unknown package(s): {', '.join(sorted(unknown))}")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for pkg in chosen:
        python, src = prepare(pkg, work)
        plain = run_suite(pkg, python, src, work, boxed=False)
        boxed = run_suite(pkg, python, src, work, boxed=True)
        left = leftovers(python)
        results[pkg.name] = {"version": pkg.version, "plain": plain, "boxed": boxed,
                             "left_behind": left}
        ratio = boxed["passed"] / plain["passed"] if plain["passed"] else 0.0  # type: ignore[operator]
        print(f"{pkg.name} {pkg.version}: plain {plain['passed']} in {plain['seconds']} s, boxed "
              f"{boxed['passed']} in {boxed['seconds']} s: {ratio:.1%}, "
              f"{boxed['seconds'] / max(plain['seconds'], 0.01):.1f}x time"  # type: ignore[operator]
              + (f", LEFT BEHIND: {left}" if left else ""), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print()
    print("| package | plain passed | boxed passed | ratio | plain s | boxed s | time × |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        p, b = r["plain"], r["boxed"]
        ratio = b["passed"] / p["passed"] if p["passed"] else 0.0
        print(f"| {name} {r['version']} | {p['passed']} | {b['passed']} | {ratio:.1%} | "
              f"{p['seconds']} | {b['seconds']} | {b['seconds'] / max(p['seconds'], 0.01):.1f} |")
    print()
    for name, r in results.items():
        if r["boxed"]["causes"]:
            print(f"{name}: remaining boxed failures")
            for n, message in r["boxed"]["causes"]:
                print(f"  {n:4d}  {message}")
    below = [n for n, r in results.items()
             if r["plain"]["passed"] and r["boxed"]["passed"] < 0.95 * r["plain"]["passed"]]
    if below:
        print(f"\nbelow 95% of plain: {', '.join(below)}")
    return 1 if any(r["left_behind"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
