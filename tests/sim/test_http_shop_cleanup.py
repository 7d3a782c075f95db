"""The reference services delete barrier rows past their retention, on a timer."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from accord.core.spec import Op
from accord.sim.http_shop import Faults, build_app, create_databases
from accord.sim.workload import SERVICES, ShopConfig, Workload


def barrier_rows(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


async def test_old_barrier_rows_are_deleted_periodically(tmp_path: Path) -> None:
    """Rows older than the retention go at the next round; younger ones stay."""
    create_databases(tmp_path, Workload(ShopConfig(orders=1, seed=1)).initial_state())
    app, barriers = build_app(tmp_path, b"secret", Faults(), retention_s=0.3, cleanup_every_s=0.1)
    barrier = barriers[0]

    def handler(conn: Any) -> dict[str, int]:
        return {"n": 1}

    async with app.router.lifespan_context(app):
        await barrier.run("t-old", "b0", Op.TRY, handler)
        path, table = tmp_path / f"{SERVICES[0]}.db", "accord_barrier"
        assert barrier_rows(path, table) == 1
        await asyncio.sleep(0.1)
        await barrier.run("t-new", "b0", Op.TRY, handler)
        # t-old passes its retention first: wait until it alone is gone.
        for _ in range(100):
            await asyncio.sleep(0.02)
            if barrier_rows(path, table) < 2:
                break
        conn = sqlite3.connect(path)
        left = [r[0] for r in conn.execute(f"SELECT txid FROM {table}")]
        conn.close()
        assert left == ["t-new"]


def test_a_retention_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="barrier retention must be a positive number"):
        build_app(tmp_path, b"secret", Faults(), retention_s=0)
