"""The REST API against a live server: submit, read, list, stats, health."""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import httpx
import pytest

import accord.server.api
import accord.server.app
from accord import SQLiteStore, TxnStatus
from accord.core.records import TxnSnapshot
from accord.errors import StoreError

from .conftest import FakeParticipants, LiveServer, order_body, start_live_server, wait_until


def test_submit_wait_returns_the_committed_result(live_server: LiveServer) -> None:
    """POST ?wait=true answers 200 with the terminal result and a Location."""
    r = httpx.post(
        f"{live_server.url}/v1/transactions?wait=true",
        json=order_body("t-wait"),
        headers=live_server.headers,
    )
    assert r.status_code == 200, r.text
    assert r.headers["location"] == "/v1/transactions/t-wait"
    body = r.json()
    assert body["status"] == "committed"
    assert body["decision"] == "commit"
    assert [b["status"] for b in body["branches"]] == ["done"] * 4


def test_health_checks_are_open_and_ready(live_server: LiveServer) -> None:
    """/healthz and /readyz answer without a token once recovery is done."""
    assert httpx.get(f"{live_server.url}/healthz").json() == {"status": "ok", "detail": ""}
    r = httpx.get(f"{live_server.url}/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"


def _submit(live: LiveServer, body: dict, query: str = "?wait=true") -> dict:
    r = httpx.post(f"{live.url}/v1/transactions{query}", json=body, headers=live.headers)
    assert r.status_code in (200, 202), r.text
    return r.json()


def test_submit_without_wait_is_202_with_a_location(live_server_factory: object) -> None:
    """wait=false answers 202 once the transaction is durable, before it ends."""
    participants = FakeParticipants()
    participants.mode["order"] = "hang"
    live: LiveServer = live_server_factory(participants=participants)  # type: ignore[operator]
    r = httpx.post(f"{live.url}/v1/transactions", json=order_body("a-1"), headers=live.headers)
    assert r.status_code == 202
    assert r.headers["location"] == "/v1/transactions/a-1"
    assert r.json()["status"] == "preparing"
    assert live.run(live.store.get("a-1")) is not None  # in the log before the answer
    live.call(participants.release)


def test_wait_is_bounded_by_wait_s(live_server_factory: object) -> None:
    """A transaction that does not end within wait_s: 202 after about wait_s."""
    participants = FakeParticipants()
    participants.mode["order"] = "hang"
    live: LiveServer = live_server_factory(participants=participants)  # type: ignore[operator]
    started = time.monotonic()
    r = httpx.post(
        f"{live.url}/v1/transactions?wait=true&wait_s=0.3",
        json=order_body("a-2"),
        headers=live.headers,
    )
    assert r.status_code == 202
    assert 0.25 < time.monotonic() - started < 5
    live.call(participants.release)


def test_get_shows_branches_attempts_and_the_dashboard_fields(live_server: LiveServer) -> None:
    """GET: every field the dashboard reads; a failed attempt in the branch's timeline."""
    body = order_body("g-1")
    live_server.participants.mode["inventory"] = "fail_prepare"
    body["branches"][1]["retry"]["maximum_attempts"] = 2
    done = _submit(live_server, body)
    assert done["status"] == "aborted"
    got = httpx.get(f"{live_server.url}/v1/transactions/g-1", headers=live_server.headers).json()
    assert set(got) >= {
        "id", "protocol", "status", "decision", "reason", "created_at_ms", "updated_at_ms",
        "deadline_at_ms", "spec", "branches", "operator_actions",
    }  # fmt: skip
    assert got["spec"]["id"] == "g-1"
    inventory = got["branches"][1]
    assert set(inventory) >= {
        "name", "participant", "status", "op", "attempts", "error", "result", "timeline",
    }  # fmt: skip
    tries = [t for t in inventory["timeline"] if t["op"] == "try"]
    assert [(t["attempt"], t["outcome"]) for t in tries] == [(1, "transient"), (2, "transient")]
    assert all(t["error"] == "inventory is down" for t in tries)
    assert all(set(t) >= {"op", "attempt", "outcome", "started_at_ms", "latency_ms", "error"}
               for t in inventory["timeline"])  # fmt: skip
    assert inventory["error"] == "inventory is down"


def test_get_after_a_restart_shows_the_failed_attempts_from_the_log(tmp_path: Path) -> None:
    """The call history is in memory; after a restart the log's Attempted records remain."""
    db = tmp_path / "log.db"
    participants = FakeParticipants()
    participants.mode["payment"] = "fail_prepare"
    with start_live_server(store=SQLiteStore(db), participants=participants) as live:
        body = order_body("g-2")
        body["branches"][2]["retry"]["maximum_attempts"] = 3
        assert _submit(live, body)["status"] == "aborted"
    with start_live_server(store=SQLiteStore(db)) as live:
        got = httpx.get(f"{live.url}/v1/transactions/g-2", headers=live.headers).json()
    payment = got["branches"][2]
    assert [(t["op"], t["attempt"], t["outcome"]) for t in payment["timeline"]][:2] == [
        ("try", 1, "transient"),
        ("try", 2, "transient"),
    ]
    assert payment["timeline"][0]["latency_ms"] is None


def test_unknown_transaction_is_404(live_server: LiveServer) -> None:
    r = httpx.get(f"{live_server.url}/v1/transactions/nope", headers=live_server.headers)
    assert r.status_code == 404
    assert r.json() == {"error": "no transaction 'nope'", "code": "not_found", "field": None,
                        "limit": None}  # fmt: skip


def test_list_pages_filters_by_state_and_since(live_server: LiveServer) -> None:
    """limit + next_cursor walk every row once, in id order; state and since filter."""
    for i in range(5):
        _submit(live_server, order_body(f"l-{i}"))
    live_server.participants.mode["order"] = "refuse"
    _submit(live_server, order_body("l-9"))
    url = f"{live_server.url}/v1/transactions"
    seen, cursor = [], None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = httpx.get(url, params=params, headers=live_server.headers).json()
        seen += [row["id"] for row in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["l-0", "l-1", "l-2", "l-3", "l-4", "l-9"]
    row = page["items"][-1]
    assert set(row) == {"id", "protocol", "status", "decision", "reason", "branches",
                        "created_at_ms", "updated_at_ms"}  # fmt: skip
    aborted = httpx.get(url, params={"state": "aborted"}, headers=live_server.headers).json()
    assert [r["id"] for r in aborted["items"]] == ["l-9"]
    since = row["created_at_ms"]
    later = httpx.get(url, params={"since": str(since)}, headers=live_server.headers).json()
    assert [r["id"] for r in later["items"]] == [
        r for r in seen if live_server.run(live_server.store.get(r)).created_at_ms >= since
    ]
    bad = httpx.get(url, params={"cursor": "!!"}, headers=live_server.headers)
    assert bad.status_code == 400 and "cursor" in bad.json()["error"]


def test_stats_count_what_happened(live_server: LiveServer) -> None:
    """/v1/stats: the dashboard's counters and the log's counts by status."""
    _submit(live_server, order_body("s-1"))
    stats = httpx.get(f"{live_server.url}/v1/stats", headers=live_server.headers).json()
    assert set(stats) >= {"in_flight", "committed", "aborted", "needs_attention", "started",
                          "recovered", "calls", "retries", "by_status"}  # fmt: skip
    assert stats["committed"] == 1 and stats["calls"] == 8
    assert stats["by_status"]["committed"] == 1


def _unfinished_log(tmp_path: Path, *txids: str) -> Path:
    """A log left by a server stopped while these orders were in flight (their
    order participant never answered)."""
    db = tmp_path / "log.db"
    participants = FakeParticipants()
    participants.mode["order"] = "hang"
    with start_live_server(
        store=SQLiteStore(db), participants=participants, drain_timeout_s=0
    ) as live:
        for txid in txids:
            _submit(live, order_body(txid), query="")
    return db


def test_readyz_is_503_until_recovery_is_done(tmp_path: Path) -> None:
    """Unfinished work in the log: not ready while it is being recovered, then ready."""
    db = _unfinished_log(tmp_path, "rec-1", "rec-2")
    # One slot, held by the first recovered transaction (its cancels hang): the
    # second waits for it, and recovery is not done.
    participants = FakeParticipants()
    participants.mode["order"] = "hang"
    with start_live_server(
        store=SQLiteStore(db), participants=participants, max_in_flight=1
    ) as live:
        wait_until(lambda: live.coordinator.in_flight == 1)
        r = httpx.get(f"{live.url}/readyz")
        assert r.status_code == 503 and r.json()["status"] == "recovering"
        live.call(participants.release)
        wait_until(lambda: httpx.get(f"{live.url}/readyz").status_code == 200)
        for txid in ("rec-1", "rec-2"):
            wait_until(lambda txid=txid: live.run(live.store.get(txid)).status.terminal)


class _FlakyStartStore(SQLiteStore):
    """A log whose first ``failures`` recovery scans fail (the database is down)."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures
        self.scans = 0
        self.opened = False

    async def open(self) -> None:
        await super().open()
        self.opened = True

    async def load_active(self) -> list[TxnSnapshot]:
        if not self.opened:  # the store's own check at open
            return await super().load_active()
        self.scans += 1
        if self.scans <= self.failures:
            raise StoreError("database is down")
        return await super().load_active()


def test_a_failed_recovery_is_retried_until_it_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The log unreadable at start, twice: recovery retries with backoff, then
    readyz turns 200 and the unfinished transaction is driven to its end."""
    monkeypatch.setattr(accord.server.app, "RECOVERY_INITIAL_DELAY_S", 0.2, raising=False)
    db = _unfinished_log(tmp_path, "flaky-1")
    store = _FlakyStartStore(db, failures=2)
    with start_live_server(store=store) as live:
        wait_until(lambda: store.scans >= 1, what="the first recovery scan")
        r = httpx.get(f"{live.url}/readyz")
        assert r.status_code == 503 and "database is down" in r.json()["detail"]
        wait_until(lambda: httpx.get(f"{live.url}/readyz").status_code == 200, what="ready")
        wait_until(lambda: live.run(live.store.get("flaky-1")).status.terminal)
        assert store.scans == 3
        assert live.coordinator.metrics.recovered == 1
    failures = [r for r in caplog.records if "recovery failed" in r.getMessage()]
    assert [f"attempt {n}" in r.getMessage() for n, r in enumerate(failures, 1)] == [True, True]


def _count_scans(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the log's scans by status; the list's one item is the count."""
    store = live.store
    scans = [0]
    real = store.count_by_status

    async def counting() -> dict[TxnStatus, int]:
        scans[0] += 1
        return await real()

    monkeypatch.setattr(store, "count_by_status", counting)
    return scans


def test_stats_scan_the_log_at_most_once_per_max_age(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polling /v1/stats (the dashboard does, every second) reuses the log's counts
    for STATS_MAX_AGE_S; the coordinator's own counters are always current."""
    monkeypatch.setattr(accord.server.api, "STATS_MAX_AGE_S", 3600.0)  # not timing-dependent
    scans = _count_scans(live_server, monkeypatch)
    url = f"{live_server.url}/v1/stats"
    first = httpx.get(url, headers=live_server.headers).json()
    _submit(live_server, order_body("s-2"))
    second = httpx.get(url, headers=live_server.headers).json()
    assert scans == [1]
    assert second["committed"] == first["committed"] + 1  # live counter
    assert second["by_status"] == first["by_status"]  # the cached scan


def test_stats_scan_the_log_again_once_the_counts_are_older_than_max_age(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With STATS_MAX_AGE_S = 0 every GET /v1/stats scans the log: the counts are fresh."""
    monkeypatch.setattr(accord.server.api, "STATS_MAX_AGE_S", 0.0)
    scans = _count_scans(live_server, monkeypatch)
    url = f"{live_server.url}/v1/stats"
    first = httpx.get(url, headers=live_server.headers).json()
    _submit(live_server, order_body("s-3"))
    second = httpx.get(url, headers=live_server.headers).json()
    assert scans == [2]
    assert second["by_status"]["committed"] == first["by_status"]["committed"] + 1


def test_docs_name_the_modules_the_optional_routes_come_from() -> None:
    """docs/api.md names the modules create_app takes /metrics and the dashboard from."""
    docs = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    for module in ("accord.observability.metrics", "accord.server.dashboard"):
        importlib.import_module(module)
        assert f"`{module}`" in docs, module
