"""PostgreSQL from the test's side, and polling."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

PG_DSN = os.environ.get("ACCORD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1/test")


def pg(sql: str, *args: Any) -> list[Any]:
    """Run one statement on a connection of its own, from a thread of its own
    (the test's event loop may be running)."""

    async def run() -> list[Any]:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def pg_reachable() -> None:
    try:
        pg("SELECT 1")
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL unreachable at {PG_DSN}: {exc!r}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout_s: float,
    every_s: float = 0.1,
    *,
    diagnose: Callable[[], str] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout_s``
    (with what ``diagnose`` says about the state of things, if given)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{diagnose()}" if diagnose is not None else ""
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}{detail}")
        time.sleep(every_s)
