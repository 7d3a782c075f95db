"""Participants over HTTP: one signed ``POST {participant}/{op}`` per call.

The wire format (body, signature headers, reply codes) is :mod:`accord.wire`;
this module only moves it over pyreqwest (Python bindings of Rust's reqwest)
and turns every answer, and every way of not getting one, into a
:class:`~accord.transport.base.Reply`:

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

The client acts on nothing behind the call's back: no redirect is followed,
no cookie kept, no proxy taken from the environment (reqwest's default),
no compression offered or undone. ``call.timeout_s`` bounds the whole call,
waiting for a pooled connection included. An error reply without a body
is described by its status's standard reason phrase (reqwest does not
expose the one the server sent). pyreqwest's exceptions are translated here
and nowhere else; :meth:`call` never raises for what a participant or the
network did.

Why pyreqwest, not aiohttp (or httpx): the HTTP client's CPU is the
coordinator's main cost over HTTP. Measured with ``bench/http_client.py``
on this 2-core machine (an aiohttp.web server in a subprocess on 127.0.0.1,
small JSON POSTs, one pooled keep-alive client each, 100 in flight, uvloop,
3 s per run, median of 5 interleaved runs; other jobs were sharing the
machine), with the aiohttp transport of the previous commit beside this one::

    git show 4ee5fc9:src/accord/transport/http.py > /tmp/http_aiohttp.py
    .venv/bin/python bench/http_client.py --repeat 5 --also-transport /tmp/http_aiohttp.py

    client                  req/s   p50 ms   p99 ms cpu us/req
    aiohttp                  4426    21.08    37.50        137
    httpx                     285   239.83  1613.21       3096
    pyreqwest                7383    12.71    24.81         63
    pyreqwest-mt             7358    13.35    27.42         67
    accord                   6208    15.78    32.51         90
    accord@http_aiohttp      3577    28.51    41.06        185

(``accord`` is this transport: pyreqwest plus signing, trace context and
reply mapping; ``accord@http_aiohttp`` the same on aiohttp.) pyreqwest
needs about half aiohttp's client CPU per request, and the transport keeps
most of that: 90 against 185 us per call here; with ``--server uvicorn``
130 against 150 (raw pyreqwest 67, aiohttp 112). End to end,
``accord demo --http --fault-rate 0 --latency-ms 0 --orders 5000`` spent
~1,100 us of coordinator CPU per transaction against ~1,600 on aiohttp
(median of 5 interleaved runs each). pyreqwest's multithreaded runtime was
no faster and cost more CPU per transaction in the demo (~1,230 us), where
the services compete for the same 2 cores, so the default single-threaded
one (one I/O thread beside Python's) is used. httpx stays more than an
order of magnitude slower at this concurrency (its connection pool is the
known bottleneck, encode/httpx#3215).
"""

from __future__ import annotations

import datetime
import email.utils
import http
import logging
import math
import random
import re
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

