"""``pycompart rewrite``: Pitchfork for Python, a source-to-source rewriter.

A program marks what must run elsewhere::

    with pycompart.segment("Privileged"):      # a block
        fd = os.open(device, os.O_WRONLY)

    @pycompart.entrypoint("Privileged")       # a whole module-level function
    def write_tone(fd, hz): ...

Unrewritten, both are no-ops: the program runs in one process as before.
The rewriter hoists every segment into a generated module-level function of
its compartment, ``_segment_<Compartment>_<line>``: the local variables the
block reads become its parameters, those it assigns and the rest of the
scope uses become its return values, and the block is replaced by a call::

    (fd,) = _segment_Privileged_12(device)

Analysis and generation are pure (source text in, source text out, no
imports, no execution), so ``rewrite --check`` can run on any file. What
cannot be hoisted faithfully (``Problem``) is reported with ``file:line`` and
a suggested change, never miscompiled (the README's table lists each rule).

The generated program keeps the original text around the segments, so it
can be reviewed; each hoisted body is the block's own lines, and its code is
relocated to the original file and lines (``segments.origin``), so an
exception inside a segment shows where it was written.
"""

from __future__ import annotations

import ast
import re

import msgspec

#: Methods that change their object in place: called in a segment on a
#: variable the segment receives, the change happens to a copy, and is lost.
MUTATING_METHODS = frozenset({
    "append", "extend", "insert", "remove", "pop", "popitem", "clear", "update", "setdefault",
    "add", "discard", "sort", "reverse", "appendleft", "extendleft", "rotate", "intersection_update",
    "difference_update", "symmetric_difference_update",
})
#: Calls whose meaning depends on the frame they run in.
FRAME_CALLS = frozenset({"locals", "vars", "globals", "exec", "eval", "dir", "super"})

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
#: Bumped when the generated code changes (``pycompart run`` caches by it).
FORMAT = 4


class Problem(msgspec.Struct, frozen=True):
    """A construct the rewriter will not hoist, where, and what to do."""

    filename: str
    line: int
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.line}: {self.message} (fix: {self.fix})"


class Segment(msgspec.Struct):
    compartment: str
    line: int  # the ``with`` statement
    end_line: int
    body_line: int  # the block's first line
    name: str  # the generated function
    params: list[str]
    outputs: list[str]
    indent: str  # of the ``with`` statement
    #: Descriptors cross in or out (a ``pycompart.Fd``, ``Handover`` or
    #: socket is made in the block, or assigned to one of its inputs).
    descriptors: bool = False


class Result(msgspec.Struct):
    filename: str
    source: str  # the rewritten program ("" when there are problems)
    segments: list[Segment]
    #: ``@pycompart.entrypoint`` functions: (compartment, function name, line).
    entrypoints: list[tuple[str, str, int]]
    problems: list[Problem]
    #: For each line of ``source``, the line of the original it stands for
    #: (a segment's call: its ``with``), or 0 for generated code.
    line_map: list[int] = msgspec.field(default_factory=list)

    @property
    def compartments(self) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.segments:
            seen.setdefault(s.compartment)
        for comp, _, _ in self.entrypoints:
            seen.setdefault(comp)
        return list(seen)

    def functions(self, module: str) -> dict[str, list[str]]:
        """Compartment -> its entrypoints' keys, with the program as ``module``."""
        out: dict[str, list[str]] = {c: [] for c in self.compartments}
        for s in self.segments:
            out[s.compartment].append(f"{module}:{s.name}")
        for comp, name, _ in self.entrypoints:
            out[comp].append(f"{module}:{name}")
        return out


# -- analysis -------------------------------------------------------------------------------------


class _Aliases:
    """How the module names ``pycompart.segment`` and ``pycompart.entrypoint``."""

    def __init__(self, tree: ast.Module):
        self.modules = {"pycompart"}
        self.segment: set[str] = set()
        self.entrypoint: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "pycompart":
                        self.modules.add(a.asname or "pycompart")
            elif isinstance(node, ast.ImportFrom) and node.module == "pycompart":
                for a in node.names:
                    if a.name == "segment":
                        self.segment.add(a.asname or "segment")
                    elif a.name == "entrypoint":
                        self.entrypoint.add(a.asname or "entrypoint")

    def _is(self, func: ast.expr, attr: str, names: set[str]) -> bool:
        if isinstance(func, ast.Attribute) and func.attr == attr and isinstance(func.value, ast.Name):
            return func.value.id in self.modules
        return isinstance(func, ast.Name) and func.id in names

    def segment_call(self, node: ast.expr) -> ast.Call | None:
        if isinstance(node, ast.Call) and self._is(node.func, "segment", self.segment):
            return node
        return None

    def entrypoint_call(self, node: ast.expr) -> ast.Call | None:
        if isinstance(node, ast.Call) and self._is(node.func, "entrypoint", self.entrypoint):
            return node
        return None


