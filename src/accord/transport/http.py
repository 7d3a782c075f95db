"""Participants over HTTP: one signed ``POST {participant}/{op}`` per call.

The wire format (body, signature headers, reply codes) is :mod:`accord.wire`;
this module only moves it over aiohttp and turns every answer, and every way
of not getting one, into a :class:`~accord.transport.base.Reply`:

=========================================  ===========================================
2xx                                        ``OK``, ``result`` = the body's ``"result"``
2xx whose body is not JSON (truncated)     ``TRANSIENT``: retried, and the retry is
                                           answered by the participant's barrier
409                                        ``REFUSED`` with the body's ``"error"``
429, 5xx                                   ``TRANSIENT``, ``Retry-After`` honoured
3xx                                        ``REJECTED``: redirects are never followed
any other status                           ``REJECTED``
timeout, refused, reset, DNS, bad HTTP     ``TRANSIENT``
a reply body over ``wire.MAX_BODY_BYTES``  ``REJECTED`` (not read)
not http(s), no signing key, query string  ``REJECTED`` (nothing is sent)
=========================================  ===========================================

aiohttp's exceptions are translated here and nowhere else; :meth:`call`
never raises for what a participant or the network did.

Why aiohttp, not httpx: measured with ``bench/http_client.py`` on this
2-core machine (an aiohttp.web server in a subprocess on 127.0.0.1, small
JSON POSTs, one pooled keep-alive session per client, 100 in flight, 3 s per
run, median of 3 interleaved runs; other jobs were sharing the machine)::

    .venv/bin/python bench/http_client.py

    client      req/s   p50 ms   p99 ms cpu us/req
    aiohttp      3833    26.75    51.05        237
    httpx         163   438.59  2067.69       5808
    accord       2666    36.54    63.51        298

(``accord`` is this transport: aiohttp plus signing, trace context and
reply mapping. Across runs it measured 2,000-4,400 req/s, within the noise
of raw aiohttp at 1,700-5,200, and 240-330 us of client CPU per call
against aiohttp's 200-270.) httpx is slower by more than an order of
magnitude at this concurrency (its connection pool is the known bottleneck,
encode/httpx#3215) and still ~5x slower with 1 or 10 in flight (aiohttp
2,575 vs httpx 471 req/s one at a time; 2,485 vs 356 at 10). So aiohttp.
At ~250 us of CPU per call, aiohttp itself caps one core near 4,000 calls/s
on this machine: the HTTP client, not the coordinator, is the limit there.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import msgspec
from yarl import URL

from accord import wire
from accord.core.machine import Outcome
from accord.transport.base import Call, Reply, Transport

log = logging.getLogger("accord.transport.http")

DEFAULT_MAX_CONNECTIONS = 200
MAX_RETRY_AFTER_S = 3600.0
# Error texts end up in log records and operator views: keep them short.
MAX_ERROR_CHARS = 300
# Prepared targets are cached per (participant, op), and timeouts per value; a
# deployment has a few dozen of each. The bound only stops a stream of distinct
# URLs or timeouts from growing memory.
MAX_CACHED_TARGETS = 4096

Key = tuple[str, bytes]
# (url to POST to, its path as signed, key id, secret)
_Target = tuple[URL, str, str, bytes]
# The trace context to send with a call (e.g. its span's), or None for a fresh one.
TraceparentFor = Callable[[Call], "str | None"]

_decode = msgspec.json.decode
_trace_random = random.Random()


def traceparent() -> str:
    """A fresh W3C ``traceparent`` (version 00, sampled); never all-zero ids."""
    bits = _trace_random.getrandbits(192)
    trace_id, parent_id = bits >> 64, bits & 0xFFFF_FFFF_FFFF_FFFF
    if not trace_id or not parent_id:  # W3C: all-zero ids are invalid
        return traceparent()
    return f"00-{trace_id:032x}-{parent_id:016x}-01"


class HttpTransport(Transport):
    """Calls participants over HTTP with signed requests.

    ``keys`` maps a participant base URL (``scheme://host:port``) or URL
    prefix (``http://host:port/inventory``) to the ``(key_id, secret)`` that
    signs requests to it; the longest matching prefix wins, and a prefix
    matches only at a path boundary. ``default_key`` signs for participants
    no prefix matches; without one such a call is ``REJECTED`` unsent.

    ``traceparent(call)``, if given, returns the W3C ``traceparent`` to send
    with ``call`` (the tracing observer's span of that call, see
    :class:`accord.observability.TracingObserver`); when it is not given or
    returns ``None`` (or fails), a fresh random one is sent.

    One aiohttp session (created lazily in the running loop) pools up to
    ``max_connections`` keep-alive connections; :meth:`close` closes it.
    """

    def __init__(
        self,
        keys: Mapping[str, Key],
        *,
        default_key: Key | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        traceparent: TraceparentFor | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self._keys: list[tuple[tuple[str, str, int], str, Key]] = []
        for prefix, key in keys.items():
            _check_key(f"keys[{prefix!r}]", key)
            url = URL(prefix)
            if url.scheme not in ("http", "https") or not url.host:
                raise ValueError(
                    f"keys: {prefix!r} must be an http(s) URL or URL prefix with a host"
                )
            if url.query_string or url.fragment:
                raise ValueError(f"keys: {prefix!r} must not have a query or fragment")
            origin = (url.scheme, url.host.lower(), url.port or 0)
            self._keys.append((origin, url.path.rstrip("/"), key))
        # Longest path first, so that the most specific prefix wins.
        self._keys.sort(key=lambda entry: len(entry[1]), reverse=True)
        if default_key is not None:
            _check_key("default_key", default_key)
        self._default_key = default_key
        self._max_connections = max_connections
        self._targets: dict[tuple[str, str], _Target | Reply] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._traceparent_for = traceparent

    async def call(self, call: Call) -> Reply:
        target = self._targets.get((call.participant, call.op))
        if target is None:
            target = self._prepare(call.participant, call.op)
        if isinstance(target, Reply):
            return target
        url, path, key_id, secret = target
        try:
            body = wire.encode_request(
                wire.WireRequest(call.txid, call.branch, call.op, call.payload, call.attempt)
            )
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
            # Specs are validated as JSON-encodable, so only a Call built by hand gets here.
            return Reply(Outcome.REJECTED, error=_clip(f"payload cannot be encoded: {exc}"))
        headers = wire.sign(secret, key_id, "POST", path, body)
        headers["content-type"] = "application/json"
        trace_for = self._traceparent_for
        context = None if trace_for is None else _trace_context(trace_for, call)
        headers[wire.TRACEPARENT] = context or traceparent()
        timeout_s = call.timeout_s
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            if len(self._timeouts) >= MAX_CACHED_TARGETS:
                self._timeouts.clear()
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(total=timeout_s)
        session = self._session
        if session is None or session.closed or self._loop is not asyncio.get_running_loop():
            session = self._open()
        try:
            async with session.post(
                url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    return _success(await _read(resp))
                return _failure(status, resp, await _read(resp))
        except TimeoutError:
            return Reply(Outcome.TRANSIENT, error=f"timed out after {timeout_s:g}s")
        except _ReplyTooLarge as exc:
            return Reply(Outcome.REJECTED, error=str(exc))
        except aiohttp.ClientError as exc:
            return Reply(Outcome.TRANSIENT, error=_network_error(exc))
        except OSError as exc:
            return Reply(Outcome.TRANSIENT, error=_clip(f"network error: {exc}"))
        except Exception as exc:
            # Not a failure aiohttp documents: most likely a bug here or in
            # aiohttp. Retrying is safe (calls are idempotent), so treat it
            # like a network fault, but leave a trace for whoever debugs it.
            log.warning("unexpected error calling %s", url, exc_info=True)
            return Reply(Outcome.TRANSIENT, error=_clip(f"transport error: {exc!r}"))

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        if self._loop is asyncio.get_running_loop():
            await session.close()
        # else: its loop is gone; the session cannot be closed from here.

    # ------------------------------------------------------------ slow path

    def _open(self) -> aiohttp.ClientSession:
        """The pooled session, made inside the running loop (aiohttp binds it).

        A session left over from another loop (a transport reused across
        ``asyncio.run`` calls without :meth:`close`) would fail every call;
        it cannot be closed from this loop, so it is dropped (aiohttp warns
        about its unclosed sockets) and a new one is made."""
        stale = self._session
        if stale is not None and not stale.closed:
            log.warning("HTTP transport used from a new event loop without close()")
        self._loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=self._max_connections)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Participants' cookies must not leak from one call (or participant)
            # to the next, and a jar costs time on every call.
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        return self._session

    def _prepare(self, participant: str, op: str) -> _Target | Reply:
        """Validate ``participant``, pick its key and build the URL, once."""
        target = self._build(participant, op)
        if len(self._targets) >= MAX_CACHED_TARGETS:
            self._targets.clear()
        self._targets[(participant, op)] = target
        return target

    def _build(self, participant: str, op: str) -> _Target | Reply:
        shown = participant if len(participant) <= 200 else participant[:200] + "..."
        try:
            url = URL(f"{participant.rstrip('/')}/{op}")
        except (TypeError, ValueError) as exc:
            return Reply(Outcome.REJECTED, error=_clip(f"invalid participant URL {shown!r}: {exc}"))
        if url.scheme not in ("http", "https"):
            return Reply(
                Outcome.REJECTED,
                error=f"participant URL {shown!r} must use http or https",
            )
        if not url.host:
            return Reply(Outcome.REJECTED, error=f"participant URL {shown!r} has no host")
        if url.query_string or url.fragment or "?" in participant or "#" in participant:
            return Reply(
                Outcome.REJECTED,
                error=f"participant URL {shown!r} must not have a query or fragment",
            )
        key = self._key_for(url) or self._default_key
        if key is None:
            return Reply(Outcome.REJECTED, error=f"no signing key for participant {shown!r}")
        # Signed as it goes on the request line: the percent-encoded path.
        return url, url.raw_path, key[0], key[1]

    def _key_for(self, url: URL) -> Key | None:
        origin = (url.scheme, (url.host or "").lower(), url.port or 0)
        path = url.path
        for key_origin, prefix, key in self._keys:
            if key_origin == origin and (
                not prefix or path == prefix or path.startswith(prefix + "/")
            ):
                return key
        return None


class _ReplyTooLarge(Exception):
    pass


def _trace_context(trace_for: TraceparentFor, call: Call) -> str | None:
    try:
        return trace_for(call)
    except Exception:  # tracing never fails a call
        log.warning("traceparent provider failed", exc_info=True)
        return None


def _check_key(where: str, key: Any) -> None:
    if (
        not isinstance(key, tuple)
        or len(key) != 2
        or not isinstance(key[0], str)
        or not key[0]
        or not isinstance(key[1], bytes)
        or not key[1]
    ):
        raise ValueError(f"{where} must be (key_id: non-empty str, secret: non-empty bytes)")


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    """The reply body, refusing one over ``wire.MAX_BODY_BYTES``."""
    length = resp.content_length
    if length is not None:
        if length > wire.MAX_BODY_BYTES:
            raise _ReplyTooLarge(_too_large(resp.status, length))
        return await resp.read()
    chunks: list[bytes] = []
    size = 0
    while chunk := await resp.content.readany():
        size += len(chunk)
        if size > wire.MAX_BODY_BYTES:
            raise _ReplyTooLarge(_too_large(resp.status, size))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(status: int, size: int) -> str:
    return f"HTTP {status} reply body is over {wire.MAX_BODY_BYTES} bytes ({size})"


def _success(raw: bytes) -> Reply:
    if not raw:
        return Reply(Outcome.OK)
    try:
        body = _decode(raw)
    except msgspec.DecodeError:
        # The participant applied the operation, but we cannot read its
        # answer (a truncated or garbled body). TRANSIENT makes the
        # coordinator send it again; operations are idempotent, so the
        # participant's barrier answers the retry with the same result
        # without applying it twice.
        return Reply(Outcome.TRANSIENT, error=f"unreadable JSON in a 2xx reply ({len(raw)} bytes)")
    if type(body) is dict:
        return Reply(Outcome.OK, body.get("result"))
    return Reply(Outcome.OK)


_RETRYABLE_4XX = frozenset({408, 425, 429})


def _failure(status: int, resp: aiohttp.ClientResponse, raw: bytes) -> Reply:
    if status == 409:
        return Reply(Outcome.REFUSED, error=_error_text(raw, resp.reason))
    # 408 (the server gave up waiting for the request) and 425 (too early to
    # process it) say "send it again later", like 429 and 5xx.
    if status in _RETRYABLE_4XX or 500 <= status < 600:
        return Reply(
            Outcome.TRANSIENT,
            error=f"HTTP {status}: {_error_text(raw, resp.reason)}",
            retry_after_s=_retry_after_s(resp.headers.get("Retry-After")),
        )
    if 300 <= status < 400:
        location = _clip(resp.headers.get("Location", ""), 200)
        return Reply(
            Outcome.REJECTED,
            error=f"HTTP {status}: redirects are not followed (Location: {location!r})",
        )
    return Reply(Outcome.REJECTED, error=f"HTTP {status}: {_error_text(raw, resp.reason)}")


def _error_text(raw: bytes, reason: str | None) -> str:
    """The body's ``"error"``, else its text, else the reason phrase."""
    if raw:
        try:
            body = _decode(raw)
        except msgspec.DecodeError:
            body = None
        if type(body) is dict:
            error = body.get("error")
            if isinstance(error, str) and error.strip():
                return _clip(error)
        text = raw[: MAX_ERROR_CHARS * 4].decode("utf-8", "replace").strip()
        if text:
            return _clip(text)
    return reason or "no reason given"


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delay-seconds or an HTTP-date), clamped."""
    if not value:
        return None
    try:
        delay_s = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            return None
        delay_s = when.timestamp() - time.time()
    if math.isnan(delay_s):
        return None
    return min(max(delay_s, 0.0), MAX_RETRY_AFTER_S)


def _network_error(exc: aiohttp.ClientError) -> str:
    """A short, stable description of a failure to get a reply."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return _clip(f"cannot resolve host {exc.host!r}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        if isinstance(exc.os_error, ConnectionRefusedError):
            reason = "connection refused"
        return _clip(f"cannot connect to {exc.host}:{exc.port}: {reason}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected before replying"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "connection lost mid-reply: body incomplete"
    if isinstance(exc, aiohttp.ClientOSError):
        return _clip(f"connection error: {exc.strerror or exc}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return _clip(f"invalid HTTP reply: {exc.message}")
    return _clip(f"{type(exc).__name__}: {exc}")


def _clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
