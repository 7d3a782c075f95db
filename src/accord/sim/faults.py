"""Seeded fault injection in front of a simulated service (SCENARIO.md).

Per call, with probability ``fault_rate``, one fault is drawn from the mix:

=================  ===========================================================
transient          answered with a transient error (as an HTTP 503 would be)
timeout_before     no answer within the call timeout; the service never saw it
timeout_after      applied, but the reply is lost: the caller sees a timeout
duplicate          the request is delivered twice (the second one later)
down               the service goes down for a window: calls are refused
=================  ===========================================================

Latency is log-normal with the given median and a p99 of five times the
median. A call whose latency exceeds its timeout becomes ``timeout_after``.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from dataclasses import dataclass

from accord._completion import Completion
from accord.core.machine import Outcome
from accord.sim.services import Service
from accord.transport.base import Call, Reply

FAULT_KINDS = ("transient", "timeout_before", "timeout_after", "duplicate", "down")
FAULT_MIX = (0.32, 0.17, 0.22, 0.25, 0.04)
LATENCY_SIGMA = math.log(5) / 2.326  # log-normal with p99 = 5 x median


@dataclass(frozen=True, slots=True)
class FaultConfig:
    fault_rate: float = 0.05
    latency_ms: float = 0.0
    down_window_s: tuple[float, float] = (0.02, 0.2)

    def __post_init__(self) -> None:
        if not 0 <= self.fault_rate <= 1 or math.isnan(self.fault_rate):
            raise ValueError(f"fault_rate must be between 0 and 1, got {self.fault_rate}")
        if not 0 <= self.latency_ms <= 60_000 or math.isnan(self.latency_ms):
            raise ValueError(f"latency_ms must be between 0 and 60000, got {self.latency_ms}")


class FaultyService:
    """A service behind a misbehaving network, as an in-process handler."""

    def __init__(
        self, service: Service, config: FaultConfig, rng: random.Random, counts: Counter[str]
    ) -> None:
        self.service = service
        self.config = config
        self._random = rng.random
        self._rng = rng
        self.counts = counts
        self._down_until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self, call: Call) -> Reply | Completion[Reply]:
        cfg = self.config
        if cfg.fault_rate == 0 and cfg.latency_ms == 0:
            return self.service.handle(call)
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        now = loop.time()
        if now < self._down_until:
            self.counts["refused_while_down"] += 1
            return Reply(Outcome.TRANSIENT, error=f"{self.service.name}: connection refused")
        fault = None
        if self._random() < cfg.fault_rate:
            fault = self._rng.choices(FAULT_KINDS, FAULT_MIX)[0]
            self.counts[fault] += 1
        latency_s = self._latency_s()
        if fault is None and latency_s > call.timeout_s:
            fault = "timeout_after"
            self.counts["slow_timeout"] += 1
        if fault == "down":
            lo, hi = cfg.down_window_s
            self._down_until = now + lo + (hi - lo) * self._random()
            return Reply(Outcome.TRANSIENT, error=f"{self.service.name}: connection refused")
        if fault == "transient":
            return self._later(latency_s, Reply(Outcome.TRANSIENT, error="503 service unavailable"))
        if fault == "timeout_before":
            return self._later(call.timeout_s, _timeout(call))
        if fault == "timeout_after":
            loop.call_later(min(latency_s, call.timeout_s / 2), self._deliver, call)
            return self._later(call.timeout_s, _timeout(call))
        if fault == "duplicate":
            loop.call_later(latency_s + 0.05 * self._random(), self._deliver, call)
        if latency_s <= 0:
            return self.service.handle(call)
        out: Completion[Reply] = Completion()
        loop.call_later(latency_s, self._answer, call, out)
        return out

    def _latency_s(self) -> float:
        median = self.config.latency_ms
        if median <= 0:
            return 0.0
        return median * math.exp(LATENCY_SIGMA * self._rng.gauss(0.0, 1.0)) / 1000

    def _later(self, delay_s: float, reply: Reply) -> Completion[Reply]:
        assert self._loop is not None
        fut: Completion[Reply] = Completion()
        self._loop.call_later(delay_s, fut.set_result, reply)
        return fut

    def _deliver(self, call: Call) -> None:
        """Deliver a request whose reply nobody waits for."""
        self.service.handle(call)

    def _answer(self, call: Call, out: Completion[Reply]) -> None:
        started = self.service.handle(call)
        if isinstance(started, Reply):
            out.set_result(started)
        else:
            started.add_done_callback(lambda f: out.set_result(f.result()))


def _timeout(call: Call) -> Reply:
    return Reply(Outcome.TRANSIENT, error=f"timed out after {call.timeout_s:g}s")