def _names(nodes: list[ast.stmt] | list[ast.AST], ctx: type) -> list[tuple[str, ast.Name]]:
    """Names used with ``ctx`` (Load or Store) in ``nodes``, not counting
    names a nested function, lambda, class or comprehension binds itself."""
    out: list[tuple[str, ast.Name]] = []

    def visit(node: ast.AST, bound: frozenset[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = set(_arg_names(node.args))
            if not isinstance(node, ast.Lambda):
                if ctx is ast.Store:
                    out.append((node.name, node))  # type: ignore[arg-type]
                for d in node.decorator_list:
                    visit(d, bound)
                body: list[ast.AST] = list(node.body)
            else:
                body = [node.body]
            for d in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
                visit(d, bound)
            inner |= {n for b in body for n, _ in _names([b], ast.Store)}
            for b in body:
                visit(b, bound | inner)
            return
        if isinstance(node, ast.ClassDef):
            if ctx is ast.Store:
                out.append((node.name, node))  # type: ignore[arg-type]
            for child in node.bases + node.keywords + node.decorator_list:  # type: ignore[operator]
                visit(child, bound)
            if ctx is ast.Load:  # what its body reads from outside
                inner = {n for b in node.body for n, _ in _names([b], ast.Store)}
                for b in node.body:
                    visit(b, bound | inner)
            return
        if ctx is ast.Store and isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            out.append((node.name, node))  # type: ignore[arg-type]
        if ctx is ast.Store and isinstance(node, ast.MatchMapping) and node.rest:
            out.append((node.rest, node))  # type: ignore[arg-type]
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            inner = {n for g in node.generators for n, _ in _names([g.target], ast.Store)}
            for g in node.generators:
                visit(g.iter, bound)
                for cond in g.ifs:
                    visit(cond, bound | inner)
            for part in ([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]):
                visit(part, bound | inner)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ctx) and node.id not in bound:
            out.append((node.id, node))
        elif ctx is ast.Store and isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                if a.name != "*":
                    out.append(((a.asname or a.name).split(".")[0], node))  # type: ignore[arg-type]
        elif ctx is ast.Store and isinstance(node, ast.ExceptHandler) and node.name:
            out.append((node.name, node))  # type: ignore[arg-type]
        for child in ast.iter_child_nodes(node):
            visit(child, bound)

    for n in nodes:
        visit(n, frozenset())
    return out


def _arg_names(args: ast.arguments) -> list[str]:
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    if args.vararg:
        names.append(args.vararg.arg)
    if args.kwarg:
        names.append(args.kwarg.arg)
    return names


class _Scope:
    """A function (or the module) holding segments: the names a segment
    there may take from outside (its *values*) and those that cannot cross
    (functions, classes and modules bound there: the compartment has the
    module's own, not a function's)."""

    def __init__(self, node: ast.AST, module: _ModuleNames, outer: _Scope | None = None):
        self.node = node
        body = node.body if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef)) else []
        self.is_module = isinstance(node, ast.Module)
        self.declared_global: set[str] = set()
        for sub in _walk_scope(body):
            if isinstance(sub, (ast.Global, ast.Nonlocal)):
                self.declared_global.update(sub.names)
        if self.is_module:
            self.locals = set(module.data)
            self.code: set[str] = set()
        else:
            own = set(_arg_names(node.args)) | {n for n, _ in _names(body, ast.Store)}  # type: ignore[attr-defined]
            own -= self.declared_global
            # A segment in a nested function reads the enclosing functions'
            # variables too (closures), and the module's data.
            self.locals = own | (outer.locals if outer is not None else set()) | module.data
            self.code = {n for n in _bound_as_code(body)} | (outer.code if outer is not None else set())
        self.params_of_method = set()
        if not self.is_module and node.args.args and getattr(node, "_in_class", False):  # type: ignore[attr-defined]
            self.params_of_method = {node.args.args[0].arg}  # type: ignore[attr-defined]


