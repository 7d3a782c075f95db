"""Unit tests of the pure state machine: start, step and recover."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
from hypothesis import event as hypothesis_event
from hypothesis import given, settings
from hypothesis import strategies as st

from accord.core import machine
from accord.core.machine import (
    AbortRequested,
    Action,
    ArmDeadline,
    BranchStatus,
    DeadlineExpired,
    Event,
    Finish,
    Outcome,
    Persist,
    Replied,
    RetryDue,
    RetryRequested,
    ScheduleRetry,
    Send,
    TxnState,
)
from accord.core.records import (
    Attempted,
    Begin,
    Decided,
    Decision,
    Ended,
    OperatorAction,
    TxnSnapshot,
    TxnStatus,
    fold,
)
from accord.core.spec import BranchSpec, Op, Protocol, RetryPolicy, TransactionSpec

T0 = 1_000_000
EXAMPLES = int(os.environ.get("ACCORD_HYPOTHESIS_EXAMPLES", "200"))
NO_JITTER = RetryPolicy(
    initial_interval_s=0.1, backoff_coefficient=2, maximum_interval_s=1, maximum_attempts=3
)


def make_spec(
    protocol: str = "tcc",
    n: int = 3,
    *,
    sequential: bool = False,
    retry: RetryPolicy = NO_JITTER,
    timeout_s: float = 30.0,
) -> TransactionSpec:
    return TransactionSpec(
        protocol=Protocol(protocol),
        branches=tuple(BranchSpec(f"b{i}", f"p{i}", {"i": i}, retry) for i in range(n)),
        id="t1",
        timeout_s=timeout_s,
        sequential=sequential,
    )


def sends(actions: list[Action]) -> list[tuple[int, Op, int]]:
    return [(a.branch, a.op, a.attempt) for a in actions if isinstance(a, Send)]


def persisted(actions: list[Action]) -> list[Persist]:
    return [a for a in actions if isinstance(a, Persist)]


def reply(
    branch: int,
    op: Op,
    attempt: int = 1,
    outcome: Outcome = Outcome.OK,
    now: int = T0,
    **kw: Any,
) -> Replied:
    return Replied(branch, op, attempt, outcome, now, **kw)


class Run:
    """Feeds events to the machine, checking on every step that the state it
    was given is left untouched, and keeps every persisted record."""

    def __init__(self, state: TxnState, actions: list[Action]) -> None:
        self.state = state
        self.actions = actions
        self.records = [p.record for p in persisted(actions)]

    @classmethod
    def start(cls, spec: TransactionSpec, now: int = T0) -> Run:
        return cls(*machine.start(spec, now))

    def __call__(self, event: Event) -> list[Action]:
        before = copy.deepcopy(self.state)
        new, actions = machine.step(self.state, event)
        assert self.state == before, "step() changed the state it was given"
        self.state, self.actions = new, actions
        self.records += [p.record for p in persisted(actions)]
        return actions

    def ignores(self, event: Event) -> bool:
        """True if ``event`` leaves the state exactly as it was, with no action."""
        before = self.state
        return self(event) == [] and self.state is before

    def ok_all(self, op: Op, now: int = T0) -> list[Action]:
        """Reply ok to every in-flight call of ``op``, returning all actions."""
        out: list[Action] = []
        for i, b in enumerate(self.state.branches):
            if b.status is BranchStatus.IN_FLIGHT and b.op is op:
                out += self(reply(i, op, b.attempt, now=now))
        return out


# ------------------------------------------------------------------ start


def test_start_tcc_parallel_persists_begin_durably_before_trying_every_branch() -> None:
    """TCC start: Begin (durable) first, the deadline armed, then a try to every branch."""
    spec = make_spec(n=3, timeout_s=2.5)
    state, actions = machine.start(spec, T0)
    assert actions[0] == Persist(Begin(spec, T0, T0 + 2500), True)
    assert actions[1] == ArmDeadline(T0 + 2500)
    assert actions[2:] == [Send(0, Op.TRY, 1), Send(1, Op.TRY, 1), Send(2, Op.TRY, 1)]
    assert state.status is TxnStatus.PREPARING and state.deadline_at_ms == T0 + 2500
    assert [b.status for b in state.branches] == [BranchStatus.IN_FLIGHT] * 3


@pytest.mark.parametrize(
    ("protocol", "sequential", "op"),
    [("tcc", True, Op.TRY), ("saga", False, Op.ACTION), ("saga", True, Op.ACTION)],
)
def test_start_sequential_calls_only_the_first_branch(
    protocol: str, sequential: bool, op: Op
) -> None:
    """Sequential TCC and sagas start with the first branch only."""
    state, actions = machine.start(make_spec(protocol, 3, sequential=sequential), T0)
    assert isinstance(actions[0], Persist) and actions[0].durable
    assert sends(actions) == [(0, op, 1)]
    assert [b.status for b in state.branches[1:]] == [BranchStatus.PENDING] * 2


# ------------------------------------------------------------------ happy paths


def test_tcc_parallel_commit_decision_is_durable_strictly_before_any_confirm() -> None:
    """The last ok try yields Decided(commit, durable) and only then the confirms;
    the end after the confirms need not wait for the disk (the decision is)."""
    run = Run.start(make_spec(n=3))
    assert run(reply(2, Op.TRY)) == []
    assert run(reply(0, Op.TRY)) == []
    actions = run(reply(1, Op.TRY, now=T0 + 7))
    assert actions[0] == Persist(
        Decided("t1", Decision.COMMIT, "all branches prepared", T0 + 7), True
    )
    assert actions[1:] == [Send(0, Op.CONFIRM, 1), Send(1, Op.CONFIRM, 1), Send(2, Op.CONFIRM, 1)]
    assert run.state.status is TxnStatus.COMMITTING and run.state.decision is Decision.COMMIT
    end = run.ok_all(Op.CONFIRM, now=T0 + 9)
    assert isinstance(end[-2], Persist) and not end[-2].durable
    assert end[-2].record.status is TxnStatus.COMMITTED  # type: ignore[union-attr]
    assert end[-1] == Finish(TxnStatus.COMMITTED)
    assert [s.status for s in end[-2].record.branches] == ["done"] * 3  # type: ignore[union-attr]


def test_tcc_sequential_tries_one_branch_after_another() -> None:
    """Sequential TCC sends each try only after the previous one succeeded."""
    run = Run.start(make_spec(n=3, sequential=True))
    assert run(reply(0, Op.TRY)) == [Send(1, Op.TRY, 1)]
    assert run(reply(1, Op.TRY)) == [Send(2, Op.TRY, 1)]
    actions = run(reply(2, Op.TRY))
    assert isinstance(actions[0], Persist) and actions[0].durable
    assert sends(actions) == [(i, Op.CONFIRM, 1) for i in range(3)]


def test_saga_runs_actions_in_order_and_its_durable_end_is_the_commit() -> None:
    """A saga's last ok action ends it committed with a durable Ended, no Decided, no confirm."""
    run = Run.start(make_spec("saga", 3))
    assert run(reply(0, Op.ACTION, result={"x": 1})) == [Send(1, Op.ACTION, 1)]
    assert run(reply(1, Op.ACTION)) == [Send(2, Op.ACTION, 1)]
    actions = run(reply(2, Op.ACTION))
    assert len(actions) == 2 and actions[1] == Finish(TxnStatus.COMMITTED)
    end = actions[0]
    assert isinstance(end, Persist) and end.durable and isinstance(end.record, Ended)
    assert end.record.status is TxnStatus.COMMITTED
    assert end.record.branches[0].result == {"x": 1}
    assert not any(isinstance(r, Decided) for r in run.records)


