"""CPU per request of the shop's HTTP services (``accord services``).

    .venv/bin/python bench/http_services.py [--orders 2000] [--in-flight 100] [--repeat 3]
        [--variant NAME=SRC[,uvicorn_option=value...]] ...

Each variant runs the four services in a subprocess exactly as ``accord
services`` does (``build_app`` under ``uvicorn.run`` with the CLI's settings),
importing ``accord`` from ``SRC`` (default ``src``: this tree; give a
``git worktree`` of another commit to compare), plus any extra
``uvicorn.run`` options (``loop=uvloop,http=httptools,server_header=false``).
Every run starts from fresh databases seeded like the demo's.

This process drives it with :class:`~accord.transport.http.HttpTransport`
(signed, as the coordinator does): for each order of the reference workload,
a TCC try on its four branches at once, then confirm on all four if every
try applied, else cancel on all four; ``--in-flight`` orders at a time, 8
requests each. Printed per variant (median run by CPU per request):
requests/s, and the services process's CPU time (user + system, from
``/proc/<pid>/stat``) per request, which is what this machine's two cores
are short of. Variants run interleaved, ``--repeat`` times each; other jobs
share the machine, so compare variants measured within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from accord.core.machine import Outcome
from accord.core.spec import Op, Protocol
from accord.sim.http_shop import KEY_ID
from accord.sim.workload import SERVICES, ShopConfig, Workload, order_spec
from accord.transport.base import Call
from accord.transport.http import HttpTransport

WARMUP_ORDERS = 100
TICKS_PER_S = os.sysconf("SC_CLK_TCK")

SERVER = """
import json, sys
from pathlib import Path
import uvicorn
from accord.sim.http_shop import Faults, build_app, create_databases
from accord.sim.workload import ShopConfig, Workload

data, secret, port, orders, options = sys.argv[1:6]
create_databases(Path(data), Workload(ShopConfig(orders=int(orders), seed=1)).initial_state())
app, _ = build_app(Path(data), bytes.fromhex(secret), Faults())
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False,
            **json.loads(options))
"""


@dataclass
class Variant:
    name: str
    src: Path
    options: dict[str, Any] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    name, _, rest = text.partition("=")
    if not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=SRC[,option=value...], got {text!r}")
    src, *pairs = rest.split(",")
    options: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return Variant(name, Path(src).resolve(), options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime, stime


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the services exited with {proc.returncode}")
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the services did not come up")
            await asyncio.sleep(0.05)


async def run_order(transport: HttpTransport, spec: Any, counts: dict[str, int]) -> None:
    def call(branch: Any, op: Op) -> Call:
        return Call(spec.id, branch.name, op, branch.participant, branch.payload, 1, 30.0)

    tries = await asyncio.gather(*(transport.call(call(b, Op.TRY)) for b in spec.branches))
    ok = all(r.outcome is Outcome.OK for r in tries)
    phase2 = Op.CONFIRM if ok else Op.CANCEL
    replies = await asyncio.gather(*(transport.call(call(b, phase2)) for b in spec.branches))
    counts["confirmed" if ok else "cancelled"] += 1
    for reply in (*tries, *replies):
        if reply.outcome not in (Outcome.OK, Outcome.REFUSED):
            counts["unexpected"] += 1


async def drive(url: str, secret: bytes, pid: int, orders: int, in_flight: int) -> dict[str, float]:
    workload = Workload(ShopConfig(orders=orders + WARMUP_ORDERS, seed=1))
    specs = [order_spec(o, Protocol.TCC, base_url=url) for o in workload.orders]
    transport = HttpTransport({url: (KEY_ID, secret)}, max_connections=in_flight * 4)
    counts = {"confirmed": 0, "cancelled": 0, "unexpected": 0}
    try:
        queue = iter(specs[:WARMUP_ORDERS])

        async def worker() -> None:
            for spec in queue:
                await run_order(transport, spec, counts)

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        queue = iter(specs[WARMUP_ORDERS:])
        cpu_before, started = cpu_s(pid), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed_s, cpu_used_s = time.perf_counter() - started, cpu_s(pid) - cpu_before
    finally:
        await transport.close()
    if counts["unexpected"]:
        raise SystemExit(f"{counts['unexpected']} calls answered neither OK nor refused")
    requests = orders * 2 * len(SERVICES)
    return {
        "rps": requests / elapsed_s,
        "cpu_us": cpu_used_s / requests * 1e6,
        "confirmed": counts["confirmed"],
    }


def run_variant(variant: Variant, orders: int, in_flight: int) -> dict[str, float]:
    port = free_port()
    secret = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="bench-services-") as data:
        env = {**os.environ, "PYTHONPATH": str(variant.src)}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SERVER,
                data,
                secret.hex(),
                str(port),
                str(orders + WARMUP_ORDERS),
                json.dumps(variant.options),
            ],
            env=env,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(wait_ready(url, proc))
            return asyncio.run(drive(url, secret, proc.pid, orders, in_flight))
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variant", type=parse_variant, action="append", default=[])
    args = parser.parse_args()
    variants: list[Variant] = args.variant or [Variant("this tree", Path("src").resolve())]
    runs: dict[str, list[dict[str, float]]] = {v.name: [] for v in variants}
    for i in range(args.repeat):
        # Alternate the order so that no variant always gets the same slot.
        for variant in variants if i % 2 == 0 else list(reversed(variants)):
            result = run_variant(variant, args.orders, args.in_flight)
            runs[variant.name].append(result)
            print(
                f"  run {i + 1} {variant.name}: {result['rps']:.0f} req/s,"
                f" {result['cpu_us']:.0f} us/req",
                file=sys.stderr,
            )
    print(f"{'variant':<24} {'req/s':>7} {'cpu us/req':>11}  (median of {args.repeat}; all runs)")
    for name, results in runs.items():
        cpu = statistics.median(r["cpu_us"] for r in results)
        rps = statistics.median(r["rps"] for r in results)
        every = ", ".join(f"{r['cpu_us']:.0f}" for r in results)
        print(f"{name:<24} {rps:>7.0f} {cpu:>11.0f}  ({every})")


if __name__ == "__main__":
    main()
