"""What the SQL stores (SQLite, PostgreSQL) share: the in-memory table of open
transactions that checks every record before it is queued, the record <-> row
codecs, and the bookkeeping of which transactions a written batch closes or
reopens.

A row is ``(txid, kind, at_ms, body)`` with ``body`` the record's JSON as
bytes. Two tuple subclasses mark rows that need more than an insert:
:class:`Reopen` (an operator's retry that takes a transaction out of
needs_attention: writing it puts the transaction back in ``txn_open``) and
:class:`Note` (an operator's note on a transaction this process does not know
to be open or parked: written only if the transaction is in the log, else a
violation; used by stores that cannot read the log inside ``append``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec

from accord._completion import Completion
from accord.core.records import (
    Attempted,
    Begin,
    BranchSummary,
    Decided,
    Decision,
    Ended,
    LogRecord,
    OperatorAction,
    TxnSnapshot,
    TxnStatus,
    fold,
)
from accord.core.spec import Op, TransactionSpec
from accord.errors import InvalidTransaction, StoreError
from accord.log.base import TxnRow

_log = logging.getLogger("accord.log")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

IMPLIED = {TxnStatus.COMMITTED: Decision.COMMIT, TxnStatus.ABORTED: Decision.ABORT}


class Reopen(tuple[Any, ...]):
    """The row of an operator's retry that takes a transaction out of
    needs_attention: writing it puts the transaction back in ``txn_open``."""

    __slots__ = ()


class Note(tuple[Any, ...]):
    """An operator's note on a transaction neither open nor parked here:
    written only if the transaction is in the log (checked when the batch is
    written), otherwise listed as a violation."""

    __slots__ = ()


# Looks a transaction up in the log (synchronously); None if unknown.
Lookup = Callable[[str], TxnSnapshot | None]


class OpenTransactions:
    """The state of the transactions not yet terminal, kept in memory so that
    every record is checked before it is queued (no read on the hot path)."""

    def __init__(self, violations: list[str]) -> None:
        self.violations = violations
        # txid -> (status, decision) of every transaction not yet terminal.
        self.open: dict[str, tuple[TxnStatus, Decision | None]] = {}
        # txid -> decision of the transactions parked in needs_attention (by
        # this process, or found parked when the store was opened), so that an
        # operator's retry can reopen them without a read.
        self.parked: dict[str, Decision | None] = {}
        # Begins refused because their id is open, not yet reported by sync().
        self.rejected: set[str] = set()

    def admit(self, record: LogRecord, lookup: Lookup | None) -> tuple[Any, ...] | None:
        """The row to queue for ``record``, or None if it is refused (a
        duplicate Begin goes to ``rejected``, anything else to ``violations``).
        ``lookup`` reads a transaction neither open nor parked here; without
        it such an operator's note is queued as a :class:`Note`."""
        txid = record.txid
        kind = type(record)
        if kind is Begin:
            if txid in self.open:
                self.rejected.add(txid)
                return None
            self.open[txid] = (TxnStatus.PREPARING, None)
            return row(record)
        current = self.open.get(txid)
        if current is None:
            if kind is OperatorAction:
                return self._note(record, lookup)  # type: ignore[arg-type]
            self.violations.append(f"{txid}: {kind.__name__} for a transaction not open")
            return None
        _, decision = current
        if kind is Decided:
            dec = record.decision  # type: ignore[union-attr]
            if decision is not None and decision is not dec:
                self.violations.append(f"{txid}: decision would flip {decision} -> {dec}")
                return None
            self.open[txid] = (
                TxnStatus.COMMITTING if dec is Decision.COMMIT else TxnStatus.ABORTING,
                dec,
            )
        elif kind is Ended:
            implied = IMPLIED.get(record.status)  # type: ignore[union-attr]
            if implied is not None and decision not in (None, implied):
                self.violations.append(
                    f"{txid}: {record.status} contradicts decision {decision}"  # type: ignore[union-attr]
                )
                return None
            del self.open[txid]
            if record.status is TxnStatus.NEEDS_ATTENTION:  # type: ignore[union-attr]
                self.parked[txid] = decision
        return row(record)

    def _note(self, record: OperatorAction, lookup: Lookup | None) -> tuple[Any, ...] | None:
        """An operator's record for a transaction that is not open: a retry of
        one in needs_attention reopens it; on any other logged transaction it
        is only a note. Only such a reopening retry may put the transaction
        back in ``txn_open`` (a note on a finished one must not)."""
        txid = record.txid
        if txid in self.parked:
            parked, decision = True, self.parked[txid]
        elif lookup is None:
            return Note(row(record))
        else:
            # Parked by an earlier run (its records are on disk) or finished.
            snap = lookup(txid)
            if snap is None:
                self.violations.append(f"{txid}: OperatorAction for an unknown transaction")
                return None
            parked = snap.status is TxnStatus.NEEDS_ATTENTION
            decision = snap.decision
        if parked and record.action == "retry":
            self.parked.pop(txid, None)
            status = TxnStatus.COMMITTING if decision is Decision.COMMIT else TxnStatus.ABORTING
            self.open[txid] = (status, decision)
            return Reopen(row(record))
        if parked and record.action == "resolve":
            self.parked.pop(txid, None)  # it ends with this record
        return row(record)


