"""The embedded log: SQLite in WAL mode, append-only, group-committed.

Schema (version 1)::

    meta(key PRIMARY KEY, value)                   -- schema_version
    log(seq INTEGER PRIMARY KEY, txid, kind, at_ms, body)
        index log_txid(txid); unique index on txid where kind = 'begin'
    txn_open(txid PRIMARY KEY)                     -- transactions not yet terminal

Every record is one appended ``log`` row (an append at the end of a B-tree is
the cheapest write SQLite has, five times cheaper here than updating a row per
transaction). ``txn_open`` gains a row at Begin and loses it at the terminal
record, so recovery reads only what is unfinished.

Invariants are checked in pairs: before a record is queued (against the
state of the open transactions, kept in memory) and when records are read
back (by folding them with the same checks). A record that would flip a
decision or leave a terminal status is not written; it is listed in
``violations``.

``synchronous=FULL`` (default) fsyncs the WAL at every commit: a commit that
returned survives power loss. ``NORMAL`` fsyncs only at checkpoints: it
survives a crash of the process but may lose the last commits on power loss or
an OS crash, which for a coordinator means it could forget a commit decision
it already acted on. Use NORMAL only where the machine itself is protected.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
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
    check_transition,
    fold,
)
from accord.core.spec import Op, TransactionSpec
from accord.errors import InvalidTransaction, SchemaVersionError, StoreError
from accord.log.base import SCHEMA_VERSION, Store, StoreStats, TxnRow
from accord.log.groupcommit import LoopCommitter

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE log (
        seq INTEGER PRIMARY KEY,
        txid TEXT NOT NULL,
        kind TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX log_txid ON log(txid);
    CREATE UNIQUE INDEX log_one_begin ON log(txid) WHERE kind = 'begin';
    CREATE TABLE txn_open (txid TEXT PRIMARY KEY) WITHOUT ROWID;
    """,
}

_INSERT = "INSERT INTO log(txid, kind, at_ms, body) VALUES (?, ?, ?, ?)"
_OPEN = "INSERT INTO txn_open(txid) VALUES (?)"
_CLOSE = "DELETE FROM txn_open WHERE txid = ?"


