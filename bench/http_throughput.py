"""Transactions per second with the shop over HTTP (issue 3's figure).

    .venv/bin/python bench/http_throughput.py [--orders 10000] [--repeat 3]
        [--concurrency 100] [--fault-rate 0] [--latency-ms 0]

Each run is ``accord demo --http --json`` in a fresh directory: the
coordinator in that process, the four services in the ``accord services``
process it starts (each service with its own SQLite file, every participant
operation a durable local transaction through the barrier), 4-branch TCC,
8 signed HTTP calls per order. Printed per run and as the median over runs:
transactions/s, requests/s the services received, latency p50/p99, and CPU
per transaction in each process (the coordinator's, from its own clock; the
services', read from their ``/admin/usage`` before and after). With two
cores shared by both processes, their CPU per transaction adds up to the
ceiling: 2 s / (coordinator + services) transactions per second.

The machine's speed varies by a third or more over hours, so the machine
reference of ``bench/reference.py`` is printed before and after the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from reference import measure

ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]
COLUMNS = (
    ("tx/s", "throughput_tps"),
    ("requests/s", "requests_per_s"),
    ("p50 ms", "p50"),
    ("p99 ms", "p99"),
    ("coordinator us/tx", "cpu_us_per_txn"),
    ("services us/tx", "services_cpu_us_per_txn"),
)


def one(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    done = subprocess.run(
        [*ACCORD, "demo", "--http", "--orders", str(args.orders),
         "--concurrency", str(args.concurrency), "--fault-rate", str(args.fault_rate),
         "--latency-ms", str(args.latency_ms), "--data", str(data), "--json"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"accord demo failed ({done.returncode}): {done.stderr[-2000:]}")
    summary: dict[str, Any] = json.loads(done.stdout)
    if not all(summary["invariants"].values()):
        raise SystemExit(f"invariants failed: {summary['violations']}")
    summary.update(summary["latency_ms"])
    return summary


def row(label: str, values: list[float]) -> str:
    return f"{label:<8}" + "".join(f"{v:>20,.1f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(measure(), flush=True)
    print(f"{'run':<8}" + "".join(f"{name:>20}" for name, _ in COLUMNS))
    runs = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for n in range(args.repeat):
            summary = one(args, Path(tmp) / f"run{n}")
            runs.append([float(summary[key]) for _, key in COLUMNS])
            print(row(str(n + 1), runs[-1]), flush=True)
    medians = [statistics.median(column) for column in zip(*runs, strict=True)]
    print(row("median", medians))
    ceiling = 2e6 / (medians[4] + medians[5])
    print(f"two cores / CPU per transaction of both processes: {ceiling:,.0f} tx/s at most")
    print(measure())


if __name__ == "__main__":
    main()
