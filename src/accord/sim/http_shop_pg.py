"""The HTTP shop's state in PostgreSQL: one schema per service.

``accord services --pg DSN`` keeps each service in schema ``<prefix>_<name>``
(``accord_shop_order``, ``accord_shop_inventory``, ...) with the same tables
as the SQLite files (``counters``, ``ledger``, ``meta``) plus the SDK's
barrier table ``<schema>.accord_barrier`` (:class:`PostgresBarrier`).

Handlers are the same business rules (:data:`accord.sim.services.RULES`).
A rule is a plain function reading counters through a mapping, so it is run
against values loaded beforehand: once without locks to learn which keys it
touches, then again after locking those keys (``SELECT ... FOR UPDATE``, in
key order, so concurrent calls on a hot SKU serialize and never deadlock on
each other). Rules are pure, so running one twice is harmless.

asyncpg ships no type information, so connections and pools are ``Any``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from accord import wire
from accord.core.spec import Op
from accord.participant import Participant, PostgresBarrier, Refusal
from accord.sim import services as sim
from accord.sim.services import RULES, Counters
from accord.sim.workload import SERVICES

DEFAULT_PREFIX = "accord_shop"
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,39}")

Value = list[int] | None
Load = Callable[[str], Awaitable[Value]]


def check_prefix(prefix: str) -> str:
    """A schema prefix: lowercase letters, digits, underscores (at most 40)."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"schema prefix must match [a-z_][a-z0-9_]* (at most 40 characters), got {prefix!r}"
        )
    return prefix


