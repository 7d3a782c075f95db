"""The coordinator as an ASGI app: ``create_app(coordinator, config)``.

The app's lifespan owns the coordinator (unless told otherwise): at start
it opens the log and resumes every unfinished transaction in the
background (``/readyz`` answers 503 until that is done, while submits are
already taken; a failed recovery is retried with backoff); at shutdown it
stops taking submits, lets the transactions in flight finish for up to
``drain_timeout_s``, then closes the coordinator, which makes the log
durable. What is still unfinished then stays in the log and the next
start resumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from accord.coordinator import Coordinator, Observer
from accord.errors import CoordinatorClosed
from accord.server.api import Api, ErrorResponse
from accord.server.auth import BearerAuth, check_token
from accord.server.history import HistoryObserver
from accord.server.limits import AllowList, Limits
from accord.server.observers import FanOut
from accord.server.schema import ErrorOut, openapi_document

log = logging.getLogger("accord.server")

# A failed recovery is retried after this long, doubling up to the maximum.
RECOVERY_INITIAL_DELAY_S = 0.5
RECOVERY_MAX_DELAY_S = 30.0


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the API behaves. ``tokens`` are the accepted bearer tokens; with
    none, ``require_auth=False`` must say so explicitly. ``allow`` restricts
    the participant URLs a transaction may name (None: no restriction, for
    in-process participants reached by name)."""

    tokens: tuple[str, ...] = ()
    require_auth: bool = True
    allow: AllowList | None = None
    limits: Limits = field(default_factory=Limits)
    # The lifespan starts (with recovery) and closes the coordinator.
    manage_coordinator: bool = True
    drain_timeout_s: float = 10.0
    history_max_txns: int = 10_000

    def __post_init__(self) -> None:
        if self.require_auth and not self.tokens:
            raise ValueError("give at least one API token, or require_auth=False")
        for token in self.tokens:
            check_token(token)
        if not 0 <= self.drain_timeout_s <= 3600:
            raise ValueError("drain_timeout_s must be between 0 and 3600")


def _optional_routes(coordinator: Coordinator) -> tuple[list[BaseRoute], list[Observer]]:
    """The dashboard's and the metrics' routes, if those modules are installed."""
    routes: list[BaseRoute] = []
    observers: list[Observer] = []
    try:
        from accord.observability.metrics import MetricsObserver, metrics_route  # noqa: PLC0415
    except ImportError:
        pass
    else:
        metrics = MetricsObserver()
        observers.append(metrics)
        routes.append(metrics_route(coordinator, metrics))
    try:
        from accord.server.dashboard import dashboard_routes  # noqa: PLC0415
    except ImportError:
        pass
    else:
        routes.extend(dashboard_routes())
    return routes, observers


