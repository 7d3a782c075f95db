"""Several observers behind the coordinator's one ``observer`` slot."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from accord.coordinator import Observer
from accord.core.records import TxnStatus
from accord.core.spec import TransactionSpec

log = logging.getLogger("accord.server")


class FanOut(Observer):
    """Calls every observer in turn; one that raises is logged and the
    others still run (an observer never breaks a transaction, nor another
    observer)."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers: tuple[Observer, ...] = tuple(observers)

    def txn_started(self, txid: str, spec: TransactionSpec, recovered: bool) -> None:
        for o in self.observers:
            try:
                o.txn_started(txid, spec, recovered)
            except Exception:
                log.exception("observer %r failed in txn_started", o)

    def call_started(self, txid: str, branch: str, op: str, attempt: int) -> None:
        for o in self.observers:
            try:
                o.call_started(txid, branch, op, attempt)
            except Exception:
                log.exception("observer %r failed in call_started", o)

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
        for o in self.observers:
            try:
                o.call_finished(txid, branch, op, attempt, outcome, latency_s, error)
            except Exception:
                log.exception("observer %r failed in call_finished", o)

    def txn_finished(self, txid: str, status: TxnStatus, reason: str, latency_s: float) -> None:
        for o in self.observers:
            try:
                o.txn_finished(txid, status, reason, latency_s)
            except Exception:
                log.exception("observer %r failed in txn_finished", o)