import msgspec
from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import (
    BodyDecodeError,
    ClientClosedError,
    DecodeError,
    NetworkError,
    ReadError,
    RequestError,
)
from pyreqwest.http import Url
from pyreqwest.response import Response
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
_Target = tuple[Url, str, str, bytes]
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

    HTTPS: the server's certificate is checked against the usual public
    roots plus, if given, the PEM certificates in ``ca_pem`` (a private CA:
    one certificate or a bundle). ``identity_pem`` (a private key and its
    certificate chain, PEM) is presented to participants that ask for a
    client certificate (mutual TLS). A certificate that does not verify is
    a connection error, so the call is ``TRANSIENT`` like any other.

    One pyreqwest client (made at the first call) pools keep-alive
    connections and lets at most ``max_connections`` requests be in flight
    at once; :meth:`close` closes it. The client belongs to no event loop
    (its I/O runs on its own thread), so the transport may be used from one
    loop after another.
    """

    def __init__(
        self,
        keys: Mapping[str, Key],
        *,
        default_key: Key | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        traceparent: TraceparentFor | None = None,
        ca_pem: bytes | None = None,
        identity_pem: bytes | None = None,
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
        self._timeouts: dict[float, datetime.timedelta] = {}
        self._client: Client | None = None
        self._traceparent_for = traceparent
        self._roots = [] if ca_pem is None else _certificates(ca_pem)
        self._identity = None if identity_pem is None else _identity(identity_pem)

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
            timeout = self._timeout(timeout_s)
            if timeout is None:
                return Reply(
                    Outcome.REJECTED,
                    error=f"call.timeout_s must be a finite number above 0, got {timeout_s!r}",
                )
        client = self._client or self._open()
        try:
            # Streamed, so that an oversized body is refused before it is all read;
            # the timeout is reqwest's and covers the whole call, pool wait to last byte.
            request = (
                client.post(url).headers(headers).body_bytes(body).timeout(timeout).build_streamed()
            )
            async with request as resp:
                status = resp.status
                if 200 <= status < 300:
                    return _success(await _read(resp))
                return _failure(status, resp, await _read(resp))
        except TimeoutError:  # reqwest's RequestTimeoutError, pool wait included
            return Reply(Outcome.TRANSIENT, error=f"timed out after {timeout_s:g}s")
        except _ReplyTooLarge as exc:
            return Reply(Outcome.REJECTED, error=str(exc))
        except ClientClosedError:
            # close() ran while this call was in flight; a retry opens a new client.
            return Reply(Outcome.TRANSIENT, error="transport closed during the call")
        except RequestError as exc:
            return Reply(Outcome.TRANSIENT, error=_network_error(exc, url))
        except Exception as exc:
            # Not a failure pyreqwest documents: most likely a bug here or in
            # pyreqwest. Retrying is safe (calls are idempotent), so treat it
            # like a network fault, but leave a trace for whoever debugs it.
            log.warning("unexpected error calling %s", url, exc_info=True)
            return Reply(Outcome.TRANSIENT, error=_clip(f"transport error: {exc!r}"))

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # ------------------------------------------------------------ slow path

    def _open(self) -> Client:
        """The pooled client, configured so that nothing but the call decides
        what is sent or how a reply is read."""
        builder = client_builder(self._max_connections)
        for root in self._roots:
            builder = builder.add_root_certificate_pem(root)
        if self._identity is not None:
            builder = builder.identity_pem(self._identity)
        self._client = builder.build()
        return self._client

    def _timeout(self, timeout_s: float) -> datetime.timedelta | None:
        try:
            timeout = datetime.timedelta(seconds=timeout_s)
        except (TypeError, ValueError, OverflowError):
            return None
        if timeout <= datetime.timedelta(0):
            return None
        if len(self._timeouts) >= MAX_CACHED_TARGETS:
            self._timeouts.clear()
        self._timeouts[timeout_s] = timeout
        return timeout

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
        try:
            sent = Url(str(url))
        except (TypeError, ValueError) as exc:
            return Reply(Outcome.REJECTED, error=_clip(f"invalid participant URL {shown!r}: {exc}"))
        # Signed as it goes on the request line: the percent-encoded path, as
        # the client that sends it encoded it.
        return sent, sent.path, key[0], key[1]

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


class TlsFiles(TypedDict, total=False):
    """HttpTransport's TLS options, as :func:`read_tls` reads them."""

    ca_pem: bytes
    identity_pem: bytes


def client_builder(max_connections: int) -> ClientBuilder:
    """A pyreqwest client configured so that nothing but the call decides what
    is sent or how a reply is read (the transport's; benches build the same)."""
    return (
        ClientBuilder()
        .max_connections(max_connections)
        # Idle connections kept per participant: no more than may be busy.
        .pool_max_idle_per_host(max_connections)
        # Participants' redirects, error statuses and cookies are answers to map,
        # not to act on, and must not leak from one call (or participant) to the next.
        .follow_redirects(False)
        .error_for_status(False)
        .default_cookie_store(False)
        .referer(False)
        # reqwest takes HTTP(S)_PROXY from the environment by default: calls to
        # participants go straight to them.
        .no_proxy()
        # Nothing is decompressed (nor is compression offered): a reply is
        # read and bounded as it came off the wire.
        .gzip(False)
        .brotli(False)
        .zstd(False)
        .deflate(False)
    )


def read_tls(ca_file: str | None = None, identity_file: str | None = None) -> TlsFiles:
    """HttpTransport's ``ca_pem`` and ``identity_pem`` read from PEM files and
    checked; ValueError naming the file that is missing or does not hold
    what it should."""
    tls: TlsFiles = {}
    if ca_file is not None:
        tls["ca_pem"] = _read_pem(ca_file, _certificates)
    if identity_file is not None:
        tls["identity_pem"] = _read_pem(identity_file, _identity)
    return tls