# ------------------------------------------------------------------ refusals


def test_tcc_refusal_aborts_at_once_and_cancels_every_tried_branch() -> None:
    """A refused try aborts with no retry: lazy Decided(abort), cancels to every touched branch."""
    run = Run.start(make_spec(n=3))
    run(reply(0, Op.TRY))
    actions = run(reply(1, Op.TRY, outcome=Outcome.REFUSED, error="short funds", now=T0 + 5))
    assert actions[0] == Persist(
        Decided("t1", Decision.ABORT, "branch 'b1' refused: short funds", T0 + 5), False
    )
    assert sends(actions) == [(0, Op.CANCEL, 1), (1, Op.CANCEL, 1), (2, Op.CANCEL, 1)]
    assert not any(isinstance(a, ScheduleRetry) for a in actions)
    end = run.ok_all(Op.CANCEL)
    assert end[-1] == Finish(TxnStatus.ABORTED)
    assert isinstance(end[-2], Persist) and not end[-2].durable
    assert "refused" in run.state.reason


def test_rejected_try_aborts_without_retry() -> None:
    """A rejected try aborts at once; the rejected branch (nothing applied) gets no cancel."""
    run = Run.start(make_spec(n=2))
    actions = run(reply(0, Op.TRY, outcome=Outcome.REJECTED, error="bad call"))
    assert run.state.status is TxnStatus.ABORTING
    assert "rejected the request" in run.state.reason
    assert sends(actions) == [(1, Op.CANCEL, 1)]
    end = run(reply(1, Op.CANCEL))
    assert end[-1] == Finish(TxnStatus.ABORTED)


