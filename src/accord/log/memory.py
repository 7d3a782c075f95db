"""An in-memory store: the log for tests, simulations and throwaway runs.

With ``lose_unsynced=True`` records stay pending until someone syncs, and
:meth:`MemoryStore.crash` throws the pending ones away, which lets the
simulation test what a real crash loses.
"""

from __future__ import annotations

import builtins
import copy

from accord._completion import Completion
from accord.core.records import (
    Begin,
    LogRecord,
    TxnSnapshot,
    TxnStatus,
    apply,
    check_transition,
)
from accord.errors import StoreError
from accord.log.base import PURGEABLE, Store, StoreStats, TxnRow, check_purge


class MemoryStore(Store):
    def __init__(self, *, lose_unsynced: bool = False) -> None:
        self._txns: dict[str, TxnSnapshot] = {}
        self._pending: list[LogRecord] = []
        self._lose_unsynced = lose_unsynced
        self._rejected: set[str] = set()
        self.violations = []
        self._records = 0
        self._batches = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._flush_now()

    def append(self, record: LogRecord) -> None:
        if self._lose_unsynced:
            self._pending.append(record)
        else:
            self._write(record)
            self._records += 1

    def sync(self) -> Completion[frozenset[str]] | None:
        self._flush_now()
        if not self._rejected:
            return None
        rejected = frozenset(self._rejected)
        self._rejected.clear()
        return Completion.resolved(rejected)

    def sync_now(self) -> frozenset[str]:
        """Synchronous flush for code that runs outside an event loop."""
        self._flush_now()
        rejected = frozenset(self._rejected)
        self._rejected.clear()
        return rejected

    def crash(self) -> None:
        """Forget every record not yet synced, as a process crash would."""
        self._pending.clear()
        self._rejected.clear()

    def _flush_now(self) -> None:
        if self._pending:
            self._batches += 1
            self._records += len(self._pending)
            for record in self._pending:
                self._write(record)
            self._pending.clear()

    def _write(self, record: LogRecord) -> None:
        if isinstance(record, Begin):
            if record.txid in self._txns:
                self._rejected.add(record.txid)
                return
            self._txns[record.txid] = TxnSnapshot(
                spec=record.spec,
                created_at_ms=record.created_at_ms,
                deadline_at_ms=record.deadline_at_ms,
                updated_at_ms=record.created_at_ms,
                history=[record],
            )
            return
        snap = self._txns.get(record.txid)
        if snap is None:
            self.violations.append(f"{record.txid}: {type(record).__name__} before Begin")
            return
        try:
            check_transition(snap, record)
        except StoreError as exc:
            self.violations.append(f"{record.txid}: {exc}")
            return
        apply(snap, record)
        snap.history.append(record)

    async def load_active(self) -> list[TxnSnapshot]:
        return [copy.deepcopy(s) for s in self._txns.values() if not s.status.terminal]

    async def get(self, txid: str) -> TxnSnapshot | None:
        snap = self._txns.get(txid)
        return copy.deepcopy(snap) if snap is not None else None

    async def list(
        self,
        status: TxnStatus | None = None,
        limit: int = 100,
        after_id: str | None = None,
        *,
        since_ms: int | None = None,
    ) -> list[TxnRow]:
        rows = sorted(
            (
                s
                for s in self._txns.values()
                if (status is None or s.status is status)
                and (since_ms is None or s.created_at_ms >= since_ms)
            ),
            key=lambda s: s.txid,
        )
        if after_id is not None:
            rows = [s for s in rows if s.txid > after_id]
        return [TxnRow.of(s) for s in rows[:limit]]

    async def count_by_status(self) -> dict[TxnStatus, int]:
        counts: dict[TxnStatus, int] = {}
        for s in self._txns.values():
            counts[s.status] = counts.get(s.status, 0) + 1
        return counts

    async def purge(self, before_ms: int) -> int:
        check_purge(before_ms)
        gone = [
            txid
            for txid, s in self._txns.items()
            if s.status in PURGEABLE and s.updated_at_ms < before_ms
        ]
        for txid in gone:
            del self._txns[txid]
        return len(gone)

    async def snapshots(self) -> builtins.list[TxnSnapshot]:
        return [copy.deepcopy(s) for s in self._txns.values()]

    def stats(self) -> StoreStats:
        return StoreStats(records=self._records, batches=self._batches, commit_seconds=0.0)