class SQLiteStore(Store):
    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "FULL") -> None:
        synchronous = synchronous.upper()
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ValueError(f"synchronous must be FULL, EXTRA or NORMAL, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self.violations = []
        # txid -> (status, decision) of every transaction not yet terminal.
        self._open: dict[str, tuple[TxnStatus, Decision | None]] = {}
        # txid -> decision of the transactions parked in needs_attention by this
        # process, so that an operator's retry can reopen them without a read.
        self._parked: dict[str, Decision | None] = {}
        self._rejected: set[str] = set()
        self._writer: LoopCommitter[tuple[Any, ...]] = LoopCommitter(
            self._connect_writer, self._write_batch, name="accord-log-writer"
        )

    # ------------------------------------------------------------ lifecycle

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _connect_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        return conn

    async def open(self) -> None:
        await asyncio.to_thread(self._migrate)
        for snap in await self.load_active():
            self._open[snap.txid] = (snap.status, snap.decision)
        self._writer.start(asyncio.get_running_loop())

    def _migrate(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self.path}: could not enable WAL (journal_mode={mode})")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                conn.execute("ROLLBACK")
                raise SchemaVersionError(
                    f"{self.path}: log schema version {version} is newer than this build "
                    f"understands ({SCHEMA_VERSION}); upgrade accord"
                )
            for v in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[v].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the log: {exc}") from exc
        finally:
            conn.close()

    async def close(self) -> None:
        await self._writer.close()

    # ------------------------------------------------------------ writing

    def append(self, record: LogRecord) -> None:
        txid = record.txid
        kind = type(record)
        if kind is Begin:
            if txid in self._open:
                self._rejected.add(txid)
                return
            self._open[txid] = (TxnStatus.PREPARING, None)
            self._writer.append(_row(record))
            return
        current = self._open.get(txid)
        if current is None:
            if kind is OperatorAction:
                self._append_note(record)  # type: ignore[arg-type]
                return
            self.violations.append(f"{txid}: {kind.__name__} for a transaction not open")
            return
        _, decision = current
        if kind is Decided:
            dec = record.decision  # type: ignore[union-attr]
            if decision is not None and decision is not dec:
                self.violations.append(f"{txid}: decision would flip {decision} -> {dec}")
                return
            self._open[txid] = (
                TxnStatus.COMMITTING if dec is Decision.COMMIT else TxnStatus.ABORTING,
                dec,
            )
        elif kind is Ended:
            implied = _IMPLIED.get(record.status)  # type: ignore[union-attr]
            if implied is not None and decision not in (None, implied):
                self.violations.append(
                    f"{txid}: {record.status} contradicts decision {decision}"  # type: ignore[union-attr]
                )
                return
            del self._open[txid]
            if record.status is TxnStatus.NEEDS_ATTENTION:  # type: ignore[union-attr]
                self._parked[txid] = decision
        self._writer.append(_row(record))

    def _append_note(self, record: OperatorAction) -> None:
        """An operator's record for a transaction that is not open: a retry of
        one in needs_attention reopens it; on any other logged transaction it
        is only a note. Only such a reopening retry may put the transaction
        back in ``txn_open`` (a note on a finished one must not)."""
        txid = record.txid
        if txid in self._parked:
            parked, decision = True, self._parked[txid]
        else:
            # Parked by an earlier run (its records are on disk) or finished.
            snaps = self._read(
                "SELECT txid, kind, at_ms, body FROM log WHERE txid = ? ORDER BY seq", (txid,)
            )
            if not snaps:
                self.violations.append(f"{txid}: OperatorAction for an unknown transaction")
                return
            parked = snaps[0].status is TxnStatus.NEEDS_ATTENTION
            decision = snaps[0].decision
        if parked and record.action == "retry":
            self._parked.pop(txid, None)
            status = TxnStatus.COMMITTING if decision is Decision.COMMIT else TxnStatus.ABORTING
            self._open[txid] = (status, decision)
            self._writer.append(_Reopen(_row(record)))
            return
        self._writer.append(_row(record))

    def _write_batch(
        self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]
    ) -> frozenset[str]:
        rejected = _write_batch(conn, rows)
        # A Begin refused by the database (its id is in the log from an earlier
        # run or an earlier batch) was let into ``_open`` by append; that entry
        # is the duplicate's, and later records under it must not be accepted.
        for txid in rejected:
            self._open.pop(txid, None)
        return rejected

    def sync(self) -> Completion[frozenset[str]] | None:
        pending = self._writer.sync()
        if not self._rejected:
            return pending
        rejected = frozenset(self._rejected)
        self._rejected.clear()
        if pending is None:
            return Completion.resolved(rejected)
        out: Completion[frozenset[str]] = Completion()
        pending.add_done_callback(lambda f: _merge(out, f, rejected))
        return out

    def stats(self) -> StoreStats:
        w = self._writer
        return StoreStats(records=w.items, batches=w.batches, commit_seconds=w.commit_seconds)

    # ------------------------------------------------------------ reading

    async def load_active(self) -> list[TxnSnapshot]:
        snaps = await asyncio.to_thread(
            self._read,
            "SELECT l.txid, l.kind, l.at_ms, l.body FROM txn_open o"
            " JOIN log l ON l.txid = o.txid ORDER BY l.seq",
            (),
        )
        # txn_open and the records must agree; if they do not, the records win
        # (resuming a finished transaction would hold a slot forever).
        return [s for s in snaps if not s.status.terminal]

    async def get(self, txid: str) -> TxnSnapshot | None:
        snaps = await asyncio.to_thread(
            self._read,
            "SELECT txid, kind, at_ms, body FROM log WHERE txid = ? ORDER BY seq",
            (txid,),
        )
        return snaps[0] if snaps else None

    async def list(
        self, status: TxnStatus | None = None, limit: int = 100, after_id: str | None = None
    ) -> builtins.list[TxnRow]:
        def run() -> builtins.list[TxnRow]:
            out: builtins.list[TxnRow] = []
            sql = "SELECT txid, kind, at_ms, body FROM log WHERE txid > ? ORDER BY txid, seq"
            for snap in self._scan(sql, (after_id or "",)):
                if status is None or snap.status is status:
                    out.append(TxnRow.of(snap))
                    if len(out) >= limit:
                        break
            return out

        return await asyncio.to_thread(run)

    async def count_by_status(self) -> dict[TxnStatus, int]:
        def run() -> dict[TxnStatus, int]:
            counts: dict[TxnStatus, int] = {}
            sql = "SELECT txid, kind, at_ms, body FROM log ORDER BY txid, seq"
            for snap in self._scan(sql, ()):
                counts[snap.status] = counts.get(snap.status, 0) + 1
            return counts

        return await asyncio.to_thread(run)

    async def snapshots(self) -> builtins.list[TxnSnapshot]:
        sql = "SELECT txid, kind, at_ms, body FROM log ORDER BY txid, seq"
        return await asyncio.to_thread(lambda: builtins.list(self._scan(sql, ())))

    def _read(self, sql: str, params: Sequence[Any]) -> builtins.list[TxnSnapshot]:
        """Fold rows (any order of transactions, each in seq order)."""
        conn = self._connect()
        try:
            groups: dict[str, builtins.list[LogRecord]] = {}
            for txid, kind, at_ms, body in conn.execute(sql, params):
                groups.setdefault(txid, []).append(_record(txid, kind, at_ms, body))
            return [_fold(txid, records) for txid, records in groups.items()]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the log: {exc}") from exc
        finally:
            conn.close()

    def _scan(self, sql: str, params: Sequence[Any]) -> Iterable[TxnSnapshot]:
        """Fold rows ordered by txid, yielding one snapshot at a time."""
        conn = self._connect()
        try:
            current: str | None = None
            records: builtins.list[LogRecord] = []
            for txid, kind, at_ms, body in conn.execute(sql, params):
                if txid != current:
                    if records:
                        yield _fold(current or "", records)
                    current, records = txid, []
                records.append(_record(txid, kind, at_ms, body))
            if records:
                yield _fold(current or "", records)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the log: {exc}") from exc
        finally:
            conn.close()


