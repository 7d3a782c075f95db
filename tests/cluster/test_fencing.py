"""Fencing at the write: every log row carries its shard's token, and a row
whose token is no longer the shard's current one is never written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from accord.cluster.inbox import Inbox
from accord.cluster.leases import LeaseTable
from accord.cluster.shards import shard_of
from accord.core.records import Begin, Decided, Decision, Ended, TxnStatus
from accord.core.spec import BranchSpec, Protocol, RetryPolicy, TransactionSpec
from accord.errors import StoreError
from accord.log import PostgresStore
from accord.log.base import Fenced

from .db import PG_DSN, pg

SHARDS = 4
T0 = 1_700_000_000_000


def txid_in(shard: int, n: int = 0) -> str:
    """The n-th id of the form 'f-<i>' that falls in ``shard``."""
    found = [t for t in (f"f-{i}" for i in range(1000)) if shard_of(t, SHARDS) == shard]
    return found[n]


def spec(txid: str) -> TransactionSpec:
    return TransactionSpec(
        protocol=Protocol.TCC,
        branches=(BranchSpec("b0", "p0", {"n": 1}, RetryPolicy(maximum_attempts=3)),),
        id=txid,
        timeout_s=30,
    )


def begin(txid: str) -> Begin:
    return Begin(spec(txid), T0, T0 + 30_000)


class FakeFence:
    """A node's view of its leases, set by the test."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.tokens: dict[int, int] = {}
        self.reports: list[tuple[set[tuple[int, int]], frozenset[str]]] = []

    def shard_of(self, txid: str) -> int:
        return shard_of(txid, SHARDS)

    def stamp(self, txid: str) -> tuple[int, int] | None:
        shard = self.shard_of(txid)
        token = self.tokens.get(shard)
        return None if token is None else (shard, token)

    def fenced(self, stale: set[tuple[int, int]], txids: frozenset[str]) -> None:
        self.reports.append((stale, txids))


Node = tuple[PostgresStore, FakeFence, LeaseTable]


@pytest.fixture
async def nodes(schema: str) -> AsyncIterator[Callable[..., Any]]:
    """Make (fenced store, fence, lease table) for a node on a fresh 4-shard cluster."""
    made: list[Node] = []

    async def make(name: str, ttl_s: float = 30.0) -> Node:
        fence = FakeFence(name)
        store = PostgresStore(PG_DSN, schema=schema, pool_size=2, fence=fence)
        await store.open()
        table = LeaseTable(PG_DSN, schema, name, SHARDS, ttl_s)
        await table.ensure_schema()
        made.append((store, fence, table))
        return store, fence, table

    yield make
    for store, _, table in made:
        await store.close()
        await table.close()


def log_rows(schema: str) -> list[tuple[str, str, int, int, str]]:
    rows = pg(f"SELECT txid, kind, shard, token, node FROM {schema}.log ORDER BY seq")
    return [tuple(r) for r in rows]  # type: ignore[misc]


async def test_every_row_carries_its_shard_token_and_writer(nodes: Any, schema: str) -> None:
    """A node's rows hold the shard, the token it holds for it and its node id."""
    store, fence, table = await nodes("a")
    fence.tokens = await table.acquire(SHARDS, exclude=[])
    a = txid_in(2)
    store.append(begin(a))
    store.append(Decided(a, Decision.COMMIT, "all prepared", T0 + 1))
    assert await store.flush() == frozenset()
    assert log_rows(schema) == [(a, "begin", 2, 1, "a"), (a, "decided", 2, 1, "a")]
    assert pg(f"SELECT txid, shard FROM {schema}.txn_open") == [(a, 2)]


async def test_a_writer_whose_lease_was_taken_over_writes_nothing(nodes: Any, schema: str) -> None:
    """A stale holder (paused past its lease) appends with its old token: the database
    refuses those rows, the fence hears of them before the waiters resume, and the
    rows of the shard's new owner are unaffected."""
    a_store, a_fence, a_table = await nodes("a", ttl_s=0.5)
    b_store, b_fence, b_table = await nodes("b", ttl_s=0.5)
    a_fence.tokens = await a_table.acquire(SHARDS, exclude=[])
    x = txid_in(1)
    a_store.append(begin(x))
    await a_store.flush()
    await asyncio.sleep(0.7)  # a's lease expires; a does not know
    b_fence.tokens = await b_table.acquire(SHARDS, exclude=[])
    assert b_fence.tokens[1] == a_fence.tokens[1] + 1
    seen: list[str] = []
    a_store.append(Decided(x, Decision.COMMIT, "all prepared", T0 + 1))
    pending = a_store.sync()
    assert pending is not None
    pending.add_done_callback(lambda _: seen.append(f"waiter, after {len(a_fence.reports)} report"))
    assert await pending == frozenset()
    assert a_fence.reports == [({(1, a_fence.tokens[1])}, frozenset({x}))]
    assert seen == ["waiter, after 1 report"]
    assert a_store.fenced_records == 1
    b_store.adopt(await b_store.load_active(shards=[1]))
    b_store.append(Decided(x, Decision.ABORT, "presumed abort", T0 + 2))
    await b_store.flush()
    assert [(k, tok, n) for t, k, _, tok, n in log_rows(schema) if t == x] == [
        ("begin", 1, "a"),
        ("decided", 2, "b"),
    ]
    snap = await b_store.get(x)
    assert snap is not None and snap.decision is Decision.ABORT


