"""Named crash points for the crash-matrix tests.

Set ``ACCORD_CRASH_AT=<point>`` (and optionally ``ACCORD_CRASH_AFTER=<n>``,
default 1) and the process SIGKILLs itself the n-th time it passes that point.
Points (see docs/design.md): ``log.<kind>.appended`` right after a record is
queued, ``log.<kind>.durable`` right after it is on disk and before the next
action, with kind one of begin, commit, abort, attempt, end, operator; and
``recovery.loaded`` / ``recovery.resumed`` during recovery.
"""

from __future__ import annotations

import os
import signal

_point = os.environ.get("ACCORD_CRASH_AT") or None
_after = int(os.environ.get("ACCORD_CRASH_AFTER", "1"))
_hits = 0

ENABLED = _point is not None


def hit(name: str) -> None:
    """Die here if this is the configured point (a no-op otherwise)."""
    global _hits
    if name != _point:
        return
    _hits += 1
    if _hits >= _after:
        os.kill(os.getpid(), signal.SIGKILL)
