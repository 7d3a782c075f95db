"""`accord serve` as a real process, with `accord services` as its participants:
SIGKILL under load then a restart (every acknowledged transaction is found and
ends; the shop's invariants hold), and a graceful SIGTERM (in-flight work
finishes, or is handed back to the next start)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from accord import AccordError, Client, SQLiteStore, TransactionSpec, TxnStatus
from accord.core.records import TxnSnapshot
from accord.core.spec import Protocol
from accord.sim import invariants
from accord.sim.http_demo import RemoteShop, free_port, load_secret
from accord.sim.workload import ShopConfig, Workload, order_spec

ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]
START_TIMEOUT_S = 60.0
SEED = 7
pytestmark = pytest.mark.slow


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    url: str
    stderr: Path

    def output(self) -> str:
        return self.stderr.read_text(errors="replace")


async def _status(url: str) -> int:
    try:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return r.status
    except (aiohttp.ClientError, OSError):
        return 0


async def _wait_status(proc: Proc, path: str, status: int = 200) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while await _status(proc.url + path) != status:
        if proc.process.poll() is not None:
            raise RuntimeError(f"exited with {proc.process.returncode}: {proc.output()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.url}{path} is not {status}: {proc.output()[-2000:]}")
        await asyncio.sleep(0.1)


async def _exit(proc: Proc, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while proc.process.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"did not exit within {timeout_s} s: {proc.output()[-2000:]}")
        await asyncio.sleep(0.05)
    return proc.process.returncode


@contextlib.asynccontextmanager
async def _spawn(args: list[str], port: int, stderr: Path, ready: str) -> AsyncIterator[Proc]:
    with stderr.open("ab") as err:
        process = subprocess.Popen([*ACCORD, *args], stdout=subprocess.DEVNULL, stderr=err)
    proc = Proc(process, f"http://127.0.0.1:{port}", stderr)
    try:
        await _wait_status(proc, ready)
        yield proc
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def shop(tmp: Path, *, orders: int, latency_ms: float, fault_rate: float = 0.0) -> Any:
    port = free_port()
    args = ["services", "--data", str(tmp / "shop"), "--port", str(port), "--orders", str(orders),
            "--seed", str(SEED), "--latency-ms", str(latency_ms), "--fault-rate", str(fault_rate),
            "--secret-file", str(tmp / "secret")]  # fmt: skip
    return _spawn(args, port, tmp / "services.err", "/healthz")


def serve(tmp: Path, services: Proc, port: int, *extra: str) -> Any:
    """`accord serve` on the run's log; ready once recovery is done (/readyz)."""
    args = ["serve", "--data", str(tmp / "coord"), "--port", str(port), "--services-url",
            services.url, "--secret-file", str(tmp / "secret"), *extra]  # fmt: skip
    return _spawn(args, port, tmp / "serve.err", "/readyz")


def _specs(services: Proc, orders: int) -> list[TransactionSpec]:
    workload = Workload(ShopConfig(orders=orders, seed=SEED))
    return [
        order_spec(o, Protocol.TCC, call_timeout_s=5.0, base_url=services.url)
        for o in workload.orders
    ]


def _token(tmp: Path) -> str:
    return (tmp / "coord" / "api-token").read_text().strip()


async def _submit_all(
    url: str, token: str, specs: list[TransactionSpec], concurrency: int, *,
    kill: subprocess.Popen[bytes] | None = None, kill_after: int = 0,
) -> set[str]:  # fmt: skip
    """Submit (wait=false) from ``concurrency`` workers; the ids acknowledged
    (2xx). With ``kill``, SIGKILL that process once ``kill_after`` are."""
    acked: set[str] = set()
    queue = deque(specs)

    async def worker(client: Client) -> None:
        while queue:
            spec = queue.popleft()
            try:
                await client.submit(spec)
            except AccordError:  # refused, or the server is gone: not acknowledged
                continue
            acked.add(spec.id)
            if kill is not None and len(acked) >= kill_after and kill.poll() is None:
                kill.send_signal(signal.SIGKILL)

    async with Client(url, token, max_retries=0, timeout_s=10) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return acked


