"""aiohttp, httpx and pyreqwest as the coordinator's async HTTP client, and HttpTransport.

    .venv/bin/python bench/http_client.py [--seconds 3] [--in-flight 100] [--repeat 3]
                                          [--server aiohttp|uvicorn] [--loop uvloop|asyncio]
                                          [--also-transport path/to/http.py ...]

Starts a participant-like server in a subprocess on 127.0.0.1 (aiohttp.web by
default, whose C parser keeps the server from being the bottleneck; or uvicorn
with a minimal Starlette app) that answers ``POST /bench/try`` with a small
JSON body. Each client keeps one pooled, keep-alive session and sends POSTs
for ``--seconds`` with ``--in-flight`` of them outstanding at once (closed
loop), after a short warm-up; a time budget rather than a request count keeps
the whole run under a minute however slow a client is. The clients run
interleaved, ``--repeat`` times each; the median run (by requests/s) of each
is printed with its p50/p99 latency. ``pyreqwest`` runs reqwest on
pyreqwest's default single-threaded Tokio runtime (one I/O thread beside
Python's), ``pyreqwest-mt`` on its multithreaded one (a worker per CPU);
both are configured as the transport configures it. The last row,
``accord``, is :class:`~accord.transport.http.HttpTransport` itself
(its HTTP client plus signing, trace context and reply mapping), to show what the
transport adds; ``--also-transport`` adds a row for another copy of its
module (``git show REV:src/accord/transport/http.py > /tmp/http_old.py``)
to compare versions within one run. ``cpu us/req`` is the client
process's CPU time per request, all its threads included, steadier than
req/s when the server shares the 2 cores. Figures, not asserts: this
machine is noisy, so compare clients measured within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import uvloop

from accord.core.machine import Outcome
from accord.core.spec import Op
from accord.transport.base import Call
from accord.transport.http import HttpTransport, client_builder

BODY = (
    b'{"txid":"bench-0001","branch":"payment","op":"try",'
    b'"payload":{"account":"c-17","amount":4200},"attempt":1}'
)
HEADERS = {"content-type": "application/json"}
WARMUP = 300

SERVER_AIOHTTP = """
import sys
from aiohttp import web

async def handle(request):
    await request.read()
    return web.Response(body=b'{"result":{"ok":true}}', content_type="application/json")

