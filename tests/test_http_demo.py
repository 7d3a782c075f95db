"""The demo over HTTP: the shop as real services in another process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from accord.sim.http_demo import free_port

ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]
pytestmark = pytest.mark.slow


def _accord(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ACCORD, *args], capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _summary(done: subprocess.CompletedProcess[str]) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("fault_rate", ["0", "0.2"])
def test_demo_over_http_keeps_every_invariant(tmp_path: Path, fault_rate: str) -> None:
    """`accord demo --http` runs orders against the HTTP shop; every invariant holds."""
    data = tmp_path / "run"
    summary = _summary(
        _accord("demo", "--http", "--orders", "80", "--concurrency", "20", "--fault-rate",
                fault_rate, "--data", str(data), "--json")
    )  # fmt: skip
    assert all(summary["invariants"].values()), summary["violations"]
    assert summary["committed"] > 0
    assert summary["committed"] + summary["aborted"] + summary["needs_attention"] == 80
    assert summary["stuck"] == 0
    # The services' side of the run: without faults each call is one request
    # they received; serving them cost CPU there.
    if fault_rate == "0":
        assert summary["requests"] == summary["calls"] == 80 * 8
    assert summary["requests_per_s"] > 0 and summary["services_cpu_us_per_txn"] > 0
    assert (data / "secret").stat().st_mode & 0o077 == 0  # the secret is private
    assert (data / "secret").read_text() not in json.dumps(summary)
    verified = _summary(_accord("verify", "--data", str(data), "--json"))
    assert all(verified["invariants"].values()), verified["violations"]


def test_coordinator_killed_while_services_keep_running(tmp_path: Path) -> None:
    """SIGKILL the coordinator mid-run with the services up (started apart, the
    demo sets its faults on them); recover converges."""
    port = free_port()
    services_dir = tmp_path / "services"
    secret = tmp_path / "secret"
    server = subprocess.Popen(
        [*ACCORD, "services", "--data", str(services_dir), "--port", str(port),
         "--orders", "120", "--seed", "3", "--latency-ms", "5", "--secret-file", str(secret)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while (
            not secret.exists()
            or subprocess.run(
                ["curl", "-sf", f"{url}/healthz"], capture_output=True, check=False
            ).returncode
            != 0
        ):
            assert time.monotonic() < deadline, "services did not start"
            time.sleep(0.2)
        data = tmp_path / "run"
        killed = _accord(
            "demo", "--services-url", url, "--secret-file", str(secret), "--orders", "120",
            "--seed", "3", "--concurrency", "30", "--data", str(data), "--json",
            env={"ACCORD_CRASH_AT": "log.commit.durable", "ACCORD_CRASH_AFTER": "10"},
        )  # fmt: skip
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        # The demo set its own faults (defaults: 5%, no latency) on services it did not start.
        auth = f"authorization: Bearer {secret.read_text().strip()}"
        view = subprocess.run(
            ["curl", "-sf", "-H", auth, f"{url}/admin/faults"], capture_output=True, check=True
        )
        faults = json.loads(view.stdout)
        assert (faults["fault_rate"], faults["latency_ms"]) == (0.05, 0.0)
        recovered = _summary(_accord("recover", "--data", str(data), "--json"))
        assert recovered["recovered"] >= 1
        assert recovered["stuck"] == 0
        assert all(recovered["invariants"].values()), recovered["violations"]
        verified = _summary(_accord("verify", "--data", str(data), "--json"))
        assert all(verified["invariants"].values()), verified["violations"]
    finally:
        server.terminate()
        server.wait(timeout=10)
