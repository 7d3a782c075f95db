"""The coordinator end to end, in process: MemoryStore and SQLiteStore, fake
participants answering synchronously, from coroutines and through futures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from accord import (
    BranchSpec,
    Call,
    Coordinator,
    CoordinatorClosed,
    DuplicateTransaction,
    InProcessTransport,
    MemoryStore,
    Observer,
    Op,
    Outcome,
    Overloaded,
    Protocol,
    Reply,
    RetryPolicy,
    SQLiteStore,
    Store,
    TransactionNotFound,
    TransactionSpec,
    TxnResult,
    TxnStatus,
)
from accord.core.records import Decision

OK = Reply(Outcome.OK)
FAST = RetryPolicy(initial_interval_s=0.001, maximum_interval_s=0.005, maximum_attempts=3)
STYLES = ["sync", "async", "future"]
Answer = Callable[[Call], Reply]


class Participant:
    """A fake participant: idempotent per (txid, branch, op), answering in one of three
    styles (a Reply, a coroutine, or an asyncio.Future resolved on the next turn)."""

    def __init__(self, style: str = "sync", answer: Answer | None = None) -> None:
        self.style = style
        self.answer = answer or (lambda call: OK)
        self.calls: list[Call] = []
        self.applied: dict[tuple[str, str, Op], Reply] = {}

    def ops(self, txid: str | None = None) -> list[tuple[str, Op, int]]:
        return [(c.branch, c.op, c.attempt) for c in self.calls if txid in (None, c.txid)]

    def handle(self, call: Call) -> Reply:
        key = (call.txid, call.branch, call.op)
        if key in self.applied:
            return self.applied[key]
        reply = self.answer(call)
        if reply.outcome is Outcome.OK:
            self.applied[key] = reply
        return reply

    def __call__(self, call: Call) -> Any:
        self.calls.append(call)
        if self.style == "sync":
            return self.handle(call)
        if self.style == "async":
            return self._later(call)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(self._resolve, fut, call)
        return fut

    def _resolve(self, fut: asyncio.Future[Reply], call: Call) -> None:
        try:
            fut.set_result(self.handle(call))
        except Exception as exc:  # noqa: BLE001 - handed to the coordinator
            fut.set_exception(exc)

    async def _later(self, call: Call) -> Reply:
        await asyncio.sleep(0)
        return self.handle(call)


def tcc(
    txid: str,
    *participants: str,
    sequential: bool = False,
    retry: RetryPolicy = FAST,
    **kw: Any,
) -> TransactionSpec:
    return TransactionSpec(
        protocol=Protocol.TCC,
        branches=tuple(BranchSpec(f"b{i}", p, {"i": i}, retry) for i, p in enumerate(participants)),
        id=txid,
        sequential=sequential,
        **kw,
    )


def saga(txid: str, *participants: str, **kw: Any) -> TransactionSpec:
    return TransactionSpec(
        protocol=Protocol.SAGA,
        branches=tuple(BranchSpec(f"s{i}", p, {"i": i}, FAST) for i, p in enumerate(participants)),
        id=txid,
        **kw,
    )


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    if request.param == "memory":
        return MemoryStore
    return lambda: SQLiteStore(tmp_path / "log.db")


@pytest.fixture(params=STYLES)
def style(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class World:
    """A coordinator over fake participants p0..p3 (created on demand)."""

    def __init__(self, store: Store, style: str, **kw: Any) -> None:
        self.store = store
        self.parts = {f"p{i}": Participant(style) for i in range(4)}
        self.coord = Coordinator(store, InProcessTransport(self.parts), **kw)

    async def run(self, spec: TransactionSpec) -> TxnResult:
        return await asyncio.wait_for(self.coord.run(spec), 10)


@pytest.fixture
async def world(make_store: Callable[[], Store], style: str) -> AsyncIterator[World]:
    w = World(make_store(), style)
    await w.coord.start()
    yield w
    await w.coord.close()


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    """Wait (polling the loop) until ``condition()`` holds; fail after ``timeout_s``."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout_s)


async def status_in_log(store: Store, txid: str) -> tuple[TxnStatus, Decision | None]:
    snap = await store.get(txid)
    assert snap is not None
    return snap.status, snap.decision


# ------------------------------------------------------------------ outcomes


