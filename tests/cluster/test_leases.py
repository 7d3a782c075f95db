"""Shard leases in PostgreSQL: acquisition, expiry, renewal, release, membership."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg  # type: ignore[import-untyped]
import pytest

from accord.cluster.leases import LeaseTable, ensure_cluster_schema
from accord.log import PostgresStore

from .db import PG_DSN, pg

SHARDS = 8

Make = Callable[..., LeaseTable]


@pytest.fixture
async def tables(schema: str) -> AsyncIterator[Make]:
    """Make LeaseTables of nodes on a fresh cluster schema of 8 shards."""
    store = PostgresStore(PG_DSN, schema=schema, pool_size=1)  # creates the log's tables
    await store.open()
    await store.close()
    made: list[LeaseTable] = []

    def make(node: str, ttl_s: float = 5.0) -> LeaseTable:
        table = LeaseTable(PG_DSN, schema, node, SHARDS, ttl_s)
        made.append(table)
        return table

    await make("setup").ensure_schema()
    yield make
    for table in made:
        await table.close()


def history(schema: str) -> list[tuple[int, int, str]]:
    rows = pg(f"SELECT shard, token, owner FROM {schema}.lease_history ORDER BY shard, token")
    return [(r[0], r[1], r[2]) for r in rows]


async def test_acquisitions_take_free_shards_each_once_with_a_new_token(
    tables: Make, schema: str
) -> None:
    """Free shards go to whoever asks first, token 1, noted in lease_history; never to two."""
    a, b = tables("a"), tables("b")
    got_a = await a.acquire(5, exclude=[])
    got_b = await b.acquire(5, exclude=[])
    assert len(got_a) == 5 and len(got_b) == 3
    assert not set(got_a) & set(got_b)
    assert set(got_a.values()) == set(got_b.values()) == {1}
    assert sorted(history(schema)) == sorted(
        [(s, 1, "a") for s in got_a] + [(s, 1, "b") for s in got_b]
    )


async def test_a_lease_is_taken_over_only_after_it_expires_and_the_token_moves_on(
    tables: Make,
) -> None:
    """A held lease is not taken; once expired (database clock) it is, with token + 1,
    and the old holder's renewal then fails."""
    a, b = tables("a", ttl_s=1.0), tables("b", ttl_s=1.0)
    held = await a.acquire(SHARDS, exclude=[])
    assert len(held) == SHARDS
    assert await b.acquire(SHARDS, exclude=[]) == {}
    await asyncio.sleep(1.2)
    taken = await b.acquire(SHARDS, exclude=[])
    assert taken == {s: t + 1 for s, t in held.items()}
    renewal = await a.heartbeat_and_renew(held)
    assert renewal.renewed == frozenset()


async def test_renewal_extends_only_leases_held_with_that_token(tables: Make) -> None:
    """Renewing keeps a lease past its TTL; a renewal naming a stale token renews nothing."""
    a, b = tables("a", ttl_s=1.0), tables("b", ttl_s=1.0)
    held = await a.acquire(2, exclude=[])
    for _ in range(3):
        await asyncio.sleep(0.4)
        renewal = await a.heartbeat_and_renew(held)
        assert renewal.renewed == frozenset(held)
    assert set(await b.acquire(SHARDS, exclude=[])).isdisjoint(held)  # 1.2 s > TTL: still a's
    stale = {s: t - 1 for s, t in held.items()}
    assert (await a.heartbeat_and_renew(stale)).renewed == frozenset()


async def test_release_frees_shards_at_once_and_moves_the_token(tables: Make) -> None:
    """A released lease is free immediately; its next owner's token is two past the old one."""
    a, b = tables("a"), tables("b")
    held = await a.acquire(SHARDS, exclude=[])
    await a.release(held)
    taken = await b.acquire(SHARDS, exclude=[])
    assert taken == {s: t + 2 for s, t in held.items()}
    assert (await a.heartbeat_and_renew(held)).renewed == frozenset()


async def test_live_members_are_those_with_a_recent_heartbeat(tables: Make) -> None:
    """A member counts while its heartbeat is younger than the TTL; leave() removes it."""
    a, b, c = tables("a", ttl_s=1.0), tables("b", ttl_s=1.0), tables("c", ttl_s=1.0)
    await a.heartbeat_and_renew({})
    await b.heartbeat_and_renew({})
    assert (await c.heartbeat_and_renew({})).live_members == 3
    await asyncio.sleep(0.6)
    await a.heartbeat_and_renew({})
    await c.leave()
    await asyncio.sleep(0.6)
    assert (await a.heartbeat_and_renew({})).live_members == 1  # b is stale, c left


async def test_a_node_takes_back_a_lease_the_database_still_gives_it(tables: Make) -> None:
    """An acquisition whose reply was lost is not stuck: the node re-acquires it, new token."""
    a = tables("a")
    lost_reply = await a.acquire(3, exclude=[])
    again = await a.acquire(3, exclude=[])
    assert again == {s: t + 1 for s, t in lost_reply.items()}


async def test_acquisition_skips_a_lease_row_that_a_log_batch_holds(
    tables: Make, schema: str
) -> None:
    """A batch holds its shards' lease rows FOR SHARE until it commits: a takeover skips
    such a row rather than wait, and takes it once the batch is done."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(f"SELECT token FROM {schema}.shard_lease WHERE shard = 0 FOR SHARE")
        got = await asyncio.wait_for(tables("b").acquire(SHARDS, exclude=[]), 2)
        assert 0 not in got and len(got) == SHARDS - 1
        await tx.commit()
    finally:
        await conn.close()
    assert await tables("c").acquire(SHARDS, exclude=[]) == {0: 1}


async def test_the_shard_count_of_a_cluster_is_fixed(tables: Make, schema: str) -> None:
    """Joining with another shard count is refused, naming both counts."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        with pytest.raises(ValueError, match="cluster of 8 shards, not 16"):
            await ensure_cluster_schema(conn, schema, 16)
        await ensure_cluster_schema(conn, schema, SHARDS)  # the same count: fine, idempotent
    finally:
        await conn.close()
    assert pg(f"SELECT count(*) FROM {schema}.shard_lease")[0][0] == SHARDS
