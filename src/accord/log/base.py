"""The durable log's one seam: every store (memory, SQLite, PostgreSQL) does this."""

from __future__ import annotations

import abc
import builtins
from dataclasses import dataclass

from accord._completion import Completion
from accord.core.records import LogRecord, TxnSnapshot, TxnStatus
from accord.errors import StoreError

SCHEMA_VERSION = 1


class Fenced(StoreError):
    """A record was refused because its writer does not hold the lease of the
    transaction's shard (any more): another coordinator may be driving it.
    Nothing of it was written; retrying through the cluster reaches the owner."""


@dataclass(frozen=True, slots=True)
class TxnRow:
    """One line of a listing."""

    id: str
    protocol: str
    status: TxnStatus
    decision: str | None
    reason: str
    branches: int
    created_at_ms: int
    updated_at_ms: int

    @classmethod
    def of(cls, s: TxnSnapshot) -> TxnRow:
        return cls(
            id=s.txid,
            protocol=s.spec.protocol.value,
            status=s.status,
            decision=s.decision.value if s.decision else None,
            reason=s.reason,
            branches=len(s.spec.branches),
            created_at_ms=s.created_at_ms,
            updated_at_ms=s.updated_at_ms,
        )


@dataclass(frozen=True, slots=True)
class StoreStats:
    records: int
    batches: int
    commit_seconds: float

    @property
    def records_per_batch(self) -> float:
        return self.records / self.batches if self.batches else 0.0


PURGEABLE = frozenset({TxnStatus.COMMITTED, TxnStatus.ABORTED})
"""The statuses :meth:`Store.purge` deletes (final: nothing changes them)."""


def check_purge(before_ms: int) -> int:
    if isinstance(before_ms, bool) or not isinstance(before_ms, int) or before_ms <= 0:
        raise ValueError(f"before_ms must be a positive Unix time in ms, got {before_ms!r}")
    return before_ms


class Store(abc.ABC):
    """Intent log of global transactions.

    ``append`` queues a record (ordered, never blocks); ``sync`` returns an
    awaitable that resolves once everything appended before it is durable,
    with the set of transaction ids whose ``Begin`` was refused because the id
    already existed (or ``None`` when nothing is pending). A store checks every
    transition before writing (a decision never flips, nothing leaves a
    terminal status) and again when it reads a transaction back; records that
    fail the check are not written and are listed in ``violations``.
    """

    violations: list[str]

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Make everything appended durable, then release resources."""

    @abc.abstractmethod
    def append(self, record: LogRecord) -> None: ...

    @abc.abstractmethod
    def sync(self) -> Completion[frozenset[str]] | None:
        """Resolved once everything appended so far is durable (callbacks run
        synchronously, in the same loop turn), or ``None`` if it already is."""

    @abc.abstractmethod
    async def load_active(self) -> list[TxnSnapshot]:
        """Every transaction not yet in a terminal status."""

    @abc.abstractmethod
    async def get(self, txid: str) -> TxnSnapshot | None: ...

    @abc.abstractmethod
    async def list(
        self,
        status: TxnStatus | None = None,
        limit: int = 100,
        after_id: str | None = None,
        *,
        since_ms: int | None = None,
    ) -> list[TxnRow]:
        """Transactions in id order, after ``after_id``, of ``status``, created at
        or after ``since_ms``; at most ``limit``."""

    @abc.abstractmethod
    async def count_by_status(self) -> dict[TxnStatus, int]: ...

    @abc.abstractmethod
    async def snapshots(self) -> builtins.list[TxnSnapshot]:
        """Every transaction in the log (for checkers and exports)."""

    @abc.abstractmethod
    async def purge(self, before_ms: int) -> int:
        """Delete every record of the transactions that ended committed or
        aborted with their last record before ``before_ms`` (Unix ms); returns
        how many transactions. Open and needs_attention ones are kept. A
        purged id is unknown afterwards: submitted again, it is a new
        transaction, so purge only past the window in which clients may
        resubmit (see docs/operations.md)."""

    @abc.abstractmethod
    def stats(self) -> StoreStats: ...

    async def flush(self) -> frozenset[str]:
        """Wait until everything appended so far is durable."""
        pending = self.sync()
        if pending is None:
            return frozenset()
        return await pending
