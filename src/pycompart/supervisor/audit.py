"""The audit log: one JSON object per line, appended, flushed per record.

Records are written by whichever thread saw the event (a caller for calls,
the monitor for instance life-cycle), under one lock, so lines never
interleave. Writing happens after the call completed; a failing audit write
is reported on stderr once and does not fail the call.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import msgspec

_encode = msgspec.json.Encoder().encode


class AuditLog:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._warned = False

    def record(self, event: str, **fields: Any) -> None:
        fields = {"time": round(time.time(), 6), "event": event, **fields}
        line = _encode(fields) + b"\n"
        with self._lock:
            try:
                os.write(self._fd, line)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    print(f"pycompart: cannot write audit log {self.path}: {exc}", file=sys.stderr)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
