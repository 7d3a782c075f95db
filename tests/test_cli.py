"""The ``accord`` command line: clear errors for bad input, JSON output, run directories, txn."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import uvloop
from typer.testing import CliRunner, Result

from accord.cli import app
from accord.cli._loop import run as run_cli_loop
from accord.core.records import TxnStatus
from accord.sim.invariants import INVARIANTS

runner = CliRunner()


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def message(result: Result) -> str:
    """stderr with Rich's line wrapping undone."""
    return " ".join(result.stderr.split())


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A finished 40-order demo run with some faults."""
    data = tmp_path_factory.mktemp("cli") / "run"
    result = invoke(
        "demo", "--orders", 40, "--concurrency", 10, "--fault-rate", 0.1, "--seed", 2,
        "--data", data, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return data, json.loads(result.stdout)


# ---------------------------------------------------------------- bad input creates nothing

BAD_DEMO = [
    (["--orders", "0"], r"--orders"),
    (["--orders", "-5"], r"--orders"),
    (["--orders", "abc"], r"--orders"),
    (["--concurrency", "0"], r"--concurrency"),
    (["--protocol", "xa"], r"--protocol.*xa"),
    (["--fault-rate", "1.5"], r"fault[-_]rate.*1\.5"),
    (["--fault-rate", "nan"], r"fault[-_]rate.*nan"),
    (["--fault-rate", "-0.1"], r"fault[-_]rate"),
    (["--latency-ms", "-1"], r"latency[-_]ms"),
    (["--latency-ms", "nan"], r"latency[-_]ms"),
    (["--store", "bogus://x"], r"store.*bogus://x"),
    (["--store", "postgresql://x?schema=no-dash"], r"schema.*no-dash"),
    (["--synchronous", "bogus"], r"synchronous.*BOGUS"),
]


@pytest.mark.parametrize(("args", "pattern"), BAD_DEMO, ids=[" ".join(a) for a, _ in BAD_DEMO])
def test_bad_demo_option_is_a_clear_error_and_creates_nothing(
    args: list[str], pattern: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad demo option exits 2 with a message naming it, and leaves no files behind."""
    monkeypatch.chdir(tmp_path)
    result = invoke("demo", *args, "--data", tmp_path / "run", "--json")
    assert result.exit_code == 2, result.output
    assert re.search(pattern, message(result), re.IGNORECASE), message(result)
    assert result.stdout == ""
    assert tree(tmp_path) == []


