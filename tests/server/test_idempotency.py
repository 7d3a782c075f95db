"""The transaction id is the idempotency key: same key and body, one transaction
(concurrently too, and across a restart); same key, other body, a clear 409."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import aiohttp
import httpx
import pytest

from accord import SQLiteStore, Store

from .conftest import FakeParticipants, LiveServer, order_body, start_live_server, wait_until

DUPLICATES = 40


async def _post_many(live: LiveServer, body: dict, n: int, key: str) -> list[tuple[int, dict]]:
    headers = {**live.headers, "idempotency-key": key}
    async with aiohttp.ClientSession() as session:

        async def one() -> tuple[int, dict]:
            async with session.post(f"{live.url}/v1/transactions", json=body, headers=headers) as r:
                return r.status, await r.json()

        return await asyncio.gather(*(one() for _ in range(n)))


def _tries(live: LiveServer, txid: str) -> Counter[tuple[str, str]]:
    return Counter((c.branch, c.op.value) for c in live.participants.calls if c.txid == txid)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize("in_flight", [True, False], ids=["while-in-flight", "any-time"])
async def test_concurrent_duplicate_submits_create_one_transaction(
    tmp_path: Path, backend: str, in_flight: bool
) -> None:
    """40 concurrent POSTs with one Idempotency-Key: all 2xx, one transaction, one try each."""
    store: Store | None = SQLiteStore(tmp_path / "log.db") if backend == "sqlite" else None
    participants = FakeParticipants()
    if in_flight:  # the payment try hangs: every duplicate arrives while it runs
        participants.mode["payment"] = "hang"
    with start_live_server(store=store, participants=participants) as live:
        results = await _post_many(live, order_body(), DUPLICATES, "dup-1")
        assert {status for status, _ in results} <= {200, 202}, results
        assert {body["id"] for _, body in results} == {"dup-1"}
        if in_flight:
            live.call(live.participants.release)
        wait_until(lambda: live.coordinator.in_flight == 0, what="the transaction to end")
        rows = live.run(live.store.list())
        assert [r.id for r in rows] == ["dup-1"]
        tries = _tries(live, "dup-1")
        assert {k: v for k, v in tries.items() if k[1] == "try"} == {
            (name, "try"): 1 for name in ("order", "inventory", "payment", "shipping")
        }
        snap = live.run(live.store.get("dup-1"))
        assert snap is not None and snap.status.value == "committed"


def test_same_key_other_body_is_a_conflict_and_changes_nothing(live_server: LiveServer) -> None:
    """A second body under a used id: 409 naming the id; the first transaction unchanged."""
    url = f"{live_server.url}/v1/transactions"
    first = order_body("k-1")
    r = httpx.post(url + "?wait=true", json=first, headers=live_server.headers)
    assert r.status_code == 200, r.text
    other = order_body("k-1")
    other["branches"][0]["payload"] = {"n": 999}
    for _ in range(2):  # while terminal; and the answer does not change
        r = httpx.post(url, json=other, headers=live_server.headers)
        assert r.status_code == 409, r.text
        assert r.json()["code"] == "conflict"
        assert "'k-1'" in r.json()["error"]
    got = httpx.get(f"{url}/k-1", headers=live_server.headers).json()
    assert got["spec"]["branches"][0]["payload"] == {"n": 0}
    assert got["status"] == "committed"
    same = httpx.post(url, json=first, headers=live_server.headers)
    assert same.status_code == 200
    assert same.json()["status"] == "committed"
    assert live_server.coordinator.metrics.started == 1


def test_other_body_while_the_first_is_in_flight_is_a_conflict(
    live_server_factory: object,
) -> None:
    """Under the same id, a different body while the first runs: 409, one transaction."""
    participants = FakeParticipants()
    participants.mode["order"] = "hang"
    live = live_server_factory(participants=participants)  # type: ignore[operator]
    url = f"{live.url}/v1/transactions"
    r = httpx.post(url, json=order_body("k-2"), headers=live.headers)
    assert r.status_code == 202, r.text
    other = order_body("k-2", protocol="saga")
    r = httpx.post(url, json=other, headers=live.headers)
    assert r.status_code == 409, r.text
    live.call(live.participants.release)
    wait_until(lambda: live.coordinator.in_flight == 0)
    assert [row.id for row in live.run(live.store.list())] == ["k-2"]


def test_idempotency_holds_across_a_restart(tmp_path: Path) -> None:
    """After a restart on the same log: same body, same (terminal) answer; other body, 409."""
    db = tmp_path / "log.db"
    with start_live_server(store=SQLiteStore(db)) as live:
        r = httpx.post(
            f"{live.url}/v1/transactions?wait=true",
            json=order_body(),
            headers={**live.headers, "idempotency-key": "r-1"},
        )
        assert r.status_code == 200, r.text
        first = r.json()
    with start_live_server(store=SQLiteStore(db)) as live:
        r = httpx.post(
            f"{live.url}/v1/transactions",
            json=order_body("r-1"),
            headers=live.headers,
        )
        assert r.status_code == 200, r.text
        assert r.json() == first
        other = order_body("r-1", timeout_s=99)
        r = httpx.post(f"{live.url}/v1/transactions", json=other, headers=live.headers)
        assert r.status_code == 409, r.text
        assert live.coordinator.metrics.started == 0
        assert live.participants.calls == []


def test_body_id_and_header_may_both_name_the_same_key(live_server: LiveServer) -> None:
    """id in the body and an equal Idempotency-Key: accepted as that id."""
    r = httpx.post(
        f"{live_server.url}/v1/transactions",
        json=order_body("both-1"),
        headers={**live_server.headers, "idempotency-key": "both-1"},
    )
    assert r.status_code in (200, 202), r.text  # 200: already committed when answered
    assert r.json()["id"] == "both-1"
    assert r.headers["location"] == "/v1/transactions/both-1"


def test_without_a_key_each_submit_is_a_new_transaction(live_server: LiveServer) -> None:
    """No id and no header: the server picks a fresh id each time."""
    url = f"{live_server.url}/v1/transactions"
    ids = {
        httpx.post(url, json=order_body(), headers=live_server.headers).json()["id"]
        for _ in range(3)
    }
    assert len(ids) == 3


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
@pytest.mark.parametrize(
    ("mode", "status"),
    [("ok", "committed"), ("refuse", "aborted"), ("fail_phase2", "needs_attention")],
)
def test_every_replay_of_a_terminal_key_gets_the_first_answer(
    tmp_path: Path, backend: str, mode: str, status: str
) -> None:
    """The wait=true answer and every later replay of its key: the same body (decision too)."""
    store: Store | None = SQLiteStore(tmp_path / "log.db") if backend == "sqlite" else None
    participants = FakeParticipants()
    participants.mode["payment"] = mode
    with start_live_server(store=store, participants=participants) as live:
        url = f"{live.url}/v1/transactions"
        headers = {**live.headers, "idempotency-key": "same-1"}
        first = httpx.post(url + "?wait=true", json=order_body(), headers=headers, timeout=30)
        assert first.status_code == 200, first.text
        assert first.json()["status"] == status
        for _ in range(2):
            again = httpx.post(url, json=order_body(), headers=headers, timeout=30)
            assert (again.status_code, again.json()) == (200, first.json())
    if status == "needs_attention":
        assert first.json()["decision"] == "commit"
