"""The shared log: PostgreSQL (asyncpg), append-only, group-committed.

Schema (version 1), in its own PostgreSQL schema (``accord`` by default)::

    meta(key PRIMARY KEY, value)                   -- schema_version
    log(seq BIGSERIAL PRIMARY KEY, txid, kind, at_ms, body BYTEA)
        index log_txid(txid); unique index on txid where kind = 'begin'
    txn_open(txid PRIMARY KEY)                     -- transactions not yet terminal

The same log as :mod:`accord.log.sqlite`, with the same checks: every record is
checked in ``append`` (synchronously, no I/O) against the in-memory table of
open transactions (:class:`accord.log._rows.OpenTransactions`) and again when
read back (by folding with the same codecs).

Group commit: ``append`` queues a row and, if nothing is being written,
schedules a flush for the next loop turn. A flush is one task that writes its
whole batch in ONE PostgreSQL transaction -- one ``INSERT ... SELECT FROM
unnest(...)`` for the log rows, one each for ``txn_open`` inserts and deletes
-- and then resolves the batch's :class:`~accord._completion.Completion` (on
the loop, callbacks run synchronously). While a flush is in flight new appends
accumulate for the next one; at most one flush is in flight, so batches commit
in append order and "B is durable" implies "everything before B is durable".

A ``Begin`` whose id is already in the log (from an earlier run or batch)
fails the unique index: the batch's savepoint is rolled back, the ids of the
batch that already have a Begin are read, and the batch is written again
without the refused Begins (and without the records appended after them, which
belong to the duplicate). Those ids are reported in the result of the batch's
completion, as with SQLite.

Failures: connection errors (and serialization failures or deadlocks) during a
flush are retried with capped exponential backoff (``retries`` attempts, a new
connection from the pool each time). If the batch still cannot be written --
or fails with any other error -- its completion (and that of the batch
accumulating behind it) fails with :class:`StoreError` and the store refuses
every later ``append`` and ``sync`` with StoreError, like the SQLite writer's
permanent failure: a coordinator cannot carry on without its log; restart it.

If the connection drops while COMMIT is in flight, PostgreSQL may have
committed the batch without the client knowing. Each batch therefore notes its
PostgreSQL transaction id (``txid_current()``, one extra round trip per batch)
and, before writing again, asks ``txid_status()`` on a new connection: a batch
that did commit is not written twice. After a server crash an xid that never
reached durable WAL can be handed out again and report another transaction's
commit, so "committed" also needs one of the batch's own rows in the log.

Cluster mode (``fence=...``, see :mod:`accord.cluster`): several coordinators
share the schema, each owning some of its shards through leases in
``shard_lease(shard, owner, token, expires_at)``. Every row carries its shard,
the fencing token its writer held when the record was appended, and the
writer's node id (columns ``shard``, ``token``, ``node`` of ``log``; ``shard``
of ``txn_open``). ``append`` refuses (:class:`~accord.log.base.Fenced`) a
record its node may not write now. Each batch locks the lease rows of its
shards (``FOR SHARE``, in shard order) and writes only the rows whose token
is still the shard's current one; a takeover updates that row, so it waits
for (or skips) a batch in flight, and a stale writer can never commit after
the new owner took over. Refused rows are reported to the fence
(``Fence.fenced``) before the batch's waiters resume. A store opened without
a fence on a cluster's schema reads but never writes.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Collection, Iterable, Sequence
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]

from accord._completion import Completion
from accord.core.records import LogRecord, TxnSnapshot, TxnStatus
from accord.errors import SchemaVersionError, StoreError
from accord.log._rows import (
    FOLD_CHUNK,
    Note,
    OpenTransactions,
    Reopen,
    count,
    filter_batch,
    fold_readable,
    fold_records,
    fold_rows,
    matches,
    open_after,
    record,
    with_rejected,
)
from accord.log.base import (
    PURGEABLE,
    SCHEMA_VERSION,
    Fenced,
    Store,
    StoreStats,
    TxnRow,
    check_purge,
)

log = logging.getLogger("accord.log")

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE {s}.log (
            seq BIGSERIAL PRIMARY KEY,
            txid TEXT NOT NULL,
            kind TEXT NOT NULL,
            at_ms BIGINT NOT NULL,
            body BYTEA NOT NULL
        )""",
        "CREATE INDEX log_txid ON {s}.log(txid)",
        "CREATE UNIQUE INDEX log_one_begin ON {s}.log(txid) WHERE kind = 'begin'",
        "CREATE TABLE {s}.txn_open (txid TEXT PRIMARY KEY)",
    ],
}

