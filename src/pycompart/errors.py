"""Every exception pycompart raises, in one place.

The hierarchy is shallow on purpose: callers catch ``CompartmentError`` for
"the compartment failed me" and ``SpecError`` for "my configuration is wrong".
"""

from __future__ import annotations


class PycompartError(Exception):
    """Base class of everything pycompart raises itself."""


class SpecError(PycompartError):
    """The spec (TOML file or dict) is invalid.

    ``source`` is the file (or ``"<dict>"``), ``key`` the dotted key path,
    ``expected``/``found`` say what was wanted and what was there. A spec
    with several mistakes raises one ``SpecError`` for the first, whose
    ``errors`` lists every one found (its message shows them all, one per
    line), so a single run of ``pycompart check`` reports them all.
    """

    def __init__(self, source: str, key: str, expected: str, found: str | None = None):
        self.source = source
        self.key = key
        self.expected = expected
        self.found = found
        msg = f"{source}: {key}: expected {expected}"
        if found is not None:
            msg += f", found {found}"
        self.message = msg
        self.errors: list[SpecError] = [self]
        super().__init__(msg)

    @classmethod
    def collect(cls, errors: list[SpecError]) -> SpecError:
        """The first of ``errors``, carrying them all."""
        first = errors[0]
        first.errors = list(errors)
        if len(errors) > 1:
            first.args = ("\n".join(e.message for e in errors),)
        return first


class PrivilegeError(PycompartError):
    """A privilege in the spec cannot be enforced on this host (strict
    enforcement), or enforcing it failed inside an instance. The message
    names the compartment and the mechanism."""


class EntrypointError(PycompartError):
    """An entrypoint cannot be declared or called as written (bad annotation,
    unknown compartment, registration after start, ...)."""


class CompartmentError(PycompartError):
    """A cross-compartment call did not complete normally.

    ``reported_by``: None when this process saw it happen; otherwise the
    compartment that raised it on (a crash of a compartment *it* called
    over an edge), whose word it is: a compartment can claim anything
    about another (``compartment``, ``pid``), so act on such a claim only
    as that compartment's."""

    reported_by: str | None = None


class ProtocolError(CompartmentError):
    """The other side broke the wire protocol or the entrypoint's contract
    (malformed frame, oversized frame, reply of the wrong type)."""


class CompartmentCrashed(CompartmentError):
    """The instance serving the call died before replying.

    ``compartment``, ``pid`` and ``status`` (a human-readable exit status such
    as ``"killed by signal 11 (SIGSEGV)"``) say which and how.
    """

    def __init__(self, compartment: str, pid: int | None, status: str):
        self.compartment = compartment
        self.pid = pid
        self.status = status
        who = f"compartment {compartment!r}" + (f" (pid {pid})" if pid else "")
        super().__init__(f"{who} {status}")


class CompartmentUnavailable(CompartmentError):
    """No instance of the compartment can serve calls (never started, stopped,
    or gave up restarting)."""


class CompartmentStartError(CompartmentError):
    """An instance failed while starting (its module raised on import, it
    exited early, or it did not become ready in time)."""


class CallTimeout(CompartmentError, TimeoutError):
    """The call did not finish within its timeout. The call was cancelled; an
    instance that does not yield within the grace period is killed and
    replaced."""


class RemoteError(CompartmentError):
    """An exception of a type not on the builtin allowlist was raised inside a
    compartment. pycompart never imports classes a compartment names, so the
    original type is only reported: ``type_name``, ``message``,
    ``remote_traceback``."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = ""):
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}" if message else type_name)


class RemoteTraceback(Exception):
    """Carries the remote traceback text; set as ``__cause__`` of exceptions
    re-raised from a compartment, so tracebacks show both sides."""

    def __init__(self, text: str):
        self.text = text
        super().__init__(text)

    def __str__(self) -> str:
        return "\n" + self.text


class CallCancelled(BaseException):
    """Raised *inside* an instance to interrupt an entrypoint whose caller
    gave up. A BaseException so that ``except Exception`` in user code does not
    swallow it."""


class StaleReference(CompartmentError):
    """A remote reference points into an instance that no longer exists (it
    died and was replaced), or to an object its owner has already released.
    The object is gone with its process; get a new one from the new
    instance."""
