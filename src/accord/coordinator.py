"""The coordinator: the imperative shell around the pure state machine.

Each transaction is driven by callbacks (no task per transaction or per
call): events are fed into :func:`accord.core.machine.step` and the actions
it returns are performed in order: append to the log (pausing until the
record is durable where the action says so), start participant calls through
the transport, arm timers. Everything that decides lives in the machine;
everything that waits lives here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec

from accord import _crash
from accord._completion import Completion
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
    BranchSummary,
    Decided,
    Decision,
    Ended,
    OperatorAction,
    TxnSnapshot,
    TxnStatus,
)
from accord.core.spec import TransactionSpec
from accord.errors import (
    AccordError,
    CoordinatorClosed,
    DuplicateTransaction,
    Overloaded,
    TransactionNotFound,
)
from accord.log.base import Store
from accord.transport.base import Call, Reply, Transport

log = logging.getLogger("accord.coordinator")
_encode = msgspec.json.Encoder().encode

DEFAULT_MAX_IN_FLIGHT = 1000
# A call the transport has not answered this long after its own timeout is
# taken as timed out (see Coordinator._watch); checked this often.
CALL_GRACE_S = 1.0
DEFAULT_WATCH_INTERVAL_S = 1.0


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class TxnResult:
    """How a transaction ended, as its caller hears it."""

    txid: str
    status: TxnStatus
    reason: str
    branches: tuple[BranchSummary, ...] = ()
    latency_s: float = 0.0

    @property
    def committed(self) -> bool:
        return self.status is TxnStatus.COMMITTED


@dataclass(slots=True)
class Metrics:
    """Counters of what the coordinator did (cheap ints on the hot path)."""

    started: int = 0
    recovered: int = 0
    committed: int = 0
    aborted: int = 0
    needs_attention: int = 0
    calls: int = 0
    retries: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in Outcome})


class Observer:
    """Hooks for metrics, tracing and the dashboard: called on the loop thread.

    Every method is optional to override and must be cheap and never raise
    into the coordinator (exceptions are logged and dropped). ``Coordinator``
    calls them only when an observer is installed, so the hot path pays
    nothing without one.
    """

    def txn_started(self, txid: str, spec: TransactionSpec, recovered: bool) -> None:
        """A transaction is being driven (new, or resumed from the log)."""

    def call_started(self, txid: str, branch: str, op: str, attempt: int) -> None:
        """A participant call is about to be sent."""

    def call_finished(
        self,
        txid: str,
        branch: str,
        op: str,
        attempt: int,
        outcome: str,
        latency_s: float,
        error: str,
    ) -> None:
        """A participant call returned (or failed) after ``latency_s``."""

    def txn_finished(self, txid: str, status: TxnStatus, reason: str, latency_s: float) -> None:
        """A transaction reached a terminal status."""


class _Run:
    """One transaction being driven: its state, inbox and timers.

    Driven by callbacks, not a task: events are applied as they arrive, and
    when an action must wait for the log to be durable the rest of the batch
    resumes from the sync future's callback. ``busy`` keeps events that
    arrive meanwhile in the inbox, so they are applied in order.
    """

    __slots__ = (
        "busy", "events", "finished", "result", "sent", "started_s", "state", "summary",
        "timers",
    )  # fmt: skip

    def __init__(self, state: TxnState, result: asyncio.Future[TxnResult], started_s: float):
        self.state = state
        self.events: deque[Event] = deque()
        self.busy = False
        self.result = result
        self.timers: list[asyncio.TimerHandle] = []
        self.started_s = started_s
        self.finished = False
        # The branches as the terminal record logged them, reused for the result.
        self.summary: tuple[BranchSummary, ...] | None = None
        # Per branch, its last call and when (loop time) it went to the
        # transport: what the call watchdog checks.
        self.sent: list[tuple[Send, float] | None] = [None] * len(state.branches)


# What an operator's action found: a result future (running, or already
# finished), a snapshot to resume, or nothing to do.
_Operated = asyncio.Future[TxnResult] | TxnSnapshot | None

_CRASH_KIND = {
    Begin: "begin",
    Attempted: "attempt",
    Ended: "end",
    OperatorAction: "operator",
}


def _crash_kind(record: object) -> str:
    if isinstance(record, Decided):
        return "commit" if record.decision is Decision.COMMIT else "abort"
    return _CRASH_KIND[type(record)]


class Coordinator:
    """Drives global transactions to a terminal status, durably.

    ``max_in_flight`` bounds the transactions driven at once: ``submit`` waits
    for a slot (backpressure) rather than growing without bound.

    Every ``watch_interval_s`` a watchdog looks for calls the transport has
    left unanswered for longer than their ``timeout_s`` plus ``CALL_GRACE_S``
    (a transport bug, or an in-process participant that never answers) and
    counts each as a transient failure, so that it is retried (or, out of
    attempts, parks the transaction) instead of holding its branch forever.
    An answer that comes later is stale and ignored.
    """

    def __init__(
        self,
        store: Store,
        transport: Transport,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        clock_ms: Callable[[], int] = wall_clock_ms,
        rng: random.Random | None = None,
        observer: Observer | None = None,
        gate: Callable[[str], BaseException | None] | None = None,
        watch_interval_s: float = DEFAULT_WATCH_INTERVAL_S,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.store = store
        self.transport = transport
        self.max_in_flight = max_in_flight
        self.metrics = Metrics()
        self.observer = observer
        # Consulted before every participant call (a cluster node's lease
        # check): None lets the call go; an error stops driving the
        # transaction with it, sending and writing nothing.
        self.gate = gate
        self._now_ms = clock_ms
        self._random = (rng or random.Random()).random
        self._slots = asyncio.Semaphore(max_in_flight)
        self._runs: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._open = False
        self._operator_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        if not watch_interval_s > 0:
            raise ValueError(f"watch_interval_s must be positive, got {watch_interval_s!r}")
        self._watch_interval_s = watch_interval_s
        self._watchdog: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self, *, recover: bool = True) -> list[asyncio.Future[TxnResult]]:
        """Open the log and (by default) resume every unfinished transaction.

        Returns the result futures of the resumed transactions."""
        self._loop = asyncio.get_running_loop()
        await self.store.open()
        self._open = True
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._watch_interval_s, self._watch)
        return await self.resume() if recover else []

    async def close(self) -> None:
        """Stop driving: pending work stays in the log for the next start."""
        self._open = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for run in list(self._runs.values()):
            self._finish(run, None)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()
        await self.transport.close()

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        return len(self._runs)

    # ------------------------------------------------------------ submitting

    async def submit(
        self, spec: TransactionSpec, *, wait: bool = True
    ) -> asyncio.Future[TxnResult]:
        """Start ``spec`` once a slot is free; returns a future of its result.

        With ``wait=False`` raise :class:`Overloaded` instead of waiting when
        ``max_in_flight`` transactions are already being driven. Submitting an
        id again with the same spec returns the same outcome; with a different
        spec it raises :class:`DuplicateTransaction`."""
        if not self._open:
            raise CoordinatorClosed("the coordinator is not running")
        existing = self._runs.get(spec.id)
        if existing is not None:
            if _encode(existing.state.spec.to_dict()) != _encode(spec.to_dict()):
                raise DuplicateTransaction(
                    f"transaction {spec.id!r} exists with a different spec", txid=spec.id
                )
            return existing.result
        if not wait and self._slots.locked():
            raise Overloaded(
                f"{self.max_in_flight} transactions in flight; try again later", txid=spec.id
            )
        await self._acquire_slot()
        if spec.id in self._runs:
            # Submitted again while this call waited for a slot.
            self._slots.release()
            return await self.submit(spec)
        state, actions = machine.start(spec, self._now_ms())
        self.metrics.started += 1
        return self._launch(state, actions, False)

    async def run(self, spec: TransactionSpec) -> TxnResult:
        """Submit ``spec`` and wait until it is terminal."""
        return await (await self.submit(spec))

    async def resume(self) -> list[asyncio.Future[TxnResult]]:
        """Drive every non-terminal transaction found in the log."""
        snaps = await self.store.load_active()
        _crash.hit("recovery.loaded")
        futures = []
        for snap in snaps:
            if snap.txid in self._runs:
                continue
            futures.append(await self._resume_one(snap))
        return futures

    async def resume_snapshots(self, snaps: list[TxnSnapshot]) -> list[asyncio.Future[TxnResult]]:
        """Drive these non-terminal transactions, read from the log by the
        caller (a cluster node, for the shards it just acquired)."""
        return [await self._resume_one(snap) for snap in snaps if snap.txid not in self._runs]

    def drop(self, which: Callable[[str], bool], error: BaseException) -> int:
        """Stop driving the transactions whose id ``which`` accepts, at once,
        sending and writing nothing more: their result futures fail with
        ``error``; their fate is whatever the log says. Returns how many."""
        runs = [run for txid, run in self._runs.items() if which(txid)]
        for run in runs:
            self._finish(run, None, error)
        return len(runs)

    async def _resume_one(self, snap: TxnSnapshot) -> asyncio.Future[TxnResult]:
        await self._acquire_slot()
        return self._resume_held(snap)

    def _resume_held(self, snap: TxnSnapshot) -> asyncio.Future[TxnResult]:
        """Resume ``snap`` on a slot the caller holds (released if it runs already)."""
        running = self._runs.get(snap.txid)
        if running is not None:
            self._slots.release()
            return running.result
        state, actions = machine.recover(snap, self._now_ms())
        self.metrics.recovered += 1
        fut = self._launch(state, actions, True)
        _crash.hit("recovery.resumed")
        return fut

    async def _acquire_slot(self) -> None:
        await self._slots.acquire()
        if not self._open:  # closed while this caller waited
            self._slots.release()
            raise CoordinatorClosed("the coordinator is not running")

    def _launch(
        self, state: TxnState, actions: list[Action], recovered: bool
    ) -> asyncio.Future[TxnResult]:
        assert self._loop is not None
        result: asyncio.Future[TxnResult] = self._loop.create_future()
        run = _Run(state, result, self._loop.time())
        self._runs[state.txid] = run
        if self.observer is not None:
            self._observe("txn_started", state.txid, state.spec, recovered)
        self._pump(run, actions, 0)
        return result

    # ------------------------------------------------------------ operator actions

    async def retry(self, txid: str, reason: str) -> asyncio.Future[TxnResult] | None:
        """Retry waiting calls now; resume a needs-attention transaction."""
        run = self._runs.get(txid)
        if run is not None:
            self._post(run, RetryRequested(reason, self._now_ms()))
            return run.result
        # Nothing to resume: answer at once rather than wait for a slot.
        if await self._logged_status(txid) is not TxnStatus.NEEDS_ATTENTION:
            return None
        return await self._operate(partial(self._reopen, txid, reason))

    async def _reopen(
        self, txid: str, reason: str
    ) -> asyncio.Future[TxnResult] | TxnSnapshot | None:
        run = self._runs.get(txid)
        if run is not None:
            return run.result
        snap = await self.store.get(txid)
        if snap is None:
            raise TransactionNotFound(f"no transaction {txid!r}", txid=txid)
        if snap.status is not TxnStatus.NEEDS_ATTENTION:
            return None
        self.store.append(OperatorAction(txid, "retry", reason, self._now_ms()))
        await self.store.flush()
        snap = await self.store.get(txid)
        if snap is None or snap.status.terminal:
            raise AccordError(f"transaction {txid!r} could not be resumed", txid=txid)
        return snap

    async def _logged_status(self, txid: str) -> TxnStatus:
        snap = await self.store.get(txid)
        if snap is None:
            raise TransactionNotFound(f"no transaction {txid!r}", txid=txid)
        return snap.status

    async def _operate(
        self,
        act: Callable[[], Awaitable[_Operated]],
    ) -> asyncio.Future[TxnResult] | None:
        """Run an operator's ``act`` that may resume a transaction: with a slot
        taken first (a full coordinator then makes this caller wait, not every
        other operator behind the lock), under the operator lock (one
        resumption, however many operators), and shielded: once ``act`` has
        written its records, the resumption completes even if the caller
        stops waiting. ``act`` returns a snapshot to resume, a result future,
        or None."""
        await self._acquire_slot()

        async def locked() -> asyncio.Future[TxnResult] | None:
            resumed = False
            try:
                async with self._operator_lock:
                    outcome = await act()
                    if isinstance(outcome, TxnSnapshot):
                        resumed = True
                        return self._resume_held(outcome)
                    return outcome
            finally:
                if not resumed:
                    self._slots.release()

        task = asyncio.ensure_future(locked())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    def abort(self, txid: str, reason: str) -> bool:
        """Ask a running transaction to abort; True if it had no decision yet."""
        run = self._runs.get(txid)
        if run is None or run.state.decision is not None:
            return False
        self._post(run, AbortRequested(reason, self._now_ms()))
        return True

    async def abort_any(self, txid: str, reason: str) -> asyncio.Future[TxnResult] | None:
        """Abort a transaction with no decision yet, driven here or only in the log.

        Driven here: as :meth:`abort`. In the log and driven by nobody (not
        yet recovered, or started with ``recover=False``): log the operator's
        note and the abort decision, then drive the abort. Returns the
        transaction's result future; None if it is decided or terminal."""
        run = self._runs.get(txid)
        if run is not None:
            return run.result if self.abort(txid, reason) else None
        if await self._logged_status(txid) is not TxnStatus.PREPARING:
            return None  # decided or ended: nothing to abort (re-checked under the lock)
        return await self._operate(partial(self._abort_logged, txid, reason))

    async def _abort_logged(self, txid: str, reason: str) -> _Operated:
        snap = await self.store.get(txid)
        # Re-checked after the read, with no await until the records are
        # queued: a run started meanwhile must not race an abort decision.
        if txid in self._runs:
            return self._runs[txid].result if self.abort(txid, reason) else None
        if snap is None:
            raise TransactionNotFound(f"no transaction {txid!r}", txid=txid)
        if snap.decision is not None or snap.status is not TxnStatus.PREPARING:
            return None
        now_ms = self._now_ms()
        self.store.append(OperatorAction(txid, "abort", reason, now_ms))
        why = f"aborted by operator: {reason}"
        self.store.append(Decided(txid, Decision.ABORT, why, now_ms))
        await self.store.flush()
        snap = await self.store.get(txid)
        if snap is None or snap.decision is not Decision.ABORT:
            raise AccordError(f"transaction {txid!r} could not be aborted", txid=txid)
        if snap.status.terminal:  # finished by a recovery that read it earlier
            result = TxnResult(txid, snap.status, snap.reason, snap.branches)
            return _resolved(self._loop, result)
        return snap

    async def resolve(self, txid: str, reason: str) -> TxnStatus | None:
        """Close a needs-attention transaction that an operator repaired by hand.

        The operator declares that every participant now agrees with the
        decision: the log records ``OperatorAction("resolve")``, which ends
        the transaction committed (decision commit) or aborted (otherwise).
        Returns that status; None if the transaction is not in needs_attention."""
        async with self._operator_lock:  # not concurrently with a retry's resumption
            if txid in self._runs:
                return None
            snap = await self.store.get(txid)
            if snap is None:
                raise TransactionNotFound(f"no transaction {txid!r}", txid=txid)
            if txid in self._runs or snap.status is not TxnStatus.NEEDS_ATTENTION:
                return None
            self.store.append(OperatorAction(txid, "resolve", reason, self._now_ms()))
            await self.store.flush()
            after = await self.store.get(txid)
            if after is None or after.status not in (TxnStatus.COMMITTED, TxnStatus.ABORTED):
                raise AccordError(f"transaction {txid!r} could not be resolved", txid=txid)
            return after.status

    def live(self, txid: str) -> TxnState | None:
        """The state of a transaction being driven here (read only), or None."""
        run = self._runs.get(txid)
        return run.state if run is not None else None

    # ------------------------------------------------------------ the driver

    def _post(self, run: _Run, event: Event) -> None:
        if run.finished:
            return
        run.events.append(event)
        if not run.busy:
            self._pump(run, None, 0)

    def _pump(self, run: _Run, actions: list[Action] | None, index: int) -> None:
        """Perform ``actions[index:]``, then apply queued events until the
        inbox is empty or an action has to wait for the log."""
        run.busy = True
        try:
            events = run.events
            while True:
                if actions is not None and self._perform(run, actions, index):
                    return  # waiting for the log; _resume continues
                if run.finished or not events:
                    break
                run.state, actions = machine.step(run.state, events.popleft())
                index = 0
        except Exception as exc:  # noqa: BLE001 - the log holds the truth
            # The log could not be written: stop acting for this transaction.
            # Its fate is whatever the log says; recovery resumes it.
            log.error("transaction %s stopped: %s", run.state.txid, exc)
            self._finish(run, None, exc)
        run.busy = False

    def _perform(self, run: _Run, actions: list[Action], index: int) -> bool:
        """Perform actions from ``index``; True if stopped to wait for the log."""
        store = self.store
        for i in range(index, len(actions)):
            action = actions[i]
            kind = type(action)
            if kind is Send:
                self._send(run, action)  # type: ignore[arg-type]
            elif kind is Persist:
                record = action.record  # type: ignore[union-attr]
                store.append(record)
                if type(record) is Ended:
                    run.summary = record.branches
                if _crash.ENABLED:
                    _crash.hit(f"log.{_crash_kind(record)}.appended")
                if action.durable:  # type: ignore[union-attr]
                    pending = store.sync()
                    if pending is not None and not pending.done():
                        pending.add_done_callback(partial(self._resume, run, actions, i))
                        return True
                    rejected = pending.result() if pending is not None else frozenset()
                    if not self._durable(run, record, rejected):
                        return True  # stopped for good: see _durable
            elif kind is ScheduleRetry:
                self.metrics.retries += 1
                self._arm(run, action.at_ms, self._retry_due, action)  # type: ignore[union-attr]
            elif kind is ArmDeadline:
                self._arm(run, action.at_ms, self._deadline, None)  # type: ignore[union-attr]
            elif kind is Finish:
                self._finish(run, action.status)  # type: ignore[union-attr]
        return False

    def _resume(
        self, run: _Run, actions: list[Action], i: int, synced: Completion[frozenset[str]]
    ) -> None:
        """The record at ``actions[i]`` is durable (or failed): carry on."""
        if run.finished:
            return
        try:
            rejected = synced.result()
            record = actions[i].record  # type: ignore[union-attr]
            if not self._durable(run, record, rejected):
                return
        except Exception as exc:  # noqa: BLE001 - see _pump
            log.error("transaction %s stopped: %s", run.state.txid, exc)
            self._finish(run, None, exc)
            return
        self._pump(run, actions, i + 1)

    def _durable(self, run: _Run, record: object, rejected: frozenset[str]) -> bool:
        """Checks after a durable write; False if the transaction must stop."""
        if type(record) is Begin and run.state.txid in rejected:
            self._spawn(self._duplicate(run))
            return False
        if _crash.ENABLED:
            _crash.hit(f"log.{_crash_kind(record)}.durable")
        return True

    async def _duplicate(self, run: _Run) -> None:
        """Begin was refused: the id exists in the log already. The same spec
        gets that transaction's outcome; a different one an error."""
        spec = run.state.spec
        try:
            snap = await self.store.get(spec.id)
        except Exception as exc:  # noqa: BLE001
            self._finish(run, None, exc)
            return
        if snap is None or _encode(snap.spec.to_dict()) != _encode(spec.to_dict()):
            self._finish(
                run,
                None,
                DuplicateTransaction(
                    f"transaction {spec.id!r} exists with a different spec", txid=spec.id
                ),
            )
            return
        run.finished = True
        self._release(run)
        if snap.status.terminal:
            if not run.result.done():
                run.result.set_result(TxnResult(spec.id, snap.status, snap.reason, snap.branches))
            return
        # In the log but driven by nobody (e.g. started with recover=False):
        # drive it now and hand its outcome to this caller.
        try:
            resumed = await self._resume_one(snap)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            if not run.result.done():
                run.result.set_exception(exc)
            return
        resumed.add_done_callback(partial(_chain, run.result))

    def _send(self, run: _Run, send: Send) -> None:
        if self.gate is not None:
            refused = self.gate(run.state.txid)
            if refused is not None:
                self._finish(run, None, refused)
                return
        self.metrics.calls += 1
        spec = run.state.spec
        branch = spec.branches[send.branch]
        call = Call(
            spec.id,
            branch.name,
            send.op,
            branch.participant,
            branch.payload,
            send.attempt,
            branch.timeout_s,
        )
        assert self._loop is not None
        sent_s = self._loop.time()
        run.sent[send.branch] = (send, sent_s)
        if self.observer is not None:
            self._observe("call_started", spec.id, branch.name, send.op.value, send.attempt)
        try:
            started = self.transport.start(call)
        except Exception as exc:
            log.exception("transport raised for %s/%s %s", spec.id, branch.name, send.op)
            started = Reply(Outcome.TRANSIENT, error=f"transport error: {exc!r}")
        if isinstance(started, Reply):
            self._replied(run, send, started, sent_s)
            return
        if isinstance(started, Completion | asyncio.Future):
            started.add_done_callback(partial(self._reply_ready, run, send, sent_s))
            return
        task = asyncio.ensure_future(started)
        self._tasks.add(task)
        task.add_done_callback(partial(self._reply_ready, run, send, sent_s))

    def _reply_ready(
        self,
        run: _Run,
        send: Send,
        sent_s: float,
        fut: asyncio.Future[Reply] | Completion[Reply],
    ) -> None:
        if isinstance(fut, asyncio.Task):
            self._tasks.discard(fut)
        # A cancelled or failed call is a transient failure: retried like any other.
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None:
            log.error("transport failed for %s %s: %r", run.state.txid, send.op, exc)
            reply = Reply(Outcome.TRANSIENT, error=f"transport error: {exc!r}")
        else:
            reply = fut.result()
        self._replied(run, send, reply, sent_s)

    def _replied(self, run: _Run, send: Send, reply: Reply, sent_s: float) -> None:
        self.metrics.outcomes[reply.outcome] += 1
        if self.observer is not None:
            assert self._loop is not None
            self._observe(
                "call_finished",
                run.state.txid,
                run.state.spec.branches[send.branch].name,
                send.op.value,
                send.attempt,
                reply.outcome.value,
                self._loop.time() - sent_s,
                reply.error,
            )
        self._post(
            run,
            Replied(
                send.branch,
                send.op,
                send.attempt,
                reply.outcome,
                self._now_ms(),
                self._random(),
                reply.result,
                reply.error,
                reply.retry_after_s,
            ),
        )

    def _watch(self) -> None:
        """Time out the calls the transport has left unanswered too long."""
        assert self._loop is not None
        now_s = self._loop.time()
        try:
            for run in list(self._runs.values()):
                branches = run.state.spec.branches
                for i, b in enumerate(run.state.branches):
                    sent = run.sent[i]
                    if run.finished or b.status is not BranchStatus.IN_FLIGHT or sent is None:
                        continue
                    send, sent_s = sent
                    limit_s = branches[i].timeout_s + CALL_GRACE_S
                    if send.op is b.op and send.attempt == b.attempt and now_s - sent_s > limit_s:
                        run.sent[i] = None
                        error = f"no answer from the transport {limit_s:g}s after the call"
                        self._replied(run, send, Reply(Outcome.TRANSIENT, error=error), sent_s)
        finally:
            if self._open:
                self._watchdog = self._loop.call_later(self._watch_interval_s, self._watch)

    def _arm(self, run: _Run, at_ms: int, fire: Callable[[_Run, Any], None], arg: Any) -> None:
        assert self._loop is not None
        delay_s = max(at_ms - self._now_ms(), 0) / 1000
        run.timers.append(self._loop.call_later(delay_s, fire, run, arg))

    def _retry_due(self, run: _Run, action: ScheduleRetry) -> None:
        self._post(run, RetryDue(action.branch, action.op, action.attempt, self._now_ms()))

    def _deadline(self, run: _Run, _: None) -> None:
        self._post(run, DeadlineExpired(self._now_ms()))

    def _finish(
        self, run: _Run, status: TxnStatus | None, error: BaseException | None = None
    ) -> None:
        if run.finished:
            return
        run.finished = True
        self._release(run)
        result = run.result
        if status is None:
            if not result.done():
                result.set_exception(error or CoordinatorClosed("the coordinator stopped"))
            return
        # Counted and observed even if the caller stopped waiting (cancelled).
        if status is TxnStatus.COMMITTED:
            self.metrics.committed += 1
        elif status is TxnStatus.ABORTED:
            self.metrics.aborted += 1
        else:
            self.metrics.needs_attention += 1
        state = run.state
        assert self._loop is not None
        latency_s = self._loop.time() - run.started_s
        if not result.done():
            summary = run.summary or machine.summaries(state)
            result.set_result(TxnResult(state.txid, status, state.reason, summary, latency_s))
        if self.observer is not None:
            self._observe("txn_finished", state.txid, status, state.reason, latency_s)

    def _observe(self, hook: str, *args: Any) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:  # an observer never breaks a transaction
            log.exception("observer %s failed", hook)

    def _release(self, run: _Run) -> None:
        for timer in run.timers:
            timer.cancel()
        run.timers.clear()
        if self._runs.get(run.state.txid) is run:
            del self._runs[run.state.txid]
            self._slots.release()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _chain(target: asyncio.Future[TxnResult], source: asyncio.Future[TxnResult]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.set_exception(CoordinatorClosed("the coordinator stopped"))
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


def _resolved(
    loop: asyncio.AbstractEventLoop | None, result: TxnResult
) -> asyncio.Future[TxnResult]:
    fut: asyncio.Future[TxnResult] = (loop or asyncio.get_running_loop()).create_future()
    fut.set_result(result)
    return fut
