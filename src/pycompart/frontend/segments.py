"""Annotations for ``pycompart rewrite`` and what rewritten programs call.

``segment`` and ``entrypoint`` are what a programmer writes; unrewritten,
they do nothing, so annotating a program is safe. ``app_for`` and ``origin``
are what the rewriter's output calls (``pycompart.frontend.rewrite``).
"""

from __future__ import annotations

import io
import os
import re
import socket
import stat
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, TypeVar

from .. import compartment as _instance
from ..errors import PycompartError
from ..kernel import files
from ..wire import stdlib
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


class _Unbound:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<unbound>"


#: The default of a hoisted segment's parameters: the caller did not have it.
UNBOUND = _Unbound()


def bound(**values: Callable[[], Any]) -> dict[str, Any]:
    """The values whose names are bound (each given as ``lambda: name``): a
    name the code has not assigned (yet) is left out, not an error."""
    out = {}
    for name, get in values.items():
        try:
            out[name] = get()
        except NameError:  # UnboundLocalError too
            pass
    return out


# -- what crosses: the rules of module compartments, descriptors at the top level --

_FD_SLOT = "__pycompart_descriptor__"


def _pack(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bytes, list[Any]]:
    """Arguments by value (``refs.encode_plain``: a tuple stays a tuple, a
    Decimal a Decimal), with descriptors among them (``pycompart.Fd``, a
    socket, a file) carried beside, as values of their own."""
    from ..wire import refs

    fds: list[Any] = []

    def slot(value: Any) -> Any:
        tp = type(value)
        if tp is refs.Fd or issubclass(tp, socket.socket) or issubclass(tp, io.IOBase):
            fds.append(value)
            return [_FD_SLOT, len(fds) - 1]
        return value
    data = [[slot(a) for a in args], {k: slot(v) for k, v in kwargs.items()}]
    try:
        return refs.encode_plain(data), fds
    except TypeError as exc:
        names = [k for k, v in kwargs.items() if not _crosses(v)] or \
            [f"argument {i + 1}" for i, a in enumerate(args) if not _crosses(a)]
        raise TypeError(f"{', '.join(map(str, names)) or 'a value'} cannot cross to another "
                        f"compartment: {exc}") from None


def _crosses(value: Any) -> bool:
    from ..wire import refs

    if isinstance(value, (refs.Fd, socket.socket, io.IOBase)):
        return True  # (carried beside)
    try:
        refs.encode_plain(value)
    except TypeError:
        return False
    return True


_EXIT = "__pycompart_exit__"