class _Miss(BaseException):
    """The rule asked for a key not loaded yet (never caught by a rule)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _View:
    """Counters for a rule: the loaded values; a key not loaded raises _Miss."""

    def __init__(self, values: dict[str, Value]) -> None:
        self._values = values

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self._values:
            raise _Miss(key)
        value = self._values[key]
        return default if value is None else value


async def _evaluate(rule: sim.Rule, payload: Any, values: dict[str, Value], load: Load) -> Any:
    """Run ``rule``, loading every key it asks for, until it answers."""
    while True:
        try:
            return rule(_View(values), payload)  # type: ignore[arg-type]
        except _Miss as miss:
            values[miss.key] = await load(miss.key)


def _decode(raw: str | None) -> Value:
    return None if raw is None else list(json.loads(raw))


def _handler(schema: str, rules: sim.Rules, op: Op) -> Callable[[Any, wire.WireRequest], Any]:
    rule = rules.rule(op)
    table = f"{schema}.counters"

    async def handle(conn: Any, call: wire.WireRequest) -> None:
        async def peek(key: str) -> Value:
            return _decode(await conn.fetchval(f"SELECT v FROM {table} WHERE key = $1", key))

        async def lock(key: str) -> Value:
            return _decode(
                await conn.fetchval(f"SELECT v FROM {table} WHERE key = $1 FOR UPDATE", key)
            )

        # Learn the keys without locks, then lock them in order and decide.
        seen: dict[str, Value] = {}
        try:
            effect = await _evaluate(rule, call.payload, seen, peek)
            keys = set(seen) | {key for key, _ in effect}
        except sim.Refusal:
            keys = set(seen)
        locked: dict[str, Value] = {}
        for key in sorted(keys):
            locked[key] = await lock(key)
        try:
            effect = await _evaluate(rule, call.payload, locked, lock)
        except sim.Refusal as exc:
            raise Refusal(str(exc)) from None
        for key, deltas in effect:
            if key not in locked:
                locked[key] = await lock(key)
            current = locked[key]
            if current is None:
                new = list(deltas)
                inserted = await conn.fetchval(
                    f"INSERT INTO {table}(key, v) VALUES ($1, $2)"
                    " ON CONFLICT DO NOTHING RETURNING true",
                    key,
                    json.dumps(new),
                )
                if inserted:
                    locked[key] = new
                    continue
                # A concurrent call created it and committed: add to its value.
                current = await lock(key) or [0] * len(deltas)
            new = [a + d for a, d in zip(current, deltas, strict=True)]
            await conn.execute(f"UPDATE {table} SET v = $2 WHERE key = $1", key, json.dumps(new))
            locked[key] = new
        await conn.execute(
            f"INSERT INTO {schema}.ledger(txid, branch, op, kind, effect)"
            " VALUES ($1, $2, $3, $4, $5)",
            call.txid,
            call.branch,
            call.op,
            sim.APPLIED,
            json.dumps(effect),
        )

    return handle


class PgShop:
    """The four services' state in PostgreSQL; the pool lives between
    :meth:`open` and :meth:`close` (the app's lifespan).

    ``initial`` builds every service's initial counters; it is called only if
    some schema has not been created yet.
    """

    def __init__(
        self,
        dsn: str,
        initial: Callable[[], dict[str, Counters]],
        *,
        prefix: str = DEFAULT_PREFIX,
        max_connections: int = 20,
    ) -> None:
        self.dsn = dsn
        self.prefix = check_prefix(prefix)
        self.max_connections = max_connections
        self._initial = initial
        self._pool: Any = None
        self.barriers = {
            name: PostgresBarrier(self, table=f"{self.schema(name)}.accord_barrier")
            for name in SERVICES
        }

    def schema(self, name: str) -> str:
        return f"{self.prefix}_{name}"

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("the PostgreSQL pool is not open")
        return self._pool

    def acquire(self) -> Any:
        """The pool's ``acquire()``: the barriers hold this object as their pool."""
        return self.pool.acquire()

    def participant(self, name: str, verifier: wire.Verifier) -> Participant[Any]:
        rules = RULES[name]()
        schema = self.schema(name)
        return Participant(
            self.barriers[name],
            verifier,
            handlers={op: _handler(schema, rules, op) for op in Op},
        )

    async def open(self) -> None:
        """Connect, create any missing schema with its initial state, migrate."""
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self.max_connections, timeout=10
        )
        try:
            initial: dict[str, Counters] | None = None
            for name in SERVICES:
                async with self.pool.acquire() as conn, conn.transaction():
                    if await self._exists(conn, name):
                        continue
                    initial = initial or self._initial()
                    await self._create(conn, name, initial[name])
            for barrier in self.barriers.values():
                await barrier.migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _exists(self, conn: Any, name: str) -> bool:
        schema = self.schema(name)
        # Two processes starting at once: one creates, the other waits and sees it.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema)
        if await conn.fetchval("SELECT to_regclass($1)", f"{schema}.meta") is None:
            return False
        found = await conn.fetchval(f"SELECT 1 FROM {schema}.meta WHERE key = 'initial'")
        return found is not None

    async def _create(self, conn: Any, name: str, initial: Counters) -> None:
        s = self.schema(name)
        await conn.execute(
            f"""
            CREATE SCHEMA IF NOT EXISTS {s};
            CREATE TABLE IF NOT EXISTS {s}.meta (key TEXT PRIMARY KEY, value JSONB NOT NULL);
            CREATE TABLE IF NOT EXISTS {s}.ledger (
                seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                txid TEXT NOT NULL, branch TEXT NOT NULL, op TEXT NOT NULL,
                kind TEXT NOT NULL, effect JSONB NOT NULL, detail TEXT NOT NULL DEFAULT ''
            );
            CREATE TABLE IF NOT EXISTS {s}.counters (key TEXT PRIMARY KEY, v JSONB NOT NULL);
            DELETE FROM {s}.counters;
            DELETE FROM {s}.ledger;
            """
        )
        await conn.execute(
            f"INSERT INTO {s}.meta(key, value) VALUES ('initial', $1)", json.dumps(initial)
        )
        await conn.executemany(
            f"INSERT INTO {s}.counters(key, v) VALUES ($1, $2)",
            [(k, json.dumps(v)) for k, v in initial.items()],
        )

    async def read_state(self) -> dict[str, Any]:
        """Every service's initial state, counters and ledger (as ``read_state``)."""
        out: dict[str, Any] = {}
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            for name in SERVICES:
                s = self.schema(name)
                raw = await conn.fetchval(f"SELECT value FROM {s}.meta WHERE key = 'initial'")
                counters = await conn.fetch(f"SELECT key, v FROM {s}.counters")
                ledger = await conn.fetch(
                    f"SELECT seq, txid, branch, op, kind, effect, detail FROM {s}.ledger"
                    " ORDER BY seq"
                )
                out[name] = {
                    "initial": {k: list(v) for k, v in json.loads(raw).items()},
                    "counters": {r["key"]: json.loads(r["v"]) for r in counters},
                    "ledger": [
                        [
                            r["seq"],
                            r["txid"],
                            r["branch"],
                            r["op"],
                            r["kind"],
                            [[k, list(d)] for k, d in json.loads(r["effect"])],
                            r["detail"],
                        ]
                        for r in ledger
                    ],
                }
        return out
