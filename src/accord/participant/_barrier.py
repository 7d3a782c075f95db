"""What the barrier decides, independent of the database it runs on.

Each call runs inside one local transaction, in this order:

1. if a row for ``(txid, branch, op)`` already exists, answer from it (a
   duplicate) and stop;
2. confirm / cancel / compensate: read the forward row (try / action) and
   the rival row (confirm for a cancel, cancel for a confirm), then
   :func:`decide`: run, record a null compensation, or reject;
3. claim the key with a ``pending`` own row (if step 1 did not) and run the
   handler;
4. give the own row its final kind and result, and commit; or roll the
   handler's work and the claim back (an exception, a refused confirm or
   cancel; a refused try or action is then recorded as refused).

On PostgreSQL concurrent calls run side by side, so step 1 inserts the own
row as ``pending`` first (the key's claim; a concurrent duplicate waits for
it) and step 2 locks the forward row. On SQLite the transaction holds the
database's write lock, which serializes calls, so the branch's rows are read
in one statement first, and the ``pending`` claim is written just before the
handler runs (a handler that commits on its own commits the claim with its
changes: later deliveries then fail loudly instead of applying it again).

The rules of :func:`decide` are those of the simulated services
(``accord.sim.services``) and of docs/protocol.md, "Participant obligations".
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Protocol, TypeVar

import msgspec

from accord.core.machine import Outcome
from accord.core.spec import MAX_PAYLOAD_BYTES, Op, TransactionSpec
from accord.core.spec import Protocol as TxnProtocol
from accord.errors import AccordError
from accord.wire import MAX_SKEW_S

DEFAULT_MIN_RETENTION_S = 7 * 24 * 3600.0
"""The shortest retention :meth:`Barrier.cleanup` accepts unless configured otherwise."""

MAX_KEY_CHARS = 256
"""Longest ``txid`` or ``branch`` the barrier stores (the coordinator's are shorter)."""

MAX_RESULT_BYTES = MAX_PAYLOAD_BYTES
"""Largest encoded handler result the barrier stores and returns."""

MAX_ERROR_CHARS = 1000
"""Refusal messages are stored and returned truncated to this length."""

CLEANUP_BATCH_ROWS = 10_000
"""Rows deleted per statement by ``cleanup``, so that it never holds long locks."""

FORWARD = {Op.CONFIRM: Op.TRY, Op.CANCEL: Op.TRY, Op.COMPENSATE: Op.ACTION}
"""The operation each phase-2 operation depends on."""

RIVAL = {Op.CONFIRM: Op.CANCEL, Op.CANCEL: Op.CONFIRM}
"""Confirm and cancel of one branch: at most one of them ever applies."""

_TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

TxT_co = TypeVar("TxT_co", covariant=True)


class Refusal(AccordError):
    """Raised by a handler for a business refusal (short stock, funds, capacity).

    The handler's changes are rolled back. For a try or action the refusal is
    recorded in the barrier, so a duplicate gets the same refusal and the
    handler never runs again for that call. Answered with HTTP 409.
    """


class BarrierError(AccordError):
    """The barrier found what it cannot have written, or a handler ended the
    local transaction itself (handlers must neither commit nor roll back)."""


class Kind(StrEnum):
    """What a barrier row records (its ``kind`` column)."""

    PENDING = "pending"  # the key's claim, overwritten in its transaction (committed only
    # by a handler that commits on its own: later deliveries then fail loudly)
    APPLIED = "applied"  # the handler ran and its changes committed with this row
    REFUSED = "refused"  # the try / action handler raised Refusal; nothing applied
    NULL = "null"  # cancel / compensate with nothing to undo; the handler did not run
    BLOCKED = "blocked"  # a try / action barred by an earlier cancel / compensate


@dataclass(frozen=True, slots=True)
class BarrierResult:
    """The answer to one call: the same for every delivery of it.

    ``outcome`` is ``OK`` (applied, or a null compensation), ``REFUSED`` (a
    business refusal, or a try / action blocked by an earlier cancel) or
    ``REJECTED`` (the call is out of order, e.g. a confirm without an applied
    try, or a cancel after a confirm: nothing is recorded). ``duplicate`` is
    true when the answer came from a stored row and the handler did not run.
    """

    outcome: Outcome
    result: Any = None
    error: str = ""
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Row:
    """A barrier row as read back: ``result`` is the stored JSON text."""

    kind: Kind
    result: str | None
    error: str


class Step(Enum):
    """What a phase-2 operation does, once its forward and rival rows are known."""

    RUN = "run"  # run the handler
    NULL = "null"  # record a null compensation
    NULL_AND_BLOCK = "null_and_block"  # also record the forward operation as blocked
    REJECT = "reject"  # record nothing, answer rejected


class Barrier(Protocol[TxT_co]):
    """A barrier over one database; ``TxT_co`` is what handlers receive.

    ``handler(tx)`` does its business update through ``tx`` (the open local
    transaction) and returns a JSON-encodable result; it must not commit or
    roll back. It runs at most once per ``(txid, branch, op)``, atomically
    with the barrier row.
    """

    @property
    def async_handlers(self) -> bool:
        """Whether handlers may be coroutine functions."""
        ...

    async def migrate(self) -> None:
        """Create the barrier table if it does not exist."""
        ...

    async def run(
        self, txid: str, branch: str, op: Op | str, handler: Callable[[TxT_co], Any]
    ) -> BarrierResult:
        """Run ``handler`` through the barrier; raises what the handler raised
        (other than :class:`Refusal`) after rolling everything back."""
        ...

    async def cleanup(self, older_than_s: float) -> int:
        """Delete rows older than ``older_than_s``; returns how many."""
        ...


def decide(op: Op, forward: Row | None, rival: Row | None) -> tuple[Step, str]:
    """The step a confirm, cancel or compensate takes, and its reason."""
    if op not in FORWARD:
        raise ValueError(f"{op} is not a confirm, cancel or compensate")
    for row in (forward, rival):
        if row is not None and row.kind is Kind.PENDING:
            raise BarrierError(f"a committed barrier row is still {Kind.PENDING!r}")
    fwd_op = FORWARD[op]
    if op is Op.CONFIRM:
        if rival is not None:
            return Step.REJECT, "confirm after cancel"
        if forward is None:
            return Step.REJECT, "confirm without a try"
        if forward.kind is not Kind.APPLIED:
            return Step.REJECT, f"confirm of a try that did not apply ({forward.kind})"
        return Step.RUN, ""
    if forward is None:
        return Step.NULL_AND_BLOCK, f"{op} arrived before {fwd_op}: nothing to undo"
    if forward.kind is not Kind.APPLIED:
        return Step.NULL, f"{fwd_op} did not apply ({forward.kind}): nothing to undo"
    if rival is not None and rival.kind is Kind.APPLIED:
        return Step.REJECT, f"{op} after confirm"
    return Step.RUN, ""


def answer(row: Row, *, duplicate: bool) -> BarrierResult:
    """The result a stored row stands for."""
    if row.kind in (Kind.APPLIED, Kind.NULL):
        return BarrierResult(Outcome.OK, decode_result(row.result), duplicate=duplicate, error="")
    if row.kind in (Kind.REFUSED, Kind.BLOCKED):
        return BarrierResult(Outcome.REFUSED, error=row.error, duplicate=duplicate)
    raise BarrierError(f"a committed barrier row is still {Kind.PENDING!r}")


def blocked_error(forward_op: Op, undo_op: Op) -> str:
    return f"{undo_op} arrived before {forward_op}: {forward_op} is refused for good"


def check_key(txid: str, branch: str, op: Op | str) -> Op:
    """Validate a barrier key; raises ``ValueError`` naming the field."""
    for name, value in (("txid", txid), ("branch", branch)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
        if len(value) > MAX_KEY_CHARS:
            raise ValueError(f"{name} is {len(value)} characters, the limit is {MAX_KEY_CHARS}")
        if "\x00" in value:
            raise ValueError(f"{name} must not contain NUL characters")
    try:
        return Op(op)
    except ValueError:
        raise ValueError(
            f"op must be one of {', '.join(o.value for o in Op)}, got {op!r}"
        ) from None


def check_table(table: str) -> str:
    """Validate a (possibly schema-qualified) table name and quote it for SQL."""
    if not isinstance(table, str) or not _TABLE_RE.fullmatch(table):
        raise ValueError(
            f"table must be an identifier of letters, digits and '_', optionally "
            f"'schema.table', got {table!r}"
        )
    return ".".join(f'"{part}"' for part in table.split("."))


def index_name(table: str) -> str:
    """The name of the created_at index: unqualified, it lives in the table's schema."""
    return f'"{table.rsplit(".", maxsplit=1)[-1]}_created_at"'


def encode_result(value: Any) -> str:
    """The JSON text stored for a handler's result; raises ``TypeError`` /
    ``ValueError`` for what cannot be stored, so that the call rolls back."""
    text = _encode(value)
    if len(text) > MAX_RESULT_BYTES:
        raise ValueError(
            f"handler result is {len(text)} bytes encoded, the limit is {MAX_RESULT_BYTES}"
        )
    return text.decode()


def decode_result(text: str | None) -> Any:
    return None if text is None else _decode(text)


def refusal_message(exc: Refusal) -> str:
    # PostgreSQL TEXT cannot hold NUL; the message is for people, so drop it.
    return (str(exc) or "refused").replace("\x00", "")[:MAX_ERROR_CHARS]


def check_retention(older_than_s: float, min_retention_s: float) -> None:
    if (
        isinstance(older_than_s, bool)
        or not isinstance(older_than_s, int | float)
        or not math.isfinite(older_than_s)
    ):
        raise ValueError(f"older_than_s must be a finite number, got {older_than_s!r}")
    if older_than_s < min_retention_s:
        raise ValueError(
            f"older_than_s is {older_than_s:g} s, the minimum retention is {min_retention_s:g} s "
            "(see accord.participant.retry_horizon_s)"
        )


def check_min_retention(min_retention_s: float) -> float:
    if (
        isinstance(min_retention_s, bool)
        or not isinstance(min_retention_s, int | float)
        or not math.isfinite(min_retention_s)
        or min_retention_s <= 0
    ):
        raise ValueError(f"min_retention_s must be a positive number, got {min_retention_s!r}")
    return float(min_retention_s)


def retry_horizon_s(spec: TransactionSpec) -> float:
    """How long after a transaction starts a call of it can still reach a participant.

    A barrier row must be kept at least this long, or a late duplicate finds
    no row and applies again (or a late cancel takes an applied try for a
    never-tried one). The coordinator bounds its calls like this:

    * the prepare phase ends by the deadline, ``spec.timeout_s``;
    * each branch's phase 2 (confirm, cancel or compensate) makes at most
      ``maximum_attempts`` calls of ``timeout_s`` each, with the backoff caps
      ``RetryPolicy.delay_s(n, 1.0)`` for ``n = 1 .. maximum_attempts - 1``
      between them; TCC branches run concurrently (the longest counts), a
      saga's compensations one after another (they add up);
    * a request older than ``wire.MAX_SKEW_S`` is refused as stale, which
      bounds how late the network can deliver one.

    Not included, because the coordinator does not bound them: the time the
    coordinator is down before recovery re-sends phase 2, an operator's retry
    of a ``needs_attention`` transaction, and ``Retry-After`` delays a
    participant asks for (each may replace a backoff delay, up to 3,600 s).
    Add those to the result; ``DEFAULT_MIN_RETENTION_S`` (7 days) covers the
    default policies with days to spare for them.
    """
    spans = []
    for branch in spec.branches:
        policy = branch.retry
        waits = sum(policy.delay_s(n, 1.0) for n in range(1, policy.maximum_attempts))
        spans.append(waits + policy.maximum_attempts * branch.timeout_s)
    phase2 = sum(spans) if spec.protocol is TxnProtocol.SAGA else max(spans)
    return spec.timeout_s + phase2 + MAX_SKEW_S
