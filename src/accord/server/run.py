"""``accord serve``: the coordinator as a long-running HTTP service.

Builds the log store, the HTTP transport (with the participants' signing
keys), the coordinator and the app, and runs them under uvicorn. On SIGTERM
or SIGINT the server stops accepting connections, answers every waiting
request at once (202: the transaction goes on), lets the transactions in
flight finish for up to ``drain_timeout_s``, and closes the coordinator,
which makes the log durable; the unfinished rest is resumed by the next
start. A second signal exits at once (the log still holds the truth).

Secrets (API tokens, signing keys) are read from files and never printed or
logged; error messages about those files name the file, not its content.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from accord.coordinator import Coordinator
from accord.log import open_store
from accord.observability import TracingObserver
from accord.server.app import ServerConfig, create_app
from accord.server.auth import check_token
from accord.server.limits import AllowList, Limits
from accord.transport.http import HttpTransport, TlsFiles

log = logging.getLogger("accord.server")

Key = tuple[str, bytes]
MIN_SECRET_BYTES = 16


@dataclass(frozen=True, slots=True)
class ServeOptions:
    store_url: str
    host: str = "127.0.0.1"
    port: int = 8600
    keys: dict[str, Key] = field(default_factory=dict)
    allow: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()
    require_auth: bool = True
    max_in_flight: int = 1000
    drain_timeout_s: float = 10.0
    limits: Limits = field(default_factory=Limits)
    max_connections: int = 2048
    # Spans of transactions and calls (``tracing_from_env()``); None: no tracing.
    tracing: TracingObserver | None = None
    # HttpTransport's ca_pem / identity_pem (``read_tls``): HTTPS to participants.
    tls: TlsFiles = field(default_factory=TlsFiles)


def load_keys(path: Path) -> dict[str, Key]:
    """``{"http://host:port/prefix": {"key_id": "k1", "secret": "<hex>"}, ...}``
    (or ``"secret_file": "path"`` holding the hex secret)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON keys file ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path}: must be a JSON object of URL prefix -> {{key_id, secret}}")
    keys: dict[str, Key] = {}
    for prefix, entry in raw.items():
        where = f"{path}: {prefix!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("key_id"), str):
            raise ValueError(f"{where}: must be an object with key_id and secret (or secret_file)")
        if "secret_file" in entry:
            secret = load_secret(Path(path.parent, str(entry["secret_file"])))
        else:
            secret = _hex_secret(entry.get("secret"), where)
        keys[prefix] = (entry["key_id"], secret)
    return keys


def load_secret(path: Path) -> bytes:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the secret ({exc.strerror})") from None
    return _hex_secret(text, str(path))


def _hex_secret(value: Any, where: str) -> bytes:
    try:
        secret = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        secret = b""
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"{where}: the secret must be hex, at least {MIN_SECRET_BYTES} bytes")
    return secret


def load_tokens(path: Path, *, create: bool) -> tuple[str, ...]:
    """The API tokens in ``path``, one a line; with ``create``, a missing file
    is created (mode 0600) holding one fresh token."""
    if not path.exists():
        if not create:
            raise ValueError(f"{path}: no such token file")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the token file ({exc.strerror})") from None
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))
    if not tokens:
        raise ValueError(f"{path}: holds no token")
    for token in tokens:
        try:
            check_token(token)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    return tokens


def server_config(options: ServeOptions) -> ServerConfig:
    """The app's configuration; ValueError naming the option at fault. The
    CLI calls it before anything starts, to report bad options cleanly."""
    allow = AllowList([*options.allow, *options.keys])
    return ServerConfig(
        tokens=options.tokens,
        require_auth=options.require_auth,
        allow=allow,
        limits=options.limits,
        drain_timeout_s=options.drain_timeout_s,
    )


def build(options: ServeOptions) -> tuple[Any, Coordinator]:
    """The app and its coordinator (not started: the app's lifespan starts it)."""
    store = open_store(options.store_url)
    tracing = options.tracing
    transport = HttpTransport(
        options.keys,
        traceparent=tracing.traceparent if tracing is not None else None,
        **options.tls,
    )
    coordinator = Coordinator(store, transport, max_in_flight=options.max_in_flight)
    config = server_config(options)
    app = create_app(coordinator, config, observers=[tracing] if tracing is not None else [])
    return app, coordinator


class _Server(uvicorn.Server):
    """uvicorn, telling the API to drain as soon as the signal arrives (not
    only once every connection has closed), so that waiting requests answer
    at once."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:  # a signal handler: hand over to the loop safely
            loop.call_soon_threadsafe(self._on_exit)
        super().handle_exit(sig, frame)


def serve_forever(options: ServeOptions) -> None:
    """Run until SIGTERM / SIGINT."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app, _ = build(options)
    config = uvicorn.Config(
        app,
        host=options.host,
        port=options.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        limit_concurrency=options.max_connections,
        timeout_graceful_shutdown=int(options.drain_timeout_s) + 1,
    )
    server = _Server(config, app.state.api.start_draining)
    server.run()  # the app's lifespan shuts tracing down (flushing its exporter)
    if not server.started:
        raise SystemExit(1)


__all__ = [
    "ServeOptions",
    "build",
    "load_keys",
    "load_secret",
    "load_tokens",
    "serve_forever",
    "server_config",
]
