"""``pycompart run``: box the dependencies of a program that was not written
for pycompart (the research log's spec-driven shim).

The spec places modules (``modules = ["yaml"]``) and functions
(``functions = ["pkg.mod:func"]``) in compartments. ``CompartmentFinder``,
first on ``sys.meta_path``, then hands the program stand-ins:

* importing a placed module (or any submodule of it) gives a
  ``proxy.ModuleProxy``; the real module is imported only inside the
  compartment's instances, after their lock-down;
* importing the module of a placed function imports it normally, then
  replaces that function (or class) by a stand-in that calls it in the
  compartment. The rest of that module runs in main.

``run`` starts the app lazily (instances start when a compartment is first
used, so ``shared`` data defined by the program is there), then runs the
script as ``__main__`` with its argv, and exits as ``python app.py`` would.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import runpy
import signal
import sys
import traceback
import types
from typing import Any

from .errors import PycompartError


class CompartmentFinder(importlib.abc.MetaPathFinder):
    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.modules: dict[str, str] = {}
        self.functions: dict[str, list[tuple[str, str]]] = {}
        for name, comp in runtime.compartments.items():
            for module in comp.spec.modules:
                self.modules[module] = name
            for key in comp.spec.functions:
                module, _, qualname = key.partition(":")
                if module != "__main__":
                    self.functions.setdefault(module, []).append((qualname, name))

    def install(self) -> None:
        early = sorted(m for m in list(self.modules) + list(self.functions)
                       if m in sys.modules and not _is_proxy(sys.modules[m]))
        if early:
            raise PycompartError(
                f"cannot box {', '.join(map(repr, early))}: already imported in main before the "
                "import hook was installed (it may be a dependency of pycompart itself)")
        sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass
        for name in [n for n, m in sys.modules.items() if _is_proxy(m)]:
            del sys.modules[name]

    def compartment_of(self, fullname: str) -> str | None:
        for module, comp in self.modules.items():
            if fullname == module or fullname.startswith(module + "."):
                return comp
        return None

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        comp = self.compartment_of(fullname)
        if comp is not None:
            return importlib.machinery.ModuleSpec(fullname, _ProxyLoader(self.runtime.compartments[comp]))
        placements = self.functions.get(fullname)
        if placements:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = _PlacingLoader(spec.loader, placements, self.runtime)
                    return spec
        return None


def _is_proxy(module: Any) -> bool:
    return getattr(type(module), "__pycompart_proxy__", False) is True


class _ProxyLoader(importlib.abc.Loader):
    def __init__(self, comp: Any):
        self.comp = comp

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return self.comp.path_object(spec.name, "", "module")

    def exec_module(self, module: types.ModuleType) -> None:
        # Ask the compartment: the module must exist there (ImportError otherwise).
        _, is_package = self.comp.call(None, "@import", [module.__name__])
        if is_package:
            module.__path__ = []


class _PlacingLoader(importlib.abc.Loader):
    """Imports a module normally, then replaces its placed functions."""

    def __init__(self, loader: Any, placements: list[tuple[str, str]], runtime: Any):
        self.loader = loader
        self.placements = placements
        self.runtime = runtime

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        for qualname, comp_name in self.placements:
            comp = self.runtime.compartments[comp_name]
            owner: Any = module
            parts = qualname.split(".")
            for part in parts[:-1]:
                owner = getattr(owner, part)
            real = getattr(owner, parts[-1], None)
            if real is None:
                raise ImportError(f"{module.__name__}:{qualname}, placed in compartment "
                                  f"{comp_name!r}, does not exist")
            kind = "class" if isinstance(real, type) else "function"
            setattr(owner, parts[-1], comp.path_object(module.__name__, qualname, kind))


# -- running a program -----------------------------------------------------------------


def run(spec_path: str, target: str, argv: list[str], as_module: bool = False) -> int:
    """Run ``target`` (a script, or a module with ``as_module``) like
    ``python target ARGV...``, with the spec's modules boxed. Returns the
    exit status; a KeyboardInterrupt ends the process by SIGINT, as Python's
    own does."""
    from .app import App
    from .spec import load_spec_file

    app = App(load_spec_file(spec_path))
    script = os.path.abspath(target)
    if not as_module and not os.path.isfile(script):
        print(f"pycompart run: can't open file {target!r}: no such file", file=sys.stderr)
        return 2
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
    app.start(lazy=True, import_hook=True, confine_main=app.spec.main_privileges is not None)
    interrupted = False
    code: int = 0
    try:
        if as_module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            _run_script(script, source)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        interrupted = True
        _print_exception(*sys.exc_info())
    except BaseException:
        _print_exception(*sys.exc_info())
        code = 1
    finally:
        _flush()
        app.stop()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    return code


def _run_script(path: str, source: bytes) -> None:
    """What ``python path`` does: the script's code in a fresh ``__main__``
    (runpy.run_path would rewrite ``sys.argv[0]``)."""
    import builtins
    import importlib.machinery

    code = compile(source, path, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins  # type: ignore[attr-defined]
    module.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    module.__spec__ = None
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


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
        traceback.print_exception(exc_type, exc, new_tb)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_ours(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or path == os.path.abspath(runpy.__file__)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