async def test_tcc_commits_and_confirms_every_branch(world: World) -> None:
    """Every try ok: the transaction commits, every branch is confirmed once, the log agrees."""
    result = await world.run(tcc("t1", "p0", "p1", "p2"))
    assert result.committed and result.status is TxnStatus.COMMITTED
    for i in range(3):
        assert world.parts[f"p{i}"].ops() == [(f"b{i}", Op.TRY, 1), (f"b{i}", Op.CONFIRM, 1)]
    assert [b.status for b in result.branches] == ["done"] * 3
    assert await status_in_log(world.store, "t1") == (TxnStatus.COMMITTED, Decision.COMMIT)
    assert await world.store.load_active() == []
    assert world.coord.in_flight == 0
    assert world.coord.metrics.committed == 1


async def test_saga_commits_running_actions_in_order(world: World) -> None:
    """A saga runs its actions one after another and commits without compensation."""
    result = await world.run(saga("s1", "p0", "p1", "p0"))
    assert result.status is TxnStatus.COMMITTED
    assert world.parts["p0"].ops() == [("s0", Op.ACTION, 1), ("s2", Op.ACTION, 1)]
    assert world.parts["p1"].ops() == [("s1", Op.ACTION, 1)]


async def test_refusal_aborts_and_cancels_the_tried_branches(world: World) -> None:
    """A refused try aborts at once (no retry); every tried branch gets its cancel."""
    world.parts["p1"].answer = lambda call: (
        Reply(Outcome.REFUSED, error="short funds") if call.op is Op.TRY else OK
    )
    result = await world.run(tcc("t1", "p0", "p1", "p2"))
    assert result.status is TxnStatus.ABORTED
    assert "refused: short funds" in result.reason
    assert world.parts["p1"].ops() == [("b1", Op.TRY, 1), ("b1", Op.CANCEL, 1)]
    for p, b in [("p0", "b0"), ("p2", "b2")]:
        assert world.parts[p].ops() == [(b, Op.TRY, 1), (b, Op.CANCEL, 1)]
    assert await status_in_log(world.store, "t1") == (TxnStatus.ABORTED, Decision.ABORT)


async def test_sequential_refusal_leaves_untried_branches_alone(world: World) -> None:
    """Sequential TCC refused at the second branch cancels only the first two."""
    world.parts["p1"].answer = lambda call: Reply(Outcome.REFUSED) if call.op is Op.TRY else OK
    result = await world.run(tcc("t1", "p0", "p1", "p2", sequential=True))
    assert result.status is TxnStatus.ABORTED
    assert world.parts["p0"].ops() == [("b0", Op.TRY, 1), ("b0", Op.CANCEL, 1)]
    assert world.parts["p2"].calls == []


async def test_saga_refusal_compensates_in_reverse(world: World) -> None:
    """A saga refused at its third step compensates steps 2, 1, 0 in that order."""
    order: list[str] = []
    for p in world.parts.values():
        inner = p.answer

        def answer(call: Call, inner: Answer = inner) -> Reply:
            order.append(f"{call.op}:{call.branch}")
            if call.branch == "s2" and call.op is Op.ACTION:
                return Reply(Outcome.REFUSED)
            return inner(call)

        p.answer = answer
    result = await world.run(saga("s1", "p0", "p1", "p2", "p3"))
    assert result.status is TxnStatus.ABORTED
    assert order == [
        "action:s0",
        "action:s1",
        "action:s2",
        "compensate:s2",
        "compensate:s1",
        "compensate:s0",
    ]


async def test_transient_failures_are_retried_until_success(world: World) -> None:
    """Two transient failures of a try, then success: committed after 3 attempts."""
    world.parts["p0"].answer = lambda call: (
        Reply(Outcome.TRANSIENT, error="503") if call.op is Op.TRY and call.attempt < 3 else OK
    )
    result = await world.run(tcc("t1", "p0", "p1"))
    assert result.status is TxnStatus.COMMITTED
    assert world.parts["p0"].ops() == [
        ("b0", Op.TRY, 1),
        ("b0", Op.TRY, 2),
        ("b0", Op.TRY, 3),
        ("b0", Op.CONFIRM, 1),
    ]
    assert world.coord.metrics.retries == 2


