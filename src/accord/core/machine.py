"""The transaction state machine: ``(state, event) -> (state, actions)``.

Pure: no I/O, no clock, no randomness. Time arrives inside events (``now_ms``)
and so does the random sample used for retry jitter. The coordinator (the
shell) persists the ``Persist`` actions, honouring ``durable`` (nothing after
such a record may be performed until it is on disk), sends the ``Send``
actions, arms the timers, and feeds the outcomes back as events.

Rules enforced here, which docs/protocol.md explains:

* a commit decision is persisted durably before any confirm is sent;
* with no durable commit decision the outcome is abort (presumed abort), so
  an abort decision need not be durable before cancels go out;
* a refusal in the prepare phase aborts at once, with no retry;
* transient failures are retried with capped, jittered backoff, bounded by
  attempts and (in the prepare phase) the deadline;
* confirms, cancels and compensations never give up silently: when their
  attempts run out the transaction ends in ``needs_attention``;
* a reply that is not for the branch's current call is ignored (stale,
  duplicated or reordered messages change nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from accord.core.records import (
    Attempted,
    Begin,
    BranchSummary,
    Decided,
    Decision,
    Ended,
    LogRecord,
    OperatorAction,
    TxnSnapshot,
    TxnStatus,
)
from accord.core.spec import MAX_TIMEOUT_S, Op, Protocol, TransactionSpec


class Outcome(StrEnum):
    """How one participant call ended."""

    OK = "ok"
    REFUSED = "refused"  # a business refusal: abort, never retry
    TRANSIENT = "transient"  # timeout, 5xx, connection error: retry
    REJECTED = "rejected"  # the participant says the request itself is wrong


class BranchStatus(StrEnum):
    PENDING = "pending"  # nothing sent in this phase yet
    IN_FLIGHT = "in_flight"  # a call is outstanding
    WAITING = "waiting"  # failed transiently; a retry is scheduled
    PREPARED = "prepared"  # try / action succeeded
    REFUSED = "refused"  # try / action refused
    FAILED = "failed"  # try / action gave up (attempts, deadline): may have applied
    REJECTED = "rejected"  # try / action rejected as malformed: never applied
    DONE = "done"  # confirm / cancel / compensate succeeded, or nothing to undo
    STUCK = "stuck"  # confirm / cancel / compensate gave up: needs attention


class BranchState(NamedTuple):
    status: BranchStatus = BranchStatus.PENDING
    op: Op | None = None
    attempt: int = 0
    error: str = ""
    result: Any = None


@dataclass(slots=True)
class TxnState:
    """A transaction as the machine sees it.

    Not frozen, for speed: :func:`step` never changes the state it is given;
    it works on a :meth:`copy` and returns that (a test pins this)."""

    spec: TransactionSpec
    status: TxnStatus
    branches: list[BranchState]
    created_at_ms: int
    deadline_at_ms: int
    decision: Decision | None = None
    reason: str = ""
    # Branches of the current phase that have not settled yet.
    outstanding: int = 0
    # The retry schedule read back by recovery: (branch, op) -> (attempts made,
    # next attempt due at ms). Empty for a transaction started here.
    # Read only: shared by every copy of the state.
    prior: Mapping[tuple[int, Op], tuple[int, int]] = field(default_factory=dict)

    @property
    def txid(self) -> str:
        return self.spec.id

    def copy(self) -> TxnState:
        return TxnState(
            self.spec,
            self.status,
            list(self.branches),
            self.created_at_ms,
            self.deadline_at_ms,
            self.decision,
            self.reason,
            self.outstanding,
            self.prior,
        )


# ---------------------------------------------------------------- events


class Replied(NamedTuple):
    """A participant call finished (or timed out) with ``outcome``."""

    branch: int
    op: Op
    attempt: int
    outcome: Outcome
    now_ms: int
    jitter: float = 1.0
    result: Any = None
    error: str = ""
    retry_after_s: float | None = None


class RetryDue(NamedTuple):
    """The retry timer armed by a ``ScheduleRetry`` fired."""

    branch: int
    op: Op
    attempt: int
    now_ms: int


class DeadlineExpired(NamedTuple):
    now_ms: int


class AbortRequested(NamedTuple):
    """An operator asks to abort; honoured only before a decision."""

    reason: str
    now_ms: int


class RetryRequested(NamedTuple):
    """An operator asks to retry waiting calls now, resetting their backoff."""

    reason: str
    now_ms: int


Event = Replied | RetryDue | DeadlineExpired | AbortRequested | RetryRequested


# ---------------------------------------------------------------- actions


class Persist(NamedTuple):
    record: LogRecord
    durable: bool  # True: perform no later action before the record is on disk


class Send(NamedTuple):
    branch: int
    op: Op
    attempt: int


class ScheduleRetry(NamedTuple):
    branch: int
    op: Op
    attempt: int  # the attempt number the retry will be
    at_ms: int


class ArmDeadline(NamedTuple):
    at_ms: int


class Finish(NamedTuple):
    status: TxnStatus


Action = Persist | Send | ScheduleRetry | ArmDeadline | Finish
Step = tuple[TxnState, list[Action]]


# ---------------------------------------------------------------- entry points


def start(spec: TransactionSpec, now_ms: int) -> Step:
    """A new transaction: log Begin durably, then call the first branch(es)."""
    deadline = now_ms + int(spec.timeout_s * 1000)
    n = len(spec.branches)
    state = TxnState(
        spec=spec,
        status=TxnStatus.PREPARING,
        branches=[_PENDING] * n,
        created_at_ms=now_ms,
        deadline_at_ms=deadline,
        outstanding=n,
    )
    actions: list[Action] = [
        Persist(Begin(spec, now_ms, deadline), True),
        ArmDeadline(deadline),
    ]
    op = spec.prepare_op
    first = n if spec.protocol is Protocol.TCC and not spec.sequential else 1
    sent = BranchState(BranchStatus.IN_FLIGHT, op, 1)
    for i in range(first):
        state.branches[i] = sent
        actions.append(Send(i, op, 1))
    return state, actions


def recover(snap: TxnSnapshot, now_ms: int) -> Step:
    """Resume a non-terminal transaction from the log.

    No decision means abort (presumed abort). Every branch is treated as
    possibly applied, because the log does not record individual successes:
    cancels and compensations are idempotent and a participant answers one
    without its try as a no-op.
    """
    spec = snap.spec
    n = len(spec.branches)
    state = TxnState(
        spec=spec,
        status=snap.status,
        branches=[BranchState(BranchStatus.PREPARED)] * n,
        created_at_ms=snap.created_at_ms,
        deadline_at_ms=snap.deadline_at_ms,
        decision=snap.decision,
        reason=snap.reason,
        prior=dict(snap.attempts),
    )
    if snap.status is TxnStatus.COMMITTING:
        op = spec.commit_op
        if op is None:  # a committed saga has nothing left to do
            return _end(state, TxnStatus.COMMITTED, snap.reason, now_ms, [])
        return _enter_phase2(state, op, list(range(n)), now_ms, [])
    if snap.status is TxnStatus.PREPARING:
        return _abort(state, "recovered with no decision (presumed abort)", now_ms)
    if snap.status is TxnStatus.ABORTING:
        return _abort(state, snap.reason, now_ms, already_decided=True)
    return state, []


def step(state: TxnState, event: Event) -> Step:
    """Apply one event to a copy of ``state``. Events that no longer apply
    return ``state`` itself and no actions."""
    if state.status.terminal:
        return state, []
    kind = type(event)
    if kind is Replied:
        return _on_reply(state, event)  # type: ignore[arg-type]
    if kind is RetryDue:
        return _on_retry_due(state, event)  # type: ignore[arg-type]
    if kind is DeadlineExpired:
        if state.status is TxnStatus.PREPARING:
            return _abort(state.copy(), "deadline exceeded", event.now_ms)
        return state, []
    if kind is AbortRequested:
        if state.status is not TxnStatus.PREPARING:
            return state, []
        ev: AbortRequested = event  # type: ignore[assignment]
        note = Persist(OperatorAction(state.txid, "abort", ev.reason, ev.now_ms), False)
        new, actions = _abort(state.copy(), f"aborted by operator: {ev.reason}", ev.now_ms)
        return new, [note, *actions]
    if kind is RetryRequested:
        return _on_retry_requested(state.copy(), event)  # type: ignore[arg-type]
    raise TypeError(f"unknown event {event!r}")


# ---------------------------------------------------------------- transitions
# Every function below receives a state it owns (a fresh copy) and may change it.


def _on_reply(state: TxnState, ev: Replied) -> Step:
    b = state.branches[ev.branch]
    if b.status is not BranchStatus.IN_FLIGHT or b.op is not ev.op or b.attempt != ev.attempt:
        return state, []  # stale, duplicated or reordered: not the current call
    if state.status is TxnStatus.PREPARING:
        return _on_prepare_reply(state.copy(), ev, b)
    return _on_phase2_reply(state.copy(), ev, b)


def _on_prepare_reply(state: TxnState, ev: Replied, b: BranchState) -> Step:
    spec = state.spec
    i = ev.branch
    name = spec.branches[i].name
    outcome = ev.outcome
    if outcome is Outcome.OK:
        state.branches[i] = BranchState(BranchStatus.PREPARED, b.op, b.attempt, "", ev.result)
        state.outstanding -= 1
        nxt = i + 1
        if (spec.protocol is Protocol.SAGA or spec.sequential) and nxt < len(spec.branches):
            op = spec.prepare_op
            state.branches[nxt] = BranchState(BranchStatus.IN_FLIGHT, op, 1)
            return state, [Send(nxt, op, 1)]
        if state.outstanding == 0:
            return _commit(state, ev.now_ms)
        return state, []
    if outcome is Outcome.REFUSED:
        state.branches[i] = BranchState(BranchStatus.REFUSED, b.op, b.attempt, ev.error)
        return _abort(state, f"branch {name!r} refused: {ev.error}", ev.now_ms)
    if outcome is Outcome.REJECTED:
        # The participant refused to process the request at all: nothing was
        # applied, and its cancel would be rejected just the same.
        state.branches[i] = BranchState(BranchStatus.REJECTED, b.op, b.attempt, ev.error)
        return _abort(state, f"branch {name!r} rejected the request: {ev.error}", ev.now_ms)
    policy = spec.branches[i].retry
    if b.attempt >= policy.maximum_attempts:
        state.branches[i] = BranchState(BranchStatus.FAILED, b.op, b.attempt, ev.error)
        reason = f"branch {name!r} failed after {b.attempt} attempts: {ev.error}"
        return _abort(state, reason, ev.now_ms)
    at_ms = ev.now_ms + _delay_ms(state, ev, b.attempt)
    if at_ms >= state.deadline_at_ms:
        state.branches[i] = BranchState(BranchStatus.FAILED, b.op, b.attempt, ev.error)
        reason = f"deadline exceeded retrying branch {name!r}: {ev.error}"
        return _abort(state, reason, ev.now_ms)
    return _schedule(state, ev, b, at_ms)


def _on_phase2_reply(state: TxnState, ev: Replied, b: BranchState) -> Step:
    i = ev.branch
    if ev.outcome is Outcome.OK:
        state.branches[i] = BranchState(BranchStatus.DONE, b.op, b.attempt, "", b.result)
        return _settled(state, ev.now_ms)
    name = state.spec.branches[i].name
    if ev.outcome is Outcome.TRANSIENT:
        policy = state.spec.branches[i].retry
        if b.attempt < policy.maximum_attempts:
            return _schedule(state, ev, b, ev.now_ms + _delay_ms(state, ev, b.attempt))
        error = f"{ev.op} of branch {name!r} failed after {b.attempt} attempts: {ev.error}"
    else:
        # A participant must not refuse or reject a confirm / cancel / compensate.
        error = f"{ev.op} of branch {name!r} was {ev.outcome}: {ev.error}"
    state.branches[i] = BranchState(BranchStatus.STUCK, b.op, b.attempt, error, b.result)
    if state.spec.protocol is Protocol.SAGA:
        # Compensations run strictly in reverse; stop rather than undo an
        # earlier step while a later one is still applied.
        return _end(state, TxnStatus.NEEDS_ATTENTION, error, ev.now_ms, [])
    return _settled(state, ev.now_ms)


def _settled(state: TxnState, now_ms: int) -> Step:
    """A phase-2 branch finished (done or stuck); move on or finish."""
    state.outstanding -= 1
    if state.spec.protocol is Protocol.SAGA and state.status is TxnStatus.ABORTING:
        nxt = _next_to_compensate(state)
        if nxt is not None:
            return _begin_phase2_op(state, nxt, Op.COMPENSATE, now_ms, [])
    if state.outstanding > 0:
        return state, []
    stuck = [b.error for b in state.branches if b.status is BranchStatus.STUCK]
    if stuck:
        return _end(state, TxnStatus.NEEDS_ATTENTION, "; ".join(stuck), now_ms, [])
    final = TxnStatus.COMMITTED if state.status is TxnStatus.COMMITTING else TxnStatus.ABORTED
    return _end(state, final, state.reason, now_ms, [])


def _on_retry_due(state: TxnState, ev: RetryDue) -> Step:
    b = state.branches[ev.branch]
    if b.status is not BranchStatus.WAITING or b.op is not ev.op or b.attempt + 1 != ev.attempt:
        return state, []
    state = state.copy()
    state.branches[ev.branch] = BranchState(
        BranchStatus.IN_FLIGHT, b.op, ev.attempt, b.error, b.result
    )
    return state, [Send(ev.branch, ev.op, ev.attempt)]


def _on_retry_requested(state: TxnState, ev: RetryRequested) -> Step:
    actions: list[Action] = [
        Persist(OperatorAction(state.txid, "retry", ev.reason, ev.now_ms), False)
    ]
    for i, b in enumerate(state.branches):
        if b.status is BranchStatus.WAITING and b.op is not None:
            state.branches[i] = BranchState(
                BranchStatus.IN_FLIGHT, b.op, b.attempt + 1, b.error, b.result
            )
            actions.append(Send(i, b.op, b.attempt + 1))
    return state, actions


def _commit(state: TxnState, now_ms: int) -> Step:
    reason = "all branches prepared"
    state.decision = Decision.COMMIT
    state.reason = reason
    op = state.spec.commit_op
    if op is None:  # saga: every action is applied; the end record is the decision
        return _end(state, TxnStatus.COMMITTED, reason, now_ms, [])
    state.status = TxnStatus.COMMITTING
    decided = Persist(Decided(state.txid, Decision.COMMIT, reason, now_ms), True)
    return _enter_phase2(state, op, list(range(len(state.branches))), now_ms, [decided])


def _abort(
    state: TxnState,
    reason: str,
    now_ms: int,
    *,
    already_decided: bool = False,
) -> Step:
    """Decide abort and undo every branch that may have been applied.

    The abort record is not made durable first: if it is lost, recovery finds
    no decision and presumes abort, which is the same outcome.
    """
    actions: list[Action] = []
    if not already_decided:
        actions.append(Persist(Decided(state.txid, Decision.ABORT, reason, now_ms), False))
    state.status = TxnStatus.ABORTING
    state.decision = Decision.ABORT
    state.reason = reason
    spec = state.spec
    op = spec.abort_op
    # A branch never sent (PENDING) or whose request was rejected as malformed
    # has nothing to undo; a refused one gets its cancel too, which also bars
    # a late duplicate of its try from applying.
    touched = []
    for i, b in enumerate(state.branches):
        if b.status is BranchStatus.PENDING:
            state.branches[i] = _NOTHING_TO_UNDO
        elif b.status is not BranchStatus.REJECTED:
            touched.append(i)
    if spec.protocol is Protocol.SAGA:
        # Reverse order, one at a time: start with the last step that was tried.
        if not touched:
            return _end(state, TxnStatus.ABORTED, reason, now_ms, actions)
        state.outstanding = len(touched)
        return _begin_phase2_op(state, touched[-1], op, now_ms, actions)
    return _enter_phase2(state, op, touched, now_ms, actions)


def _enter_phase2(
    state: TxnState,
    op: Op,
    indices: list[int],
    now_ms: int,
    actions: list[Action],
) -> Step:
    """Call ``op`` on every branch in ``indices`` concurrently."""
    state.outstanding = len(indices)
    if not indices:
        final = TxnStatus.COMMITTED if state.decision is Decision.COMMIT else TxnStatus.ABORTED
        return _end(state, final, state.reason, now_ms, actions)
    for i in indices:
        _begin_phase2_op(state, i, op, now_ms, actions)
    return state, actions


def _begin_phase2_op(state: TxnState, i: int, op: Op, now_ms: int, actions: list[Action]) -> Step:
    """Start ``op`` on branch ``i``, continuing a retry schedule read back by recovery."""
    made, due_ms = state.prior.get((i, op), (0, 0))
    if due_ms > now_ms:
        # The durable retry schedule survives a crash: wait out the backoff.
        state.branches[i] = BranchState(BranchStatus.WAITING, op, made)
        actions.append(ScheduleRetry(i, op, made + 1, due_ms))
        return state, actions
    return _send_phase2(state, i, op, made, actions)


def _send_phase2(state: TxnState, i: int, op: Op, made: int, actions: list[Action]) -> Step:
    # Recovery may find the budget already spent; one more attempt is still
    # made, and its failure parks the transaction (see _on_phase2_reply).
    # Keep the prepare phase's result: it is the branch's answer to the caller.
    result = state.branches[i].result
    state.branches[i] = BranchState(BranchStatus.IN_FLIGHT, op, made + 1, "", result)
    actions.append(Send(i, op, made + 1))
    return state, actions


def _next_to_compensate(state: TxnState) -> int | None:
    for i in range(len(state.branches) - 1, -1, -1):
        if state.branches[i].status not in _SETTLED:
            return i
    return None


def _end(
    state: TxnState, status: TxnStatus, reason: str, now_ms: int, actions: list[Action]
) -> Step:
    """Terminal. The end is made durable before the caller hears of it only
    where it decides something: a saga's commit (its end is its decision)
    and needs-attention (the transaction must not be re-driven silently).
    A TCC commit's decision is already durable and an abort is presumed, so
    their end may be lost: recovery confirms or cancels again, idempotently,
    and reaches the same end."""
    state.status = status
    state.reason = reason
    state.outstanding = 0
    record = Ended(state.txid, status, reason, now_ms, summaries(state))
    durable = status is TxnStatus.NEEDS_ATTENTION or (
        status is TxnStatus.COMMITTED and state.spec.protocol is Protocol.SAGA
    )
    actions.append(Persist(record, durable))
    actions.append(Finish(status))
    return state, actions


def summaries(state: TxnState) -> tuple[BranchSummary, ...]:
    """Each branch's status, last op, attempts, error and result."""
    return tuple(
        BranchSummary(
            spec.name,
            b.status.value,
            b.op.value if b.op is not None else None,
            b.attempt,
            b.error,
            b.result,
        )
        for spec, b in zip(state.spec.branches, state.branches, strict=True)
    )


# ---------------------------------------------------------------- helpers

_PENDING = BranchState()
_NOTHING_TO_UNDO = BranchState(BranchStatus.DONE)
_SETTLED = frozenset({BranchStatus.DONE, BranchStatus.STUCK, BranchStatus.REJECTED})


def _delay_ms(state: TxnState, ev: Replied, failed: int) -> int:
    if ev.retry_after_s is not None and ev.retry_after_s >= 0:
        # Bounded so that an absurd or infinite Retry-After can neither raise
        # (int(inf) overflows) nor park a phase-2 call for years.
        return int(min(ev.retry_after_s, MAX_TIMEOUT_S) * 1000)
    return int(state.spec.branches[ev.branch].retry.delay_s(failed, ev.jitter) * 1000)


def _schedule(state: TxnState, ev: Replied, b: BranchState, at_ms: int) -> Step:
    state.branches[ev.branch] = BranchState(
        BranchStatus.WAITING, b.op, b.attempt, ev.error, b.result
    )
    record = Attempted(state.txid, ev.branch, ev.op, b.attempt, ev.error, ev.now_ms, at_ms)
    return state, [Persist(record, False), ScheduleRetry(ev.branch, ev.op, b.attempt + 1, at_ms)]