def test_sequential_refusal_cancels_only_branches_that_were_sent() -> None:
    """Sequential TCC: branches never tried get no cancel and count as done."""
    run = Run.start(make_spec(n=4, sequential=True))
    run(reply(0, Op.TRY))
    actions = run(reply(1, Op.TRY, outcome=Outcome.REFUSED))
    assert sends(actions) == [(0, Op.CANCEL, 1), (1, Op.CANCEL, 1)]
    assert run.state.branches[2].status is BranchStatus.DONE
    assert run.ok_all(Op.CANCEL)[-1] == Finish(TxnStatus.ABORTED)


def test_saga_compensates_strictly_in_reverse_one_at_a_time() -> None:
    """A saga refused at step 2 compensates 2, then 1, then 0, each after the previous is done."""
    run = Run.start(make_spec("saga", 4))
    run(reply(0, Op.ACTION))
    run(reply(1, Op.ACTION))
    actions = run(reply(2, Op.ACTION, outcome=Outcome.REFUSED))
    assert sends(actions) == [(2, Op.COMPENSATE, 1)]
    assert run.ignores(reply(1, Op.COMPENSATE))  # not the current call
    assert sends(run(reply(2, Op.COMPENSATE))) == [(1, Op.COMPENSATE, 1)]
    assert sends(run(reply(1, Op.COMPENSATE))) == [(0, Op.COMPENSATE, 1)]
    end = run(reply(0, Op.COMPENSATE))
    assert sends(end) == [] and end[-1] == Finish(TxnStatus.ABORTED)
    assert [s.status for s in run.state.branches] == [BranchStatus.DONE] * 4


def test_saga_stuck_compensation_stops_and_needs_attention() -> None:
    """A compensation that gives up parks the saga at once; earlier steps are not compensated."""
    run = Run.start(make_spec("saga", 3, retry=RetryPolicy(maximum_attempts=1)))
    run(reply(0, Op.ACTION))
    run(reply(1, Op.ACTION))
    run(reply(2, Op.ACTION, outcome=Outcome.REFUSED))
    run(reply(2, Op.COMPENSATE))
    actions = run(reply(1, Op.COMPENSATE, outcome=Outcome.TRANSIENT, error="503"))
    assert sends(actions) == []
    assert actions[-1] == Finish(TxnStatus.NEEDS_ATTENTION)
    end = actions[-2]
    assert isinstance(end, Persist) and end.durable
    assert "compensate of branch 'b1' failed after 1 attempts: 503" in run.state.reason
    assert run.state.branches[0].status is BranchStatus.PREPARED


