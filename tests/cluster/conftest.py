"""Shared by the cluster tests: a fresh PostgreSQL schema per test, SQL from
the test's side, the shop and nodes as real processes.

PostgreSQL runs at ``ACCORD_TEST_PG_DSN`` (default
``postgresql://postgres@127.0.0.1/test``); if it is unreachable the tests
skip, or fail when ``CI`` is set.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from accord.sim.http_demo import free_port

from .db import PG_DSN, pg, pg_reachable, wait_for
from .world import World

ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pg_restart: restarts the PostgreSQL server (waits until it is back before finishing)",
    )


@pytest.fixture
def schema() -> Iterator[str]:
    """A fresh schema, dropped afterwards."""
    pg_reachable()
    name = f"c_{uuid.uuid4().hex[:16]}"
    yield name
    # Connections of processes that are gone may still hold locks for a moment.
    pg(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name LIKE $1 AND pid <> pg_backend_pid()",
        f"accord-%{name}%",
    )
    pg(f"DROP SCHEMA IF EXISTS {name} CASCADE")


class Processes:
    """The shop's services and cluster nodes as child processes."""

    def __init__(self, tmp: Path, schema: str) -> None:
        self.tmp = tmp
        self.schema = schema
        self.store = f"{PG_DSN}?schema={schema}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = tmp / "secret"
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def services(self, *, orders: int, seed: int, latency_ms: float = 0.0) -> None:
        with (self.tmp / "services.log").open("wb") as log:  # the child keeps its own copy
            self.children["services"] = subprocess.Popen(
                [*ACCORD, "services", "--data", str(self.tmp / "shop"), "--port", str(self.port),
                 "--orders", str(orders), "--seed", str(seed), "--latency-ms", str(latency_ms),
                 "--secret-file", str(self.secret)],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def up() -> bool:
            if self.children["services"].poll() is not None:
                raise AssertionError(f"accord services exited: {self.log('services')}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_for("the services", up, 30)

    def node(self, name: str, *, shards: int, ttl_s: float, concurrency: int = 30) -> None:
        with (self.tmp / f"{name}.log").open("wb") as log:
            self.children[name] = subprocess.Popen(
                [*ACCORD, "cluster", "node", "--store", self.store, "--node-id", name,
                 "--services-url", self.url, "--secret-file", str(self.secret),
                 "--shards", str(shards), "--lease-ttl", str(ttl_s),
                 "--concurrency", str(concurrency), "--status-file", str(self.status_path(name))],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def status_path(self, name: str) -> Path:
        return self.tmp / f"{name}.status.json"

    def status(self, name: str) -> dict[str, Any]:
        return dict(json.loads(self.status_path(name).read_text()))

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.children[name].send_signal(sig)

    def stop(self, name: str) -> int:
        """SIGTERM and wait: a node drains and leaves."""
        child = self.children[name]
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        return child.returncode

    def close(self) -> None:
        for name in list(self.children):
            self.stop(name)


@pytest.fixture
def procs(tmp_path: Path, schema: str) -> Iterator[Processes]:
    p = Processes(tmp_path, schema)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
async def world(schema: str) -> AsyncIterator[Callable[..., World]]:
    """Make in-process clusters (World) on the test's schema; closed afterwards."""
    made: list[World] = []

    def make(orders: int = 120, latency_ms: float = 2.0) -> World:
        w = World(schema, orders, latency_ms)
        made.append(w)
        return w

    yield make
    for w in made:
        await w.close()