async def _all_terminal(url: str, token: str, ids: set[str], timeout_s: float) -> dict[str, str]:
    """Each id's status, polled through the API until every one is terminal."""
    deadline = time.monotonic() + timeout_s
    status: dict[str, str] = {}
    async with Client(url, token) as client:
        while True:
            for txid in sorted(ids - {t for t, s in status.items() if TxnStatus(s).terminal}):
                status[txid] = (await client.get(txid)).status
            if all(TxnStatus(s).terminal for s in status.values()):
                return status
            if time.monotonic() > deadline:
                stuck = {t: s for t, s in status.items() if not TxnStatus(s).terminal}
                raise AssertionError(f"not terminal after {timeout_s} s: {stuck}")
            await asyncio.sleep(0.2)


async def _log(tmp: Path) -> dict[str, TxnSnapshot]:
    store = SQLiteStore(tmp / "coord" / "coordinator.db")
    await store.open()
    try:
        return {s.txid: s for s in await store.snapshots()}
    finally:
        await store.close()


async def _shop_report(services: Proc, tmp: Path, txns: dict[str, TxnSnapshot]) -> Any:
    remote = RemoteShop(services.url, load_secret(tmp / "secret"))
    await remote.refresh()
    return invariants.check(remote.views(), txns)


async def test_sigkill_under_load_loses_no_acknowledged_transaction(tmp_path: Path) -> None:
    """SIGKILL `accord serve` while 30 clients submit; restart it: every acknowledged
    transaction is in the log and ends, and the shop's invariants all hold."""
    orders = 400
    async with shop(tmp_path, orders=orders, latency_ms=5, fault_rate=0.05) as services:
        port = free_port()
        specs = _specs(services, orders)
        async with serve(tmp_path, services, port) as server:
            token = _token(tmp_path)
            acked = await _submit_all(
                server.url, token, specs, 30, kill=server.process, kill_after=120
            )
            assert await _exit(server, 10) == -signal.SIGKILL
        assert len(acked) >= 120
        async with serve(tmp_path, services, port) as server:
            status = await _all_terminal(server.url, token, acked, timeout_s=120)
            assert set(status) == acked
            server.process.send_signal(signal.SIGTERM)
            await _exit(server, 30)
        txns = await _log(tmp_path)
        assert acked <= set(txns)
        assert all(s.status.terminal for s in txns.values())
        report = await _shop_report(services, tmp_path, txns)
    assert report.ok, {k: v[:5] for k, v in report.violations.items() if v}
    assert report.duplicates_applied == 0
    assert "recovery: resumed" in server.output()
    assert sum(s.status is TxnStatus.COMMITTED for s in txns.values()) > 0


async def test_sigterm_lets_in_flight_transactions_finish(tmp_path: Path) -> None:
    """SIGTERM with transactions in flight: the server stops taking work, lets them
    finish, closes the log and exits; each acknowledged one is terminal in the log."""
    async with shop(tmp_path, orders=40, latency_ms=150) as services:
        specs = _specs(services, 40)
        async with serve(tmp_path, services, free_port(), "--drain-timeout", "30") as server:
            token = _token(tmp_path)
            acked = await _submit_all(server.url, token, specs, 40)
            assert len(acked) == 40
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with Client(server.url, token, max_retries=0) as client:
                with pytest.raises(AccordError):  # refused: connection closed or 503 draining
                    await client.submit(specs[0].to_dict() | {"id": "late-1"})
            code = await _exit(server, 40)
            elapsed_s = time.monotonic() - started
        txns = await _log(tmp_path)
        report = await _shop_report(services, tmp_path, txns)
    assert code in (0, -signal.SIGTERM), server.output()
    assert "late-1" not in txns
    assert {t: s.status for t, s in txns.items() if not s.status.terminal} == {}
    assert acked == set(txns)
    assert "0 unfinished transactions left" in server.output()
    assert elapsed_s < 30
    assert report.ok, {k: v[:5] for k, v in report.violations.items() if v}
    output = server.output()
    assert _token(tmp_path) not in output
    assert (tmp_path / "secret").read_text().strip() not in output


