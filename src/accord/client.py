"""Clients of the accord server's API: :class:`Client` (async) and :class:`SyncClient`.

::

    async with accord.Client("http://127.0.0.1:8600", token=token) as client:
        sub = await client.submit(spec, wait=True)      # SubmitOut: status, decision, ...
        txn = await client.get(sub.id)                  # TxnOut: branches, attempts, ...

Every submit carries an id (the spec's, or a fresh one), which the server
uses as the idempotency key: a submit that failed on the way (a dropped
connection, a 503) is retried with the same id, at most ``max_retries``
times, and can never create a second transaction.

Errors: 404 raises :class:`~accord.TransactionNotFound`, a conflicting id
:class:`~accord.DuplicateTransaction`, a refused spec
:class:`~accord.InvalidTransaction` (with its ``field``), an overloaded
server :class:`~accord.Overloaded` (after the retries); anything else
:class:`ApiError`, which carries the status, code, field and limit, and
whether sending the request again may succeed (``retryable``).

The two clients share everything but the sending: each request is built,
and each answer decoded, by the pure functions below (no I/O); only
``_send`` differs (aiohttp or httpx, asyncio.sleep or time.sleep).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec

from accord.core.spec import TransactionSpec
from accord.errors import (
    AccordError,
    DuplicateTransaction,
    InvalidTransaction,
    Overloaded,
    TransactionNotFound,
)
from accord.server.schema import (
    ActionOut,
    ErrorOut,
    HealthOut,
    StatsOut,
    SubmitOut,
    TxnListOut,
    TxnOut,
    TxnRowOut,
)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 3
MAX_RETRY_DELAY_S = 5.0
_encode = msgspec.json.Encoder().encode
# Answers that another try may turn into a success: 0 (the server could not
# be reached), 429 (too many requests), 502 / 503 / 504 (a proxy or the
# server, unavailable for now). Requests that are safe to repeat (reads, and
# submits, which always carry their idempotency key) are retried on these.
RETRYABLE_STATUSES = frozenset({0, 429, 502, 503, 504})


class ApiError(AccordError):
    """The server answered with an error no more specific exception describes
    (``status`` 0: it could not be reached). ``retryable``: the same request
    may succeed later (status 0, 429, 502, 503 or 504)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "",
        field: str | None = None,
        limit: str | None = None,
        txid: str | None = None,
    ) -> None:
        super().__init__(f"HTTP {status}: {message}", txid=txid)
        self.status = status
        self.code = code
        self.field = field
        self.limit = limit
        self.retryable = status in RETRYABLE_STATUSES


# ---------------------------------------------------------------- shared, no I/O


@dataclass(frozen=True, slots=True)
class _Request(Generic[T]):
    """One API request, ready to send, and how to read its answer."""

    method: str
    path: str
    answer: type[T]
    txid: str | None = None
    body: bytes | None = None
    query: Mapping[str, str] | None = None
    headers: Mapping[str, str] | None = None
    retry: bool = False  # safe to send again (a read, or a keyed submit)

    def decode(self, status: int, raw: bytes) -> T:
        return _decode(self.answer, status, raw, self.txid)

    def delay_s(
        self, attempt: int, max_retries: int, status: int, retry_after: str | None
    ) -> float | None:
        """After answer ``status`` (0: not reached) to attempt ``attempt``
        (0-based): how long to wait before sending again, or None to stop."""
        if not self.retry or attempt >= max_retries or status not in RETRYABLE_STATUSES:
            return None
        return _retry_delay_s(attempt, retry_after)


def _json_request(
    method: str,
    path: str,
    answer: type[T],
    body: Any,
    *,
    txid: str | None,
    query: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    retry: bool = False,
) -> _Request[T]:
    return _Request(
        method,
        path,
        answer,
        txid,
        _encode(body),
        query,
        {"content-type": "application/json", **(extra or {})},
        retry,
    )


def _submit_request(
    spec: TransactionSpec | Mapping[str, Any], txid: str | None, wait: bool, wait_s: float | None
) -> _Request[SubmitOut]:
    body = _spec_body(spec, txid)
    key = body["id"]
    return _json_request(
        "POST",
        "/v1/transactions",
        SubmitOut,
        body,
        txid=key,
        query=_wait_query(wait, wait_s),
        extra={"idempotency-key": key},
        retry=True,
    )


def _get_request(txid: str) -> _Request[TxnOut]:
    return _Request("GET", _path(txid), TxnOut, txid, retry=True)