async def test_transient_failures_past_the_attempts_abort(world: World) -> None:
    """A try failing transiently on every attempt aborts after maximum_attempts."""
    world.parts["p0"].answer = lambda call: (
        Reply(Outcome.TRANSIENT, error="503") if call.op is Op.TRY else OK
    )
    result = await world.run(tcc("t1", "p0"))
    assert result.status is TxnStatus.ABORTED
    assert result.reason == "branch 'b0' failed after 3 attempts: 503"


async def test_handler_exceptions_are_transient(world: World) -> None:
    """A participant handler that raises is a transient failure, retried, not a crash."""
    calls = {"n": 0}

    def flaky(call: Call) -> Reply:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionResetError("peer reset")
        return OK

    world.parts["p0"].answer = flaky
    result = await world.run(tcc("t1", "p0"))
    assert result.status is TxnStatus.COMMITTED
    assert world.parts["p0"].ops()[:2] == [("b0", Op.TRY, 1), ("b0", Op.TRY, 2)]


async def test_unknown_participant_is_rejected_and_aborts_the_transaction(world: World) -> None:
    """An unknown participant rejects the try: the txn aborts, only the others are cancelled."""
    result = await world.run(tcc("t1", "p0", "nobody"))
    assert result.status is TxnStatus.ABORTED
    assert result.reason == "branch 'b1' rejected the request: unknown participant 'nobody'"
    assert world.parts["p0"].ops() == [("b0", Op.TRY, 1), ("b0", Op.CANCEL, 1)]
    assert await status_in_log(world.store, "t1") == (TxnStatus.ABORTED, Decision.ABORT)


async def test_deadline_aborts_a_transaction_whose_try_never_answers(
    make_store: Callable[[], Store],
) -> None:
    """A try that never answers is cut off by the deadline; the transaction aborts."""
    hung: list[asyncio.Future[Reply]] = []

    def never(call: Call) -> Any:
        if call.op is Op.TRY:
            fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            hung.append(fut)
            return fut
        return OK

    coord = Coordinator(make_store(), InProcessTransport({"p0": never, "p1": lambda c: OK}))
    await coord.start()
    try:
        result = await asyncio.wait_for(coord.run(tcc("t1", "p0", "p1", timeout_s=0.05)), 10)
        assert result.status is TxnStatus.ABORTED
        assert result.reason == "deadline exceeded"
        hung[0].set_result(OK)  # the late answer changes nothing
        await asyncio.sleep(0)
        assert await status_in_log(coord.store, "t1") == (TxnStatus.ABORTED, Decision.ABORT)
    finally:
        await coord.close()


async def test_confirm_failing_past_its_attempts_needs_attention_then_operator_retry(
    world: World,
) -> None:
    """A confirm out of attempts parks the txn naming the branch; operator retry commits it."""
    broken = {"on": True}
    world.parts["p1"].answer = lambda call: (
        Reply(Outcome.TRANSIENT, error="disk full")
        if call.op is Op.CONFIRM and broken["on"]
        else OK
    )
    result = await world.run(tcc("t1", "p0", "p1"))
    assert result.status is TxnStatus.NEEDS_ATTENTION
    assert result.reason == "confirm of branch 'b1' failed after 3 attempts: disk full"
    assert [b.status for b in result.branches] == ["done", "stuck"]
    assert await status_in_log(world.store, "t1") == (TxnStatus.NEEDS_ATTENTION, Decision.COMMIT)
    assert await world.store.load_active() == []

    broken["on"] = False
    resumed = await world.coord.retry("t1", "disk replaced")
    assert resumed is not None
    final = await asyncio.wait_for(resumed, 10)
    assert final.status is TxnStatus.COMMITTED
    assert final.reason == "retried by operator: disk replaced"
    assert await status_in_log(world.store, "t1") == (TxnStatus.COMMITTED, Decision.COMMIT)
    assert ("b1", Op.CONFIRM, 1) in world.parts["p1"].ops()[-1:]
    assert world.store.violations == []
    assert await world.coord.retry("t1", "again") is None  # committed: nothing to do


async def test_retry_of_an_unknown_transaction_raises(world: World) -> None:
    """retry() of an id the log does not know raises TransactionNotFound."""
    with pytest.raises(TransactionNotFound):
        await world.coord.retry("nope", "x")


