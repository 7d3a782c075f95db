"""Figures of a cluster of coordinators on one PostgreSQL log.

    .venv/bin/python bench/cluster.py throughput [--nodes 1 2 4] [--orders 2000] [--null]
    .venv/bin/python bench/cluster.py failover [--kills 10] [--ttl 2]

throughput: for each node count, a fresh schema, the shop's services as one
`accord services` process (no faults, no injected latency), that many
`accord cluster node` processes sharing the shards; once they settled, every
order goes into the inbox at once and the clock runs until the last one is
terminal. Prints transactions per second, latency (Begin to End in the log),
and the CPU each group of processes spent per transaction: the nodes, the
services, and the PostgreSQL backends serving this run's connections. With
--null the participants are not called (every call succeeds at once): the
coordinators and the log alone. The invariants are checked after each run
with the shop.

failover: three nodes under a steady load (20 ms of injected latency per call,
so transactions are in flight); --kills times, SIGKILL the node with the most
open transactions, measure (database clock) until another node holds each of
its shards (takeover) and until every transaction it had open has a record
written by another node (resume), then start a replacement node and let the
cluster settle. Prints each kill and the median and maximum.

PostgreSQL: ACCORD_BENCH_PG_DSN (default postgresql://postgres@127.0.0.1/test).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from accord.cli.cluster import verify_cluster
from accord.cluster import ClusterClient
from accord.core.spec import BranchSpec, Protocol, RetryPolicy, TransactionSpec
from accord.sim.demo import HTTP_CALL_TIMEOUT_S
from accord.sim.http_demo import free_port, load_secret
from accord.sim.workload import ShopConfig, Workload, order_spec

ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]
NULL_NODE = Path(__file__).with_name("null_node.py")
DSN = os.environ.get("ACCORD_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1/test")
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S


class Run:
    """One schema, one shop, some nodes: started, measured, torn down."""

    def __init__(self, tmp: Path, *, orders: int, seed: int, latency_ms: float, null: bool):
        self.tmp = tmp
        self.schema = f"bench_{uuid.uuid4().hex[:12]}"
        self.store = f"{DSN}?schema={self.schema}"
        self.orders = orders
        self.seed = seed
        self.null = null
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = tmp / "secret"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.latency_ms = latency_ms

    def _spawn(self, name: str, args: list[str], command: list[str] = ACCORD) -> None:
        with (self.tmp / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [*command, *args], stdout=log, stderr=subprocess.STDOUT
            )

    async def start_services(self) -> None:
        if self.null:
            return
        self._spawn(
            "services",
            ["services", "--data", str(self.tmp / "shop"), "--port", str(self.port),
             "--orders", str(self.orders), "--seed", str(self.seed),
             "--latency-ms", str(self.latency_ms), "--secret-file", str(self.secret)],
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("the services did not start") from None
                await asyncio.sleep(0.1)

    def start_node(self, name: str, *, shards: int, ttl_s: float, concurrency: int) -> None:
        common = ["--store", self.store, "--node-id", name, "--shards", str(shards),
                  "--lease-ttl", str(ttl_s), "--concurrency", str(concurrency),
                  "--log-level", "WARNING"]  # fmt: skip
        if self.null:
            self._spawn(name, [str(NULL_NODE), *common], command=[sys.executable])
        else:
            shop = ["--services-url", self.url, "--secret-file", str(self.secret)]
            self._spawn(name, ["cluster", "node", *common, *shop])

    async def settled(
        self, conn: Any, nodes: list[str], shards: int, timeout_s: float = 60
    ) -> None:
        """Until exactly these nodes hold every shard, and hold steady for a second."""
        deadline = time.monotonic() + timeout_s
        steady_since = None
        while True:
            rows = []
            with suppress(asyncpg.UndefinedTableError):
                rows = await conn.fetch(
                    f"SELECT owner, count(*) FROM {self.schema}.shard_lease"
                    " WHERE expires_at > now() GROUP BY owner"
                )
            owned = {r[0]: r[1] for r in rows}
            ok = sum(owned.values()) == shards and set(owned) == set(nodes)
            if ok and max(owned.values()) <= -(-shards // len(nodes)):
                steady_since = steady_since or time.monotonic()
                if time.monotonic() - steady_since > 1.0:
                    return
            else:
                steady_since = None
            if time.monotonic() > deadline:
                raise SystemExit(f"the nodes did not settle: {owned}")
            await asyncio.sleep(0.1)

    def specs(self, first: int = 0, count: int | None = None) -> list[TransactionSpec]:
        if self.null:
            return [
                null_spec(f"null-{self.seed}-{i:07d}")
                for i in range(first, first + (count or self.orders))
            ]
        workload = Workload(ShopConfig(orders=self.orders, seed=self.seed))
        chosen = workload.orders[first : first + count if count else self.orders]
        return [
            order_spec(o, Protocol.TCC, call_timeout_s=HTTP_CALL_TIMEOUT_S, base_url=self.url)
            for o in chosen
        ]

    async def backend_pids(self, conn: Any) -> list[int]:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1",
            f"accord-%{self.schema}%",
        )
        return [r[0] for r in rows]

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    async def drop(self, conn: Any) -> None:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1",
            f"accord-%{self.schema}%",
        )
        await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def null_spec(txid: str) -> TransactionSpec:
    """A 4-branch TCC transaction whose participants the --null nodes never call."""
    retry = RetryPolicy(maximum_interval_s=1.0, maximum_attempts=60)
    return TransactionSpec(
        protocol=Protocol.TCC,
        id=txid,
        branches=tuple(
            BranchSpec(name, name, {"n": 1}, retry, timeout_s=HTTP_CALL_TIMEOUT_S)
            for name in ("order", "inventory", "payment", "shipping")
        ),
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def throughput_once(
    tmp: Path, nodes: int, args: argparse.Namespace, conn: Any
) -> dict[str, Any]:
    run = Run(tmp, orders=args.orders, seed=args.seed, latency_ms=0.0, null=args.null)
    try:
        await run.start_services()
        names = [f"n{i + 1}" for i in range(nodes)]
        per_node = max(args.concurrency // nodes, 1) if args.split else args.concurrency
        for name in names:
            run.start_node(name, shards=args.shards, ttl_s=args.ttl, concurrency=per_node)
        await run.settled(conn, names, args.shards)
        specs = run.specs()
        async with ClusterClient(DSN, schema=run.schema) as client:
            pg_pids = await run.backend_pids(conn)
            before = {name: cpu_s(p.pid) for name, p in run.procs.items()}
            pg_before = {pid: cpu_s(pid) for pid in pg_pids}
            started = time.perf_counter()
            await client.submit_many(specs)
            s = run.schema
            while True:
                row = await conn.fetchrow(
                    f"SELECT (SELECT count(*) FROM {s}.txn_open),"
                    f" (SELECT count(*) FROM {s}.inbox),"
                    f" (SELECT count(*) FROM {s}.log WHERE kind = 'end')"
                )
                if row[0] == 0 and row[1] == 0 and row[2] >= len(specs):
                    break
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
            after = {name: cpu_s(p.pid) for name, p in run.procs.items()}
            pg_pids_now = await run.backend_pids(conn)
            pg_cpu = sum(
                cpu_s(pid) - pg_before.get(pid, 0.0) for pid in set(pg_pids) | set(pg_pids_now)
            )
        spans = await conn.fetch(
            f"SELECT max(at_ms) FILTER (WHERE kind = 'end')"
            f" - min(at_ms) FILTER (WHERE kind = 'begin') FROM {s}.log GROUP BY txid"
        )
        latency_ms = [float(r[0]) for r in spans]
        by_node = await conn.fetch(
            f"SELECT node, count(*) FROM {s}.log WHERE kind = 'begin' GROUP BY node ORDER BY node"
        )
        node_cpu = sum(after[n] - before[n] for n in names)
        services_cpu = after.get("services", 0.0) - before.get("services", 0.0)
        n = len(specs)
        result: dict[str, Any] = {
            "nodes": nodes,
            "orders": n,
            "tps": round(n / elapsed, 1),
            "duration_s": round(elapsed, 2),
            "latency_ms_p50": pct(latency_ms, 0.5),
            "latency_ms_p99": pct(latency_ms, 0.99),
            "begun_by_node": {r[0]: r[1] for r in by_node},
            "cpu_ms_per_txn": {
                "nodes": round(node_cpu / n * 1000, 2),
                "services": round(services_cpu / n * 1000, 2),
                "postgres": round(pg_cpu / n * 1000, 2),
            },
        }
        if not args.null:
            check = await verify_cluster(DSN, s, run.url, load_secret(run.secret))
            result["committed"] = check["committed"]
            result["invariants"] = all(check["invariants"].values()) and check["stuck"] == 0
        return result
    finally:
        run.stop()
        await run.drop(conn)


async def throughput(args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(DSN)
    results: list[dict[str, Any]] = []
    try:
        for i in range(args.repeat):
            for nodes in args.nodes:
                with tempfile.TemporaryDirectory() as tmp:
                    r = await throughput_once(Path(tmp), nodes, args, conn)
                results.append(r)
                print(f"  run {i + 1}: {json.dumps(r)}", flush=True)
    finally:
        await conn.close()
    what = "null participants" if args.null else "the shop over HTTP"
    per = "in all" if args.split else "per node"
    print(
        f"\n{what}, {args.orders} orders, {args.concurrency} in flight {per},"
        f" {args.shards} shards, median of {args.repeat}:"
    )
    head = f"{'nodes':>5} {'tx/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
    print(f"{head}   CPU ms/txn: nodes services postgres")
    for nodes in args.nodes:
        mine = [r for r in results if r["nodes"] == nodes]
        med = statistics.median_low([r["tps"] for r in mine])
        r = next(x for x in mine if x["tps"] == med)
        c = r["cpu_ms_per_txn"]
        ok = "" if r.get("invariants", True) else "   INVARIANTS FAILED"
        print(
            f"{nodes:>5} {r['tps']:>8.1f} {r['latency_ms_p50']:>8.0f} {r['latency_ms_p99']:>8.0f}"
            f"   {c['nodes']:>16} {c['services']:>8} {c['postgres']:>8}{ok}"
        )


async def failover(args: argparse.Namespace) -> None:
    per_round = args.orders_per_round
    total = per_round * (args.kills + 1)
    conn = await asyncpg.connect(DSN)
    kills: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp), orders=total, seed=args.seed, latency_ms=20.0, null=False)
        try:
            await run.start_services()
            live = ["n1", "n2", "n3"]
            for name in live:
                run.start_node(name, shards=args.shards, ttl_s=args.ttl, concurrency=20)
            await run.settled(conn, live, args.shards)
            s = run.schema
            async with ClusterClient(DSN, schema=s) as client:
                for k in range(args.kills):
                    await client.submit_many(run.specs(k * per_round, per_round))
                    victim, lost, open_then = await busiest(conn, s, at_least=10)
                    killed_at = await conn.fetchval("SELECT clock_timestamp()")
                    run.procs[victim].send_signal(signal.SIGKILL)
                    run.procs[victim].wait()
                    takeover_s, resume_s = await measure(
                        conn, s, victim, lost, open_then, killed_at
                    )
                    kills.append(
                        {"victim": victim, "open": len(open_then), "takeover_s": takeover_s,
                         "resume_s": resume_s}
                    )  # fmt: skip
                    print(f"  kill {k + 1}: {json.dumps(kills[-1])}", flush=True)
                    live.remove(victim)
                    fresh = f"n{k + 4}"
                    run.start_node(fresh, shards=args.shards, ttl_s=args.ttl, concurrency=20)
                    live.append(fresh)
                    await run.settled(conn, live, args.shards)
                await client.submit_many(run.specs(args.kills * per_round, per_round))
                begun = total
                while True:
                    row = await conn.fetchrow(
                        f"SELECT (SELECT count(*) FROM {s}.txn_open),"
                        f" (SELECT count(*) FROM {s}.inbox),"
                        f" (SELECT count(*) FROM {s}.log WHERE kind = 'begin')"
                    )
                    if row[0] == 0 and row[1] == 0 and row[2] >= begun:
                        break
                    await asyncio.sleep(0.1)
            check = await verify_cluster(DSN, s, run.url, load_secret(run.secret))
        finally:
            run.stop()
            await run.drop(conn)
            await conn.close()
    takeovers = [k["takeover_s"] for k in kills]
    resumes = [k["resume_s"] for k in kills]
    print(
        f"\n{args.kills} kills, lease TTL {args.ttl} s, {args.shards} shards, three nodes:"
        f"\n  takeover (another node holds every shard of the killed one):"
        f" median {statistics.median(takeovers):.2f} s, max {max(takeovers):.2f} s"
        f"\n  resume (every transaction it had open has a record by another node):"
        f" median {statistics.median(resumes):.2f} s, max {max(resumes):.2f} s"
        f"\n  {check['transactions']} transactions, {check['committed']} committed,"
        f" stuck {check['stuck']}, invariants"
        f" {'hold' if all(check['invariants'].values()) else 'FAIL: ' + str(check['violations'])}"
    )


async def busiest(conn: Any, schema: str, at_least: int) -> tuple[str, list[int], set[str]]:
    deadline = time.monotonic() + 60
    while True:
        rows = await conn.fetch(
            f"SELECT l.owner, count(*) FROM {schema}.txn_open o JOIN {schema}.shard_lease l"
            " ON l.shard = o.shard WHERE l.expires_at > now() GROUP BY l.owner ORDER BY 2 DESC"
        )
        if rows and rows[0][1] >= at_least:
            victim = rows[0][0]
            lost = [
                r[0]
                for r in await conn.fetch(
                    f"SELECT shard FROM {schema}.shard_lease WHERE owner = $1", victim
                )
            ]
            open_then = {
                r[0]
                for r in await conn.fetch(
                    f"SELECT txid FROM {schema}.txn_open WHERE shard = ANY($1)", lost
                )
            }
            return victim, lost, open_then
        if time.monotonic() > deadline:
            raise SystemExit("no node got busy")
        await asyncio.sleep(0.01)


async def measure(
    conn: Any, schema: str, victim: str, lost: list[int], open_then: set[str], killed_at: Any
) -> tuple[float, float]:
    """(takeover s, resume s) after the kill, by the database's clock and the
    records' own times (one machine, one clock)."""
    killed_ms = killed_at.timestamp() * 1000
    deadline = time.monotonic() + 120
    takeover_s = None
    while True:
        if takeover_s is None:
            row = await conn.fetchrow(
                f"SELECT max(acquired_at), count(*) FROM {schema}.shard_lease"
                " WHERE shard = ANY($1) AND owner IS DISTINCT FROM $2 AND expires_at > now()",
                lost,
                victim,
            )
            if row[1] == len(lost):
                takeover_s = (row[0] - killed_at).total_seconds()
        rows = await conn.fetch(
            f"SELECT txid, min(at_ms) FILTER (WHERE node <> $2),"
            f" bool_or(kind = 'end' AND node = $2) FROM {schema}.log"
            " WHERE txid = ANY($1) GROUP BY txid",
            list(open_then),
            victim,
        )
        # A transaction the victim itself ended just before dying resumes nowhere.
        pending = [r for r in rows if r[1] is None and not r[2]]
        if takeover_s is not None and not pending:
            resumed = [r[1] for r in rows if r[1] is not None]
            resume_s = (max(resumed) - killed_ms) / 1000 if resumed else takeover_s
            return round(takeover_s, 3), round(resume_s, 3)
        if time.monotonic() > deadline:
            raise SystemExit(f"not resumed after 120 s: {len(pending)} transactions")
        await asyncio.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4])
    t.add_argument("--orders", type=int, default=2000)
    t.add_argument("--concurrency", type=int, default=100)
    t.add_argument("--repeat", type=int, default=1)
    t.add_argument("--null", action="store_true", help="participants answer at once, uncalled")
    t.add_argument(
        "--split", action="store_true", help="--concurrency is the total, split between nodes"
    )
    f = sub.add_parser("failover")
    f.add_argument("--kills", type=int, default=10)
    f.add_argument("--orders-per-round", type=int, default=200)
    for p in (t, f):
        p.add_argument("--shards", type=int, default=256)
        p.add_argument("--ttl", type=float, default=None)
        p.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.ttl is None:
        args.ttl = 5.0 if args.what == "throughput" else 2.0
    asyncio.run(throughput(args) if args.what == "throughput" else failover(args))


if __name__ == "__main__":
    main()
