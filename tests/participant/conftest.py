"""A small bank behind a barrier, on SQLite and on PostgreSQL.

``accounts(name, balance, held, spent)`` and an unconstrained ``ledger(txid,
branch, op)`` that every handler appends to: a handler applied twice shows as
two ledger rows, and a rolled-back handler leaves none. Handler invocations
are also counted in Python (``bank.runs``), rolled back or not.

PostgreSQL tests use ``ACCORD_TEST_PG_DSN`` (default
``postgresql://postgres@127.0.0.1/test``) and a fresh schema per test, dropped
afterwards. If the server is unreachable they are skipped, or fail when the
``CI`` environment variable is set.
"""

from __future__ import annotations

import abc
import asyncio
import os
import re
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from accord.core.spec import Op
from accord.participant import BarrierResult, PostgresBarrier, Refusal, SQLiteBarrier

# sqlite-grouped: the SQLite barrier with group commit (calls of one event-loop
# turn share a transaction), held to every rule the others are.
BACKENDS = ["sqlite", "sqlite-grouped", "postgres"]
PG_DSN = os.environ.get("ACCORD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1/test")
START_S = 1_700_000_000.0
INITIAL = {"alice": 1000, "bob": 50}

# (balance, held, spent) deltas per unit of amount.
EFFECTS = {
    Op.TRY: (-1, 1, 0),
    Op.CONFIRM: (0, -1, 1),
    Op.CANCEL: (1, -1, 0),
    Op.ACTION: (-1, 0, 1),
    Op.COMPENSATE: (1, 0, -1),
}
FORWARD_OPS = (Op.TRY, Op.ACTION)


class FakeClock:
    """A settable wall clock for the barrier's created_at."""

    def __init__(self) -> None:
        self.now_s = START_S

    def __call__(self) -> float:
        return self.now_s


@dataclass(frozen=True)
class State:
    """Everything a call can change: accounts, ledger and barrier rows."""

    accounts: dict[str, tuple[int, int, int]]
    ledger: list[tuple[str, str, str]]
    barrier: dict[tuple[str, str, str], str]


class Bank(abc.ABC):
    """The example service; ``handler`` builds a barrier handler for one call."""

    backend: str
    barrier: Any

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.runs: Counter[str] = Counter()
        self._runs_lock = threading.Lock()

    def _ran(self, op: Op) -> None:
        with self._runs_lock:
            self.runs[op.value] += 1

    @abc.abstractmethod
    def handler(
        self,
        txid: str,
        op: Op,
        *,
        branch: str = "payment",
        account: str = "alice",
        amount: int = 10,
        delay_s: float = 0.0,
        fail: BaseException | None = None,
        result: Any = None,
    ) -> Callable[[Any], Any]:
        """Apply EFFECTS[op] * amount to ``account`` and log it in the ledger;
        a forward op that overdraws raises Refusal after its update (so the
        rollback of the business change is visible); ``fail`` is raised after
        the update; ``result`` replaces the default result."""

    @abc.abstractmethod
    async def state(self) -> State: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def call(self, txid: str, op: Op, **kwargs: Any) -> BarrierResult:
        branch = kwargs.get("branch", "payment")
        return await self.barrier.run(txid, branch, op, self.handler(txid, op, **kwargs))

    async def account(self, name: str = "alice") -> tuple[int, int, int]:
        return (await self.state()).accounts[name]

    async def rows(self) -> dict[tuple[str, str, str], str]:
        return (await self.state()).barrier


def _result(op: Op, amount: int, balance: int, result: Any) -> Any:
    return {"op": op.value, "amount": amount, "balance": balance} if result is None else result


class SQLiteBank(Bank):
    backend = "sqlite"

    def __init__(self, path: Path, clock: FakeClock, *, group_commit: bool = False) -> None:
        super().__init__(clock)
        self.path = path
        self.barrier = (
            SQLiteBarrier(path, max_workers=0, group_commit=True, clock=clock)
            if group_commit
            else SQLiteBarrier(path, max_workers=8, clock=clock)
        )

    async def setup(self) -> None:
        conn = sqlite3.connect(self.path)
        with conn:
            conn.execute(
                "CREATE TABLE accounts (name TEXT PRIMARY KEY, balance INTEGER, "
                "held INTEGER, spent INTEGER)"
            )
            conn.execute("CREATE TABLE ledger (txid TEXT, branch TEXT, op TEXT)")
            conn.executemany("INSERT INTO accounts VALUES (?, ?, 0, 0)", sorted(INITIAL.items()))
        conn.close()
        await self.barrier.migrate()

    def handler(
        self,
        txid: str,
        op: Op,
        *,
        branch: str = "payment",
        account: str = "alice",
        amount: int = 10,
        delay_s: float = 0.0,
        fail: BaseException | None = None,
        result: Any = None,
    ) -> Callable[[sqlite3.Connection], Any]:
        db, dh, ds = (d * amount for d in EFFECTS[op])

        def run(conn: sqlite3.Connection) -> Any:
            self._ran(op)
            conn.execute(
                "UPDATE accounts SET balance = balance + ?, held = held + ?, spent = spent + ?"
                " WHERE name = ?",
                (db, dh, ds, account),
            )
            conn.execute("INSERT INTO ledger VALUES (?, ?, ?)", (txid, branch, op.value))
            if delay_s:
                time.sleep(delay_s)
            (balance,) = conn.execute(
                "SELECT balance FROM accounts WHERE name = ?", (account,)
            ).fetchone()
            if op in FORWARD_OPS and balance < 0:
                raise Refusal(f"insufficient funds: {account} cannot pay {amount}")
            if fail is not None:
                raise fail
            return _result(op, amount, balance, result)

        return run

    async def state(self) -> State:
        conn = sqlite3.connect(self.path)
        try:
            accounts = {
                name: (b, h, s)
                for name, b, h, s in conn.execute("SELECT name, balance, held, spent FROM accounts")
            }
            ledger = sorted(conn.execute("SELECT txid, branch, op FROM ledger"))
            barrier = {
                (t, b, o): k
                for t, b, o, k in conn.execute("SELECT txid, branch, op, kind FROM accord_barrier")
            }
        finally:
            conn.close()
        return State(accounts, ledger, barrier)

    async def close(self) -> None:
        await self.barrier.close()


