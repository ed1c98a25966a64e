"""main's callback gate: what a compartment may do with main's objects.

A compartment can do one thing with an object main gave it: call it, and
only if its spec's ``may_call`` lists ``"main"``. A file object main passed
is a stream: its I/O methods and a few attributes
(``refs.STREAM_METHODS``/``STREAM_ATTRS``) are served, as a capability,
without ``may_call``. No other attribute of main's objects is ever served,
so a compartment cannot walk from a callback to its ``__globals__``, its
module or the builtins; modules and module globals are refused by the codec
before they could cross at all (``pycompart.wire.refs``).
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
from typing import Any

from ..errors import EntrypointError
from ..transport.channel import CallServer, Channel
from ..wire import protocols, refs
from ..wire.exceptions import describe_exception
from ..wire.protocol import Call, ErrorInfo
from . import subclass
from .proxy import ReturnedCallable

#: Callbacks from a compartment's worker threads (``Call.concurrent``) that
#: main runs at once, each on a thread of its own; beyond, they are refused.
MAX_CONCURRENT_CALLBACKS = 16
#: main's instances kept alive at once because the compartment's code holds
#: their twins (``CallbackGate._pin``).
MAX_PINNED = 4096


#: Bytes of arguments a compartment may pass to one of unittest's
#: assertions on main's test case (``subclass.make_subclass``).
MAX_ASSERTION_ARGS = 8 * 1024

#: Characters of main's stdin one request from a compartment may read.
STDIN_CHUNK = 64 * 1024


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_HASH_KEY = os.urandom(16)


def _identity_hash(obj: Any) -> int:
    """A hash for an object hashed by identity, stable while it lives, that
    does not give its address away (``hash(f)`` is ``id(f) >> 4``)."""
    import hashlib  # (here: asked of few objects, and a cost of main's start-up)

    digest = hashlib.blake2b(id(obj).to_bytes(8, "little"), key=_HASH_KEY, digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


#: unittest's equality assertions, which diff what they compare with
#: difflib (cubic on short lines: 600 lines of one character held main
#: 14 s): asked by a compartment, main compares, and says only that the
#: two differ.
_DIFFING = frozenset({"assertEqual", "assertEquals", "assertListEqual", "assertTupleEqual",
                      "assertSequenceEqual", "assertDictEqual", "assertSetEqual",
                      "assertMultiLineEqual", "failUnlessEqual"})


def _compared(case: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    if len(args) < 2 or set(kwargs) - {"msg", "seq_type"}:
        raise TypeError("an equality assertion takes two values and msg")
    first, second = args[0], args[1]
    msg = args[2] if len(args) > 2 else kwargs.get("msg")
    if first == second:
        return None
    from unittest.util import safe_repr

    standard = f"{safe_repr(first, True)} != {safe_repr(second, True)}"
    raise case.failureException(case._formatMessage(msg, standard))


class CallbackGate(CallServer):
    """main's server for calls from one instance: callbacks only."""

    def __init__(self, compartment: str, may_call_main: bool, peer: refs.Peer,
                 audit: Any = None, stdin: bool = False):
        self.compartment = compartment
        self.may_call_main = may_call_main
        self.stdin = stdin
        self.peer = peer
        self.audit = audit
        self._concurrent = threading.BoundedSemaphore(MAX_CONCURRENT_CALLBACKS)

    def execute(self, channel: Channel, call: Call) -> bytes:
        conn = channel.conn
        try:
            result = self._run(call, channel.take_message_fds(("c", call.id)))
            value = self.peer.encode(result)
            fds = refs.take_outgoing_fds()
            channel.set_reply_fds(fds)
            reply = conn.send_ok(call.id, value, len(fds))
            outcome = "ok"
        except BaseException as exc:
            # A callback's KeyboardInterrupt or SystemExit (Ctrl-C while it
            # runs, or its own ``raise``), or a library's own BaseException,
            # goes through the compartment's code as it would unboxed (a CLI
            # framework catches it); if nothing there catches it, it comes
            # back to main's caller as itself. (Escaping here, it would leave
            # the compartment without an answer.)
            info = self.describe(exc)
            reply = conn.send_err(call.id, info)
            outcome = f"error:{info.type_name}"
        if self.audit is not None:
            self.audit.record("callback", caller=self.compartment, callee="main", outcome=outcome)
        return reply

    def concurrent(self, channel: Channel, call: Call) -> None:
        """A callback from a worker thread of the compartment, made while
        main's call is in flight: run on a thread of main's own, as it would
        run unboxed, not on the thread waiting for that call (which may be
        needed for what comes next, and whose ``call_timeout`` still runs)."""
        if call.entrypoint == "@stdin":
            # Its read would wait on main's stdin past the end of main's
            # call, and take what main's own code reads next.
            channel.refuse(call, "main's stdin is read only for the thread serving main's call, "
                           "not for a worker thread of the compartment")
            return
        if not self._concurrent.acquire(blocking=False):
            channel.refuse(call, f"more than {MAX_CONCURRENT_CALLBACKS} callbacks from worker "
                           "threads are already running")
            return
        try:
            threading.Thread(target=self._serve_concurrent, args=(channel, call), daemon=True,
                             name=f"pycompart-callback-{self.compartment}").start()
        except RuntimeError:
            self._concurrent.release()
            channel.refuse(call, "main could not start a thread for it")

    def _serve_concurrent(self, channel: Channel, call: Call) -> None:
        try:
            channel.serve_nested(call)
        except BaseException:
            pass  # the compartment got its answer (serve_nested replies first)
        finally:
            self._concurrent.release()

    def _run(self, call: Call, fds: list[int]) -> Any:
        if not fds:
            return self._serve(call)
        with refs.receiving(fds):
            return self._serve(call)

    def _serve(self, call: Call) -> Any:
        if call.entrypoint in ("@callmethod", "@getattr", "@setattr"):
            request = self.peer.decode(call.args)
            if type(request) is list and request:
                if type(request[0]) is ReturnedCallable:
                    request[0] = request[0]._pc_obj
                if subclass.is_subclass_instance(request[0], self.compartment) \
                        or subclass.is_main_subclass(request[0], self.compartment):
                    return self._override(call.entrypoint, request, len(call.args))
            return self._stream(call.entrypoint, request)
        if call.entrypoint == "@stdin":
            return self._read_stdin(self.peer.decode(call.args))
        if not self.may_call_main:
            raise EntrypointError(f"compartment {self.compartment!r} may not call back into main "
                                  "(its spec's may_call does not list \"main\")")
        if call.entrypoint == "@op":
            return self._protocol(call)
        if call.entrypoint == "@pin":
            return self._pin(self.peer.decode(call.args))
        if call.entrypoint != "@call":
            raise EntrypointError(f"a compartment can only call main's callbacks and use main's "
                                  f"objects through their protocols, not {call.entrypoint!r}")
        request = self.peer.decode(call.args)
        if type(request) is not list or len(request) != 3:
            raise TypeError("malformed callback request")
        target, args, kwargs = request
        protocols.check_arguments(args, kwargs)
        if type(target) is ReturnedCallable:
            # The callback the compartment calls: what may_call is for. The
            # guard is for main's own code, not for the gate.
            target = target._pc_obj
        if not self.peer.exports.contains(target):
            raise EntrypointError("a compartment can only call objects main passed to it")
        if subclass.is_subclass_instance(target, self.compartment):
            # Lent with a twin, not handed over as a callback: the twin
            # reaches main's overrides by name (``_override``).
            raise EntrypointError("main's instances of subclasses of the compartment's classes "
                                  "are not callbacks")
        # main's subclass itself may be called too (``self.signer(key)``, a
        # class main handed over as a factory): main makes the instance, as
        # it would unboxed, and the compartment gets its twin (``_pin_result``).
        if not callable(target):
            raise TypeError(f"{type(target).__qualname__!r} object of main is not callable")
        result = target(*args, **kwargs)
        self._pin_result(result)
        return result

    def _pin_result(self, result: Any) -> None:
        """An instance of main's subclass that a callback returns (made by a
        factory main handed over, typically) may be held by nothing of
        main's: main lends it pinned, and the compartment unpins it after
        the operation it came in unless its code keeps the twin
        (``ObjectServer.watch_twins``)."""
        if not subclass.is_subclass_instance(result, self.compartment):
            return
        subclass.twin_of(result, self.peer.instance)  # type: ignore[attr-defined]
        if self.peer.exports.pinned < MAX_PINNED:
            self.peer.exports.pin(result, True)  # (else lent weakly, as before)

    def _protocol(self, call: Call) -> Any:
        """A protocol operation (``len``, ``iter``, ``next_batch``, ``+``,
        ``==``, ...) on one of main's objects that main passed: what using an
        object through its protocols means. Never an attribute."""
        request = self.peer.decode(call.args)
        if type(request) is not list or len(request) != 3 or type(request[2]) is not list:
            raise TypeError("malformed request")
        target, op, args = request
        if type(target) is ReturnedCallable:
            target = target._pc_obj
        if not self.peer.exports.contains(target):
            raise EntrypointError("a compartment can only use objects main passed to it")
        if op in ("isinstance", "issubclass"):
            cls = args[0] if len(args) == 1 else None
            if not isinstance(cls, type) or not self.peer.exports.contains(cls):
                raise TypeError(f"{op}() needs a class main passed to the compartment")
            if op == "issubclass":
                return isinstance(target, type) and issubclass(target, cls)
            return isinstance(target, cls)
        if op == "describe" and not args:
            return protocols.describe_callable(target)
        fn = protocols.OPS.get(op) if type(op) is str else None
        if fn is None:
            raise TypeError(f"unknown operation {op!r}")
        if op == "hash" and type(target).__hash__ is object.__hash__:
            return _identity_hash(target)
        result = fn(target, *args)
        if op in ("repr", "str", "format") and type(result) is str:
            # A default repr names the object's address ("<function f at
            # 0x7f...>"): none of main's addresses go on the wire.
            result = _ADDRESS.sub(" at 0x...", result)
        return result

    def describe(self, exc: BaseException) -> ErrorInfo:
        """What the compartment learns of an exception raised by main's
        code: its type and message (``describe_exception(brief=True)``), and
        for a class of main's, a reference to it, so that the compartment's
        stand-in of that class catches it."""
        info = describe_exception(exc, brief=True)
        cls = type(exc)
        if cls.__module__ != "builtins" and "__pycompart_standin__" not in cls.__dict__:
            try:
                info.origin = self.peer.exports.export(cls)
            except Exception:
                pass
        return info

    def _override(self, op: str, request: list[Any], size: int = 0) -> Any:
        """The compartment's twin of one of main's instances (a subclass of
        the compartment's class, ``pycompart.frontend.subclass``) asks main:
        to run a method main's classes define (an override main handed
        over), or to read or write an attribute of the instance."""
        if not self.may_call_main:
            raise EntrypointError(f"compartment {self.compartment!r} may not call back into main "
                                  "(its spec's may_call does not list \"main\")")
        target, name = request[0], request[1] if len(request) > 1 else None
        if not self.peer.exports.contains(target) or type(name) is not str:
            raise EntrypointError("a compartment can only use objects main passed to it")
        if isinstance(target, type):  # the class itself: its static and class methods
            handed = target.__pycompart_handed__
            if op != "@callmethod" or len(request) != 4 \
                    or handed.get(name) not in ("staticmethod", "classmethod"):
                raise AttributeError(f"class {target.__qualname__!r} hands over no static or "
                                     f"class method {name!r}")
            protocols.check_arguments(request[2], request[3])
            return getattr(target, name)(*request[2], **request[3])
        handed = type(target).__pycompart_handed__
        if op == "@callmethod":
            if len(request) != 4 or name not in handed:
                raise AttributeError(f"{type(target).__qualname__!r} hands over no method {name!r}")
            args, kwargs = request[2], request[3]
            protocols.check_arguments(args, kwargs)
            if name in getattr(type(target), "__pycompart_handed_std__", ()):
                # unittest's code, not main's: its counts are quadratic in
                # what they compare (20,000 items: 21 s), and main's caller
                # could not interrupt them.
                if size > MAX_ASSERTION_ARGS:
                    raise EntrypointError(f"the arguments of {name}() on main's test case are "
                                          f"{size} bytes, more than {MAX_ASSERTION_ARGS}")
                if name in _DIFFING:
                    return _compared(target, args, kwargs)
            return getattr(target, name)(*args, **kwargs)
        if name in target.__dict__ and not name.startswith("__pycompart"):
            if op == "@getattr" and len(request) == 2:
                return target.__dict__[name]
            if op == "@setattr" and len(request) == 3:
                object.__setattr__(target, name, request[2])
                return None
        if op == "@getattr" and len(request) == 2 and name in handed:
            return getattr(target, name)  # a property main defines
        raise AttributeError(f"{type(target).__qualname__!r} object (of main) has no attribute {name!r} "
                             "for the compartment")

    def _pin(self, request: Any) -> bool:
        """The compartment's code holds (or no longer holds) the twin of one
        of main's instances: keep that instance alive for it (or not). Only
        instances of main's subclasses of this compartment's classes, which
        main lends weakly; at most ``MAX_PINNED`` at once."""
        if type(request) is not list or len(request) != 2 or type(request[1]) is not bool:
            raise TypeError("malformed pin request")
        target, strong = request
        if not subclass.is_subclass_instance(target, self.compartment):
            raise EntrypointError("only main's instances of subclasses of the compartment's "
                                  "classes can be kept alive for it")
        # (The count lives with the exports: a pinned export released by the
        # compartment stops counting.)
        if strong and self.peer.exports.pinned >= MAX_PINNED:
            raise EntrypointError(f"more than {MAX_PINNED} of main's instances are kept "
                                  "alive for the compartment")
        if not self.peer.exports.pin(target, strong):
            raise EntrypointError("that instance was not lent to the compartment")
        return strong

    def _read_stdin(self, request: Any) -> str:
        """The compartment's ``sys.stdin`` reads main's, as it is now (a
        test's patched ``sys.stdin`` included), in bounded pieces."""
        if not self.stdin:
            raise EntrypointError(f"compartment {self.compartment!r} may not read main's stdin "
                                  "(its spec's stdin is \"null\")")
        if type(request) is not list or len(request) != 2 \
                or request[0] not in ("read", "readline", "readbytes") or type(request[1]) is not int:
            raise TypeError("malformed stdin request")
        method, size = request
        size = STDIN_CHUNK if size < 0 or size > STDIN_CHUNK else size
        stream = sys.stdin
        if method == "readbytes":
            binary = getattr(stream, "buffer", None)
            if binary is None:  # a StringIO: its text, as UTF-8
                return (stream.read(size // 4 or 1) if stream is not None else "").encode()
            data = binary.read1(size) if hasattr(binary, "read1") else binary.read(size)
            if type(data) is not bytes:
                raise TypeError(f"main's sys.stdin.buffer gave {type(data).__name__}, not bytes")
            return data
        if stream is None:
            return ""
        data = getattr(stream, method)(size)
        if type(data) is not str:
            raise TypeError(f"main's sys.stdin gave {type(data).__name__}, not str")
        return data

    def _stream(self, op: str, request: Any) -> Any:
        """I/O on a file object main passed to the compartment."""
        if type(request) is not list or len(request) not in (2, 4):
            raise TypeError("malformed request")
        target, name = request[0], request[1]
        if not isinstance(target, io.IOBase) or not self.peer.exports.contains(target):
            raise EntrypointError("a compartment can only use attributes of file objects main "
                                  "passed to it")
        if op == "@setattr":
            raise AttributeError("file objects of main take no attribute writes from compartments")
        if op == "@getattr":
            if name not in refs.STREAM_ATTRS or len(request) != 2:
                raise AttributeError(f"file objects of main do not offer {name!r} to compartments")
            return getattr(target, name)
        if name not in refs.STREAM_METHODS or len(request) != 4:
            raise AttributeError(f"file objects of main do not offer {name!r} to compartments")
        args, kwargs = request[2], request[3]
        protocols.check_arguments(args, kwargs)
        return getattr(target, name)(*args, **kwargs)

    def release(self, channel: Channel, handles: list[tuple[int, int]]) -> None:
        channel.conn.violations += self.peer.release_later(handles)

    def arrived(self, channel: Channel, key: tuple[str, int]) -> None:
        self.peer.arrived(key)

    def decoded(self, channel: Channel, key: tuple[str, int]) -> None:
        self.peer.decoded(key)

    def closed(self, channel: Channel) -> None:
        self.peer.close()