def filter_batch(
    rows: Sequence[tuple[Any, ...]], logged: set[str]
) -> tuple[list[tuple[Any, ...]], set[str], list[str]]:
    """Which rows of a batch to write, given ``logged``, the ids of the batch
    that already have a Begin in the log. Returns (rows to write, ids whose
    Begin is refused, violations of notes on unknown transactions).

    Records of a refused id before its refused Begin belong to the existing
    transaction (it ended in this batch) and are kept; those after it are the
    duplicate's and are dropped -- what inserting row by row would do."""
    known = set(logged)
    rejected: set[str] = set()
    written: list[tuple[Any, ...]] = []
    violations: list[str] = []
    for r in rows:
        txid = r[0]
        if txid in rejected:
            continue
        if r[1] == "begin":
            if txid in known:
                rejected.add(txid)
                continue
            known.add(txid)
        elif type(r) is Note and txid not in known:
            violations.append(f"{txid}: OperatorAction for an unknown transaction")
            continue
        written.append(r)
    return written, rejected, violations


def open_after(written: Iterable[tuple[Any, ...]]) -> tuple[list[str], list[str]]:
    """(closed, reopened) ids after a written batch: whether a transaction is
    open is decided by its last end or reopening record in it, in append order."""
    still_open: dict[str, bool] = {}
    for r in written:
        if r[1] == "end":
            still_open[r[0]] = False
        elif type(r) is Reopen:
            still_open[r[0]] = True
    closed = [txid for txid, is_open in still_open.items() if not is_open]
    reopened = [txid for txid, is_open in still_open.items() if is_open]
    return closed, reopened


def merge(
    out: Completion[frozenset[str]], pending: Completion[Any], rejected: frozenset[str]
) -> None:
    failed = pending.exception()
    if failed is not None:
        out.set_exception(failed)
    else:
        out.set_result(rejected | (pending.result() or frozenset()))


def with_rejected(
    pending: Completion[Any] | None, rejected: set[str]
) -> Completion[frozenset[str]] | None:
    """``pending`` with the Begins refused in memory added to its result."""
    if not rejected:
        return pending
    refused = frozenset(rejected)
    rejected.clear()
    if pending is None:
        return Completion.resolved(refused)
    out: Completion[frozenset[str]] = Completion()
    pending.add_done_callback(lambda f: merge(out, f, refused))
    return out


def row(r: LogRecord) -> tuple[Any, ...]:
    body: Any
    if type(r) is Begin:
        body = {"spec": r.spec.to_dict(), "deadline_at_ms": r.deadline_at_ms}
        return (r.txid, "begin", r.created_at_ms, _encode(body))
    if type(r) is Decided:
        body = {"decision": r.decision.value, "reason": r.reason}
        return (r.txid, "decided", r.at_ms, _encode(body))
    if type(r) is Ended:
        body = {"status": r.status.value, "reason": r.reason, "branches": r.branches}
        try:
            blob = _encode(body)
        except (TypeError, ValueError, OverflowError, RecursionError):
            # A participant's result (any object an in-process handler returned)
            # that JSON cannot carry is kept as its repr: failing here would stop
            # the transaction at its end, and again after every restart.
            body["branches"] = tuple(b._replace(result=_jsonable(b.result)) for b in r.branches)
            blob = _encode(body)
        return (r.txid, "end", r.at_ms, blob)
    if type(r) is Attempted:
        body = {
            "branch": r.branch,
            "op": r.op.value,
            "attempt": r.attempt,
            "error": r.error,
            "next_at_ms": r.next_at_ms,
        }
        return (r.txid, "attempt", r.at_ms, _encode(body))
    if type(r) is OperatorAction:
        body = {"action": r.action, "reason": r.reason}
        return (r.txid, "operator", r.at_ms, _encode(body))
    raise TypeError(f"not a log record: {r!r}")


