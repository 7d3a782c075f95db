"""The participant over HTTP: signatures, body limits, status codes, the barrier behind them."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from accord import wire
from accord.core.spec import Op
from accord.participant import Participant, Refusal, SQLiteBarrier

from .conftest import BACKENDS, INITIAL, Bank, open_bank

KEY_ID = "coordinator-1"
SECRET = b"a shared secret of enough length"
PREFIX = "/payment"
BASE_URL = "http://participant.test"


@dataclass
class Harness:
    bank: Bank
    participant: Participant[Any]
    client: httpx.AsyncClient
    fail_next: list[BaseException]

    async def post(
        self,
        op: str,
        body: dict[str, Any] | bytes,
        *,
        sign_path: str | None = None,
        signed_body: bytes | None = None,
        secret: bytes = SECRET,
        key_id: str = KEY_ID,
        now_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        """POST a signed call to ``{PREFIX}/{op}``; the keywords spoil the signature."""
        content = body if isinstance(body, bytes) else msgspec.json.encode(body)
        path = f"{PREFIX}/{op}"
        signature = wire.sign(
            secret,
            key_id,
            "POST",
            sign_path or path,
            content if signed_body is None else signed_body,
            now_s=now_s,
        )
        return await self.client.post(
            path, content=content, headers=signature if headers is None else headers
        )


def call(op: str, txid: str = "t1", **payload: Any) -> dict[str, Any]:
    return {
        "txid": txid,
        "branch": "payment",
        "op": op,
        "payload": {"account": "alice", "amount": 10, **payload},
        "attempt": 1,
    }


def _handler(bank: Bank, op: Op, fail_next: list[BaseException]) -> Callable[[Any, Any], Any]:
    def handle(tx: Any, request: wire.WireRequest) -> Any:
        fail = fail_next.pop() if fail_next else None
        run = bank.handler(
            request.txid,
            op,
            branch=request.branch,
            account=request.payload["account"],
            amount=request.payload["amount"],
            fail=fail,
        )
        return run(tx)

    return handle


@pytest.fixture(params=BACKENDS)
async def http(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with open_bank(request.param, tmp_path) as bank:
        fail_next: list[BaseException] = []
        participant: Participant[Any] = Participant(
            bank.barrier,
            wire.Verifier({KEY_ID: SECRET}),
            handlers={op: _handler(bank, op, fail_next) for op in (Op.TRY, Op.CONFIRM, Op.CANCEL)},
        )
        app = Starlette(routes=[Mount(PREFIX, participant)])
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=BASE_URL
        ) as client:
            yield Harness(bank, participant, client, fail_next)


async def test_signed_try_returns_its_result(http: Harness) -> None:
    """A signed try runs its handler and answers 200 with the result."""
    response = await http.post("try", call("try"))
    assert response.status_code == 200
    assert response.json() == {"result": {"op": "try", "amount": 10, "balance": 990}}
    assert await http.bank.account() == (990, 10, 0)


async def test_duplicate_signed_request_returns_the_same_result(http: Harness) -> None:
    """A redelivery (fresh nonce, same txid/branch/op) gets the first answer, applies nothing."""
    first = await http.post("try", call("try"))
    again = await http.post("try", call("try", amount=30))
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert http.bank.runs["try"] == 1
    assert await http.bank.account() == (990, 10, 0)


async def test_refusal_is_409_and_repeated(http: Harness) -> None:
    """A business refusal answers 409 with its message, and so does its duplicate."""
    first = await http.post("try", call("try", amount=10_000))
    again = await http.post("try", call("try", amount=10_000))
    assert first.status_code == again.status_code == 409
    assert first.json() == again.json() == {"error": "insufficient funds: alice cannot pay 10000"}
    assert http.bank.runs["try"] == 1


async def test_cancel_before_try_over_http(http: Harness) -> None:
    """A cancel first answers 200 with no result; the try arriving later gets 409."""
    cancelled = await http.post("cancel", call("cancel"))
    assert (cancelled.status_code, cancelled.json()) == (200, {"result": None})
    late = await http.post("try", call("try"))
    assert late.status_code == 409
    assert "cancel arrived before try" in late.json()["error"]
    assert await http.bank.account() == (INITIAL["alice"], 0, 0)


async def test_out_of_order_confirm_is_422(http: Harness) -> None:
    """A confirm without an applied try is rejected (422), not refused, and records nothing."""
    response = await http.post("confirm", call("confirm"))
    assert response.status_code == 422
    assert response.json() == {"error": "confirm without a try"}
    assert await http.bank.rows() == {}


async def test_handler_exception_is_500_and_a_retry_applies(http: Harness) -> None:
    """An unexpected exception answers 500, leaves no barrier row, and the retry applies."""
    http.fail_next.append(RuntimeError("connection to the ledger lost"))
    failed = await http.post("try", call("try"))
    assert failed.status_code == 500
    assert "RuntimeError" in failed.json()["error"]
    state = await http.bank.state()
    assert (state.barrier, state.ledger, state.accounts["alice"]) == ({}, [], (1000, 0, 0))

    retried = await http.post("try", call("try"))
    assert retried.status_code == 200
    assert await http.bank.account() == (990, 10, 0)


STALE_S = wire.MAX_SKEW_S + 60


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        ({"headers": {}}, "unsigned request"),
        ({"key_id": "someone-else"}, "unknown key id 'someone-else'"),
        ({"secret": b"a guessed secret"}, "signature mismatch"),
        ({"signed_body": msgspec.json.encode(call("try", amount=1))}, "signature mismatch"),
        ({"sign_path": "/try"}, "signature mismatch"),
        ({"now_s": 1_000_000_000.0}, "stale request"),
    ],
    ids=[
        "unsigned",
        "unknown-key",
        "wrong-secret",
        "tampered-body",
        "path-without-prefix",
        "stale",
    ],
)
async def test_bad_signatures_are_401_and_change_nothing(
    http: Harness, spoil: dict[str, Any], reason: str
) -> None:
    """Unsigned, unknown-key, tampered, mis-pathed or stale requests get 401 naming why."""
    before = await http.bank.state()
    response = await http.post("try", call("try"), **spoil)
    assert response.status_code == 401
    assert reason in response.json()["error"]
    assert await http.bank.state() == before
    assert http.bank.runs["try"] == 0


async def test_replayed_request_is_401_and_changes_nothing(http: Harness) -> None:
    """The exact same signed request sent again (same nonce) is refused as a replay."""
    content = msgspec.json.encode(call("try"))
    headers = wire.sign(SECRET, KEY_ID, "POST", f"{PREFIX}/try", content)
    first = await http.client.post(f"{PREFIX}/try", content=content, headers=headers)
    assert first.status_code == 200
    after_first = await http.bank.state()

    replay = await http.client.post(f"{PREFIX}/try", content=content, headers=headers)
    assert replay.status_code == 401
    assert "replayed request" in replay.json()["error"]
    assert await http.bank.state() == after_first
    assert http.bank.runs["try"] == 1


async def test_oversized_body_is_413(http: Harness) -> None:
    """A body over wire.MAX_BODY_BYTES is refused with 413 before anything else."""
    body = b"x" * (wire.MAX_BODY_BYTES + 1)
    response = await http.post("try", body)
    assert response.status_code == 413
    assert str(wire.MAX_BODY_BYTES) in response.json()["error"]


async def test_oversized_streamed_body_is_413(http: Harness) -> None:
    """A chunked body with no content-length is cut off at the limit with 413."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(wire.MAX_BODY_BYTES // 65536 + 2):
            yield b"x" * 65536

    response = await http.client.post(f"{PREFIX}/try", content=chunks())
    assert response.status_code == 413
    assert await http.bank.rows() == {}


