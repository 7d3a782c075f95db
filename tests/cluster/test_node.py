"""Cluster nodes in one process (one event loop), on one PostgreSQL schema and
one in-memory shop: who drives what, takeover, hand-over, and what a node that
lost its lease still does (nothing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from accord.cluster import ClusterClient
from accord.cluster.shards import shard_of
from accord.coordinator import TxnResult
from accord.core.records import Begin, TxnStatus
from accord.core.spec import Op, TransactionSpec
from accord.errors import DuplicateTransaction, StoreError
from accord.log import PostgresStore

from .db import PG_DSN, pg
from .world import SHARDS, TTL_S, World, writers


async def test_a_transaction_submitted_to_any_node_is_driven_by_its_shards_owner(
    world: Callable[..., World], schema: str
) -> None:
    """Orders submitted alternately to two nodes all end; each one's records are all
    written by the one node that owns its shard."""
    w = world(orders=120)
    a, b = await w.node("a"), await w.node("b")
    await w.settled("a", "b")
    owner = {s: "a" for s in a.owned()} | {s: "b" for s in b.owned()}
    futures = [await (a if i % 2 else b).submit(spec) for i, spec in enumerate(w.specs)]
    results: list[TxnResult] = await asyncio.gather(*futures)
    assert all(r.status.terminal for r in results)
    assert {r.status for r in results} >= {TxnStatus.COMMITTED}
    snaps = await w.check()
    assert len(snaps) == 120
    for txid, nodes in writers(schema).items():
        assert nodes == {owner[shard_of(txid, SHARDS)]}, txid
    assert a.stats.forwarded > 0 and b.stats.forwarded > 0
    assert a.stats.inbox_taken + b.stats.inbox_taken == a.stats.forwarded + b.stats.forwarded
    calls_by = {(node, txid) for node, txid, _, _ in w.calls}
    assert all((owner[shard_of(t, SHARDS)], t) in calls_by for _, t in calls_by)


async def test_resubmitting_an_id_elsewhere_gets_the_same_transaction_or_a_conflict(
    world: Callable[..., World],
) -> None:
    """The same spec through another node yields the first outcome; another spec
    under that id is refused."""
    w = world(orders=10)
    a, b = await w.node("a"), await w.node("b")
    await w.settled("a", "b")
    spec = w.specs[0]
    on_owner, elsewhere = (a, b) if shard_of(spec.id, SHARDS) in a.owned() else (b, a)
    first = await (await on_owner.submit(spec))
    again = await (await elsewhere.submit(spec))
    assert (again.txid, again.status, again.reason) == (first.txid, first.status, first.reason)
    other = TransactionSpec.from_dict({**spec.to_dict(), "timeout_s": 12})
    with pytest.raises(DuplicateTransaction, match="different spec"):
        await elsewhere.submit(other)


async def test_a_killed_nodes_shards_are_taken_over_and_its_transactions_finish(
    world: Callable[..., World], schema: str
) -> None:
    """Kill one of three nodes mid-load: within the TTL and a little more its shards
    belong to the others, every transaction ends, the invariants hold."""
    w = world(orders=300, latency_ms=20.0)
    for name in ("a", "b", "c"):
        await w.node(name)
    await w.settled("a", "b", "c")
    async with ClusterClient(PG_DSN, schema=schema) as client:
        await client.submit_many(w.specs)
        victim = w.nodes["a"]
        lost = set(victim.owned())
        sql = f"SELECT txid FROM {schema}.txn_open WHERE shard = ANY($1)"
        while len(pg(sql, list(lost))) < 10:
            await asyncio.sleep(0.01)
        open_then = {t for (t,) in pg(sql, list(lost))}
        killed_at = time.monotonic()
        await victim.kill()
        while not all(w.nodes["b"].owns([s]) or w.nodes["c"].owns([s]) for s in lost):
            await asyncio.sleep(0.05)
        takeover_s = time.monotonic() - killed_at
        results = await asyncio.gather(*(client.result(s, timeout_s=60) for s in w.specs))
    assert takeover_s < TTL_S + 2, takeover_s
    assert all(r.status.terminal for r in results)
    assert open_then
    by = writers(schema)
    assert all(by[t] - {"a"} for t in open_then)  # each was finished by a survivor
    await w.check()


async def test_a_leaving_node_drains_then_hands_its_shards_over(
    world: Callable[..., World],
) -> None:
    """A node that closes lets its running transactions finish first: nothing it
    drove ends by presumed abort, and the others take its shards at once."""
    w = world(orders=200, latency_ms=10.0)
    a, b = await w.node("a"), await w.node("b", drain_s=10.0)
    await w.settled("a", "b")
    futures = [await a.submit(spec) for spec in w.specs[:100]]
    while b.coordinator.in_flight < 5:
        await asyncio.sleep(0.01)
    closed_at = time.monotonic()
    await b.close()
    while len(a.owned()) < SHARDS:
        await asyncio.sleep(0.05)
    assert time.monotonic() - closed_at < 10 + TTL_S  # released, not expired
    results = await asyncio.gather(*futures)
    assert not [r for r in results if "presumed abort" in r.reason]
    assert b.stats.dropped == 0 and b.stats.released > 0
    await w.check()


async def test_a_joining_node_gets_its_share_and_the_others_give_it_up(
    world: Callable[..., World],
) -> None:
    """Rebalancing: one node holds every shard; two join; each ends with about N/3."""
    w = world(orders=10)
    await w.node("a")
    await w.settled("a")
    await w.node("b")
    await w.node("c")
    await w.settled("a", "b", "c", timeout_s=20)
    counts = sorted(len(n.owned()) for n in w.nodes.values())
    assert counts[0] >= SHARDS // 3 - 1 and counts[-1] <= -(-SHARDS // 3)


async def test_a_node_whose_lease_lapsed_sends_and_writes_nothing_more(
    world: Callable[..., World], schema: str
) -> None:
    """A node whose lease loop stalled (as if paused) stops acting at the end of its
    trusted period: after another node took its shards over, not one call and not
    one log row of it for those shards."""
    w = world(orders=300, latency_ms=30.0)
    a, b = await w.node("a"), await w.node("b")
    await w.settled("a", "b")
    async with ClusterClient(PG_DSN, schema=schema) as client:
        await client.submit_many(w.specs)
        while a.coordinator.in_flight < 20:
            await asyncio.sleep(0.01)
        stalled, held = await w.stall("a")
        in_flight = a.coordinator.in_flight
        while not b.owns(stalled):
            await asyncio.sleep(0.05)
        taken_at = time.monotonic()
        (max_seq,) = pg(f"SELECT max(seq) FROM {schema}.log")[0]
        held.set()  # "SIGCONT": the replies reach it
        await asyncio.gather(*(client.result(s, timeout_s=60) for s in w.specs))
    late_calls = [c for c in w.calls if c[0] == "a" and c[3] > taken_at]
    assert late_calls == []
    late_rows = pg(f"SELECT txid FROM {schema}.log WHERE node = 'a' AND seq > $1", max_seq)
    assert late_rows == []
    assert in_flight > 0 and a.coordinator.in_flight == 0
    assert a.stats.refused_appends + a.stats.gated > 0
    await w.check()


async def test_a_node_that_wrongly_trusts_its_lease_is_fenced_by_the_log(
    world: Callable[..., World], schema: str
) -> None:
    """Even a node whose clock lets it believe its lease is still valid (its local
    check defeated) cannot write after the takeover: the log refuses its rows, it
    stops those transactions, and no confirm follows a refused decision."""
    w = world(orders=300, latency_ms=30.0)
    a, b = await w.node("a"), await w.node("b")
    await w.settled("a", "b")
    async with ClusterClient(PG_DSN, schema=schema) as client:
        await client.submit_many(w.specs)
        while a.coordinator.in_flight < 20:
            await asyncio.sleep(0.01)
        stalled, held = await w.stall("a")
        for lease in a._leases.values():
            lease.valid_until = float("inf")  # a broken clock: a never doubts its leases
        while not b.owns(stalled):
            await asyncio.sleep(0.05)
        taken_at = time.monotonic()
        (max_seq,) = pg(f"SELECT max(seq) FROM {schema}.log")[0]
        held.set()
        await asyncio.gather(*(client.result(s, timeout_s=60) for s in w.specs))
    late_rows = pg(f"SELECT txid FROM {schema}.log WHERE node = 'a' AND seq > $1", max_seq)
    assert late_rows == []
    assert a.stats.fenced > 0 and a.store.fenced_records > 0
    assert not stalled & set(a.owned())  # the refused writes told it: it let them go
    decided = {t for (t,) in pg(f"SELECT txid FROM {schema}.log WHERE kind = 'decided'")}
    late_confirms = [c for c in w.calls if c[0] == "a" and c[2] is Op.CONFIRM and c[3] > taken_at]
    assert all(txid in decided for _, txid, _, _ in late_confirms)
    await w.check()


async def test_a_single_coordinators_log_becomes_a_clusters(
    world: Callable[..., World], schema: str
) -> None:
    """The first node on a log written by a lone coordinator gives its open
    transactions their shards and drives them to the end; the lone store may
    then only read it."""
    w = world(orders=5)
    lone = PostgresStore(PG_DSN, schema=schema, pool_size=1)
    await lone.open()
    for spec in w.specs:
        lone.append(Begin(spec, 1, 30_001))
    await lone.flush()
    await lone.close()
    a = await w.node("a")
    await w.settled("a")
    async with ClusterClient(PG_DSN, schema=schema) as client:
        results = await asyncio.gather(*(client.result(s, timeout_s=30) for s in w.specs))
    assert [r.status for r in results] == [TxnStatus.ABORTED] * 5  # presumed abort
    assert a.stats.resumed == 5
    again = PostgresStore(PG_DSN, schema=schema, pool_size=1)
    await again.open()
    try:
        with pytest.raises(StoreError, match="only its nodes write"):
            again.append(Begin(w.specs[0], 1, 30_001))
    finally:
        await again.close()
