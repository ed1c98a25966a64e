"""pycompart: split a Python program into least-privilege compartments.

The public API is small: ``App`` (with ``@app.entrypoint``), the errors, and
the events passed to life-cycle hooks. See the README for a tour.
"""

from ._version import __version__
from .app import App, Entrypoint
from .errors import (
    CallTimeout,
    CompartmentCrashed,
    CompartmentError,
    CompartmentStartError,
    CompartmentUnavailable,
    EntrypointError,
    ProtocolError,
    PycompartError,
    RemoteError,
    SpecError,
)
from .monitor import CommBreakEvent, InstanceEvent, TimeoutEvent

__all__ = [
    "App", "Entrypoint", "__version__",
    "CallTimeout", "CompartmentCrashed", "CompartmentError", "CompartmentStartError",
    "CompartmentUnavailable", "EntrypointError", "ProtocolError", "PycompartError",
    "RemoteError", "SpecError",
    "CommBreakEvent", "InstanceEvent", "TimeoutEvent",
]