class _ModuleNames:
    """What the module's top level binds. *Code* (imports, functions,
    classes, wherever at the top level: ``try: import simplejson as json``
    too) and *constants* (names assigned once, by a top-level statement
    that always runs) the compartment has itself: it imports the program
    too, and that top-level code runs there. *Data* is every other module
    variable (assigned under ``if __name__ == "__main__":``, in a loop, by
    ``global`` in a function, or more than once): passed at each call, so a
    segment sees the value main has then."""

    def __init__(self, tree: ast.Module):
        self.code = set(_bound_as_code(tree.body))
        counts: dict[str, int] = {}
        for n, _ in _names(tree.body, ast.Store):
            counts[n] = counts.get(n, 0) + 1
        simple = (ast.Assign, ast.AnnAssign)
        once = {n for node in tree.body if isinstance(node, simple)
                for n, _ in _names([node], ast.Store) if counts.get(n) == 1}
        made_global = {n for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names}
        self.constants = once - made_global - self.code
        self.data = (set(counts) | made_global) - self.code - self.constants
        #: Code names the program also assigns (``helper = other``): main's
        #: choice would not reach the compartment, which has its own.
        assigned_plainly = {n for node in _walk_scope(tree.body)
                            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign))
                            for n, _ in _names([node], ast.Store)}
        self.rebound = self.code & (assigned_plainly | made_global)


