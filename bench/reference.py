"""How fast this machine is right now, in the brief's two reference units.

    .venv/bin/python bench/reference.py

The 2-core VM these figures come from varies in speed by a third or more
from hour to hour, so a figure alone says little. Measured next to it, these
two say which kind of hour it was:

* CPU: a fixed pure-Python loop, a checkout saga as four plain function
  calls, each a dict update (no validation, no I/O: lighter than the
  brief's ~270,000/s saga, so only compare it with itself);
* disk: SQLite commits (WAL, ``synchronous=FULL``, one small row each), the
  brief's ~9,000/s.

Other benches import :func:`measure` and print it beside their own figures.
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

BRIEF_COMMITS_PER_S = 9_000


def saga_per_s(seconds: float = 0.5) -> float:
    """Plain-function 4-step checkout sagas per second."""
    stock = {"sku": 10**12}
    money = {"cust": 10**12}
    orders: dict[int, str] = {}
    slots = {"day": 0}

    def order(n: int) -> None:
        orders[n] = "placed"

    def inventory(n: int) -> None:
        stock["sku"] -= 1

    def payment(n: int) -> None:
        money["cust"] -= 5

    def shipping(n: int) -> None:
        slots["day"] += 1

    steps = (order, inventory, payment, shipping)
    n = 0
    started = time.perf_counter()
    deadline = started + seconds
    while True:
        for _ in range(1000):
            for step in steps:
                step(n)
            n += 1
        if time.perf_counter() >= deadline:
            return n / (time.perf_counter() - started)


def commits_per_s(seconds: float = 1.0) -> float:
    """SQLite commits per second (WAL, synchronous=FULL) in a fresh file here."""
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        conn = sqlite3.connect(Path(tmp) / "ref.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
        n = 0
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t (v) VALUES ('x')")
            conn.execute("COMMIT")
            n += 1
        elapsed = time.perf_counter() - started
        conn.close()
        return n / elapsed


def measure() -> str:
    """One line: both references (the disk's against the brief's figure)."""
    saga = saga_per_s()
    commits = commits_per_s()
    return (
        f"machine now: CPU loop {saga / 1e6:.2f} M sagas/s, SQLite FULL commits"
        f" {commits:,.0f}/s ({commits / BRIEF_COMMITS_PER_S:.2f} x the brief's)"
    )


if __name__ == "__main__":
    print(measure())