def _unpack(payload: bytes, fds: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    from ..wire import refs

    args, kwargs = refs.decode_plain(payload)

    def slot(value: Any) -> Any:
        if type(value) is list and len(value) == 2 and value[0] == _FD_SLOT and type(value[1]) is int \
                and 0 <= value[1] < len(fds):
            return fds[value[1]]
        return value
    return [slot(a) for a in args], {k: slot(v) for k, v in kwargs.items()}


def _result(value: Any) -> Any:
    if type(value) is dict and len(value) == 1 and _EXIT in value:
        raise SystemExit(value[_EXIT])
    return value


def _by_value(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What the compartment serves for a segment or entrypoint ``fn``: one
    payload by value in, one out (its arguments and result cross by the
    rules of *What crosses*, not as msgspec's plain data)."""
    from ..wire.refs import Fd

    def serve(payload: bytes, fds: list[Fd]) -> bytes:
        from ..wire import refs

        args, kwargs = _unpack(payload, fds)
        try:
            result = fn(*args, **kwargs)
        except SystemExit as exc:  # sys.exit() in a segment ends the program, not the instance
            code = exc.code if exc.code is None or isinstance(exc.code, (int, str)) else str(exc.code)
            return refs.encode_plain({_EXIT: code})
        try:
            return refs.encode_plain(result)
        except TypeError as exc:
            raise TypeError(f"{function_key(fn)}'s result cannot cross to another compartment: "
                            f"{exc}") from None
    serve.__module__, serve.__qualname__, serve.__name__ = fn.__module__, fn.__qualname__, fn.__name__
    serve.__annotations__ = {"payload": bytes, "fds": list[Fd], "return": bytes}
    return serve


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

                return _Call(None, compartment, function_key(fn), fn,
                             Entrypoint(_inert(), compartment, _by_value(fn)))
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
                        f"{self.program} is a rewritten program, but its spec {spec} is missing (run "
                        "alone, it reads the spec beside it, where pycompart rewrite writes it "
                        "unless --spec-out says otherwise): put the spec there, or run the program "
                        "with pycompart run SPEC -- PROGRAM")
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
    """A rewritten program's entrypoint: in main, a call into its
    compartment (the app is started on the first one); in an instance, the
    function itself in its own compartment, a call over an edge in another."""

    def __init__(self, owner: _SegmentApp | None, compartment: str, key: str, fn: Callable[..., Any],
                 edge: Any = None):
        self._owner, self.compartment, self.key, self.__wrapped__ = owner, compartment, key, fn
        self._edge = edge
        # What the compartment serves, and main's contract is made from.
        self.__pycompart_function__ = edge.__pycompart_function__ if edge is not None else _by_value(fn)
        self.__name__ = getattr(fn, "__name__", key)
        self.__qualname__ = getattr(fn, "__qualname__", key)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from ..wire import refs

        if self._owner is None:  # in an instance
            here = _instance.CURRENT
            if here is not None and here.compartment == self.compartment:
                return self.__wrapped__(*args, **kwargs)
            payload, fds = _pack(args, kwargs)
            return _result(refs.decode_plain(self._edge(payload, fds)))
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
        if ep.resolve is None:
            # As in the original program: an exception of a module main has
            # imported (json.JSONDecodeError) arrives as itself.
            from .exceptions import imported_exception_class

            ep.resolve = imported_exception_class
        payload, fds = _pack(args, kwargs)
        return _result(refs.decode_plain(ep(payload, fds)))

    def __repr__(self) -> str:
        return f"<entrypoint {self.key} in compartment {self.compartment!r}>"


class RewriteFailed(PycompartError):
    """The program has segments the rewriter will not hoist (each named)."""


#: Where ``pycompart run`` keeps rewritten programs (the instances read
#: them: readable by other uids, as the program's own directory is).
CACHE_DIR = "/var/tmp/pycompart-rewrite"


def uses_segments(source: str) -> bool:
    """A cheap test: might this program be annotated?"""
    return ("segment" in source or "entrypoint" in source) and "pycompart" in source


def prepare_run(script: str, spec: Any) -> tuple[str | None, Any]:
    """For ``pycompart run``: if ``script`` is annotated, its rewritten copy
    (cached by content) and ``spec`` with the generated entrypoints added to
    their compartments (a spec need only declare the compartments)."""
    with open(script, "rb") as f:
        data = f.read()
    text = data.decode("utf-8", "replace")
    if not uses_segments(text):
        return None, spec
    # Here, not before: the rewriter (and ``ast``) costs every start ~2 ms.
    from .rewrite import PROLOGUE, generated_entrypoints, rewrite

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
    target = _cached(script, data, result.source, result.line_map)
    return target, spec


def with_entrypoints(spec: Any, keys: list[tuple[str, str]]) -> Any:
    """``spec`` with the program's entrypoints added to their compartments:
    a spec need only declare the compartments (and their privileges)."""
    import msgspec

    missing = sorted({c for c, _ in keys if c not in spec.compartments})
    if missing:
        raise PycompartError(f"its segments name compartment{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(repr, missing))}, which {spec.source} does not define")
    compartments = dict(spec.compartments)
    for comp, key in keys:
        c = compartments[comp]
        if key not in c.functions:
            compartments[comp] = msgspec.structs.replace(c, functions=c.functions + (key,))
    return msgspec.structs.replace(spec, compartments=compartments)


def _cached(script: str, data: bytes, source: str, line_map: list[int] | None = None) -> str:
    """Where the rewritten text of ``script`` is kept (by content; readable
    by the instances' uids, as the program's own directory is), and beside
    it (``LINES``) the original line each of its lines stands for."""
    import hashlib

    from .._version import __version__
    from . import rewrite as _rewrite

    maker = files.source_digest(_rewrite.__file__)
    key = f"{__version__}\0{_rewrite.FORMAT}\0{maker}\0{script}\0".encode() + data
    folder = _own_dir(os.path.join(_own_dir(cache_root()), hashlib.sha256(key).hexdigest()[:24]))
    target = os.path.join(folder, os.path.basename(script))
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        if line_map:
            import json

            files.write_own_file(target + LINES, json.dumps(line_map).encode())
        files.write_own_file(target, source.encode("utf-8"))
        return target
    if not stat.S_ISREG(st.st_mode) or not files.owned(st):
        raise RewriteFailed(f"{target}: not a file of this user's own (a rewritten program is run "
                            "from there, so it must be): remove it")
    return target




#: The suffix of the file beside a cached rewritten program that maps its
#: lines to the original's (``original_lines``).
LINES = ".lines.json"


def original_lines(rewritten: str, count: int) -> list[int] | None:
    """The line map ``_cached`` wrote beside ``rewritten`` (``count``
    lines), or None if there is none that fits."""
    import json

    try:
        with open(rewritten + LINES, "rb") as f:
            found = json.loads(f.read(16 << 20))
    except (OSError, ValueError):
        return None
    if type(found) is not list or len(found) != count or not all(type(n) is int and n >= 0 for n in found):
        return None
    return found


def _own_dir(path: str) -> str:
    """``path``, a directory of this user's that nobody else may write
    (``/var/tmp`` is everybody's: a directory another user made in advance
    could hold a "rewritten program" of theirs, run as ours). The instances'
    own uids read rewritten programs from here."""
    try:
        return files.own_directory(path, 0o755)
    except PermissionError as exc:
        raise RewriteFailed(f"{exc}: pycompart run keeps rewritten programs there; remove it") from None


def cache_root() -> str:
    return CACHE_DIR + f"-{os.getuid()}"


#: The standard library's directory (never annotated: not read).
_STDLIB = os.path.join(stdlib.DIRECTORIES[0], "")


class ModuleRewriter:
    """``pycompart run``'s import hook for annotated modules the program
    imports: each is rewritten (cached) and imported from the rewritten
    file, its entrypoints added to the app, and the instances started from
    then on import the same file. (A compartment's entrypoints are fixed
    when its first instance starts: import annotated modules before their
    compartments' first call, at the top of the program.)"""

    def __init__(self, app: Any):
        self.app = app
        self._busy = threading.local()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        # Other finders may ask the whole meta path in turn (the import
        # hook does, for placed functions): answer them as if absent.
        if getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            return self._find(fullname, path, target)
        finally:
            self._busy.on = False

    def _find(self, fullname: str, path: Any, target: Any = None) -> Any:
        import importlib.util

        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        origin = getattr(spec, "origin", None)
        if not isinstance(origin, str) or not origin.endswith(".py") or origin.startswith(_STDLIB) \
                or not os.path.isfile(origin):
            return spec  # (the standard library is never annotated: not read again)
        with open(origin, "rb") as f:
            data = f.read()
        text = data.decode("utf-8", "replace")
        if not uses_segments(text):
            return spec
        from .rewrite import rewrite

        result = rewrite(text, origin, original=origin)
        if result.problems:
            raise ImportError("\n".join(str(p) for p in result.problems), name=fullname)
        if not result.segments and not result.entrypoints:
            return spec
        runtime = self.app._runtime
        missing = [c for c in result.compartments if c not in runtime.spec.compartments]
        if missing:
            raise ImportError(f"{origin}: its segments name compartment(s) {', '.join(map(repr, missing))}, "
                              f"which {runtime.spec.source} does not define", name=fullname)
        where = _cached(origin, data, result.source)
        for comp, keys in result.functions(fullname).items():
            for key in keys:
                runtime.add_function(comp, key)
        runtime.rewritten[fullname] = where
        new = importlib.util.spec_from_file_location(fullname, where,
                                                     submodule_search_locations=spec.submodule_search_locations)
        return new
