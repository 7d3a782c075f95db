"""Tier-1 deterministic simulation of the whole protocol, in process.

The pure machine is driven by a small shell that behaves like the coordinator
(it honours ``Persist(durable=True)`` by syncing the log before any later
action), over a ``MemoryStore(lose_unsynced=True)`` that forgets unsynced
records when the coordinator crashes, a simulated network that holds every
message in flight (delivered in any order, dropped, duplicated) and simulated
participants that keep the TCC / saga barrier: each (transaction, branch,
operation) applies at most once, duplicates get the first answer (a business
refusal is not remembered: a later duplicate of the try may still apply), a
cancel or compensate before its try / action is a recorded no-op that bars the
later try, and every applied effect is written in the participant's ledger.

Hypothesis chooses the transactions, the order of deliveries and every fault:
transient errors, business refusals, a timeout after the effect was applied,
lost and duplicated messages, participants going down and coming back, timers
firing, operator actions, and coordinator crashes at any point, including
between appending a durable record and its sync, and during recovery. The
invariants are checked after every step; at the end the faults stop,
everything in flight is delivered, the coordinator recovers once more, timers
run until nothing is left, and every transaction must be terminal and atomic.

Replay: a failure prints the steps and a ``@reproduce_failure`` blob, and the
example is saved in ``.hypothesis/``. ``ACCORD_HYPOTHESIS_EXAMPLES=N`` runs N
examples (200 by default).
"""

from __future__ import annotations

