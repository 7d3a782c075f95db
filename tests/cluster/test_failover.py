"""Failover with real processes (TESTING.md tier 2): the shop's services and
three `accord cluster node` processes on one PostgreSQL schema, under load.

* SIGKILL one node: its shards are taken over within the lease TTL plus a
  few seconds, every transaction it had in flight ends, the invariants hold.
* SIGSTOP one node past its lease, then SIGCONT: the log accepts no write of
  it for the shards it lost, and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from accord.cli.cluster import verify_cluster
from accord.cluster import ClusterClient
from accord.core.spec import Protocol
from accord.sim.demo import HTTP_CALL_TIMEOUT_S
from accord.sim.http_demo import load_secret
from accord.sim.workload import ShopConfig, Workload, order_spec

from .conftest import Processes
from .db import PG_DSN, pg, wait_for

pytestmark = pytest.mark.slow

NODES = ("n1", "n2", "n3")
SHARDS = 32
TTL_S = 2.0
ORDERS = 400
SEED = 11
LATENCY_MS = 20  # calls take a while: transactions are in flight when a node dies


def start_cluster(procs: Processes) -> None:
    procs.services(orders=ORDERS, seed=SEED, latency_ms=LATENCY_MS)
    for name in NODES:
        procs.node(name, shards=SHARDS, ttl_s=TTL_S, concurrency=20)
    s = procs.schema

    def settled() -> bool:
        rows = pg(
            f"SELECT owner, count(*) FROM {s}.shard_lease WHERE expires_at > now() GROUP BY owner"
        ) if _exists(s) else []  # fmt: skip
        owned = {owner: count for owner, count in rows}
        return sum(owned.values()) == SHARDS and set(owned) == set(NODES)

    wait_for("the three nodes to share every shard", settled, 60, every_s=0.2)


def _exists(schema: str) -> bool:
    return bool(
        pg("SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'shard_lease'", schema)
    )


def submit_all(procs: Processes) -> None:
    workload = Workload(ShopConfig(orders=ORDERS, seed=SEED))
    specs = [
        order_spec(o, Protocol.TCC, call_timeout_s=HTTP_CALL_TIMEOUT_S, base_url=procs.url)
        for o in workload.orders
    ]

    async def go() -> None:
        async with ClusterClient(PG_DSN, schema=procs.schema) as client:
            await client.submit_many(specs)

    asyncio.run(go())


def busiest(schema: str, at_least: int) -> str:
    """The node with the most open transactions in its shards, once one has ``at_least``."""

    def find() -> str | None:
        rows = pg(
            f"SELECT l.owner, count(*) FROM {schema}.txn_open o JOIN {schema}.shard_lease l"
            " ON l.shard = o.shard GROUP BY l.owner ORDER BY count(*) DESC"
        )
        return rows[0][0] if rows and rows[0][1] >= at_least else None

    return str(wait_for(f"a node with {at_least} transactions in flight", find, 30, 0.02))


def picture(procs: Processes) -> str:
    """The leases, the cluster's PostgreSQL sessions and the nodes' logs, for a
    failure message."""
    s = procs.schema
    leases = pg(f"SELECT shard, owner, token, expires_at - now() FROM {s}.shard_lease ORDER BY 1")
    members = pg(f"SELECT node, now() - heartbeat_at FROM {s}.members")
    sessions = pg(
        "SELECT pid, application_name, state, wait_event_type, wait_event, now() - xact_start,"
        " left(query, 80) FROM pg_stat_activity WHERE application_name LIKE $1",
        f"accord-%{s}%",
    )
    locks = pg(
        "SELECT l.pid, l.mode, l.granted, c.relname FROM pg_locks l"
        " JOIN pg_class c ON c.oid = l.relation JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND c.relname = 'shard_lease'",
        s,
    )
    parts = [
        "leases:", *map(str, leases), "members:", *map(str, members),
        "sessions:", *map(str, sessions), "shard_lease locks:", *map(str, locks),
    ]  # fmt: skip
    for name in NODES:
        parts += [f"--- {name} (exit {procs.children[name].poll()}):", procs.log(name)[-1500:]]
    return "\n".join(parts)


def all_terminal(schema: str) -> bool:
    begun = pg(f"SELECT count(*) FROM {schema}.log WHERE kind = 'begin'")[0][0]
    still_open = pg(f"SELECT count(*) FROM {schema}.txn_open")[0][0]
    waiting = pg(f"SELECT count(*) FROM {schema}.inbox")[0][0]
    return bool(begun == ORDERS and still_open == 0 and waiting == 0)


def verify(procs: Processes) -> dict[str, Any]:
    summary = asyncio.run(
        verify_cluster(PG_DSN, procs.schema, procs.url, load_secret(procs.secret))
    )
    assert all(summary["invariants"].values()), summary["violations"]
    assert summary["transactions"] == ORDERS and summary["stuck"] == 0 and summary["inbox"] == 0
    assert summary["duplicates_applied"] == 0
    return summary


def test_sigkill_one_of_three_nodes_under_load(procs: Processes) -> None:
    """SIGKILL the busiest of three nodes: the others own its shards within the TTL
    plus 3 s, finish every transaction it had open, and every invariant holds."""
    s = procs.schema
    start_cluster(procs)
    submit_all(procs)
    victim = busiest(s, at_least=10)
    lost = [r[0] for r in pg(f"SELECT shard FROM {s}.shard_lease WHERE owner = $1", victim)]
    open_then = {r[0] for r in pg(f"SELECT txid FROM {s}.txn_open WHERE shard = ANY($1)", lost)}
    (killed_at,) = pg("SELECT clock_timestamp()")[0]
    procs.signal(victim, signal.SIGKILL)

    def taken_over() -> float | None:
        rows = pg(
            f"SELECT max(acquired_at) FROM {s}.shard_lease WHERE shard = ANY($1)"
            " AND owner IS DISTINCT FROM $2 AND expires_at > now()"
            " HAVING count(*) = $3",
            lost, victim, len(lost),
        )  # fmt: skip
        return (rows[0][0] - killed_at).total_seconds() if rows else None

    takeover_s = wait_for(
        "the takeover of the killed node's shards", taken_over, TTL_S + 10,
        diagnose=lambda: picture(procs),
    )  # fmt: skip
    assert takeover_s <= TTL_S + 3, f"takeover took {takeover_s:.2f} s"
    wait_for("every order to end", lambda: all_terminal(s), 120, 0.2)
    survivors = {r[0]: r[1] for r in pg(f"SELECT txid, array_agg(node) FROM {s}.log GROUP BY txid")}
    # Read just before the kill: the victim may still have ended a few of them.
    ended_by_victim = {
        r[0] for r in pg(f"SELECT txid FROM {s}.log WHERE kind = 'end' AND node = $1", victim)
    }
    taken = open_then - ended_by_victim
    assert taken
    for txid in taken:  # each was finished by another node
        assert set(survivors[txid]) - {victim}, txid
    verify(procs)
    for name in NODES:
        if name != victim:
            assert procs.stop(name) == 0, procs.log(name)


def test_sigstopped_node_past_its_lease_writes_nothing_after_sigcont(procs: Processes) -> None:
    """SIGSTOP the busiest node until the others took all its shards, then SIGCONT:
    no row of it with a lost lease's token reaches the log afterwards, every row in
    the log carries a token its writer was granted, and nothing is applied twice."""
    s = procs.schema
    start_cluster(procs)
    submit_all(procs)
    victim = busiest(s, at_least=10)
    procs.signal(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    held = {
        r[0]: r[1] for r in pg(f"SELECT shard, token FROM {s}.shard_lease WHERE owner = $1", victim)
    }
    assert held

    def taken_over() -> bool:
        rows = pg(f"SELECT shard, token FROM {s}.shard_lease WHERE shard = ANY($1)", list(held))
        return all(token > held[shard] for shard, token in rows)

    # What this test checks is fencing, not how fast the takeover is (the
    # SIGKILL test times that): a slow machine gets a generous wait.
    wait_for(
        "the takeover of the stopped node's shards", taken_over, TTL_S + 30,
        diagnose=lambda: picture(procs),
    )  # fmt: skip
    (max_seq,) = pg(f"SELECT max(seq) FROM {s}.log")[0]
    assert time.monotonic() - stopped_at >= TTL_S * 0.75
    procs.signal(victim, signal.SIGCONT)
    wait_for("every order to end", lambda: all_terminal(s), 120, 0.2)
    time.sleep(2 * TTL_S)  # time for the woken node to act on what it held, if it would

    late = pg(
        f"SELECT txid, kind, shard, token FROM {s}.log WHERE node = $1 AND seq > $2",
        victim, max_seq,
    )  # fmt: skip
    assert [r for r in late if held.get(r[2]) == r[3]] == []
    ungranted = pg(
        f"SELECT l.txid, l.kind, l.node, l.shard, l.token FROM {s}.log l"
        f" LEFT JOIN {s}.lease_history h ON h.shard = l.shard AND h.token = l.token"
        " WHERE h.owner IS DISTINCT FROM l.node"
    )
    assert ungranted == []
    verify(procs)
    status = wait_for(
        "the woken node to notice", lambda: (st := procs.status(victim))["lost"] and st, 10
    )
    assert status["lost"] >= len(held)
    assert procs.children[victim].poll() is None  # alive, and it rejoined
    for name in NODES:
        assert procs.stop(name) == 0, procs.log(name)