async def test_operator_abort_before_the_decision(make_store: Callable[[], Store]) -> None:
    """abort() of a transaction still preparing aborts it; after the decision it refuses."""
    gate = Gate()
    coord = Coordinator(make_store(), InProcessTransport({"gate": gate}))
    await coord.start()
    try:
        fut = await coord.submit(tcc("t1", "gate"))
        assert coord.abort("t1", "customer cancelled") is True
        result = await asyncio.wait_for(fut, 10)
        assert result.status is TxnStatus.ABORTED
        assert result.reason == "aborted by operator: customer cancelled"
        assert [c.op for c in gate.calls] == [Op.TRY, Op.CANCEL]
        assert coord.abort("t1", "again") is False
        gate.open()  # the try answering late changes nothing
        await asyncio.sleep(0)
        assert await status_in_log(coord.store, "t1") == (TxnStatus.ABORTED, Decision.ABORT)
    finally:
        await coord.close()


# ------------------------------------------------------------------ duplicates


class Gate:
    """A participant whose tries wait until ``open()``."""

    def __init__(self) -> None:
        self.waiting: list[tuple[asyncio.Future[Reply], Call]] = []
        self.calls: list[Call] = []
        self.is_open = False

    def __call__(self, call: Call) -> Any:
        self.calls.append(call)
        if call.op is not Op.TRY or self.is_open:
            return OK
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.waiting.append((fut, call))
        return fut

    def open(self) -> None:
        self.is_open = True
        for fut, _ in self.waiting:
            fut.set_result(OK)


@pytest.fixture
async def gated(make_store: Callable[[], Store]) -> AsyncIterator[tuple[Coordinator, Gate]]:
    gate = Gate()
    coord = Coordinator(make_store(), InProcessTransport({"gate": gate, "p0": Participant()}))
    await coord.start()
    yield coord, gate
    await coord.close()


async def test_duplicate_submit_while_running_returns_the_same_future(
    gated: tuple[Coordinator, Gate],
) -> None:
    """Resubmitting a running spec returns its future; another spec under its id is refused."""
    coord, gate = gated
    first = await coord.submit(tcc("t1", "gate", "p0"))
    assert await coord.submit(tcc("t1", "gate", "p0")) is first
    with pytest.raises(DuplicateTransaction):
        await coord.submit(tcc("t1", "gate"))
    gate.open()
    assert (await asyncio.wait_for(first, 10)).committed
    assert [(c.op, c.attempt) for c in gate.calls] == [(Op.TRY, 1), (Op.CONFIRM, 1)]


async def test_duplicate_submit_after_the_end_returns_the_logged_outcome(world: World) -> None:
    """Submitting a finished id again with the same spec returns its outcome, calling no one."""
    first = await world.run(tcc("t1", "p0", "p1"))
    calls = len(world.parts["p0"].calls)
    again = await world.run(tcc("t1", "p0", "p1"))
    assert again.status is first.status is TxnStatus.COMMITTED
    assert len(world.parts["p0"].calls) == calls
    assert world.coord.in_flight == 0


async def test_duplicate_submit_of_a_finished_id_with_another_spec_is_refused(
    world: World,
) -> None:
    """A finished id with another spec raises DuplicateTransaction and leaves the log as it was."""
    await world.run(tcc("t1", "p0", "p1"))
    with pytest.raises(DuplicateTransaction):
        await world.run(tcc("t1", "p1", "p0"))
    assert world.coord.in_flight == 0
    assert await status_in_log(world.store, "t1") == (TxnStatus.COMMITTED, Decision.COMMIT)


async def test_concurrent_duplicate_submits_waiting_for_a_slot_run_once(
    make_store: Callable[[], Store],
) -> None:
    """Two submits of one id that both wait for a slot start it once and share its result."""
    w = World(make_store(), "async", max_in_flight=1)
    await w.coord.start()
    try:
        blocker = await w.coord.submit(tcc("t0", "p0"))
        a, b = await asyncio.gather(
            w.coord.submit(tcc("t1", "p1")), w.coord.submit(tcc("t1", "p1"))
        )
        results = await asyncio.wait_for(asyncio.gather(blocker, a, b), 10)
        assert all(r.committed for r in results)
        assert w.parts["p1"].ops() == [("b0", Op.TRY, 1), ("b0", Op.CONFIRM, 1)]
        assert w.coord.in_flight == 0
        more = await asyncio.wait_for(w.coord.run(tcc("t2", "p2")), 10)  # a slot is free
        assert more.committed
    finally:
        await w.coord.close()


