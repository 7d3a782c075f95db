"""The shop as real HTTP services, written with the participant SDK.

Each of the four services keeps, in its own SQLite file, its business state
(``counters``), a ledger of applied effects (``ledger``, same layout as the
in-process simulation so the same checker reads it) and the SDK's barrier
table. Its handlers are the same business rules as the in-process services
(:mod:`accord.sim.services`); the SDK makes them run once per (transaction,
branch, operation), in the same local transaction as the business update.

A fault-injecting ASGI middleware sits in front of each service (latency,
503s, timeouts before and after applying, duplicate deliveries, down
windows), configurable at start and at run time through ``/admin/faults``.
``/admin/state`` returns every service's initial state, counters and ledger
for the invariant checker. Admin endpoints need the shared secret as a
bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import random
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from accord import wire
from accord.core.spec import Op
from accord.participant import Participant, Refusal, SQLiteBarrier
from accord.participant._barrier import DEFAULT_MIN_RETENTION_S
from accord.sim import services as sim
from accord.sim.faults import FAULT_KINDS, FAULT_MIX, LATENCY_SIGMA, FaultConfig
from accord.sim.services import RULES, Counters, ServiceStore
from accord.sim.workload import SERVICES

log = logging.getLogger("accord.services")
# Counters are stored as JSON text, ledger effects as JSON bytes (as the
# in-process services store them); msgspec, not json: they are encoded and
# decoded on every call.
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

if TYPE_CHECKING:
    from accord.sim.http_shop_pg import PgShop

KEY_ID = "shop"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# ---------------------------------------------------------------- storage


def create_databases(directory: Path, initial: dict[str, Counters]) -> None:
    """Fresh service files: initial state, empty ledger, counters."""
    for name in SERVICES:
        store = ServiceStore(directory / f"{name}.db")
        store.create(initial[name])
        conn = sqlite3.connect(directory / f"{name}.db", isolation_level=None)
        try:
            conn.execute("CREATE TABLE counters (key TEXT PRIMARY KEY, v TEXT NOT NULL)")
            conn.executemany(
                "INSERT INTO counters(key, v) VALUES (?, ?)",
                [(k, _encode(v).decode()) for k, v in initial[name].items()],
            )
        finally:
            conn.close()


def read_counters(path: Path) -> Counters:
    conn = sqlite3.connect(path)
    try:
        return {k: _decode(v) for k, v in conn.execute("SELECT key, v FROM counters")}
    finally:
        conn.close()


class _Counters:
    """A read-through view of the counters for the business rules."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.seen: dict[str, list[int] | None] = {}

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self.seen:
            row = self._conn.execute("SELECT v FROM counters WHERE key = ?", (key,)).fetchone()
            self.seen[key] = _decode(row[0]) if row else None
        value = self.seen[key]
        return default if value is None else value


def _handler(rules: sim.Rules, op: Op) -> Callable[[sqlite3.Connection, wire.WireRequest], Any]:
    rule = rules.rule(op)

    def handle(conn: sqlite3.Connection, call: wire.WireRequest) -> None:
        view = _Counters(conn)
        try:
            effect = rule(view, call.payload)  # type: ignore[arg-type]
        except sim.Refusal as exc:
            raise Refusal(str(exc)) from None
        for key, deltas in effect:
            row = view.get(key) or [0] * len(deltas)
            new = [a + d for a, d in zip(row, deltas, strict=True)]
            conn.execute(
                "INSERT INTO counters(key, v) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET v = excluded.v",
                (key, _encode(new).decode()),
            )
            view.seen[key] = new
        conn.execute(
            "INSERT INTO ledger(txid, branch, op, kind, effect) VALUES (?, ?, ?, ?, ?)",
            (call.txid, call.branch, call.op, sim.APPLIED, _encode(effect)),
        )

    return handle


# ---------------------------------------------------------------- faults


@dataclass(slots=True)
class Faults:
    """Fault settings shared by the four services; changed at run time."""

    fault_rate: float = 0.0
    latency_ms: float = 0.0
    hang_s: float = 1.0  # how long a "timeout" keeps the caller waiting
    seed: int = 1
    counts: Counter[str] = field(default_factory=Counter)
    rng: random.Random = field(default_factory=random.Random)

    def validate(self) -> None:
        FaultConfig(self.fault_rate, self.latency_ms)  # same rules as the in-process shop
        if not 0 < self.hang_s <= 600:
            raise ValueError(f"hang_s must be in (0, 600], got {self.hang_s}")


