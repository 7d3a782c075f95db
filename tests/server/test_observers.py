"""HistoryObserver (bounded call history) and FanOut (several observers, isolated)."""

from __future__ import annotations

import logging

import pytest

from accord import Observer, TxnStatus
from accord.server import FanOut, HistoryObserver


def test_history_records_each_call_with_outcome_and_latency() -> None:
    h = HistoryObserver()
    h.call_started("t", "pay", "try", 1)
    (call,) = h.calls("t")
    assert (call.branch, call.op, call.attempt, call.outcome) == ("pay", "try", 1, "in_flight")
    h.call_finished("t", "pay", "try", 1, "transient", 0.0125, "down")
    h.call_started("t", "pay", "try", 2)
    h.call_finished("t", "pay", "try", 2, "ok", 0.002, "")
    first, second = h.calls("t")
    assert (first.outcome, first.latency_ms, first.error) == ("transient", 12.5, "down")
    assert (second.attempt, second.outcome) == (2, "ok")


def test_history_is_bounded_per_transaction_and_overall() -> None:
    """At most max_calls per transaction (the latest) and max_txns transactions (LRU)."""
    h = HistoryObserver(max_txns=3, max_calls=4)
    for attempt in range(1, 11):
        h.call_started("a", "b", "try", attempt)
        h.call_finished("a", "b", "try", attempt, "transient", 0.001, "x")
    assert [c.attempt for c in h.calls("a")] == [7, 8, 9, 10]
    for txid in ("b", "c"):
        h.call_started(txid, "b", "try", 1)
    h.call_started("a", "b", "try", 11)  # a is now the most recently used
    h.call_started("d", "b", "try", 1)  # evicts b, the least recently used
    assert len(h) == 3
    assert h.get("b") is None and h.get("a") is not None
    assert h.calls("b") == []


def test_a_reply_after_eviction_is_still_recorded() -> None:
    h = HistoryObserver(max_txns=1)
    h.call_started("a", "b", "try", 1)
    h.call_started("z", "b", "try", 1)
    h.call_finished("a", "b", "try", 1, "ok", 0.01, "")
    assert [c.outcome for c in h.calls("a")] == ["ok"]


class _Broken(Observer):
    def call_started(self, txid: str, branch: str, op: str, attempt: int) -> None:
        raise RuntimeError("broken observer")


def test_fan_out_calls_every_observer_even_after_one_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    history = HistoryObserver()
    fan = FanOut([_Broken(), history])
    with caplog.at_level(logging.ERROR):
        fan.call_started("t", "b", "try", 1)
        fan.call_finished("t", "b", "try", 1, "ok", 0.001, "")
        fan.txn_finished("t", TxnStatus.COMMITTED, "done", 0.01)
    assert [c.outcome for c in history.calls("t")] == ["ok"]
    assert history.get("t").status is TxnStatus.COMMITTED  # type: ignore[union-attr]
    assert "broken observer" in caplog.text