def _read_pem(path: str, check: Callable[[bytes], object]) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
        check(data)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return data


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _certificates(pem: bytes) -> list[bytes]:
    """Each certificate of a PEM bundle; ValueError if there is none or one
    does not parse (reqwest would silently skip it)."""
    if not isinstance(pem, bytes):
        raise ValueError("ca_pem must be bytes (PEM certificates)")
    found = _PEM_CERT.findall(pem)
    if not found:
        raise ValueError("ca_pem holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        ssl.create_default_context(cadata=b"\n".join(found).decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"ca_pem: a certificate does not parse: {exc}") from None
    return found


def _identity(pem: bytes) -> bytes:
    """A client identity (PEM private key and certificate chain) reqwest accepts."""
    if not isinstance(pem, bytes) or b"PRIVATE KEY-----" not in pem or not _PEM_CERT.search(pem):
        raise ValueError("identity_pem must hold a PEM private key and its certificate chain")
    try:
        ClientBuilder().identity_pem(pem).build()
    except ValueError as exc:
        raise ValueError(f"identity_pem is not a usable key and certificate: {exc}") from None
    return pem


def _header(resp: Response, name: str) -> str | None:
    """A reply header as text; one that is not (obs-text bytes) counts as absent."""
    try:
        return resp.get_header(name)
    except ValueError:
        return None


async def _read(resp: Response) -> bytes:
    """The reply body, refusing one over ``wire.MAX_BODY_BYTES``."""
    length = _header(resp, "content-length")
    if length is not None:
        # HTTP/1.1 framing already checked it is a number (hyper refuses others).
        size = int(length)
        if size > wire.MAX_BODY_BYTES:
            raise _ReplyTooLarge(_too_large(resp.status, size))
        return (await resp.bytes()).to_bytes()
    chunks: list[bytes] = []
    size = 0
    reader = resp.body_reader
    while (chunk := await reader.read_chunk()) is not None:
        size += len(chunk)
        if size > wire.MAX_BODY_BYTES:
            raise _ReplyTooLarge(_too_large(resp.status, size))
        chunks.append(chunk.to_bytes())
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


def _failure(status: int, resp: Response, raw: bytes) -> Reply:
    if status == 409:
        return Reply(Outcome.REFUSED, error=_error_text(raw, status))
    # 408 (the server gave up waiting for the request) and 425 (too early to
    # process it) say "send it again later", like 429 and 5xx.
    if status in _RETRYABLE_4XX or 500 <= status < 600:
        return Reply(
            Outcome.TRANSIENT,
            error=f"HTTP {status}: {_error_text(raw, status)}",
            retry_after_s=_retry_after_s(_header(resp, "Retry-After")),
        )
    if 300 <= status < 400:
        location = _clip(_header(resp, "Location") or "", 200)
        return Reply(
            Outcome.REJECTED,
            error=f"HTTP {status}: redirects are not followed (Location: {location!r})",
        )
    return Reply(Outcome.REJECTED, error=f"HTTP {status}: {_error_text(raw, status)}")


def _error_text(raw: bytes, status: int) -> str:
    """The body's ``"error"``, else its text, else the status's standard reason
    phrase (the client does not expose the one the server sent)."""
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
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "no reason given"


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


def _network_error(exc: RequestError, url: Url) -> str:
    """A short, stable description of a failure to get a reply.

    pyreqwest's classes are coarse (a connection closed before the status
    line is a ``ConnectError``, say), so the chain of causes it reports
    (reqwest's, hyper's, the OS's) tells the cases apart; the outcome never
    depends on it, only the text."""
    causes = [str(cause.get("message", "")) for cause in (exc.details.get("causes") or ())]
    said = "\n".join(causes).lower()
    last = causes[-1] if causes else exc.message
    if "dns error" in said:
        return _clip(f"cannot resolve host {url.host_str!r}: {last}")
    if "client error (connect)" in said:
        reason = "connection refused" if "connection refused" in said else last
        return _clip(f"cannot connect to {url.host_str}:{url.port_or_known_default}: {reason}")
    if isinstance(exc, ReadError | BodyDecodeError):
        return _clip(f"connection lost mid-reply: body incomplete ({last})")
    if isinstance(exc, DecodeError):
        return _clip(f"invalid HTTP reply: {last}")
    if "connection closed before message completed" in said:
        return "server disconnected before replying"
    if isinstance(exc, NetworkError):
        return _clip(f"connection error: {last}")
    return _clip(f"{type(exc).__name__}: {exc.message}: {last}")


def _clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