def _bound_as_code(body: list[ast.stmt]) -> list[str]:
    out: list[str] = []
    for node in _walk_scope(body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out.extend((a.asname or a.name).split(".")[0] for a in node.names if a.name != "*")
    return out


def _walk_scope(body: list[ast.stmt]):  # type: ignore[no-untyped-def]
    """Statements and expressions of one scope (not of nested functions or classes)."""
    stack: list[ast.AST] = list(body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue  # (its name is this scope's; what is inside is its own)
        for child in ast.iter_child_nodes(node):
            stack.append(child)


class _Finder:
    """Finds the segments and entrypoints of one module and checks them."""

    def __init__(self, tree: ast.Module, lines: list[str], filename: str):
        self.tree = tree
        self.lines = lines
        self.filename = filename
        self.aliases = _Aliases(tree)
        self.module = _ModuleNames(tree)
        self.segments: list[tuple[ast.With, _Scope, str]] = []
        self.entrypoints: list[tuple[str, str, int]] = []
        self.problems: list[Problem] = []

    def problem(self, node: ast.AST, message: str, fix: str) -> None:
        self.problems.append(Problem(self.filename, getattr(node, "lineno", 0), message, fix))

    def run(self) -> None:
        self._visit(self.tree, _Scope(self.tree, self.module), in_class=False, in_segment=None)

    def _visit(self, node: ast.AST, scope: _Scope, in_class: bool, in_segment: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._function(child, node, in_class)
                child._in_class = in_class  # type: ignore[attr-defined]
                self._visit(child, _Scope(child, self.module, None if scope.is_module else scope),
                            False, None)
            elif isinstance(child, ast.ClassDef):
                self._visit(child, scope, True, None)
            elif isinstance(child, (ast.With, ast.AsyncWith)) and self._segment_of(child) is not None:
                comp = self._segment_of(child)
                if in_segment is not None:
                    self.problem(child, f"a segment of {comp!r} inside a segment of {in_segment!r}",
                                 "segments do not nest: end the outer one first")
                elif isinstance(child, ast.AsyncWith):
                    self.problem(child, "'async with' a segment", "use a plain 'with'")
                elif in_class:
                    self.problem(child, "a segment in a class body",
                                 "move the block into a method or a function")
                elif scope.is_module and not _under_main_guard(self.tree, child):
                    self.problem(child, f"a segment of {comp!r} at module level outside 'if __name__ == "
                                 "\"__main__\":': every compartment imports the program and would run "
                                 "it too", "put it under the main guard, or in a function")
                elif self._check_with(child, comp):  # type: ignore[arg-type]
                    self.segments.append((child, scope, comp))  # type: ignore[arg-type]
                self._visit(child, scope, in_class, comp)
            else:
                self._visit(child, scope, in_class, in_segment)

    def _segment_of(self, node: ast.With | ast.AsyncWith) -> str | None:
        for item in node.items:
            call = self.aliases.segment_call(item.context_expr)
            if call is not None:
                return self._compartment(call, node) or "?"
        return None

    def _compartment(self, call: ast.Call, where: ast.AST) -> str | None:
        if len(call.args) != 1 or call.keywords or not isinstance(call.args[0], ast.Constant) \
                or not isinstance(call.args[0].value, str) or not _NAME_RE.match(call.args[0].value):
            self.problem(where, "the compartment of a segment or entrypoint must be one string literal "
                         "naming it", 'write segment("Name") with a literal compartment name')
            return None
        return call.args[0].value

    def _function(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, parent: ast.AST, in_class: bool) -> None:
        for dec in fn.decorator_list:
            call = self.aliases.entrypoint_call(dec)
            if call is None:
                continue
            comp = self._compartment(call, dec)
            if comp is None:
                continue
            if not isinstance(parent, ast.Module) or in_class:
                self.problem(fn, f"@entrypoint on {fn.name!r}, which is not a module-level function",
                             "only module-level functions can be entrypoints; move it to the top level")
            elif isinstance(fn, ast.AsyncFunctionDef):
                self.problem(fn, f"@entrypoint on the coroutine function {fn.name!r}",
                             "make it a plain function (calls between compartments are synchronous)")
            elif len(fn.decorator_list) > 1:
                self.problem(fn, f"@entrypoint on {fn.name!r} with other decorators",
                             "keep @pycompart.entrypoint the only decorator (wrap the function instead)")
            else:
                self.entrypoints.append((comp, fn.name, fn.lineno))

    def _check_with(self, node: ast.With, comp: str) -> bool:
        ok = True
        if len(node.items) != 1:
            self.problem(node, "a segment 'with' with other context managers",
                         "give the segment a 'with' statement of its own")
            ok = False
        elif node.items[0].optional_vars is not None:
            self.problem(node, "'with segment(...) as name'", "drop 'as': a segment has no value")
            ok = False
        before = len(self.problems)
        self._check_body(node.body, comp)
        return ok and len(self.problems) == before

    def _check_body(self, body: list[ast.stmt], comp: str) -> None:
        def visit(node: ast.AST, loop: bool) -> None:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                return  # its own returns and yields are its own
            if isinstance(node, ast.Return):
                self.problem(node, f"'return' inside a segment of {comp!r} would leave the block",
                             "assign the value to a variable in the block and return it after it")
            elif isinstance(node, (ast.Yield, ast.YieldFrom)):
                self.problem(node, f"'yield' inside a segment of {comp!r}",
                             "compute the values in the block (a list), yield them after it")
            elif isinstance(node, ast.Await):
                self.problem(node, f"'await' inside a segment of {comp!r}",
                             "await before or after the block; a segment's call is synchronous")
            elif isinstance(node, (ast.Break, ast.Continue)) and not loop:
                word = "break" if isinstance(node, ast.Break) else "continue"
                self.problem(node, f"'{word}' inside a segment of {comp!r} would leave the block",
                             f"set a flag in the block and '{word}' after it")
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                word = "global" if isinstance(node, ast.Global) else "nonlocal"
                self.problem(node, f"'{word}' inside a segment of {comp!r}: the block runs in another "
                             "process, where that name is not the caller's",
                             "assign a local variable in the block; assign the global after it")
            elif isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
                self.problem(node, f"'from ... import *' inside a segment of {comp!r}",
                             "import the names the block uses by name")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in FRAME_CALLS and (node.func.id != "dir" or not node.args) \
                    and (node.func.id != "super" or not node.args):
                self.problem(node, f"{node.func.id}() inside a segment of {comp!r} depends on the "
                             "frame it runs in, which is not the caller's",
                             "pass what the block needs as variables")
            inner = loop or isinstance(node, (ast.For, ast.AsyncFor, ast.While))
            for child in ast.iter_child_nodes(node):
                # a loop's 'else' is not inside the loop
                if isinstance(node, (ast.For, ast.While)) and child in node.orelse:
                    visit(child, loop)
                else:
                    visit(child, inner)

        for stmt in body:
            visit(stmt, False)


def analyze(source: str, filename: str = "<program>") -> tuple[_Finder | None, list[Problem]]:
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as exc:
        return None, [Problem(filename, exc.lineno or 0, f"syntax error: {exc.msg}",
                              "fix the program so Python can parse it")]
    lines = source.splitlines(keepends=True)
    finder = _Finder(tree, lines, filename)
    finder.run()
    return finder, finder.problems


#: Functions of the standard library that change their first argument in place.
MUTATING_FUNCTIONS = frozenset({"heappush", "heappop", "heapify", "heapreplace", "heappushpop",
                                "shuffle", "insort", "insort_left", "insort_right"})


def _segment(finder: _Finder, node: ast.With, scope: _Scope, comp: str) -> Segment:
    body = node.body
    writes = list(dict.fromkeys(n for n, _ in _names(body, ast.Store)))
    for stmt in body:
        for sub in ast.walk(stmt):
            if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Del):
                finder.problem(sub, f"'del {sub.id}' inside a segment of {comp!r}: the caller's "
                               "variable cannot be deleted from another process",
                               f"assign {sub.id} = None instead, or del it after the block")
            elif isinstance(sub, ast.Nonlocal) and set(sub.names) & scope.locals:
                finder.problem(sub, f"'nonlocal' in a function inside a segment of {comp!r} names the "
                               "caller's variable, which is not there",
                               "keep the state in the block's own variables and return them")
    first_reads = _read_first(body)
    surely_assigned = _read_first.assigned  # type: ignore[attr-defined]
    params = [n for n in first_reads if n in scope.locals]
    for name in sorted(set(first_reads) & finder.module.rebound):
        finder.problem(node, f"the segment of {comp!r} uses {name!r}, a module-level function, class or "
                       "import that the program also assigns: the compartment has its own, not main's "
                       "choice", f"pass the value it needs as a variable, or do not rebind {name}")
    # Outputs: what the block assigns that the rest reads (after it, before
    # it in a loop, in a nested function; for a module-level block, anywhere
    # in the module).
    in_block = {id(n) for stmt in body for n in ast.walk(stmt)}
    where = finder.tree.body if scope.is_module else scope.node.body  # type: ignore[attr-defined]
    elsewhere = {name for stmt in where for name, ref in _names_anywhere(stmt, (ast.Load, ast.Del))
                 if id(ref) not in in_block}
    elsewhere |= {sub.target.id for stmt in where for sub in ast.walk(stmt)
                  if isinstance(sub, ast.AugAssign) and isinstance(sub.target, ast.Name)
                  and id(sub.target) not in in_block}
    for name in writes:
        if name in scope.declared_global:
            finder.problem(node, f"the segment of {comp!r} assigns {name!r}, which its function "
                           "declares global or nonlocal",
                           "assign a local variable in the block; assign the global after it")
    # ... and what it reads before assigning: state carried to its next run
    # (a loop around it: ``count += 1``).
    outputs = sorted(n for n in writes if (n in elsewhere or n in first_reads)
                     and n not in scope.declared_global)
    code_here = set(_bound_as_code(body))
    for name in sorted(set(params) & scope.code | set(outputs) & code_here):
        finder.problem(node, f"the segment of {comp!r} would pass {name!r}, a function, class or module "
                       "bound in the function, which cannot cross to another process",
                       "define or import it at the module's top level (the compartment has those)")
    for name in sorted(set(params) & scope.params_of_method):
        finder.problem(node, f"the segment of {comp!r} in a method uses {name!r}: the object cannot "
                       "cross to another process",
                       f"copy the attributes it needs into variables before the block, and assign "
                       f"them back to {name} after it")
    # A received value changed in place changes the callee's copy only.
    first_store = {}
    for n, ref in _names(body, ast.Store):
        pos = (getattr(ref, "lineno", 0), getattr(ref, "col_offset", 0))
        first_store[n] = min(first_store.get(n, pos), pos)

    def before_store(name: str | None, at: ast.AST) -> bool:
        pos = (getattr(at, "lineno", 0), getattr(at, "col_offset", 0))
        return name in params and (name not in first_store or pos < first_store[name])

    fix = ("build a new value and assign it ({0} = ...) in the block, so it is returned "
           "(values cross by copy)")
    for stmt in body:
        for sub in ast.walk(stmt):
            if isinstance(sub, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = sub.targets if isinstance(sub, (ast.Assign, ast.Delete)) else [sub.target]
                for t in targets:
                    if isinstance(t, (ast.Attribute, ast.Subscript)) and before_store(_base_name(t), sub):
                        target = _base_name(t)
                        finder.problem(sub, f"the segment of {comp!r} changes {target!r} in place, "
                                       "but it gets a copy: the change would be lost", fix.format(target))
            elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute) \
                    and sub.func.attr in MUTATING_METHODS and before_store(_base_name(sub.func.value), sub):
                target = _base_name(sub.func.value)
                finder.problem(sub, f"the segment of {comp!r} calls {target}.{sub.func.attr}(), which "
                               f"changes {target!r} in place, but it gets a copy: the change would be "
                               "lost", fix.format(target))
            elif isinstance(sub, ast.Call) and sub.args and isinstance(sub.args[0], ast.Name) \
                    and (getattr(sub.func, "attr", None) or getattr(sub.func, "id", None)) in MUTATING_FUNCTIONS \
                    and before_store(sub.args[0].id, sub):
                target = sub.args[0].id
                finder.problem(sub, f"the segment of {comp!r} passes {target!r} to a function that "
                               "changes it in place, but it gets a copy: the change would be lost",
                               fix.format(target))
    indent = finder.lines[node.lineno - 1][:node.col_offset]
    # Outputs are passed in too: a block that may not assign one (an ``if``,
    # a loop that finds nothing) leaves the caller's value.
    inputs = sorted(set(params) | (set(outputs) - surely_assigned))
    made_here = any(_makes_descriptor(sub) for stmt in body for sub in ast.walk(stmt))
    passed_in = any(_makes_descriptor(sub.value) and any(n in inputs for n, _ in _names([t], ast.Store))
                    for stmt in where for sub in ast.walk(stmt)
                    if isinstance(sub, ast.Assign) and id(sub) not in in_block for t in sub.targets)
    return Segment(comp, node.lineno, node.end_lineno or node.lineno, body[0].lineno,
                   f"_segment_{comp.replace('-', '_')}_{node.lineno}", inputs, outputs, indent,
                   made_here or passed_in)


#: Calls whose value is a descriptor that crosses as one (``descriptors = true``).
_DESCRIPTOR_MAKERS = frozenset({"Fd", "Handover", "socket", "socketpair", "fromfd"})


def _makes_descriptor(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in _DESCRIPTOR_MAKERS


def _under_main_guard(tree: ast.Module, node: ast.AST) -> bool:
    for top in tree.body:
        if isinstance(top, ast.If) and "__name__" in ast.unparse(top.test) \
                and "__main__" in ast.unparse(top.test):
            if any(n is node for n in ast.walk(top)):
                return True
    return False


def _read_first(body: list[ast.stmt]) -> set[str]:
    """The names the block may read before it assigns them: its parameters.
    Flow by flow: a loop's target is bound in its body, a ``with ... as``
    name in its block; a name an ``if`` (or a loop, a ``try``) may or may
    not assign is the caller's where it was not (so it is passed)."""
    reads: set[str] = set()

    def stores(node: ast.AST) -> set[str]:
        return {n for n, _ in _names([node], ast.Store)}

    def loads(node: ast.AST | None, assigned: set[str]) -> None:
        if node is not None:
            reads.update(n for n, _ in _names([node], ast.Load) if n not in assigned)

    def block(stmts: list[ast.stmt], assigned: set[str]) -> set[str]:
        for st in stmts:
            assigned = stmt(st, assigned)
        return assigned

    def stmt(st: ast.stmt, assigned: set[str]) -> set[str]:
        if isinstance(st, (ast.For, ast.AsyncFor)):
            loads(st.iter, assigned)
            block(st.body, assigned | stores(st.target))
            block(st.orelse, set(assigned))
            return assigned
        if isinstance(st, ast.While):
            loads(st.test, assigned)
            block(st.body, set(assigned))
            block(st.orelse, set(assigned))
            return assigned
        if isinstance(st, ast.If):
            loads(st.test, assigned)
            return block(st.body, set(assigned)) & block(st.orelse, set(assigned))
        if isinstance(st, (ast.With, ast.AsyncWith)):
            for item in st.items:
                loads(item.context_expr, assigned)
                if item.optional_vars is not None:
                    assigned = assigned | stores(item.optional_vars)
            block(st.body, set(assigned))
            return assigned  # a context manager may swallow an exception mid-body
        if isinstance(st, ast.Match):
            loads(st.subject, assigned)
            for case in st.cases:
                inner = assigned | stores(case.pattern)
                loads(case.guard, inner)
                block(case.body, inner)
            return assigned
        if isinstance(st, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            block(st.body, set(assigned))
            for handler in st.handlers:
                loads(handler.type, assigned)
                block(handler.body, assigned | ({handler.name} if handler.name else set()))
            block(st.orelse, set(assigned))
            block(st.finalbody, set(assigned))
            return assigned
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            loads(st, assigned)  # decorators, defaults, what its body reads from here
            return assigned | {st.name}
        if isinstance(st, ast.AugAssign):
            if isinstance(st.target, ast.Name) and st.target.id not in assigned:
                reads.add(st.target.id)  # x += 1 reads x first
            loads(st.target, assigned)
            loads(st.value, assigned)
            return assigned | stores(st.target)
        if isinstance(st, (ast.Assign, ast.AnnAssign)):
            loads(st.value, assigned)
            for target in (st.targets if isinstance(st, ast.Assign) else [st.target]):
                loads(target, assigned)
            if isinstance(st, ast.AnnAssign) and st.value is None:
                return assigned
            return assigned | {n for t in (st.targets if isinstance(st, ast.Assign) else [st.target])
                               for n in stores(t)}
        loads(st, assigned)
        # (a walrus in an expression may not run: ``a or (b := f())``)
        walrus = {n.target.id for n in ast.walk(st) if isinstance(n, ast.NamedExpr)}
        return assigned | (stores(st) - walrus)

    _read_first.assigned = block(body, set())  # type: ignore[attr-defined]
    return reads


def _names_anywhere(node: ast.AST, ctx: type | tuple[type, ...]) -> list[tuple[str, ast.Name]]:
    return [(n.id, n) for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)]


def _base_name(node: ast.expr) -> str | None:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


# -- generation -------------------------------------------------------------------------------------


PROLOGUE = ("import pycompart.frontend.segments as __pycompart_segments__  # pycompart rewrite\n"
            "__pycompart_app__ = __pycompart_segments__.app_for(__file__)\n")


def rewrite(source: str, filename: str = "<program>", original: str | None = None) -> Result:
    """Rewrite ``source``. ``original``: the path the generated code points
    its segments back to (default ``filename``)."""
    finder, problems = analyze(source, filename)
    if finder is None:
        return Result(filename, "", [], [], problems)
    segments = [_segment(finder, node, scope, comp) for node, scope, comp in finder.segments]
    problems = finder.problems
    result = Result(filename, "", segments, finder.entrypoints, problems)
    if problems:
        return result
    lines = list(finder.lines)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    origins = list(range(1, len(lines) + 1))
    origin = original or filename
    # Replace each block by its call, last first (line numbers stay valid).
    for seg in sorted(segments, key=lambda s: s.line, reverse=True):
        # Each value is passed if it is bound here (``bound``): the block
        # then finds unbound what was unbound, as it would have.
        args = ", ".join(f"{n}=lambda: {n}" for n in seg.params)
        call = f"{seg.name}(**__pycompart_segments__.bound({args}))" if seg.params else f"{seg.name}()"
        note = f"  # pycompart: segment {seg.compartment!r}, {_base(filename)}:{seg.line}-{seg.end_line}"
        if seg.outputs:
            text = [f"{seg.indent}__pycompart_out__ = {call}{note}\n"]
            text += [f'{seg.indent}if "{n}" in __pycompart_out__: {n} = __pycompart_out__["{n}"]\n'
                     for n in seg.outputs]
        else:
            text = [f"{seg.indent}{call}{note}\n"]
        lines[seg.line - 1:seg.end_line] = text
        origins[seg.line - 1:seg.end_line] = [seg.line] * len(text)
    # The decorators of entrypoints go to the app.
    for comp, name, line in finder.entrypoints:
        fn = next(n for n in finder.tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
        dec = fn.decorator_list[0]
        text = lines[dec.lineno - 1]
        lines[dec.lineno - 1] = text[:dec.col_offset] + f"__pycompart_app__.entrypoint({comp!r})" + \
            text[dec.end_col_offset:] if dec.lineno == dec.end_lineno else text  # type: ignore[operator]
    at = _insertion_line(finder.tree)
    head = lines[:at]
    rest = lines[at:]
    generated = PROLOGUE + "\n"
    line = len(head) + generated.count("\n") + 1  # the next line's number
    for seg in segments:
        # its block: after a comment, 2 decorators, the def, a line per parameter
        piece = _hoist(finder, seg, origin, line + 4 + len(seg.params))
        generated += piece
        line += piece.count("\n")
    result.source = "".join(head) + generated + "".join(rest)
    result.line_map = origins[:at] + [0] * generated.count("\n") + origins[at:]
    return result


def _base(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _hoist(finder: _Finder, seg: Segment, origin: str, body_at: int) -> str:
    # The block's lines as they are (a body may be indented by any amount):
    # columns stay the original's too.
    body = "".join(finder.lines[seg.body_line - 1:seg.end_line])
    if not body.endswith("\n"):
        body += "\n"
    first = finder.lines[seg.body_line - 1]
    indent = first[:len(first) - len(first.lstrip())]
    unbound = "__pycompart_segments__.UNBOUND"
    params = ", ".join(f"{n}={unbound}" for n in seg.params)
    restore = "".join(f"{indent}if {n} is {unbound}: del {n}\n" for n in seg.params)
    ret = ", ".join(f"{n}=lambda: {n}" for n in seg.outputs)
    ret = f"{indent}return __pycompart_segments__.bound({ret})\n" if seg.outputs else ""
    # ``origin`` shifts the code (nested functions included) so that the
    # block reads as the original's lines.
    return (f"# segment {seg.compartment!r} from {_base(finder.filename)}:{seg.line}-{seg.end_line}\n"
            f"@__pycompart_app__.entrypoint({seg.compartment!r})\n"
            f"@__pycompart_segments__.origin({origin!r}, {seg.body_line}, {body_at})\n"
            f"def {seg.name}({params}):\n"
            f"{restore}{body}{ret}\n\n")


def _insertion_line(tree: ast.Module) -> int:
    """After the module's docstring and ``from __future__`` imports."""
    at = 0
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            at = node.end_lineno or node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
            at = node.end_lineno or node.lineno
        else:
            break
    return at


def spec_skeleton(result: Result, module: str = "__main__") -> str:
    """A spec listing every compartment and entrypoint found, with no
    privileges granted: the user adds what each one needs."""
    out = [f"# generated by pycompart rewrite from {_base(result.filename)}: grant each compartment",
           "# what it needs under [compartments.NAME.privileges] (nothing is granted by default)", ""]
    passing = {s.compartment for s in result.segments if s.descriptors}
    for comp, keys in result.functions(module).items():
        out.append(f"[compartments.{comp}]")
        out.append("functions = [" + ", ".join(f'"{k}"' for k in keys) + "]")
        if comp in passing:
            out.append("descriptors = true  # its segments pass descriptors (pycompart.Fd, sockets)")
        out.append("")
    return "\n".join(out)


def _local_imports(tree: ast.Module, src_dir: str, out_dir: str) -> list[str]:
    """The modules the program imports from beside it (``src_dir``) that
    are not in ``out_dir``: the rewritten program there would not find them."""
    import os

    names: dict[str, None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names.setdefault(alias.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.setdefault(node.module.partition(".")[0])

    def beside(where: str, name: str) -> bool:
        return os.path.isfile(os.path.join(where, name + ".py")) or os.path.isdir(os.path.join(where, name))

    return [n for n in names if beside(src_dir, n) and not beside(out_dir, n)]


def rewrite_command(sources: list[str], out: str | None, spec_out: str | None, check: bool) -> int:
    """``pycompart rewrite``: exit status 0 if everything was rewritten (or
    would be, with ``check``), 1 if any problem was found, 2 for bad use."""
    import os
    import sys

    if not check and not out:
        print("pycompart rewrite: give --out DIR (or --check)", file=sys.stderr)
        return 2
    if spec_out and len(sources) > 1:
        print("pycompart rewrite: --spec-out takes one program", file=sys.stderr)
        return 2
    failed = False
    for src in sources:
        try:
            with open(src, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            print(f"pycompart rewrite: {src}: {exc.strerror}", file=sys.stderr)
            failed = True
            continue
        name = os.path.basename(src)
        target = os.path.join(out, name) if out else None
        result = rewrite(text, src, original=os.path.abspath(src))
        for problem in result.problems:
            print(problem, file=sys.stderr)
        if result.problems:
            failed = True
            continue
        for seg in result.segments:
            outs = f" -> {', '.join(seg.outputs)}" if seg.outputs else ""
            print(f"{src}:{seg.line}-{seg.end_line}: segment {seg.compartment!r} becomes "
                  f"{seg.name}({', '.join(seg.params)}){outs}")
        for comp, fn, line in result.entrypoints:
            print(f"{src}:{line}: {fn}() is an entrypoint of {comp!r}")
        if not result.segments and not result.entrypoints:
            print(f"{src}: no segments or entrypoints (written unchanged)" if not check
                  else f"{src}: no segments or entrypoints")
        if check or target is None:
            continue
        if os.path.abspath(target) == os.path.abspath(src):
            print(f"pycompart rewrite: {src}: --out would overwrite the program", file=sys.stderr)
            return 2
        os.makedirs(out, exist_ok=True)  # type: ignore[arg-type]
        with open(target, "w", encoding="utf-8") as f:
            f.write(result.source if (result.segments or result.entrypoints) else text)
        spec_path = spec_out or os.path.splitext(target)[0] + ".toml"
        with open(spec_path, "w", encoding="utf-8") as f:
            f.write(spec_skeleton(result))
        print(f"wrote {target} and {spec_path}")
        src_dir = os.path.dirname(os.path.abspath(src))
        missing = _local_imports(ast.parse(text, src), src_dir, os.path.abspath(out))  # type: ignore[arg-type]
        if missing and src_dir != os.path.abspath(out):  # type: ignore[arg-type]
            print(f"note: {name} imports {', '.join(missing)} from beside {src}, not found in {out}: "
                  f"copy {'it' if len(missing) == 1 else 'them'} there, or run it with "
                  f"PYTHONPATH={src_dir}", file=sys.stderr)
    return 1 if failed else 0


def generated_entrypoints(source: str, filename: str) -> list[tuple[str, str]]:
    """(compartment, function) of each entrypoint of a rewritten program:
    its functions decorated ``@__pycompart_app__.entrypoint("X")``."""
    out = []
    for node in ast.parse(source, filename).body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                if isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) \
                        and dec.func.attr == "entrypoint" and isinstance(dec.func.value, ast.Name) \
                        and dec.func.value.id == "__pycompart_app__" and len(dec.args) == 1 \
                        and isinstance(dec.args[0], ast.Constant) and isinstance(dec.args[0].value, str):
                    out.append((dec.args[0].value, node.name))
    return out
