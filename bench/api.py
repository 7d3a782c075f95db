"""The coordinator's HTTP API: submissions accepted per second, and end-to-end
latency through the API against the in-process engine, side by side.

    .venv/bin/python bench/api.py [--repeat 3] [--accept-orders 4000] [--e2e-orders 600]

Each repetition runs, each on a fresh log and a fresh shop, interleaved:

* ``accept, in-process shop``: a server process (this script, ``--serve``)
  whose participants are the simulated shop in its own process (memory
  services), the log in SQLite (FULL); ``--accept-concurrency`` clients
  POST ``--accept-orders`` orders with ``wait=false``. Accepted/s counts
  2xx answers (each one durable in the log); 503s (the in-flight limit)
  are retried by the client after ``Retry-After``, as a real client would.
* ``accept, HTTP shop``: the same against ``accord serve`` with
  ``accord services`` as participants (8 signed calls per order).
* ``e2e, API`` / ``e2e, engine``: ``--e2e-orders`` orders at
  ``--e2e-concurrency`` in flight against the HTTP shop, through ``accord
  serve`` with ``wait=true`` (client-observed latency), and through a
  ``Coordinator`` in this process (``run()``'s latency), same log settings.

Prints medians over the repetitions. The client, the server and the shop
share this machine's cores: figures to compare within one run, not
capacity numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from accord import Client, Coordinator, SQLiteStore, TransactionSpec
from accord.core.spec import Protocol
from accord.sim.http_demo import load_secret
from accord.sim.workload import ShopConfig, Workload, order_spec
from accord.transport.http import HttpTransport

ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]
SEED = 11
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- server mode


def serve_in_process_shop(port: int, data: Path, token: str, orders: int) -> None:
    """``--serve``: the API over a coordinator whose participants live in this process."""
    import uvicorn  # noqa: PLC0415

    from accord.cli.app import tune_gc  # noqa: PLC0415
    from accord.server import ServerConfig, create_app  # noqa: PLC0415
    from accord.sim.faults import FaultConfig  # noqa: PLC0415
    from accord.sim.shop import Shop  # noqa: PLC0415

    async def main() -> None:
        shop = Shop.create(Workload(ShopConfig(orders=orders, seed=SEED)).initial_state(), None)
        transport = shop.transport(FaultConfig(0.0, 0.0), SEED)
        coordinator = Coordinator(SQLiteStore(data / "coordinator.db"), transport)
        app = create_app(coordinator, ServerConfig(tokens=(token,)))
        config = uvicorn.Config(app, port=port, log_level="warning", access_log=False)
        await uvicorn.Server(config).serve()

    tune_gc()
    asyncio.run(main())


# ---------------------------------------------------------------- processes


async def _wait_http(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{url}: the process exited with {process.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not become ready")
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def spawn(args: list[str], ready_url: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await _wait_http(ready_url, process)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.asynccontextmanager
async def http_shop(tmp: Path, orders: int) -> AsyncIterator[tuple[str, Path]]:
    port = free_port()
    secret = tmp / "secret"
    args = [*ACCORD, "services", "--data", str(tmp / "shop"), "--port", str(port),
            "--orders", str(orders), "--seed", str(SEED), "--secret-file", str(secret)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    async with spawn(args, f"{url}/healthz"):
        yield url, secret


@contextlib.asynccontextmanager
async def accord_serve(tmp: Path, shop_url: str, secret: Path) -> AsyncIterator[tuple[str, str]]:
    port = free_port()
    args = [*ACCORD, "serve", "--data", str(tmp / "coord"), "--port", str(port),
            "--services-url", shop_url, "--secret-file", str(secret)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    async with spawn(args, f"{url}/readyz"):
        yield url, (tmp / "coord" / "api-token").read_text().strip()


@contextlib.asynccontextmanager
async def inprocess_server(tmp: Path, orders: int) -> AsyncIterator[tuple[str, str]]:
    port = free_port()
    token = secrets.token_hex(16)
    (tmp / "coord").mkdir(parents=True)
    args = [sys.executable, __file__, "--serve", str(port), str(tmp / "coord"), token,
            str(orders)]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    async with spawn(args, f"{url}/readyz"):
        yield url, token


# ---------------------------------------------------------------- measurements


def _specs(orders: int, base_url: str) -> list[TransactionSpec]:
    workload = Workload(ShopConfig(orders=orders, seed=SEED))
    return [
        order_spec(o, Protocol.TCC, call_timeout_s=5.0, base_url=base_url) for o in workload.orders
    ]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _drained(client: Client) -> None:
    while True:
        stats = await client.stats()
        open_ = sum(stats.by_status[s] for s in ("preparing", "committing", "aborting"))
        if stats.in_flight == 0 and open_ == 0:
            return
        await asyncio.sleep(0.1)


async def accept(url: str, token: str, specs: list[TransactionSpec], concurrency: int) -> dict:
    """POST every spec with wait=false from ``concurrency`` clients."""
    queue = deque(specs)
    refused = 0

    async def worker(client: Client) -> None:
        nonlocal refused
        while queue:
            spec = queue.popleft()
            try:
                await client.submit(spec)
            except Exception:  # noqa: BLE001 - counted, the figure says how many
                refused += 1

    async with Client(url, token, max_retries=20, max_connections=concurrency) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        accepted_s = time.perf_counter() - started
        await _drained(client)
        done_s = time.perf_counter() - started
    n = len(specs) - refused
    return {"accepted_per_s": n / accepted_s, "completed_per_s": n / done_s, "refused": refused}


async def e2e_api(url: str, token: str, specs: list[TransactionSpec], concurrency: int) -> dict:
    queue = deque(specs)
    latencies: list[float] = []

    async def worker(client: Client) -> None:
        while queue:
            spec = queue.popleft()
            t0 = time.perf_counter()
            result = await client.submit(spec, wait=True)
            latencies.append(time.perf_counter() - t0)
            assert result.status in ("committed", "aborted", "needs_attention"), result

    async with Client(url, token, max_connections=concurrency) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return _latency(latencies, elapsed)


async def e2e_engine(tmp: Path, shop_url: str, secret: Path, specs: list, concurrency: int) -> dict:
    transport = HttpTransport({shop_url: ("shop", load_secret(secret))})
    store = SQLiteStore(tmp / "engine.db")
    coordinator = Coordinator(store, transport, max_in_flight=1000)
    await coordinator.start()
    queue = deque(specs)
    latencies: list[float] = []

    async def worker() -> None:
        while queue:
            spec = queue.popleft()
            t0 = time.perf_counter()
            await coordinator.run(spec)
            latencies.append(time.perf_counter() - t0)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        await coordinator.close()
    return _latency(latencies, elapsed)


def _latency(latencies: list[float], elapsed: float) -> dict:
    return {
        "tx_per_s": len(latencies) / elapsed,
        "p50_ms": _pct(latencies, 0.5) * 1000,
        "p99_ms": _pct(latencies, 0.99) * 1000,
    }


# ---------------------------------------------------------------- main


async def run(args: argparse.Namespace) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {
        "accept, in-process shop": [], "accept, HTTP shop": [],
        "e2e, API": [], "e2e, engine": [],
    }  # fmt: skip
    for rep in range(args.repeat):
        with tempfile.TemporaryDirectory() as t:
            tmp = Path(t)
            n = args.accept_orders
            async with inprocess_server(tmp / "a", n) as (url, token):
                r = await accept(url, token, _specs(n, ""), args.accept_concurrency)
            runs["accept, in-process shop"].append(r)
            print(
                f"  run {rep + 1} accept, in-process shop  {r['accepted_per_s']:7.0f}/s", flush=True
            )
            n = args.accept_http_orders
            async with (
                http_shop(tmp / "b", n) as (shop_url, secret),
                accord_serve(tmp / "b", shop_url, secret) as (url, token),
            ):
                r = await accept(url, token, _specs(n, shop_url), args.accept_concurrency)
            runs["accept, HTTP shop"].append(r)
            print(
                f"  run {rep + 1} accept, HTTP shop        {r['accepted_per_s']:7.0f}/s", flush=True
            )
            n = args.e2e_orders
            async with (
                http_shop(tmp / "c", n) as (shop_url, secret),
                accord_serve(tmp / "c", shop_url, secret) as (url, token),
            ):
                r = await e2e_api(url, token, _specs(n, shop_url), args.e2e_concurrency)
            runs["e2e, API"].append(r)
            print(f"  run {rep + 1} e2e, API     p50 {r['p50_ms']:7.1f} ms", flush=True)
            async with http_shop(tmp / "d", n) as (shop_url, secret):
                r = await e2e_engine(
                    tmp / "d", shop_url, secret, _specs(n, shop_url), args.e2e_concurrency
                )
            runs["e2e, engine"].append(r)
            print(f"  run {rep + 1} e2e, engine  p50 {r['p50_ms']:7.1f} ms", flush=True)
    return runs


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        port, data, token, orders = sys.argv[2:6]
        serve_in_process_shop(int(port), Path(data), token, int(orders))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--accept-orders", type=int, default=4000)
    parser.add_argument("--accept-http-orders", type=int, default=1500)
    parser.add_argument("--accept-concurrency", type=int, default=100)
    parser.add_argument("--e2e-orders", type=int, default=600)
    parser.add_argument("--e2e-concurrency", type=int, default=20)
    args = parser.parse_args()
    from accord.cli.app import tune_gc  # noqa: PLC0415

    tune_gc()
    runs = asyncio.run(run(args))
    print(f"\nmedians of {args.repeat} runs, {os.cpu_count()} cores")
    print(f"{'':26s} {'accepted/s':>11s} {'completed/s':>12s} {'refused':>8s}")
    for name in ("accept, in-process shop", "accept, HTTP shop"):
        rows = runs[name]
        accepted, completed = _median(rows, "accepted_per_s"), _median(rows, "completed_per_s")
        print(f"{name:26s} {accepted:11.0f} {completed:12.0f} {_median(rows, 'refused'):8.0f}")
    print(f"\n{'':26s} {'tx/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name in ("e2e, API", "e2e, engine"):
        rows = runs[name]
        print(f"{name:26s} {_median(rows, 'tx_per_s'):8.0f} {_median(rows, 'p50_ms'):8.1f}"
              f" {_median(rows, 'p99_ms'):8.1f}")  # fmt: skip
    api, engine = runs["e2e, API"], runs["e2e, engine"]
    ratio_p50 = _median(api, "p50_ms") / _median(engine, "p50_ms")
    ratio_tps = _median(engine, "tx_per_s") / _median(api, "tx_per_s")
    print(f"\nAPI overhead: p50 latency x{ratio_p50:.2f}, throughput x{ratio_tps:.2f} lower")


if __name__ == "__main__":
    main()
