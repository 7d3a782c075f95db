"""The HTTP shop with its state in PostgreSQL (`accord services --pg`).

Uses ``ACCORD_TEST_PG_DSN`` (default ``postgresql://postgres@127.0.0.1/test``)
and schemas under a fresh prefix, dropped afterwards. If the server is
unreachable the test is skipped, or fails when ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import asyncpg
import pytest

from accord.sim.http_demo import free_port
from accord.sim.workload import SERVICES

PG_DSN = os.environ.get("ACCORD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1/test")
ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]


async def _pg(*statements: str) -> None:
    conn = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _require_pg() -> None:
    try:
        asyncio.run(_pg("SELECT 1"))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        message = f"PostgreSQL unreachable at {PG_DSN}: {exc!r}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.slow
def test_demo_against_services_on_postgres(tmp_path: Path) -> None:
    """`accord services --pg`: a faulty demo run keeps every invariant.

    With --services-url the faults are the services' (demo's --fault-rate
    applies only to services it starts), so the services get --fault-rate too.
    """
    _require_pg()
    prefix = f"accord_test_{uuid.uuid4().hex[:10]}"
    port = free_port()
    secret = tmp_path / "secret"
    log = (tmp_path / "services.log").open("w")
    server = subprocess.Popen(
        [*ACCORD, "services", "--pg", PG_DSN, "--pg-schema-prefix", prefix,
         "--port", str(port), "--orders", "60", "--seed", "5", "--fault-rate", "0.2",
         "--secret-file", str(secret)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not (secret.exists() and _healthy(url)):
            assert server.poll() is None, (tmp_path / "services.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "services did not start"
            time.sleep(0.2)
        done = subprocess.run(
            [*ACCORD, "demo", "--services-url", url, "--secret-file", str(secret),
             "--orders", "60", "--concurrency", "20", "--seed", "5", "--fault-rate", "0.2",
             "--data", str(tmp_path / "run"), "--json"],
            capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout)
        assert all(summary["invariants"].values()), summary["violations"]
        assert summary["stuck"] == 0
        assert summary["committed"] > 0
        assert sum(summary["faults"].values()) > 0  # the services' own faults were injected
        assert summary["committed"] + summary["aborted"] + summary["needs_attention"] == 60
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
        asyncio.run(_pg(*(f"DROP SCHEMA IF EXISTS {prefix}_{name} CASCADE" for name in SERVICES)))