def test_bad_demo_option_without_data_creates_no_default_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --data, a rejected demo does not create the default .accord run directory."""
    monkeypatch.chdir(tmp_path)
    result = invoke("demo", "--protocol", "xa")
    assert result.exit_code == 2
    assert "--protocol" in message(result)
    assert tree(tmp_path) == []


# ---------------------------------------------------------------- demo --json


def test_demo_json_prints_one_summary_object(finished_run: tuple[Path, dict[str, Any]]) -> None:
    """``demo --json`` prints exactly one JSON object with the documented keys and sane values."""
    data, summary = finished_run
    for key in (
        "orders",
        "committed",
        "aborted",
        "needs_attention",
        "stuck",
        "retries",
        "faults",
        "throughput_tps",
        "latency_ms",
        "invariants",
    ):
        assert key in summary, key
    assert summary["orders"] == 40
    assert summary["committed"] + summary["aborted"] + summary["needs_attention"] == 40
    assert summary["committed"] > 0
    assert summary["stuck"] == 0
    assert set(summary["latency_ms"]) >= {"p50", "p95", "p99"}
    lat = summary["latency_ms"]
    assert 0 <= lat["p50"] <= lat["p95"] <= lat["p99"]
    assert set(summary["invariants"]) == set(INVARIANTS)
    assert all(v is True for v in summary["invariants"].values())
    assert all(isinstance(v, int) for v in summary["faults"].values())
    assert sum(summary["faults"].values()) > 0  # --fault-rate 0.1 injected something
    assert summary["throughput_tps"] > 0
    assert (data / "run.json").exists()


def test_demo_json_stdout_is_exactly_one_line(tmp_path: Path) -> None:
    """stdout of ``demo --json`` is one line holding one JSON object, nothing else."""
    result = invoke("demo", "--orders", 10, "--fault-rate", 0, "--data", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert isinstance(json.loads(lines[0]), dict)


def test_reusing_a_run_directory_is_refused(
    finished_run: tuple[Path, dict[str, Any]],
) -> None:
    """A --data directory that already holds a run is refused and left exactly as it was."""
    data, _ = finished_run
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*")}
    config = (data / "run.json").read_text()
    result = invoke("demo", "--orders", 5, "--data", data, "--json")
    assert result.exit_code == 2
    assert "already holds a run" in message(result)
    assert str(data) in message(result)
    assert (data / "run.json").read_text() == config
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in data.rglob("*")} == before


# ---------------------------------------------------------------- verify and recover


def test_verify_and_recover_a_finished_run(finished_run: tuple[Path, dict[str, Any]]) -> None:
    """verify passes on a finished run; recover finds nothing to resume and passes too."""
    data, summary = finished_run
    result = invoke("verify", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    verified = json.loads(result.stdout)
    assert verified["transactions"] == 40
    assert verified["committed"] == summary["committed"]
    assert verified["stuck"] == 0
    assert all(verified["invariants"].values())
    result = invoke("recover", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    recovered = json.loads(result.stdout)
    assert recovered["recovered"] == 0
    assert recovered["stuck"] == 0
    assert all(recovered["invariants"].values())


@pytest.mark.parametrize("command", ["verify", "recover"])
@pytest.mark.parametrize("shape", ["missing", "empty", "other files"])
def test_verify_recover_on_a_non_run_directory_is_a_clear_error(
    command: str, shape: str, tmp_path: Path
) -> None:
    """verify/recover on a directory that is not a run exit 2 saying so, creating nothing."""
    data = tmp_path / "notarun"
    if shape != "missing":
        data.mkdir()
    if shape == "other files":
        (data / "notes.txt").write_text("hello")
    before = tree(tmp_path)
    result = invoke(command, "--data", data, "--json")
    assert result.exit_code == 2, result.output
    assert "--data must be a directory of a demo run" in message(result)
    assert result.stdout == ""
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["verify", "recover"])
@pytest.mark.parametrize("content", ['["not", "a", "config"]', '{"bogus": 1}', "not json"])
def test_verify_recover_with_a_foreign_run_json_is_a_clear_error(
    command: str, content: str, tmp_path: Path
) -> None:
    """A run.json that is not a demo's settings is a clean error (exit 2), not a traceback."""
    (tmp_path / "run.json").write_text(content)
    result = invoke(command, "--data", tmp_path, "--json")
    assert result.exit_code == 2, repr(result.exception)
    assert message(result).startswith("error:")
    assert result.stdout == ""
    assert tree(tmp_path) == ["run.json"]