def _list_request(
    state: str | None, since_ms: int | None, limit: int, cursor: str | None
) -> _Request[TxnListOut]:
    query = {"limit": str(limit)}
    if state:
        query["state"] = state
    if since_ms is not None:
        query["since"] = str(since_ms)
    if cursor:
        query["cursor"] = cursor
    return _Request("GET", "/v1/transactions", TxnListOut, query=query, retry=True)


def _action_request(
    action: str, txid: str, reason: str, wait: bool, wait_s: float | None
) -> _Request[ActionOut]:
    # Not retried: a second retry or abort would record a second note.
    return _json_request(
        "POST",
        f"{_path(txid)}/{action}",
        ActionOut,
        {"reason": reason},
        txid=txid,
        query=_wait_query(wait, wait_s),
    )


_STATS = _Request("GET", "/v1/stats", StatsOut, retry=True)
_READY = _Request("GET", "/readyz", HealthOut)


def _unreachable(url: str, exc: BaseException) -> ApiError:
    return ApiError(0, f"cannot reach {url}: {exc!r}")


def _spec_body(spec: TransactionSpec | Mapping[str, Any], txid: str | None) -> dict[str, Any]:
    body = spec.to_dict() if isinstance(spec, TransactionSpec) else dict(spec)
    if txid is not None:
        body["id"] = txid
    if not body.get("id"):
        body["id"] = uuid.uuid4().hex
    return body


def _wait_query(wait: bool, wait_s: float | None) -> dict[str, str]:
    query = {"wait": "true"} if wait else {}
    if wait and wait_s is not None:
        query["wait_s"] = f"{wait_s:g}"
    return query


def _path(txid: str) -> str:
    return f"/v1/transactions/{quote(txid, safe='')}"


def _error(status: int, raw: bytes, txid: str | None) -> AccordError:
    try:
        err = msgspec.json.decode(raw, type=ErrorOut)
        message, code, field, limit = err.error, err.code, err.field, err.limit
    except msgspec.DecodeError:  # not one of ours (a proxy's page, say)
        message = raw[:300].decode("utf-8", "replace").strip() or f"HTTP {status}"
        code, field, limit = "", None, None
    if status == 404 and code == "not_found":
        return TransactionNotFound(message, txid=txid)
    if status == 409 and code == "conflict":
        return DuplicateTransaction(message, txid=txid)
    if status == 422 and code == "invalid" and field:
        prefix = f"{field}: "
        return InvalidTransaction(field, message.removeprefix(prefix), txid=txid)
    if status == 503 and code == "overloaded":
        return Overloaded(message, txid=txid)
    return ApiError(status, message, code=code, field=field, limit=limit, txid=txid)


def _decode(type_: type[T], status: int, raw: bytes, txid: str | None) -> T:
    if status >= 400:
        raise _error(status, raw, txid)
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.DecodeError as exc:
        raise ApiError(status, f"unexpected reply: {exc}", txid=txid) from None


def _retry_delay_s(attempt: int, retry_after: str | None) -> float:
    try:
        delay_s = float(retry_after) if retry_after else 0.0
    except ValueError:
        delay_s = 0.0
    if not math.isfinite(delay_s):
        delay_s = 0.0
    return float(min(max(delay_s, 0.05 * 2.0**attempt), MAX_RETRY_DELAY_S))


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------- async


