"""Bearer tokens for the API.

Every path needs ``Authorization: Bearer <token>`` except the public ones
(health checks, the OpenAPI document, the dashboard's page and static
files). Tokens are compared in constant time, through their SHA-256 so that
their length does not show either, and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import msgspec
from starlette.types import ASGIApp, Receive, Scope, Send

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)
MIN_TOKEN_CHARS = 16

_UNAUTHORIZED = msgspec.json.encode(
    {"error": "missing or invalid bearer token", "code": "unauthorized"}
)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class BearerAuth:
    """ASGI middleware: 401 for a protected path without a valid token."""

    def __init__(self, app: ASGIApp, tokens: Iterable[str]) -> None:
        self.app = app
        self._digests = tuple(_digest(t) for t in tokens)
        if not self._digests:
            raise ValueError("BearerAuth needs at least one token")

    def allowed(self, header: bytes | None) -> bool:
        if header is None:
            return False
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = _digest(token.strip())
        ok = False
        for known in self._digests:  # no early exit: same time whichever matches
            ok |= hmac.compare_digest(digest, known)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if self.allowed(header):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_UNAUTHORIZED)).encode()),
                    (b"www-authenticate", b'Bearer realm="accord"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})


def check_token(token: str) -> None:
    """Refuse tokens too short to be secret."""
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ValueError(
            f"an API token must be at least {MIN_TOKEN_CHARS} characters without spaces"
        )
