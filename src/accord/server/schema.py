"""The API's request and response types, and the OpenAPI document built from them.

The types are msgspec ``Struct``s: requests are decoded and validated by
them, responses encoded from them, and :func:`openapi_document` takes their
JSON Schema from ``msgspec.json.schema_components``; only the paths are
written here. What a transaction spec requires beyond its types (unique
branch names, retry interval order, payload size) is checked by
:class:`accord.core.spec.TransactionSpec` itself.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from accord.core.records import TxnStatus
from accord.core.spec import MAX_ATTEMPTS, MAX_DEADLINE_S, MAX_ID_LENGTH, MAX_TIMEOUT_S
from accord.server.limits import Limits

ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
NAME_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]*$"

TxnId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        pattern=ID_PATTERN,
        description="Transaction id, also the idempotency key.",
    ),
]
Status = Literal[
    "preparing", "committing", "aborting", "committed", "aborted", "needs_attention"
]  # fmt: skip
STATUSES: tuple[str, ...] = tuple(s.value for s in TxnStatus)
DecisionName = Literal["commit", "abort"]


# ---------------------------------------------------------------- requests


class RetryIn(Struct, forbid_unknown_fields=True):
    """Retry policy of a branch: capped exponential backoff with jitter."""

    initial_interval_s: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)] = 0.05
    backoff_coefficient: Annotated[float, Meta(ge=1, le=100)] = 2.0
    maximum_interval_s: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)] = 2.0
    maximum_attempts: Annotated[int, Meta(ge=1, le=MAX_ATTEMPTS)] = 10
    jitter: bool = True


class BranchIn(Struct, forbid_unknown_fields=True):
    """One participant's part of the transaction."""

    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=NAME_PATTERN)]
    participant: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=2048,
            description="Base URL of the participant; calls go to {participant}/{op}.",
        ),
    ]
    payload: Any = field(default_factory=dict)
    retry: RetryIn | None = None
    timeout_s: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)] = 5.0


class SubmitIn(Struct, forbid_unknown_fields=True):
    """A global transaction to run."""

    protocol: Literal["tcc", "saga"]
    branches: Annotated[list[BranchIn], Meta(min_length=1)]
    id: TxnId | None = None
    timeout_s: Annotated[
        float,
        Meta(gt=0, le=MAX_DEADLINE_S, description="Deadline of the prepare phase, in seconds."),
    ] = 30.0
    sequential: bool = False


class ActionIn(Struct, forbid_unknown_fields=True):
    """An operator's action: the reason is recorded in the log."""

    # Its maximum length is the server's Limits.max_reason_chars: checked by
    # the handler, stated by openapi_document.
    reason: Annotated[str, Meta(min_length=1)]


# ---------------------------------------------------------------- responses


class ErrorOut(Struct):
    error: str
    code: str
    field: str | None = None
    limit: str | None = None


class BranchSummaryOut(Struct):
    name: str
    status: str
    op: str | None
    attempts: int
    error: str
    result: Any = None


class SubmitOut(Struct):
    id: str
    status: Status
    decision: DecisionName | None
    reason: str
    location: str
    branches: list[BranchSummaryOut] = []


class AttemptOut(Struct):
    op: str
    attempt: int
    outcome: str
    started_at_ms: int
    latency_ms: float | None
    error: str


class BranchOut(Struct):
    name: str
    participant: str
    status: str
    op: str | None
    attempts: int
    error: str
    result: Any
    timeline: list[AttemptOut]


class OperatorActionOut(Struct):
    action: str
    reason: str
    at_ms: int


class SpecOut(Struct):
    id: str
    protocol: str
    timeout_s: float
    sequential: bool
    branches: list[BranchIn]


class TxnOut(Struct):
    id: str
    protocol: str
    status: Status
    decision: DecisionName | None
    reason: str
    created_at_ms: int
    updated_at_ms: int
    deadline_at_ms: int
    running: bool
    spec: SpecOut
    branches: list[BranchOut]
    operator_actions: list[OperatorActionOut]


class TxnRowOut(Struct):
    id: str
    protocol: str
    status: Status
    decision: DecisionName | None
    reason: str
    branches: int
    created_at_ms: int
    updated_at_ms: int


class TxnListOut(Struct):
    items: list[TxnRowOut]
    next_cursor: str | None


class StatsOut(Struct):
    in_flight: int
    max_in_flight: int
    committed: int
    aborted: int
    needs_attention: int
    started: int
    recovered: int
    calls: int
    retries: int
    by_status: dict[str, int]
    outcomes: dict[str, int]


class ActionOut(Struct):
    id: str
    action: str
    status: Status
    decision: DecisionName | None
    reason: str
    location: str


class HealthOut(Struct):
    status: str
    detail: str = ""


_TYPES: list[Any] = [
    SubmitIn, ActionIn, ErrorOut, SubmitOut, TxnOut, TxnListOut, StatsOut, ActionOut, HealthOut,
]  # fmt: skip
_REF = "#/components/schemas/{name}"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(name=name)}