@pytest.mark.parametrize(
    ("path_op", "body", "message"),
    [
        ("try", b"{not json", "malformed JSON"),
        ("try", b'{"branch": "payment", "op": "try"}', "txid"),
        ("try", msgspec.json.encode({**call("try"), "extra": 1}), "extra"),
        ("try", msgspec.json.encode({**call("try"), "txid": ""}), "non-empty"),
        ("try", msgspec.json.encode({**call("try"), "attempt": 0}), "attempt"),
        ("try", msgspec.json.encode({**call("try"), "txid": "x" * 300}), "txid is 300 characters"),
        ("try", msgspec.json.encode(call("cancel")), "does not match"),
        ("confirm", msgspec.json.encode(call("try")), "does not match"),
    ],
    ids=[
        "malformed",
        "missing-txid",
        "unknown-field",
        "empty-txid",
        "attempt-0",
        "long-txid",
        "op-mismatch",
        "op-mismatch-2",
    ],
)
async def test_bad_bodies_are_400_and_change_nothing(
    http: Harness, path_op: str, body: bytes, message: str
) -> None:
    """Signed but malformed, incomplete or mismatched bodies get 400 naming the problem."""
    before = await http.bank.state()
    response = await http.post(path_op, body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert await http.bank.state() == before


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", f"{PREFIX}/bogus", 404),
        ("POST", f"{PREFIX}/action", 404),  # a valid op with no handler here
        ("POST", f"{PREFIX}/try/extra", 404),
        ("GET", f"{PREFIX}/try", 405),
    ],
)
async def test_unknown_routes(http: Harness, method: str, path: str, status: int) -> None:
    """Unknown or unregistered operations are 404, other methods 405, with a JSON error."""
    response = await http.client.request(method, path)
    assert response.status_code == status
    assert "error" in response.json()


