"""Recovery time after a SIGKILL with N transactions in flight.

    .venv/bin/python bench/recovery.py [--in-flight 10 100 1000] [--repeat 3]

For each N: run `accord demo` with N in flight (and a little injected latency
so that calls are outstanding), SIGKILL it at a log point once the run is well
under way, then time `accord recover` until every transaction is terminal,
and check that its invariants hold. Prints the recovered count and the
recovery time (median and max over the repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCORD = [sys.executable, "-c", "from accord.cli import main; main()"]


def one(in_flight: int, seed: int, tmp: Path) -> tuple[int, float, float]:
    data = tmp / f"n{in_flight}-s{seed}"
    orders = in_flight * 3
    env = dict(
        os.environ, ACCORD_CRASH_AT="log.begin.durable", ACCORD_CRASH_AFTER=str(in_flight * 2)
    )
    demo = subprocess.run(
        [
            *ACCORD,
            "demo",
            "--orders",
            str(orders),
            "--concurrency",
            str(in_flight),
            "--latency-ms",
            "20",
            "--fault-rate",
            "0",
            "--seed",
            str(seed),
            "--data",
            str(data),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if demo.returncode != -9:
        raise SystemExit(f"the demo was not killed (exit {demo.returncode}): {demo.stderr}")
    started = time.perf_counter()
    rec = subprocess.run(
        [*ACCORD, "recover", "--data", str(data), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if rec.returncode != 0:
        raise SystemExit(f"recover failed (exit {rec.returncode}): {rec.stdout} {rec.stderr}")
    summary = json.loads(rec.stdout)
    if not all(summary["invariants"].values()) or summary["stuck"]:
        raise SystemExit(f"invariants after recovery: {summary['violations']}")
    return summary["recovered"], summary["recovery_s"], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{'in flight':>9s} {'recovered':>9s} {'resume+finish s (median/max)':>30s}"
        f" {'whole command s (median)':>25s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.in_flight:
            runs = [one(n, seed, Path(tmp)) for seed in range(1, args.repeat + 1)]
            inner = [r[1] for r in runs]
            print(
                f"{n:9d} {statistics.median(r[0] for r in runs):9.0f}"
                f" {statistics.median(inner):18.3f} / {max(inner):.3f}"
                f" {statistics.median(r[2] for r in runs):25.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
