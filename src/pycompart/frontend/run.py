"""``pycompart run``: box the dependencies of a program that was not written
for pycompart (the research log's spec-driven shim).

The spec places modules and functions in compartments; the import hook
(``pycompart.frontend.importhook``) hands the program stand-ins for them.
``run`` starts the app lazily (instances start when a compartment is first
used, so ``shared`` data defined by the program is there), then runs the
script as ``__main__`` with its argv, and exits as ``python app.py`` would.
"""

from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
import types
from typing import Any

from ..policy.spec import load_spec_file
from ..wire.exceptions import is_runpy, raised_by_runpy
from .app import App


# -- running a program -----------------------------------------------------------------


def run(spec_path: str, target: str, argv: list[str], as_module: bool = False) -> int:
    """Run ``target`` (a script, or a module with ``as_module``) like
    ``python target ARGV...``, with the spec's modules boxed. Returns the
    exit status; a KeyboardInterrupt ends the process by SIGINT, as Python's
    own does."""
    spec = load_spec_file(spec_path)
    script = os.path.abspath(target)
    if not as_module and not os.path.isfile(script):
        print(f"pycompart run: can't open file {target!r}: no such file", file=sys.stderr)
        return 2
    rewritten = None
    if not as_module:
        # An annotated program (pycompart.segment, pycompart.entrypoint) is
        # rewritten first (cached): no build step.
        from . import segments

        try:
            rewritten, spec = segments.prepare_run(script, spec)
        except segments.RewriteFailed as exc:
            print(exc, file=sys.stderr)
            return 1
    app = App(spec)
    # The program's sys.path[0], as python would set it: its directory (or
    # the working directory for -m), in place of the entry python made for
    # pycompart's own entry point (none under -I/-P: then it is added).
    entry = os.getcwd() if as_module else os.path.dirname(script)
    if sys.flags.safe_path:
        sys.path.insert(0, entry)
    else:
        sys.path[0:1] = [entry]
    sys.argv = [target, *argv]
    source = None
    if not as_module:
        # Read now: under its own lock-down main may not reach the file.
        with open(script, "rb") as f:
            source = f.read()
    from . import segments

    app.start(lazy=True, import_hook=True, confine_main=app.spec.main_privileges is not None,
              main_path=rewritten, read_also=[segments.cache_root()], warm=True)
    segments.RUN_APP = app  # (also for annotated modules the program imports)
    module_hook = segments.ModuleRewriter(app)
    sys.meta_path.insert(0, module_hook)
    shown = script  # the program's __file__ (its rewritten copy runs in its place)
    line_map = None
    if rewritten is not None:
        with open(rewritten, "rb") as f:
            script, source = rewritten, f.read()
        line_map = segments.original_lines(rewritten, source.count(b"\n"))
    # Everything allocated so far is pycompart's (and the standard library's)
    # and lives as long as the process: out of the collector's sight, so
    # that neither the program's own full collections nor the interpreter's
    # at exit walk it again (~20 ms of a small program's run). There is no
    # garbage to lose here (nothing has run that could leave cycles), and
    # what the program allocates from now on is collected as unboxed.
    gc.freeze()
    interrupted = False
    code: int = 0
    try:
        if as_module:
            boxed = _placed_in(app, target)
            if boxed is not None:
                _run_boxed_module(boxed, target, argv)
            else:
                _run_module(target)
        else:
            _run_script(script, source, shown, line_map)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        interrupted = True
        _print_exception(*sys.exc_info())
    except ImportError as exc:
        if as_module and _raised_by_runpy(exc):
            # What python -m says for a module it cannot find (no traceback:
            # the program never ran).
            print(f"pycompart run: {exc}", file=sys.stderr)
        else:
            _print_exception(*sys.exc_info())
        code = 1
    except BaseException:
        _print_exception(*sys.exc_info())
        code = 1
    finally:
        _flush()
        app._stop_before_exit()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    return code