async def test_registration_rules(tmp_path: Path) -> None:
    """One handler per known op; the SQLite barrier refuses coroutine handlers up front."""
    async with SQLiteBarrier(tmp_path / "b.db") as barrier:
        participant: Participant[sqlite3.Connection] = Participant(
            barrier, wire.Verifier({KEY_ID: SECRET})
        )

        @participant.try_
        def reserve(conn: sqlite3.Connection, request: wire.WireRequest) -> None:
            return None

        assert reserve.__name__ == "reserve"  # the decorator returns the function
        with pytest.raises(ValueError, match="already registered"):
            participant.register(Op.TRY, reserve)
        with pytest.raises(ValueError, match="unknown operation"):
            participant.register("prepare", reserve)

        async def release(conn: sqlite3.Connection, request: wire.WireRequest) -> None:
            return None

        with pytest.raises(TypeError, match="async"):
            participant.cancel(release)


async def test_signature_covers_the_percent_encoded_path(tmp_path: Path) -> None:
    """Under a non-ASCII prefix the path is verified as sent (percent-encoded), not decoded."""
    async with SQLiteBarrier(tmp_path / "b.db") as barrier:
        await barrier.migrate()
        participant: Participant[sqlite3.Connection] = Participant(
            barrier, wire.Verifier({KEY_ID: SECRET}), handlers={"try": lambda conn, call: "ok"}
        )
        app = Starlette(routes=[Mount("/café", participant)])
        body = msgspec.json.encode(call("try"))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=BASE_URL
        ) as client:
            raw = "/caf%C3%A9/try"
            decoded = await client.post(
                raw, content=body, headers=wire.sign(SECRET, KEY_ID, "POST", "/café/try", body)
            )
            assert decoded.status_code == 401
            signed = await client.post(
                raw, content=body, headers=wire.sign(SECRET, KEY_ID, "POST", raw, body)
            )
            assert (signed.status_code, signed.json()) == (200, {"result": "ok"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_saga_participant_over_real_http(tmp_path: Path) -> None:
    """Over uvicorn on 127.0.0.1: decorators, action, duplicate, compensate, and a 401."""
    barrier = SQLiteBarrier(tmp_path / "shop.db")
    await barrier.migrate()
    stock = {"sku": 3}
    participant: Participant[sqlite3.Connection] = Participant(
        barrier, wire.Verifier({KEY_ID: SECRET})
    )

    @participant.action
    def deduct(conn: sqlite3.Connection, request: wire.WireRequest) -> dict[str, int]:
        if stock["sku"] < request.payload["qty"]:
            raise Refusal("out of stock")
        stock["sku"] -= request.payload["qty"]
        return {"left": stock["sku"]}

    @participant.compensate
    def restock(conn: sqlite3.Connection, request: wire.WireRequest) -> None:
        stock["sku"] += request.payload["qty"]

    port = _free_port()
    app = Starlette(routes=[Mount("/inventory", participant)])
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)

        async def send(
            op: str, qty: int, *, txid: str = "o1", signed: bool = True
        ) -> httpx.Response:
            body = msgspec.json.encode(
                {"txid": txid, "branch": "inventory", "op": op, "payload": {"qty": qty}}
            )
            path = f"/inventory/{op}"
            headers = wire.sign(SECRET, KEY_ID, "POST", path, body) if signed else {}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                return await client.post(path, content=body, headers=headers)

        assert (await send("action", 2, signed=False)).status_code == 401
        first, again = await send("action", 2), await send("action", 2)
        assert first.json() == again.json() == {"result": {"left": 1}}
        assert (await send("compensate", 2)).status_code == 200
        assert (await send("compensate", 2)).status_code == 200
        assert stock == {"sku": 3}
        assert (await send("action", 9, txid="o2")).status_code == 409
    finally:
        server.should_exit = True
        await serving
        await barrier.close()


async def _direct_participant(tmp_path: Path) -> tuple[SQLiteBarrier, Participant[Any]]:
    barrier = SQLiteBarrier(tmp_path / "b.db", max_workers=0)
    await barrier.migrate()
    participant: Participant[Any] = Participant(
        barrier, wire.Verifier({KEY_ID: SECRET}), handlers={"try": lambda conn, call: "ok"}
    )
    return barrier, participant


@pytest.mark.parametrize("root_path", ["", "/svc"])
async def test_participant_serves_without_a_mount(tmp_path: Path, root_path: str) -> None:
    """Used as the whole app (optionally under a server root_path): same routes and signature."""
    barrier, participant = await _direct_participant(tmp_path)
    body = msgspec.json.encode(call("try"))
    path = f"{root_path}/try"
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=participant, root_path=root_path),
            base_url=BASE_URL,
        ) as client:
            ok = await client.post(
                path, content=body, headers=wire.sign(SECRET, KEY_ID, "POST", path, body)
            )
            assert (ok.status_code, ok.json()) == (200, {"result": "ok"})
            assert ok.headers["content-type"] == "application/json"
            unsigned = await client.post(path, content=body)
            assert unsigned.status_code == 401
            assert (await client.post(f"{root_path}/try/extra", content=body)).status_code == 404
            assert (await client.post(f"{root_path}/", content=body)).status_code == 404
            assert (await client.post(f"{root_path}/cancel", content=body)).status_code == 404
    finally:
        await barrier.close()


