"""Operator actions through the API: retry, abort, resolve, each recorded in the log
with its reason; refused (409 / 404 / 422) where they do not apply."""

from __future__ import annotations

import time

import httpx
import pytest

from accord.core.records import OperatorAction
from accord.errors import (
    AccordError,
    CoordinatorClosed,
    Overloaded,
    StoreError,
    TransactionNotFound,
)
from accord.server import Limits

from .conftest import LiveServer, order_body, wait_until


def _post(live: LiveServer, path: str, body: object, query: str = "") -> httpx.Response:
    return httpx.post(f"{live.url}{path}{query}", json=body, headers=live.headers, timeout=30)


def _get(live: LiveServer, txid: str) -> dict:
    r = httpx.get(f"{live.url}/v1/transactions/{txid}", headers=live.headers)
    assert r.status_code == 200, r.text
    return r.json()


def _notes(live: LiveServer, txid: str) -> list[tuple[str, str]]:
    snap = live.run(live.store.get(txid))
    assert snap is not None
    return [(r.action, r.reason) for r in snap.history if isinstance(r, OperatorAction)]


def _park(live: LiveServer, txid: str) -> None:
    live.participants.mode["payment"] = "fail_phase2"
    r = _post(live, "/v1/transactions", order_body(txid), "?wait=true")
    assert r.json()["status"] == "needs_attention", r.text
    live.participants.mode["payment"] = "ok"


