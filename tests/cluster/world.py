"""In-process clusters for the tests: nodes on one event loop, one PostgreSQL
schema, one in-memory shop, and a transport that records (and can hold) calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from accord.cluster import ClusterClient, ClusterNode
from accord.core.records import Decision
from accord.core.spec import Op, Protocol
from accord.sim import invariants
from accord.sim.faults import FaultConfig
from accord.sim.shop import Shop
from accord.sim.workload import ShopConfig, Workload, order_spec
from accord.transport.base import Call, Reply, Started, Transport

from .db import PG_DSN, pg

SHARDS = 16
TTL_S = 2.0


class Recording(Transport):
    """Notes every call a node sends: (node, txid, op, monotonic time). While
    ``held`` is set (not yet released), the participants apply what they are
    sent but the replies reach the node only once it is released, as with a
    paused process."""

    def __init__(self, inner: Transport, node: str, calls: list[tuple[str, str, Op, float]]):
        self.inner = inner
        self.node = node
        self.calls = calls
        self.held: asyncio.Event | None = None
        self.check: Callable[[Call], None] | None = None

    def start(self, call: Call) -> Started:
        self.calls.append((self.node, call.txid, call.op, time.monotonic()))
        if self.check is not None:
            self.check(call)
        if self.held is not None:
            return self._late(call, self.held)
        return self.inner.start(call)

    async def _late(self, call: Call, held: asyncio.Event) -> Reply:
        reply = await self.inner.call(call)
        await held.wait()
        return reply

    async def call(self, call: Call) -> Reply:
        return await self.inner.call(call)

    async def close(self) -> None:
        await self.inner.close()


class World:
    """A shop, its workload and the nodes of one cluster."""

    def __init__(self, schema: str, orders: int, latency_ms: float, seed: int = 5) -> None:
        self.schema = schema
        self.workload = Workload(ShopConfig(orders=orders, seed=seed))
        self.shop = Shop.create(self.workload.initial_state(), None)
        self.latency_ms = latency_ms
        self.nodes: dict[str, ClusterNode] = {}
        self.transports: dict[str, Recording] = {}
        self.calls: list[tuple[str, str, Op, float]] = []
        self.specs = [order_spec(o, Protocol.TCC) for o in self.workload.orders]
        # Commit decisions the log acknowledged as durable, and confirms sent before that.
        self.durable: set[str] = set()
        self.early: list[str] = []

    async def node(self, name: str, **kw: Any) -> ClusterNode:
        transport = Recording(
            self.shop.transport(FaultConfig(0.0, self.latency_ms), len(self.nodes)),
            name,
            self.calls,
        )
        kw = {"shards": SHARDS, "ttl_s": TTL_S, "max_in_flight": 40, **kw}
        node = ClusterNode(PG_DSN, transport, node_id=name, schema=self.schema, **kw)
        self.transports[name] = transport
        await node.start()
        self.nodes[name] = node
        return node

    async def settled(self, *names: str, timeout_s: float = 15.0) -> None:
        """Until the named nodes together hold every shard, all ready, evenly."""
        deadline = time.monotonic() + timeout_s
        target = -(-SHARDS // len(names))
        while True:
            owned = [self.nodes[n].owned() for n in names]
            if (
                sum(len(o) for o in owned) == SHARDS
                and all(len(o) <= target for o in owned)
                and all(state == "ready" for o in owned for state in o.values())
            ):
                return
            assert time.monotonic() < deadline, f"not settled: {[len(o) for o in owned]}"
            await asyncio.sleep(0.05)

    async def check(self) -> dict[str, Any]:
        """Every order terminal, the invariants hold."""
        client = ClusterClient(PG_DSN, schema=self.schema)
        await client.open()
        try:
            snaps = await client.store.snapshots()
        finally:
            await client.close()
        report = invariants.check(self.shop.views(), {s.txid: s for s in snaps})
        assert report.ok, {k: v[:5] for k, v in report.violations.items() if v}
        assert report.duplicates_applied == 0
        return {s.txid: s for s in snaps}

    def watch_decisions(self, name: str) -> None:
        """Note every commit decision once the node's log acknowledged its batch
        as committed, or once the node read it back from the log (a batch whose
        COMMIT went through unacknowledged, then resumed from the log, by this
        node or another), and every confirm the node sends before that."""
        store = self.nodes[name].store
        commit = store._commit_with_retries
        load = store.load_active

        async def loaded(*args: Any, **kwargs: Any) -> Any:
            snaps = await load(*args, **kwargs)
            self.durable.update(s.txid for s in snaps if s.decision is Decision.COMMIT)
            return snaps

        async def acknowledged(batch: list[tuple[Any, ...]]) -> Any:
            result = await commit(batch)
            refused = {id(r) for r in result[2]}
            for r in batch:
                if r[1] == "decided" and b'"decision":"commit"' in r[3] and id(r) not in refused:
                    self.durable.add(r[0])
            return result

        def check(call: Call) -> None:
            if call.op is Op.CONFIRM and call.txid not in self.durable:
                self.early.append(call.txid)

        store._commit_with_retries = acknowledged  # type: ignore[method-assign]
        store.load_active = loaded  # type: ignore[method-assign]
        self.transports[name].check = check

    def cut_decision_writes(self, name: str, times: int, when: str) -> list[int]:
        """Kill (pg_terminate_backend) the connection of the node's next ``times``
        batches that carry a decision, ``before`` or ``after`` writing it (before
        the commit). Returns the pids killed."""
        store = self.nodes[name].store
        write = store._write_batch
        killed: list[int] = []

        async def cut(conn: Any) -> None:
            pid = conn.get_server_pid()
            killed.append(pid)
            await asyncio.to_thread(pg, "SELECT pg_terminate_backend($1, 5000)", pid)

        async def writing(conn: Any, rows: list[tuple[Any, ...]]) -> Any:
            decides = any(r[1] == "decided" for r in rows)
            if decides and when == "before" and len(killed) < times:
                await cut(conn)
            result = await write(conn, rows)
            if decides and when == "after" and len(killed) < times:
                await cut(conn)
            return result

        store._write_batch = writing  # type: ignore[method-assign]
        return killed

    async def stall(self, name: str) -> tuple[set[int], asyncio.Event]:
        """Freeze a node as a paused process: its lease loop, watchdog and inbox
        stop, replies to its calls wait. Returns its shards and the release."""
        node = self.nodes[name]
        held = self.transports[name].held = asyncio.Event()
        for task in list(node._tasks):
            task.cancel()
        await asyncio.sleep(0.3)  # its runs are all waiting for a reply now
        return set(node.owned()), held

    async def close(self) -> None:
        for held in (t.held for t in self.transports.values()):
            if held is not None:
                held.set()
        for node in self.nodes.values():
            await node.close(drain=False)
        await self.shop.close()


def writers(schema: str) -> dict[str, set[str]]:
    """txid -> the nodes that wrote its records."""
    out: dict[str, set[str]] = {}
    for txid, node in pg(f"SELECT txid, node FROM {schema}.log"):
        out.setdefault(txid, set()).add(node)
    return out