def _jsonable(value: Any) -> Any:
    try:
        _encode(value)
    except (TypeError, ValueError, OverflowError, RecursionError):
        return repr(value)
    return value


def _int(body: Any, key: str) -> int:
    value = body[key]
    if type(value) is not int:
        raise TypeError(f"{key} must be an integer, got {value!r}")
    return value


def record(txid: str, kind: str, at_ms: int, blob: bytes) -> LogRecord:
    try:
        body = _decode(blob)
        if kind == "begin":
            spec = TransactionSpec.from_dict(body["spec"])
            if spec.id != txid:
                raise StoreError(f"Begin of {spec.id!r} filed under {txid!r}", txid=txid)
            return Begin(spec, at_ms, _int(body, "deadline_at_ms"))
        if kind == "decided":
            return Decided(txid, Decision(body["decision"]), body["reason"], at_ms)
        if kind == "end":
            branches = tuple(BranchSummary(*b) for b in body["branches"])
            return Ended(txid, TxnStatus(body["status"]), body["reason"], at_ms, branches)
        if kind == "attempt":
            return Attempted(
                txid,
                _int(body, "branch"),
                Op(body["op"]),
                _int(body, "attempt"),
                body["error"],
                at_ms,
                _int(body, "next_at_ms"),
            )
        if kind == "operator":
            return OperatorAction(txid, body["action"], body["reason"], at_ms)
    except (InvalidTransaction, msgspec.DecodeError, KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"unreadable {kind} record of {txid!r}: {exc}", txid=txid) from exc
    raise StoreError(f"unknown record kind {kind!r}", txid=txid)


def fold_records(txid: str, records: list[LogRecord]) -> TxnSnapshot:
    try:
        return fold(records)
    except StoreError as exc:
        raise StoreError(f"log of {txid!r} does not hold together: {exc}", txid=txid) from exc


FOLD_CHUNK = 500
"""Transactions whose records a listing reads in one query."""


def page(
    snaps: Iterable[TxnSnapshot], status: TxnStatus | None, limit: int, since_ms: int | None
) -> list[TxnRow]:
    """The first ``limit`` of ``snaps`` (in id order) with this status (any if
    None), created at or after ``since_ms`` (any if None)."""
    out: list[TxnRow] = []
    if limit <= 0:
        return out
    for snap in snaps:
        if matches(snap, status, since_ms):
            out.append(TxnRow.of(snap))
            if len(out) >= limit:
                break
    return out


def matches(snap: TxnSnapshot, status: TxnStatus | None, since_ms: int | None) -> bool:
    """Whether a listing filtered by ``status`` and ``since_ms`` (None: any) shows ``snap``."""
    return (status is None or snap.status is status) and (
        since_ms is None or snap.created_at_ms >= since_ms
    )


def count(snaps: Iterable[TxnSnapshot]) -> dict[TxnStatus, int]:
    counts: dict[TxnStatus, int] = {}
    for snap in snaps:
        counts[snap.status] = counts.get(snap.status, 0) + 1
    return counts


def fold_readable(rows: Iterable[Sequence[Any]]) -> list[TxnSnapshot]:
    """The snapshots of (txid, kind, at_ms, body) rows (each transaction's in
    seq order), leaving out, with a warning, a transaction whose records do
    not hold together (for maintenance that must not stop at one)."""
    groups: dict[str, list[Sequence[Any]]] = {}
    for r in rows:
        groups.setdefault(r[0], []).append(r)
    snaps = []
    for txid, of_txid in groups.items():
        try:
            snaps += fold_rows(of_txid)
        except StoreError as exc:
            _log.warning("log of %r is unreadable, left alone: %s", txid, exc)
    return snaps


def fold_rows(rows: Iterable[Sequence[Any]]) -> list[TxnSnapshot]:
    """Fold (txid, kind, at_ms, body) rows: any order of transactions, each in seq order."""
    groups: dict[str, list[LogRecord]] = {}
    for txid, kind, at_ms, body in rows:
        groups.setdefault(txid, []).append(record(txid, kind, at_ms, body))
    return [fold_records(txid, records) for txid, records in groups.items()]