def test_retry_resumes_a_parked_transaction_and_records_the_reason(
    live_server: LiveServer,
) -> None:
    """needs_attention, the participant fixed: retry drives it to committed; logged."""
    _park(live_server, "op-1")
    r = _post(
        live_server, "/v1/transactions/op-1/retry", {"reason": "payment is back"}, "?wait=true"
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "committed"
    assert _notes(live_server, "op-1") == [("retry", "payment is back")]
    got = _get(live_server, "op-1")
    assert got["operator_actions"][0]["action"] == "retry"
    assert got["operator_actions"][0]["reason"] == "payment is back"
    payment = next(b for b in got["branches"] if b["name"] == "payment")
    outcomes = [(t["op"], t["outcome"]) for t in payment["timeline"]]
    assert ("confirm", "transient") in outcomes and outcomes[-1] == ("confirm", "ok")


def test_retry_of_a_waiting_call_sends_it_now(live_server_factory: object) -> None:
    """A branch waiting 20 s for its next attempt: retry sends it at once."""
    live: LiveServer = live_server_factory()  # type: ignore[operator]
    live.participants.mode["inventory"] = "fail"
    body = order_body("op-2", timeout_s=120)  # the retry must fit before the deadline
    body["branches"][1]["retry"] = {"initial_interval_s": 20, "maximum_interval_s": 20,
                                    "maximum_attempts": 5, "jitter": False}  # fmt: skip
    assert _post(live, "/v1/transactions", body).status_code == 202
    wait_until(lambda: _get(live, "op-2")["branches"][1]["attempts"] >= 1)
    live.participants.mode["inventory"] = "ok"
    started = time.monotonic()
    r = _post(live, "/v1/transactions/op-2/retry", {"reason": "inventory restarted"}, "?wait=true")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "committed"
    assert time.monotonic() - started < 10
    assert _notes(live, "op-2") == [("retry", "inventory restarted")]


def test_abort_of_a_running_transaction_is_recorded_with_its_reason(
    live_server_factory: object,
) -> None:
    """Undecided and running: abort ends it aborted, the reason in the log and the result."""
    live: LiveServer = live_server_factory()  # type: ignore[operator]
    live.participants.mode["shipping"] = "hang"
    assert _post(live, "/v1/transactions", order_body("op-3")).status_code == 202
    r = _post(live, "/v1/transactions/op-3/abort", {"reason": "customer cancelled"})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == "/v1/transactions/op-3"
    live.call(live.participants.release)
    wait_until(lambda: _get(live, "op-3")["status"] == "aborted")
    got = _get(live, "op-3")
    assert got["reason"] == "aborted by operator: customer cancelled"
    assert _notes(live, "op-3") == [("abort", "customer cancelled")]


def test_resolve_closes_a_parked_transaction_with_its_decision(live_server: LiveServer) -> None:
    """needs_attention (commit decided) repaired by hand: resolve makes it committed."""
    _park(live_server, "op-4")
    calls = len(live_server.participants.calls)
    r = _post(live_server, "/v1/transactions/op-4/resolve", {"reason": "confirmed by hand"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "committed"
    assert r.json()["reason"] == "resolved by operator: confirmed by hand"
    assert _notes(live_server, "op-4") == [("resolve", "confirmed by hand")]
    assert len(live_server.participants.calls) == calls


@pytest.mark.parametrize("action", ["retry", "abort", "resolve"])
def test_actions_on_a_committed_transaction_are_conflicts(
    live_server: LiveServer, action: str
) -> None:
    """Nothing to do on a committed transaction: 409 saying why; nothing logged."""
    assert (
        _post(live_server, "/v1/transactions", order_body("op-5"), "?wait=true").json()["status"]
        == "committed"
    )
    r = _post(live_server, f"/v1/transactions/op-5/{action}", {"reason": "why not"})
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "not_applicable"
    assert "committed" in r.json()["error"]
    assert _notes(live_server, "op-5") == []


@pytest.mark.parametrize("action", ["retry", "abort", "resolve"])
def test_actions_on_an_unknown_transaction_are_404(live_server: LiveServer, action: str) -> None:
    r = _post(live_server, f"/v1/transactions/nope/{action}", {"reason": "why"})
    assert r.status_code == 404
    assert "'nope'" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "names"),
    [({}, "reason"), ({"reason": ""}, "reason"), ({"reason": "   "}, "reason"),
     ({"reason": "x" * 1001}, "reason"), ({"reason": "ok", "force": True}, "force")],
)  # fmt: skip
def test_an_action_needs_a_reason(live_server: LiveServer, body: dict, names: str) -> None:
    """A missing, empty, blank or oversized reason, or an unknown field: 422 naming it."""
    _park(live_server, "op-6")
    r = _post(live_server, "/v1/transactions/op-6/resolve", body)
    assert r.status_code == 422, r.text
    assert names in r.json()["error"]
    assert _get(live_server, "op-6")["status"] == "needs_attention"


_METHODS = {"retry": "retry", "abort": "abort_any", "resolve": "resolve"}


@pytest.mark.parametrize("action", ["retry", "abort", "resolve"])
@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (TransactionNotFound("no transaction 'op-7'", txid="op-7"), 404, "not_found"),
        (CoordinatorClosed("the coordinator is not running"), 503, "unavailable"),
        (StoreError("database is locked"), 503, "unavailable"),
        (Overloaded("in-flight limit reached"), 503, "overloaded"),
        (AccordError("transaction 'op-7' could not be resumed"), 409, "not_applicable"),
    ],
    ids=["not-found", "closed", "store", "overloaded", "state-changed"],
)  # fmt: skip
def test_every_failure_of_an_action_is_a_clear_status(
    live_server: LiveServer,
    monkeypatch: pytest.MonkeyPatch,
    action: str,
    error: Exception,
    status: int,
    code: str,
) -> None:
    """Whatever the coordinator raises: 404, 409 with the state, or 503 with Retry-After; no 500."""
    _park(live_server, "op-7")

    async def failing(txid: str, reason: str) -> None:
        raise error

    monkeypatch.setattr(live_server.coordinator, _METHODS[action], failing)
    r = _post(live_server, f"/v1/transactions/op-7/{action}", {"reason": "why"})
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    if status == 503:
        assert r.headers["retry-after"] == "1"
    if status == 409:
        assert "needs_attention" in r.json()["error"]


@pytest.mark.parametrize("max_reason_chars", [10, 2000])
def test_the_reason_length_limit_is_the_servers(
    live_server_factory: object, max_reason_chars: int
) -> None:
    """Limits.max_reason_chars, lower or higher than the default: enforced by
    the API (422 naming it, nothing logged) and stated by /openapi.json."""
    live: LiveServer = live_server_factory(  # type: ignore[operator]
        limits=Limits(max_reason_chars=max_reason_chars)
    )
    _park(live, "op-8")
    r = _post(live, "/v1/transactions/op-8/resolve", {"reason": "x" * (max_reason_chars + 1)})
    assert r.status_code == 422, r.text
    assert (r.json()["field"], r.json()["limit"]) == ("reason", "max_reason_chars")
    assert f"limit of {max_reason_chars}" in r.json()["error"]
    assert _notes(live, "op-8") == []
    r = _post(live, "/v1/transactions/op-8/resolve", {"reason": "y" * max_reason_chars})
    assert r.status_code == 200, r.text
    assert _notes(live, "op-8") == [("resolve", "y" * max_reason_chars)]
    document = httpx.get(f"{live.url}/openapi.json").json()
    reason = document["components"]["schemas"]["ActionIn"]["properties"]["reason"]
    assert reason["maxLength"] == max_reason_chars
