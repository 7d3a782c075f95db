"""HttpTransport against real servers on 127.0.0.1: aiohttp.web participants,
raw asyncio sockets for broken replies, a subprocess paused with SIGSTOP, and
a Coordinator committing and aborting transactions over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gc
import gzip
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from pyreqwest.exceptions import ClientClosedError

from accord import (
    BranchSpec,
    Coordinator,
    MemoryStore,
    Op,
    Outcome,
    Protocol,
    RetryPolicy,
    TransactionSpec,
    TxnStatus,
    wire,
)
from accord.transport.base import Call, Reply
from accord.transport.http import MAX_RETRY_AFTER_S, HttpTransport

pytestmark = pytest.mark.timeout(60)

KEY_ID = "k1"
SECRET = b"first-shared-secret"
KEY = (KEY_ID, SECRET)
OTHER_KEY = ("k2", b"second-shared-secret")
SECRETS = {KEY_ID: SECRET, OTHER_KEY[0]: OTHER_KEY[1]}
TRACEPARENT_RE = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-01")
# Generous where the timeout is not what is under test: this machine is slow.
SLOW_OK_S = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Serve = Callable[[Handler], Awaitable[str]]


def make_call(
    participant: str,
    op: Op = Op.TRY,
    *,
    timeout_s: float = SLOW_OK_S,
    attempt: int = 1,
    txid: str = "tx-1",
    payload: Any = None,
) -> Call:
    return Call(
        txid,
        "b0",
        op,
        participant,
        {"sku": "a", "qty": 2} if payload is None else payload,
        attempt,
        timeout_s,
    )


@pytest.fixture
async def transport() -> AsyncIterator[HttpTransport]:
    t = HttpTransport({}, default_key=KEY)
    yield t
    await t.close()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an aiohttp.web server on a free port answering every path with a handler."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.2, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def json_response(status: int, body: Any, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        body=msgspec.json.encode(body),
        content_type="application/json",
        headers=headers,
    )


class RawServer:
    """A bare asyncio server: reads one request, then lets ``reply`` misbehave."""

    def __init__(self, reply: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.reply = reply
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            self.requests += 1
            await self.reply(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ---------------------------------------------------------------- success


async def test_success_returns_result_of_a_signed_traced_request(
    serve: Serve, transport: HttpTransport
) -> None:
    """A 2xx reply's "result" comes back; the request is signed, traced and well formed."""
    verifier = wire.Verifier(SECRETS)
    seen: list[tuple[str, str, wire.WireRequest, str]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        key_id = verifier.verify(request.method, request.rel_url.raw_path, request.headers, body)
        seen.append(
            (key_id, request.path, wire.decode_request(body), request.headers[wire.TRACEPARENT])
        )
        assert request.content_type == "application/json"
        return json_response(200, {"result": {"reserved": 2, "left": 3}})

    base = await serve(handler)
    call = make_call(f"{base}/inventory/", attempt=3, txid="order-8f3c")
    reply = await transport.call(call)
    assert reply == Reply(Outcome.OK, {"reserved": 2, "left": 3})
    [(key_id, path, request, trace)] = seen
    assert (key_id, path) == (KEY_ID, "/inventory/try")
    assert request == wire.WireRequest("order-8f3c", "b0", "try", {"sku": "a", "qty": 2}, 3)
    assert TRACEPARENT_RE.fullmatch(trace), trace
    assert await transport.call(call._replace(op=Op.CONFIRM)) == reply
    assert seen[1][1] == "/inventory/confirm"
    assert seen[1][3] != trace  # a fresh trace context per call


@pytest.mark.parametrize(
    ("status", "body"),
    [(200, b'{"ok": true}'), (200, b"[1, 2]"), (200, b""), (201, b"null"), (204, b"")],
)
async def test_success_without_a_result_is_ok_with_none(
    serve: Serve, transport: HttpTransport, status: int, body: bytes
) -> None:
    """A 2xx reply with no "result" (other JSON, or no body) is OK with result None."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body or None)

    base = await serve(handler)
    assert await transport.call(make_call(f"{base}/p")) == Reply(Outcome.OK)


async def test_keys_are_chosen_by_longest_prefix_at_a_path_boundary(serve: Serve) -> None:
    """The most specific key prefix signs; "/inv" does not match "/inventory"."""
    verifier = wire.Verifier(SECRETS)
    key_ids: dict[str, str] = {}

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        key_id = verifier.verify(request.method, request.rel_url.raw_path, request.headers, body)
        key_ids[request.path] = key_id
        return json_response(200, {"result": key_id})

    base = await serve(handler)
    transport = HttpTransport({base: KEY, f"{base}/inv/": OTHER_KEY})
    try:
        assert (await transport.call(make_call(f"{base}/inv"))).result == "k2"
        assert (await transport.call(make_call(f"{base}/inv/eu"))).result == "k2"
        assert (await transport.call(make_call(f"{base}/inventory"))).result == "k1"
        assert (await transport.call(make_call(base))).result == "k1"
        other_port = f"http://127.0.0.1:{free_port()}"
        unsigned = await transport.call(make_call(other_port))
        assert unsigned.outcome is Outcome.REJECTED
        assert "no signing key" in unsigned.error
    finally:
        await transport.close()
    assert key_ids == {"/inv/try": "k2", "/inv/eu/try": "k2", "/inventory/try": "k1", "/try": "k1"}


async def test_the_signed_path_is_the_percent_encoded_request_path(
    serve: Serve, transport: HttpTransport
) -> None:
    """A participant path with non-ASCII characters is signed as sent on the request
    line (percent-encoded), which is what a participant sees as its raw path."""
    verifier = wire.Verifier(SECRETS)
    paths: list[tuple[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        raw = request.rel_url.raw_path
        paths.append((raw, request.path))
        verifier.verify(request.method, raw, request.headers, body)
        return json_response(200, {"result": raw})

    base = await serve(handler)
    reply = await transport.call(make_call(f"{base}/café stock"))
    assert reply == Reply(Outcome.OK, "/caf%C3%A9%20stock/try")
    assert paths == [("/caf%C3%A9%20stock/try", "/café stock/try")]


# ---------------------------------------------------------------- status codes


async def test_409_is_refused_with_the_error_text(serve: Serve, transport: HttpTransport) -> None:
    """409 is a business refusal carrying the body's "error"."""

    async def handler(request: web.Request) -> web.Response:
        return json_response(409, {"error": "insufficient funds: 30 < 42"})

    base = await serve(handler)
    reply = await transport.call(make_call(f"{base}/payment"))
    assert reply == Reply(Outcome.REFUSED, error="insufficient funds: 30 < 42")


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_other_4xx_is_rejected_with_status_and_error(
    serve: Serve, transport: HttpTransport, status: int
) -> None:
    """400/401/404/422 mean the request itself is wrong: REJECTED, naming status and error."""

    async def handler(request: web.Request) -> web.Response:
        return json_response(status, {"error": "payload.qty: must be positive"})

    base = await serve(handler)
    reply = await transport.call(make_call(f"{base}/p"))
    assert reply.outcome is Outcome.REJECTED
    assert reply.error == f"HTTP {status}: payload.qty: must be positive"


async def test_error_text_falls_back_to_body_text_then_reason(
    serve: Serve, transport: HttpTransport
) -> None:
    """A non-JSON error body, or JSON with a blank "error", is quoted (clipped); an empty
    body gives the reason phrase. A refusal never comes back without a reason."""

    async def handler(request: web.Request) -> web.Response:
        if request.path.startswith("/text"):
            return web.Response(status=400, text="bad  thing " + "x" * 5000)
        if request.path.startswith("/blank"):
            return json_response(409, {"error": "  ", "detail": "out of stock"})
        return web.Response(status=404)

    base = await serve(handler)
    text = await transport.call(make_call(f"{base}/text"))
    assert text.error.startswith("HTTP 400: bad  thing xxx")
    assert len(text.error) < 400
    assert (await transport.call(make_call(f"{base}/none"))).error == "HTTP 404: Not Found"
    blank = await transport.call(make_call(f"{base}/blank"))
    assert blank == Reply(Outcome.REFUSED, error='{"error":"  ","detail":"out of stock"}')


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_transient(serve: Serve, transport: HttpTransport, status: int) -> None:
    """5xx is TRANSIENT (retried), with no Retry-After unless the server sent one."""

    async def handler(request: web.Request) -> web.Response:
        return json_response(status, {"error": "database unavailable"})

    base = await serve(handler)
    reply = await transport.call(make_call(f"{base}/p"))
    assert reply == Reply(
        Outcome.TRANSIENT, error=f"HTTP {status}: database unavailable", retry_after_s=None
    )


def http_date(offset_s: float) -> str:
    return email.utils.formatdate(time.time() + offset_s, usegmt=True)


@pytest.mark.parametrize(
    ("retry_after", "expected_s"),
    [
        ("2", 2.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("999999", MAX_RETRY_AFTER_S),
        ("inf", MAX_RETRY_AFTER_S),
        ("nan", None),
        ("soon", None),
        (http_date(-60), 0.0),
        (http_date(3 * 86400), MAX_RETRY_AFTER_S),
    ],
)
async def test_429_honours_retry_after(
    serve: Serve, transport: HttpTransport, retry_after: str, expected_s: float | None
) -> None:
    """429 is TRANSIENT; Retry-After (seconds or HTTP-date) is clamped to [0, 3600]."""

    async def handler(request: web.Request) -> web.Response:
        return json_response(429, {"error": "slow down"}, **{"Retry-After": retry_after})

    base = await serve(handler)
    reply = await transport.call(make_call(f"{base}/p"))
    assert reply.outcome is Outcome.TRANSIENT
    assert reply.error == "HTTP 429: slow down"
    assert reply.retry_after_s == expected_s


async def test_retry_after_http_date_in_the_near_future(
    serve: Serve, transport: HttpTransport
) -> None:
    """An HTTP-date Retry-After becomes the seconds until then."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503, headers={"Retry-After": http_date(30)})

    base = await serve(handler)
    reply = await transport.call(make_call(f"{base}/p"))
    assert reply.retry_after_s is not None
    assert 25 <= reply.retry_after_s <= 31


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirect_is_rejected_and_never_followed(
    serve: Serve, transport: HttpTransport, status: int
) -> None:
    """A 3xx is REJECTED naming the Location, and the redirect target is never called."""
    target_calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal target_calls
        if request.path.startswith("/elsewhere"):
            target_calls += 1
            return json_response(200, {"result": "followed"})
        return web.Response(status=status, headers={"Location": "/elsewhere/try"})

    base = await serve(handler)
    reply = await transport.call(make_call(f"{base}/p"))
    assert reply.outcome is Outcome.REJECTED
    assert reply.error == f"HTTP {status}: redirects are not followed (Location: '/elsewhere/try')"
    assert target_calls == 0


async def test_oversized_reply_body_is_rejected(serve: Serve, transport: HttpTransport) -> None:
    """A reply body over wire.MAX_BODY_BYTES is not read: REJECTED, framed or chunked."""
    big = b'{"result": "' + b"x" * wire.MAX_BODY_BYTES + b'"}'

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/small"):
            return json_response(200, {"result": "small"})
        if request.path.startswith("/chunked"):
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(0, len(big), 64 * 1024):
                await response.write(big[i : i + 64 * 1024])
            await response.write_eof()
            return response
        return web.Response(body=big)

    base = await serve(handler)
    for path in ("/framed", "/chunked"):
        reply = await transport.call(make_call(base + path))
        assert reply.outcome is Outcome.REJECTED, path
        assert f"over {wire.MAX_BODY_BYTES} bytes" in reply.error
    assert await transport.call(make_call(f"{base}/small")) == Reply(Outcome.OK, "small")


# ---------------------------------------------------------------- nothing behind the call's back


async def test_proxy_settings_in_the_environment_are_ignored(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP(S)_PROXY and ALL_PROXY in the environment do not reroute calls: the
    participant is called directly and the proxy sees nothing."""
    proxied = 0

    async def proxy(request: web.Request) -> web.Response:
        nonlocal proxied
        proxied += 1
        return json_response(200, {"result": "via proxy"})

    async def participant(request: web.Request) -> web.Response:
        return json_response(200, {"result": "direct"})

    proxy_url = await serve(proxy)
    base = await serve(participant)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy_url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    transport = HttpTransport({}, default_key=KEY)
    try:
        assert await transport.call(make_call(f"{base}/p")) == Reply(Outcome.OK, "direct")
    finally:
        await transport.close()
    assert proxied == 0


async def test_cookies_are_not_carried_between_calls(
    serve: Serve, transport: HttpTransport
) -> None:
    """A participant's Set-Cookie is not sent back on later calls, to it or to others."""
    cookies: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        cookies.append(request.headers.get("Cookie"))
        response = json_response(200, {"result": "ok"})
        response.set_cookie("session", "s3cr3t", path="/")
        return response

    base = await serve(handler)
    for op in (Op.TRY, Op.CONFIRM, Op.TRY):
        assert (await transport.call(make_call(f"{base}/p", op))).outcome is Outcome.OK
    assert cookies == [None, None, None]


async def test_compression_is_neither_offered_nor_undone(
    serve: Serve, transport: HttpTransport
) -> None:
    """No Accept-Encoding is sent, and a reply compressed anyway is read as it came
    (bounded by its size on the wire, never inflated): a 2xx that is not JSON."""
    encodings: list[str | None] = []
    inflated = msgspec.json.encode({"result": "x" * (2 * wire.MAX_BODY_BYTES)})
    compressed = gzip.compress(inflated)

    async def handler(request: web.Request) -> web.Response:
        encodings.append(request.headers.get("Accept-Encoding"))
        return web.Response(
            body=compressed,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    base = await serve(handler)
    reply = await transport.call(make_call(f"{base}/p"))
    assert reply == Reply(
        Outcome.TRANSIENT, error=f"unreadable JSON in a 2xx reply ({len(compressed)} bytes)"
    )
    assert encodings == [None]


# ---------------------------------------------------------------- refused before sending


@pytest.mark.parametrize(
    "participant",
    [
        "ftp://127.0.0.1/inventory",
        "file:///etc/passwd",
        "unix:/var/run/inventory.sock",
        "inventory",
        "127.0.0.1:8080",
        "http:///no-host",
        "http://127.0.0.1:1/p?debug=1",
        "http://127.0.0.1:1/p#frag",
    ],
)
async def test_unusable_participant_urls_are_rejected_unsent(
    transport: HttpTransport, participant: str
) -> None:
    """Non-http(s) schemes, no host, a query or a fragment: REJECTED without a request."""
    reply = await transport.call(make_call(participant))
    assert reply.outcome is Outcome.REJECTED
    assert participant[:20] in reply.error
    assert transport._client is None  # nothing was sent: no client was even made


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, float("nan"), float("inf")])
async def test_a_call_without_a_usable_timeout_is_rejected_unsent(
    transport: HttpTransport, timeout_s: float
) -> None:
    """A hand-built Call whose timeout is not a finite number above 0 (specs never
    give one) is REJECTED naming call.timeout_s, and nothing is sent."""
    reply = await transport.call(make_call("http://127.0.0.1:1/p", timeout_s=timeout_s))
    assert reply.outcome is Outcome.REJECTED
    assert "call.timeout_s must be a finite number above 0" in reply.error
    assert transport._client is None


def test_bad_constructor_arguments_name_the_problem() -> None:
    """Keys that are not (non-empty str, non-empty bytes), non-http prefixes and a zero
    pool are refused at construction."""
    with pytest.raises(ValueError, match="max_connections"):
        HttpTransport({}, max_connections=0)
    with pytest.raises(ValueError, match="default_key"):
        HttpTransport({}, default_key=("k", "text-secret"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"keys\['http://a'\]"):
        HttpTransport({"http://a": ("", b"s")})
    with pytest.raises(ValueError, match="http"):
        HttpTransport({"ftp://a": KEY})
    with pytest.raises(ValueError, match="query"):
        HttpTransport({"http://a/p?x=1": KEY})


# ---------------------------------------------------------------- timeouts


async def test_timeout_before_the_participant_applies_is_transient(
    serve: Serve, transport: HttpTransport
) -> None:
    """A participant slower than the call timeout: TRANSIENT, within about the timeout."""
    applied = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal applied
        await asyncio.sleep(2)
        applied += 1
        return json_response(200, {"result": applied})

    base = await serve(handler)
    started = time.monotonic()
    reply = await transport.call(make_call(f"{base}/p", timeout_s=0.3))
    elapsed_s = time.monotonic() - started
    assert reply == Reply(Outcome.TRANSIENT, error="timed out after 0.3s")
    assert 0.25 <= elapsed_s < 1.5
    assert applied == 0


async def test_timeout_after_the_participant_applied_is_transient_and_retry_is_idempotent(
    serve: Serve, transport: HttpTransport
) -> None:
    """Applied, then too slow to answer: TRANSIENT; the retry gets the one effect's result."""
    applied: dict[str, int] = {}
    stalls = [1.0]

    async def handler(request: web.Request) -> web.Response:
        call = wire.decode_request(await request.read())
        if call.txid not in applied:
            applied[call.txid] = len(applied) + 1  # the effect, once per txid
        if stalls:
            await asyncio.sleep(stalls.pop())
        return json_response(200, {"result": applied[call.txid]})

    base = await serve(handler)
    first = await transport.call(make_call(f"{base}/p", timeout_s=0.3))
    assert first == Reply(Outcome.TRANSIENT, error="timed out after 0.3s")
    assert applied == {"tx-1": 1}
    retry = await transport.call(make_call(f"{base}/p", attempt=2))
    assert retry == Reply(Outcome.OK, 1)
    assert applied == {"tx-1": 1}


async def test_timeout_covers_a_slow_body(serve: Serve, transport: HttpTransport) -> None:
    """Headers on time, then a body trickling a byte every 0.1 s: the timeout bounds the
    whole call (not each read), so TRANSIENT after about the timeout, not a hang."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        for _ in range(30):
            await response.write(b" ")
            await asyncio.sleep(0.1)
        return response

    base = await serve(handler)
    started = time.monotonic()
    reply = await transport.call(make_call(f"{base}/p", timeout_s=0.4))
    assert reply == Reply(Outcome.TRANSIENT, error="timed out after 0.4s")
    assert time.monotonic() - started < 2


# ---------------------------------------------------------------- broken connections


async def test_connection_refused_is_transient(transport: HttpTransport) -> None:
    """Nothing listening on the port: TRANSIENT, saying so."""
    port = free_port()
    reply = await transport.call(make_call(f"http://127.0.0.1:{port}/p"))
    assert reply.outcome is Outcome.TRANSIENT
    assert reply.error == f"cannot connect to 127.0.0.1:{port}: connection refused"


async def test_unresolvable_host_is_transient(transport: HttpTransport) -> None:
    """A host name that does not resolve: TRANSIENT (DNS may recover)."""
    reply = await transport.call(make_call("http://no-such-host.invalid/p", timeout_s=5))
    assert reply.outcome is Outcome.TRANSIENT
    assert "no-such-host.invalid" in reply.error


async def _partial_headers_then_fin(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: appl")
    await writer.drain()


async def _partial_headers_then_rst(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Len")
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)


async def _short_body_then_fin(writer: asyncio.StreamWriter) -> None:
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{"result": {"reser')
    await writer.drain()


async def _short_body_then_rst(writer: asyncio.StreamWriter) -> None:
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n{"result": {"reser')
    await writer.drain()
    await asyncio.sleep(0.05)
    reset(writer)


async def _nothing_then_fin(writer: asyncio.StreamWriter) -> None:
    return None


async def _nothing_then_rst(writer: asyncio.StreamWriter) -> None:
    reset(writer)


async def _not_http(writer: asyncio.StreamWriter) -> None:
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await writer.drain()


@pytest.mark.parametrize(
    "misbehave",
    [
        _partial_headers_then_fin,
        _partial_headers_then_rst,
        _short_body_then_fin,
        _short_body_then_rst,
        _nothing_then_fin,
        _nothing_then_rst,
        _not_http,
    ],
)
async def test_connection_dropped_mid_reply_is_transient(
    transport: HttpTransport, misbehave: Callable[[asyncio.StreamWriter], Awaitable[None]]
) -> None:
    """Reset or closed mid-headers or mid-body, or not HTTP at all: TRANSIENT, quickly."""
    server = RawServer(misbehave)
    async with server as base:
        started = time.monotonic()
        reply = await transport.call(make_call(f"{base}/p"))
    assert reply.outcome is Outcome.TRANSIENT, reply
    assert reply.error
    assert time.monotonic() - started < SLOW_OK_S / 2  # an error, not a timeout
    assert server.requests == 1


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 18\r\n\r\n",  # complete per HTTP, truncated as JSON
        b"Connection: close\r\n\r\n",  # no length: the body ends at EOF
    ],
)
async def test_truncated_json_with_200_is_transient(
    transport: HttpTransport, framing: bytes
) -> None:
    """A 200 whose JSON body is cut short: TRANSIENT, so that the call is retried."""

    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing)
        writer.write(b'{"result": {"reser')
        await writer.drain()

    async with RawServer(reply) as base:
        result = await transport.call(make_call(f"{base}/p"))
    assert result == Reply(Outcome.TRANSIENT, error="unreadable JSON in a 2xx reply (18 bytes)")


def _paused_server_source() -> str:
    return """
import sys
from aiohttp import web

count = 0

async def handle(request):
    global count
    await request.read()
    count += 1
    return web.json_response({"result": count})

app = web.Application()
app.router.add_post("/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


@pytest.fixture
def subprocess_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """An aiohttp.web participant in its own process, so that it can be SIGSTOPped."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _paused_server_source(), str(port)])
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "the participant process exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the participant never listened"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


async def test_participant_paused_with_sigstop_is_transient_then_recovers(
    subprocess_server: tuple[str, subprocess.Popen[bytes]], transport: HttpTransport
) -> None:
    """A SIGSTOPped participant times out (TRANSIENT) within about the timeout; after
    SIGCONT the next call succeeds."""
    base, proc = subprocess_server
    assert await transport.call(make_call(f"{base}/p")) == Reply(Outcome.OK, 1)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        reply = await transport.call(make_call(f"{base}/p", timeout_s=0.5))
        elapsed_s = time.monotonic() - started
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert reply == Reply(Outcome.TRANSIENT, error="timed out after 0.5s")
    assert 0.45 <= elapsed_s < 2.5
    after = await transport.call(make_call(f"{base}/p"))
    assert after.outcome is Outcome.OK
    # The paused call was still queued in the socket: the process served it on SIGCONT.
    assert after.result in (2, 3)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_reuse_from_a_new_event_loop_without_close_still_works(
    subprocess_server: tuple[str, subprocess.Popen[bytes]],
) -> None:
    """A transport whose session belongs to a finished loop opens a new one rather
    than failing every later call."""
    base, _ = subprocess_server
    transport = HttpTransport({}, default_key=KEY)
    first = asyncio.run(transport.call(make_call(f"{base}/p")))
    second = asyncio.run(transport.call(make_call(f"{base}/p")))

    async def third_and_close() -> Reply:
        try:
            return await transport.call(make_call(f"{base}/p"))
        finally:
            await transport.close()

    third = asyncio.run(third_and_close())
    assert [first, second, third] == [Reply(Outcome.OK, n) for n in (1, 2, 3)]
    gc.collect()  # the abandoned sessions' warnings belong to this test, not the next


# ---------------------------------------------------------------- concurrency


async def test_200_concurrent_calls_share_a_bounded_pool(serve: Serve) -> None:
    """200 calls at once all succeed, each signed with a fresh nonce, and never more
    than max_connections are open at a time."""
    verifier = wire.Verifier(SECRETS)
    active = peak = 0
    served: Counter[str] = Counter()

    async def handler(request: web.Request) -> web.Response:
        nonlocal active, peak
        body = await request.read()
        verifier.verify(request.method, request.rel_url.raw_path, request.headers, body)
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        txid = wire.decode_request(body).txid
        served[txid] += 1
        return json_response(200, {"result": txid})

    base = await serve(handler)
    transport = HttpTransport({base: KEY}, max_connections=50)
    try:
        calls = [make_call(f"{base}/p", txid=f"tx-{i}") for i in range(200)]
        replies = await asyncio.gather(*(transport.call(c) for c in calls))
    finally:
        await transport.close()
    assert replies == [Reply(Outcome.OK, f"tx-{i}") for i in range(200)]
    assert served == Counter({f"tx-{i}": 1 for i in range(200)})
    assert 1 < peak <= 50


async def test_close_then_call_opens_a_new_client(serve: Serve, transport: HttpTransport) -> None:
    """close() releases the pool; a later call in a running loop opens a fresh one."""

    async def handler(request: web.Request) -> web.Response:
        return json_response(200, {"result": "ok"})

    base = await serve(handler)
    assert (await transport.call(make_call(base))).outcome is Outcome.OK
    first = transport._client
    await transport.close()
    assert first is not None
    with pytest.raises(ClientClosedError):  # closed: it sends nothing more
        await first.post(f"{base}/p").build().send()
    assert (await transport.call(make_call(base))).outcome is Outcome.OK
    assert transport._client is not None and transport._client is not first


# ---------------------------------------------------------------- never raises

_STATUSES = [200, 201, 202, 204, 301, 302, 307, 400, 401, 403, 404, 408, 409, 418, 422, 425, 429]
_STATUSES += [500, 501, 502, 503, 504, 599]
_BODIES = st.one_of(
    st.just(b""),
    st.builds(lambda r: msgspec.json.encode({"result": r}), st.integers() | st.text(max_size=20)),
    st.builds(lambda e: msgspec.json.encode({"error": e}), st.text(max_size=40)),
    st.binary(max_size=64),
    st.sampled_from([b'{"result": {"a"', b"[1, 2]", b"null", b'"text"', b"\xff\xfe"]),
)
_RETRY_AFTER = st.none() | st.sampled_from(["2", "-1", "1e9", "nan", "soon", http_date(5)])


def expected_outcome(status: int, body: bytes) -> Outcome:
    """The reply table of docs/protocol.md, written independently of the transport."""
    if 200 <= status < 300:
        if status == 204 or not body:
            return Outcome.OK
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError:
            return Outcome.TRANSIENT
        return Outcome.OK
    if status == 409:
        return Outcome.REFUSED
    if status in (408, 425, 429) or status >= 500:
        return Outcome.TRANSIENT
    return Outcome.REJECTED


async def _one_reply(response: bytes, reset_after: bool) -> Reply:
    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(response)
        await writer.drain()
        if reset_after:
            reset(writer)

    transport = HttpTransport({}, default_key=KEY)
    try:
        async with RawServer(reply) as base:
            return await transport.call(make_call(f"{base}/p", timeout_s=5))
    finally:
        await transport.close()


@given(
    status=st.sampled_from(_STATUSES),
    body=_BODIES,
    retry_after=_RETRY_AFTER,
    chunked=st.booleans(),
)
def test_well_formed_replies_map_to_the_protocol_table(
    status: int, body: bytes, retry_after: str | None, chunked: bool
) -> None:
    """Any well-formed reply maps to the outcome the protocol table gives, with a
    Retry-After (if any) inside [0, 3600]."""
    body = b"" if status == 204 else body
    head = f"HTTP/1.1 {status} Whatever\r\nConnection: close\r\n".encode()
    if retry_after is not None:
        head += f"Retry-After: {retry_after}\r\n".encode()
    if chunked and body:
        framed = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        head += b"Transfer-Encoding: chunked\r\n\r\n" + framed
    else:
        head += f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    reply = asyncio.run(_one_reply(head, reset_after=False))
    assert isinstance(reply, Reply)
    assert reply.outcome is expected_outcome(status, body), reply
    if reply.retry_after_s is not None:
        assert 0 <= reply.retry_after_s <= MAX_RETRY_AFTER_S
    if reply.outcome is not Outcome.OK:
        assert reply.error


@given(response=st.binary(max_size=300), reset_after=st.booleans())
def test_transport_never_raises_whatever_the_server_sends(
    response: bytes, reset_after: bool
) -> None:
    """Arbitrary bytes, then a close or a reset: always a Reply, never an exception."""
    reply = asyncio.run(_one_reply(response, reset_after))
    assert isinstance(reply, Reply)
    assert reply.outcome in Outcome
    if reply.outcome is not Outcome.OK:
        assert reply.error


async def test_transport_never_raises_across_every_failure(serve: Serve) -> None:
    """Every failure above, through one transport, concurrently: each call returns a
    Reply of the expected outcome and the transport is still usable afterwards."""

    async def handler(request: web.Request) -> web.Response:
        kind = request.path.split("/")[1]
        if kind == "slow":
            await asyncio.sleep(2)
        if kind.isdigit():
            return json_response(int(kind), {"error": kind, "result": kind})
        return json_response(200, {"result": kind})

    base = await serve(handler)

    async def dropped(writer: asyncio.StreamWriter) -> None:
        reset(writer)

    transport = HttpTransport({}, default_key=KEY)
    try:
        async with RawServer(dropped) as raw:
            cases = {
                f"{base}/ok": Outcome.OK,
                f"{base}/200": Outcome.OK,
                f"{base}/409": Outcome.REFUSED,
                f"{base}/404": Outcome.REJECTED,
                f"{base}/302": Outcome.REJECTED,
                f"{base}/503": Outcome.TRANSIENT,
                f"{base}/429": Outcome.TRANSIENT,
                f"{base}/slow": Outcome.TRANSIENT,
                f"http://127.0.0.1:{free_port()}/p": Outcome.TRANSIENT,
                f"{raw}/p": Outcome.TRANSIENT,
                "gopher://127.0.0.1/p": Outcome.REJECTED,
                "http://[::1/p": Outcome.REJECTED,
            }
            calls = [make_call(url, timeout_s=0.5) for url in cases]
            replies = await asyncio.gather(*(transport.call(c) for c in calls))
        outcomes = {url: reply.outcome for url, reply in zip(cases, replies, strict=True)}
        assert outcomes == cases
        assert await transport.call(make_call(f"{base}/ok")) == Reply(Outcome.OK, "ok")
    finally:
        await transport.close()


# ---------------------------------------------------------------- end to end


class Ledger:
    """A TCC participant over HTTP: holds on try, spends on confirm, releases on cancel.

    Idempotent through an in-memory barrier keyed by (txid, branch): a repeated
    operation answers as the first one did; a cancel before its try records a
    null cancel, and that try is then refused (no suspended hold). Requests must
    be signed; faults can be injected per operation and attempt."""

    def __init__(self, available: int, faults: dict[tuple[str, int], str] | None = None) -> None:
        self.initial = available
        self.available = available
        self.held = 0
        self.spent = 0
        self.barrier: dict[tuple[str, str], str] = {}
        self.amounts: dict[tuple[str, str], int] = {}
        self.delivered: Counter[str] = Counter()
        self.applied: Counter[str] = Counter()
        self.faults = faults or {}
        self.verifier = wire.Verifier(SECRETS)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            self.verifier.verify(request.method, request.rel_url.raw_path, request.headers, body)
        except wire.SignatureError as exc:
            return json_response(401, {"error": str(exc)})
        try:
            call = wire.decode_request(body)
        except ValueError as exc:
            return json_response(400, {"error": str(exc)})
        self.delivered[call.op] += 1
        fault = self.faults.get((call.op, call.attempt))
        if fault == "503":
            return json_response(503, {"error": "injected"}, **{"Retry-After": "0"})
        response = self._apply(call)
        if fault == "stall":  # applied, but the answer comes after the branch timeout
            await asyncio.sleep(BRANCH_TIMEOUT_S + 1)
        return response

    def _apply(self, call: wire.WireRequest) -> web.Response:
        key = (call.txid, call.branch)
        state = self.barrier.get(key)
        amount = int(call.payload["amount"])
        if call.op == "try":
            if state == "cancelled":
                return json_response(409, {"error": "cancelled before try"})
            if state is not None:
                return json_response(200, {"result": {"held": self.amounts[key]}})
            if amount > self.available:
                return json_response(409, {"error": f"insufficient: {self.available} < {amount}"})
            self.available -= amount
            self.held += amount
            self.amounts[key] = amount
            self.barrier[key] = "tried"
        elif call.op == "confirm":
            if state == "confirmed":
                return json_response(200, {"result": None})
            if state != "tried":
                return json_response(409, {"error": f"cannot confirm from {state}"})
            self.held -= self.amounts[key]
            self.spent += self.amounts[key]
            self.barrier[key] = "confirmed"
        elif call.op == "cancel":
            if state == "cancelled":
                return json_response(200, {"result": None})
            if state == "confirmed":
                return json_response(409, {"error": "already confirmed"})
            if state == "tried":
                self.held -= self.amounts[key]
                self.available += self.amounts[key]
            self.barrier[key] = "cancelled"
        else:
            return json_response(422, {"error": f"a TCC ledger has no {call.op}"})
        self.applied[call.op] += 1
        return json_response(200, {"result": {"held": amount} if call.op == "try" else None})

    def check(self) -> None:
        assert self.available + self.held + self.spent == self.initial
        assert self.held == 0, "a hold was left behind"
        assert self.available >= 0


FAST = RetryPolicy(initial_interval_s=0.01, maximum_interval_s=0.05, maximum_attempts=8)
# Long enough that only the injected stall times out, even on a loaded machine.
BRANCH_TIMEOUT_S = 2.0


def order(txid: str, ledgers: dict[str, str], amounts: dict[str, int]) -> TransactionSpec:
    return TransactionSpec(
        protocol=Protocol.TCC,
        branches=tuple(
            BranchSpec(name, url, {"amount": amounts[name]}, FAST, timeout_s=BRANCH_TIMEOUT_S)
            for name, url in ledgers.items()
        ),
        id=txid,
        timeout_s=20,
    )


async def test_coordinator_commits_and_aborts_over_http(serve: Serve) -> None:
    """A Coordinator with HttpTransport drives 40 TCC transactions across three HTTP
    participants, through 503s and a late answer after apply: those that fit commit,
    the rest abort, no hold is left, money is conserved, nothing is applied twice."""
    ledgers = {
        "inventory": Ledger(1000, {("try", 1): "503"}),
        "payment": Ledger(500, {("confirm", 1): "stall"}),
        "shipping": Ledger(1000, {("cancel", 1): "503"}),
    }
    urls: dict[str, str] = {}
    for name, ledger in ledgers.items():
        base = await serve(ledger.handle)
        urls[name] = f"{base}/{name}"
    transport = HttpTransport({base: KEY for base in {u.rsplit("/", 1)[0] for u in urls.values()}})
    amounts = {"inventory": 10, "payment": 50, "shipping": 1}
    async with Coordinator(MemoryStore(), transport) as coordinator:
        results = await asyncio.gather(
            *(coordinator.run(order(f"order-{i}", urls, amounts)) for i in range(40))
        )
    statuses = Counter(r.status for r in results)
    committed = statuses[TxnStatus.COMMITTED]
    # Payment holds 500 and each order takes 50: at most 10 commit, and the
    # others abort (refused), never end half-done.
    assert statuses[TxnStatus.ABORTED] == 40 - committed
    assert 1 <= committed <= 10
    for name, ledger in ledgers.items():
        ledger.check()
        assert ledger.spent == committed * amounts[name], name
        assert ledger.applied["confirm"] == committed, name
        assert sum(1 for s in ledger.barrier.values() if s == "confirmed") == committed
    for r in results:
        if r.status is TxnStatus.ABORTED:
            assert "refused" in r.reason, r.reason
    # The faults were delivered and retried, yet each operation took effect at most
    # once per transaction: every first try of inventory got a 503 (a committed
    # order's was tried again), every first confirm of payment answered too late.
    assert ledgers["inventory"].delivered["try"] >= 40 + committed
    assert ledgers["inventory"].applied["try"] <= 40
    assert ledgers["payment"].delivered["confirm"] >= 2 * committed
    assert ledgers["shipping"].delivered["cancel"] >= 2 * ledgers["shipping"].applied["cancel"]


async def test_coordinator_over_http_rejects_a_participant_without_a_key(serve: Serve) -> None:
    """A participant no key signs for: its try is REJECTED unsent, the transaction does
    not commit, and the branch that did prepare is cancelled."""
    ledger = Ledger(100)
    base = await serve(ledger.handle)
    transport = HttpTransport({base: KEY})
    spec = order(
        "order-unsigned",
        {"payment": f"{base}/payment", "elsewhere": f"http://127.0.0.1:{free_port()}/x"},
        {"payment": 30, "elsewhere": 1},
    )
    async with Coordinator(MemoryStore(), transport) as coordinator:
        result = await coordinator.run(spec)
    # The machine also sends a cancel to the branch whose try was rejected; that
    # cancel is rejected too (still no key), which parks the transaction for an
    # operator rather than aborting it cleanly.
    assert result.status in {TxnStatus.ABORTED, TxnStatus.NEEDS_ATTENTION}
    assert "no signing key for participant" in result.reason
    ledger.check()
    assert ledger.available == 100
    assert ledger.barrier == {("order-unsigned", "payment"): "cancelled"}
