"""The wire protocol between the coordinator and HTTP participants.

One ``POST {branch url}/{operation}`` per operation (``try``, ``confirm``,
``cancel``, ``action``, ``compensate``) with a JSON body::

    {"txid": "...", "branch": "...", "op": "try", "payload": {...}, "attempt": 1}

and these headers:

=======================  ==================================================
``traceparent``          W3C trace context of the coordinator's span
``x-accord-key-id``      which shared secret signed the request
``x-accord-timestamp``   Unix time in whole seconds
``x-accord-nonce``       32 hex characters, never reused
``x-accord-signature``   hex HMAC-SHA256 of :func:`canonical` with the secret
=======================  ==================================================

Replies: 2xx success, body ``{"result": ...}``; 409 business refusal; 429 and
5xx transient (``Retry-After`` honoured); any other 4xx: the request itself is
wrong. Error bodies are ``{"error": "..."}``.

A participant rejects (401) a request that is unsigned, signed with an
unknown key, tampered with, outside ±``MAX_SKEW_S`` of its clock, or whose
nonce it has already seen within that window (a replay).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msgspec

KEY_ID = "x-accord-key-id"
TIMESTAMP = "x-accord-timestamp"
NONCE = "x-accord-nonce"
SIGNATURE = "x-accord-signature"
TRACEPARENT = "traceparent"

MAX_SKEW_S = 300
MAX_BODY_BYTES = 1024 * 1024
OPERATIONS = ("try", "confirm", "cancel", "action", "compensate")


class WireRequest(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON body of a participant call."""

    txid: str
    branch: str
    op: str
    payload: Any = None
    attempt: int = 1


_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(WireRequest)


def encode_request(request: WireRequest) -> bytes:
    return _encoder.encode(request)


def decode_request(body: bytes) -> WireRequest:
    """Parse a call body; raises ``ValueError`` naming what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"body is {len(body)} bytes, the limit is {MAX_BODY_BYTES}")
    try:
        request = _request_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed JSON: {exc}") from exc
    if request.op not in OPERATIONS:
        raise ValueError(f"op must be one of {', '.join(OPERATIONS)}, got {request.op!r}")
    if not request.txid or not request.branch:
        raise ValueError("txid and branch must be non-empty")
    if request.attempt < 1:
        raise ValueError(f"attempt must be at least 1, got {request.attempt}")
    return request


def signed_path(scope: Mapping[str, Any], fallback: str | None = None) -> str:
    """The path that is signed: as the client put it on the request line,
    percent-encoded, prefix included, query excluded (the ASGI ``raw_path``).
    For servers that do not supply it: ``fallback`` if given, else the
    decoded ``path`` with ``?``, ``#`` and ``\\`` escaped (what Starlette's
    ``request.url.path`` gives)."""
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        return raw.decode("latin-1").split("?", 1)[0]
    if fallback is not None:
        return fallback
    path: str = scope["path"]
    return path.replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")


def canonical(method: str, path: str, timestamp: str, nonce: str, body: bytes) -> bytes:
    """What is signed: method, path (see :func:`signed_path`), timestamp,
    nonce and the body's digest."""
    digest = hashlib.sha256(body).hexdigest()
    return f"{method.upper()}\n{path}\n{timestamp}\n{nonce}\n{digest}".encode()


def sign(
    secret: bytes, key_id: str, method: str, path: str, body: bytes, *, now_s: float | None = None
) -> dict[str, str]:
    """The signature headers for one request."""
    timestamp = str(int(time.time() if now_s is None else now_s))
    nonce = secrets.token_hex(16)
    mac = hmac.new(secret, canonical(method, path, timestamp, nonce, body), hashlib.sha256)
    return {KEY_ID: key_id, TIMESTAMP: timestamp, NONCE: nonce, SIGNATURE: mac.hexdigest()}


class SignatureError(Exception):
    """The request's signature does not hold; the message says why."""


class ReplayMemoryFull(Exception):
    """Too many requests inside the replay window to remember them all: the
    request is refused for now (retryable), never accepted unchecked."""


class Verifier:
    """Checks signatures and remembers recent nonces to refuse replays.

    The nonce memory only needs to cover ``MAX_SKEW_S`` (an older request is
    refused as stale) and is bounded by ``max_nonces``: when it is full of
    nonces still inside the window, requests are refused with
    :class:`ReplayMemoryFull` (answer 503, the caller retries) rather than
    forgetting a nonce that could then be replayed. Size it for the call rate
    times ``2 * MAX_SKEW_S``.
    """

    def __init__(self, keys: Mapping[str, bytes], *, max_nonces: int = 1_000_000) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        self._keys = dict(keys)
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max_nonces = max_nonces

    def verify(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        now_s: float | None = None,
    ) -> str:
        """Return the key id, or raise SignatureError."""
        now = time.time() if now_s is None else now_s
        key_id = headers.get(KEY_ID)
        timestamp = headers.get(TIMESTAMP)
        nonce = headers.get(NONCE)
        signature = headers.get(SIGNATURE)
        if not (key_id and timestamp and nonce and signature):
            raise SignatureError("unsigned request")
        secret = self._keys.get(key_id)
        if secret is None:
            raise SignatureError(f"unknown key id {key_id!r}")
        try:
            sent_s = int(timestamp)
        except ValueError:
            raise SignatureError("malformed timestamp") from None
        if abs(now - sent_s) > MAX_SKEW_S:
            raise SignatureError(f"stale request: timestamp is {int(now - sent_s)} s off")
        # hmac.digest: the one-shot C implementation, same MAC as hmac.new.
        expected = hmac.digest(
            secret, canonical(method, path, timestamp, nonce, body), "sha256"
        ).hex()
        if not hmac.compare_digest(expected, signature):
            raise SignatureError("signature mismatch")
        self._forget_before(now - MAX_SKEW_S)
        if nonce in self._seen:
            raise SignatureError("replayed request (nonce already used)")
        if len(self._seen) >= self._max_nonces:
            raise ReplayMemoryFull(f"{self._max_nonces} requests inside the replay window")
        self._seen[nonce] = now
        return key_id

    def _forget_before(self, cutoff: float) -> None:
        while self._seen:
            _, seen_at = next(iter(self._seen.items()))
            if seen_at >= cutoff:
                return
            self._seen.popitem(last=False)
