"""A signal handler's exception (Ctrl-C) at each moment of a call in turn.

CPython raises a signal handler's exception where it next checks for one:
as a function is entered and after a C function returns, wherever that is,
even right after a lock was taken or in a finally clause. A profile function
sees exactly those moments (its 'call' and 'c_return' events), so one that
raises KeyboardInterrupt at the n-th of them in pycompart's own code plays a
Ctrl-C at moment n; CPython drops a profile function that raises, so it is
one Ctrl-C. ``at_every_moment`` tries n = 1, 2, ... until a call completes."""

import os
import sys
from collections.abc import Callable
from typing import Any

import pycompart
from pycompart.transport.channel import serving_any
from pycompart.wire import refs

_SRC = os.path.dirname(pycompart.__file__)
#: Where the last interrupt was raised (for messages).
where: list[str] = []


def _interrupt_at(n: int) -> Callable[..., None]:
    seen = [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event in ("call", "c_return") and frame.f_code.co_filename.startswith(_SRC):
            seen[0] += 1
            if seen[0] == n:
                where[:] = [f"{event} {frame.f_code.co_name}:{frame.f_lineno}"]
                raise KeyboardInterrupt

    return profile


def channel_holds_nothing(app: pycompart.App, box: str = "box") -> None:
    """No lock, send lock, reading, user or waiter left taken on a live
    channel to ``box`` (a broken one is replaced), and no call left open on
    this thread's stacks (a stale one makes later calls nested in a call
    that is over, or main's own callables come back as themselves)."""
    assert not serving_any(), serving_any()
    assert not getattr(refs._nesting, "sent", None), refs._nesting.sent
    for inst in app._runtime.monitor.pools[box].ready:
        ch = inst.channel
        if ch is None or ch.failure is not None:
            continue
        state = (ch._mu.locked(), ch._send_owner, ch._leader, ch._users, dict(ch._waiters),
                 ch._send_queue)
        assert state == (False, None, False, 0, {}, []), state


def at_every_moment(app: pycompart.App, call: Callable[[], Any], expected: Any,
                    after: Callable[[Any], Any], box: str = "box", limit: int = 20000) -> int:
    """Interrupt ``call`` at each of its moments in turn; after each, the
    channel holds nothing and ``after(expected)`` returns ``expected`` (or
    fails once because the interrupt cut a frame short and broke the
    channel: then the next instance answers). Returns how many moments."""
    assert call() == expected
    for n in range(1, limit):
        sys.setprofile(_interrupt_at(n))
        try:
            try:
                result = call()
            finally:
                sys.setprofile(None)
        except KeyboardInterrupt:
            pass
        else:
            assert result == expected
            assert n > 20, n  # (it went through the call's moments)
            return n
        try:
            channel_holds_nothing(app, box)
            try:
                assert after(expected) == expected
            except (pycompart.CompartmentCrashed, pycompart.ProtocolError) as exc:
                assert "interrupted" in str(exc) or "closed its channel" in str(exc), exc
                assert after(expected) == expected
        except BaseException as exc:
            raise AssertionError(f"after an interrupt at moment {n} ({where[0]}): {exc!r}") from exc
    raise AssertionError("the call never completed")