import os
import random
from collections.abc import Coroutine
from dataclasses import dataclass, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from accord.core import machine
from accord.core.machine import (
    AbortRequested,
    Action,
    ArmDeadline,
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
from accord.core.records import Decision, OperatorAction, TxnStatus
from accord.core.spec import BranchSpec, Op, Protocol, RetryPolicy, TransactionSpec
from accord.log.base import TxnRow
from accord.log.memory import MemoryStore

EXAMPLES = int(os.environ.get("ACCORD_HYPOTHESIS_EXAMPLES", "200"))
# Hypothesis may shrink a failure for up to 5 minutes: let it finish and print.
pytestmark = pytest.mark.timeout(max(900, EXAMPLES))
T0 = 1_000_000
MAX_TXNS = 5
MAX_WIRE = 40
PARTICIPANTS = ("p0", "p1", "p2")
FORWARD = {Op.CANCEL: Op.TRY, Op.COMPENSATE: Op.ACTION}
UNDO = {Op.TRY: Op.CANCEL, Op.ACTION: Op.COMPENSATE}

# A crash after this many micro-steps of the resulting actions (None: no crash),
# rare enough that transactions also get to finish between crashes.
CRASH_AFTER = st.sampled_from([None] * 20 + [0, 1, 2, 3])


@dataclass(frozen=True)
class Shape:
    protocol: Protocol
    participants: tuple[str, ...]
    sequential: bool
    attempts: int
    timeout_ms: int

    def spec(self, txid: str) -> TransactionSpec:
        retry = RetryPolicy(
            initial_interval_s=0.05, maximum_interval_s=0.4, maximum_attempts=self.attempts
        )
        return TransactionSpec(
            protocol=self.protocol,
            branches=tuple(
                BranchSpec(f"b{i}", p, {"n": i}, retry) for i, p in enumerate(self.participants)
            ),
            id=txid,
            timeout_s=self.timeout_ms / 1000,
            sequential=self.sequential,
        )


SHAPES = st.builds(
    Shape,
    protocol=st.sampled_from(Protocol),
    participants=st.lists(st.sampled_from(PARTICIPANTS), min_size=1, max_size=4).map(tuple),
    sequential=st.booleans(),
    attempts=st.integers(1, 4),
    timeout_ms=st.integers(200, 10_000),
)


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (MemoryStore's reads) without a loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("a MemoryStore call suspended")


@dataclass(frozen=True)
class Msg:
    """A request to a participant, or (``outcome`` set) its reply."""

    txid: str
    run: int  # which in-memory run of the transaction sent it
    branch: int
    op: Op
    attempt: int
    participant: str
    durable_commit: bool = False  # a confirm: was commit durable in the log when sent?
    outcome: Outcome | None = None
    error: str = ""


@dataclass(frozen=True)
class Timer:
    at_ms: int
    txid: str
    run: int
    retry: ScheduleRetry | None  # None: the deadline


class Participant:
    """A participant keeping the barrier of the TCC / saga protocol."""

    def __init__(self, name: str, history: list[tuple[str, int, Op, bool]]) -> None:
        self.name = name
        self.history = history  # shared by all participants: (txid, branch, op, applied)
        self.answers: dict[tuple[str, int, Op], Outcome] = {}
        self.ledger: list[tuple[str, int, Op]] = []  # applied effects, in order
        self.nulls: list[tuple[str, int, Op]] = []  # cancels / compensations with nothing to undo
        self.violations: list[str] = []

    def handle(self, msg: Msg, fault: str) -> Outcome:
        key = (msg.txid, msg.branch, msg.op)
        if fault == "transient":  # failed before looking at anything
            return Outcome.TRANSIENT
        if key in self.answers:  # a duplicate gets the first answer, and no effect
            return self.answers[key]
        op = msg.op
        if op in UNDO:
            if (msg.txid, msg.branch, UNDO[op]) in self.answers:
                answer = Outcome.REFUSED  # cancelled first: this try must never apply
            elif fault == "refuse":
                # A business refusal is not remembered (stock may come back): a
                # later duplicate of this try could still apply, unless its
                # cancel got here first.
                return Outcome.REFUSED
            else:
                self.ledger.append(key)
                answer = Outcome.OK
        elif op is Op.CONFIRM:
            if not msg.durable_commit:
                self.violations.append(f"{key}: confirm sent before commit was durable")
            if self.answers.get((msg.txid, msg.branch, Op.TRY)) is not Outcome.OK:
                self.violations.append(f"{key}: confirm of a branch whose try did not apply")
            if (msg.txid, msg.branch, Op.CANCEL) in self.answers:
                self.violations.append(f"{key}: confirm after cancel")
            self.ledger.append(key)
            answer = Outcome.OK
        else:
            if (msg.txid, msg.branch, Op.CONFIRM) in self.answers:
                self.violations.append(f"{key}: cancel after confirm")
            forward = (msg.txid, msg.branch, FORWARD[op])
            if self.answers.get(forward) is Outcome.OK:
                self.ledger.append(key)
            else:
                self.nulls.append(key)
            answer = Outcome.OK
        self.answers[key] = answer
        if answer is Outcome.OK:
            self.history.append((*key, key in self.ledger))
        return answer

    def applied(self, txid: str, branch: int, op: Op) -> bool:
        return (txid, branch, op) in self.ledger


class Simulation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore(lose_unsynced=True)
        self.now = T0
        self.rng = random.Random(0)
        self.runs = 0
        self.run_of: dict[str, int] = {}
        self.states: dict[str, TxnState] = {}
        self.specs: dict[str, TransactionSpec] = {}
        self.wire: list[Msg] = []
        self.timers: list[Timer] = []
        self.history: list[tuple[str, int, Op, bool]] = []
        self.participants = {name: Participant(name, self.history) for name in PARTICIPANTS}
        self.acked: dict[str, TxnStatus] = {}
        self.down: set[str] = set()  # participants that are unreachable for now
        self.decisions: dict[str, Decision] = {}
        self.crashes = 0

    # ------------------------------------------------------------ the shell

    def rows(self) -> dict[str, TxnRow]:
        """What the log holds durably (MemoryStore writes only synced records)."""
        return {r.id: r for r in run_sync(self.store.list(limit=1_000_000))}

    def launch(
        self, txid: str, state: TxnState, actions: list[Action], crash_after: int | None
    ) -> bool:
        self.runs += 1
        self.run_of[txid] = self.runs
        return self.perform(txid, state, actions, crash_after)

    def perform(
        self, txid: str, state: TxnState, actions: list[Action], crash_after: int | None = None
    ) -> bool:
        """Perform ``actions`` in order like the coordinator; True if it crashed meanwhile.

        ``crash_after`` counts micro-steps: appending a record and syncing it are two."""
        self.states[txid] = state
        run = self.run_of[txid]
        budget = crash_after
        for action in actions:
            micro = 2 if isinstance(action, Persist) and action.durable else 1
            for part in range(micro):
                if budget is not None:
                    if budget == 0:
                        self.crash()
                        return True
                    budget -= 1
                if isinstance(action, Persist):
                    if part == 0:
                        self.store.append(action.record)
                    else:
                        # Durable: nothing later happens before the record is synced.
                        rejected = self.store.sync_now()
                        assert not rejected, f"Begin refused for {rejected}"
                elif isinstance(action, Send):
                    self.send(txid, run, action)
                elif isinstance(action, ScheduleRetry):
                    self.timers.append(Timer(action.at_ms, txid, run, action))
                elif isinstance(action, ArmDeadline):
                    self.timers.append(Timer(action.at_ms, txid, run, None))
                elif isinstance(action, Finish):
                    self.acked[txid] = action.status
                    # The coordinator cancels a finished run's timers.
                    self.timers = [t for t in self.timers if t.txid != txid]
        return False

    def send(self, txid: str, run: int, send: Send) -> None:
        spec = self.specs[txid]
        durable_commit = False
        if send.op is Op.CONFIRM:
            row = self.rows().get(txid)
            durable_commit = row is not None and row.decision == Decision.COMMIT.value
        self.wire.append(
            Msg(
                txid,
                run,
                send.branch,
                send.op,
                send.attempt,
                spec.branches[send.branch].participant,
                durable_commit,
            )
        )

    def step(self, txid: str, event: Event, crash_after: int | None = None) -> None:
        state = self.states.get(txid)
        if state is None:
            return
        new, actions = machine.step(state, event)
        self.perform(txid, new, actions, crash_after)

    def deliver_one(self, index: int, fault: str, crash_after: int | None = None) -> None:
        msg = self.wire.pop(index % len(self.wire))
        current = self.run_of.get(msg.txid) == msg.run
        if msg.outcome is None:
            if msg.participant in self.down:
                fault = "drop"  # connection refused: not applied, the caller sees a failure
            if fault == "drop":
                outcome, error = Outcome.TRANSIENT, "timeout: request lost"
            else:
                participant = self.participants[msg.participant]
                applied_fault = "none" if fault == "applied_but_timeout" else fault
                outcome = participant.handle(msg, applied_fault)
                error = "refused" if outcome is Outcome.REFUSED else ""
                if fault == "applied_but_timeout":
                    outcome, error = Outcome.TRANSIENT, "timeout: reply lost"
                elif outcome is Outcome.TRANSIENT:
                    error = "503"
            if current:  # a reply to a dead run has nobody to go to
                self.wire.append(replace(msg, outcome=outcome, error=error))
            return
        if not current:
            return
        if fault == "drop":  # the reply is lost: the caller's transport times out
            self.wire.append(replace(msg, outcome=Outcome.TRANSIENT, error="timeout"))
            return
        event = Replied(
            msg.branch,
            msg.op,
            msg.attempt,
            msg.outcome,
            self.now,
            self.rng.random(),
            error=msg.error,
        )
        self.step(msg.txid, event, crash_after)

    def fire(self, timer: Timer, crash_after: int | None = None) -> None:
        self.timers.remove(timer)
        if self.run_of.get(timer.txid) != timer.run:
            return
        self.now = max(self.now, timer.at_ms)
        event: Event
        if timer.retry is None:
            event = DeadlineExpired(self.now)
        else:
            event = RetryDue(timer.retry.branch, timer.retry.op, timer.retry.attempt, self.now)
        self.step(timer.txid, event, crash_after)

    def crash(self, again_after: int | None = None) -> None:
        """The coordinator dies: unsynced records, states, timers and replies are lost;
        requests already on the wire may still arrive. Then it recovers."""
        self.crashes += 1
        self.store.crash()
        self.states.clear()
        self.run_of.clear()
        self.timers.clear()
        self.wire = [m for m in self.wire if m.outcome is None]
        for snap in run_sync(self.store.load_active()):
            state, actions = machine.recover(snap, self.now)
            if self.launch(snap.txid, state, actions, again_after):
                return  # crashed during recovery; the nested crash recovered
            again_after = None

    # ------------------------------------------------------------ rules

    @initialize(seed=st.integers(0, 2**32 - 1), first=SHAPES)
    def begin_with_a_transaction(self, seed: int, first: Shape) -> None:
        self.rng = random.Random(seed)  # the jitter samples
        self.start(first, None)

    @rule(shape=SHAPES, crash_after=CRASH_AFTER)
    def start(self, shape: Shape, crash_after: int | None) -> None:
        if len(self.specs) >= MAX_TXNS:
            return
        txid = f"t{len(self.specs)}"
        spec = shape.spec(txid)
        self.specs[txid] = spec
        state, actions = machine.start(spec, self.now)
        self.launch(txid, state, actions, crash_after)

    # Rules that find nothing to act on do nothing (rather than use preconditions,
    # which make Hypothesis give up on examples where most rules are disabled).

    # One rule per fault, so that Hypothesis's swarm testing (it disables a random
    # subset of rules in each example) also explores runs dominated by one fault.

    @rule(index=st.integers(0, MAX_WIRE), crash_after=CRASH_AFTER)
    def deliver(self, index: int, crash_after: int | None) -> None:
        if self.wire:
            self.deliver_one(index, "none", crash_after)

    @rule(index=st.integers(0, MAX_WIRE))
    def deliver_with_a_transient_error(self, index: int) -> None:
        if self.wire:
            self.deliver_one(index, "transient")

    @rule(index=st.integers(0, MAX_WIRE))
    def deliver_with_a_refusal(self, index: int) -> None:
        if self.wire:
            self.deliver_one(index, "refuse")

    @rule(index=st.integers(0, MAX_WIRE))
    def deliver_but_lose_the_reply(self, index: int) -> None:
        if self.wire:
            self.deliver_one(index, "applied_but_timeout")

    @rule(index=st.integers(0, MAX_WIRE))
    def duplicate_message(self, index: int) -> None:
        if 0 < len(self.wire) < MAX_WIRE:
            self.wire.append(self.wire[index % len(self.wire)])

    @rule(index=st.integers(0, MAX_WIRE))
    def drop_message(self, index: int) -> None:
        if self.wire:
            self.deliver_one(index, "drop")

    @rule(crash_after=CRASH_AFTER)
    def fire_next_timer(self, crash_after: int | None) -> None:
        if self.timers:
            self.fire(min(self.timers, key=lambda t: t.at_ms), crash_after)

    @rule(ms=st.integers(0, 1500))
    def advance_clock(self, ms: int) -> None:
        self.now += ms
        while True:
            due = [t for t in self.timers if t.at_ms <= self.now]
            if not due:
                break
            self.fire(min(due, key=lambda t: t.at_ms))

    @rule(participant=st.sampled_from(PARTICIPANTS))
    def participant_goes_down_or_comes_back(self, participant: str) -> None:
        self.down ^= {participant}

    @rule()
    def group_commit(self) -> None:
        self.store.sync_now()

    @rule(
        go=st.sampled_from([False, False, True]),
        again_after=st.sampled_from([None, None, 0, 1, 2, 3]),
    )
    def crash_and_recover(self, go: bool, again_after: int | None) -> None:
        if go:  # one step in three: often enough, yet leaves room to finish
            self.crash(again_after)

    @rule(index=st.integers(0, MAX_TXNS), retry=st.booleans())
    def operator_acts_on_a_running_transaction(self, index: int, retry: bool) -> None:
        if not self.states:
            return
        txid = sorted(self.states)[index % len(self.states)]
        event: Event = RetryRequested("op", self.now) if retry else AbortRequested("op", self.now)
        self.step(txid, event)

    @rule(index=st.integers(0, MAX_TXNS))
    def operator_retries_needs_attention(self, index: int) -> None:
        parked = sorted(
            txid for txid, row in self.rows().items() if row.status is TxnStatus.NEEDS_ATTENTION
        )
        if not parked:
            return
        txid = parked[index % len(parked)]
        self.store.append(OperatorAction(txid, "retry", "operator", self.now))
        self.store.sync_now()
        snap = run_sync(self.store.get(txid))
        assert snap.status in (TxnStatus.COMMITTING, TxnStatus.ABORTING), snap.status
        self.acked.pop(txid, None)
        self.launch(txid, *machine.recover(snap, self.now), crash_after=None)

    # ------------------------------------------------------------ invariants

    def net_effect(self, txid: str) -> dict[int, set[Op]]:
        """Per branch, the operations applied (net of undo) at its participant."""
        spec = self.specs[txid]
        out: dict[int, set[Op]] = {}
        for i, branch in enumerate(spec.branches):
            p = self.participants[branch.participant]
            out[i] = {op for op in Op if p.applied(txid, i, op)}
        return out

    def check_atomic(self, txid: str, status: TxnStatus) -> None:
        spec = self.specs[txid]
        for branch, ops in self.net_effect(txid).items():
            if status is TxnStatus.COMMITTED:
                want = {Op.TRY, Op.CONFIRM} if spec.protocol is Protocol.TCC else {Op.ACTION}
                assert ops == want, f"{txid} committed but branch {branch} has {ops}"
            elif status is TxnStatus.ABORTED:
                assert Op.CONFIRM not in ops, f"{txid} aborted but branch {branch} confirmed"
                forward = spec.prepare_op
                if forward in ops:
                    assert UNDO[forward] in ops, f"{txid} aborted, branch {branch} not undone"

    def check_saga_order(self) -> None:
        """Saga compensations run strictly in reverse: when step k is compensated, every
        later step whose action applied has already been compensated."""
        applied: set[tuple[str, int, Op]] = set()
        for txid, branch, op, _ in self.history:
            if op is Op.COMPENSATE:
                for later in range(branch + 1, len(self.specs[txid].branches)):
                    if (txid, later, Op.ACTION) in applied:
                        assert (txid, later, Op.COMPENSATE) in applied, (
                            f"{txid}: step {branch} compensated before step {later}"
                        )
            applied.add((txid, branch, op))

    @invariant()
    def log_and_participants_agree(self) -> None:
        assert self.store.violations == []
        rows = self.rows()
        for txid, decision in self.decisions.items():
            row = rows.get(txid)
            assert row is not None, f"{txid}: a durable decision vanished"
            assert row.decision == decision.value, f"{txid}: decision flipped to {row.decision}"
        for txid, row in rows.items():
            if row.decision is not None:
                self.decisions.setdefault(txid, Decision(row.decision))
            if row.status.terminal:
                self.check_atomic(txid, row.status)
        for txid, status in self.acked.items():
            if status is TxnStatus.NEEDS_ATTENTION:  # durable before the caller hears
                assert rows[txid].status is status, f"{txid}: acknowledged {status} lost"
            elif status is TxnStatus.COMMITTED:
                # Its decision is durable (a saga's end is its decision); the end
                # of a TCC commit may be lost, and recovery confirms again.
                assert rows[txid].decision == Decision.COMMIT.value, f"{txid}: commit lost"
                assert rows[txid].status in (TxnStatus.COMMITTED, TxnStatus.COMMITTING)
            # What the caller was told holds at the participants, durable or not.
            self.check_atomic(txid, status)
        self.check_saga_order()
        for p in self.participants.values():
            assert p.violations == []
            assert len(set(p.ledger)) == len(p.ledger), f"{p.name}: an effect applied twice"
            for n, (txid, branch, op) in enumerate(p.ledger):
                if op in FORWARD:
                    assert (txid, branch, FORWARD[op]) in p.ledger[:n], "undo without its forward"
                if op in UNDO:
                    assert (txid, branch, UNDO[op]) not in p.nulls, "applied after its cancel"

    def drain(self) -> None:
        """No more faults: deliver everything in flight and fire every timer until quiet."""
        for _ in range(5000):
            if self.wire:
                self.deliver_one(0, "none")
            elif self.timers:
                self.fire(min(self.timers, key=lambda t: t.at_ms))
            else:
                return
        raise AssertionError(f"not quiet after 5000 steps: {self.wire[:5]} {self.timers[:5]}")

    def teardown(self) -> None:
        """Heal and let everything finish, then crash and recover once more and finish
        again: every transaction must be terminal and atomic, every acknowledgement hold."""
        self.down.clear()
        self.drain()
        self.store.sync_now()  # group commit gets to the lazy records too
        self.log_and_participants_agree()
        self.crash()
        self.drain()
        self.store.sync_now()
        self.log_and_participants_agree()
        rows = self.rows()
        for txid in self.specs:
            row = rows.get(txid)
            if row is None:  # its Begin never became durable: nothing may have been sent
                assert not any(e[0] == txid for p in self.participants.values() for e in p.ledger)
                continue
            assert row.status.terminal, f"{txid} stuck in {row.status}"
            if row.status is TxnStatus.NEEDS_ATTENTION:
                assert row.reason, f"{txid} needs attention without a reason"
            self.check_atomic(txid, row.status)
            hypothesis_event(f"{self.specs[txid].protocol} {row.status}")
            acked = self.acked.get(txid)
            if acked is not None:
                assert acked is row.status, f"{txid}: told {acked}, log says {row.status}"
        for state in self.states.values():
            assert state.status.terminal
        hypothesis_event(f"crashes: {min(self.crashes - 1, 3)}")


Simulation.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSimulation = Simulation.TestCase
