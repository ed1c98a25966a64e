"""The package layout is the architecture: each folder is a layer, and a
layer imports only the layers below it (README, "Architecture").

An ``ast`` walk over every module finds every import, including imports
deferred into functions, and checks it against ``ALLOWED``. A second check
finds import cycles. A third starts a real instance and looks at what it has
loaded: the compartment side must hold none of main's machinery.

Run this file directly to print the import matrix:
``python tests/test_layout.py``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict

import pytest

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "src", "pycompart")

#: layer -> the layers it may import (besides itself). The root package and
#: ``__main__`` are the public façade and may reach the front ends.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_version": set(),
    "fastpaths": set(),
    "kernel": {"errors"},
    "wire": {"errors"},
    # kernel: the sealed memory file of the bulk lanes (kernel.memfd).
    "transport": {"wire", "kernel", "errors", "fastpaths"},
    "policy": {"kernel", "wire", "errors", "_version"},  # _version: keys the filter cache
    "compartment": {"kernel", "wire", "transport", "errors", "fastpaths"},
    "supervisor": {"policy", "kernel", "wire", "transport", "compartment", "errors", "fastpaths"},
    "frontend": {"policy", "kernel", "wire", "transport", "compartment", "supervisor", "errors",
                 "_version", "fastpaths"},
    "__init__": {"frontend", "supervisor", "kernel", "wire", "errors", "_version"},
    "__main__": {"frontend"},
}

#: Single imports allowed across the layers above: (importer, imported).
#: The proxies of module compartments are the *caller's* side, main's or an
#: instance's that imports a module placed in a compartment it may call;
#: the instance imports them only when it does (``compartment.edges``).
EXCEPTIONS: set[tuple[str, str]] = {("compartment.edges", "frontend.edgeproxy")}

#: Where each layer's code runs (for the printed matrix and the README).
RUNS_IN = {
    "errors": "everywhere", "_version": "everywhere", "fastpaths": "everywhere", "kernel": "instance, main (probing, own lock-down)",
    "wire": "both sides", "transport": "both sides", "policy": "main",
    "compartment": "instance", "supervisor": "main, zygote", "frontend": "main",
    "__init__": "main (public API)", "__main__": "main",
}


def _modules() -> dict[str, str]:
    """Dotted module name (relative to pycompart) -> file path."""
    out = {}
    for root, _dirs, files in os.walk(PACKAGE_DIR):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            rel = os.path.relpath(path, PACKAGE_DIR)[:-3].split(os.sep)
            if rel[-1] == "__init__" and len(rel) > 1:
                rel = rel[:-1]
            out[".".join(rel)] = path
    return out


def layer_of(module: str) -> str:
    return module.split(".", 1)[0]


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(module: str, path: str, modules: dict[str, str]) -> list[tuple[str, int, bool]]:
    """(imported pycompart module, line, only for type checking) for every
    import statement in ``path``, wherever it is in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    is_package = path.endswith("__init__.py")
    if module == "__init__":
        package = ""  # the root package itself
    else:
        package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name[len("pycompart."):] for a in node.names if a.name.startswith("pycompart.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                if node.level > 1:
                    base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "pycompart" or node.module.startswith("pycompart.")):
                prefix = node.module[len("pycompart."):] if node.module != "pycompart" else ""
            else:
                continue
            for alias in node.names:
                sub = f"{prefix}.{alias.name}" if prefix else alias.name
                targets.append(sub if sub in modules else prefix)
        for target in targets:
            if target:
                found.append((target, node.lineno, _in_type_checking(node, parents)))
    return found


def _graph() -> tuple[dict[str, str], dict[str, list[tuple[str, int, bool]]]]:
    modules = _modules()
    return modules, {m: imports(m, p, modules) for m, p in modules.items()}


def test_every_import_goes_in_an_allowed_direction():
    modules, graph = _graph()
    bad = []
    for module, targets in graph.items():
        here = layer_of(module)
        for target, line, _ in targets:
            there = layer_of(target)
            if there != here and there not in ALLOWED[here] and (module, target) not in EXCEPTIONS:
                bad.append(f"{modules[module]}:{line}: {here} may not import {there} ({target})")
    assert not bad, "forbidden import directions:\n" + "\n".join(bad)


def test_every_module_belongs_to_a_known_layer():
    modules, _ = _graph()
    unknown = sorted(m for m in modules if layer_of(m) not in ALLOWED)
    assert not unknown, f"modules outside every layer (add the folder to ALLOWED and the README): {unknown}"


