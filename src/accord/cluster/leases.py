"""Shard leases in PostgreSQL: which node owns which shard, until when, and
under which fencing token.

Tables, in the log's schema (created by :func:`ensure_cluster_schema`)::

    shard_lease(shard PRIMARY KEY, owner, token, expires_at, acquired_at)
    members(node PRIMARY KEY, heartbeat_at, started_at)
    lease_history(shard, token, owner, acquired_at)   -- one row per acquisition
    inbox(txid PRIMARY KEY, shard, spec, submitted_at, via)
    meta: cluster_shards = N

Expiry is decided with the database's clock (``now()``), the one clock every
node shares. A holder does not trust its own view of the database's clock:
it treats a lease as valid only until ``(its monotonic clock when the renewal
started) + ttl - margin`` (see :class:`accord.cluster.node.ClusterNode`).

The token of a shard increases every time its owner changes (an acquisition,
including a re-acquisition by the same node, and a release): it is the
fencing token that every log row carries. Statements that change lease rows
lock them in shard order, as the log's batches do (``FOR SHARE``), so the two
never deadlock; an acquisition skips rows a batch holds (``SKIP LOCKED``)
rather than wait for them.

Every asyncpg error is translated into :class:`~accord.errors.StoreError`
here; a broken connection is replaced on the next call.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from accord.cluster.shards import check_shards, shard_of
from accord.errors import StoreError
from accord.log.postgres import _SCHEMA_NAME
from accord.log.postgres import _TRANSIENT as PG_TRANSIENT

log = logging.getLogger("accord.cluster")

NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")

# Errors after which the connection is replaced: the log's, plus a lease
# round's statement cancelled (a round must not wait out a stalled writer).
_TRANSIENT: tuple[type[BaseException], ...] = (*PG_TRANSIENT, asyncpg.QueryCanceledError)

_TABLES = [
    """CREATE TABLE IF NOT EXISTS {s}.shard_lease (
        shard INT PRIMARY KEY,
        owner TEXT,
        token BIGINT NOT NULL DEFAULT 0,
        expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity',
        acquired_at TIMESTAMPTZ
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.members (
        node TEXT PRIMARY KEY,
        heartbeat_at TIMESTAMPTZ NOT NULL,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.lease_history (
        shard INT NOT NULL,
        token BIGINT NOT NULL,
        owner TEXT NOT NULL,
        acquired_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (shard, token)
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.inbox (
        txid TEXT PRIMARY KEY,
        shard INT NOT NULL,
        spec BYTEA NOT NULL,
        submitted_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        via TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS inbox_shard ON {s}.inbox(shard, submitted_at)",
    # An operator's retry / abort / resolve, waiting for the shard's owner
    # (accord.cluster.inbox); answered in place.
    """CREATE TABLE IF NOT EXISTS {s}.operator_request (
        id BIGSERIAL PRIMARY KEY,
        txid TEXT NOT NULL,
        shard INT NOT NULL,
        action TEXT NOT NULL,
        reason TEXT NOT NULL,
        requested_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
        answered_at TIMESTAMPTZ,
        answered_by TEXT,
        code INT,
        answer JSONB
    )""",
    "CREATE INDEX IF NOT EXISTS operator_request_waiting ON {s}.operator_request(shard, id)"
    " WHERE answered_at IS NULL",
]


def check_schema(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"schema must be a plain SQL identifier, got {schema!r}")
    return schema


def check_node_id(node: str) -> str:
    if not NODE_ID.match(node):
        raise ValueError(
            "node id must be 1-64 characters: letters, digits, ._:@- (starting with a letter"
            f" or digit), got {node!r}"
        )
    return node


async def ensure_cluster_schema(conn: Any, schema: str, shards: int) -> None:
    """Create the cluster's tables (once) in a schema that holds a log, and
    check that the cluster was created with ``shards`` shards."""
    s = check_schema(schema)
    check_shards(shards)
    async with conn.transaction():
        # The same lock as the log's migrations: one creator at a time.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"accord:{s}")
        for statement in _TABLES:
            await conn.execute(statement.format(s=s))
        found = await conn.fetchval(f"SELECT value FROM {s}.meta WHERE key = 'cluster_shards'")
        if found is not None:
            if int(found) != shards:
                raise ValueError(
                    f"schema {s} holds a cluster of {found} shards, not {shards}: the shard"
                    " count of a cluster is fixed when it is created"
                )
            return
        await conn.execute(
            f"INSERT INTO {s}.shard_lease(shard) SELECT generate_series(0, $1::int - 1)"
            " ON CONFLICT DO NOTHING",
            shards,
        )
        # Open transactions of a log written before it became a cluster's.
        loose = [
            r[0] for r in await conn.fetch(f"SELECT txid FROM {s}.txn_open WHERE shard IS NULL")
        ]
        if loose:
            await conn.execute(
                f"UPDATE {s}.txn_open o SET shard = u.shard"
                " FROM unnest($1::text[], $2::int[]) AS u(txid, shard) WHERE o.txid = u.txid",
                loose,
                [shard_of(t, shards) for t in loose],
            )
        await conn.execute(
            f"INSERT INTO {s}.meta(key, value) VALUES ('cluster_shards', $1)", str(shards)
        )


def inbox_channel(schema: str) -> str:
    """The NOTIFY channel that announces new submissions in the inbox."""
    return f"accord_inbox_{schema}"


@dataclass(frozen=True, slots=True)
class Renewal:
    """What one heartbeat round found."""

    renewed: frozenset[int]  # held shards whose lease was extended
    live_members: int  # nodes with a recent heartbeat, this one included


class LeaseTable:
    """One node's statements on the lease tables, over one connection.

    Calls are serialised (one connection); each is tried once more on a new
    connection if the first broke. Re-running any of them is safe: a renewal
    or a release matches on the token, and a node may re-acquire a lease the
    database still gives it (an acquisition whose reply was lost).
    """

    def __init__(
        self,
        dsn: str,
        schema: str,
        node: str,
        shards: int,
        ttl_s: float,
        *,
        on_notify: Callable[[], None] | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.schema = check_schema(schema)
        self.node = check_node_id(node)
        self.shards = check_shards(shards)
        self.ttl_s = ttl_s
        self._on_notify = on_notify
        self._connect_timeout_s = connect_timeout_s
        self._conn: Any = None
        self._lock = asyncio.Lock()
        s = self.schema
        self._heartbeat = (
            f"INSERT INTO {s}.members(node, heartbeat_at) VALUES ($1, now())"
            " ON CONFLICT (node) DO UPDATE SET heartbeat_at = now()"
        )
        self._lock_rows = (
            f"SELECT shard FROM {s}.shard_lease WHERE shard = ANY($1::int[])"
            " ORDER BY shard FOR NO KEY UPDATE"
        )
        self._renew = (
            f"UPDATE {s}.shard_lease l SET expires_at = now() + $4 * interval '1 second'"
            " FROM unnest($2::int[], $3::bigint[]) AS h(shard, token)"
            " WHERE l.shard = h.shard AND l.token = h.token AND l.owner = $1"
            " AND l.expires_at > now() RETURNING l.shard"
        )
        self._live = (
            f"SELECT count(*) FROM {s}.members"
            " WHERE heartbeat_at > now() - $1 * interval '1 second'"
        )
        self._acquire = f"""
            WITH cand AS (
                SELECT shard FROM {s}.shard_lease
                WHERE (expires_at < now() OR owner = $1) AND shard <> ALL($3::int[])
                -- its own first (an acquisition whose reply was lost), then any
                ORDER BY owner IS NOT DISTINCT FROM $1 DESC, random() LIMIT $2
                FOR UPDATE SKIP LOCKED
            ), took AS (
                UPDATE {s}.shard_lease l
                SET owner = $1, token = l.token + 1, acquired_at = now(),
                    expires_at = now() + $4 * interval '1 second'
                FROM cand WHERE l.shard = cand.shard
                RETURNING l.shard, l.token
            ), noted AS (
                INSERT INTO {s}.lease_history(shard, token, owner, acquired_at)
                SELECT shard, token, $1, now() FROM took
            )
            SELECT shard, token FROM took"""
        self._release = (
            f"UPDATE {s}.shard_lease l SET owner = NULL, token = l.token + 1,"
            " expires_at = '-infinity' FROM unnest($2::int[], $3::bigint[]) AS h(shard, token)"
            " WHERE l.shard = h.shard AND l.token = h.token AND l.owner = $1"
        )

    # ------------------------------------------------------------ connection

    async def _connect(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        conn = await asyncpg.connect(
            self.dsn,
            timeout=self._connect_timeout_s,
            server_settings={
                "application_name": f"accord-node:{self.schema}:{self.node}"[:63],
                # A statement stuck behind a lock must not outlive the lease it
                # renews, and a node paused inside a transaction must not keep
                # its lease rows locked: others could never take them over.
                "statement_timeout": str(max(int(self.ttl_s * 500), 500)),
                "idle_in_transaction_session_timeout": str(max(int(self.ttl_s * 500), 500)),
            },
        )
        if self._on_notify is not None:
            notify = self._on_notify
            await conn.add_listener(inbox_channel(self.schema), lambda *_: notify())
        self._conn = conn
        return conn

    def reset(self) -> None:
        """Drop the connection (after a timeout: it may be mid-statement)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def _run(self, what: str, fn: Callable[[Any], Any]) -> Any:
        async with self._lock:
            for attempt in (1, 2):
                try:
                    conn = await self._connect()
                    return await fn(conn)
                except _TRANSIENT as exc:
                    self.reset()
                    if attempt == 2:
                        raise StoreError(f"{what}: {exc!r}") from exc
                except asyncpg.PostgresError as exc:
                    raise StoreError(f"{what}: {exc}") from exc
        raise AssertionError("unreachable")

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 2)
            except (*_TRANSIENT, asyncpg.PostgresError):
                conn.terminate()

    # ------------------------------------------------------------ statements

    async def ensure_schema(self) -> None:
        async def go(conn: Any) -> None:
            await ensure_cluster_schema(conn, self.schema, self.shards)

        await self._run("cannot create the cluster's tables", go)

    async def heartbeat_and_renew(self, held: Mapping[int, int]) -> Renewal:
        """Note this node alive, extend the leases it holds (``shard -> token``)
        and count the live members, in one transaction."""
        shards = sorted(held)
        tokens = [held[s] for s in shards]

        async def go(conn: Any) -> Renewal:
            async with conn.transaction():
                await conn.execute(self._heartbeat, self.node)
                renewed: frozenset[int] = frozenset()
                if shards:
                    await conn.execute(self._lock_rows, shards)
                    rows = await conn.fetch(self._renew, self.node, shards, tokens, self.ttl_s)
                    renewed = frozenset(r[0] for r in rows)
                live = await conn.fetchval(self._live, self.ttl_s)
            return Renewal(renewed, int(live))

        result: Renewal = await self._run("cannot renew leases", go)
        return result

    async def acquire(self, count: int, exclude: Collection[int]) -> dict[int, int]:
        """Take up to ``count`` shards whose lease expired (or that the
        database says are still this node's, outside ``exclude``): shard -> token."""
        if count <= 0:
            return {}

        async def go(conn: Any) -> dict[int, int]:
            rows = await conn.fetch(self._acquire, self.node, count, sorted(exclude), self.ttl_s)
            return {r[0]: r[1] for r in rows}

        got: dict[int, int] = await self._run("cannot acquire leases", go)
        return got

    async def release(self, held: Mapping[int, int]) -> None:
        """Give these leases up now (they become free at once)."""
        shards = sorted(held)
        if not shards:
            return

        async def go(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute(self._lock_rows, shards)
                await conn.execute(self._release, self.node, shards, [held[s] for s in shards])

        await self._run("cannot release leases", go)

    async def leave(self) -> None:
        """Stop counting as a member (a graceful exit)."""

        async def go(conn: Any) -> None:
            await conn.execute(f"DELETE FROM {self.schema}.members WHERE node = $1", self.node)

        await self._run("cannot leave the cluster", go)


async def read_status(
    dsn: str, schema: str, ttl_s: float, *, writers: bool = False
) -> dict[str, Any]:
    """:func:`cluster_status` on a connection of its own; with ``writers``,
    also how many log records each node wrote (a scan of the whole log)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            status = await cluster_status(conn, schema, ttl_s)
            if writers:
                rows = await conn.fetch(f"SELECT node, count(*) FROM {schema}.log GROUP BY node")
                status["records_by_node"] = {str(n): int(c) for n, c in rows}
            return status
        finally:
            await conn.close()
    except (*_TRANSIENT, asyncpg.PostgresError) as exc:
        raise StoreError(f"cannot read the cluster's status in {schema}: {exc}") from exc


async def cluster_status(conn: Any, schema: str, ttl_s: float) -> dict[str, Any]:
    """Who owns what, who is alive, what waits: for ``accord cluster status``."""
    s = check_schema(schema)
    shards = await conn.fetchval(f"SELECT value FROM {s}.meta WHERE key = 'cluster_shards'")
    if shards is None:
        raise StoreError(f"schema {s} is not a cluster's log (no node ever started on it)")
    members = await conn.fetch(
        f"SELECT node, extract(epoch FROM now() - heartbeat_at)::float8,"
        f" heartbeat_at > now() - $1 * interval '1 second' FROM {s}.members ORDER BY node",
        ttl_s,
    )
    owners = await conn.fetch(
        f"SELECT owner, count(*) FROM {s}.shard_lease WHERE expires_at > now()"
        " GROUP BY owner ORDER BY owner"
    )
    free = await conn.fetchval(f"SELECT count(*) FROM {s}.shard_lease WHERE expires_at <= now()")
    open_by_owner = await conn.fetch(
        f"SELECT l.owner, count(*) FROM {s}.txn_open o LEFT JOIN {s}.shard_lease l"
        " ON l.shard = o.shard AND l.expires_at > now() GROUP BY l.owner"
    )
    inbox = await conn.fetchval(f"SELECT count(*) FROM {s}.inbox")
    requests = await conn.fetchval(
        f"SELECT count(*) FROM {s}.operator_request WHERE answered_at IS NULL"
    )
    acquisitions = await conn.fetchval(f"SELECT count(*) FROM {s}.lease_history")
    return {
        "schema": s,
        "shards": int(shards),
        "members": [
            {"node": n, "heartbeat_age_s": round(age, 3), "live": bool(live)}
            for n, age, live in members
        ],
        "owned": {o: int(c) for o, c in owners},
        "free_shards": int(free),
        "open_transactions": {(o or "(unowned)"): int(c) for o, c in open_by_owner},
        "inbox": int(inbox),
        "operator_requests_waiting": int(requests),
        "acquisitions": int(acquisitions),
    }


__all__ = [
    "LeaseTable",
    "Renewal",
    "check_node_id",
    "check_schema",
    "cluster_status",
    "ensure_cluster_schema",
    "inbox_channel",
    "read_status",
]
