"""Every participant call of recent transactions, as the API shows them.

The log keeps what recovery needs (failed attempts as ``Attempted`` records,
the branches' final summaries), not every call and its latency. This
observer keeps that, in memory, for the transactions seen by this process:
per transaction a bounded list of calls, and at most ``max_txns``
transactions (least recently touched forgotten first). After a restart the
API falls back to the log's view.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from accord.coordinator import Observer
from accord.core.records import TxnStatus
from accord.core.spec import TransactionSpec

DEFAULT_MAX_TXNS = 10_000
DEFAULT_MAX_CALLS = 200
IN_FLIGHT = "in_flight"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class CallRecord:
    """One participant call. ``outcome`` is ``in_flight`` until it returns."""

    branch: str
    op: str
    attempt: int
    started_at_ms: int
    outcome: str = IN_FLIGHT
    latency_ms: float | None = None
    error: str = ""


@dataclass(slots=True)
class TxnHistory:
    started_at_ms: int
    recovered: bool
    calls: deque[CallRecord]
    finished_at_ms: int | None = None
    status: TxnStatus | None = None
    # (branch, op, attempt) -> the call still waiting for its reply
    pending: dict[tuple[str, str, int], CallRecord] = field(default_factory=dict)


class HistoryObserver(Observer):
    """Keeps the recent calls of recent transactions (bounded twice)."""

    def __init__(
        self, *, max_txns: int = DEFAULT_MAX_TXNS, max_calls: int = DEFAULT_MAX_CALLS
    ) -> None:
        if max_txns < 1 or max_calls < 1:
            raise ValueError("max_txns and max_calls must be at least 1")
        self.max_txns = max_txns
        self.max_calls = max_calls
        self._txns: OrderedDict[str, TxnHistory] = OrderedDict()

    def __len__(self) -> int:
        return len(self._txns)

    def get(self, txid: str) -> TxnHistory | None:
        return self._txns.get(txid)

    def calls(self, txid: str) -> list[CallRecord]:
        h = self._txns.get(txid)
        return list(h.calls) if h is not None else []

    def _touch(self, txid: str) -> TxnHistory:
        h = self._txns.get(txid)
        if h is None:
            h = TxnHistory(_now_ms(), False, deque(maxlen=self.max_calls))
            self._txns[txid] = h
            if len(self._txns) > self.max_txns:
                self._txns.popitem(last=False)
        else:
            self._txns.move_to_end(txid)
        return h

    def txn_started(self, txid: str, spec: TransactionSpec, recovered: bool) -> None:
        h = self._touch(txid)
        h.recovered = h.recovered or recovered
        h.finished_at_ms = None
        h.status = None

    def call_started(self, txid: str, branch: str, op: str, attempt: int) -> None:
        h = self._touch(txid)
        record = CallRecord(branch, op, attempt, _now_ms())
        h.calls.append(record)
        h.pending[(branch, op, attempt)] = record
        if len(h.pending) > self.max_calls:  # replies that never came: forget the oldest
            del h.pending[next(iter(h.pending))]

    def call_finished(
        self,
        txid: str,
        branch: str,
        op: str,
        attempt: int,
        outcome: str,
        latency_s: float,
        error: str,
    ) -> None:
        h = self._touch(txid)
        record = h.pending.pop((branch, op, attempt), None)
        if record is None:  # started before this observer was installed, or forgotten
            record = CallRecord(branch, op, attempt, _now_ms() - round(latency_s * 1000))
            h.calls.append(record)
        record.outcome = outcome
        record.latency_ms = round(latency_s * 1000, 3)
        record.error = error

    def txn_finished(self, txid: str, status: TxnStatus, reason: str, latency_s: float) -> None:
        h = self._touch(txid)
        h.finished_at_ms = _now_ms()
        h.status = status
