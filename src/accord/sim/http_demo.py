"""`accord demo --http`: the reference scenario against the shop over HTTP.

Unless ``--services-url`` names running services, the demo starts
``accord services`` as a separate process on a free loopback port, with the
run's directory for its databases and a fresh shared secret (written to
``<data>/secret``, readable by the owner only, never printed or logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from accord.sim.http_shop import KEY_ID
from accord.sim.invariants import ServiceView
from accord.sim.services import Entry

SERVICES_START_TIMEOUT_S = 30.0


def load_secret(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
        secret = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable hex secret ({exc})") from exc
    if len(secret) < 16:
        raise ValueError(f"{path}: the secret must be at least 16 bytes")
    return secret


def new_secret(path: Path) -> bytes:
    secret = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex())
    return secret


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteShop:
    """The shop's services over HTTP, as the demo and the checker see them."""

    def __init__(self, url: str, secret: bytes) -> None:
        self.url = url.rstrip("/")
        self.secret = secret
        self.key = (KEY_ID, secret)
        self.fault_counts: Counter[str] = Counter()
        self.duplicates_delivered = 0
        self._state: dict[str, Any] = {}
        self._process: asyncio.subprocess.Process | None = None

    @classmethod
    async def start(
        cls, directory: Path, secret_file: Path, *, orders: int, seed: int,
        fault_rate: float, latency_ms: float, port: int = 0,
    ) -> RemoteShop:  # fmt: skip
        """Run `accord services` in a child process and wait until it answers.

        The participant URLs of a transaction are in the log, so a run's
        services must come back on the same port for recovery."""
        port = port or free_port()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from accord.cli import main; main()", "services",
            "--data", str(directory), "--port", str(port), "--orders", str(orders),
            "--seed", str(seed), "--fault-rate", str(fault_rate),
            "--latency-ms", str(latency_ms), "--secret-file", str(secret_file),
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        shop = cls(f"http://127.0.0.1:{port}", load_secret(secret_file))
        shop._process = process
        await shop.wait_ready()
        return shop

    async def answers(self) -> bool:
        """Whether the services answer now."""
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"{self.url}/healthz") as response:
                    return response.status == 200
            except (aiohttp.ClientError, OSError):
                return False

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVICES_START_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while True:
                if self._process is not None and self._process.returncode is not None:
                    raise RuntimeError(f"accord services exited with {self._process.returncode}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the services at {self.url} did not come up")
                await asyncio.sleep(0.1)

    async def _get(self, path: str) -> Any:
        headers = {"authorization": f"Bearer {self.secret.hex()}"}
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}{path}", headers=headers) as response,
        ):
            if response.status != 200:
                raise RuntimeError(f"{self.url}{path}: HTTP {response.status}")
            return await response.json()

    async def set_faults(self, fault_rate: float, latency_ms: float) -> None:
        """Set the running services' injected faults (their admin endpoint)."""
        headers = {"authorization": f"Bearer {self.secret.hex()}"}
        body = {"fault_rate": fault_rate, "latency_ms": latency_ms}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.url}/admin/faults", json=body, headers=headers) as response,
        ):
            if response.status != 200:
                text = await response.text()
                raise RuntimeError(f"{self.url}/admin/faults: HTTP {response.status}: {text}")

    async def refresh(self) -> None:
        """Fetch every service's state and the fault counts."""
        self._state = await self._get("/admin/state")
        faults = await self._get("/admin/faults")
        self.fault_counts = Counter(faults.get("counts", {}))
        self.duplicates_delivered = self.fault_counts.get("duplicate", 0)

    async def usage(self) -> tuple[float, int]:
        """The services process's CPU seconds so far and the requests it received."""
        found = await self._get("/admin/usage")
        return float(found["cpu_s"]), sum(found["requests"].values())

    def views(self) -> dict[str, ServiceView]:
        return views_from_state(self._state)

    async def close(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


def views_from_state(state: dict[str, Any]) -> dict[str, ServiceView]:
    return {
        name: ServiceView(
            name,
            {k: list(v) for k, v in s["initial"].items()},
            [Entry(*e) for e in s["ledger"]],
            {k: list(v) for k, v in s["counters"].items()},
        )
        for name, s in state.items()
    }
