"""Participants that live in this process: handlers called directly."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from accord.core.machine import Outcome
from accord.transport.base import Call, Reply, Started, Transport

Handler = Callable[[Call], Started]


class InProcessTransport(Transport):
    """Routes a call to ``participants[call.participant]``.

    A handler returns its reply, or a future / awaitable of it. Handlers own
    their timeouts (a simulated participant that stalls answers with a
    transient timeout itself), so no timer is armed per call here.
    """

    def __init__(self, participants: Mapping[str, Handler]) -> None:
        self._participants = dict(participants)

    def start(self, call: Call) -> Started:
        handler = self._participants.get(call.participant)
        if handler is None:
            return Reply(Outcome.REJECTED, error=f"unknown participant {call.participant!r}")
        return handler(call)

    async def call(self, call: Call) -> Reply:
        started = self.start(call)
        if isinstance(started, Reply):
            return started
        return await started
