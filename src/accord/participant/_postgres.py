"""The barrier on PostgreSQL (asyncpg).

Each call takes a connection from the pool and runs one READ COMMITTED
transaction (set explicitly, whatever the server's default):

* the call's own row is inserted first with ``ON CONFLICT DO NOTHING``: a
  concurrent duplicate waits on the primary key until the first transaction
  ends, then either finds its committed row (and answers from it) or, if that
  transaction rolled back, inserts its own and runs the handler itself;
* a confirm or cancel locks the try row with ``SELECT ... FOR UPDATE`` before
  reading the rival row; they queue on that lock, and whichever goes second
  starts a new statement after the first committed, so it sees the first's
  row (READ COMMITTED takes a fresh snapshot per statement) and is rejected;
* a cancel that finds no try inserts a ``blocked`` try row, again with
  ``ON CONFLICT DO NOTHING``: if a try was mid-flight it waits for it, and if
  the try committed, decides again with the try row locked.

READ COMMITTED is what makes this work: under REPEATABLE READ the statements
after a wait would still see the old snapshot (and ``ON CONFLICT`` against a
row committed after it raises a serialization error).

asyncpg ships no type information, so connections and pools are ``Any`` here.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

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

PostgresHandler = Callable[[Any], Any]
"""``handler(conn)``: an ``asyncpg.Connection`` in; a result or an awaitable of one out."""


class _Rollback(Exception):
    """Carries an answer out of the transaction block, rolling it back."""

    def __init__(self, result: BarrierResult) -> None:
        super().__init__(result.error)
        self.result = result


class PostgresBarrier:
    """The barrier in a PostgreSQL table, in the service's own database.

    ``pool`` is an ``asyncpg.Pool`` (the caller owns it); its size bounds the
    calls in progress. ``table`` may be schema-qualified (``"shop.accord_barrier"``).
    ``handler(conn)`` may be a coroutine function; it gets the connection
    with the transaction open and must neither commit nor roll back.
    """

    def __init__(
        self,
        pool: Any,
        *,
        table: str = "accord_barrier",
        min_retention_s: float = DEFAULT_MIN_RETENTION_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pool = pool
        self._table_name = table
        self._table = check_table(table)
        self.min_retention_s = check_min_retention(min_retention_s)
        self._clock = clock

    @property
    def async_handlers(self) -> bool:
        return True

    async def migrate(self) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self._table)
            await conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {self._table} (
                    txid TEXT NOT NULL,
                    branch TEXT NOT NULL,
                    op TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    result JSON,
                    error TEXT NOT NULL DEFAULT '',
                    created_at_ms BIGINT NOT NULL,
                    PRIMARY KEY (txid, branch, op)
                )"""
            )
            await conn.execute(
                f"CREATE INDEX IF NOT EXISTS {index_name(self._table_name)}"
                f" ON {self._table} (created_at_ms)"
            )

    async def run(
        self, txid: str, branch: str, op: Op | str, handler: PostgresHandler
    ) -> BarrierResult:
        """Run ``handler`` at most once for ``(txid, branch, op)``; see :class:`Barrier`."""
        checked = check_key(txid, branch, op)
        now_ms = int(self._clock() * 1000)
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction(isolation="read_committed"):
                    return await self._apply(conn, txid, branch, checked, handler, now_ms)
            except _Rollback as rollback:
                return rollback.result

    async def cleanup(self, older_than_s: float) -> int:
        """Delete rows created more than ``older_than_s`` ago (at least
        ``min_retention_s``); returns how many were deleted."""
        check_retention(older_than_s, self.min_retention_s)
        cutoff_ms = int((self._clock() - older_than_s) * 1000)
        deleted = 0
        async with self._pool.acquire() as conn:
            while True:
                status = await conn.execute(
                    f"DELETE FROM {self._table} WHERE ctid IN"
                    f" (SELECT ctid FROM {self._table} WHERE created_at_ms < $1 LIMIT $2)",
                    cutoff_ms,
                    CLEANUP_BATCH_ROWS,
                )
                count = int(status.split()[-1])
                deleted += count
                if count < CLEANUP_BATCH_ROWS:
                    return deleted

    async def _apply(
        self, conn: Any, txid: str, branch: str, op: Op, handler: PostgresHandler, now_ms: int
    ) -> BarrierResult:
        """One call inside the open transaction; raises _Rollback to answer without commit."""
        # A row can vanish between the conflict and the read only through
        # cleanup; one more round settles it.
        for _ in range(2):
            if await self._insert(conn, txid, branch, op, Kind.PENDING, "", now_ms):
                break
            own = await self._select(conn, txid, branch, op)
            if own is not None:
                raise _Rollback(answer(own, duplicate=True))
        else:
            raise BarrierError(f"barrier row ({txid}, {branch}, {op}) keeps vanishing")

        forward_op = FORWARD.get(op)
        if forward_op is not None:
            step, reason = await self._decide(conn, txid, branch, op, forward_op)
            if step is Step.NULL_AND_BLOCK:
                error = blocked_error(forward_op, op)
                if not await self._insert(
                    conn, txid, branch, forward_op, Kind.BLOCKED, error, now_ms
                ):
                    # The forward operation committed while we looked: it is
                    # now visible and locked by the second decision.
                    step, reason = await self._decide(conn, txid, branch, op, forward_op)
                    if step is Step.NULL_AND_BLOCK:
                        raise BarrierError(f"barrier row ({txid}, {branch}, {forward_op}) vanished")
            if step is Step.REJECT:
                raise _Rollback(BarrierResult(Outcome.REJECTED, error=reason))
            if step is not Step.RUN:
                await self._finish(conn, txid, branch, op, Kind.NULL, None, "")
                return BarrierResult(Outcome.OK)

        try:
            async with conn.transaction():  # a savepoint: a refusal undoes only the handler
                value = handler(conn)
                if inspect.isawaitable(value):
                    value = await value
                if not conn.is_in_transaction():
                    raise BarrierError("the handler ended the local transaction; it must not")
                text = encode_result(value)
        except Refusal as exc:
            message = refusal_message(exc)
            if forward_op is not None:
                # See SQLiteBarrier: a refused phase-2 operation is not recorded.
                raise _Rollback(BarrierResult(Outcome.REFUSED, error=message)) from None
            await self._finish(conn, txid, branch, op, Kind.REFUSED, None, message)
            return BarrierResult(Outcome.REFUSED, error=message)
        await self._finish(conn, txid, branch, op, Kind.APPLIED, text, "")
        return BarrierResult(Outcome.OK, decode_result(text))

    async def _decide(
        self, conn: Any, txid: str, branch: str, op: Op, forward_op: Op
    ) -> tuple[Step, str]:
        forward = await self._select(conn, txid, branch, forward_op, lock=True)
        rival_op = RIVAL.get(op)
        rival = None if rival_op is None else await self._select(conn, txid, branch, rival_op)
        return decide(op, forward, rival)

    async def _insert(
        self, conn: Any, txid: str, branch: str, op: Op, kind: Kind, error: str, now_ms: int
    ) -> bool:
        inserted = await conn.fetchval(
            f"INSERT INTO {self._table} (txid, branch, op, kind, result, error, created_at_ms)"
            " VALUES ($1, $2, $3, $4, NULL, $5, $6) ON CONFLICT DO NOTHING RETURNING true",
            txid,
            branch,
            op.value,
            kind.value,
            error,
            now_ms,
        )
        return inserted is True

    async def _select(
        self, conn: Any, txid: str, branch: str, op: Op, *, lock: bool = False
    ) -> Row | None:
        found = await conn.fetchrow(
            f"SELECT kind, result, error FROM {self._table}"
            " WHERE txid = $1 AND branch = $2 AND op = $3" + (" FOR UPDATE" if lock else ""),
            txid,
            branch,
            op.value,
        )
        if found is None:
            return None
        try:
            return Row(Kind(found["kind"]), found["result"], found["error"])
        except ValueError:
            raise BarrierError(f"unknown barrier row kind {found['kind']!r}") from None

    async def _finish(
        self,
        conn: Any,
        txid: str,
        branch: str,
        op: Op,
        kind: Kind,
        result: str | None,
        error: str,
    ) -> None:
        status = await conn.execute(
            f"UPDATE {self._table} SET kind = $4, result = $5, error = $6"
            " WHERE txid = $1 AND branch = $2 AND op = $3 AND kind = 'pending'",
            txid,
            branch,
            op.value,
            kind.value,
            result,
            error,
        )
        if status != "UPDATE 1":
            raise BarrierError(f"barrier row ({txid}, {branch}, {op}) is no longer pending")