# ------------------------------------------------------------------ limits and lifecycle


async def test_max_in_flight_bounds_concurrent_transactions(
    make_store: Callable[[], Store],
) -> None:
    """With max_in_flight=3, at most 3 transactions have calls outstanding at once."""
    active: set[str] = set()
    peak = 0

    async def slow(call: Call) -> Reply:
        nonlocal peak
        active.add(call.txid)
        peak = max(peak, len(active))
        await asyncio.sleep(0.002)
        if call.op is Op.CONFIRM:
            active.discard(call.txid)
        return OK

    coord = Coordinator(make_store(), InProcessTransport({"p": slow}), max_in_flight=3)
    await coord.start()
    try:
        specs = [tcc(f"t{i}", "p") for i in range(12)]
        results = await asyncio.wait_for(asyncio.gather(*(coord.run(s) for s in specs)), 20)
        assert all(r.committed for r in results)
        assert peak == 3
        assert coord.in_flight == 0
    finally:
        await coord.close()


async def test_submit_needs_a_started_coordinator(make_store: Callable[[], Store]) -> None:
    """submit() before start() or after close() raises CoordinatorClosed."""
    coord = Coordinator(make_store(), InProcessTransport({}))
    with pytest.raises(CoordinatorClosed):
        await coord.submit(tcc("t1", "p0"))
    await coord.start()
    await coord.close()
    with pytest.raises(CoordinatorClosed):
        await coord.submit(tcc("t1", "p0"))
    with pytest.raises(ValueError, match="max_in_flight"):
        Coordinator(make_store(), InProcessTransport({}), max_in_flight=0)


async def test_close_then_start_resumes_an_unfinished_commit(tmp_path: Path) -> None:
    """After a restart on the SQLite file, unanswered confirms are re-sent and applied once."""
    path = tmp_path / "log.db"
    p0, p1 = Participant("sync"), Participant("sync")
    held: list[asyncio.Future[Reply]] = []

    def hold_confirms(call: Call) -> Any:
        p1.calls.append(call)
        if call.op is Op.CONFIRM:
            fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            held.append(fut)
            return fut
        return p1.handle(call)

    first = Coordinator(SQLiteStore(path), InProcessTransport({"p0": p0, "p1": hold_confirms}))
    await first.start()
    fut = await first.submit(tcc("t1", "p0", "p1"))
    await until(lambda: bool(held))  # the confirm is out: the commit decision is in the log
    await first.close()
    with pytest.raises(CoordinatorClosed):
        await fut
    held[0].set_result(OK)  # a reply reaching the stopped coordinator is ignored

    second = Coordinator(SQLiteStore(path), InProcessTransport({"p0": p0, "p1": p1}))
    resumed = await second.start()
    try:
        assert len(resumed) == 1
        result = await asyncio.wait_for(resumed[0], 10)
        assert result.status is TxnStatus.COMMITTED
        assert await status_in_log(second.store, "t1") == (TxnStatus.COMMITTED, Decision.COMMIT)
        assert p0.ops() == [("b0", Op.TRY, 1), ("b0", Op.CONFIRM, 1), ("b0", Op.CONFIRM, 1)]
        assert p1.ops() == [("b1", Op.TRY, 1), ("b1", Op.CONFIRM, 1), ("b1", Op.CONFIRM, 1)]
        assert list(p0.applied) == [("t1", "b0", Op.TRY), ("t1", "b0", Op.CONFIRM)]
        assert second.metrics.recovered == 1
    finally:
        await second.close()


