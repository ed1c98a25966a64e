"""Annotations for ``pycompart rewrite`` and what rewritten programs call.

``segment`` and ``entrypoint`` are what a programmer writes; unrewritten,
they do nothing, so annotating a program is safe. ``app_for`` and ``origin``
are what the rewriter's output calls (``pycompart.frontend.rewrite``).
"""

from __future__ import annotations

import os
import re
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar

from ..compartment import serve as _instance
from ..errors import PycompartError
from ..wire.contract import function_key

F = TypeVar("F", bound=Callable[..., Any])
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

#: The app ``pycompart run`` started for an annotated program.
RUN_APP: Any = None


def _check(compartment: Any) -> str:
    if not isinstance(compartment, str) or not _NAME_RE.match(compartment):
        raise TypeError(f"a compartment name, not {compartment!r}")
    return compartment


class segment:
    """``with pycompart.segment("Privileged"):`` marks a block to run in
    compartment ``Privileged`` once the program is rewritten (``pycompart
    rewrite``, or ``pycompart run``). Unrewritten it does nothing."""

    __slots__ = ("compartment",)

    def __init__(self, compartment: str):
        self.compartment = _check(compartment)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def entrypoint(compartment: str) -> Callable[[F], F]:
    """``@pycompart.entrypoint("Privileged")`` on a module-level function:
    it runs in ``Privileged`` once the program is rewritten. Unrewritten the
    function is returned as it is."""
    _check(compartment)

    def mark(fn: F) -> F:
        return fn
    return mark