def _run_script(path: str, source: bytes, shown: str | None = None,
                line_map: list[int] | None = None) -> None:
    """What ``python path`` does: the script's code in a fresh ``__main__``
    (runpy.run_path would rewrite ``sys.argv[0]``). ``shown``: its
    ``__file__``, if not ``path`` (a rewritten program runs as the original);
    ``line_map``: the original's line for each of ``path``'s, so that its
    frames in a traceback point to the program as written."""
    import builtins
    import importlib.machinery

    if line_map and shown:
        code = compile(_relocated(source, shown, line_map), shown, "exec", dont_inherit=True)
    else:
        code = compile(source, path, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__file__ = shown or path
    module.__builtins__ = builtins  # type: ignore[attr-defined]
    module.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    module.__spec__ = None
    # It stays there when it ends, as python's does: the interpreter's exit
    # then clears its globals in order, so that what it left open (a file
    # it wrote and never closed) is flushed and its __del__ methods run.
    # Dropped, its globals would live on in reference cycles (through its
    # classes and functions) that nothing clears at exit.
    sys.modules["__main__"] = module
    exec(code, module.__dict__)


def _run_module(name: str) -> None:
    """What ``python -m name`` does: the module's code in a fresh
    ``__main__`` that, as ``_run_script``'s, stays in ``sys.modules``
    (``runpy.run_module`` puts the one it makes back). runpy's own two
    steps, private but in every CPython since 3.4; without them,
    ``run_module``."""
    details = getattr(runpy, "_get_module_details", None)
    run_code = getattr(runpy, "_run_code", None)
    if details is None or run_code is None:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
        return
    _, spec, code = details(name)  # ImportError as run_module raises it
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    sys.argv[0] = spec.origin
    run_code(code, module.__dict__, None, "__main__", spec)


def _relocated(source: bytes, filename: str, line_map: list[int]) -> Any:
    """``source`` parsed, its code's lines moved to the original's (the
    generated code, mapped to 0, moves its own: ``segments.origin``)."""
    import ast

    tree = ast.parse(source, filename)
    count = len(line_map)
    for node in ast.walk(tree):
        line = getattr(node, "lineno", None)
        if line is None or not 0 < line <= count or not line_map[line - 1]:
            continue
        node.lineno = line_map[line - 1]
        end = getattr(node, "end_lineno", None)
        if end is not None:
            mapped = line_map[end - 1] if 0 < end <= count else 0
            node.end_lineno = max(node.lineno, mapped)
    return tree


def _exit_code(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF if code >= 0 else code % 256
    print(code, file=sys.stderr)
    return 1


def _print_exception(exc_type: Any, exc: Any, tb: Any) -> None:
    """Print like Python would for the program: pycompart's and runpy's
    frames are left out (the call gate is not the program's code)."""
    kept = []
    while tb is not None:
        if not _is_ours(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    new_tb = None
    for frame_tb in reversed(kept):
        new_tb = types.TracebackType(new_tb, frame_tb.tb_frame, frame_tb.tb_lasti, frame_tb.tb_lineno)
    if exc is not None:
        exc = exc.with_traceback(new_tb)
    try:
        sys.excepthook(exc_type, exc, new_tb)
    except Exception:
        import traceback  # here: a program that ends well never needs it

        traceback.print_exception(exc_type, exc, new_tb)


#: pycompart's own source tree (its frames are not the program's).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _is_ours(filename: str) -> bool:
    return is_runpy(filename) or os.path.abspath(filename).startswith(_PACKAGE_DIR)


def _placed_in(app: Any, module: str) -> Any:
    """The module compartment ``module`` is placed in, if any."""
    from .proxy import places

    for comp in app._runtime.compartments.values():
        if places(comp.spec, module):
            return comp
    return None


def _run_boxed_module(comp: Any, module: str, argv: list[str]) -> None:
    """``-m`` of a boxed module: it runs as ``__main__`` in its compartment
    (its code never runs in main); what it exits with is the program's."""
    from ..errors import ProtocolError

    outcome = comp.call(None, "@runmain", [module, list(argv)])
    if type(outcome) is not list or len(outcome) != 2 or outcome[0] not in ("exit", "not-runnable") \
            or not (outcome[1] is None or type(outcome[1]) in (int, str)):
        raise ProtocolError(f"compartment {comp.name!r}: a malformed outcome of -m {module}")
    kind, value = outcome
    if kind == "not-runnable":
        raise _NotRunnable(str(value))  # (the module never ran: one line, as python says)
    if value is not None:
        raise SystemExit(value)


class _NotRunnable(ImportError):
    """runpy in the compartment found no module to run (``-m`` of a boxed package without ``__main__``)."""


def _raised_by_runpy(exc: BaseException) -> bool:
    """Whether runpy raised ``exc``, here or in the compartment of a boxed
    module (the module to run was not found)."""
    return isinstance(exc, _NotRunnable) or raised_by_runpy(exc)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