# ------------------------------------------------------------------ transient failures


def test_transient_try_is_retried_with_backoff_until_attempts_run_out_then_aborts() -> None:
    """Transient tries: lazy Attempted + ScheduleRetry per failure, abort after maximum_attempts."""
    run = Run.start(make_spec(n=2))
    run(reply(1, Op.TRY))
    now = T0
    for attempt, delay in [(1, 100), (2, 200)]:
        actions = run(reply(0, Op.TRY, attempt, Outcome.TRANSIENT, now, error="503"))
        at = now + delay
        assert actions == [
            Persist(Attempted("t1", 0, Op.TRY, attempt, "503", now, at), False),
            ScheduleRetry(0, Op.TRY, attempt + 1, at),
        ]
        assert run.state.branches[0].status is BranchStatus.WAITING
        now = at
        assert run(RetryDue(0, Op.TRY, attempt + 1, now)) == [Send(0, Op.TRY, attempt + 1)]
    actions = run(reply(0, Op.TRY, 3, Outcome.TRANSIENT, now, error="503"))
    assert run.state.status is TxnStatus.ABORTING
    assert run.state.reason == "branch 'b0' failed after 3 attempts: 503"
    assert sends(actions) == [(0, Op.CANCEL, 1), (1, Op.CANCEL, 1)]


def test_jitter_sample_scales_the_delay() -> None:
    """The jitter sample carried by the reply scales the backoff (full jitter)."""
    retry = RetryPolicy(initial_interval_s=1.0, maximum_interval_s=1.0, maximum_attempts=3)
    run = Run.start(make_spec(n=1, retry=retry))
    actions = run(reply(0, Op.TRY, outcome=Outcome.TRANSIENT, jitter=0.25))
    assert actions[-1] == ScheduleRetry(0, Op.TRY, 2, T0 + 250)


def test_transient_confirm_is_retried_then_needs_attention_naming_the_branch() -> None:
    """Confirms are retried per policy and, when attempts run out, park the txn with a reason."""
    run = Run.start(make_spec(n=2))
    run.ok_all(Op.TRY)
    run(reply(0, Op.CONFIRM))
    now = T0
    for attempt in (1, 2):
        actions = run(reply(1, Op.CONFIRM, attempt, Outcome.TRANSIENT, now, error="timeout"))
        retry = actions[-1]
        assert isinstance(retry, ScheduleRetry) and retry.attempt == attempt + 1
        now = retry.at_ms
        run(RetryDue(1, Op.CONFIRM, attempt + 1, now))
    actions = run(reply(1, Op.CONFIRM, 3, Outcome.TRANSIENT, now, error="timeout"))
    assert actions[-1] == Finish(TxnStatus.NEEDS_ATTENTION)
    end = actions[-2]
    assert isinstance(end, Persist) and end.durable and isinstance(end.record, Ended)
    assert end.record.reason == "confirm of branch 'b1' failed after 3 attempts: timeout"
    assert [b.status for b in end.record.branches] == ["done", "stuck"]


def test_phase2_needs_attention_waits_until_every_tcc_branch_settled() -> None:
    """A stuck TCC cancel does not stop the others; the txn parks once all have settled."""
    run = Run.start(make_spec(n=3))
    run(reply(0, Op.TRY, outcome=Outcome.REFUSED))
    assert run(reply(1, Op.CANCEL, outcome=Outcome.REFUSED, error="no")) == []
    assert run.state.status is TxnStatus.ABORTING
    assert run(reply(0, Op.CANCEL)) == []
    actions = run(reply(2, Op.CANCEL))
    assert actions[-1] == Finish(TxnStatus.NEEDS_ATTENTION)
    assert run.state.reason == "cancel of branch 'b1' was refused: no"


