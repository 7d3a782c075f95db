"""CPU per call of the participant barrier on SQLite, without HTTP.

    .venv/bin/python bench/barrier.py [--calls 20000] [--repeat 3]

Each round runs ``--calls`` TCC tries, 100 at a time, then the confirm of
each, through one ``SQLiteBarrier`` (synchronous=NORMAL), with a handler
that updates one counter row: once with group commit on the loop's thread
(as ``accord services`` runs it) and once with a pool of 4 threads, each call
its own transaction. Prints the process's CPU microseconds per call (median
over ``--repeat`` rounds). To compare two commits, run it with
``PYTHONPATH=<worktree>/src`` for each.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from accord.core.spec import Op
from accord.participant import SQLiteBarrier

IN_FLIGHT = 100


def bump(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE counter SET v = v + 1 WHERE k = 'x'")


async def one(directory: Path, calls: int, repeat: int, *, grouped: bool) -> float:
    barrier = SQLiteBarrier(
        directory / f"{grouped}.db",
        synchronous="NORMAL",
        max_workers=0 if grouped else 4,
        group_commit=grouped,
    )
    await barrier.migrate()
    with sqlite3.connect(directory / f"{grouped}.db", isolation_level=None) as conn:
        conn.execute("CREATE TABLE counter (k TEXT PRIMARY KEY, v INTEGER)")
        conn.execute("INSERT INTO counter VALUES ('x', 0)")
    rounds = []
    for r in range(repeat):
        started = time.process_time()
        for first in range(0, calls, IN_FLIGHT):
            ids = [f"t{r}-{i}" for i in range(first, min(first + IN_FLIGHT, calls))]
            for op in (Op.TRY, Op.CONFIRM):
                await asyncio.gather(*(barrier.run(txid, "b", op, bump) for txid in ids))
        rounds.append((time.process_time() - started) / (2 * calls) * 1e6)
    await barrier.close()
    return statistics.median(rounds)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for grouped in (True, False):
            us = await one(Path(tmp), args.calls, args.repeat, grouped=grouped)
            label = "group commit, loop thread" if grouped else "4 threads, one txn per call"
            print(f"{label:<28} {us:6.1f} us of CPU per call")


if __name__ == "__main__":
    asyncio.run(main())