_IMPLIED = {TxnStatus.COMMITTED: Decision.COMMIT, TxnStatus.ABORTED: Decision.ABORT}


def _merge(
    out: Completion[frozenset[str]], pending: Completion[Any], rejected: frozenset[str]
) -> None:
    failed = pending.exception()
    if failed is not None:
        out.set_exception(failed)
    else:
        out.set_result(rejected | (pending.result() or frozenset()))


class _Reopen(tuple[Any, ...]):
    """The row of an operator's retry that takes a transaction out of
    needs_attention: writing it puts the transaction back in ``txn_open``."""

    __slots__ = ()


def _write_batch(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> frozenset[str]:
    """Runs inside the batch's transaction. Returns the ids whose Begin was
    refused because they exist already (from an earlier run or batch)."""
    rejected: set[str] = set()
    written = rows
    conn.execute("SAVEPOINT batch")
    try:
        _insert_many(conn, "log(txid, kind, at_ms, body)", 4, rows)
        _insert_many(conn, "txn_open(txid)", 1, [(r[0],) for r in rows if r[1] == "begin"])
    except sqlite3.IntegrityError:
        # Some Begin reuses an id: redo one by one to find which. Records of
        # that id before the refused Begin belong to the existing transaction
        # (it ended in this batch) and are kept; those after it are the
        # duplicate's and are dropped.
        conn.execute("ROLLBACK TO batch")
        written = []
        for row in rows:
            if row[0] in rejected:
                continue
            try:
                conn.execute(_INSERT, row)
                if row[1] == "begin":
                    conn.execute(_OPEN, (row[0],))
            except sqlite3.IntegrityError:
                rejected.add(row[0])
                continue
            written.append(row)
    conn.execute("RELEASE batch")
    # Whether a transaction is open after this batch is decided by its last
    # end or reopening record in it, in append order.
    still_open: dict[str, bool] = {}
    for r in written:
        if r[1] == "end":
            still_open[r[0]] = False
        elif type(r) is _Reopen:
            still_open[r[0]] = True
    closed = [txid for txid, is_open in still_open.items() if not is_open]
    for start in range(0, len(closed), _CHUNK):
        chunk = closed[start : start + _CHUNK]
        conn.execute(f"DELETE FROM txn_open WHERE txid IN ({','.join('?' * len(chunk))})", chunk)
    reopened = [(txid,) for txid, is_open in still_open.items() if is_open]
    if reopened:
        conn.executemany("INSERT OR IGNORE INTO txn_open(txid) VALUES (?)", reopened)
    return frozenset(rejected)


_CHUNK = 200


def _insert_many(
    conn: sqlite3.Connection, into: str, width: int, rows: Sequence[tuple[Any, ...]]
) -> None:
    """One multi-row INSERT per chunk: each statement is one call into SQLite,
    which matters when every call gives up and retakes the GIL."""
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start : start + _CHUNK]
        params = [v for row in chunk for v in row]
        conn.execute(f"INSERT INTO {into} VALUES {','.join([one] * len(chunk))}", params)


# ---------------------------------------------------------------- record codecs


def _row(r: LogRecord) -> tuple[Any, ...]:
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


def _record(txid: str, kind: str, at_ms: int, blob: bytes) -> LogRecord:
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


def _fold(txid: str, records: list[LogRecord]) -> TxnSnapshot:
    try:
        return fold(records)
    except StoreError as exc:
        raise StoreError(f"log of {txid!r} does not hold together: {exc}", txid=txid) from exc


__all__ = ["SQLiteStore", "check_transition"]