def test_retry_after_replaces_the_backoff_and_is_bounded() -> None:
    """Retry-After is used as the delay; an infinite one is bounded instead of raising."""
    run = Run.start(make_spec(n=1, retry=RetryPolicy(maximum_attempts=5)))
    run.ok_all(Op.TRY)
    actions = run(reply(0, Op.CONFIRM, outcome=Outcome.TRANSIENT, retry_after_s=7.5))
    assert actions[-1] == ScheduleRetry(0, Op.CONFIRM, 2, T0 + 7500)
    run(RetryDue(0, Op.CONFIRM, 2, T0 + 7500))
    actions = run(reply(0, Op.CONFIRM, 2, Outcome.TRANSIENT, T0, retry_after_s=float("inf")))
    assert actions[-1] == ScheduleRetry(0, Op.CONFIRM, 3, T0 + 3_600_000)


# ------------------------------------------------------------------ deadline


def test_deadline_aborts_the_prepare_phase_and_cancels_in_flight_tries() -> None:
    """DeadlineExpired while preparing aborts and cancels every branch tried so far."""
    run = Run.start(make_spec(n=2, timeout_s=1))
    run(reply(0, Op.TRY))
    actions = run(DeadlineExpired(T0 + 1000))
    assert run.state.reason == "deadline exceeded"
    assert sends(actions) == [(0, Op.CANCEL, 1), (1, Op.CANCEL, 1)]


def test_retry_that_would_pass_the_deadline_aborts_now() -> None:
    """A transient try whose next attempt would be due at or after the deadline aborts."""
    retry = RetryPolicy(
        initial_interval_s=1, maximum_interval_s=1, maximum_attempts=5, jitter=False
    )
    run = Run.start(make_spec(n=1, retry=retry, timeout_s=1))
    actions = run(reply(0, Op.TRY, outcome=Outcome.TRANSIENT, error="503"))
    assert run.state.status is TxnStatus.ABORTING
    assert run.state.reason == "deadline exceeded retrying branch 'b0': 503"
    assert sends(actions) == [(0, Op.CANCEL, 1)]


def test_deadline_after_the_decision_changes_nothing() -> None:
    """The deadline bounds only the prepare phase: after commit it is ignored."""
    run = Run.start(make_spec(n=2))
    run.ok_all(Op.TRY)
    before = run.state
    assert run(DeadlineExpired(T0 + 10**9)) == [] and run.state is before


# ------------------------------------------------------------------ stale events


def test_stale_duplicate_and_reordered_replies_are_ignored() -> None:
    """Replies that are not for the branch's current (op, attempt) change nothing."""
    run = Run.start(make_spec(n=2))
    run(reply(0, Op.TRY, outcome=Outcome.TRANSIENT))
    assert run.ignores(reply(0, Op.TRY, 1))  # the reply of the failed attempt, duplicated
    assert run.ignores(reply(0, Op.TRY, 2))  # attempt 2 was not sent yet
    run(RetryDue(0, Op.TRY, 2, T0 + 100))
    assert run.ignores(reply(0, Op.TRY, 1))  # attempt 1 answering late, while 2 is out
    assert run.ignores(reply(0, Op.TRY, 1, Outcome.REFUSED))
    assert run.ignores(reply(1, Op.CONFIRM))
    assert run.ignores(reply(0, Op.CANCEL, 2))
    run(reply(0, Op.TRY, 2))
    assert run.ignores(reply(0, Op.TRY, 2))  # duplicate of an accepted reply
    actions = run(reply(1, Op.TRY))
    assert sends(actions) == [(0, Op.CONFIRM, 1), (1, Op.CONFIRM, 1)]
    assert run.ignores(reply(1, Op.TRY, outcome=Outcome.REFUSED))


def test_late_try_reply_after_abort_is_ignored() -> None:
    """A try that answers ok after the abort does not revive the transaction."""
    run = Run.start(make_spec(n=2))
    run(reply(0, Op.TRY, outcome=Outcome.REFUSED))
    assert run.ignores(reply(1, Op.TRY))
    assert run.ignores(reply(0, Op.TRY))
    assert run.state.status is TxnStatus.ABORTING
    assert run.ok_all(Op.CANCEL)[-1] == Finish(TxnStatus.ABORTED)


