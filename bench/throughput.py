"""Throughput of the reference scenario with in-process services.

    .venv/bin/python bench/throughput.py [--orders 20000] [--repeat 3] [--protocol tcc]

Runs the demo workload with no injected faults or latency, 100 in flight,
for each log configuration side by side (SQLite synchronous=FULL, SQLite
NORMAL, memory), `--repeat` times each, interleaved, and prints the median
throughput, latency and the group-commit batch size. Figures, not asserts:
this machine is noisy, so compare configurations within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

from accord.cli.app import tune_gc
from accord.sim.demo import DemoConfig, run_demo

# log x services: the services persist their ledgers (as in `accord demo`)
# or keep them in memory, which isolates the coordinator's own cost.
CONFIGS: dict[str, dict[str, object]] = {
    "FULL, svc db": {"synchronous": "FULL"},
    "NORMAL, svc db": {"synchronous": "NORMAL"},
    "FULL, svc mem": {"synchronous": "FULL", "services_in_memory": True},
    "memory, svc mem": {"store": "memory", "services_in_memory": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--protocol", default="tcc")
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    tune_gc()  # as the accord command does
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            for name, extra in CONFIGS.items():
                config = DemoConfig(
                    orders=args.orders,
                    concurrency=args.concurrency,
                    protocol=args.protocol,
                    fault_rate=0.0,
                    latency_ms=0.0,
                    seed=1,
                    data=str(Path(tmp) / f"{name.replace(' ', '-')}-{i}"),
                    **extra,
                )
                summary = asyncio.run(run_demo(config))
                if not all(summary["invariants"].values()):
                    raise SystemExit(f"invariant violated in {name}: {summary['violations']}")
                runs[name].append(summary)
                print(f"  run {i + 1} {name:16s} {summary['throughput_tps']:8.0f} tx/s", flush=True)
    print(
        f"\n{args.protocol}, {args.orders} orders, {args.concurrency} in flight,"
        f" median of {args.repeat}:"
    )
    print(
        f"{'log, services':16s} {'tx/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'records/commit':>15s}"
    )
    for name, rs in runs.items():
        print(
            f"{name:16s} {statistics.median(r['throughput_tps'] for r in rs):8.0f}"
            f" {statistics.median(r['latency_ms']['p50'] for r in rs):8.1f}"
            f" {statistics.median(r['latency_ms']['p99'] for r in rs):8.1f}"
            f" {statistics.median(r['records_per_batch'] for r in rs):15.1f}"
        )


if __name__ == "__main__":
    main()
