"""The REST API's handlers: submit, inspect and operate transactions.

Every handler either answers with one of the types of
:mod:`accord.server.schema` or raises :class:`ErrorResponse`, which becomes a
JSON ``{"error", "code", "field", "limit"}`` with its status. Requests are
checked in full (size, JSON, types, limits, allow-list, the spec's own
rules) before anything reaches the coordinator, so a refused request
changes nothing.

A submit is acknowledged (202) only once its ``Begin`` record is durable:
whatever happens to the process afterwards, the transaction is in the log
and the next start drives it to its end.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from accord.coordinator import Coordinator, TxnResult
from accord.core import machine
from accord.core.records import Attempted, BranchSummary, OperatorAction, TxnSnapshot, TxnStatus
from accord.core.spec import MAX_ID_LENGTH, TransactionSpec
from accord.errors import (
    AccordError,
    CoordinatorClosed,
    DuplicateTransaction,
    InvalidTransaction,
    Overloaded,
    StoreError,
    TransactionNotFound,
)
from accord.server import schema
from accord.server.history import HistoryObserver
from accord.server.limits import AllowList, Limits, json_depth_exceeds

log = logging.getLogger("accord.server")

_encode = msgspec.json.Encoder().encode
_spec_encode = msgspec.json.Encoder().encode
_AT = re.compile(r" - at `\$\.?(.*)`$")
# A body's payload sits this deep: body (1), branches (2), a branch (3).
_PAYLOAD_DEPTH = 3
# How long GET /v1/stats reuses the log's counts by status (a scan of the log).
STATS_MAX_AGE_S = 2.0
_ID_RE = re.compile(schema.ID_PATTERN)


class ErrorResponse(Exception):
    """An answer other than success: status, code and a message that names
    the field or the limit at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        limit: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.limit = limit
        self.retry_after_s = retry_after_s

    def response(self) -> Response:
        body = schema.ErrorOut(self.message, self.code, self.field, self.limit)
        headers = {"retry-after": str(self.retry_after_s)} if self.retry_after_s else None
        return _json(self.status, body, headers)


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(_encode(body), status, headers, media_type="application/json")


def _unavailable(message: str) -> ErrorResponse:
    return ErrorResponse(503, "unavailable", message, retry_after_s=1)


def _overloaded(max_in_flight: int) -> ErrorResponse:
    return ErrorResponse(
        503,
        "overloaded",
        f"{max_in_flight} transactions in flight (max_in_flight); retry later with the same id",
        limit="max_in_flight",
        retry_after_s=1,
    )


@dataclass(slots=True)
class ServerState:
    """What readyz reports; set by the app's lifespan."""

    recovering: bool = True
    draining: bool = False
    stopped: bool = False
    recovery_error: str = ""


