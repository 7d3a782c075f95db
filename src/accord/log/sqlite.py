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
        self._rejected: set[str] = set()
        self._writer: LoopCommitter[tuple[Any, ...]] = LoopCommitter(
            self._connect_writer, _write_batch, name="accord-log-writer"
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
        if current is None and not (
            kind is OperatorAction and record.action == "retry"  # type: ignore[union-attr]
        ):
            self.violations.append(f"{txid}: {kind.__name__} for a transaction not open")
            return
        if current is not None:
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
        self._writer.append(_row(record))

    def sync(self) -> asyncio.Future[frozenset[str]] | None:
        pending = self._writer.sync()
        if not self._rejected:
            return pending
        rejected = frozenset(self._rejected)
        self._rejected.clear()
        out: asyncio.Future[frozenset[str]] = asyncio.get_running_loop().create_future()
        if pending is None:
            out.set_result(rejected)
        else:
            pending.add_done_callback(lambda f: _merge(out, f, rejected))
        return out

    def stats(self) -> StoreStats:
        w = self._writer
        return StoreStats(records=w.items, batches=w.batches, commit_seconds=w.commit_seconds)

    # ------------------------------------------------------------ reading

    async def load_active(self) -> list[TxnSnapshot]:
        return await asyncio.to_thread(
            self._read,
            "SELECT l.txid, l.kind, l.at_ms, l.body FROM txn_open o"
            " JOIN log l ON l.txid = o.txid ORDER BY l.seq",
            (),
        )

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
                    out.append(_txn_row(snap))
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
    out: asyncio.Future[frozenset[str]], pending: asyncio.Future[Any], rejected: frozenset[str]
) -> None:
    if out.done():
        return
    if pending.exception() is not None:
        out.set_exception(pending.exception())  # type: ignore[arg-type]
    else:
        out.set_result(rejected | (pending.result() or frozenset()))


def _write_batch(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> frozenset[str]:
    """Runs inside the batch's transaction. Returns the ids whose Begin was
    refused because they exist already (from an earlier run)."""
    opened = [(r[0],) for r in rows if r[1] == "begin"]
    closed = [(r[0],) for r in rows if r[1] == "end"]
    rejected: set[str] = set()
    conn.execute("SAVEPOINT batch")
    try:
        _insert_many(conn, "log(txid, kind, at_ms, body)", 4, rows)
        _insert_many(conn, "txn_open(txid)", 1, opened)
    except sqlite3.IntegrityError:
        # Some Begin reuses an id: redo one by one to find which, dropping
        # every record of that transaction from this batch.
        conn.execute("ROLLBACK TO batch")
        opened = []
        for row in rows:
            if row[0] in rejected:
                continue
            try:
                conn.execute(_INSERT, row)
                if row[1] == "begin":
                    conn.execute(_OPEN, (row[0],))
                    opened.append((row[0],))
            except sqlite3.IntegrityError:
                rejected.add(row[0])
        closed = [c for c in closed if c[0] not in rejected]
    conn.execute("RELEASE batch")
    for start in range(0, len(closed), _CHUNK):
        chunk = closed[start : start + _CHUNK]
        conn.execute(
            f"DELETE FROM txn_open WHERE txid IN ({','.join('?' * len(chunk))})",
            [c[0] for c in chunk],
        )
    reopened = [(r[0],) for r in rows if r[1] == "operator" and b'"retry"' in r[3]]
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
        return (r.txid, "end", r.at_ms, _encode(body))
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


def _record(txid: str, kind: str, at_ms: int, blob: bytes) -> LogRecord:
    try:
        body = _decode(blob)
        if kind == "begin":
            spec = TransactionSpec.from_dict(body["spec"])
            if spec.id != txid:
                raise StoreError(f"Begin of {spec.id!r} filed under {txid!r}", txid=txid)
            return Begin(spec, at_ms, body["deadline_at_ms"])
        if kind == "decided":
            return Decided(txid, Decision(body["decision"]), body["reason"], at_ms)
        if kind == "end":
            branches = tuple(BranchSummary(*b) for b in body["branches"])
            return Ended(txid, TxnStatus(body["status"]), body["reason"], at_ms, branches)
        if kind == "attempt":
            return Attempted(
                txid,
                body["branch"],
                Op(body["op"]),
                body["attempt"],
                body["error"],
                at_ms,
                body["next_at_ms"],
            )
        if kind == "operator":
            return OperatorAction(txid, body["action"], body["reason"], at_ms)
    except (InvalidTransaction, msgspec.DecodeError, KeyError, ValueError, TypeError) as exc:
        raise StoreError(f"unreadable {kind} record: {exc}", txid=txid) from exc
    raise StoreError(f"unknown record kind {kind!r}", txid=txid)


def _fold(txid: str, records: list[LogRecord]) -> TxnSnapshot:
    try:
        return fold(records)
    except StoreError as exc:
        raise StoreError(f"log of {txid!r} does not hold together: {exc}", txid=txid) from exc


def _txn_row(s: TxnSnapshot) -> TxnRow:
    return TxnRow(
        id=s.txid,
        protocol=s.spec.protocol.value,
        status=s.status,
        decision=s.decision.value if s.decision else None,
        reason=s.reason,
        branches=len(s.spec.branches),
        created_at_ms=s.created_at_ms,
        updated_at_ms=s.updated_at_ms,
    )


__all__ = ["SQLiteStore", "check_transition"]