def test_stale_retry_timers_are_ignored() -> None:
    """A RetryDue for the wrong attempt, or after the branch moved on, changes nothing."""
    run = Run.start(make_spec(n=2))
    run(reply(0, Op.TRY, outcome=Outcome.TRANSIENT))
    assert run.ignores(RetryDue(0, Op.TRY, 3, T0))
    assert run.ignores(RetryDue(1, Op.TRY, 2, T0))
    run(reply(1, Op.TRY, outcome=Outcome.REFUSED))
    assert run.ignores(RetryDue(0, Op.TRY, 2, T0))  # the txn aborted; the try's timer is moot


def test_terminal_state_ignores_every_event() -> None:
    """Once terminal, no event produces an action."""
    run = Run.start(make_spec("saga", 1))
    run(reply(0, Op.ACTION))
    assert run.state.status is TxnStatus.COMMITTED
    for event in [
        reply(0, Op.ACTION),
        reply(0, Op.COMPENSATE),
        RetryDue(0, Op.ACTION, 2, T0),
        DeadlineExpired(T0),
        AbortRequested("x", T0),
        RetryRequested("x", T0),
    ]:
        assert run.ignores(event)


# ------------------------------------------------------------------ operator events


def test_operator_abort_before_decision_aborts_and_is_noted() -> None:
    """AbortRequested while preparing logs the operator's note and aborts."""
    run = Run.start(make_spec(n=2))
    actions = run(AbortRequested("fraud", T0 + 3))
    assert actions[0] == Persist(OperatorAction("t1", "abort", "fraud", T0 + 3), False)
    assert run.state.reason == "aborted by operator: fraud"
    assert sends(actions) == [(0, Op.CANCEL, 1), (1, Op.CANCEL, 1)]


def test_operator_abort_after_commit_decision_is_ignored() -> None:
    """An operator cannot abort a committing transaction."""
    run = Run.start(make_spec(n=1))
    run.ok_all(Op.TRY)
    assert run.ignores(AbortRequested("too late", T0))
    assert run.state.status is TxnStatus.COMMITTING


def test_operator_retry_sends_waiting_calls_now() -> None:
    """RetryRequested sends every waiting call as its next attempt; the old timer is then moot."""
    run = Run.start(make_spec(n=2))
    run(reply(0, Op.TRY, outcome=Outcome.TRANSIENT))
    actions = run(RetryRequested("now", T0 + 1))
    assert actions == [
        Persist(OperatorAction("t1", "retry", "now", T0 + 1), False),
        Send(0, Op.TRY, 2),
    ]
    assert run.ignores(RetryDue(0, Op.TRY, 2, T0 + 100))


# ------------------------------------------------------------------ recovery


def snapshot(
    spec: TransactionSpec,
    status: TxnStatus,
    decision: Decision | None = None,
    attempts: dict[tuple[int, Op], tuple[int, int]] | None = None,
) -> TxnSnapshot:
    return TxnSnapshot(
        spec=spec,
        created_at_ms=T0,
        deadline_at_ms=T0 + 30_000,
        status=status,
        decision=decision,
        reason="logged reason",
        attempts=attempts or {},
    )


def test_recover_preparing_is_presumed_abort_cancelling_every_branch() -> None:
    """No decision in the log: abort, logged lazily, and cancel every branch, even untried ones."""
    spec = make_spec(n=3, sequential=True)
    state, actions = machine.recover(snapshot(spec, TxnStatus.PREPARING), T0 + 50)
    assert actions[0] == Persist(
        Decided("t1", Decision.ABORT, "recovered with no decision (presumed abort)", T0 + 50), False
    )
    assert actions[1:] == [Send(i, Op.CANCEL, 1) for i in range(3)]
    assert state.status is TxnStatus.ABORTING


