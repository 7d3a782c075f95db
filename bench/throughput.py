"""Throughput of the reference scenario with in-process services.

    .venv/bin/python bench/throughput.py [--orders 20000] [--repeat 3] [--protocol tcc]

Runs `accord demo --fault-rate 0 --latency-ms 0 --concurrency 100` in a fresh
process for each configuration of the log (SQLite FULL or NORMAL, memory, and
PostgreSQL unless `--pg none`) and of the simulated services, side
by side and interleaved, `--repeat` times each, and prints the median
throughput, CPU microseconds per transaction (of the demo's process: coordinator,
log and in-process services; not PostgreSQL's), latency and group-commit batch
size. Figures, not asserts: this
machine is noisy, so compare configurations measured within one run; the
machine reference of ``bench/reference.py`` is printed before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from reference import measure

ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]

# log x services. "svc db": each service group-commits its ledger to its own
# SQLite file before replying (as `accord demo` runs); "svc mem": services in
# memory, which isolates the coordinator's own cost.
CONFIGS: dict[str, list[str]] = {
    "FULL, svc db": ["--synchronous", "FULL"],
    "NORMAL, svc db": ["--synchronous", "NORMAL"],
    "FULL, svc mem": ["--synchronous", "FULL", "--services", "memory"],
    "memory, svc mem": ["--store", "memory", "--services", "memory"],
}


async def drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--protocol", default="tcc")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument(
        "--pg",
        default="postgresql://postgres@127.0.0.1/test",
        help="also the log in this PostgreSQL database (a fresh schema per run,"
        " dropped after it); 'none' to skip",
    )
    args = parser.parse_args()
    configs = dict(CONFIGS)
    if args.pg != "none":
        configs["postgres, svc mem"] = ["--services", "memory"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    print(measure(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for n, (name, options) in enumerate(configs.items()):
                schema = f"bench_{uuid.uuid4().hex[:12]}"
                extra = list(options)
                if name.startswith("postgres"):
                    extra += ["--store", f"{args.pg}?schema={schema}"]
                cmd = [
                    *ACCORD, "demo", "--orders", str(args.orders),
                    "--concurrency", str(args.concurrency), "--protocol", args.protocol,
                    "--fault-rate", "0", "--latency-ms", "0", "--json",
                    "--data", str(Path(tmp) / f"run-{i}-{n}"), *extra,
                ]  # fmt: skip
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if name.startswith("postgres"):
                    asyncio.run(drop_schema(args.pg, schema))
                if done.returncode != 0:
                    raise SystemExit(f"{name}: exit {done.returncode}: {done.stderr[-2000:]}")
                summary = json.loads(done.stdout)
                runs[name].append(summary)
                print(
                    f"  run {i + 1} {name:17s} {summary['throughput_tps']:8.0f} tx/s"
                    f" {summary['cpu_us_per_txn']:6.0f} cpu us/txn",
                    flush=True,
                )
    print(
        f"\n{args.protocol}, {args.orders} orders, {args.concurrency} in flight,"
        f" no faults, median of {args.repeat}:"
    )
    header = ("log, services", "tx/s", "cpu us/txn", "p50 ms", "p99 ms", "records/commit")
    print(
        f"{header[0]:17s} {header[1]:>8s} {header[2]:>10s} {header[3]:>8s} {header[4]:>8s}"
        f" {header[5]:>15s}"
    )
    for name, rs in runs.items():
        print(
            f"{name:17s} {statistics.median(r['throughput_tps'] for r in rs):8.0f}"
            f" {statistics.median(r['cpu_us_per_txn'] for r in rs):10.0f}"
            f" {statistics.median(r['latency_ms']['p50'] for r in rs):8.1f}"
            f" {statistics.median(r['latency_ms']['p99'] for r in rs):8.1f}"
            f" {statistics.median(r['records_per_batch'] for r in rs):15.1f}"
        )
    print(measure())


if __name__ == "__main__":
    main()