class Client:
    """Async client (aiohttp). Use as ``async with`` or call :meth:`close`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_connections: int = 100,
    ) -> None:
        self.url = url.rstrip("/")
        self._headers = _headers(token)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max_retries
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _send(self, req: _Request[Any]) -> tuple[int, bytes]:
        session = self._open()
        attempt = 0
        while True:
            try:
                async with session.request(
                    req.method,
                    self.url + req.path,
                    data=req.body,
                    params=req.query,
                    headers=req.headers,
                    allow_redirects=False,
                ) as resp:
                    status, raw = resp.status, await resp.read()
                    retry_after = resp.headers.get("retry-after")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                delay_s = req.delay_s(attempt, self.max_retries, 0, None)
                if delay_s is None:
                    raise _unreachable(self.url, exc) from exc
            else:
                delay_s = req.delay_s(attempt, self.max_retries, status, retry_after)
                if delay_s is None:
                    return status, raw
            await asyncio.sleep(delay_s)
            attempt += 1

    async def _call(self, req: _Request[T]) -> T:
        return req.decode(*await self._send(req))

    async def submit(
        self,
        spec: TransactionSpec | Mapping[str, Any],
        *,
        txid: str | None = None,
        wait: bool = False,
        wait_s: float | None = None,
    ) -> SubmitOut:
        """Submit a transaction (a spec, or its JSON form). ``wait``: answer once
        it is terminal (or after ``wait_s``, the server's bound by default)."""
        return await self._call(_submit_request(spec, txid, wait, wait_s))

    async def get(self, txid: str) -> TxnOut:
        return await self._call(_get_request(txid))

    async def list(
        self,
        *,
        state: str | None = None,
        since_ms: int | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> TxnListOut:
        return await self._call(_list_request(state, since_ms, limit, cursor))

    async def iter(
        self, *, state: str | None = None, since_ms: int | None = None, page: int = 100
    ) -> AsyncIterator[TxnRowOut]:
        """Every transaction (matching), page after page."""
        cursor = None
        while True:
            got = await self.list(state=state, since_ms=since_ms, limit=page, cursor=cursor)
            for row in got.items:
                yield row
            if got.next_cursor is None:
                return
            cursor = got.next_cursor

    async def retry(
        self, txid: str, reason: str, *, wait: bool = False, wait_s: float | None = None
    ) -> ActionOut:
        return await self._call(_action_request("retry", txid, reason, wait, wait_s))

    async def abort(
        self, txid: str, reason: str, *, wait: bool = False, wait_s: float | None = None
    ) -> ActionOut:
        return await self._call(_action_request("abort", txid, reason, wait, wait_s))

    async def resolve(self, txid: str, reason: str) -> ActionOut:
        return await self._call(_action_request("resolve", txid, reason, False, None))

    async def stats(self) -> StatsOut:
        return await self._call(_STATS)

    async def ready(self) -> bool:
        try:
            status, _ = await self._send(_READY)
        except ApiError:
            return False
        return status == 200


# ---------------------------------------------------------------- sync


class SyncClient:
    """The same API, blocking (httpx). Use as ``with`` or call :meth:`close`."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_retries: int = DEFAULT_MAX_RETRIES,
    ) -> None:
        import httpx  # noqa: PLC0415 - only sync users pay for importing it

        self.url = url.rstrip("/")
        self.max_retries = max_retries
        self._httpx = httpx
        self._http = httpx.Client(
            base_url=self.url,
            headers=_headers(token),
            timeout=timeout_s,
            follow_redirects=False,
        )

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, req: _Request[Any]) -> tuple[int, bytes]:
        attempt = 0
        while True:
            try:
                resp = self._http.request(
                    req.method,
                    req.path,
                    content=req.body,
                    params=req.query,
                    headers=req.headers,
                )
            except self._httpx.HTTPError as exc:
                delay_s = req.delay_s(attempt, self.max_retries, 0, None)
                if delay_s is None:
                    raise _unreachable(self.url, exc) from exc
            else:
                retry_after = resp.headers.get("retry-after")
                delay_s = req.delay_s(attempt, self.max_retries, resp.status_code, retry_after)
                if delay_s is None:
                    return resp.status_code, resp.content
            time.sleep(delay_s)
            attempt += 1

    def _call(self, req: _Request[T]) -> T:
        return req.decode(*self._send(req))

    def submit(
        self,
        spec: TransactionSpec | Mapping[str, Any],
        *,
        txid: str | None = None,
        wait: bool = False,
        wait_s: float | None = None,
    ) -> SubmitOut:
        return self._call(_submit_request(spec, txid, wait, wait_s))

    def get(self, txid: str) -> TxnOut:
        return self._call(_get_request(txid))

    def list(
        self,
        *,
        state: str | None = None,
        since_ms: int | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> TxnListOut:
        return self._call(_list_request(state, since_ms, limit, cursor))

    def iter(
        self, *, state: str | None = None, since_ms: int | None = None, page: int = 100
    ) -> Iterator[TxnRowOut]:
        cursor = None
        while True:
            got = self.list(state=state, since_ms=since_ms, limit=page, cursor=cursor)
            yield from got.items
            if got.next_cursor is None:
                return
            cursor = got.next_cursor

    def retry(
        self, txid: str, reason: str, *, wait: bool = False, wait_s: float | None = None
    ) -> ActionOut:
        return self._call(_action_request("retry", txid, reason, wait, wait_s))

    def abort(
        self, txid: str, reason: str, *, wait: bool = False, wait_s: float | None = None
    ) -> ActionOut:
        return self._call(_action_request("abort", txid, reason, wait, wait_s))

    def resolve(self, txid: str, reason: str) -> ActionOut:
        return self._call(_action_request("resolve", txid, reason, False, None))

    def stats(self) -> StatsOut:
        return self._call(_STATS)

    def ready(self) -> bool:
        try:
            status, _ = self._send(_READY)
        except ApiError:
            return False
        return status == 200


__all__ = ["ApiError", "Client", "SyncClient"]
