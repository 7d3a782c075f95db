"""The REST API against a live server: submit, read, list, stats, health."""

from __future__ import annotations

import httpx

from .conftest import LiveServer, order_body


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
