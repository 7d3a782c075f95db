"""The HTTP shop's app: service calls dispatched in front of Starlette answer as through it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from starlette.applications import Starlette

from accord import wire
from accord.sim.http_shop import (
    KEY_ID,
    Faults,
    ShopApp,
    _resigned,
    build_app,
    create_databases,
    read_state,
)
from accord.sim.workload import ShopConfig, Workload

SECRET = b"a shared secret of enough length"
BASE_URL = "http://shop.test"


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[ShopApp]:
    create_databases(tmp_path, Workload(ShopConfig(orders=10, seed=1)).initial_state())
    app, _ = build_app(tmp_path, SECRET, Faults())
    async with app.router.lifespan_context(app):
        yield app


def _client(app: Any, root_path: str = "") -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, root_path=root_path), base_url=BASE_URL
    )


async def _post(
    client: httpx.AsyncClient, path: str, txid: str, op: str, payload: Any
) -> httpx.Response:
    body = msgspec.json.encode(
        {"txid": txid, "branch": path.split("/")[-2], "op": op, "payload": payload}
    )
    headers = wire.sign(SECRET, KEY_ID, "POST", path, body)
    return await client.post(path, content=body, headers=headers)


def _starlette_only(app: ShopApp) -> Any:
    """The same app, every request through Starlette's middleware and Mounts."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        await Starlette.__call__(app, scope, receive, send)

    return asgi


@pytest.mark.parametrize("root_path", ["", "/shop"])
async def test_dispatched_calls_answer_as_through_starlette(shop: ShopApp, root_path: str) -> None:
    """Try, duplicate, confirm, refusal and a bad signature: same status and body both ways."""
    seen: list[list[tuple[int, Any]]] = []
    for n, app in enumerate((shop, _starlette_only(shop))):
        answers = []
        async with _client(app, root_path) as client:
            base = f"{root_path}/payment"
            account = {"account": "cust-1", "amount": 5}
            for path, op, payload in [
                (f"{base}/try", "try", account),
                (f"{base}/try", "try", account),
                (f"{base}/confirm", "confirm", account),
                (f"{base}/try", "try", {"account": "cust-1", "amount": 10**12}),
            ]:
                txid = f"t{n}-big" if payload["amount"] > 5 else f"t{n}"
                response = await _post(client, path, txid, op, payload)
                answers.append((response.status_code, response.json()))
            unsigned = await client.post(f"{base}/try", content=b"{}")
            answers.append((unsigned.status_code, unsigned.json()))
            unknown = await client.post(f"{base}/bogus", content=b"{}")
            answers.append((unknown.status_code, unknown.json()))
        seen.append(answers)
    assert seen[0] == seen[1]
    assert [status for status, _ in seen[0]] == [200, 200, 200, 409, 401, 404]


async def test_admin_and_health_still_go_through_starlette(shop: ShopApp) -> None:
    """Paths that are not a service call (health, admin) are Starlette's routes as before."""
    async with _client(shop) as client:
        assert (await client.get("/healthz")).json() == {"ok": True}
        assert (await client.get("/admin/faults")).status_code == 401
        auth = {"authorization": f"Bearer {SECRET.hex()}"}
        faults = await client.get("/admin/faults", headers=auth)
        assert faults.json()["fault_rate"] == 0.0
        assert (await client.get("/nowhere")).status_code == 404


async def test_usage_counts_each_services_requests_for_the_admin_only(shop: ShopApp) -> None:
    """GET /admin/usage: the requests each service received (refused ones too) and
    this process's CPU time, growing; 401 without the admin secret."""
    auth = {"authorization": f"Bearer {SECRET.hex()}"}
    async with _client(shop) as client:
        assert (await client.get("/admin/usage")).status_code == 401
        before = (await client.get("/admin/usage", headers=auth)).json()
        assert before["requests"] == {"order": 0, "inventory": 0, "payment": 0, "shipping": 0}
        account = {"account": "cust-1", "amount": 5}
        assert (await _post(client, "/payment/try", "t1", "try", account)).status_code == 200
        assert (await _post(client, "/payment/try", "t1", "try", account)).status_code == 200
        assert (await client.post("/shipping/try", content=b"{}")).status_code == 401
        after = (await client.get("/admin/usage", headers=auth)).json()
    assert after["requests"] == {"order": 0, "inventory": 0, "payment": 2, "shipping": 1}
    assert after["cpu_s"] > before["cpu_s"]


async def test_a_dispatched_call_is_durable_in_the_service_file(
    shop: ShopApp, tmp_path: Path
) -> None:
    """The applied try is in the ledger the checker reads, its effect decoded as before."""
    async with _client(shop) as client:
        payload = {"slot": "day-0", "order_id": "o-1"}
        response = await _post(client, "/shipping/try", "t1", "try", payload)
        assert response.status_code == 200
    state = read_state(tmp_path)["shipping"]
    assert [entry[1:6] for entry in state["ledger"]] == [
        ["t1", "shipping", "try", "applied", [("slot:day-0", [0, 1, 0])]]
    ]
    capacity = state["initial"]["slot:day-0"][0]
    assert state["counters"]["slot:day-0"] == [capacity, 1, 0]


def test_a_resigned_duplicate_verifies_on_the_raw_or_decoded_path() -> None:
    """The fault middleware's re-signed copy signs the path the participant will verify."""
    body = b"{}"
    for scope in (
        {"path": "/café/try", "raw_path": b"/caf%C3%A9/try?x=1", "headers": []},
        {"path": "/café/try", "headers": []},
    ):
        fresh = _resigned(scope, body, SECRET)
        headers = {k.decode(): v.decode() for k, v in fresh["headers"]}
        verifier = wire.Verifier({KEY_ID: SECRET})
        assert verifier.verify("POST", wire.signed_path(fresh), headers, body) == KEY_ID