class FaultMiddleware:
    """Misbehaves in front of one service, as a real network and server would."""

    def __init__(self, app: ASGIApp, name: str, faults: Faults, secret: bytes) -> None:
        self.app = app
        self.name = name
        self.faults = faults
        self.secret = secret
        self.down_until = 0.0
        self.requests = 0  # HTTP requests received (GET /admin/usage)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        f = self.faults
        if scope["type"] == "http":
            self.requests += 1
        if scope["type"] != "http" or (f.fault_rate == 0 and f.latency_ms == 0):
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self.down_until:
            f.counts["refused_while_down"] += 1
            await _plain(send, 503, f"{self.name} is down")
            return
        fault = None
        if f.rng.random() < f.fault_rate:
            fault = f.rng.choices(FAULT_KINDS, FAULT_MIX)[0]
            f.counts[fault] += 1
        if f.latency_ms > 0:
            await asyncio.sleep(f.latency_ms * math.exp(LATENCY_SIGMA * f.rng.gauss(0, 1)) / 1000)
        if fault == "down":
            self.down_until = loop.time() + 0.02 + 0.18 * f.rng.random()
            await _plain(send, 503, f"{self.name} is down")
        elif fault == "transient":
            await _plain(send, 503, "service unavailable")
        elif fault == "timeout_before":
            await asyncio.sleep(f.hang_s)
            await _plain(send, 504, "gave up")
        elif fault == "timeout_after":
            body = await _read_all(receive)
            await self.app(scope, _replay(body), _discard)
            await asyncio.sleep(f.hang_s)
            await _plain(send, 504, "gave up")
        elif fault == "duplicate":
            body = await _read_all(receive)
            # The same request delivered twice; re-signed, as replay protection
            # would (rightly) refuse a byte-identical copy.
            await self.app(_resigned(scope, body, self.secret), _replay(body), _discard)
            await self.app(scope, _replay(body), send)
        else:
            await self.app(scope, receive, send)


async def _read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _discard(message: Message) -> None:
    return None


def _resigned(scope: Scope, body: bytes, secret: bytes) -> Scope:
    # Sign the path exactly as the participant will read it back.
    fresh = wire.sign(secret, KEY_ID, "POST", wire.signed_path(scope), body)
    drop = {k.encode() for k in fresh}
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in drop]
    headers += [(k.encode(), v.encode()) for k, v in fresh.items()]
    return {**scope, "headers": headers}


