"""The HTTP side of a participant: an ASGI app serving ``POST /{op}``.

Per request, in this order: route (a path that is not one segment below the
mount point: 404; a method other than POST: 405; unknown or unregistered op:
404), body read up to ``wire.MAX_BODY_BYTES`` (413; a malformed
``content-length``: 400), signature (401, nothing changes), body decoded
(400), URL op equals body op (400), then the handler through the barrier: ok
200 ``{"result": ...}``, refused 409 and rejected 422 ``{"error": ...}``, any
other exception 500 (after the barrier rolled back). Every answer is JSON.

The app speaks ASGI directly (no framework in between): it is called once
per request, so each layer of routing and middleware it skips is CPU saved
on every call. It serves on its own (``uvicorn.run(participant)``) or
mounted under a prefix (Starlette's ``Mount`` sets ``root_path``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Generic, TypeVar

import msgspec

from accord import wire
from accord.core.machine import Outcome
from accord.core.spec import Op
from accord.participant._barrier import Barrier, BarrierResult, check_key

TxT = TypeVar("TxT")
H = TypeVar("H", bound=Callable[..., Any])

Handler = Callable[[TxT, wire.WireRequest], Any]
"""``handler(tx, request)``: the open local transaction and the decoded call."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_log = logging.getLogger("accord.participant")
_encode = msgspec.json.Encoder().encode
_OPS = {op.value: op for op in Op}
_STATUS = {Outcome.OK: 200, Outcome.REFUSED: 409, Outcome.REJECTED: 422}
_CONTENT_TYPE = (b"content-type", b"application/json")
_ALLOW = (b"allow", b"POST")
_CONTENT_LENGTH = b"content-length"
_SIGNATURE_HEADERS = frozenset(
    h.encode() for h in (wire.KEY_ID, wire.TIMESTAMP, wire.NONCE, wire.SIGNATURE)
)


class _Reply(Exception):
    """An answer decided before the handler ran (a 4xx); raised to skip the rest."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
    ``raw_path``, prefix included, query excluded).
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            status, body, allow = await self._answer(scope, receive)
            if status == 0:
                return  # the client went away before its body arrived
            headers = [(_CONTENT_LENGTH, b"%d" % len(body)), _CONTENT_TYPE]
            if allow:
                headers.append(_ALLOW)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif kind == "lifespan":
            await _lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

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

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[int, bytes, bool]:
        """(status, JSON body, whether to add ``Allow: POST``); status 0: no answer."""
        path_op = _route(scope)
        if path_op is None:
            return 404, _encode({"error": "Not Found"}), False
        if scope["method"] != "POST":
            return 405, _encode({"error": "Method Not Allowed"}), True
        op = _OPS.get(path_op)
        handler = None if op is None else self._handlers.get(op)
        if handler is None:
            return 404, _error(f"no handler for operation {path_op!r}"), False
        try:
            headers, body = await _read(scope, receive)
            if body is None:
                return 0, b"", False
            try:
                # The full path as the client put it on the request line (percent-encoded,
                # prefix included): that is what the HTTP transport signs. The
                # ASGI path is decoded, so it differs for e.g. /caf%C3%A9/try.
                self.verifier.verify("POST", wire.signed_path(scope), headers, body)
            except wire.SignatureError as exc:
                raise _Reply(401, f"signature rejected: {exc}") from None
            except wire.ReplayMemoryFull as exc:
                raise _Reply(503, f"too busy to check for replays: {exc}") from None
            try:
                call = wire.decode_request(body)
                check_key(call.txid, call.branch, call.op)
            except ValueError as exc:
                raise _Reply(400, str(exc)) from None
            if call.op != path_op:
                raise _Reply(400, f"the body's op {call.op!r} does not match the URL's {path_op!r}")
        except _Reply as reply:
            return reply.status, _error(reply.message), False

        try:
            result = await self.barrier.run(
                call.txid, call.branch, call.op, lambda tx: handler(tx, call)
            )
        except Exception as exc:  # noqa: BLE001 - any handler failure is a transient 500
            _log.exception(
                "participant %s handler failed: txid=%s branch=%s", call.op, call.txid, call.branch
            )
            message = f"transient error in the {call.op} handler: {type(exc).__name__}"
            return 500, _error(message), False
        return _reply(result)


def _error(message: str) -> bytes:
    return _encode({"error": message})


def _route(scope: Scope) -> str | None:
    """The op segment of the path below the mount point, or None if the path
    is not exactly one segment (as Starlette's ``Mount`` + ``Route("/{op}")``
    matched it: ``root_path`` is the mount point, ``path`` the full path)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    cut = len(root_path)
    if cut and path.startswith(root_path) and path[cut : cut + 1] == "/":
        path = path[cut:]
    if len(path) < 2 or path[0] != "/" or "/" in path[1:]:
        return None
    return path[1:]


def _reply(result: BarrierResult) -> tuple[int, bytes, bool]:
    status = _STATUS[result.outcome]
    if status == 200:
        return 200, _encode({"result": result.result}), False
    return status, _error(result.error), False


async def _read(scope: Scope, receive: Receive) -> tuple[dict[str, str], bytes | None]:
    """The signature headers and the body (None: the client disconnected);
    raises _Reply for a body that is too large or badly framed."""
    headers: dict[str, str] = {}
    declared: bytes | None = None
    for name, value in scope["headers"]:
        if name in _SIGNATURE_HEADERS:
            # The first of repeated headers counts, as with Starlette's Headers.get.
            headers.setdefault(name.decode("latin-1"), value.decode("latin-1"))
        elif name == _CONTENT_LENGTH and declared is None:
            declared = value
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise _Reply(400, f"malformed content-length {declared.decode('latin-1')!r}") from None
        if size > wire.MAX_BODY_BYTES:
            raise _Reply(413, f"body is {size} bytes, the limit is {wire.MAX_BODY_BYTES}")
    message = await receive()
    if message["type"] != "http.request":
        return headers, None
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > wire.MAX_BODY_BYTES:
            raise _Reply(413, f"body exceeds the limit of {wire.MAX_BODY_BYTES} bytes")
        return headers, body
    buffer = bytearray(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            return headers, None
        buffer += message.get("body", b"")
        if len(buffer) > wire.MAX_BODY_BYTES:
            raise _Reply(413, f"body exceeds the limit of {wire.MAX_BODY_BYTES} bytes")
    return headers, bytes(buffer)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Serving on its own: nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