app = web.Application()
app.router.add_post("/bench/{op}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

SERVER_UVICORN = """
import sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

async def handle(request):
    await request.body()
    return Response(b'{"result":{"ok":true}}', media_type="application/json")

app = Starlette(routes=[Route("/bench/{op}", handle, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
            access_log=False, lifespan="off")
"""

Send = Callable[[], Awaitable[None]]
Client = Callable[[str, float, int], Coroutine[Any, Any, dict[str, float]]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(kind: str, port: int) -> subprocess.Popen[bytes]:
    source = SERVER_AIOHTTP if kind == "aiohttp" else SERVER_UVICORN
    proc = subprocess.Popen([sys.executable, "-c", source, str(port)])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {kind} server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the {kind} server did not listen on port {port}")


async def drive(send: Send, seconds: float, in_flight: int) -> dict[str, float]:
    """Send for ``seconds`` with ``in_flight`` outstanding; requests/s and latency."""
    for _ in range(WARMUP // in_flight + 1):
        await asyncio.gather(*(send() for _ in range(in_flight)))
    latencies_s: list[float] = []
    clock = time.perf_counter
    cpu_started = time.process_time()
    started = clock()
    stop_at = started + seconds

    async def worker() -> None:
        while clock() < stop_at:
            t0 = clock()
            await send()
            latencies_s.append(clock() - t0)

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed_s = clock() - started
    cpu_s = time.process_time() - cpu_started
    latencies_s.sort()
    return {
        "rps": len(latencies_s) / elapsed_s,
        "p50_ms": latencies_s[len(latencies_s) // 2] * 1000,
        "p99_ms": latencies_s[int(len(latencies_s) * 0.99)] * 1000,
        "cpu_us": cpu_s / len(latencies_s) * 1e6,
    }


async def run_aiohttp(url: str, seconds: float, in_flight: int) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        timeout = aiohttp.ClientTimeout(total=30)

        async def send() -> None:
            async with session.post(
                url, data=BODY, headers=HEADERS, timeout=timeout, allow_redirects=False
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}")

        return await drive(send, seconds, in_flight)


async def run_httpx(url: str, seconds: float, in_flight: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(limits=limits, timeout=30, follow_redirects=False) as client:

        async def send() -> None:
            resp = await client.post(url, content=BODY, headers=HEADERS)
            if resp.status_code != 200:
                raise RuntimeError(f"status {resp.status_code}")

        return await drive(send, seconds, in_flight)


async def _run_pyreqwest(
    url: str, seconds: float, in_flight: int, *, multithreaded: bool
) -> dict[str, float]:
    # Configured as HttpTransport configures its client.
    client = client_builder(in_flight).runtime_multithreaded(multithreaded).build()
    timeout = timedelta(seconds=30)

    async def send() -> None:
        request = client.post(url).headers(HEADERS).body_bytes(BODY).timeout(timeout)
        async with request.build_streamed() as resp:
            await resp.bytes()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")

    try:
        return await drive(send, seconds, in_flight)
    finally:
        await client.close()


async def run_pyreqwest(url: str, seconds: float, in_flight: int) -> dict[str, float]:
    return await _run_pyreqwest(url, seconds, in_flight, multithreaded=False)


async def run_pyreqwest_mt(url: str, seconds: float, in_flight: int) -> dict[str, float]:
    return await _run_pyreqwest(url, seconds, in_flight, multithreaded=True)


def transport_runner(transport_type: Callable[..., HttpTransport]) -> Client:
    """A client row for an HttpTransport class: adds signing, tracing and reply mapping."""

    async def run(url: str, seconds: float, in_flight: int) -> dict[str, float]:
        participant = url.removesuffix("/try")
        transport = transport_type(
            {}, default_key=("bench", b"bench-secret"), max_connections=in_flight
        )
        call = Call("bench-0001", "payment", Op.TRY, participant, {"account": "c-17"}, 1, 30.0)

        async def send() -> None:
            reply = await transport.call(call)
            if reply.outcome is not Outcome.OK:
                raise RuntimeError(f"{reply.outcome}: {reply.error}")

        try:
            return await drive(send, seconds, in_flight)
        finally:
            await transport.close()

    return run


def load_transport(path: str) -> Callable[..., HttpTransport]:
    """``HttpTransport`` from another copy of ``transport/http.py`` (an older
    commit's, say), to measure it beside this one."""
    spec = importlib.util.spec_from_file_location(f"bench_transport_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    transport_type: Callable[..., HttpTransport] = module.HttpTransport
    return transport_type


CLIENTS: dict[str, Client] = {
    "aiohttp": run_aiohttp,
    "httpx": run_httpx,
    "pyreqwest": run_pyreqwest,
    "pyreqwest-mt": run_pyreqwest_mt,
    "accord": transport_runner(HttpTransport),
}


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--server", choices=("aiohttp", "uvicorn"), default="aiohttp")
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the clients' event loop (the accord CLI runs on uvloop)",
    )
    parser.add_argument(
        "--also-transport",
        metavar="PATH",
        action="append",
        default=[],
        help="another copy of transport/http.py to measure as a row 'accord@<file stem>'",
    )
    args = parser.parse_args()
    clients = dict(CLIENTS)
    for path in args.also_transport:
        clients[f"accord@{Path(path).stem}"] = transport_runner(load_transport(path))
    port = free_port()
    server = start_server(args.server, port)
    url = f"http://127.0.0.1:{port}/bench/try"
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in clients}
    try:
        for i in range(args.repeat):
            # Alternate which client goes first so that neither always gets
            # the warmer (or the more throttled) half of a round.
            order = list(clients) if i % 2 == 0 else list(reversed(clients))
            for name in order:
                with asyncio.Runner(loop_factory=LOOPS[args.loop]) as runner:
                    figures = runner.run(clients[name](url, args.seconds, args.in_flight))
                runs[name].append(figures)
                print(
                    f"  run {i + 1} {name:20s} {figures['rps']:8.0f} req/s"
                    f"  p50 {figures['p50_ms']:6.2f} ms  p99 {figures['p99_ms']:6.2f} ms"
                    f"  cpu {figures['cpu_us']:5.0f} us/req",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"\n{args.seconds:g} s of POSTs, {args.in_flight} in flight, {args.loop} clients,"
        f" {args.server} server "
        f"on 127.0.0.1, {os.cpu_count()} CPUs, median of {args.repeat} runs:\n"
    )
    print(f"  {'client':20s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'cpu us/req':>10s}")
    for name, results in runs.items():
        median = sorted(results, key=lambda r: r["rps"])[len(results) // 2]
        print(
            f"  {name:20s} {statistics.median(r['rps'] for r in results):8.0f}"
            f" {median['p50_ms']:8.2f} {median['p99_ms']:8.2f}"
            f" {statistics.median(r['cpu_us'] for r in results):10.0f}"
        )


if __name__ == "__main__":
    main()
