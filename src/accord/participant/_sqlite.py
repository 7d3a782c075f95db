"""The barrier on SQLite (stdlib ``sqlite3``, WAL).

Every call runs in one worker thread of a small dedicated pool, on that
thread's own connection, inside ``BEGIN IMMEDIATE``: SQLite lets one writer
at a time hold that lock, so the whole barrier sequence (look up, decide,
run the handler, record) is serialized across threads, connections and
processes sharing the file. Concurrent calls wait for the lock (up to
``busy_timeout_s``) rather than interleave, which is what makes "confirm and
cancel never both apply" hold without any row locking. Handlers are plain
functions of the ``sqlite3.Connection``; they run in the worker thread while
the lock is held, so they should be short.

With ``group_commit=True`` (which runs on the event loop's thread,
``max_workers=0``), the calls that reach the barrier during one turn of the
event loop share one local transaction: the first opens it (``BEGIN
IMMEDIATE``), each call that runs its handler does so inside its own
``SAVEPOINT`` (its refusal or exception rolls back only its own work), and
one ``COMMIT`` at the next turn makes them all durable. No call gets its answer before that
``COMMIT`` succeeded; if it fails, every call of the batch fails (the caller
answers 500, transient) and nothing of the batch is kept. A call sees the
changes of the calls before it in its batch, exactly as if they had committed
one after another, and the write lock still serializes batches across
processes, so the barrier's guarantees are those of one call per transaction.
What changes: a call's answer waits for its batch's ``COMMIT`` (one loop
turn), a failed ``COMMIT`` fails calls that would have succeeded alone, and
the write lock is held across that loop turn. So keep one grouped barrier per
database file in a process: another connection writing the same file from
the same event loop would wait (``busy_timeout_s``) for a lock that only the
loop can release.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import sqlite3
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from accord.core.machine import Outcome
from accord.core.spec import Op
from accord.participant._barrier import (
    CLEANUP_BATCH_ROWS,
    DEFAULT_MIN_RETENTION_S,
    FORWARD,
    RIVAL,
    BarrierError,
    BarrierResult,
    Kind,
    Refusal,
    Row,
    Step,
    answer,
    blocked_error,
    check_key,
    check_min_retention,
    check_retention,
    check_table,
    decide,
    decode_result,
    encode_result,
    index_name,
    refusal_message,
)

SQLiteHandler = Callable[[sqlite3.Connection], Any]

_SAVEPOINT = "accord_call"
_T = TypeVar("_T")

MAX_BATCH_CALLS = 256
"""With group commit, a batch holding this many calls commits at once."""


class _Batch:
    """The calls sharing one local transaction, and their answers-to-be."""

    __slots__ = ("broken", "calls", "done")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.calls: list[tuple[asyncio.Future[BarrierResult], BarrierResult]] = []
        self.done: asyncio.Future[None] = loop.create_future()
        # A call's work could not be rolled back: the batch must not commit.
        self.broken = False


class SQLiteBarrier:
    """The barrier in a SQLite file, next to the service's own tables.

    ``handler(conn)`` gets the connection with the transaction open and must
    neither commit nor roll back. ``synchronous="FULL"`` (the default) makes
    a commit survive power loss: the answer the coordinator receives is then
    never forgotten. ``max_workers`` bounds the threads (and connections);
    0 runs every call on the event loop's thread. ``group_commit`` (only with
    ``max_workers=0``) commits the calls of one event-loop turn together; see
    the module's docstring for what that changes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "accord_barrier",
        max_workers: int = 4,
        busy_timeout_s: float = 30.0,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        min_retention_s: float = DEFAULT_MIN_RETENTION_S,
        clock: Callable[[], float] = time.time,
        group_commit: bool = False,
    ) -> None:
        if not 0 <= max_workers <= 64:
            raise ValueError(f"max_workers must be between 0 and 64, got {max_workers}")
        if group_commit and max_workers:
            raise ValueError(
                f"group_commit runs on the event loop's thread: it needs max_workers=0,"
                f" got {max_workers}"
            )
        if not 0 < busy_timeout_s <= 3600:
            raise ValueError(f"busy_timeout_s must be in (0, 3600], got {busy_timeout_s}")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        self._path = os.fspath(path)
        self._table_name = table
        self._table = check_table(table)
        if "." in table:
            raise ValueError("a SQLite barrier table cannot be schema-qualified")
        # Built once: these run on every call.
        columns = "(txid, branch, op, kind, result, error, created_at_ms)"
        self._sql_insert = f"INSERT INTO {self._table} {columns} VALUES (?, ?, ?, ?, ?, ?, ?)"
        self._sql_insert_two = (
            f"INSERT INTO {self._table} {columns}"
            " VALUES (?, ?, ?, ?, ?, ?, ?), (?, ?, ?, ?, ?, ?, ?)"
        )
        self._sql_finish = (
            f"UPDATE {self._table} SET kind = '{Kind.APPLIED.value}', result = ?"
            " WHERE txid = ? AND branch = ? AND op = ? AND kind = 'pending'"
        )
        self._sql_rows = (
            f"SELECT op, kind, result, error FROM {self._table} WHERE txid = ? AND branch = ?"
        )
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous
        self.min_retention_s = check_min_retention(min_retention_s)
        self._clock = clock
        # 0 workers: run on the event loop's thread. Each call then blocks the
        # loop for its duration (a fraction of a millisecond with
        # synchronous=NORMAL on a local disk) but pays no thread hand-off,
        # which on a busy loop costs more than the SQLite work itself.
        self._executor = (
            ThreadPoolExecutor(max_workers, thread_name_prefix="accord-barrier")
            if max_workers
            else None
        )
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._group_commit = group_commit
        self._batch: _Batch | None = None

    @property
    def async_handlers(self) -> bool:
        return False

    async def __aenter__(self) -> SQLiteBarrier:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Wait for running calls, then close every connection."""
        if self._closed:
            return
        self._closed = True
        await self._batches_done()
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    async def migrate(self) -> None:
        await self._submit(self._migrate_sync)

    async def run(
        self, txid: str, branch: str, op: Op | str, handler: SQLiteHandler
    ) -> BarrierResult:
        """Run ``handler`` at most once for ``(txid, branch, op)``; see :class:`Barrier`."""
        checked = check_key(txid, branch, op)
        if not _plain_function(handler) and inspect.iscoroutinefunction(handler):
            raise TypeError("SQLiteBarrier handlers must be plain functions, not coroutines")
        if self._group_commit:
            if self._closed:
                raise BarrierError("the barrier is closed")
            return await self._run_in_batch(txid, branch, checked, handler)
        return await self._submit(functools.partial(self._run_sync, txid, branch, checked, handler))

    async def cleanup(self, older_than_s: float) -> int:
        """Delete rows created more than ``older_than_s`` ago (at least
        ``min_retention_s``); returns how many were deleted."""
        check_retention(older_than_s, self.min_retention_s)
        cutoff_ms = int((self._clock() - older_than_s) * 1000)
        return await self._submit(functools.partial(self._cleanup_sync, cutoff_ms))

    # ------------------------------------------------------------ worker thread

    async def _submit(self, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise BarrierError("the barrier is closed")
        if self._executor is None:
            # On the loop's thread, on the connection a batch may hold open:
            # wait for it (and run without yielding, so no batch opens before fn).
            await self._batches_done()
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _batches_done(self) -> None:
        while self._batch is not None:
            await asyncio.shield(self._batch.done)

    # ------------------------------------------------------------ group commit

    async def _run_in_batch(
        self, txid: str, branch: str, op: Op, handler: SQLiteHandler
    ) -> BarrierResult:
        conn = self._connection()
        loop = asyncio.get_running_loop()
        batch = self._batch
        if batch is None:
            if conn.in_transaction:  # left over from a COMMIT and ROLLBACK that both failed
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            batch = self._batch = _Batch(loop)
            loop.call_soon(self._commit_batch, batch)
        elif batch.broken or not conn.in_transaction:
            # An error (or a handler) ended the batch's transaction, or left
            # work in it that could not be undone: running now would run in
            # autocommit or commit with it. The batch will fail.
            raise BarrierError("the batch's local transaction failed; the call can be retried")
        result = self._apply(conn, txid, branch, op, handler, int(self._clock() * 1000), batch)
        answered: asyncio.Future[BarrierResult] = loop.create_future()
        batch.calls.append((answered, result))
        if len(batch.calls) >= MAX_BATCH_CALLS:
            self._commit_batch(batch)
        return await answered

    def _commit_batch(self, batch: _Batch) -> None:
        """Commit ``batch`` and answer its calls (once; a full batch commits early)."""
        if self._batch is not batch:
            return
        self._batch = None
        conn = self._connection()
        try:
            if not conn.in_transaction:
                raise BarrierError("the batch's local transaction ended before its COMMIT")
            if batch.broken:
                raise BarrierError("a call's work in the batch could not be rolled back")
            conn.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - every call of the batch gets the failure
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for answered, _ in batch.calls:
                if not answered.done():
                    answered.set_exception(exc)
        else:
            for answered, result in batch.calls:
                if not answered.done():
                    answered.set_result(result)
        finally:
            if not batch.done.done():
                batch.done.set_result(None)

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            with self._connections_lock:
                self._connections.append(conn)
            self._local.conn = conn
        return conn

    def _migrate_sync(self) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {self._table} (
                    txid TEXT NOT NULL,
                    branch TEXT NOT NULL,
                    op TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    result TEXT,
                    error TEXT NOT NULL DEFAULT '',
                    created_at_ms INTEGER NOT NULL,
                    PRIMARY KEY (txid, branch, op)
                )"""
            )
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS {index_name(self._table_name)}"
                f" ON {self._table} (created_at_ms)"
            )
            conn.execute("COMMIT")
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _run_sync(self, txid: str, branch: str, op: Op, handler: SQLiteHandler) -> BarrierResult:
        conn = self._connection()
        now_ms = int(self._clock() * 1000)
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = self._apply(conn, txid, branch, op, handler, now_ms)
            conn.execute("COMMIT")
            return result
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _apply(
        self,
        conn: sqlite3.Connection,
        txid: str,
        branch: str,
        op: Op,
        handler: SQLiteHandler,
        now_ms: int,
        batch: _Batch | None = None,
    ) -> BarrierResult:
        """One call inside the open transaction, which holds the write lock.

        The lock serializes calls, so the branch's rows are read in one
        statement, before anything is written. A handler runs inside savepoint
        ``accord_call`` after the call's ``pending`` claim row, which then
        takes its final kind; rows written without a handler are written in
        one statement. The call undoes its own work when it must not be kept;
        on an exception it rolls its work back before raising, and if even
        that fails, marks ``batch`` broken: its transaction must not commit.
        """
        rows = self._rows(conn, txid, branch)
        own = rows.get(op)
        if own is not None:
            return answer(own, duplicate=True)
        forward_op = FORWARD.get(op)
        if forward_op is not None:
            rival_op = RIVAL.get(op)
            rival = None if rival_op is None else rows.get(rival_op)
            step, reason = decide(op, rows.get(forward_op), rival)
            if step is Step.REJECT:
                return BarrierResult(Outcome.REJECTED, error=reason)
            if step is not Step.RUN:
                null = (txid, branch, op.value, Kind.NULL.value, None, "", now_ms)
                if step is Step.NULL_AND_BLOCK:  # both rows or neither: one statement
                    error = blocked_error(forward_op, op)
                    blocked = (txid, branch, forward_op.value, Kind.BLOCKED.value, None, error)
                    conn.execute(self._sql_insert_two, (*null, *blocked, now_ms))
                else:
                    conn.execute(self._sql_insert, null)
                return BarrierResult(Outcome.OK)

        conn.execute(f"SAVEPOINT {_SAVEPOINT}")
        try:
            # The key's claim, before the handler: a handler that commits on its
            # own commits it too, so no later delivery can run it again.
            pending = (txid, branch, op.value, Kind.PENDING.value, None, "", now_ms)
            conn.execute(self._sql_insert, pending)
            try:
                value = handler(conn)
                if inspect.isawaitable(value):
                    close = getattr(value, "close", None)
                    if close is not None:
                        close()
                    raise TypeError("SQLiteBarrier handlers must not return awaitables")
                text = encode_result(value)
            except Refusal as exc:
                _check_open(conn)
                message = refusal_message(exc)
                conn.execute(f"ROLLBACK TO {_SAVEPOINT}")
                if forward_op is None:
                    row = (txid, branch, op.value, Kind.REFUSED.value, None, message, now_ms)
                    conn.execute(self._sql_insert, row)
                # else: a refused confirm / cancel / compensate breaks the
                # participant's contract; recording it would make the refusal
                # permanent, so nothing is kept and a retry runs the handler again.
                conn.execute(f"RELEASE {_SAVEPOINT}")
                return BarrierResult(Outcome.REFUSED, error=message)
            _check_open(conn)
            self._finish(conn, txid, branch, op, text)
            conn.execute(f"RELEASE {_SAVEPOINT}")
        except BaseException:
            if not _undo(conn) and batch is not None:
                batch.broken = True  # its work is in the batch's transaction for good
            raise
        return BarrierResult(Outcome.OK, decode_result(text))

    def _finish(self, conn: sqlite3.Connection, txid: str, branch: str, op: Op, text: str) -> None:
        cursor = conn.execute(self._sql_finish, (text, txid, branch, op.value))
        if cursor.rowcount != 1:
            raise BarrierError(f"barrier row ({txid}, {branch}, {op}) is no longer pending")

    def _rows(self, conn: sqlite3.Connection, txid: str, branch: str) -> dict[Op, Row]:
        """Every row of the branch: the call's own, its forward and its rival."""
        found = {}
        for op, kind, result, error in conn.execute(self._sql_rows, (txid, branch)):
            try:
                found[Op(op)] = _row(kind, result, error)
            except ValueError:
                raise BarrierError(f"unknown barrier row op {op!r}") from None
        return found

    def _cleanup_sync(self, cutoff_ms: int) -> int:
        conn = self._connection()
        deleted = 0
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                cursor = conn.execute(
                    f"DELETE FROM {self._table} WHERE rowid IN"
                    f" (SELECT rowid FROM {self._table} WHERE created_at_ms < ? LIMIT ?)",
                    (cutoff_ms, CLEANUP_BATCH_ROWS),
                )
                conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            deleted += cursor.rowcount
            if cursor.rowcount < CLEANUP_BATCH_ROWS:
                return deleted


def _undo(conn: sqlite3.Connection) -> bool:
    """Roll a failed call's work back to its savepoint (if the transaction is
    still open); False if even that failed."""
    if not conn.in_transaction:
        return True
    try:
        conn.execute(f"ROLLBACK TO {_SAVEPOINT}")
        conn.execute(f"RELEASE {_SAVEPOINT}")
    except sqlite3.Error:
        return False
    return True


def _plain_function(fn: object) -> bool:
    """A ``def`` or ``lambda`` that is not ``async``: the common case, told
    apart without ``inspect`` (which unwraps partials and methods first)."""
    return type(fn) is types.FunctionType and not fn.__code__.co_flags & inspect.CO_COROUTINE


def _check_open(conn: sqlite3.Connection) -> None:
    if not conn.in_transaction:
        # The handler committed (or rolled back) on its own: its changes and
        # the pending claim are committed without an answer (or both undone).
        # Failing loudly beats running it again: a committed claim makes every
        # later delivery fail too.
        raise BarrierError("the handler ended the local transaction; it must not commit")


def _row(kind: str, result: str | None, error: str) -> Row:
    try:
        return Row(Kind(kind), result, error)
    except ValueError:
        raise BarrierError(f"unknown barrier row kind {kind!r}") from None
