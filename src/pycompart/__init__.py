"""pycompart: split a Python program into least-privilege compartments.

The public API is small: ``App`` (with ``@app.entrypoint``), the errors, and
the events passed to life-cycle hooks. See the README for a tour.

Names are imported on first use, so the zygote, which imports
``pycompart.supervisor.zygote``, carries only the runtime it needs into every fork.
"""

from __future__ import annotations

import importlib

from ._version import __version__

# Not ``typing.TYPE_CHECKING``: ``pycompart run`` starts its zygote as soon
# as it can, and importing typing first would cost that some 8 ms.
TYPE_CHECKING = False

_EXPORTS = {
    "App": "frontend.app", "Entrypoint": "frontend.app",
    "CallTimeout": "errors", "CompartmentCrashed": "errors", "CompartmentError": "errors",
    "CompartmentStartError": "errors", "CompartmentUnavailable": "errors",
    "EntrypointError": "errors", "ProtocolError": "errors", "PycompartError": "errors",
    "RemoteError": "errors", "RemoteTraceback": "errors", "SpecError": "errors", "StaleReference": "errors",
    "PrivilegeError": "errors", "open_untrusted": "kernel.files",
    "CommBreakEvent": "supervisor.monitor", "InstanceEvent": "supervisor.monitor",
    "TimeoutEvent": "supervisor.monitor", "Fd": "wire.refs", "handover": "wire.refs",
    "Broker": "frontend.broker", "segment": "frontend.segments", "entrypoint": "frontend.segments",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pycompart' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from .frontend.app import App, Entrypoint
    from .errors import (
        CallTimeout, CompartmentCrashed, CompartmentError, CompartmentStartError,
        CompartmentUnavailable, EntrypointError, ProtocolError, PycompartError, RemoteError,
        RemoteTraceback, SpecError, StaleReference, PrivilegeError,
    )
    from .kernel.files import open_untrusted
    from .frontend.broker import Broker
    from .frontend.segments import entrypoint, segment
    from .wire.refs import Fd, handover
    from .supervisor.monitor import CommBreakEvent, InstanceEvent, TimeoutEvent
