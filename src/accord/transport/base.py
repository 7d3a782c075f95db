"""The one seam to participants: ``call(Call) -> Reply``.

A transport never raises for what a participant or the network did: every
outcome (success, refusal, timeout, refused connection, garbage) becomes a
:class:`Reply`. That keeps third-party exceptions inside the transport that
owns them and lets the coordinator treat every call alike.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable
from typing import Any, NamedTuple

from accord.core.machine import Outcome
from accord.core.spec import Op


class Call(NamedTuple):
    """One operation on one branch, as sent to its participant."""

    txid: str
    branch: str
    op: Op
    participant: str
    payload: Any
    attempt: int
    timeout_s: float


class Reply(NamedTuple):
    outcome: Outcome
    result: Any = None
    error: str = ""
    retry_after_s: float | None = None


OK_REPLY = Reply(Outcome.OK)


Started = Reply | Awaitable[Reply]


class Transport(abc.ABC):
    """Implement :meth:`call`; override :meth:`start` for a faster path."""

    @abc.abstractmethod
    async def call(self, call: Call) -> Reply:
        """Perform ``call`` within ``call.timeout_s``; never raise for its outcome."""

    def start(self, call: Call) -> Started:
        """Begin ``call``: the reply itself if it is known at once, else an
        awaitable of it (an ``asyncio.Future`` is cheapest: no task needed).
        The coordinator uses this; the default defers to :meth:`call`."""
        return self.call(call)

    async def close(self) -> None:
        return None