def create_app(
    coordinator: Coordinator,
    config: ServerConfig | None = None,
    *,
    observers: Sequence[Observer] = (),
    history: HistoryObserver | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    optional_routes: bool = True,
) -> Starlette:
    """The API over ``coordinator``.

    The coordinator's observer becomes a :class:`FanOut` of the call
    history (for ``GET /v1/transactions/{id}``), ``observers``, the metrics
    observer when ``accord.observability.metrics`` is importable, and any
    observer the coordinator already had. An observer of ``observers`` with a
    ``shutdown()`` method (e.g. tracing, which flushes its exporter) has it
    called when the app stops, after the log is closed. ``app.state.api``,
    ``app.state.history`` and ``app.state.coordinator`` give tests and
    embedders access to them."""
    config = config or ServerConfig()
    history = history or HistoryObserver(max_txns=config.history_max_txns)
    extra: list[BaseRoute] = list(extra_routes)
    chained: list[Observer] = [history, *observers]
    if optional_routes:
        routes_, observers_ = _optional_routes(coordinator)
        extra.extend(routes_)
        chained.extend(observers_)
    if coordinator.observer is not None:
        chained.append(coordinator.observer)
    coordinator.observer = FanOut(chained)
    api = Api(coordinator, history, config.limits, config.allow)
    document = msgspec.json.encode(openapi_document(config.limits))

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    def guarded(handler: Callable[[Request], Awaitable[Response]]) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ErrorResponse as exc:
                return exc.response()

        return endpoint

    routes: list[BaseRoute] = [
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/transactions", guarded(api.submit), methods=["POST"]),
        Route("/v1/transactions", guarded(api.list), methods=["GET"]),
        Route("/v1/transactions/{id}", guarded(api.get), methods=["GET"]),
        Route("/v1/transactions/{id}/retry", guarded(api.retry), methods=["POST"]),
        Route("/v1/transactions/{id}/abort", guarded(api.abort), methods=["POST"]),
        Route("/v1/transactions/{id}/resolve", guarded(api.resolve), methods=["POST"]),
        Route("/v1/stats", guarded(api.stats), methods=["GET"]),
        *extra,
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        recovery: asyncio.Task[None] | None = None
        api.reset()
        if config.manage_coordinator:
            await coordinator.start(recover=False)
            shards = getattr(coordinator.store, "cluster_shards", None)
            if shards is not None:
                await coordinator.close()
                raise RuntimeError(
                    f"the log is a cluster's ({shards} shards): its nodes write to it "
                    "(accord cluster node), not accord serve"
                )
            recovery = asyncio.ensure_future(_recover(coordinator, api))
        else:
            api.state.recovering = False
        try:
            yield
        finally:
            api.start_draining()
            if config.manage_coordinator:
                left = await _drain(coordinator, config.drain_timeout_s)
                if recovery is not None and not recovery.done():
                    recovery.cancel()
                    await asyncio.gather(recovery, return_exceptions=True)
                await coordinator.close()
                log.info("shutdown: log closed; %d unfinished transactions left in it", left)
            for observer in observers:
                shutdown = getattr(observer, "shutdown", None)
                if callable(shutdown):
                    await asyncio.to_thread(shutdown)
            api.state.stopped = True

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        body = msgspec.json.encode(ErrorOut(str(exc.detail), "http_error"))
        return Response(body, exc.status_code, exc.headers, media_type="application/json")

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        body = msgspec.json.encode(ErrorOut("internal error", "internal"))
        return Response(body, 500, media_type="application/json")

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    if config.require_auth:
        app.add_middleware(BearerAuth, tokens=config.tokens)
    app.state.api = api
    app.state.history = history
    app.state.coordinator = coordinator
    return app


async def _recover(coordinator: Coordinator, api: Api) -> None:
    """Resume every unfinished transaction of the log; then the server is ready.

    A failure (the log's database briefly down at start, say) is retried with
    capped exponential backoff until it succeeds or the app stops (which
    cancels this): unfinished transactions must not wait for a restart.
    Transactions resumed by an earlier attempt are not resumed twice."""
    delay_s = RECOVERY_INITIAL_DELAY_S
    attempt = 1
    while True:
        try:
            resumed = await coordinator.resume()
        except CoordinatorClosed:
            api.state.recovery_error = "recovery stopped: the coordinator is not running"
            return
        except Exception as exc:  # reported by readyz, logged, retried
            log.warning(
                "recovery failed (attempt %d), retrying in %.1f s: %s",
                attempt,
                delay_s,
                exc,
                exc_info=attempt == 1,  # the traceback once; then one line an attempt
            )
            api.state.recovery_error = (
                f"recovery failed (attempt {attempt}), retrying in {delay_s:g} s: {exc}"
            )
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RECOVERY_MAX_DELAY_S)
            attempt += 1
            continue
        break
    if resumed or attempt > 1:
        log.info("recovery: resumed %d transactions (attempt %d)", len(resumed), attempt)
    api.state.recovery_error = ""
    api.state.recovering = False


async def _drain(coordinator: Coordinator, timeout_s: float) -> int:
    """Wait (bounded) until no transaction is in flight; how many still are."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while coordinator.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if coordinator.in_flight:
        log.warning(
            "shutdown: %d transactions still in flight are left in the log for the next start",
            coordinator.in_flight,
        )
    return coordinator.in_flight
