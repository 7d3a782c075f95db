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
import heapq
import itertools
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from accord._completion import Completion
from accord.core.records import LogRecord, TxnSnapshot, TxnStatus, check_transition
from accord.errors import SchemaVersionError, StoreError
from accord.log._rows import (
    FOLD_CHUNK,
    OpenTransactions,
    count,
    fold_readable,
    fold_records,
    open_after,
    page,
    record,
    with_rejected,
)
from accord.log.base import (
    PURGEABLE,
    SCHEMA_VERSION,
    Store,
    StoreStats,
    TxnRow,
    check_purge,
)
from accord.log.groupcommit import LoopCommitter

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

# Finished transactions counted by the status of their last End: not open
# (txn_open: an operator's retry puts a parked one back) and with no later End
# or operator's record (a resolve ends a parked transaction with no End).
_ENDED_COUNTS = (
    "SELECT json_extract(CAST(body AS TEXT), '$.status'), count(*) FROM log e"
    " WHERE kind = 'end' AND NOT EXISTS (SELECT 1 FROM log l WHERE l.txid = e.txid"
    " AND l.kind IN ('end', 'operator') AND l.seq > e.seq)"
    " AND txid NOT IN (SELECT txid FROM txn_open) GROUP BY 1"
)
# Finished transactions an operator had the last word on: folded to know.
_OPERATED_AFTER = (
    "SELECT txid FROM log o WHERE kind = 'operator' AND txid > ?1"
    " AND NOT EXISTS (SELECT 1 FROM log l WHERE l.txid = o.txid AND l.kind = 'end'"
    " AND l.seq > o.seq) AND txid NOT IN (SELECT txid FROM txn_open)"
)
_OPERATED = f"SELECT DISTINCT txid FROM ({_OPERATED_AFTER}) ORDER BY txid"
# The ids of the transactions with an End record of a status, after an id, a
# page at a time (the index on txid gives them in order: no sort).
_ENDED_AS = (
    "SELECT DISTINCT txid FROM log WHERE txid > ? AND kind = 'end'"
    " AND json_extract(CAST(body AS TEXT), '$.status') = ? ORDER BY txid LIMIT ?"
)
_OPEN_IDS = "SELECT txid FROM txn_open WHERE txid > ? ORDER BY txid"
# Transactions not open whose last record is older than a time, a page at a
# time: the candidates of a purge (folding tells which ended for good).
_PURGE_CANDIDATES = (
    "SELECT txid FROM log WHERE txid > ? AND txid NOT IN (SELECT txid FROM txn_open)"
    " GROUP BY txid HAVING max(at_ms) < ? ORDER BY txid LIMIT ?"
)
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
        self._txns = OpenTransactions(self.violations)
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
            self._txns.open[snap.txid] = (snap.status, snap.decision)
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
        row = self._txns.admit(record, self._lookup)
        if row is not None:
            self._writer.append(row)

    def _lookup(self, txid: str) -> TxnSnapshot | None:
        snaps = self._read(
            "SELECT txid, kind, at_ms, body FROM log WHERE txid = ? ORDER BY seq", (txid,)
        )
        return snaps[0] if snaps else None

    def _write_batch(
        self, conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]
    ) -> frozenset[str]:
        rejected = _write_batch(conn, rows)
        # A Begin refused by the database (its id is in the log from an earlier
        # run or an earlier batch) was let into ``_open`` by append; that entry
        # is the duplicate's, and later records under it must not be accepted.
        for txid in rejected:
            self._txns.open.pop(txid, None)
        return rejected

    def sync(self) -> Completion[frozenset[str]] | None:
        return with_rejected(self._writer.sync(), self._txns.rejected)

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

    async def _settled(self) -> None:
        """Reads see every record appended before them (read your writes),
        including the ones that need not be durable before the next action."""
        if self._writer.running:
            await self.flush()

    async def get(self, txid: str) -> TxnSnapshot | None:
        await self._settled()
        snaps = await asyncio.to_thread(
            self._read,
            "SELECT txid, kind, at_ms, body FROM log WHERE txid = ? ORDER BY seq",
            (txid,),
        )
        return snaps[0] if snaps else None

    async def list(
        self,
        status: TxnStatus | None = None,
        limit: int = 100,
        after_id: str | None = None,
        *,
        since_ms: int | None = None,
    ) -> builtins.list[TxnRow]:
        await self._settled()

        def run() -> builtins.list[TxnRow]:
            every = "SELECT txid, kind, at_ms, body FROM log WHERE txid > ? ORDER BY txid, seq"
            if status is None:  # every transaction: fold them in id order until the page is full
                return page(self._scan(every, (after_id or "",)), status, limit, since_ms)
            try:  # only the candidates for that status, folded a chunk at a time
                candidates = self._fold_each(self._candidates(status, after_id or ""))
                return page(candidates, status, limit, since_ms)
            except StoreError as exc:
                if exc.txid is not None:
                    raise
                # A record SQL cannot read: fold every transaction, which names it.
                return page(self._scan(every, (after_id or "",)), status, limit, since_ms)

        return await asyncio.to_thread(run)

    async def count_by_status(self) -> dict[TxnStatus, int]:
        await self._settled()

        def run() -> dict[TxnStatus, int]:
            try:
                return self._count_fast()
            except (sqlite3.Error, ValueError):
                # A record SQL cannot read: fold everything, which names it.
                sql = "SELECT txid, kind, at_ms, body FROM log ORDER BY txid, seq"
                return count(self._scan(sql, ()))

        return await asyncio.to_thread(run)

    def _count_fast(self) -> dict[TxnStatus, int]:
        """Finished transactions counted by SQL, the others folded, all in
        one read transaction (one snapshot of the log)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            ended = conn.execute(_ENDED_COUNTS).fetchall()
            folded = [t for (t,) in conn.execute(_OPERATED, ("",))]
            folded += [t for (t,) in conn.execute(_OPEN_IDS, ("",))]
            counts = count(self._fold_on(conn, iter(folded)))
            conn.execute("COMMIT")
        finally:
            conn.close()
        for status, n in ended:
            counts[TxnStatus(status)] = counts.get(TxnStatus(status), 0) + n
        return counts

    def _candidates(self, status: TxnStatus, after_id: str) -> Iterator[str]:
        """The ids, in order, of the transactions that may have ``status`` now:
        the open ones; or those with an End record of that status and those
        an operator had the last word on (folding tells which really have it)."""
        if not status.terminal:
            return self._ids(f"{_OPEN_IDS} LIMIT ?", after_id)
        conn = self._connect()
        try:
            operated = [t for (t,) in conn.execute(_OPERATED, (after_id,))]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the log: {exc}") from exc
        finally:
            conn.close()
        # Both sorted in SQLite's (binary) order, which is Python's.
        ended = self._ids(_ENDED_AS, after_id, status.value)
        return _distinct(heapq.merge(ended, operated))

    def _ids(self, sql: str, after_id: str, *params: Any) -> Iterator[str]:
        """Run ``sql`` (taking the last id seen, ``params``, then a LIMIT) a page
        at a time, so that a short listing reads only the first pages."""
        while True:
            conn = self._connect()
            try:
                ids = [txid for (txid,) in conn.execute(sql, (after_id, *params, FOLD_CHUNK))]
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot read the log: {exc}") from exc
            finally:
                conn.close()
            yield from ids
            if len(ids) < FOLD_CHUNK:
                return
            after_id = ids[-1]

    def _fold_each(self, txids: Iterator[str]) -> Iterator[TxnSnapshot]:
        """The snapshots of these transactions, in their order."""
        conn = self._connect()
        try:
            yield from self._fold_on(conn, txids)
        finally:
            conn.close()

    def _fold_on(self, conn: sqlite3.Connection, txids: Iterator[str]) -> Iterator[TxnSnapshot]:
        """The snapshots of these transactions, in their order, read on
        ``conn`` a chunk at a time."""
        while chunk := builtins.list(itertools.islice(txids, FOLD_CHUNK)):
            yield from self._scan_on(conn, _records_of(len(chunk)), chunk)

    async def purge(self, before_ms: int) -> int:
        check_purge(before_ms)
        await self._settled()
        return await asyncio.to_thread(self._purge, before_ms)

    def _purge(self, before_ms: int) -> int:
        """A page of candidates at a time: folded, then the committed and
        aborted ones deleted in one write transaction."""
        purged, after = 0, ""
        while True:
            conn = self._connect()
            try:
                ids = [
                    t for (t,) in conn.execute(_PURGE_CANDIDATES, (after, before_ms, FOLD_CHUNK))
                ]
                records = conn.execute(_records_of(len(ids)), ids).fetchall()
                gone = [
                    snap.txid
                    for snap in fold_readable(records)
                    if snap.status in PURGEABLE and snap.updated_at_ms < before_ms
                ]
                if gone:
                    doomed = ",".join("?" * len(gone))
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute(f"DELETE FROM log WHERE txid IN ({doomed})", gone)
                    conn.execute("COMMIT")
                    purged += len(gone)
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: cannot purge the log: {exc}") from exc
            finally:
                conn.close()
            if len(ids) < FOLD_CHUNK:
                return purged
            after = ids[-1]

    async def snapshots(self) -> builtins.list[TxnSnapshot]:
        await self._settled()
        sql = "SELECT txid, kind, at_ms, body FROM log ORDER BY txid, seq"
        return await asyncio.to_thread(lambda: builtins.list(self._scan(sql, ())))

    def _read(self, sql: str, params: Sequence[Any]) -> builtins.list[TxnSnapshot]:
        """Fold rows (any order of transactions, each in seq order)."""
        conn = self._connect()
        try:
            groups: dict[str, builtins.list[LogRecord]] = {}
            for txid, kind, at_ms, body in conn.execute(sql, params):
                groups.setdefault(txid, []).append(record(txid, kind, at_ms, body))
            return [fold_records(txid, records) for txid, records in groups.items()]
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the log: {exc}") from exc
        finally:
            conn.close()

    def _scan(self, sql: str, params: Sequence[Any]) -> Iterable[TxnSnapshot]:
        """Fold rows ordered by txid, yielding one snapshot at a time."""
        conn = self._connect()
        try:
            yield from self._scan_on(conn, sql, params)
        finally:
            conn.close()

    def _scan_on(
        self, conn: sqlite3.Connection, sql: str, params: Sequence[Any]
    ) -> Iterable[TxnSnapshot]:
        try:
            current: str | None = None
            records: builtins.list[LogRecord] = []
            for txid, kind, at_ms, body in conn.execute(sql, params):
                if txid != current:
                    if records:
                        yield fold_records(current or "", records)
                    current, records = txid, []
                records.append(record(txid, kind, at_ms, body))
            if records:
                yield fold_records(current or "", records)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot read the log: {exc}") from exc


def _records_of(n: int) -> str:
    """The records of ``n`` transactions (ids as parameters), each in order."""
    marks = ",".join("?" * n)
    return f"SELECT txid, kind, at_ms, body FROM log WHERE txid IN ({marks}) ORDER BY txid, seq"


def _distinct(ids: Iterable[str]) -> Iterator[str]:
    """Sorted ``ids`` without repeats."""
    last = None
    for txid in ids:
        if txid != last:
            yield txid
            last = txid


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
    closed, reopened_ids = open_after(written)
    for start in range(0, len(closed), _CHUNK):
        chunk = closed[start : start + _CHUNK]
        conn.execute(f"DELETE FROM txn_open WHERE txid IN ({','.join('?' * len(chunk))})", chunk)
    reopened = [(txid,) for txid in reopened_ids]
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


__all__ = ["SQLiteStore", "check_transition"]