def test_recover_preparing_saga_compensates_from_the_last_branch() -> None:
    """Presumed abort of a saga compensates every branch, last first, one at a time."""
    run = Run(*machine.recover(snapshot(make_spec("saga", 3), TxnStatus.PREPARING), T0))
    assert sends(run.actions) == [(2, Op.COMPENSATE, 1)]
    assert sends(run(reply(2, Op.COMPENSATE))) == [(1, Op.COMPENSATE, 1)]
    assert sends(run(reply(1, Op.COMPENSATE))) == [(0, Op.COMPENSATE, 1)]
    assert run(reply(0, Op.COMPENSATE))[-1] == Finish(TxnStatus.ABORTED)


def test_recover_committing_confirms_every_branch_without_a_new_decision() -> None:
    """A durable commit decision is carried out: confirm all, nothing re-decided."""
    snap = snapshot(make_spec(n=3), TxnStatus.COMMITTING, Decision.COMMIT)
    run = Run(*machine.recover(snap, T0))
    assert run.actions == [Send(i, Op.CONFIRM, 1) for i in range(3)]
    assert run.ok_all(Op.CONFIRM)[-1] == Finish(TxnStatus.COMMITTED)


def test_recover_aborting_continues_the_abort_without_a_new_decision() -> None:
    """A logged abort is continued with its logged reason and no second Decided."""
    snap = snapshot(make_spec(n=2), TxnStatus.ABORTING, Decision.ABORT)
    state, actions = machine.recover(snap, T0)
    assert actions == [Send(0, Op.CANCEL, 1), Send(1, Op.CANCEL, 1)]
    assert state.reason == "logged reason"


def test_recover_respects_the_durable_retry_schedule() -> None:
    """Recovery waits out a future next_at_ms, sends a due retry now, continues the count."""
    attempts = {(0, Op.CONFIRM): (3, T0 + 500), (1, Op.CONFIRM): (2, T0 - 1), (2, Op.TRY): (4, T0)}
    snap = snapshot(
        make_spec(n=3, retry=RetryPolicy(maximum_attempts=10)),
        TxnStatus.COMMITTING,
        Decision.COMMIT,
        attempts,
    )
    run = Run(*machine.recover(snap, T0))
    assert run.actions == [
        ScheduleRetry(0, Op.CONFIRM, 4, T0 + 500),
        Send(1, Op.CONFIRM, 3),
        Send(2, Op.CONFIRM, 1),
    ]
    assert run.state.branches[0].status is BranchStatus.WAITING
    assert run(RetryDue(0, Op.CONFIRM, 4, T0 + 500)) == [Send(0, Op.CONFIRM, 4)]


def test_recover_with_the_budget_spent_makes_one_more_attempt_then_parks() -> None:
    """If the log shows every attempt used, recovery tries once more; its failure parks the txn."""
    snap = snapshot(make_spec(n=1), TxnStatus.ABORTING, Decision.ABORT, {(0, Op.CANCEL): (3, T0)})
    run = Run(*machine.recover(snap, T0))
    assert run.actions == [Send(0, Op.CANCEL, 4)]
    actions = run(reply(0, Op.CANCEL, 4, Outcome.TRANSIENT, error="down"))
    assert actions[-1] == Finish(TxnStatus.NEEDS_ATTENTION)


def test_recover_saga_continues_each_branch_retry_schedule() -> None:
    """Saga recovery waits out the persisted backoff and continues each branch's count."""
    snap = snapshot(
        make_spec("saga", 2),
        TxnStatus.ABORTING,
        Decision.ABORT,
        {(1, Op.COMPENSATE): (2, T0 + 10_000), (0, Op.COMPENSATE): (4, T0 - 1)},
    )
    state, actions = machine.recover(snap, T0)
    assert actions == [ScheduleRetry(1, Op.COMPENSATE, 3, T0 + 10_000)]
    state, actions = machine.step(state, RetryDue(1, Op.COMPENSATE, 3, T0 + 10_000))
    assert actions == [Send(1, Op.COMPENSATE, 3)]
    state, actions = machine.step(state, reply(1, Op.COMPENSATE, attempt=3, now=T0 + 10_001))
    assert actions == [Send(0, Op.COMPENSATE, 5)]


