"""The coordinator's own cost: 4-branch TCC against trivial participants.

    .venv/bin/python bench/core.py [--orders 20000] [--repeat 3]

No simulated shop: each participant answers OK at once, so what is measured is
the coordinator, the state machine and the log. Each configuration (memory
log, SQLite FULL, SQLite NORMAL, PostgreSQL) runs in a fresh process, interleaved,
``--repeat`` times; prints throughput, CPU and wall microseconds per
transaction and records per group commit, then the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from accord import (
    BranchSpec,
    Call,
    Coordinator,
    InProcessTransport,
    MemoryStore,
    Outcome,
    Protocol,
    Reply,
    SQLiteStore,
    Store,
    TransactionSpec,
)
from accord.cli._loop import run
from accord.cli.app import tune_gc
from accord.log.postgres import PostgresStore

CONFIGS = ["memory", "FULL", "NORMAL", "postgres"]
# PostgreSQL: a fresh schema per run in this database (PGDSN overrides).
PG_DSN = os.environ.get("PGDSN", "postgresql://postgres@127.0.0.1/test")


async def one(kind: str, orders: int, path: Path) -> dict[str, float]:
    tune_gc()
    ok = Reply(Outcome.OK)

    def participant(call: Call) -> Reply:
        return ok

    store: Store
    if kind == "memory":
        store = MemoryStore()
    elif kind == "postgres":
        store = PostgresStore(PG_DSN, schema=f"bench_core_{os.getpid()}")
    else:
        store = SQLiteStore(path / "log.db", synchronous=kind)
    transport = InProcessTransport({f"p{i}": participant for i in range(4)})
    coordinator = Coordinator(store, transport, max_in_flight=100)
    specs = [
        TransactionSpec(
            protocol=Protocol.TCC,
            branches=tuple(BranchSpec(f"b{i}", f"p{i}", {"sku": "s", "qty": 1}) for i in range(4)),
            id=f"t{j}",
        )
        for j in range(orders)
    ]
    await coordinator.start()
    wall, cpu = time.perf_counter(), time.process_time()
    futures = [await coordinator.submit(spec) for spec in specs]
    for fut in futures:
        await fut
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stats = store.stats()
    await coordinator.close()
    if kind == "postgres":
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f"DROP SCHEMA bench_core_{os.getpid()} CASCADE")
        await conn.close()
    return {
        "tps": orders / wall,
        "cpu_us": cpu / orders * 1e6,
        "wall_us": wall / orders * 1e6,
        "records_per_batch": stats.records_per_batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run(one(args.one, args.orders, Path(tmp)))))
        return
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in CONFIGS}
    for i in range(args.repeat):
        for kind in CONFIGS:
            cmd = [sys.executable, __file__, "--one", kind, "--orders", str(args.orders)]
            out = json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout)
            runs[kind].append(out)
            print(
                f"  run {i + 1} {kind:7s} {out['tps']:7.0f} tx/s  cpu {out['cpu_us']:5.0f} us"
                f"  wall {out['wall_us']:5.0f} us  {out['records_per_batch']:5.1f} rec/batch",
                flush=True,
            )
    print(f"\nmedians, {args.orders} 4-branch TCC transactions, 100 in flight:")
    for kind, outs in runs.items():
        med = {k: statistics.median(o[k] for o in outs) for k in outs[0]}
        print(
            f"  {kind:7s} {med['tps']:7.0f} tx/s  cpu {med['cpu_us']:5.0f} us/txn"
            f"  wall {med['wall_us']:5.0f} us/txn  {med['records_per_batch']:5.1f} rec/batch"
        )


if __name__ == "__main__":
    main()