async def test_restart_aborts_a_transaction_caught_before_its_decision(tmp_path: Path) -> None:
    """A transaction stopped before its decision is aborted on restart, cancelling every branch."""
    path = tmp_path / "log.db"
    p0, p1 = Participant("sync"), Participant("sync")
    never = Participant("sync")
    held: list[asyncio.Future[Reply]] = []

    def hang(call: Call) -> Any:
        never.calls.append(call)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        held.append(fut)
        return fut

    first = Coordinator(SQLiteStore(path), InProcessTransport({"p0": hang, "p1": p1}))
    await first.start()
    fut = await first.submit(tcc("t1", "p0", "p1", sequential=True))
    await until(lambda: bool(held))
    await first.close()
    with pytest.raises(CoordinatorClosed):
        await fut

    second = Coordinator(SQLiteStore(path), InProcessTransport({"p0": p0, "p1": p1}))
    [resumed] = await second.start()
    try:
        result = await asyncio.wait_for(resumed, 10)
        assert result.status is TxnStatus.ABORTED
        assert "presumed abort" in result.reason
        assert p0.ops() == [("b0", Op.CANCEL, 1)]
        assert p1.ops() == [("b1", Op.CANCEL, 1)]  # never tried, still cancelled
    finally:
        await second.close()


async def test_same_coordinator_can_close_and_start_again(tmp_path: Path) -> None:
    """close() then start() on the same Coordinator and SQLite file resumes the work."""
    p0 = Participant("sync")
    held: list[asyncio.Future[Reply]] = []
    mode = {"hold": True}

    def maybe_hold(call: Call) -> Any:
        if call.op is Op.CONFIRM and mode["hold"]:
            fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            held.append(fut)
            return fut
        return p0(call)

    coord = Coordinator(SQLiteStore(tmp_path / "log.db"), InProcessTransport({"p0": maybe_hold}))
    await coord.start()
    fut = await coord.submit(tcc("t1", "p0"))
    await until(lambda: bool(held))
    await coord.close()
    with pytest.raises(CoordinatorClosed):
        await fut
    mode["hold"] = False
    [resumed] = await coord.start()
    try:
        assert (await asyncio.wait_for(resumed, 10)).committed
        assert (await asyncio.wait_for(coord.run(tcc("t2", "p0")), 10)).committed
    finally:
        await coord.close()


# ------------------------------------------- races with operators and close()


async def test_concurrent_operator_retries_resume_once(tmp_path: Path) -> None:
    """Two concurrent retry() calls of one needs-attention transaction drive it once."""
    w = World(SQLiteStore(tmp_path / "log.db"), "async")
    broken = {"on": True}
    w.parts["p0"].answer = lambda call: (
        Reply(Outcome.TRANSIENT) if call.op is Op.CONFIRM and broken["on"] else OK
    )
    await w.coord.start()
    try:
        result = await w.run(tcc("t1", "p0", retry=RetryPolicy(maximum_attempts=1)))
        assert result.status is TxnStatus.NEEDS_ATTENTION
        broken["on"] = False
        futures = await asyncio.gather(w.coord.retry("t1", "a"), w.coord.retry("t1", "b"))
        for f in futures:
            if f is not None:
                assert (await asyncio.wait_for(f, 10)).committed
        assert w.coord.metrics.recovered == 1
        assert w.store.violations == []
    finally:
        await w.coord.close()


async def test_submit_waiting_for_a_slot_when_closed_is_refused(
    make_store: Callable[[], Store],
) -> None:
    """A submit still waiting for a slot when close() runs raises CoordinatorClosed."""
    gate = Gate()
    coord = Coordinator(make_store(), InProcessTransport({"gate": gate}), max_in_flight=1)
    await coord.start()
    first = await coord.submit(tcc("t1", "gate"))
    waiting = asyncio.ensure_future(coord.submit(tcc("t2", "gate")))
    await until(lambda: len(gate.calls) == 1)  # t1 is being driven, t2 waits for its slot
    await coord.close()
    with pytest.raises(CoordinatorClosed):
        await first
    gate.open()
    with pytest.raises(CoordinatorClosed):
        started = await asyncio.wait_for(waiting, 10)
        await asyncio.wait_for(started, 10)  # only reached while the bug is there
    assert [c.txid for c in gate.calls] == ["t1"]


async def test_submit_without_waiting_raises_overloaded_at_the_limit(
    make_store: Callable[[], Store],
) -> None:
    """submit(wait=False) refuses with Overloaded when max_in_flight are being driven."""
    gate = Gate()
    coord = Coordinator(make_store(), InProcessTransport({"gate": gate}), max_in_flight=1)
    await coord.start()
    try:
        first = await coord.submit(tcc("t1", "gate"), wait=False)
        with pytest.raises(Overloaded):
            await coord.submit(tcc("t2", "gate"), wait=False)
        gate.open()
        assert (await asyncio.wait_for(first, 10)).committed
        second = await coord.submit(tcc("t2", "gate"), wait=False)
        assert (await asyncio.wait_for(second, 10)).committed
        assert [c.txid for c in gate.calls if c.op is Op.TRY] == ["t1", "t2"]
    finally:
        await coord.close()


