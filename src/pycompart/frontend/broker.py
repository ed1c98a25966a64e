"""``Broker``: main, or a privileged compartment (the only one that may
bind a port or open certain files), accepts connections, or opens
resources, and hands each to a fresh, unprivileged instance of a compartment
whose spec says ``instances = "per-connection"`` and ``descriptors = true``.
In a compartment, ``Broker(None, ...)`` works over the edges its
``may_call`` declares (``pycompart.compartment.edges``).

pycompart does the spawning, the supervision and the clean-up; the broker
never runs the handler's code. Each connection gets an instance of its own,
retired when its handler returns: an instance that crashes while serving
one connection affects only that connection. At most ``max_instances``
exist at once; a connection beyond waits for one to end (up to the
compartment's ``call_timeout``, or 60 s), then is closed.

The broker talks to instances only through the monitor's leases and the
handler's name (``"module:function"``), so that it can later run on
another host than the handlers.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..compartment import edges as _edges
from .. import compartment as _instance
from ..errors import EntrypointError
from ..wire import refs
from .proxy import places

#: How long ``serve`` waits in ``poll`` before it looks at its stop flag.
_POLL_MS = 200


class Broker:
    """Hand connections (or other descriptors) to fresh instances of a
    per-connection compartment: ``Broker(app, "handler", "echo:serve")``."""

    def __init__(self, app: Any, compartment: str, handler: str,
                 on_error: Callable[[BaseException], None] | None = None):
        here = _instance.CURRENT
        if app is None and here is not None:
            spec: Any = self._over_an_edge(here, compartment)
            comp = None
        else:
            runtime = getattr(app, "_runtime", None)
            if runtime is None:
                raise EntrypointError("a Broker needs a started App (or, in a compartment, None)")
            comp = runtime.compartments.get(compartment) if runtime.compartments else None
            if comp is None:
                raise EntrypointError(f"no compartment {compartment!r} in the app")
            spec = comp.spec
        if spec.on_demand != "per-connection":
            raise EntrypointError(f"compartment {compartment!r} needs instances = \"per-connection\" "
                                  "for a Broker")
        if not spec.descriptors:
            raise EntrypointError(f"compartment {compartment!r} needs descriptors = true: a Broker "
                                  "hands it connections as descriptors")
        module, _, qualname = handler.partition(":")
        if not qualname or not places(spec, module, qualname):
            raise EntrypointError(f"{handler!r} is not placed in compartment {compartment!r} "
                                  "(its modules or functions)")
        self.compartment = compartment
        self._comp = comp
        self._handler_key = handler
        self._handler = comp.path_object(module, qualname, "function") if comp is not None else None
        self._on_error = on_error
        self._spec = spec
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: One per instance there may be: a connection waits for a slot
        #: before it is accepted, so a flood of clients makes no threads.
        self._slots = threading.BoundedSemaphore(spec.max_instances)
        self.served = 0
        self.failed = 0

    @staticmethod
    def _over_an_edge(here: Any, compartment: str) -> Any:
        """The callee's settings a Broker checks, as this instance knows them."""
        plan = here.edges.get(compartment)
        if plan is None or _edges.CLIENT is None:
            raise _edges.refuse(here.compartment, compartment)
        from .edgeproxy import CalleeSpec

        return CalleeSpec(compartment, plan)

    def handle(self, resource: Any, *args: Any, _slot: bool = False) -> threading.Thread:
        """Serve one connection (a socket, or a ``pycompart.Fd``) in a fresh
        instance, on a thread of its own; the broker's copy is given away.
        Waits for a free slot (``max_instances``) first."""
        if not _slot:
            self._slots.acquire()
        thread = threading.Thread(target=self._serve, args=(resource, args), daemon=True,
                                  name=f"pycompart-broker-{self.compartment}")
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return thread

    def _serve(self, resource: Any, args: tuple[Any, ...]) -> None:
        comp = self._comp
        timeout = self._spec.call_timeout
        wait = 60.0 if timeout is None else timeout
        try:
            if comp is None:
                from . import edgeproxy

                edgeproxy.serve_connection(_edges.CLIENT, self.compartment, self._handler_key,  # type: ignore[arg-type]
                                           resource, args, wait)
            else:
                with comp.monitor.lease(self.compartment, time.monotonic() + wait) as inst:
                    comp.call(inst, "@call", [self._handler, [refs.handover(resource), *args], {}])
            self.served += 1
        except Exception as exc:  # the handler's own exception, a crash, a timeout, the cap
            self.failed += 1
            if self._on_error is not None:
                self._on_error(exc)
        finally:
            close = getattr(resource, "close", None)
            if close is not None:
                try:
                    close()  # (already given away, unless the call never went out)
                except OSError:
                    pass
            with self._lock:
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def serve(self, listener: socket.socket) -> None:
        """Accept connections on ``listener`` and hand each over, until
        ``stop()``; then wait for the connections in flight."""
        poller = select.poll()
        poller.register(listener.fileno(), select.POLLIN)
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=_POLL_MS / 1000):
                continue  # every instance busy: clients wait in the listen backlog
            conn = None
            try:
                if poller.poll(_POLL_MS):
                    conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                if not self._stop.is_set():
                    self._slots.release()
                    raise
            if conn is None:
                self._slots.release()
                continue
            self.handle(conn, _slot=True)

    def stop(self, wait: float = 5.0) -> None:
        """Stop accepting; wait up to ``wait`` seconds for connections in
        flight (the app's stop ends whatever is left)."""
        self._stop.set()
        deadline = time.monotonic() + wait
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