@pytest.mark.parametrize("command", ["verify", "recover"])
def test_verify_recover_with_empty_service_files_is_a_clear_error(
    command: str, finished_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A run whose services/*.db are not service databases is a clean error (exit 2)."""
    data, _ = finished_run
    (tmp_path / "run.json").write_text((data / "run.json").read_text())
    shutil.copy(data / "coordinator.db", tmp_path / "coordinator.db")
    (tmp_path / "services").mkdir()
    for name in ("order", "inventory", "payment", "shipping"):
        (tmp_path / "services" / f"{name}.db").touch()
    result = invoke(command, "--data", tmp_path, "--json")
    assert result.exit_code == 2, repr(result.exception)
    assert "not a service database" in message(result)
    assert result.stdout == ""


@pytest.mark.parametrize("parts", [("run[bold]x",), ("a[", "x]")], ids=["style", "closing-tag"])
def test_error_message_shows_a_path_with_brackets_verbatim(
    parts: tuple[str, ...], tmp_path: Path
) -> None:
    """A --data path containing [brackets] is echoed verbatim in the error, not parsed as markup."""
    data = tmp_path.joinpath(*parts)
    data.mkdir(parents=True)
    result = invoke("verify", "--data", data)
    assert result.exit_code == 2, repr(result.exception)
    assert str(data) in message(result)


# ---------------------------------------------------------------- txn list / show


def test_txn_list_json(finished_run: tuple[Path, dict[str, Any]]) -> None:
    """``txn list --json`` prints one JSON line per transaction, in id order, all terminal."""
    data, summary = finished_run
    result = invoke("txn", "list", "--data", data, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 40
    ids = [r["id"] for r in rows]
    assert ids == sorted(ids)
    assert all(TxnStatus(r["status"]).terminal for r in rows)
    assert all(r["protocol"] == "tcc" and r["branches"] == 4 for r in rows)
    statuses = [r["status"] for r in rows]
    assert statuses.count("committed") == summary["committed"]
    assert statuses.count("aborted") == summary["aborted"]


def test_txn_list_filters_and_pages(finished_run: tuple[Path, dict[str, Any]]) -> None:
    """--state filters by status; --limit and --after page through the ids without overlap."""
    data, summary = finished_run
    result = invoke("txn", "list", "--data", data, "--state", "committed", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == summary["committed"]
    assert {r["status"] for r in rows} == {"committed"}
    first = invoke("txn", "list", "--data", data, "--limit", 15, "--json")
    page1 = [json.loads(line)["id"] for line in first.stdout.splitlines()]
    second = invoke("txn", "list", "--data", data, "--limit", 100, "--after", page1[-1], "--json")
    page2 = [json.loads(line)["id"] for line in second.stdout.splitlines()]
    assert len(page1) == 15
    assert len(page2) == 25
    assert page2[0] > page1[-1]
    assert len(set(page1 + page2)) == 40


def test_txn_show_json(finished_run: tuple[Path, dict[str, Any]]) -> None:
    """``txn show ID --json`` prints the transaction with its four branches and its history."""
    data, _ = finished_run
    listed = invoke("txn", "list", "--data", data, "--state", "committed", "--json")
    txid = json.loads(listed.stdout.splitlines()[0])["id"]
    result = invoke("txn", "show", txid, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    detail = json.loads(lines[0])
    assert detail["id"] == txid
    assert detail["status"] == "committed"
    assert detail["decision"] == "commit"
    assert [b["name"] for b in detail["branches"]] == ["order", "inventory", "payment", "shipping"]
    assert all(b["status"] == "done" for b in detail["branches"])
    assert detail["history"][0]["record"] == "Begin"


def test_txn_show_unknown_id_is_a_clear_error(finished_run: tuple[Path, dict[str, Any]]) -> None:
    """``txn show nope`` exits 2 naming the missing id."""
    data, _ = finished_run
    result = invoke("txn", "show", "nope", "--data", data)
    assert result.exit_code == 2
    assert "no transaction 'nope'" in message(result)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["list", "--state", "bogus"], "--state must be one of"),
        (["list", "--limit", "0"], "--limit"),
        (["list", "--data", "DIR"], "--data must be a directory of a demo run"),
        (["show", "x", "--data", "DIR"], "--data must be a directory of a demo run"),
        (["list"], "--data"),
        (["list", "--store", "bogus://x"], "bogus://x"),
        (["purge", "--older-than-days", "0", "--data", "DIR"], "--older-than-days must be a"),
        (["purge", "--older-than-days", "nan", "--data", "DIR"], "--older-than-days must be a"),
        (["purge", "--older-than-days", "50000", "--data", "DIR"], "reaches back before 1970"),
        (["purge", "--older-than-days", "7", "--data", "DIR"], "--data must be a directory"),
    ],
)
def test_txn_bad_input_is_a_clear_error(args: list[str], words: str, tmp_path: Path) -> None:
    """Bad txn options exit 2 with a message naming the option, and create nothing."""
    args = [str(tmp_path / "missing") if a == "DIR" else a for a in args]
    result = invoke("txn", *args)
    assert result.exit_code == 2, result.output
    assert words in message(result)
    assert tree(tmp_path) == []


def test_txn_purge_deletes_finished_transactions_older_than_asked(tmp_path: Path) -> None:
    """A fresh run's transactions are younger than a day: nothing purged; all
    of them older than a few microseconds: every finished one purged."""
    data = tmp_path / "run"
    done = invoke("demo", "--orders", 30, "--fault-rate", 0, "--data", data, "--json")
    assert done.exit_code == 0, done.output
    kept = invoke("txn", "purge", "--data", data, "--older-than-days", 1, "--json")
    assert kept.exit_code == 0, kept.output
    assert json.loads(kept.stdout)["purged"] == 0
    gone = invoke("txn", "purge", "--data", data, "--older-than-days", 1e-10, "--json")
    assert gone.exit_code == 0, gone.output
    assert json.loads(gone.stdout)["purged"] == 30
    listed = invoke("txn", "list", "--data", data, "--json")
    assert listed.exit_code == 0 and listed.stdout == ""


def test_the_command_line_runs_on_uvloop() -> None:
    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert run_cli_loop(loop_type()) is uvloop.Loop
