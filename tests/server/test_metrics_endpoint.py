"""GET /metrics on the real server: wired by create_app, behind the bearer
token like the API, counting what the API ran."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import LiveServer, order_body

pytestmark = pytest.mark.timeout(60)


def scrape(live: LiveServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    resp = httpx.get(f"{live.url}/metrics", headers=live.headers, timeout=10)
    assert resp.status_code == 200, resp.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def test_metrics_need_the_token(live_server: LiveServer) -> None:
    """Like the API (the dashboard's page and files are the public ones)."""
    assert httpx.get(f"{live_server.url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{live_server.url}/", timeout=10).status_code == 200


def test_metrics_count_what_the_api_ran(live_server: LiveServer) -> None:
    """Two committed and one refused transaction submitted over the API show in
    the scrape: finished by status, started, calls by op and outcome as the
    participants saw them, and the log's records."""
    live_server.participants.mode["shipping"] = "ok"
    with httpx.Client(base_url=live_server.url, headers=live_server.headers) as http:
        for txid in ("m1", "m2"):
            resp = http.post("/v1/transactions?wait=true", json=order_body(txid))
            assert resp.json()["status"] == "committed", resp.text
        live_server.participants.mode["payment"] = "refuse"
        resp = http.post("/v1/transactions?wait=true", json=order_body("m3"))
        assert resp.json()["status"] == "aborted", resp.text
    deadline = time.monotonic() + 10
    while live_server.call(lambda: live_server.coordinator.in_flight):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    samples = scrape(live_server)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    assert value("accord_transactions_started_total") == 3
    assert value("accord_transactions_finished_total", status="committed") == 2
    assert value("accord_transactions_finished_total", status="aborted") == 1
    assert value("accord_transaction_duration_seconds_count", status="committed") == 2
    seen: dict[tuple[str, str], int] = {}
    for call in live_server.participants.calls:
        refused = call.participant == "payment" and call.txid == "m3" and call.op == "try"
        key = (call.op.value, "refused" if refused else "ok")
        seen[key] = seen.get(key, 0) + 1
    scraped = {
        (dict(labels)["op"], dict(labels)["outcome"]): int(v)
        for (name, labels), v in samples.items()
        if name == "accord_branch_calls_total" and v
    }
    assert scraped == seen
    assert value("accord_log_records_total") >= 3 * 2  # at least Begin and End each