async def test_other_methods_are_405_with_allow(http: Harness) -> None:
    """A GET of an operation is 405 naming POST as allowed, even for an unknown op."""
    for path in (f"{PREFIX}/try", f"{PREFIX}/bogus"):
        response = await http.client.get(path)
        assert response.status_code == 405
        assert response.headers["allow"] == "POST"
        assert response.json() == {"error": "Method Not Allowed"}


async def test_malformed_content_length_is_400(http: Harness) -> None:
    """A content-length that is not a number is refused with 400 naming it; nothing changes."""
    before = await http.bank.state()
    body = msgspec.json.encode(call("try"))
    headers = wire.sign(SECRET, KEY_ID, "POST", f"{PREFIX}/try", body)
    scope_headers = [(k.encode(), v.encode()) for k, v in headers.items()]
    scope_headers.append((b"content-length", b"ten"))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": f"{PREFIX}/try",
        "raw_path": f"{PREFIX}/try".encode(),
        "root_path": PREFIX,
        "headers": scope_headers,
        "query_string": b"",
    }
    await http.participant(scope, receive, send)
    assert sent[0]["status"] == 400
    assert msgspec.json.decode(sent[1]["body"]) == {"error": "malformed content-length 'ten'"}
    assert await http.bank.state() == before


async def test_a_client_gone_before_its_body_gets_no_answer(tmp_path: Path) -> None:
    """A disconnect while the body is read sends nothing and runs nothing."""
    barrier, participant = await _direct_participant(tmp_path)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/try", "headers": []}
    try:
        await participant(scope, receive, send)
        assert sent == []
    finally:
        await barrier.close()


async def test_lifespan_when_served_alone(tmp_path: Path) -> None:
    """Served as the whole app, the participant completes the server's startup and shutdown."""
    barrier, participant = await _direct_participant(tmp_path)
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    try:
        await participant({"type": "lifespan"}, receive, send)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    finally:
        await barrier.close()