def _json(name: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(name)}},
    }
    if headers:
        out["headers"] = headers
    return out


_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."}}
_LOCATION = {"Location": {"schema": {"type": "string"}, "description": "The transaction's URL."}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed request (JSON, query parameter, cursor)",
        401: "No or wrong bearer token",
        404: "No such transaction",
        409: "Conflict: the id is taken by a different transaction, or the action does not apply",
        413: "The request body is over max_body_bytes",
        422: "The request is well-formed but not acceptable; the message names the field",
        503: "Overloaded, shutting down, or the log is unavailable: retry later",
    }
    out: dict[str, Any] = {}
    for code in codes:
        out[str(code)] = _json("ErrorOut", text[code], _RETRY_AFTER if code == 503 else None)
    return out


def _wait_params(limits: Limits) -> list[dict[str, Any]]:
    return [
        {
            "name": "wait",
            "in": "query",
            "required": False,
            "schema": {"type": "boolean", "default": False},
            "description": "Answer once the transaction is terminal (200), or after wait_s (202).",
        },
        {
            "name": "wait_s",
            "in": "query",
            "required": False,
            "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": limits.max_wait_s},
            "description": f"How long to wait, at most {limits.max_wait_s:g} s (the default).",
        },
    ]


def _id_param() -> dict[str, Any]:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
    }


def _action(name: str, summary: str, limits: Limits) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{name}Transaction",
            "summary": summary,
            "parameters": [_id_param(), *_wait_params(limits)],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("ActionIn")}},
            },
            "responses": {
                "200": _json("ActionOut", "Done: the transaction is terminal"),
                "202": _json("ActionOut", "Accepted and recorded in the log", _LOCATION),
                **_errors(400, 401, 404, 409, 413, 422, 503),
            },
        }
    }


def openapi_document(limits: Limits) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API, its schemas generated from the types."""
    _, components = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    # The server's own limit, which may be lower than what a spec allows.
    components["SubmitIn"]["properties"]["branches"]["maxItems"] = limits.max_branches
    components["ActionIn"]["properties"]["reason"]["maxLength"] = limits.max_reason_chars
    open_: list[dict[str, Any]] = [{}]  # no authentication
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "accord coordinator API",
            "version": "1",
            "description": "Submit, inspect and operate global transactions (TCC and saga)."
            " See docs/api.md.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/transactions": {
                "post": {
                    "operationId": "submitTransaction",
                    "summary": "Submit a transaction (idempotent by id)",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": MAX_ID_LENGTH,
                                "pattern": ID_PATTERN,
                            },
                            "description": "The transaction id (or give `id` in the body).",
                        },
                        *_wait_params(limits),
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("SubmitIn")}},
                    },
                    "responses": {
                        "200": _json("SubmitOut", "The transaction is terminal", _LOCATION),
                        "202": _json("SubmitOut", "Accepted: durable in the log", _LOCATION),
                        **_errors(400, 401, 409, 413, 422, 503),
                    },
                },
                "get": {
                    "operationId": "listTransactions",
                    "summary": "List transactions in id order, a page at a time",
                    "parameters": [
                        {
                            "name": "state",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": list(STATUSES)},
                        },
                        {
                            "name": "since",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0},
                            "description": "Only transactions created at or after this Unix ms.",
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": limits.max_list_limit,
                                "default": 100,
                            },
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string"},
                            "description": "next_cursor of the previous page.",
                        },
                    ],
                    "responses": {
                        "200": _json("TxnListOut", "A page of transactions"),
                        **_errors(400, 401, 503),
                    },
                },
            },
            "/v1/transactions/{id}": {
                "get": {
                    "operationId": "getTransaction",
                    "summary": "A transaction: status, decision, branches and their attempts",
                    "parameters": [_id_param()],
                    "responses": {
                        "200": _json("TxnOut", "The transaction"),
                        **_errors(401, 404, 503),
                    },
                }
            },
            "/v1/transactions/{id}/retry": _action(
                "retry", "Retry waiting calls now; resume a needs_attention transaction", limits
            ),
            "/v1/transactions/{id}/abort": _action(
                "abort", "Abort a transaction that has no commit decision yet", limits
            ),
            "/v1/transactions/{id}/resolve": _action(
                "resolve",
                "Declare a needs_attention transaction repaired by hand: its decision holds",
                limits,
            ),
            "/v1/stats": {
                "get": {
                    "operationId": "getStats",
                    "summary": "Counters of this coordinator and transactions by status",
                    "responses": {
                        "200": _json("StatsOut", "Counters"),
                        **_errors(401, 503),
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "The process is alive",
                    "security": open_,
                    "responses": {"200": _json("HealthOut", "Alive")},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Ready to take transactions (recovery done, not draining)",
                    "security": open_,
                    "responses": {
                        "200": _json("HealthOut", "Ready"),
                        "503": _json("HealthOut", "Recovering, draining or stopped"),
                    },
                }
            },
        },
    }