async def test_sigterm_hands_unfinished_work_to_the_next_start(tmp_path: Path) -> None:
    """A drain timeout shorter than the work: what is left stays in the log, and the
    next start finishes it."""
    async with shop(tmp_path, orders=20, latency_ms=1500) as services:
        specs = _specs(services, 20)
        port = free_port()
        async with serve(tmp_path, services, port, "--drain-timeout", "0.2") as server:
            token = _token(tmp_path)
            acked = await _submit_all(server.url, token, specs, 20)
            server.process.send_signal(signal.SIGTERM)
            await _exit(server, 30)
        left = {t for t, s in (await _log(tmp_path)).items() if not s.status.terminal}
        assert left, "the drain timeout should have left work in the log"
        assert "unfinished transactions left" in server.output()
        async with serve(tmp_path, services, port) as server:
            await _all_terminal(server.url, token, acked, timeout_s=60)
            server.process.send_signal(signal.SIGTERM)
            await _exit(server, 30)
        txns = await _log(tmp_path)
        report = await _shop_report(services, tmp_path, txns)
    assert all(s.status.terminal for s in txns.values())
    assert report.ok, {k: v[:5] for k, v in report.violations.items() if v}


def spans(text: str) -> list[dict[str, Any]]:
    """The console exporter's output: JSON objects one after another."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i] in " \r\n\t":
            i += 1
        if i >= len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


async def test_serve_exports_a_span_per_transaction_and_per_call(tmp_path: Path) -> None:
    """ACCORD_OTEL_EXPORTER=console: a span per transaction and a child span per
    participant call in the transaction's trace, exported by the time it stops."""
    async with shop(tmp_path, orders=20, latency_ms=0) as services:
        port = free_port()
        args = ["serve", "--data", str(tmp_path / "coord"), "--port", str(port),
                "--services-url", services.url,
                "--secret-file", str(tmp_path / "secret")]  # fmt: skip
        stdout = tmp_path / "serve.out"
        env = os.environ | {"ACCORD_OTEL_EXPORTER": "console"}
        with stdout.open("wb") as out, (tmp_path / "serve.err").open("wb") as err:
            process = subprocess.Popen([*ACCORD, *args], stdout=out, stderr=err, env=env)
        server = Proc(process, f"http://127.0.0.1:{port}", tmp_path / "serve.err")
        try:
            await _wait_status(server, "/readyz")
            specs = _specs(services, 3)
            async with Client(server.url, _token(tmp_path)) as client:
                results = await asyncio.gather(*(client.submit(s, wait=10) for s in specs))
            assert all(r.status in ("committed", "aborted") for r in results)
            process.send_signal(signal.SIGTERM)
            await _exit(server, 30)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(30)
    exported = spans(stdout.read_text())
    for spec in specs:
        root = [s for s in exported if s["attributes"].get("accord.txid") == spec.id
                and s["parent_id"] is None]  # fmt: skip
        assert len(root) == 1, f"{spec.id}: {len(root)} transaction spans"
        trace_id = root[0]["context"]["trace_id"]
        calls = [s for s in exported if s["parent_id"] == root[0]["context"]["span_id"]]
        # At least a try per branch, all in the transaction's trace.
        assert len(calls) >= len(spec.branches)
        assert {c["context"]["trace_id"] for c in calls} == {trace_id}
        assert {c["attributes"]["accord.op"] for c in calls} >= {"try"}
