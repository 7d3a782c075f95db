"""The crash matrix (TESTING.md tier 2): SIGKILL the real process at every log point, recover.

Each case runs ``accord demo`` in a subprocess with ``ACCORD_CRASH_AT`` set, so
the process kills itself the n-th time it passes that point; then ``accord
recover`` (no crash) must finish every transaction with every invariant
holding, and ``accord verify`` must agree from the files alone. The crash
count is chosen so the point is reached mid-run: a case whose point is no
longer reached fails (the demo exits 0 instead of being killed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

KILLED = -signal.SIGKILL
ORDERS = 60
SEED = 2
# A little injected latency (median, ms) spreads the calls out, so that other
# transactions are mid-flight whichever point the process dies at.
LATENCY_MS = 2


@dataclass(frozen=True)
class Case:
    protocol: str
    point: str
    fault_rate: float
    after: int
    # Optionally crash the first recovery too: (point, after).
    recovery_crash: tuple[str, int] | None = None

    @property
    def id(self) -> str:
        shape = "faults" if self.fault_rate else "clean"
        tail = f"-then-{self.recovery_crash[0]}" if self.recovery_crash else ""
        return f"{self.protocol}-{self.point}-{shape}{tail}"


# The n-th passage at which to die: mid-run for a 60-order run with 20 in flight.
# Only a saga's committed end and needs-attention ends are durable (a TCC
# commit's end is lazy: its decision is the durable record), and only some
# orders commit, hence the small counts for commit and end.durable.
AFTER = {
    "log.begin.appended": 30,
    "log.begin.durable": 30,
    "log.commit.appended": 3,
    "log.commit.durable": 3,
    "log.abort.appended": 3,
    "log.end.appended": 20,
    "log.end.durable": 1,  # the first: the last of a few comes late in some runs
    "log.attempt.appended": 20,
}
POINTS = {
    "tcc": [p for p in AFTER if p != "log.end.durable"],  # reached only when parked
    "saga": [p for p in AFTER if ".commit." not in p],  # a saga logs no commit record
}


def _cases() -> list[Case]:
    cases = []
    for protocol, points in POINTS.items():
        for point in points:
            for fault_rate in (0.0, 0.2):
                if point == "log.attempt.appended" and not fault_rate:
                    continue  # attempts are only logged when a call fails transiently
                cases.append(Case(protocol, point, fault_rate, AFTER[point]))
    return cases


CASES = _cases()
RECOVERY_CASES = [
    Case("tcc", "log.attempt.appended", 0.2, 20, ("recovery.resumed", 3)),
    Case("saga", "log.attempt.appended", 0.2, 20, ("recovery.resumed", 3)),
    Case("tcc", "log.commit.durable", 0.2, 3, ("recovery.loaded", 1)),
]


@dataclass
class Runs:
    demo: subprocess.CompletedProcess[str]
    crashed_recover: subprocess.CompletedProcess[str] | None = None
    recover: subprocess.CompletedProcess[str] | None = None
    verify: subprocess.CompletedProcess[str] | None = None
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)


def accord(args: list[str], cwd: Path, crash: tuple[str, int] | None = None) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCORD_CRASH")}
    if crash is not None:
        env["ACCORD_CRASH_AT"], env["ACCORD_CRASH_AFTER"] = crash[0], str(crash[1])
    return subprocess.run(
        [sys.executable, "-c", "from accord.cli import main; main()", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def run_case(case: Case, root: Path) -> Runs:
    """demo (killed at the point), [recover killed too], recover, verify."""
    work = root / case.id
    work.mkdir(parents=True)
    data = work / "run"
    demo = accord(
        [
            "demo", "--orders", str(ORDERS), "--concurrency", "20", "--protocol", case.protocol,
            "--fault-rate", str(case.fault_rate), "--latency-ms", str(LATENCY_MS),
            "--seed", str(SEED), "--data", str(data), "--json",
        ],
        work,
        (case.point, case.after),
    )  # fmt: skip
    runs = Runs(demo)
    if demo.returncode != KILLED:
        return runs
    if case.recovery_crash is not None:
        runs.crashed_recover = accord(
            ["recover", "--data", str(data), "--json"], work, case.recovery_crash
        )
        if runs.crashed_recover.returncode != KILLED:
            return runs
    runs.recover = accord(["recover", "--data", str(data), "--json"], work)
    runs.verify = accord(["verify", "--data", str(data), "--json"], work)
    for name in ("recover", "verify"):
        proc = getattr(runs, name)
        if proc.returncode in (0, 1) and proc.stdout.strip():
            runs.summaries[name] = json.loads(proc.stdout)
    return runs


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Runs]:
    """Every case, two at a time (the machine has two cores)."""
    root = tmp_path_factory.mktemp("crash")
    everything = CASES + RECOVERY_CASES
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda c: run_case(c, root), everything))
    return {case.id: runs for case, runs in zip(everything, done, strict=True)}


def _explain(proc: subprocess.CompletedProcess[str] | None) -> str:
    if proc is None:
        return "not run"
    return f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"


def assert_recovered(runs: Runs) -> None:
    """recover finishes everything with every invariant holding; verify agrees from the files."""
    assert runs.recover is not None
    assert runs.recover.returncode == 0, _explain(runs.recover)
    recovered = runs.summaries["recover"]
    assert recovered["invariants"], recovered
    assert all(recovered["invariants"].values()), recovered["violations"]
    assert recovered["stuck"] == 0
    assert recovered["unfinished"] == 0
    assert recovered["duplicates_applied"] == 0
    assert runs.verify is not None
    assert runs.verify.returncode == 0, _explain(runs.verify)
    verified = runs.summaries["verify"]
    assert all(verified["invariants"].values()), verified["violations"]
    assert verified["stuck"] == 0
    assert 1 <= verified["transactions"] <= ORDERS
    assert (
        verified["committed"] + verified["aborted"] + verified["needs_attention"]
        == verified["transactions"]
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_crash_at_log_point_then_recover(case: Case, matrix: dict[str, Runs]) -> None:
    """SIGKILL at a log point mid-run; recovery leaves nothing stuck and every invariant holds."""
    runs = matrix[case.id]
    assert runs.demo.returncode == KILLED, (
        f"{case.point} was not reached (or the demo failed): {_explain(runs.demo)}"
    )
    assert runs.demo.stdout == ""  # killed before it could report anything
    assert_recovered(runs)
    # Killed mid-run: there were transactions in flight for recovery to finish.
    assert runs.summaries["recover"]["recovered"] >= 1


@pytest.mark.parametrize("case", RECOVERY_CASES, ids=[c.id for c in RECOVERY_CASES])
def test_crash_during_recovery_then_recover_again(case: Case, matrix: dict[str, Runs]) -> None:
    """A recovery SIGKILLed while resuming is itself recovered: nothing stuck, invariants hold."""
    runs = matrix[case.id]
    assert runs.demo.returncode == KILLED, _explain(runs.demo)
    assert runs.crashed_recover is not None
    assert runs.crashed_recover.returncode == KILLED, _explain(runs.crashed_recover)
    assert_recovered(runs)
    # The killed recovery could not have finished them all: the second one resumed some.
    assert runs.summaries["recover"]["recovered"] >= 1
