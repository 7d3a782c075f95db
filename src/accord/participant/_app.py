"""The HTTP side of a participant: an ASGI app serving ``POST /{op}``.

Per request, in this order: route (unknown or unregistered op: 404), body
read up to ``wire.MAX_BODY_BYTES`` (413), signature (401, nothing changes),
body decoded (400), URL op equals body op (400), then the handler through the
barrier: ok 200 ``{"result": ...}``, refused 409 and rejected 422
``{"error": ...}``, any other exception 500 (after the barrier rolled back).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from accord import wire
from accord.core.machine import Outcome
from accord.core.spec import Op
from accord.participant._barrier import Barrier, BarrierResult, check_key

TxT = TypeVar("TxT")
H = TypeVar("H", bound=Callable[..., Any])

Handler = Callable[[TxT, wire.WireRequest], Any]
"""``handler(tx, request)``: the open local transaction and the decoded call."""

_log = logging.getLogger("accord.participant")
_encode = msgspec.json.Encoder().encode
_OPS = {op.value: op for op in Op}
_STATUS = {Outcome.OK: 200, Outcome.REFUSED: 409, Outcome.REJECTED: 422}


def _json(status: int, body: Any) -> Response:
    return Response(_encode(body), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


class Participant(Generic[TxT]):
    """A participant service: register handlers, serve them as an ASGI app.

    ::

        barrier = SQLiteBarrier("inventory.db")
        inventory = Participant(barrier, wire.Verifier({"k1": secret}))

        @inventory.try_
        def reserve(conn: sqlite3.Connection, call: wire.WireRequest) -> dict:
            ...  # update the stock through conn; raise Refusal when short

        app = Starlette(routes=[Mount("/inventory", inventory)])

    The participant itself is the ASGI app, mountable under any prefix: the
    signature covers the full path exactly as the client sent it (the ASGI
    ``raw_path``, prefix included).
    Handlers run at most once per ``(txid, branch, op)``, in the barrier's
    transaction (see :class:`~accord.participant.Barrier`).
    """

    def __init__(
        self,
        barrier: Barrier[TxT],
        verifier: wire.Verifier,
        *,
        handlers: Mapping[Op | str, Handler[TxT]] | None = None,
    ) -> None:
        self.barrier = barrier
        self.verifier = verifier
        self._handlers: dict[Op, Handler[TxT]] = {}
        for op, fn in (handlers or {}).items():
            self.register(op, fn)
        self._app = Starlette(
            routes=[Route("/{op}", self._endpoint, methods=["POST"])],
            exception_handlers={HTTPException: self._http_error},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)

    def register(self, op: Op | str, handler: Handler[TxT]) -> None:
        """Serve ``op`` with ``handler``; one handler per operation."""
        try:
            checked = Op(op)
        except ValueError:
            raise ValueError(f"unknown operation {op!r}") from None
        if checked in self._handlers:
            raise ValueError(f"a handler for {checked} is already registered")
        if inspect.iscoroutinefunction(handler) and not self.barrier.async_handlers:
            raise TypeError(f"this barrier runs plain functions; the {checked} handler is async")
        self._handlers[checked] = handler

    def _decorator(self, op: Op) -> Callable[[H], H]:
        def register(fn: H) -> H:
            self.register(op, fn)
            return fn

        return register

    def try_(self, fn: H) -> H:
        """Register the TCC try handler."""
        return self._decorator(Op.TRY)(fn)

    def confirm(self, fn: H) -> H:
        """Register the TCC confirm handler."""
        return self._decorator(Op.CONFIRM)(fn)

    def cancel(self, fn: H) -> H:
        """Register the TCC cancel handler."""
        return self._decorator(Op.CANCEL)(fn)

    def action(self, fn: H) -> H:
        """Register the saga forward action handler."""
        return self._decorator(Op.ACTION)(fn)

    def compensate(self, fn: H) -> H:
        """Register the saga compensation handler."""
        return self._decorator(Op.COMPENSATE)(fn)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):  # pragma: no cover - registered for it only
            raise exc
        return _error(exc.status_code, exc.detail)

    async def _endpoint(self, request: Request) -> Response:
        path_op = request.path_params["op"]
        op = _OPS.get(path_op)
        handler = None if op is None else self._handlers.get(op)
        if handler is None:
            return _error(404, f"no handler for operation {path_op!r}")

        body = await _read_body(request)
        if isinstance(body, Response):
            return body
        try:
            self.verifier.verify("POST", _signed_path(request), request.headers, body)
        except wire.SignatureError as exc:
            return _error(401, f"signature rejected: {exc}")
        except wire.ReplayMemoryFull as exc:
            return _error(503, f"too busy to check for replays: {exc}")
        try:
            call = wire.decode_request(body)
            check_key(call.txid, call.branch, call.op)
        except ValueError as exc:
            return _error(400, str(exc))
        if call.op != path_op:
            return _error(400, f"the body's op {call.op!r} does not match the URL's {path_op!r}")

        try:
            result = await self.barrier.run(
                call.txid, call.branch, call.op, lambda tx: handler(tx, call)
            )
        except Exception as exc:  # noqa: BLE001 - any handler failure is a transient 500
            _log.exception(
                "participant %s handler failed: txid=%s branch=%s", call.op, call.txid, call.branch
            )
            return _error(500, f"transient error in the {call.op} handler: {type(exc).__name__}")
        return _reply(result)


def _signed_path(request: Request) -> str:
    """The full path as the client put it on the request line: percent-encoded,
    prefix included, query excluded. That is what the HTTP transport signs;
    ``request.url.path`` is percent-decoded, so it differs for paths such as
    ``/caf%C3%A9/try``. Falls back to it for servers that omit ``raw_path``."""
    return wire.signed_path(request.scope, request.url.path)


def _reply(result: BarrierResult) -> Response:
    status = _STATUS[result.outcome]
    if status == 200:
        return _json(200, {"result": result.result})
    return _error(status, result.error)


async def _read_body(request: Request) -> bytes | Response:
    """The body, or the 4xx response for one that is too large or badly framed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            return _error(400, f"malformed content-length {declared!r}")
        if size > wire.MAX_BODY_BYTES:
            return _error(413, f"body is {size} bytes, the limit is {wire.MAX_BODY_BYTES}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > wire.MAX_BODY_BYTES:
            return _error(413, f"body exceeds the limit of {wire.MAX_BODY_BYTES} bytes")
    return bytes(body)