class Api:
    def __init__(
        self,
        coordinator: Coordinator,
        history: HistoryObserver,
        limits: Limits,
        allow: AllowList | None,
    ) -> None:
        self.coordinator = coordinator
        self.store = coordinator.store
        self.history = history
        self.limits = limits
        self.allow = allow
        self.state = ServerState()
        # Resolved when draining starts: every bounded wait returns at once.
        self._drain: asyncio.Future[None] | None = None
        # id -> resolved once that id's submit is admitted (see _admit_keyed)
        self._admitting: dict[str, asyncio.Future[None]] = {}
        # The log's counts by status: a scan of the log, so one at a time and
        # reused for STATS_MAX_AGE_S (a dashboard polls every second).
        self._counts: tuple[float, dict[TxnStatus, int]] | None = None
        self._counting: asyncio.Future[dict[TxnStatus, int]] | None = None

    # ------------------------------------------------------------ lifecycle hooks

    def reset(self) -> None:
        """A (re)start: recovering, not draining."""
        self.state = ServerState()
        self._drain = None

    def start_draining(self) -> None:
        self.state.draining = True
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _drain_future(self) -> asyncio.Future[None]:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()
            if self.state.draining:
                self._drain.set_result(None)
        return self._drain

    # ------------------------------------------------------------ health

    async def healthz(self, request: Request) -> Response:
        return _json(200, schema.HealthOut("ok"))

    async def readyz(self, request: Request) -> Response:
        s = self.state
        if s.stopped:
            return _json(503, schema.HealthOut("stopped"))
        if s.draining:
            return _json(503, schema.HealthOut("draining", "shutting down"))
        if s.recovering:
            return _json(503, schema.HealthOut("recovering", s.recovery_error))
        return _json(
            200, schema.HealthOut("ready", f"{self.coordinator.in_flight} transactions in flight")
        )

    # ------------------------------------------------------------ submit

    async def submit(self, request: Request) -> Response:
        body = _decode(await self._body(request), schema.SubmitIn)
        key = request.headers.get("idempotency-key")
        if key is not None:
            if not _ID_RE.fullmatch(key) or len(key) > MAX_ID_LENGTH:
                raise ErrorResponse(
                    422,
                    "invalid",
                    f"Idempotency-Key: must be 1-{MAX_ID_LENGTH} characters of letters,"
                    " digits and '._:@-', starting with a letter or digit",
                    field="Idempotency-Key",
                )
            if body.id is not None and body.id != key:
                raise ErrorResponse(
                    422,
                    "invalid",
                    "id: the body's id and the Idempotency-Key header differ",
                    field="id",
                )
            body.id = key
        self._check_limits(body)
        spec = _spec(body)
        wait, wait_s = self._wait_params(request)
        if self.state.draining or self.state.stopped:
            raise _unavailable("the coordinator is shutting down")
        if body.id is None:  # a fresh id: nobody else can be submitting it
            fut = await self._admit(spec)
            await self._durable()
        else:
            admitted = await self._admit_keyed(spec)
            if isinstance(admitted, Response):
                return admitted
            fut = admitted
        if fut.done() and not fut.cancelled() and fut.exception() is not None:
            _raise_for(fut.exception(), spec.id)
        if wait:
            await self._wait(fut, wait_s)
        if fut.done():
            if fut.cancelled() or fut.exception() is not None:
                _raise_for(fut.exception() if not fut.cancelled() else None, spec.id)
            return _json(200, await self._terminal_out(fut.result()), _location(spec.id))
        return _json(202, self._pending_out(spec), _location(spec.id))

    async def _terminal_out(self, result: TxnResult) -> schema.SubmitOut:
        """A terminal transaction's answer, read from the log: the same body a
        later submit with the same key reads (see _admit_keyed), so that every
        replay of a key answers alike."""
        await self._durable()  # the end may not be durable yet (a TCC commit's)
        snap = await self._get(result.txid)
        if snap is not None and snap.status.terminal:
            return _submit_out(result.txid, snap)
        # Not in the log as ended (the store refused the record): the result,
        # with the decision the log holds.
        decision = snap.decision if snap is not None else None
        return schema.SubmitOut(
            result.txid,
            result.status.value,
            _decision(decision.value if decision else None),
            result.reason,
            _path(result.txid),
            _summaries(result.branches),
        )

    async def _admit_keyed(self, spec: TransactionSpec) -> asyncio.Future[TxnResult] | Response:
        """Admit a client-keyed spec: the known transaction's answer if the log
        has it, else a new one, durable. Submits of one id are admitted one at
        a time: the next one reads the log only once the previous one's
        ``Begin`` is durable, so it sees that transaction (or its conflict)
        rather than racing it."""
        txid = spec.id
        while (previous := self._admitting.get(txid)) is not None:
            await asyncio.wait((previous,))  # not cancelled if this request is
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._admitting[txid] = mine
        try:
            known = await self._get(txid)
            if known is not None:
                if _spec_encode(known.spec.to_dict()) != _spec_encode(spec.to_dict()):
                    raise _conflict(txid)
                if known.status.terminal:
                    return _json(200, _submit_out(txid, known), _location(txid))
            fut = await self._admit(spec)
            await self._durable()
            return fut
        finally:
            del self._admitting[txid]
            mine.set_result(None)

    async def _admit(self, spec: TransactionSpec) -> asyncio.Future[TxnResult]:
        coordinator = self.coordinator
        try:
            try:
                return await coordinator.submit(spec, wait=False)
            except Overloaded:
                if self.limits.admission_wait_s <= 0:
                    raise
            # Full: wait briefly for a slot (bounded in time; the waiters are
            # bounded by the server's connection limit).
            try:
                return await asyncio.wait_for(
                    coordinator.submit(spec), self.limits.admission_wait_s
                )
            except TimeoutError:
                raise Overloaded("in-flight limit reached", txid=spec.id) from None
        except Overloaded:
            raise _overloaded(coordinator.max_in_flight) from None
        except DuplicateTransaction:
            raise _conflict(spec.id) from None
        except CoordinatorClosed:
            raise _unavailable("the coordinator is not running") from None

    async def _durable(self) -> None:
        try:
            await self.store.flush()
        except StoreError as exc:
            raise _unavailable(f"the log is unavailable: {exc}") from None

    def _pending_out(self, spec: TransactionSpec) -> schema.SubmitOut:
        state = self.coordinator.live(spec.id)
        if state is None:
            return schema.SubmitOut(spec.id, "preparing", None, "", _path(spec.id))
        decision = _decision(state.decision.value if state.decision else None)
        return schema.SubmitOut(
            spec.id,
            state.status.value,
            decision,
            state.reason,
            _path(spec.id),
        )

    async def _wait(self, fut: asyncio.Future[Any], wait_s: float) -> None:
        if fut.done():
            return
        await asyncio.wait(
            (fut, self._drain_future()), timeout=wait_s, return_when="FIRST_COMPLETED"
        )

    def _wait_params(self, request: Request) -> tuple[bool, float]:
        q = request.query_params
        _only(q, _WAIT_PARAMS)
        raw = q.get("wait")
        if raw is None:
            wait = False
        elif raw.lower() in ("true", "1"):
            wait = True
        elif raw.lower() in ("false", "0"):
            wait = False
        else:
            raise ErrorResponse(400, "bad_request", "wait: must be true or false", field="wait")
        wait_s = self.limits.max_wait_s
        if "wait_s" in q:
            try:
                wait_s = float(q["wait_s"])
            except ValueError:
                wait_s = math.nan
            if not 0 < wait_s <= self.limits.max_wait_s:  # also false for NaN
                raise ErrorResponse(
                    400,
                    "bad_request",
                    f"wait_s: must be a number in (0, {self.limits.max_wait_s:g}] (max_wait_s)",
                    field="wait_s",
                    limit="max_wait_s",
                )
        return wait, wait_s

    def _check_limits(self, body: schema.SubmitIn) -> None:
        limits = self.limits
        if len(body.branches) > limits.max_branches:
            raise ErrorResponse(
                422,
                "limit",
                f"branches: {len(body.branches)} branches, over the limit of"
                f" {limits.max_branches} (max_branches)",
                field="branches",
                limit="max_branches",
            )
        for i, branch in enumerate(body.branches):
            where = f"branches[{i}]"
            if json_depth_exceeds(branch.payload, limits.max_json_depth - _PAYLOAD_DEPTH):
                raise ErrorResponse(
                    422,
                    "limit",
                    f"{where}.payload: the request nests deeper than"
                    f" {limits.max_json_depth} levels (max_json_depth)",
                    field=f"{where}.payload",
                    limit="max_json_depth",
                )
            try:
                size = len(_encode(branch.payload))
            except (TypeError, ValueError, OverflowError) as exc:  # pragma: no cover - JSON in
                raise ErrorResponse(422, "invalid", f"{where}.payload: {exc}") from None
            if size > limits.max_payload_bytes:
                raise ErrorResponse(
                    422,
                    "limit",
                    f"{where}.payload: {size} bytes encoded, over the limit of"
                    f" {limits.max_payload_bytes} (max_payload_bytes)",
                    field=f"{where}.payload",
                    limit="max_payload_bytes",
                )
            if self.allow is not None:
                why = self.allow.check(branch.participant)
                if why is not None:
                    raise ErrorResponse(
                        422,
                        "participant_not_allowed",
                        f"{where}.participant: {why}",
                        field=f"{where}.participant",
                        limit="allow_list",
                    )

    async def _body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        return b"".join(chunks)

    # ------------------------------------------------------------ reading

    async def _get(self, txid: str) -> TxnSnapshot | None:
        try:
            return await self.store.get(txid)
        except StoreError as exc:
            raise _unavailable(f"the log is unavailable: {exc}") from None

    async def get(self, request: Request) -> Response:
        _only(request.query_params, ())
        txid = request.path_params["id"]
        snap = await self._get(txid) if _ID_RE.fullmatch(txid) else None
        if snap is None:
            raise _not_found(txid)
        return _json(200, self._txn_out(snap))

    def _txn_out(self, snap: TxnSnapshot) -> schema.TxnOut:
        spec = snap.spec
        live = self.coordinator.live(spec.id)
        status, decision, reason = snap.status, snap.decision, snap.reason
        summaries: tuple[BranchSummary, ...] | None = snap.branches or None
        if live is not None:
            status, decision, reason = live.status, live.decision, live.reason
            summaries = machine.summaries(live)
        calls = self.history.calls(spec.id)
        failed = [r for r in snap.history if type(r) is Attempted]
        branches = []
        for i, b in enumerate(spec.branches):
            timeline = [
                schema.AttemptOut(
                    c.op, c.attempt, c.outcome, c.started_at_ms, c.latency_ms, c.error
                )
                for c in calls
                if c.branch == b.name
            ]
            seen = {(t.op, t.attempt) for t in timeline}
            for r in failed:
                if r.branch == i and (r.op.value, r.attempt) not in seen:
                    timeline.append(
                        schema.AttemptOut(
                            r.op.value, r.attempt, "transient", r.at_ms, None, r.error
                        )
                    )
            # Stable: calls started in the same millisecond keep the order seen.
            timeline.sort(key=lambda t: t.started_at_ms)
            if summaries is not None:
                s = summaries[i]
                st, op, attempts, error, result = s.status, s.op, s.attempts, s.error, s.result
            else:  # in the log, driven by nobody yet: what the log knows
                last = timeline[-1] if timeline else None
                st = "pending"
                op = last.op if last else None
                attempts = max((t.attempt for t in timeline), default=0)
                error, result = (last.error if last else ""), None
            if not error:  # the last error seen, even if a later call succeeded
                error = next((t.error for t in reversed(timeline) if t.error), "")
            branches.append(
                schema.BranchOut(b.name, b.participant, st, op, attempts, error, result, timeline)
            )
        actions = [
            schema.OperatorActionOut(r.action, r.reason, r.at_ms)
            for r in snap.history
            if type(r) is OperatorAction
        ]
        return schema.TxnOut(
            id=spec.id,
            protocol=spec.protocol.value,
            status=status.value,
            decision=decision.value if decision else None,
            reason=reason,
            created_at_ms=snap.created_at_ms,
            updated_at_ms=snap.updated_at_ms,
            deadline_at_ms=snap.deadline_at_ms,
            running=live is not None,
            spec=msgspec.convert(spec.to_dict(), schema.SpecOut),
            branches=branches,
            operator_actions=actions,
        )

    async def list(self, request: Request) -> Response:
        q = request.query_params
        _only(q, _LIST_PARAMS)
        status = None
        if "state" in q:
            try:
                status = TxnStatus(q["state"])
            except ValueError:
                raise ErrorResponse(
                    400,
                    "bad_request",
                    f"state: must be one of {', '.join(schema.STATUSES)}",
                    field="state",
                ) from None
        limit = _int_param(q.get("limit"), "limit", 100, 1, self.limits.max_list_limit)
        since = _int_param(q.get("since"), "since", 0, 0, 2**62)
        after = _from_cursor(q["cursor"]) if "cursor" in q else None
        try:
            # One more than asked: a next_cursor only when there is a next page.
            rows = await self.store.list(status, limit + 1, after, since_ms=since or None)
        except StoreError as exc:
            raise _unavailable(f"the log is unavailable: {exc}") from None
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            schema.TxnRowOut(
                r.id,
                r.protocol,
                r.status.value,
                _decision(r.decision),
                r.reason,
                r.branches,
                r.created_at_ms,
                r.updated_at_ms,
            )
            for r in rows
        ]
        cursor = _to_cursor(rows[-1].id) if more else None
        return _json(200, schema.TxnListOut(items, cursor))

    async def stats(self, request: Request) -> Response:
        _only(request.query_params, ())
        try:
            counts = await self._count_by_status()
        except StoreError as exc:
            raise _unavailable(f"the log is unavailable: {exc}") from None
        c = self.coordinator
        m = c.metrics
        return _json(
            200,
            schema.StatsOut(
                in_flight=c.in_flight,
                max_in_flight=c.max_in_flight,
                committed=m.committed,
                aborted=m.aborted,
                needs_attention=m.needs_attention,
                started=m.started,
                recovered=m.recovered,
                calls=m.calls,
                retries=m.retries,
                by_status={s.value: counts.get(s, 0) for s in TxnStatus},
                outcomes=dict(m.outcomes),
            ),
        )

    async def _count_by_status(self) -> dict[TxnStatus, int]:
        now = time.monotonic()
        if self._counts is not None and now - self._counts[0] < STATS_MAX_AGE_S:
            return self._counts[1]
        if self._counting is None:
            self._counting = asyncio.ensure_future(self.store.count_by_status())
        counting = self._counting
        try:
            counts = await asyncio.shield(counting)
        finally:
            if self._counting is counting and counting.done():
                self._counting = None
        self._counts = (time.monotonic(), counts)
        return counts

    # ------------------------------------------------------------ operator actions

    async def _action_input(self, request: Request) -> tuple[str, str, bool, float]:
        txid = request.path_params["id"]
        body = _decode(await self._body(request), schema.ActionIn)
        if len(body.reason) > self.limits.max_reason_chars:
            raise ErrorResponse(
                422,
                "limit",
                f"reason: {len(body.reason)} characters, over the limit of"
                f" {self.limits.max_reason_chars} (max_reason_chars)",
                field="reason",
                limit="max_reason_chars",
            )
        reason = body.reason.strip()
        if not reason:
            raise ErrorResponse(422, "invalid", "reason: must not be blank", field="reason")
        wait, wait_s = self._wait_params(request)
        if not _ID_RE.fullmatch(txid):
            raise _not_found(txid)
        if self.state.stopped:
            raise _unavailable("the coordinator is not running")
        return txid, reason, wait, wait_s

    async def retry(self, request: Request) -> Response:
        return await self._operate(request, "retry")

    async def abort(self, request: Request) -> Response:
        return await self._operate(request, "abort")

    async def resolve(self, request: Request) -> Response:
        return await self._operate(request, "resolve")

    async def _operate(self, request: Request, action: str) -> Response:
        """An operator action, every failure mapped to a clear answer: 404 for
        an unknown id, 409 when it does not apply to the transaction's state
        (or the state changed under it), 503 with Retry-After when the
        coordinator or its log cannot take it now."""
        txid, reason, wait, wait_s = await self._action_input(request)
        c = self.coordinator
        try:
            if action == "retry":
                done: asyncio.Future[TxnResult] | TxnStatus | None = await c.retry(txid, reason)
            elif action == "abort":
                done = await c.abort_any(txid, reason)
            else:
                done = await c.resolve(txid, reason)
        except TransactionNotFound:
            raise _not_found(txid) from None
        except CoordinatorClosed:
            raise _unavailable("the coordinator is not running") from None
        except Overloaded:
            raise _overloaded(c.max_in_flight) from None
        except StoreError as exc:
            raise _unavailable(f"the log is unavailable: {exc}") from None
        except AccordError as exc:  # the log read back disagrees: the state changed
            raise await self._not_applicable(txid, action, str(exc)) from None
        if done is None:
            raise await self._not_applicable(txid, action, _ACTION_RULES[action])
        if isinstance(done, TxnStatus):  # resolved: terminal at once, in the log
            snap = await self._get(txid)
            if snap is None:
                raise _unavailable(f"transaction {txid!r} was resolved but cannot be read back")
            return _json(200, _action_out(txid, action, snap.status, snap.decision, snap.reason))
        return await self._acted(txid, action, done, wait, wait_s)

    async def _acted(
        self, txid: str, action: str, fut: asyncio.Future[TxnResult], wait: bool, wait_s: float
    ) -> Response:
        # The operator's record is queued (or already durable): make it durable
        # before answering, so that the answer means "recorded".
        await self._durable()
        if wait:
            await self._wait(fut, wait_s)
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            r = fut.result()
            snap = await self._get(txid)
            decision = snap.decision if snap is not None else None
            return _json(200, _action_out(txid, action, r.status, decision, r.reason))
        live = self.coordinator.live(txid)
        if live is not None:
            out = _action_out(txid, action, live.status, live.decision, live.reason)
        else:
            snap = await self._get(txid)
            if snap is None:
                raise _not_found(txid)
            out = _action_out(txid, action, snap.status, snap.decision, snap.reason)
        return _json(202, out, _location(txid))

    async def _not_applicable(self, txid: str, action: str, rule: str) -> ErrorResponse:
        live = self.coordinator.live(txid)
        snap = None if live is not None else await self._get(txid)
        if live is None and snap is None:
            return _not_found(txid)
        status = live.status if live is not None else snap.status  # type: ignore[union-attr]
        decision = live.decision if live is not None else snap.decision  # type: ignore[union-attr]
        detail = f"{status.value}" + (f", decision {decision.value}" if decision else "")
        if live is None and snap is not None and not status.terminal:
            detail += ", not driven yet (recovery in progress)"
        message = f"{action}: {rule}; transaction {txid!r} is {detail}"
        return ErrorResponse(409, "not_applicable", message)