async def _plain(send: Send, status: int, message: str) -> None:
    body = _encode({"error": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the app


class ShopApp(Starlette):
    """The shop's Starlette app, with the services' calls dispatched in front of it.

    A call to a service (``/{name}/...``) goes straight to that service's
    stack (fault middleware, then participant) with ``root_path`` set as
    Starlette's ``Mount`` sets it, skipping Starlette's middleware and router:
    these are the hot path, and each layer costs CPU on every call. Everything
    else (admin, health, lifespan, and any path the dispatch does not take)
    goes through Starlette, where the same services are also mounted.
    """

    def __init__(self, services: Mapping[str, ASGIApp], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.services = {f"/{name}": app for name, app in services.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            root_path: str = scope.get("root_path", "")
            start = len(root_path) if root_path and path.startswith(root_path) else 0
            cut = path.find("/", start + 1)
            if cut > 0 and path[start : start + 1] == "/":
                service = self.services.get(path[start:cut])
                if service is not None:
                    scope["app"] = self
                    scope["root_path"] = path[:cut]
                    await service(scope, receive, send)
                    return
        await super().__call__(scope, receive, send)


def build_app(
    directory: Path | None,
    secret: bytes,
    faults: Faults,
    *,
    pg: PgShop | None = None,
    retention_s: float = DEFAULT_MIN_RETENTION_S,
    cleanup_every_s: float = 3600.0,
) -> tuple[ShopApp, list[SQLiteBarrier]]:
    """The four services under /order, /inventory, /payment, /shipping, plus admin.

    With ``pg`` their state is in PostgreSQL (``directory`` is unused) and the
    returned list of SQLite barriers is empty. Every ``cleanup_every_s`` the
    barrier rows older than ``retention_s`` are deleted (the barriers refuse a
    retention shorter than their ``min_retention_s``; see
    ``accord.participant.retry_horizon_s``).
    """
    if not (
        isinstance(retention_s, int | float) and math.isfinite(retention_s) and retention_s > 0
    ):
        raise ValueError(
            f"the barrier retention must be a positive number of seconds, got {retention_s!r}"
        )
    if not cleanup_every_s > 0:
        raise ValueError(f"cleanup_every_s must be positive, got {cleanup_every_s!r}")
    faults.validate()
    faults.rng = random.Random(faults.seed)
    verifier = wire.Verifier({KEY_ID: secret})
    services: dict[str, FaultMiddleware] = {}
    barriers = []
    for name in SERVICES:
        if pg is not None:
            service = pg.participant(name, verifier)
            services[name] = FaultMiddleware(service, name, faults, secret)
            continue
        assert directory is not None, "give the services' directory or pg"
        # NORMAL: a commit survives the crash of the process (the scenario's
        # crashes), not of the machine; inline, and the calls of one loop turn
        # committed together: see SQLiteBarrier. One barrier per file in this
        # process, as group commit requires.
        barrier = SQLiteBarrier(
            directory / f"{name}.db",
            synchronous="NORMAL",
            max_workers=0,
            group_commit=True,
            min_retention_s=min(DEFAULT_MIN_RETENTION_S, retention_s),
        )
        barriers.append(barrier)
        rules = RULES[name]()
        participant: Participant[sqlite3.Connection] = Participant(
            barrier, verifier, handlers={op: _handler(rules, op) for op in Op}
        )
        services[name] = FaultMiddleware(participant, name, faults, secret)
    routes: list[Any] = [Mount(f"/{name}", app) for name, app in services.items()]

    def authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), b"Bearer " + secret.hex().encode())

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def set_faults(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        try:
            body = await request.json()
            updated = Faults(
                fault_rate=float(body.get("fault_rate", faults.fault_rate)),
                latency_ms=float(body.get("latency_ms", faults.latency_ms)),
                hang_s=float(body.get("hang_s", faults.hang_s)),
            )
            updated.validate()
        except (ValueError, TypeError, AttributeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=422)
        faults.fault_rate, faults.latency_ms, faults.hang_s = (
            updated.fault_rate, updated.latency_ms, updated.hang_s,
        )  # fmt: skip
        return JSONResponse(_fault_view(faults))

    async def get_faults(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return JSONResponse(_fault_view(faults))

    async def usage(request: Request) -> Response:
        # What serving cost this process so far: the demo reads it before and
        # after its run to report the services' CPU per transaction.
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        requests = {name: app.requests for name, app in services.items()}
        return JSONResponse({"cpu_s": time.process_time(), "requests": requests})

    async def state(request: Request) -> Response:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        if pg is not None:
            return JSONResponse(await pg.read_state())
        assert directory is not None
        return JSONResponse(await asyncio.to_thread(read_state, directory))

    routes += [
        Route("/healthz", healthz),
        Route("/admin/faults", set_faults, methods=["POST"]),
        Route("/admin/faults", get_faults, methods=["GET"]),
        Route("/admin/state", state),
        Route("/admin/usage", usage),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: ShopApp) -> AsyncIterator[None]:
        if pg is not None:
            await pg.open()  # the pool; missing schemas created, barriers migrated
        for barrier in barriers:
            await barrier.migrate()
        everyone: list[Any] = [*barriers, *(pg.barriers.values() if pg is not None else [])]
        cleaner = asyncio.create_task(_clean_periodically(everyone, retention_s, cleanup_every_s))
        try:
            yield
        finally:
            cleaner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cleaner
            for barrier in barriers:
                await barrier.close()
            if pg is not None:
                await pg.close()

    return ShopApp(services, routes=routes, lifespan=lifespan), barriers


async def _clean_periodically(barriers: list[Any], retention_s: float, every_s: float) -> None:
    """Delete barrier rows past their retention, forever (until cancelled)."""
    while True:
        await asyncio.sleep(every_s)
        for barrier in barriers:
            try:
                deleted = await barrier.cleanup(max(retention_s, barrier.min_retention_s))
            except Exception:  # the next round tries again
                log.exception("barrier cleanup failed")
                continue
            if deleted:
                log.info("barrier cleanup: %d rows older than %.0f s deleted", deleted, retention_s)


def _fault_view(faults: Faults) -> dict[str, Any]:
    return {
        "fault_rate": faults.fault_rate,
        "latency_ms": faults.latency_ms,
        "hang_s": faults.hang_s,
        "counts": dict(faults.counts),
    }


def read_state(directory: Path) -> dict[str, Any]:
    """Every service's initial state, counters and ledger, from its file."""
    out = {}
    for name in SERVICES:
        path = directory / f"{name}.db"
        initial, entries = ServiceStore(path).load()
        out[name] = {
            "initial": initial,
            "counters": read_counters(path),
            "ledger": [list(e) for e in entries],
        }
    return out
