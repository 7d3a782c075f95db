"""Security of the API: bearer tokens, the participant allow-list, redirects never
followed, secrets never logged."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from accord import Coordinator, HttpTransport, MemoryStore
from accord.server import AllowList
from accord.server.auth import BearerAuth

from .conftest import LiveServer, order_body, serve_in_thread, start_live_server

PROTECTED = [
    ("GET", "/v1/transactions"),
    ("POST", "/v1/transactions"),
    ("GET", "/v1/transactions/t-1"),
    ("POST", "/v1/transactions/t-1/retry"),
    ("POST", "/v1/transactions/t-1/abort"),
    ("POST", "/v1/transactions/t-1/resolve"),
    ("GET", "/v1/stats"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token-0123456789", "Basic dXNlcjpwYXNz", "bearer"],
    ids=["none", "wrong", "basic", "scheme-only"],
)
def test_api_needs_the_bearer_token(
    live_server: LiveServer, method: str, path: str, authorization: str | None
) -> None:
    """No, wrong or non-bearer credentials: 401 JSON, and nothing is created."""
    headers = {"authorization": authorization} if authorization else {}
    r = httpx.request(method, live_server.url + path, json=order_body("t-1"), headers=headers)
    assert r.status_code == 401
    assert r.json()["code"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert live_server.run(live_server.store.list()) == []


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json"])
def test_health_checks_and_the_document_are_open(live_server: LiveServer, path: str) -> None:
    """No token needed for /healthz, /readyz and /openapi.json."""
    assert httpx.get(live_server.url + path).status_code == 200


def test_the_right_token_is_accepted(live_server: LiveServer) -> None:
    r = httpx.get(f"{live_server.url}/v1/stats", headers=live_server.headers)
    assert r.status_code == 200


def test_several_tokens_any_of_them_works() -> None:
    """A rotation: every configured token is accepted, others are not."""
    a, b = secrets.token_hex(16), secrets.token_hex(16)
    auth = BearerAuth(Starlette(), [a, b])
    assert auth.allowed(f"Bearer {a}".encode())
    assert auth.allowed(f"Bearer {b}".encode())
    assert not auth.allowed(f"Bearer {a}x".encode())
    assert not auth.allowed(a.encode())


@pytest.mark.parametrize(
    ("participant", "allowed"),
    [
        ("http://shop.test/order", True),
        ("http://shop.test:80/order", True),
        ("http://SHOP.test/order", True),
        ("https://shop.test/order", False),  # scheme not listed
        ("http://shop.test:81/order", False),  # port not listed
        ("http://evil.test/order", False),
        ("http://shop.test.evil.test/order", False),
        ("http://api.internal:9000/pay", True),  # any port
        ("http://a.b.internal:1/x", True),  # subdomains
        ("http://internal/x", False),  # the bare domain is not a subdomain
        ("https://pay.example.com/v1/tcc", True),  # path prefix
        ("https://pay.example.com/v1/tcc/", True),
        ("https://pay.example.com/v1/tccX", False),  # prefix at a path boundary only
        ("https://pay.example.com/v2", False),
        ("http://user:pw@shop.test/order", False),
        ("http://shop.test/order?x=1", False),
        ("http://shop.test/order#x", False),
        ("http://shop.test\\@evil.test/", False),
        ("ftp://shop.test/order", False),
        ("javascript:alert(1)", False),
        ("", False),
        ("order", False),
    ],
)
def test_allow_list_matches_scheme_host_port_and_path(participant: str, allowed: bool) -> None:
    """Entries match scheme, host (exact or *.domain), port (default or *) and path prefix."""
    allow = AllowList(["http://shop.test", "http://*.internal:*", "https://pay.example.com/v1/tcc"])
    assert (allow.check(participant) is None) is allowed


@pytest.mark.parametrize(
    "entry", ["ftp://x.test", "http://", "not a url", "http://x.test?q=1", "http://u:p@x.test"]
)
def test_allow_list_refuses_malformed_entries(entry: str) -> None:
    with pytest.raises(ValueError, match="allow-list entry"):
        AllowList([entry])


@pytest.fixture
def redirecting() -> Iterator[tuple[str, list[str]]]:
    """A participant that answers every call with a redirect to a second server,
    which records whatever reaches it."""
    reached: list[str] = []

    async def target(request: Request) -> Response:
        reached.append(request.url.path)
        return JSONResponse({"result": "applied"})

    with serve_in_thread(Starlette(routes=[Route("/{p:path}", target, methods=["POST"])])) as (
        target_url,
        _,
        _,
    ):

        async def redirect(request: Request) -> Response:
            return RedirectResponse(f"{target_url}{request.url.path}", status_code=307)

        app = Starlette(routes=[Route("/{p:path}", redirect, methods=["POST"])])
        with serve_in_thread(app) as (url, _, _):
            yield url, reached


def test_a_participant_redirect_is_never_followed(redirecting: tuple[str, list[str]]) -> None:
    """A 307 from an allowed participant: the call is rejected, the target never reached."""
    url, reached = redirecting
    key = ("k1", secrets.token_bytes(32))
    coordinator = Coordinator(MemoryStore(), HttpTransport({url: key}))
    with start_live_server(coordinator=coordinator, allow=AllowList([url])) as live:
        body = order_body("redir-1", prefix=url + "/")
        r = httpx.post(
            f"{live.url}/v1/transactions?wait=true", json=body, headers=live.headers, timeout=30
        )
        assert r.status_code == 200, r.text
        got = httpx.get(f"{live.url}/v1/transactions/redir-1", headers=live.headers).json()
    # Every try was rejected; cancels of tries that might have applied were
    # rejected too, which parks the transaction for an operator.
    assert got["status"] in ("aborted", "needs_attention")
    assert got["decision"] == "abort"
    errors = [b["error"] for b in got["branches"]]
    assert all("redirects are not followed" in e for e in errors), errors
    assert reached == []


def test_tokens_and_signing_keys_never_reach_the_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests with good and bad tokens, calls signed with a key: neither appears in logs."""
    secret = secrets.token_bytes(32)
    coordinator = Coordinator(MemoryStore(), HttpTransport({"http://127.0.0.1:9": ("k1", secret)}))
    caplog.set_level(logging.DEBUG)
    with start_live_server(
        coordinator=coordinator, allow=AllowList(["http://127.0.0.1:9"])
    ) as live:
        body = order_body("sec-1", prefix="http://127.0.0.1:9/")  # port 9: refused
        for branch in body["branches"]:
            branch["retry"]["maximum_attempts"] = 2
        r = httpx.post(
            f"{live.url}/v1/transactions?wait=true", json=body, headers=live.headers, timeout=30
        )
        assert r.status_code == 200, r.text
        httpx.get(f"{live.url}/v1/stats", headers={"authorization": f"Bearer {live.token}x"})
        token = live.token
        stored = live.run(live.store.get("sec-1"))
    assert stored is not None
    text = caplog.text + repr(stored)
    assert token not in text
    assert secret.hex() not in text
    assert str(secret) not in text