# The cluster's columns: nullable, so older builds (and the single-coordinator
# store) ignore them and the log's schema version stays 1. Added once per
# schema, noted in meta as 'shard_columns'.
_SHARD_COLUMNS = [
    "ALTER TABLE {s}.log ADD COLUMN IF NOT EXISTS shard INT,"
    " ADD COLUMN IF NOT EXISTS token BIGINT, ADD COLUMN IF NOT EXISTS node TEXT",
    "ALTER TABLE {s}.txn_open ADD COLUMN IF NOT EXISTS shard INT",
    "CREATE INDEX IF NOT EXISTS txn_open_shard ON {s}.txn_open(shard)",
]

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Errors worth retrying the batch for: the connection (or the server) went
# away, or the transaction lost a race it can win next time.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # What asyncpg raises when the server closed an idle connection under it.
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,  # the server restarted (-m immediate)
    # A writer paused inside a transaction was cut off (see idle_in_transaction).
    asyncpg.IdleInTransactionSessionTimeoutError,
)

# ... and, while a commit is in doubt, failing to find out how it ended.
_RETRYABLE: tuple[type[BaseException], ...] = (*_TRANSIENT, StoreError)

_ROWS = "txid, kind, at_ms, body"

# What writing a batch found: ids whose Begin was refused as duplicates,
# violations of notes on unknown transactions, rows refused by the fence.
_BatchResult = tuple[set[str], list[str], list[tuple[Any, ...]]]


class Fence(Protocol):
    """What a cluster node tells its store: which shard a transaction is in,
    which token its records carry, and which records the database refused."""

    node: str

    def shard_of(self, txid: str) -> int:
        """The transaction's shard."""

    def stamp(self, txid: str) -> tuple[int, int] | None:
        """(shard, fencing token) to write a record of ``txid`` with, or None
        if this node may not write for it now."""

    def fenced(self, stale: set[tuple[int, int]], txids: frozenset[str]) -> None:
        """Rows of ``txids`` stamped with these (shard, token) pairs were not
        written: the shard's token has moved on. Called on the loop, before
        the batch's waiters resume."""