@pytest.mark.parametrize(
    "status", [TxnStatus.COMMITTED, TxnStatus.ABORTED, TxnStatus.NEEDS_ATTENTION]
)
def test_recover_terminal_does_nothing(status: TxnStatus) -> None:
    """Recovering a terminal transaction yields no action."""
    state, actions = machine.recover(snapshot(make_spec(), status, Decision.ABORT), T0)
    assert actions == [] and state.status is status


def test_recover_committing_saga_just_ends_committed() -> None:
    """A saga has no confirms: a committing one (only reachable by hand) ends committed."""
    snap = snapshot(make_spec("saga", 2), TxnStatus.COMMITTING, Decision.COMMIT)
    _, actions = machine.recover(snap, T0)
    assert actions[-1] == Finish(TxnStatus.COMMITTED) and sends(actions) == []


# ------------------------------------------------------------------ random walks

_BIASED = [Outcome.OK] * 5 + [Outcome.TRANSIENT] * 2 + [Outcome.REFUSED, Outcome.REJECTED]


@st.composite
def walks(draw: st.DrawFn) -> tuple[TransactionSpec, list[int]]:
    protocol = draw(st.sampled_from(["tcc", "saga"]))
    n = draw(st.integers(1, 4))
    retry = RetryPolicy(
        initial_interval_s=0.01,
        maximum_interval_s=0.5,
        maximum_attempts=draw(st.integers(1, 4)),
        jitter=draw(st.booleans()),
    )
    spec = make_spec(protocol, n, sequential=draw(st.booleans()), retry=retry, timeout_s=5)
    return spec, draw(st.lists(st.integers(0, 2**32), max_size=60))


def pick_event(state: TxnState, choice: int, now: int) -> Event:
    """Turn a number into a plausible (often current, sometimes stale) event."""
    kind, rest = choice % 10, choice // 10
    n = len(state.branches)
    branch, rest = rest % n, rest // n
    b = state.branches[branch]
    outcome = _BIASED[rest % len(_BIASED)]
    jitter = (rest % 97) / 97
    if kind <= 4 and b.status is BranchStatus.IN_FLIGHT and b.op is not None:
        return Replied(branch, b.op, b.attempt, outcome, now, jitter, error="e")
    if kind <= 6 and b.status is BranchStatus.WAITING and b.op is not None:
        return RetryDue(branch, b.op, b.attempt + 1, now)
    if kind == 7:
        return DeadlineExpired(now)
    if kind == 8:
        return RetryRequested("op", now) if rest % 2 else AbortRequested("op", now)
    op = list(Op)[rest % 5]
    return Replied(branch, op, rest % 4, outcome, now, jitter)  # mostly stale


@settings(max_examples=max(EXAMPLES, 200))
@given(walks())
def test_step_never_mutates_and_the_log_folds_to_the_machine_status(
    walk: tuple[TransactionSpec, list[int]],
) -> None:
    """Random walks: step() never mutates its input; its records fold to its status."""
    spec, choices = walk
    run = Run.start(spec)
    now = T0
    for choice in choices:
        now += choice % 300
        was_terminal = run.state.status.terminal
        before = run.state
        run(pick_event(run.state, choice, now))
        if was_terminal:
            assert run.state is before and run.actions == []
        for action in run.actions:
            if isinstance(action, Send):
                b = run.state.branches[action.branch]
                assert b.status is BranchStatus.IN_FLIGHT and b.op is action.op
                assert b.attempt == action.attempt
                if action.op is Op.CONFIRM:
                    assert run.state.decision is Decision.COMMIT
        snap = fold(run.records)
        assert (snap.status, snap.decision) == (run.state.status, run.state.decision)
    hypothesis_event(f"{spec.protocol} ended {run.state.status}")
    if run.state.status is TxnStatus.COMMITTING:
        assert any(isinstance(r, Decided) and r.decision is Decision.COMMIT for r in run.records)