def origin(path: str, line: int, generated: int) -> Callable[[F], F]:
    """A hoisted segment's code, relocated to where it was written: its
    lines (``generated`` is its body's first line here) become the
    original's (``line`` in ``path``), nested functions included, so a
    traceback from inside a segment shows the original file and line."""
    delta = line - generated

    def relocate(code: types.CodeType) -> types.CodeType:
        consts = tuple(relocate(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        return code.replace(co_filename=path, co_firstlineno=max(1, code.co_firstlineno + delta),
                            co_consts=consts)

    def mark(fn: F) -> F:
        fn.__code__ = relocate(fn.__code__)  # type: ignore[attr-defined]
        return fn
    return mark


def app_for(program: str) -> _SegmentApp:
    """The app a rewritten program's entrypoints belong to: the one
    ``pycompart run`` started; inside an instance, an inert one; otherwise
    the spec beside the program (``prog.toml`` for ``prog.py``), started
    on the first call of an entrypoint and stopped at exit."""
    return _SegmentApp(program)


class _SegmentApp:
    def __init__(self, program: str):
        self.program = program
        self._app: Any = None
        self._lock = threading.Lock()
        #: (compartment, key) of the program's entrypoints, as they are defined.
        self._keys: list[tuple[str, str]] = []

    def entrypoint(self, compartment: str) -> Callable[[Callable[..., Any]], Any]:
        _check(compartment)

        def register(fn: Callable[..., Any]) -> Any:
            if _instance.CURRENT is not None:
                # Inside an instance: its own compartment's run here, the
                # others' go over an edge (or are refused by name).
                from .app import Entrypoint

                return Entrypoint(_inert(), compartment, fn)
            self._keys.append((compartment, function_key(fn)))
            return _Call(self, compartment, function_key(fn), fn)
        return register

    def app(self) -> Any:
        if RUN_APP is not None:
            return RUN_APP
        with self._lock:
            if self._app is None:
                from .app import App

                spec = os.path.splitext(os.path.abspath(self.program))[0] + ".toml"
                if not os.path.exists(spec):
                    raise PycompartError(
                        f"{self.program} is a rewritten program, but its spec {spec} is missing: "
                        "write it with pycompart rewrite ... --spec-out, or run the program with "
                        "pycompart run SPEC -- PROGRAM")
                from ..policy.spec import load_spec_file

                app = App(with_entrypoints(load_spec_file(spec), self._keys))
                app.start(lazy=True)
                self._app = app
            return self._app


_INERT: Any = None


def _inert() -> Any:
    global _INERT
    if _INERT is None:
        from .app import App

        _INERT = App.from_spec("<instance>")
    return _INERT


class _Call:
    """A rewritten program's entrypoint, in main: a call into its
    compartment (the app is started on the first one)."""

    def __init__(self, owner: _SegmentApp, compartment: str, key: str, fn: Callable[..., Any]):
        self._owner, self.compartment, self.key, self.__wrapped__ = owner, compartment, key, fn
        self.__pycompart_function__ = fn  # what the app's contract is made from
        self.__name__ = getattr(fn, "__name__", key)
        self.__qualname__ = getattr(fn, "__qualname__", key)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        app = self._owner.app()
        try:
            ep = app.function(self.key)
        except Exception:
            raise PycompartError(f"{self.key} is an entrypoint of compartment {self.compartment!r} "
                                 f"in the rewritten program, but the app's spec ({app.spec.source}) "
                                 "does not list it") from None
        if ep.compartment != self.compartment:
            raise PycompartError(f"{self.key} runs in compartment {self.compartment!r}, but the spec "
                                 f"puts it in {ep.compartment!r}")
        return ep(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<entrypoint {self.key} in compartment {self.compartment!r}>"


def run_main(rewritten: str, argv0: str) -> None:
    """``pycompart run`` of an annotated program: run its rewritten copy as
    ``__main__`` (the instances load the same copy)."""
    import runpy

    sys.argv[0] = argv0
    runpy.run_path(rewritten, run_name="__main__")


class RewriteFailed(PycompartError):
    """The program has segments the rewriter will not hoist (each named)."""


#: Where ``pycompart run`` keeps rewritten programs (the instances read
#: them: readable by other uids, as the program's own directory is).
CACHE_DIR = "/var/tmp/pycompart-rewrite"


def prepare_run(script: str, spec: Any) -> tuple[str | None, Any]:
    """For ``pycompart run``: if ``script`` is annotated, its rewritten copy
    (cached by content) and ``spec`` with the generated entrypoints added to
    their compartments (a spec need only declare the compartments)."""
    import hashlib

    from .rewrite import rewrite, uses_segments

    with open(script, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", "replace")
    if not uses_segments(text):
        return None, spec
    from .rewrite import PROLOGUE, generated_entrypoints

    if PROLOGUE in text:
        # Already rewritten (``pycompart rewrite --out DIR``): run as it is,
        # with the user's spec and the entrypoints it defines.
        try:
            return script, with_entrypoints(spec, [(c, f"__main__:{n}")
                                                   for c, n in generated_entrypoints(text, script)])
        except PycompartError as exc:
            raise RewriteFailed(f"{script}: {exc}") from None
    result = rewrite(text, script, original=script)
    if result.problems:
        raise RewriteFailed("\n".join(str(p) for p in result.problems))
    if not result.segments and not result.entrypoints:
        return None, spec
    try:
        spec = with_entrypoints(spec, [(comp, key) for comp, keys in result.functions("__main__").items()
                                       for key in keys])
    except PycompartError as exc:
        raise RewriteFailed(f"{script}: {exc}") from None
    from .._version import __version__

    from .rewrite import FORMAT

    key = f"{__version__}\0{FORMAT}\0{script}\0".encode() + data
    digest = hashlib.sha256(key).hexdigest()[:24]
    folder = os.path.join(CACHE_DIR + f"-{os.getuid()}", digest)
    target = os.path.join(folder, os.path.basename(script))
    if not os.path.exists(target):
        os.makedirs(folder, mode=0o755, exist_ok=True)
        os.chmod(os.path.dirname(folder), 0o755)
        os.chmod(folder, 0o755)
        tmp = f"{target}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(result.source)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    return target, spec


def with_entrypoints(spec: Any, keys: list[tuple[str, str]]) -> Any:
    """``spec`` with the program's entrypoints added to their compartments:
    a spec need only declare the compartments (and their privileges)."""
    import dataclasses

    missing = sorted({c for c, _ in keys if c not in spec.compartments})
    if missing:
        raise PycompartError(f"its segments name compartment{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(repr, missing))}, which {spec.source} does not define")
    compartments = dict(spec.compartments)
    for comp, key in keys:
        c = compartments[comp]
        if key not in c.functions:
            compartments[comp] = dataclasses.replace(c, functions=c.functions + (key,))
    return dataclasses.replace(spec, compartments=compartments)
