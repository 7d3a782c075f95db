"""How long the log's status reads take on a big log: counts and listings.

    .venv/bin/python bench/log_reads.py [--orders 20000] [--pg DSN|none]

Fills a log with ``accord demo --services memory --fault-rate 0`` (SQLite in a
temporary directory, and PostgreSQL in a fresh schema unless ``--pg none``),
then times, best of 3: ``count_by_status()`` (what ``/v1/stats`` and the
dashboard show), a listing of a status no transaction has
(``list(status=needs_attention)``), a page of 100 of a common status
(``list(status=committed)``) and a page of 100 of any status (``list()``).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from throughput import drop_schema

from accord.core.records import TxnStatus
from accord.log import PostgresStore, SQLiteStore, Store

ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]


def fill(orders: int, data: Path, store_url: str | None = None) -> None:
    extra = ["--store", store_url] if store_url else []
    done = subprocess.run(
        [*ACCORD, "demo", "--services", "memory", "--fault-rate", "0", "--latency-ms", "0",
         "--orders", str(orders), "--data", str(data), "--json", *extra],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"accord demo failed: {done.stderr[-2000:]}")


async def best_of_3(fn: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    return min(times) * 1000


async def measure(name: str, store: Store) -> None:
    await store.open()
    try:
        reads: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("count_by_status", store.count_by_status),
            ("list(needs_attention)", lambda: store.list(status=TxnStatus.NEEDS_ATTENTION)),
            ("list(committed), 100", lambda: store.list(status=TxnStatus.COMMITTED)),
            ("list(), 100", store.list),
        ]
        for what, fn in reads:
            print(f"{name:11} {what:24} {await best_of_3(fn):8.1f} ms", flush=True)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fill(args.orders, Path(tmp) / "sqlite")
        asyncio.run(measure("SQLite", SQLiteStore(Path(tmp) / "sqlite" / "coordinator.db")))
        if args.pg != "none":
            schema = f"bench_{uuid.uuid4().hex[:12]}"
            try:
                fill(args.orders, Path(tmp) / "pg", f"{args.pg}?schema={schema}")
                asyncio.run(measure("PostgreSQL", PostgresStore(args.pg, schema=schema)))
            finally:
                asyncio.run(drop_schema(args.pg, schema))
    print(f"{args.orders} transactions in the log")


if __name__ == "__main__":
    main()