# ------------------------------------------------------------------ observer


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def txn_started(self, txid: str, spec: TransactionSpec, recovered: bool) -> None:
        self.events.append(("started", txid, recovered))

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
        assert latency_s >= 0
        self.events.append(("call", txid, branch, op, attempt, outcome))

    def txn_finished(self, txid: str, status: TxnStatus, reason: str, latency_s: float) -> None:
        self.events.append(("finished", txid, status))


async def test_observer_sees_every_call_and_the_outcome(style: str) -> None:
    """An installed observer hears each transaction start, every call with its
    attempt and outcome (including a transient failure), and the terminal status."""
    recorder = Recorder()
    w = World(MemoryStore(), style, observer=recorder)
    first = True

    def flaky(call: Call) -> Reply:
        nonlocal first
        if call.op is Op.TRY and first:
            first = False
            return Reply(Outcome.TRANSIENT, error="503")
        return OK

    w.parts["p1"].answer = flaky
    await w.coord.start()
    try:
        await w.run(tcc("t1", "p0", "p1"))
    finally:
        await w.coord.close()
    calls = sorted(e[2:] for e in recorder.events if e[0] == "call")
    assert calls == [
        ("b0", "confirm", 1, "ok"),
        ("b0", "try", 1, "ok"),
        ("b1", "confirm", 1, "ok"),
        ("b1", "try", 1, "transient"),
        ("b1", "try", 2, "ok"),
    ]
    assert recorder.events[0] == ("started", "t1", False)
    assert recorder.events[-1] == ("finished", "t1", TxnStatus.COMMITTED)


async def test_a_failing_observer_never_breaks_a_transaction() -> None:
    class Broken(Observer):
        def call_started(self, txid: str, branch: str, op: str, attempt: int) -> None:
            raise RuntimeError("observer bug")

    w = World(MemoryStore(), "sync", observer=Broken())
    await w.coord.start()
    try:
        result = await w.run(tcc("t1", "p0", "p1"))
    finally:
        await w.coord.close()
    assert result.committed


async def test_a_full_coordinator_holds_up_a_retry_but_not_other_operators(
    make_store: Callable[[], Store],
) -> None:
    """max_in_flight reached: an operator's retry of a parked transaction waits for a
    slot without holding the operator lock (a resolve goes through meanwhile), and
    proceeds once a slot frees."""
    gate = Gate()
    broken = Participant(
        answer=lambda c: Reply(Outcome.TRANSIENT, error="down") if c.op is Op.CONFIRM else OK
    )
    coord = Coordinator(
        make_store(),
        InProcessTransport({"gate": gate, "p0": broken, "ok": Participant()}),
        max_in_flight=1,
    )
    await coord.start()
    try:
        assert (await asyncio.wait_for(coord.run(tcc("done", "ok")), 10)).committed
        for txid in ("na1", "na2"):
            parked = await asyncio.wait_for(coord.run(tcc(txid, "p0")), 10)
            assert parked.status is TxnStatus.NEEDS_ATTENTION
        blocking = await coord.submit(tcc("busy", "gate"))  # holds the only slot
        await until(lambda: len(gate.calls) == 1)
        broken.answer = lambda call: OK
        retry = asyncio.ensure_future(coord.retry("na1", "fixed"))
        await asyncio.sleep(0.05)
        assert not retry.done()  # waiting for a slot
        resolved = await asyncio.wait_for(coord.resolve("na2", "repaired by hand"), 5)
        assert resolved is TxnStatus.COMMITTED
        # Nothing to do for a committed one: answered at once, no slot needed.
        assert await asyncio.wait_for(coord.retry("done", "again"), 5) is None
        assert await asyncio.wait_for(coord.abort_any("done", "too late"), 5) is None
        gate.open()
        assert (await asyncio.wait_for(blocking, 10)).committed
        resumed = await asyncio.wait_for(retry, 10)
        assert resumed is not None
        assert (await asyncio.wait_for(resumed, 10)).status is TxnStatus.COMMITTED
    finally:
        await coord.close()