def test_no_import_cycles_even_deferred_ones():
    _, graph = _graph()
    edges = {m: sorted({t for t, _, typing_only in targets if not typing_only and t != m})
             for m, targets in graph.items()}
    # Tarjan's strongly connected components.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_deferred_and_relative_imports(tmp_path):
    """The walk must not miss what it is there to catch: an import inside a
    function, written relative to a subpackage."""
    src = tmp_path / "mod.py"
    src.write_text("def f():\n    from ..supervisor import monitor\n    from ..wire.refs import exposed\n")
    found = imports("compartment.mod", str(src), {"supervisor.monitor": "", "wire.refs": ""})
    assert [(t, line) for t, line, _ in found] == [("supervisor.monitor", 2), ("wire.refs", 3)]
    here, there = layer_of("compartment.mod"), layer_of(found[0][0])
    assert there not in ALLOWED[here]  # this one would be reported


def test_an_instance_loads_none_of_mains_machinery(make_app):
    """An instance serving a function whose module does not import
    pycompart holds the runtime it serves with, and nothing of main's:
    no monitor, no App, no import hook, no main proxies, no policy."""
    app = make_app({"compartments": {"plain": {"functions": ["layoutprobe:loaded"]}}})
    with app:
        loaded = app.function("layoutprobe:loaded")()
    assert "pycompart.compartment.serve" in loaded  # the probe sees what it should
    forbidden = [m for m in loaded if m.startswith(("pycompart.frontend", "pycompart.policy"))
                 or m in ("pycompart.supervisor.monitor", "pycompart.supervisor.audit",
                          "pycompart.supervisor.confine")]
    assert not forbidden, f"an instance loaded main's machinery: {forbidden}"


#: Standard modules the runtime imports only where they are used: each is
#: milliseconds of every start (``inspect``, with ``ast`` and ``dis``, ~5).
LAZY_STDLIB = ["inspect", "ast", "dis", "pickle", "fractions", "sysconfig"]


def test_an_instance_serving_a_module_imports_no_lazy_stdlib(make_app):
    """An instance serving a module that needs none of them (main asks
    for its attributes, calls its functions, gets exceptions back) has not
    imported them: neither did the zygote it was forked from."""
    app = make_app({"compartments": {"box": {"modules": ["layoutprobe"]}}})
    with app:
        probe = app.compartment("box").module("layoutprobe")
        with pytest.raises(TypeError):
            probe.which_loaded()  # an exception described on its way back
        assert probe.which_loaded(["sys"]) == ["sys"]  # the probe sees what it should
        assert probe.which_loaded(LAZY_STDLIB) == []


def test_main_imports_no_lazy_stdlib_before_the_program_runs(tmp_path):
    """``pycompart run``'s main, up to the program's first line."""
    (tmp_path / "prog.py").write_text(
        "import sys\nprint(','.join(n for n in %r if n in sys.modules))\n" % LAZY_STDLIB)
    (tmp_path / "app.toml").write_text('[compartments.box]\nmodules = ["json"]\n')
    out = subprocess.run([sys.executable, "-m", "pycompart", "run", "app.toml", "--", "prog.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_wires_structs_have_evaluated_annotations():
    """msgspec reads a Struct's field types when a decoder for it is built
    (the wire's at import): given strings (``from __future__ import
    annotations``) it compiles each, ~120 of them, milliseconds of every
    start of main and of the zygote."""
    import importlib

    import msgspec

    found = 0
    for name in ("protocol", "control", "config", "edges"):
        module = importlib.import_module(f"pycompart.wire.{name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, msgspec.Struct) \
                    and value.__module__ == module.__name__:
                found += 1
                strings = [k for k, v in value.__annotations__.items() if isinstance(v, str)]
                assert not strings, f"{value.__qualname__}: {strings}"
    assert found >= 20


def matrix() -> str:
    """Which layer imports which (counts of import statements)."""
    _, graph = _graph()
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for module, targets in graph.items():
        here = layer_of(module)
        for target, _, _ in targets:
            there = layer_of(target)
            if there != here:
                counts[here, there] += 1
    order = ["errors", "kernel", "wire", "transport", "policy", "compartment", "supervisor",
             "frontend", "__init__"]
    lines = [f"{'layer':12s} {'runs in':38s} imports"]
    for layer in order:
        used = ", ".join(f"{t} ({counts[layer, t]})" for t in order + ["_version"] if counts[layer, t])
        lines.append(f"{layer:12s} {RUNS_IN[layer]:38s} {used or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(matrix())
