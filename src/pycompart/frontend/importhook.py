"""The import hook: importing a placed module gives a proxy.

The spec places modules (``modules = ["yaml"]``) and functions
(``functions = ["pkg.mod:func"]``) in compartments. ``CompartmentFinder``,
first on ``sys.meta_path``, then hands the program stand-ins:

* importing a placed module (or any submodule of it) gives a
  ``proxy.ModuleProxy``; the real module is imported only inside the
  compartment's instances, after their lock-down;
* importing the module of a placed function imports it normally, then
  replaces that function (or class) by a stand-in that calls it in the
  compartment. The rest of that module runs in main.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from typing import Any

from ..errors import PycompartError

# The finder and loaders below are plain classes, as the import system only
# asks for their methods: ``importlib.abc`` (and the ``importlib.resources``
# and ``tempfile`` it imports) would cost every ``pycompart run`` some 5 ms.


class CompartmentFinder:
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
        _leave_meta_path(self)
        for name in [n for n, m in sys.modules.items() if _is_proxy(m)]:
            del sys.modules[name]

    def placed_module(self, fullname: str) -> str | None:
        """The placed module ``fullname`` is (or is a submodule of), if any."""
        return next((m for m in self.modules if fullname == m or fullname.startswith(m + ".")), None)

    def compartment_of(self, fullname: str) -> str | None:
        module = self.placed_module(fullname)
        return None if module is None else self.modules[module]

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


class UnboxedImportWarner:
    """On ``sys.meta_path`` while an app runs *without* the import hook:
    importing a module its spec places in a compartment then runs that
    module in main, unconfined. Nothing stops it (a program may mean it),
    but it is said once per module: the spec reads as if it were boxed."""

    def __init__(self, runtime: Any):
        self.placed = CompartmentFinder(runtime)
        self.warned: set[str] = set()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        top = self.placed.placed_module(fullname)
        if top is not None and top not in self.warned:
            import warnings

            self.warned.add(top)
            comp = self.placed.modules[top]
            warnings.warn(f"{fullname!r} is placed in compartment {comp!r}, but this app was started "
                          "without the import hook: this import runs it in main, unconfined (start "
                          f"it with App.start(import_hook=True), or use app.compartment({comp!r})"
                          f".module({top!r}))", RuntimeWarning, stacklevel=2)
        return None

    def install(self) -> None:
        sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        _leave_meta_path(self)


def _leave_meta_path(finder: Any) -> None:
    try:
        sys.meta_path.remove(finder)
    except ValueError:
        pass


def _is_proxy(module: Any) -> bool:
    return getattr(type(module), "__pycompart_proxy__", False) is True


class _ProxyLoader:
    def __init__(self, comp: Any):
        self.comp = comp

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        # Ask the compartment first: the module must exist there
        # (ImportError otherwise), before the import system reads attributes
        # of the proxy.
        return self.comp.module(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        # It ran in the compartment. What the import system set on the proxy
        # (``__spec__``, ``__file__``, ...) from now on is the program's to
        # change (``ModuleProxy.__setattr__``); these are its values now.
        if _is_proxy(module):
            module.__dict__["__pycompart_dunders__"] = {
                name: value for name, value in module.__dict__.items()
                if name.startswith("__") and name.endswith("__") and not name.startswith("__pycompart")}


def search_path() -> list[str]:
    """main's ``sys.path`` now, absolute: where an instance looks for a
    module main imports from it (``ObjectServer.op_import``)."""
    return [os.path.abspath(entry or os.curdir) for entry in sys.path if type(entry) is str][:1000]


class _PlacingLoader:
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
