"""Records of the durable log, and how they fold back into a snapshot.

Records, like the machine's events and actions, are ``NamedTuple``s: immutable
values that cost a quarter of a frozen dataclass to build, which matters at
tens of thousands of records a second.

The log is append-only in meaning: a transaction's history is its ``Begin``
record followed by any number of the others. Stores may keep a folded row per
transaction (SQLite, PostgreSQL) rather than every record, but what they hand
back on recovery is the same :class:`TxnSnapshot` that :func:`fold` builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from accord.core.spec import Op, TransactionSpec
from accord.errors import StoreError


class TxnStatus(StrEnum):
    """Where a transaction is in its lifecycle. See docs/protocol.md."""

    PREPARING = "preparing"
    COMMITTING = "committing"
    ABORTING = "aborting"
    COMMITTED = "committed"
    ABORTED = "aborted"
    NEEDS_ATTENTION = "needs_attention"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TxnStatus.COMMITTED, TxnStatus.ABORTED, TxnStatus.NEEDS_ATTENTION})


class Decision(StrEnum):
    COMMIT = "commit"
    ABORT = "abort"


class Begin(NamedTuple):
    """The transaction exists. Durable before any participant is called."""

    spec: TransactionSpec
    created_at_ms: int
    deadline_at_ms: int

    @property
    def txid(self) -> str:
        return self.spec.id


class Decided(NamedTuple):
    """The commit point (commit), or an abort that presumed abort makes optional."""

    txid: str
    decision: Decision
    reason: str
    at_ms: int


class Attempted(NamedTuple):
    """A call failed transiently; the next attempt is due at ``next_at_ms``."""

    txid: str
    branch: int
    op: Op
    attempt: int
    error: str
    at_ms: int
    next_at_ms: int


class BranchSummary(NamedTuple):
    name: str
    status: str
    op: str | None
    attempts: int
    error: str = ""
    result: Any = None


class Ended(NamedTuple):
    """The transaction reached a terminal status."""

    txid: str
    status: TxnStatus
    reason: str
    at_ms: int
    branches: tuple[BranchSummary, ...] = ()


class OperatorAction(NamedTuple):
    """An operator acted on the transaction (retry, abort, resolve)."""

    txid: str
    action: str
    reason: str
    at_ms: int


LogRecord = Begin | Decided | Attempted | Ended | OperatorAction


@dataclass(slots=True)
class TxnSnapshot:
    """What the log knows about one transaction: the input of recovery."""

    spec: TransactionSpec
    created_at_ms: int
    deadline_at_ms: int
    status: TxnStatus = TxnStatus.PREPARING
    decision: Decision | None = None
    reason: str = ""
    updated_at_ms: int = 0
    # (branch index, op) -> (attempts made, next attempt due at ms)
    attempts: dict[tuple[int, Op], tuple[int, int]] = field(default_factory=dict)
    branches: tuple[BranchSummary, ...] = ()
    history: list[LogRecord] = field(default_factory=list)

    @property
    def txid(self) -> str:
        return self.spec.id


def check_transition(snapshot: TxnSnapshot, record: LogRecord) -> None:
    """Raise if ``record`` may not follow ``snapshot``: a decision never flips and
    no record leaves a terminal status (except an operator's note on it)."""
    if isinstance(record, Decided):
        if snapshot.decision is not None and snapshot.decision is not record.decision:
            raise StoreError(
                f"decision would flip from {snapshot.decision} to {record.decision}",
                txid=snapshot.txid,
            )
        if snapshot.status.terminal:
            raise StoreError(
                f"decision after terminal status {snapshot.status}", txid=snapshot.txid
            )
    elif isinstance(record, Attempted):
        # A retry schedule for a finished transaction is not an operator's note:
        # the SQLite store refuses it (the transaction is no longer open), so
        # the fold must too, or the stores would disagree about the same log.
        if snapshot.status.terminal:
            raise StoreError(
                f"attempt record after terminal status {snapshot.status}", txid=snapshot.txid
            )
    elif isinstance(record, Ended):
        if snapshot.status.terminal and snapshot.status is not TxnStatus.NEEDS_ATTENTION:
            raise StoreError(
                f"status {record.status} after terminal {snapshot.status}", txid=snapshot.txid
            )
        expected = {
            TxnStatus.COMMITTED: Decision.COMMIT,
            TxnStatus.ABORTED: Decision.ABORT,
        }.get(record.status)
        # A saga's commit needs no separate decision record: its end is the decision.
        if expected is not None and snapshot.decision not in (None, expected):
            raise StoreError(
                f"end status {record.status} without decision {expected}", txid=snapshot.txid
            )


def apply(snapshot: TxnSnapshot, record: LogRecord) -> None:
    """Fold one record into ``snapshot`` (after :func:`check_transition`)."""
    if isinstance(record, Decided):
        snapshot.decision = record.decision
        snapshot.status = (
            TxnStatus.COMMITTING if record.decision is Decision.COMMIT else TxnStatus.ABORTING
        )
        snapshot.reason = record.reason
        snapshot.updated_at_ms = record.at_ms
    elif isinstance(record, Attempted):
        snapshot.attempts[(record.branch, record.op)] = (record.attempt, record.next_at_ms)
        snapshot.updated_at_ms = record.at_ms
    elif isinstance(record, Ended):
        if record.status is TxnStatus.COMMITTED:
            snapshot.decision = Decision.COMMIT
        elif record.status is TxnStatus.ABORTED:
            snapshot.decision = Decision.ABORT
        snapshot.status = record.status
        snapshot.reason = record.reason
        snapshot.branches = record.branches
        snapshot.updated_at_ms = record.at_ms
    elif isinstance(record, OperatorAction):
        snapshot.updated_at_ms = record.at_ms
        if record.action == "retry" and snapshot.status is TxnStatus.NEEDS_ATTENTION:
            # Resume the phase the decision implies, with a fresh attempt budget.
            snapshot.status = (
                TxnStatus.COMMITTING if snapshot.decision is Decision.COMMIT else TxnStatus.ABORTING
            )
            snapshot.attempts.clear()
            # The parked reason (a branch that gave up) no longer describes it; left
            # in place it would become the reason of the end the retry reaches.
            snapshot.reason = f"retried by operator: {record.reason}"
        elif record.action == "resolve" and snapshot.status is TxnStatus.NEEDS_ATTENTION:
            # The operator repaired the participants by hand: the decision holds
            # (no decision means presumed abort). An operator's record, not an
            # Ended, because the stores accept only notes on a parked transaction.
            committed = snapshot.decision is Decision.COMMIT
            snapshot.status = TxnStatus.COMMITTED if committed else TxnStatus.ABORTED
            snapshot.decision = Decision.COMMIT if committed else Decision.ABORT
            snapshot.reason = f"resolved by operator: {record.reason}"
    elif isinstance(record, Begin):
        raise StoreError("a second Begin for an existing transaction", txid=record.txid)


def fold(records: list[LogRecord]) -> TxnSnapshot:
    """Rebuild a transaction's snapshot from its records, checking each transition."""
    if not records or not isinstance(records[0], Begin):
        raise StoreError("a transaction's history must start with Begin")
    first = records[0]
    snap = TxnSnapshot(
        spec=first.spec,
        created_at_ms=first.created_at_ms,
        deadline_at_ms=first.deadline_at_ms,
        updated_at_ms=first.created_at_ms,
    )
    for record in records[1:]:
        check_transition(snap, record)
        apply(snap, record)
    snap.history = list(records)
    return snap