async def test_a_caller_that_stops_waiting_does_not_hide_the_outcome() -> None:
    """The result future cancelled (e.g. wait_for timed out): the transaction still
    finishes, and metrics and observers hear of its end."""
    recorder = Recorder()
    gate = Gate()
    coord = Coordinator(MemoryStore(), InProcessTransport({"gate": gate}), observer=recorder)
    await coord.start()
    try:
        fut = await coord.submit(tcc("t1", "gate"))
        await until(lambda: len(gate.calls) == 1)
        fut.cancel()
        gate.open()
        await until(lambda: coord.in_flight == 0)
        assert coord.metrics.committed == 1
        assert recorder.events[-1] == ("finished", "t1", TxnStatus.COMMITTED)
        assert await status_in_log(coord.store, "t1") == (TxnStatus.COMMITTED, Decision.COMMIT)
    finally:
        await coord.close()


# ------------------------------------------------------------------ the call watchdog


def hanging(ops: set[Op], times: int) -> tuple[Callable[[Call], Any], list[Call]]:
    """A participant whose first ``times`` calls of ``ops`` never answer."""
    hung: list[Call] = []

    def answer(call: Call) -> Any:
        if call.op in ops and len(hung) < times:
            hung.append(call)
            return asyncio.get_running_loop().create_future()  # never resolved
        return OK

    return answer, hung


def with_call_timeout(spec: TransactionSpec, timeout_s: float) -> TransactionSpec:
    branches = tuple(
        BranchSpec(b.name, b.participant, b.payload, b.retry, timeout_s) for b in spec.branches
    )
    return TransactionSpec(
        protocol=spec.protocol, branches=branches, id=spec.id, timeout_s=spec.timeout_s
    )


async def test_a_call_the_transport_never_answers_is_timed_out_and_retried(
    make_store: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An in-process participant that never answers a try: the watchdog counts
    it as a transient failure after the call's timeout, the retry commits."""
    monkeypatch.setattr("accord.coordinator.CALL_GRACE_S", 0.01)
    never, hung = hanging({Op.TRY}, times=1)
    calls: list[tuple[str, str, int, str, str]] = []

    class Calls(Observer):
        def call_finished(self, txid, branch, op, attempt, outcome, latency_s, error):  # type: ignore[no-untyped-def]
            calls.append((branch, op, attempt, outcome, error))

    coord = Coordinator(
        make_store(),
        InProcessTransport({"p0": never, "p1": lambda c: OK}),
        watch_interval_s=0.01,
        observer=Calls(),
    )
    await coord.start()
    try:
        spec = with_call_timeout(tcc("t1", "p0", "p1", timeout_s=30), 0.05)
        result = await asyncio.wait_for(coord.run(spec), 10)
        assert result.status is TxnStatus.COMMITTED
        assert [c.attempt for c in hung] == [1]
        timed_out = [c for c in calls if c[3] == "transient"]
        assert timed_out == [
            ("b0", "try", 1, "transient", "no answer from the transport 0.06s after the call")
        ]
        assert ("b0", "try", 2, "ok", "") in calls
    finally:
        await coord.close()


async def test_a_confirm_that_never_answers_parks_the_transaction(
    make_store: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the decision nothing else bounds a hung call: the watchdog does,
    and a confirm that never answers ends in needs_attention, not in flight forever."""
    monkeypatch.setattr("accord.coordinator.CALL_GRACE_S", 0.01)
    never, hung = hanging({Op.CONFIRM}, times=100)
    coord = Coordinator(
        make_store(), InProcessTransport({"p0": never, "p1": lambda c: OK}), watch_interval_s=0.01
    )
    await coord.start()
    try:
        spec = with_call_timeout(tcc("t1", "p0", "p1"), 0.05)
        result = await asyncio.wait_for(coord.run(spec), 10)
        assert result.status is TxnStatus.NEEDS_ATTENTION
        assert "no answer from the transport" in result.reason
        assert [c.attempt for c in hung] == [1, 2, 3]  # FAST: three attempts
        assert coord.in_flight == 0
    finally:
        await coord.close()


async def test_the_watchdog_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="watch_interval_s must be positive"):
        Coordinator(MemoryStore(), InProcessTransport({}), watch_interval_s=0)