def _pg(sql: str) -> str:
    """'?' placeholders to asyncpg's $1, $2, ..."""
    counter = iter(range(1, 100))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


class PostgresBank(Bank):
    backend = "postgres"

    def __init__(self, pool: Any, schema: str, clock: FakeClock) -> None:
        super().__init__(clock)
        self.pool = pool
        self.schema = schema
        self.barrier = PostgresBarrier(pool, table=f"{schema}.accord_barrier", clock=clock)

    async def setup(self) -> None:
        s = self.schema
        await self.pool.execute(
            f"CREATE TABLE {s}.accounts (name TEXT PRIMARY KEY, balance BIGINT, "
            f"held BIGINT, spent BIGINT);"
            f"CREATE TABLE {s}.ledger (txid TEXT, branch TEXT, op TEXT)"
        )
        await self.pool.executemany(
            f"INSERT INTO {s}.accounts VALUES ($1, $2, 0, 0)", sorted(INITIAL.items())
        )
        await self.barrier.migrate()

    def handler(
        self,
        txid: str,
        op: Op,
        *,
        branch: str = "payment",
        account: str = "alice",
        amount: int = 10,
        delay_s: float = 0.0,
        fail: BaseException | None = None,
        result: Any = None,
    ) -> Callable[[Any], Any]:
        db, dh, ds = (d * amount for d in EFFECTS[op])
        s = self.schema

        async def run(conn: Any) -> Any:
            self._ran(op)
            await conn.execute(
                _pg(
                    f"UPDATE {s}.accounts SET balance = balance + ?, held = held + ?,"
                    " spent = spent + ? WHERE name = ?"
                ),
                db,
                dh,
                ds,
                account,
            )
            await conn.execute(
                _pg(f"INSERT INTO {s}.ledger VALUES (?, ?, ?)"), txid, branch, op.value
            )
            if delay_s:
                await asyncio.sleep(delay_s)
            balance = await conn.fetchval(
                _pg(f"SELECT balance FROM {s}.accounts WHERE name = ?"), account
            )
            if op in FORWARD_OPS and balance < 0:
                raise Refusal(f"insufficient funds: {account} cannot pay {amount}")
            if fail is not None:
                raise fail
            return _result(op, amount, balance, result)

        return run

    async def state(self) -> State:
        s = self.schema
        accounts = {
            r["name"]: (r["balance"], r["held"], r["spent"])
            for r in await self.pool.fetch(f"SELECT name, balance, held, spent FROM {s}.accounts")
        }
        ledger = sorted(
            (r["txid"], r["branch"], r["op"])
            for r in await self.pool.fetch(f"SELECT txid, branch, op FROM {s}.ledger")
        )
        barrier = {
            (r["txid"], r["branch"], r["op"]): r["kind"]
            for r in await self.pool.fetch(f"SELECT txid, branch, op, kind FROM {s}.accord_barrier")
        }
        return State(accounts, ledger, barrier)

    async def close(self) -> None:
        return None


@asynccontextmanager
async def pg_schema(max_size: int = 10) -> AsyncIterator[tuple[Any, str]]:
    """A pool and a fresh schema, dropped on exit; skip (or fail under CI) if unreachable."""
    try:
        pool = await asyncpg.create_pool(PG_DSN, min_size=2, max_size=max_size, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = f"PostgreSQL unreachable at {PG_DSN}: {exc!r}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    schema = f"accord_participant_{uuid.uuid4().hex[:12]}"
    try:
        await pool.execute(f"CREATE SCHEMA {schema}")
        yield pool, schema
    finally:
        await pool.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pool.close()


@asynccontextmanager
async def open_bank(backend: str, tmp_path: Path) -> AsyncIterator[Bank]:
    clock = FakeClock()
    if backend in BACKENDS[:2]:
        sqlite_bank = SQLiteBank(tmp_path / "bank.db", clock, group_commit=backend == BACKENDS[1])
        try:
            await sqlite_bank.setup()
            yield sqlite_bank
        finally:
            await sqlite_bank.close()
        return
    async with pg_schema() as (pool, schema):
        pg_bank = PostgresBank(pool, schema, clock)
        await pg_bank.setup()
        yield pg_bank


@pytest.fixture(params=BACKENDS)
async def bank(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bank]:
    async with open_bank(request.param, tmp_path) as opened:
        yield opened