class PostgresStore(Store):
    """The log in PostgreSQL; see the module docstring for the design."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "accord",
        pool_size: int = 4,
        retries: int = 5,
        max_backoff_s: float = 2.0,
        fence: Fence | None = None,
        idle_in_transaction_timeout_s: float | None = None,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"schema must be a plain SQL identifier, got {schema!r}")
        if pool_size < 1 or retries < 1:
            raise ValueError("pool_size and retries must be at least 1")
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self.retries = retries
        self.max_backoff_s = max_backoff_s
        self.violations = []
        self._txns = OpenTransactions(self.violations)
        self._pool: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buf: list[tuple[Any, ...]] = []
        self._done: Completion[Any] | None = None  # of the batch accumulating in _buf
        self._inflight: Completion[Any] | None = None  # of the batch being written
        self._task: asyncio.Task[None] | None = None
        self._scheduled = False
        self._failed: BaseException | None = None
        self._closed = True
        self._batches = 0
        self._records = 0
        self._commit_seconds = 0.0
        self._fence = fence
        # A writer paused inside a batch (SIGSTOP, a partition) holds its
        # lease rows' share locks: past this, PostgreSQL ends its session.
        name = f"accord-log:{schema}" if fence is None else f"accord-log:{schema}:{fence.node}"
        self._settings = {"application_name": name[:63]}
        if idle_in_transaction_timeout_s is not None:
            ms = max(int(idle_in_transaction_timeout_s * 1000), 1)
            self._settings["idle_in_transaction_session_timeout"] = str(ms)
        # Why appends are refused (a cluster's schema opened without a fence).
        self._refuse: str | None = None
        self.cluster_shards: int | None = None  # set on open if the schema is a cluster's
        self.fenced_records = 0  # rows the database refused for a stale token
        s = schema
        self._insert_log = (
            f"INSERT INTO {s}.log({_ROWS})"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[])"
        )
        self._insert_open = f"INSERT INTO {s}.txn_open(txid) SELECT unnest($1::text[])"
        self._reopen = (
            f"INSERT INTO {s}.txn_open(txid) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING"
        )
        self._close_open = f"DELETE FROM {s}.txn_open WHERE txid = ANY($1::text[])"
        # The common batch in one round trip: its records, the transactions it
        # opens and closes, and the PostgreSQL transaction id (for a COMMIT
        # left in doubt). The sub-statements see one snapshot, so no id may be
        # both opened and closed by it (see _write_fast).
        self._write_all = (
            f"WITH l AS (INSERT INTO {s}.log({_ROWS})"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[])),"
            f" o AS (INSERT INTO {s}.txn_open(txid) SELECT unnest($5::text[])),"
            f" c AS (DELETE FROM {s}.txn_open WHERE txid = ANY($6::text[]))"
            " SELECT txid_current()"
        )
        self._logged = f"SELECT txid FROM {s}.log WHERE kind = 'begin' AND txid = ANY($1::text[])"
        # Cluster mode.
        self._insert_log_fenced = (
            f"INSERT INTO {s}.log({_ROWS}, shard, token, node) SELECT *, $7::text FROM"
            " unnest($1::text[], $2::text[], $3::bigint[], $4::bytea[], $5::int[], $6::bigint[])"
        )
        self._insert_open_fenced = (
            f"INSERT INTO {s}.txn_open(txid, shard) SELECT * FROM unnest($1::text[], $2::int[])"
        )
        self._reopen_fenced = f"{self._insert_open_fenced} ON CONFLICT DO NOTHING"
        self._lock_leases = (
            f"SELECT shard, token FROM {s}.shard_lease WHERE shard = ANY($1::int[])"
            " ORDER BY shard FOR SHARE"
        )
        self._take_inbox = f"DELETE FROM {s}.inbox WHERE txid = ANY($1::text[])"
        # Finished transactions counted by the status of their last End: not
        # open (txn_open: an operator's retry puts a parked one back) and with
        # no later End or operator's record (a resolve ends a parked
        # transaction with no End of its own).
        self._ended_counts = (
            f"SELECT convert_from(body, 'UTF8')::jsonb ->> 'status', count(*) FROM {s}.log e"
            f" WHERE kind = 'end' AND NOT EXISTS (SELECT 1 FROM {s}.log l WHERE l.txid = e.txid"
            " AND l.kind IN ('end', 'operator') AND l.seq > e.seq)"
            f" AND txid NOT IN (SELECT txid FROM {s}.txn_open) GROUP BY 1"
        )
        # Finished transactions an operator had the last word on: folded to know.
        self._operated = (
            f"SELECT DISTINCT txid FROM {s}.log o WHERE kind = 'operator' AND txid > $1"
            f" AND NOT EXISTS (SELECT 1 FROM {s}.log l WHERE l.txid = o.txid AND l.kind = 'end'"
            f" AND l.seq > o.seq) AND txid NOT IN (SELECT txid FROM {s}.txn_open) ORDER BY txid"
        )
        # A page ($2) of the ids after $1 of the transactions that may have
        # terminal status $3: those with an End of that status, merged with
        # those an operator had the last word on ($4, read once per listing),
        # each side limited before the merge, all in the database's order.
        self._terminal_candidates = (
            f"(SELECT DISTINCT txid FROM {s}.log WHERE kind = 'end' AND txid > $1"
            " AND convert_from(body, 'UTF8')::jsonb ->> 'status' = $3 ORDER BY txid LIMIT $2)"
            " UNION (SELECT t FROM unnest($4::text[]) AS t WHERE t > $1 ORDER BY t LIMIT $2)"
            " ORDER BY 1 LIMIT $2"
        )
        self._open_ids_after = f"SELECT txid FROM {s}.txn_open WHERE txid > $1 ORDER BY txid"
        # Transactions not open whose last record is older than $2, after $1,
        # a page ($3) at a time: the candidates of a purge.
        self._purge_candidates = (
            f"SELECT txid FROM {s}.log WHERE txid > $1"
            f" AND txid NOT IN (SELECT txid FROM {s}.txn_open)"
            " GROUP BY txid HAVING max(at_ms) < $2 ORDER BY txid LIMIT $3"
        )
        self._records_of = (
            f"SELECT {_ROWS} FROM {s}.log WHERE txid = ANY($1::text[]) ORDER BY txid, seq"
        )

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=10,
                # application_name shows whose connections these are in pg_stat_activity.
                server_settings=self._settings,
            )
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to the log at {self.schema}: {exc}") from exc
        try:
            await self._migrate()
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        # If the log cannot be read back (StoreError naming the transaction),
        # the store stays open for reads (to inspect it) but refuses appends.
        # A cluster node adopts the open transactions of a shard when it
        # acquires the shard (load_active(shards=...), then adopt); a store
        # that only reads a cluster's log needs neither.
        if self._fence is None and self._refuse is None:
            for snap in await self.load_active():
                self._txns.open[snap.txid] = (snap.status, snap.decision)
        if self._refuse is None:
            await self.load_parked()
        self._loop = asyncio.get_running_loop()
        self._closed = False

    async def _migrate(self) -> None:
        s = self.schema
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # Serialise concurrent first opens of the same schema.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"accord:{s}")
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}.meta (key TEXT PRIMARY KEY, value TEXT)"
                )
                found = await conn.fetchval(
                    f"SELECT value FROM {s}.meta WHERE key = 'schema_version'"
                )
                version = int(found) if found is not None else 0
                if version > SCHEMA_VERSION:
                    raise SchemaVersionError(
                        f"schema {s}: log schema version {version} is newer than this build "
                        f"understands ({SCHEMA_VERSION}); upgrade accord"
                    )
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[v]:
                        await conn.execute(statement.format(s=s))
                await conn.execute(
                    f"INSERT INTO {s}.meta(key, value) VALUES ('schema_version', $1)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    str(SCHEMA_VERSION),
                )
                meta = dict(await conn.fetch(f"SELECT key, value FROM {s}.meta"))
                if "shard_columns" not in meta:
                    for statement in _SHARD_COLUMNS:
                        await conn.execute(statement.format(s=s))
                    await conn.execute(
                        f"INSERT INTO {s}.meta(key, value) VALUES ('shard_columns', '1')"
                    )
                if "cluster_shards" in meta:
                    self.cluster_shards = int(meta["cluster_shards"])
                    if self._fence is None:
                        self._refuse = (
                            f"schema {s} holds the log of a cluster of {self.cluster_shards}"
                            " shards: only its nodes write to it (accord cluster node)"
                        )
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise StoreError(f"schema {s}: cannot open the log: {exc}") from exc

    async def load_parked(self, shards: Collection[int] | None = None) -> None:
        """Remember the transactions parked in needs_attention (by earlier
        runs, or by other nodes), so that ``append`` can reopen them on an
        operator's retry without a read. With ``shards`` (cluster mode: the
        shards a node just acquired) only theirs. (Scans the end records of
        finished transactions, in the server.)"""
        s = self.schema
        sql = (
            f"SELECT {_ROWS} FROM {s}.log WHERE txid IN ("
            f" SELECT e.txid FROM {s}.log e WHERE e.kind = 'end'"
            "  AND position('\"needs_attention\"'::bytea IN e.body) > 0"
            f"  AND NOT EXISTS (SELECT 1 FROM {s}.txn_open o WHERE o.txid = e.txid))"
            " ORDER BY seq"
        )
        # An unreadable one is reported when it is read; not reopenable meanwhile.
        snaps = fold_readable(await self._fetch(sql))
        fence = self._fence
        if shards is not None and fence is not None:  # what it knew of them may be stale
            for txid in [t for t in self._txns.parked if fence.shard_of(t) in shards]:
                del self._txns.parked[txid]
        for snap in snaps:
            if shards is not None and (fence is None or fence.shard_of(snap.txid) not in shards):
                continue
            if snap.status is TxnStatus.NEEDS_ATTENTION:
                self._txns.parked[snap.txid] = snap.decision

    async def close(self) -> None:
        """Write what is pending (unless the store has failed), then close the pool."""
        if self._pool is None:
            return
        self._closed = True
        while self._task is not None or (self._buf and self._failed is None):
            if self._task is None:
                self._start_flush()
            task = self._task
            if task is not None:
                await asyncio.shield(task)
        pool, self._pool = self._pool, None
        await pool.close()

    # ------------------------------------------------------------ writing

    def append(self, record: LogRecord) -> None:
        if self._failed is not None:
            raise StoreError(f"log writer failed: {self._failed}") from self._failed
        if self._closed:
            raise StoreError("log writer is closed")
        fence = self._fence
        stamp = None
        if fence is not None:
            stamp = fence.stamp(record.txid)
            if stamp is None:
                raise Fenced(
                    f"not written: this node does not hold the lease of shard"
                    f" {fence.shard_of(record.txid)} (any more)",
                    txid=record.txid,
                )
        elif self._refuse is not None:
            raise StoreError(self._refuse, txid=record.txid)
        row = self._txns.admit(record, None)
        if row is None:
            return
        if stamp is not None:
            row = type(row)((*row, *stamp))  # keeps Note / Reopen
        self._buf.append(row)
        if not self._scheduled and self._task is None:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._start_flush)

    def sync(self) -> Completion[frozenset[str]] | None:
        if self._failed is not None:
            raise StoreError(f"log writer failed: {self._failed}") from self._failed
        pending: Completion[Any] | None
        if self._buf:
            if self._done is None:
                self._done = Completion()
            pending = self._done
        else:
            pending = self._inflight
        return with_rejected(pending, self._txns.rejected)

    def _start_flush(self) -> None:
        self._scheduled = False
        if self._task is not None or not self._buf or self._failed is not None:
            return
        batch, self._buf = self._buf, []
        done, self._done = self._done, None
        if done is None:
            done = Completion()
        assert self._loop is not None
        self._inflight = done
        self._task = self._loop.create_task(self._flush(batch, done), name="accord-pg-flush")

    async def _flush(self, batch: builtins.list[tuple[Any, ...]], done: Completion[Any]) -> None:
        started = time.perf_counter()
        try:
            rejected, violations, stale = await self._commit_with_retries(batch)
        except BaseException as exc:  # reported to every waiter
            if not isinstance(exc, asyncio.CancelledError):
                log.error("accord-pg-flush: giving up: %s", exc)
            self._failed = exc
            err = exc if isinstance(exc, StoreError) else StoreError(f"log write failed: {exc}")
            self._task = self._inflight = None
            waiting, self._done = self._done, None
            done.set_exception(err)
            if waiting is not None:
                waiting.set_exception(err)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._commit_seconds += time.perf_counter() - started
        self._batches += 1
        self._records += len(batch)
        self.violations.extend(violations)
        if rejected:
            # A Begin refused by the database was let into the open table by
            # append; that entry is the duplicate's. Records of it appended
            # since (waiting in the next batch) are the duplicate's too.
            for txid in rejected:
                self._txns.open.pop(txid, None)
            kept = []
            for r in self._buf:
                if r[0] in rejected:
                    self.violations.append(f"{r[0]}: {r[1]} record of a refused duplicate Begin")
                else:
                    kept.append(r)
            self._buf = kept
        self._task = self._inflight = None
        if stale:
            self._report_fenced(stale)
        done.set_result(frozenset(rejected))
        if self._buf and not self._scheduled and self._failed is None:
            self._scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._start_flush)

    async def _verdict(self, xid: int, probe: tuple[Any, ...] | None) -> str | None:
        """How the transaction ``xid`` of an interrupted batch ended: committed,
        aborted, in progress (or None if PostgreSQL no longer knows).

        ``txid_status`` alone is not enough after a server crash: an xid that
        never reached durable WAL may be handed out again, and then reports the
        status of another transaction. So "committed" must also be seen in the
        log: ``probe``, a row the attempt wrote, must be there."""
        txid, kind, at_ms, body = probe[:4] if probe is not None else ("", "", 0, b"")
        rows = await self._fetch(
            f"SELECT txid_status($1::bigint), EXISTS (SELECT 1 FROM {self.schema}.log"
            " WHERE txid = $2 AND kind = $3 AND at_ms = $4 AND body = $5)",
            xid,
            txid,
            kind,
            at_ms,
            body,
        )
        verdict, seen = rows[0] if rows else (None, False)
        if verdict == "committed" and probe is not None and not seen:
            log.warning("accord-pg-flush: xid %d was reused after a crash: not ours", xid)
            return "aborted"
        return verdict

    def _report_fenced(self, stale: builtins.list[tuple[Any, ...]]) -> None:
        """Tell the fence which rows the database refused (before any waiter
        of the batch carries on, so that their runs are stopped first)."""
        self.fenced_records += len(stale)
        txids = frozenset(r[0] for r in stale)
        log.warning("accord-pg-flush: %d records of %d transactions fenced", len(stale), len(txids))
        if self._fence is None:
            return
        try:
            self._fence.fenced({(r[4], r[5]) for r in stale}, txids)
        except Exception:  # the batch's other waiters must still resume
            log.exception("fence callback failed")

    async def _commit_with_retries(self, batch: builtins.list[tuple[Any, ...]]) -> _BatchResult:
        delay = 0.05
        # (PostgreSQL transaction id, result) of an attempt whose COMMIT was
        # sent but not acknowledged: it may have committed.
        doubt: tuple[int, _BatchResult] | None = None
        collided = False  # the one-statement write met a duplicate Begin
        for attempt in range(self.retries):
            try:
                if doubt is not None:
                    verdict = await self._verdict(doubt[0], _probe(batch, doubt[1]))
                    if verdict == "committed":
                        log.warning("accord-pg-flush: the interrupted commit did succeed")
                        return doubt[1]
                    if verdict == "in progress":  # its backend has not noticed yet
                        raise ConnectionError("the interrupted transaction is still in progress")
                    doubt = None  # aborted (or unknown): write the batch again
                pool = self._pool  # terminate() may drop it meanwhile
                conn = await pool.acquire()
                state: dict[str, Any] = {}
                try:
                    async with conn.transaction():
                        fast = None if collided else await self._write_fast(conn, batch)
                        if fast is not None:
                            state["xid"], result = fast
                        else:
                            result = await self._write_batch(conn, batch)
                            state["xid"] = await conn.fetchval("SELECT txid_current()")
                        state["result"] = result
                    return result
                except asyncpg.UniqueViolationError:
                    if collided:
                        raise
                    # A Begin of the batch reuses a logged id: the transaction
                    # is rolled back; write the batch again, the careful way.
                    collided = True
                    continue
                except _TRANSIENT:
                    # Noted first: the COMMIT may have gone through.
                    if "result" in state:
                        doubt = (state["xid"], state["result"])
                    _terminate(conn)  # broken or in doubt: the pool opens a new one
                    raise
                finally:
                    # After a COMMIT that went through, failing to reset the
                    # connection for reuse must not make the batch look unwritten.
                    await _release(pool, conn)
            except _RETRYABLE as exc:
                if isinstance(exc, StoreError) and doubt is None:
                    raise
                log.warning("accord-pg-flush: commit failed (attempt %d): %s", attempt + 1, exc)
                if attempt == self.retries - 1:
                    raise StoreError(f"commit failed after {self.retries} attempts: {exc}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 4, self.max_backoff_s)
            except asyncpg.PostgresError as exc:
                raise StoreError(f"log write failed: {exc}") from exc
        raise AssertionError("unreachable")

    async def _write_fast(
        self, conn: Any, rows: builtins.list[tuple[Any, ...]]
    ) -> tuple[int, _BatchResult] | None:
        """The batch in one statement, inside the batch's transaction:
        (PostgreSQL transaction id, result), or None if the batch needs
        :meth:`_write_batch` (a cluster's, or one with operator notes or
        reopenings). A Begin whose id is logged already fails the statement
        with a unique violation (the caller then writes the batch again
        with :meth:`_write_batch`, which finds and refuses it)."""
        if self._fence is not None:
            return None
        begins: builtins.list[str] = []
        for r in rows:
            if type(r) is Note or type(r) is Reopen:
                return None
            if r[1] == "begin":
                begins.append(r[0])
        closed, _ = open_after(rows)
        if begins and closed:
            both = set(begins).intersection(closed)
            if both:  # opened and closed in one batch: neither
                begins = [t for t in begins if t not in both]
                closed = [t for t in closed if t not in both]
        xid = await conn.fetchval(
            self._write_all,
            *_columns(rows, 4),
            begins,
            closed,
        )
        return xid, (set(), [], [])

    async def _write_batch(self, conn: Any, rows: builtins.list[tuple[Any, ...]]) -> _BatchResult:
        """Runs inside the batch's transaction. Returns (ids whose Begin was
        refused because they exist already, violations of unknown notes, rows
        refused by the fence)."""
        stale: builtins.list[tuple[Any, ...]] = []
        if self._fence is not None:
            rows, stale = await self._check_fence(conn, rows)
        notes = {r[0] for r in rows if type(r) is Note}
        logged: set[str] = set()
        if notes:
            logged = {r[0] for r in await conn.fetch(self._logged, list(notes))}
        written, rejected, violations = filter_batch(rows, logged)
        for _ in range(3):
            try:
                async with conn.transaction():  # a savepoint
                    await self._insert(conn, written)
                break
            except asyncpg.UniqueViolationError:
                # Some Begin reuses an id: find which, write the rest.
                ids = list({r[0] for r in rows if r[1] == "begin"} | notes)
                logged = {r[0] for r in await conn.fetch(self._logged, ids)}
                written, rejected, violations = filter_batch(rows, logged)
        else:
            raise StoreError("log write failed: Begins kept colliding with concurrent writers")
        closed, reopened = open_after(written)
        if closed:
            await conn.execute(self._close_open, closed)
        if reopened:
            if self._fence is None:
                await conn.execute(self._reopen, reopened)
            else:
                shard = {r[0]: r[4] for r in written}
                await conn.execute(self._reopen_fenced, reopened, [shard[t] for t in reopened])
        if self._fence is not None:
            # A submission waiting in the cluster's inbox is taken once its
            # Begin is in the log (or refused because the id is there already).
            taken = [r[0] for r in written if r[1] == "begin"] + builtins.list(rejected)
            if taken:
                await conn.execute(self._take_inbox, taken)
        return rejected, violations, stale

    async def _check_fence(
        self, conn: Any, rows: builtins.list[tuple[Any, ...]]
    ) -> tuple[builtins.list[tuple[Any, ...]], builtins.list[tuple[Any, ...]]]:
        """(rows to write, rows refused): a row is written only if its token
        is its shard's current one. The lease rows stay share-locked until the
        batch commits, so no takeover can commit in between."""
        shards = sorted({r[4] for r in rows})
        current = dict(await conn.fetch(self._lock_leases, shards))
        kept: builtins.list[tuple[Any, ...]] = []
        stale: builtins.list[tuple[Any, ...]] = []
        for r in rows:
            (kept if current.get(r[4]) == r[5] else stale).append(r)
        return kept, stale

    async def _insert(self, conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        if self._fence is not None:
            await self._insert_fenced(conn, rows)
            return
        await conn.execute(
            self._insert_log,
            *_columns(rows, 4),
        )
        begins = [r[0] for r in rows if r[1] == "begin"]
        if begins:
            await conn.execute(self._insert_open, begins)

    async def _insert_fenced(self, conn: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        assert self._fence is not None
        await conn.execute(
            self._insert_log_fenced,
            *_columns(rows, 6),
            self._fence.node,
        )
        begins = [r for r in rows if r[1] == "begin"]
        if begins:
            await conn.execute(
                self._insert_open_fenced, [r[0] for r in begins], [r[4] for r in begins]
            )

    @property
    def failed(self) -> BaseException | None:
        """Why the writer gave up for good (None while it works)."""
        return self._failed

    def terminate(self) -> None:
        """Stop at once, as a killed process would: nothing pending is
        written, every waiter fails, the connections are cut."""
        self._closed = True
        gone = StoreError("the log writer was terminated")
        if self._failed is None:
            self._failed = gone
        if self._task is not None:
            self._task.cancel()
        waiting, self._done = self._done, None
        if waiting is not None:
            waiting.set_exception(gone)
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    def stats(self) -> StoreStats:
        return StoreStats(
            records=self._records, batches=self._batches, commit_seconds=self._commit_seconds
        )

    # ------------------------------------------------------------ reading

    async def _fetch(self, sql: str, *params: Any) -> builtins.list[Any]:
        if self._pool is None:
            raise StoreError("log is closed")
        for attempt in (1, 2):  # once more on a new connection if the first broke
            try:
                async with self._pool.acquire() as conn:
                    try:
                        return await conn.fetch(sql, *params)  # type: ignore[no-any-return]
                    except _TRANSIENT:
                        _terminate(conn)
                        raise
            except _TRANSIENT as exc:
                if attempt == 1:
                    continue
                raise StoreError(f"schema {self.schema}: cannot read the log: {exc}") from exc
            except asyncpg.PostgresError as exc:
                raise StoreError(f"schema {self.schema}: cannot read the log: {exc}") from exc
        raise AssertionError("unreachable")

    async def _scan(self, sql: str, *params: Any) -> AsyncGenerator[TxnSnapshot, None]:
        """Fold rows ordered by txid (a server-side cursor), one snapshot at a time."""
        if self._pool is None:
            raise StoreError("log is closed")
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                current: str | None = None
                records: builtins.list[LogRecord] = []
                async for txid, kind, at_ms, body in conn.cursor(sql, *params, prefetch=500):
                    if txid != current:
                        if records:
                            yield fold_records(current or "", records)
                        current, records = txid, []
                    records.append(record(txid, kind, at_ms, body))
                if records:
                    yield fold_records(current or "", records)
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise StoreError(f"schema {self.schema}: cannot read the log: {exc}") from exc

    async def load_active(
        self, shards: Collection[int] | None = None
    ) -> builtins.list[TxnSnapshot]:
        """Every transaction not yet terminal; with ``shards``, only those of
        these shards (a cluster's log)."""
        s = self.schema
        sql = (
            f"SELECT l.txid, l.kind, l.at_ms, l.body FROM {s}.txn_open o"
            f" JOIN {s}.log l ON l.txid = o.txid"
        )
        if shards is None:
            rows = await self._fetch(f"{sql} ORDER BY l.seq")
        else:
            rows = await self._fetch(
                f"{sql} WHERE o.shard = ANY($1::int[]) ORDER BY l.seq", sorted(shards)
            )
        # txn_open and the records must agree; if they do not, the records win.
        return [snap for snap in fold_rows(rows) if not snap.status.terminal]

    def adopt(self, snaps: Iterable[TxnSnapshot]) -> None:
        """Cluster mode: admit records of these open transactions (just read
        with ``load_active(shards=...)``); what this process knows wins."""
        for snap in snaps:
            self._txns.open.setdefault(snap.txid, (snap.status, snap.decision))

    def forget(self, shards: Collection[int]) -> None:
        """Cluster mode: these shards are no longer this node's; what it knew
        of their open and parked transactions is stale from now on."""
        fence = self._fence
        if fence is None:
            return
        for txid in [t for t in self._txns.open if fence.shard_of(t) in shards]:
            del self._txns.open[txid]
        for txid in [t for t in self._txns.parked if fence.shard_of(t) in shards]:
            del self._txns.parked[txid]

    async def _settled(self) -> None:
        """Reads see every record appended before them (read your writes),
        including the ones that need not be durable before the next action
        (a TCC commit's end). A failing writer does not block reads: they
        return what the log holds."""
        if self._loop is None or self._failed is not None:
            return
        if self._buf or self._inflight is not None:
            with contextlib.suppress(StoreError):
                await self.flush()

    async def get(self, txid: str) -> TxnSnapshot | None:
        await self._settled()
        rows = await self._fetch(
            f"SELECT {_ROWS} FROM {self.schema}.log WHERE txid = $1 ORDER BY seq", txid
        )
        snaps = fold_rows(rows)
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
        if limit <= 0:
            return []
        every = f"SELECT {_ROWS} FROM {self.schema}.log WHERE txid > $1 ORDER BY txid, seq"
        if status is None:  # every transaction: fold them in id order until the page is full
            return await self._page(self._scan(every, after_id or ""), status, limit, since_ms)
        try:  # only the candidates for that status, folded a chunk at a time
            candidates = self._fold_each(self._candidates(status, after_id or ""))
            return await self._page(candidates, status, limit, since_ms)
        except StoreError as exc:
            if exc.txid is not None:
                raise
            # A record SQL cannot read: fold every transaction, which names it.
            return await self._page(self._scan(every, after_id or ""), status, limit, since_ms)

    @staticmethod
    async def _page(
        scan: AsyncGenerator[TxnSnapshot, None],
        status: TxnStatus | None,
        limit: int,
        since_ms: int | None,
    ) -> builtins.list[TxnRow]:
        out: builtins.list[TxnRow] = []
        try:
            async for snap in scan:
                if matches(snap, status, since_ms):
                    out.append(TxnRow.of(snap))
                    if len(out) >= limit:
                        break
        finally:
            await scan.aclose()
        return out

    async def count_by_status(self) -> dict[TxnStatus, int]:
        await self._settled()
        try:
            return await self._count_fast()
        except (StoreError, ValueError):
            # A record SQL cannot read: fold everything, which names it.
            sql = f"SELECT {_ROWS} FROM {self.schema}.log ORDER BY txid, seq"
            return count([snap async for snap in self._scan(sql)])

    async def _count_fast(self) -> dict[TxnStatus, int]:
        """Finished transactions counted by SQL, the others folded, all in
        one read-only snapshot of the log."""
        if self._pool is None:
            raise StoreError("log is closed")
        try:
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                ended = await conn.fetch(self._ended_counts)
                folded = [r[0] for r in await conn.fetch(self._operated, "")]
                folded += [r[0] for r in await conn.fetch(self._open_ids_after, "")]
                rows = []
                for first in range(0, len(folded), FOLD_CHUNK):
                    chunk = folded[first : first + FOLD_CHUNK]
                    rows += await conn.fetch(self._records_of, chunk)
        except (*_TRANSIENT, asyncpg.PostgresError) as exc:
            raise StoreError(f"schema {self.schema}: cannot read the log: {exc}") from exc
        counts = count(fold_rows(rows))
        for status, n in ended:
            counts[TxnStatus(status)] = counts.get(TxnStatus(status), 0) + n
        return counts

    def _candidates(self, status: TxnStatus, after_id: str) -> AsyncGenerator[str, None]:
        """The ids, in order, of the transactions that may have ``status`` now:
        the open ones; or those with an End record of that status and those
        an operator had the last word on (folding tells which really have it)."""
        if not status.terminal:
            return self._ids(f"{self._open_ids_after} LIMIT $2", after_id)
        return self._terminal_ids(status, after_id)

    async def _terminal_ids(self, status: TxnStatus, after_id: str) -> AsyncGenerator[str, None]:
        operated = [r[0] for r in await self._fetch(self._operated, after_id)]
        async for txid in self._ids(self._terminal_candidates, after_id, status.value, operated):
            yield txid

    async def _ids(self, sql: str, after_id: str, *params: Any) -> AsyncGenerator[str, None]:
        """Run ``sql`` (taking the last id seen, a LIMIT, then ``params``) a page
        at a time, so that a short listing reads only the first pages."""
        while True:
            ids = [r[0] for r in await self._fetch(sql, after_id, FOLD_CHUNK, *params)]
            for txid in ids:
                yield txid
            if len(ids) < FOLD_CHUNK:
                return
            after_id = ids[-1]

    async def _fold_each(self, txids: AsyncIterator[str]) -> AsyncGenerator[TxnSnapshot, None]:
        """The snapshots of these transactions, in their order, read in chunks."""
        sql = self._records_of
        chunk: builtins.list[str] = []
        async for txid in txids:
            chunk.append(txid)
            if len(chunk) == FOLD_CHUNK:
                async for snap in self._scan_all(sql, chunk):
                    yield snap
                chunk = []
        if chunk:
            async for snap in self._scan_all(sql, chunk):
                yield snap

    async def _scan_all(self, sql: str, *params: Any) -> AsyncGenerator[TxnSnapshot, None]:
        scan = self._scan(sql, *params)
        try:
            async for snap in scan:
                yield snap
        finally:
            await scan.aclose()

    async def purge(self, before_ms: int) -> int:
        """See :meth:`Store.purge`: a page of candidates at a time, folded, then
        the committed and aborted ones deleted in one PostgreSQL transaction
        (a cluster's too: finished transactions are never written again)."""
        check_purge(before_ms)
        await self._settled()
        if self._pool is None:
            raise StoreError("log is closed")
        purged, after = 0, ""
        while True:
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    rows = await conn.fetch(self._purge_candidates, after, before_ms, FOLD_CHUNK)
                    ids = [r[0] for r in rows]
                    records = await conn.fetch(self._records_of, ids) if ids else []
                    gone = [
                        snap.txid
                        for snap in fold_readable(records)
                        if snap.status in PURGEABLE and snap.updated_at_ms < before_ms
                    ]
                    if gone:
                        await conn.execute(
                            f"DELETE FROM {self.schema}.log WHERE txid = ANY($1::text[])", gone
                        )
            except (*_TRANSIENT, asyncpg.PostgresError) as exc:
                raise StoreError(f"schema {self.schema}: cannot purge the log: {exc}") from exc
            purged += len(gone)
            if len(ids) < FOLD_CHUNK:
                return purged
            after = ids[-1]

    async def snapshots(self) -> builtins.list[TxnSnapshot]:
        await self._settled()
        sql = f"SELECT {_ROWS} FROM {self.schema}.log ORDER BY txid, seq"
        return [snap async for snap in self._scan(sql)]


def _probe(batch: builtins.list[tuple[Any, ...]], result: _BatchResult) -> tuple[Any, ...] | None:
    """A row the batch's attempt wrote to ``log``, a Begin if it has one (unique
    per transaction), or None if it wrote none (rows refused as duplicates, by
    the fence, or as notes on unknown transactions were not written)."""
    rejected, _, stale = result
    refused = {id(r) for r in stale}
    written = [
        r for r in batch if id(r) not in refused and r[0] not in rejected and type(r) is not Note
    ]
    begins = [r for r in written if r[1] == "begin"]
    chosen = begins or written
    return chosen[0] if chosen else None


async def _release(pool: Any, conn: Any) -> None:
    """Give a connection back to its pool; one that died meanwhile is dropped."""
    try:
        await pool.release(conn)
    except (*_TRANSIENT, asyncpg.PostgresError) as exc:
        log.debug("connection not reusable: %r", exc)


def _terminate(conn: Any) -> None:
    """Close a connection at once. When asyncpg noticed the connection's loss
    before us it has handed the connection back to its pool already, and the
    proxy refuses every call, this one included: nothing is left to close."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """The first ``width`` columns of ``rows``, one list each (for unnest)."""
    return [[r[i] for r in rows] for i in range(width)]


__all__ = ["Fence", "PostgresStore"]