# ---------------------------------------------------------------- helpers

_ACTION_RULES = {
    "retry": "only a running or needs_attention transaction can be retried",
    "abort": "only a transaction without a decision can be aborted",
    "resolve": "only a needs_attention transaction can be resolved",
}
_WAIT_PARAMS = ("wait", "wait_s")
_LIST_PARAMS = ("state", "since", "limit", "cursor")


def _only(query: Any, allowed: tuple[str, ...]) -> None:
    """Refuse unknown query parameters: a misspelt ``wiat=true`` must not be ignored."""
    for name in query:
        if name not in allowed:
            shown = name if len(name) <= 40 else name[:40] + "..."
            known = ", ".join(allowed) or "none"
            raise ErrorResponse(
                400,
                "bad_request",
                f"unknown query parameter {shown!r} (known: {known})",
                field=shown,
            )


def _decode(raw: bytes, type_: type[Any]) -> Any:
    try:
        return msgspec.json.decode(raw, type=type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _AT.search(text)
        where = m.group(1) if m else None
        message = _AT.sub("", text)
        raise ErrorResponse(
            422, "invalid", f"{where or 'body'}: {message}", field=where or None
        ) from None
    except RecursionError:
        raise ErrorResponse(
            422, "limit", "body: nested too deep (max_json_depth)", limit="max_json_depth"
        ) from None
    except msgspec.DecodeError as exc:
        raise ErrorResponse(400, "bad_request", f"body: malformed JSON: {exc}") from None


def _spec(body: schema.SubmitIn) -> TransactionSpec:
    try:
        return TransactionSpec.from_dict(msgspec.to_builtins(body))
    except InvalidTransaction as exc:
        raise ErrorResponse(422, "invalid", str(exc), field=exc.field) from None


def _raise_for(exc: BaseException | None, txid: str) -> None:
    if isinstance(exc, DuplicateTransaction):
        raise _conflict(txid)
    if isinstance(exc, CoordinatorClosed | StoreError) or exc is None:
        raise _unavailable(
            "the coordinator stopped driving the transaction; it is in the log and will be resumed"
        )
    if isinstance(exc, AccordError):
        raise ErrorResponse(503, "unavailable", str(exc), retry_after_s=1)
    raise exc


def _conflict(txid: str) -> ErrorResponse:
    return ErrorResponse(
        409,
        "conflict",
        f"id: transaction {txid!r} already exists with a different body"
        " (the id is the idempotency key)",
        field="id",
    )


def _not_found(txid: str) -> ErrorResponse:
    shown = txid if len(txid) <= 130 else txid[:128] + "..."
    return ErrorResponse(404, "not_found", f"no transaction {shown!r}")


def _too_large(limit: int) -> ErrorResponse:
    return ErrorResponse(
        413,
        "too_large",
        f"body: over the limit of {limit} bytes (max_body_bytes)",
        limit="max_body_bytes",
    )


def _path(txid: str) -> str:
    return f"/v1/transactions/{txid}"


def _location(txid: str) -> dict[str, str]:
    return {"location": _path(txid)}


def _summaries(branches: tuple[BranchSummary, ...]) -> list[schema.BranchSummaryOut]:
    return [
        schema.BranchSummaryOut(b.name, b.status, b.op, b.attempts, b.error, b.result)
        for b in branches
    ]


def _submit_out(txid: str, snap: TxnSnapshot) -> schema.SubmitOut:
    return schema.SubmitOut(
        txid,
        snap.status.value,
        snap.decision.value if snap.decision else None,
        snap.reason,
        _path(txid),
        _summaries(snap.branches),
    )


def _action_out(
    txid: str, action: str, status: TxnStatus, decision: Any, reason: str
) -> schema.ActionOut:
    return schema.ActionOut(
        txid,
        action,
        status.value,
        decision.value if decision else None,
        reason,
        _path(txid),
    )


def _decision(name: str | None) -> schema.DecisionName | None:
    return cast("schema.DecisionName | None", name)


def _int_param(raw: str | None, name: str, default: int, low: int, high: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ErrorResponse(
            400, "bad_request", f"{name}: must be an integer in [{low}, {high}]", field=name
        )
    return value


def _to_cursor(txid: str) -> str:
    return base64.urlsafe_b64encode(txid.encode()).decode().rstrip("=")


def _from_cursor(cursor: str) -> str:
    try:
        txid = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError):
        txid = ""
    if not _ID_RE.fullmatch(txid) or len(txid) > 128:
        raise ErrorResponse(
            400, "bad_request", "cursor: not a next_cursor from this API", field="cursor"
        )
    return txid