async def test_a_takeover_cannot_overtake_a_batch_in_flight(
    nodes: Any, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a batch holds its lease rows, the takeover skips them; once the batch
    committed, the new owner takes the shard and reads what the batch wrote."""
    a_store, a_fence, a_table = await nodes("a", ttl_s=0.5)
    _, _, b_table = await nodes("b", ttl_s=0.5)
    reader, _, _ = await nodes("reader")
    a_fence.tokens = await a_table.acquire(SHARDS, exclude=[])
    locked, go_on = asyncio.Event(), asyncio.Event()
    check = a_store._check_fence

    async def slow_check(conn: Any, rows: Any) -> Any:
        result = await check(conn, rows)
        locked.set()
        await go_on.wait()
        return result

    monkeypatch.setattr(a_store, "_check_fence", slow_check)
    x = txid_in(3)
    a_store.append(begin(x))
    a_store.append(Decided(x, Decision.COMMIT, "all prepared", T0 + 1))
    pending = a_store.sync()
    await locked.wait()
    await asyncio.sleep(0.7)  # a's lease expired while its batch is in flight
    taken = await b_table.acquire(SHARDS, exclude=[])
    assert 3 not in taken and len(taken) == SHARDS - 1
    go_on.set()
    assert pending is not None and await pending == frozenset()
    assert a_fence.reports == []  # the batch held the lease: its rows are in
    assert await b_table.acquire(SHARDS, exclude=list(taken)) == {3: 2}
    snaps = await reader.load_active(shards=[3])
    assert [(s.txid, s.decision) for s in snaps] == [(x, Decision.COMMIT)]


async def test_one_batch_keeps_rows_of_the_current_epoch_and_drops_older_ones(
    nodes: Any, schema: str
) -> None:
    """The check is per row: in the same batch, rows stamped with a superseded token
    are refused and rows with the current token are written."""
    store, fence, table = await nodes("a")
    fence.tokens = await table.acquire(SHARDS, exclude=[])
    old, new = txid_in(0, 0), txid_in(0, 1)
    store.append(begin(old))  # stamped with token 1
    again = await table.acquire(SHARDS, exclude=[])  # the node re-acquires: token 2
    fence.tokens = again
    store.append(begin(new))  # stamped with token 2, same batch
    await store.flush()
    assert [(t, tok) for t, _, _, tok, _ in log_rows(schema)] == [(new, 2)]
    assert fence.reports == [({(0, 1)}, frozenset({old}))]


async def test_an_append_the_fence_does_not_stamp_is_refused_at_once(nodes: Any) -> None:
    """Without a valid lease the record is not even queued: Fenced, and no violation."""
    store, _, _ = await nodes("a")
    with pytest.raises(Fenced, match="does not hold the lease of shard 2") as info:
        store.append(begin(txid_in(2)))
    assert info.value.txid == txid_in(2)
    assert store.sync() is None and store.violations == []


async def test_a_store_without_a_fence_only_reads_a_clusters_log(nodes: Any, schema: str) -> None:
    """A plain store opened on a cluster's schema reads it but refuses every write."""
    store, fence, table = await nodes("a")
    fence.tokens = await table.acquire(SHARDS, exclude=[])
    x = txid_in(1)
    store.append(begin(x))
    await store.flush()
    plain = PostgresStore(PG_DSN, schema=schema, pool_size=1)
    await plain.open()
    try:
        assert plain.cluster_shards == SHARDS
        with pytest.raises(StoreError, match="cluster of 4 shards"):
            plain.append(Ended(x, TxnStatus.ABORTED, "by hand", T0 + 5))
        snap = await plain.get(x)
        assert snap is not None and snap.status is TxnStatus.PREPARING
    finally:
        await plain.close()


async def test_load_active_reads_only_the_shards_asked_for(nodes: Any) -> None:
    """load_active(shards=...) returns the open transactions of those shards only."""
    store, fence, table = await nodes("a")
    fence.tokens = await table.acquire(SHARDS, exclude=[])
    ids = {s: [txid_in(s, 0), txid_in(s, 1)] for s in range(SHARDS)}
    for pair in ids.values():
        for txid in pair:
            store.append(begin(txid))
    store.append(Ended(ids[1][1], TxnStatus.ABORTED, "done", T0 + 1))
    await store.flush()
    got = sorted(s.txid for s in await store.load_active(shards=[1, 3]))
    assert got == sorted([ids[1][0], *ids[3]])
    assert len(await store.load_active()) == 2 * SHARDS - 1


async def test_a_begin_takes_its_submission_out_of_the_inbox(nodes: Any, schema: str) -> None:
    """The batch that writes a Begin deletes its inbox row; a refused Begin leaves it."""
    store, fence, table = await nodes("a")
    inbox = Inbox(PG_DSN, schema, SHARDS)
    await inbox.open()
    try:
        x, y = txid_in(0), txid_in(1)
        await inbox.put([spec(x), spec(y)])
        assert sorted(t for t, _ in await inbox.take(range(SHARDS), 10)) == sorted([x, y])
        fence.tokens = await table.acquire(SHARDS, exclude=[])
        store.append(begin(x))
        stale = fence.tokens[1]
        fence.tokens = {**fence.tokens, 1: stale - 1}  # y's Begin carries a stale token
        store.append(begin(y))
        await store.flush()
        assert [t for t, _ in await inbox.take(range(SHARDS), 10)] == [y]
    finally:
        await inbox.close()
