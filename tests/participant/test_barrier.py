"""The barrier's rules, one call at a time, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from accord.core.machine import Outcome
from accord.core.spec import BranchSpec, Op, Protocol, RetryPolicy, TransactionSpec
from accord.participant import (
    DEFAULT_MIN_RETENTION_S,
    MAX_KEY_CHARS,
    BarrierError,
    Kind,
    Refusal,
    SQLiteBarrier,
    retry_horizon_s,
)
from accord.wire import MAX_SKEW_S

from .conftest import INITIAL, Bank

ALICE = (INITIAL["alice"], 0, 0)
DAY_S = 24 * 3600.0
UNDO = {Op.TRY: Op.CANCEL, Op.ACTION: Op.COMPENSATE}


async def test_try_commits_handler_update_with_barrier_row(bank: Bank) -> None:
    """An applied try commits the business change, the ledger entry and the barrier row."""
    result = await bank.call("t1", Op.TRY)
    assert result.outcome is Outcome.OK
    assert result.result == {"op": "try", "amount": 10, "balance": 990}
    assert not result.duplicate
    state = await bank.state()
    assert state.accounts["alice"] == (990, 10, 0)
    assert state.ledger == [("t1", "payment", "try")]
    assert state.barrier == {("t1", "payment", "try"): Kind.APPLIED}


async def test_duplicate_returns_the_original_result(bank: Bank) -> None:
    """A duplicate gets the first execution's stored result and its handler never runs."""
    first = await bank.call("t1", Op.TRY, result={"reservation": "r-1", "n": [1, 2]})
    again = await bank.call("t1", Op.TRY, amount=30, result={"reservation": "other"})
    assert first.result == again.result == {"reservation": "r-1", "n": [1, 2]}
    assert again.outcome is Outcome.OK and again.duplicate
    assert bank.runs["try"] == 1
    assert await bank.account() == (990, 10, 0)


@pytest.mark.parametrize("forward", [Op.TRY, Op.ACTION])
async def test_refusal_is_recorded_and_repeated(bank: Bank, forward: Op) -> None:
    """A refused try/action rolls back its update, records the refusal, repeats it if duplicated."""
    refused = await bank.call("t1", forward, amount=10_000)
    assert refused.outcome is Outcome.REFUSED
    assert refused.error == "insufficient funds: alice cannot pay 10000"
    state = await bank.state()
    assert state.accounts["alice"] == ALICE
    assert state.ledger == []
    assert state.barrier == {("t1", "payment", forward.value): Kind.REFUSED}

    again = await bank.call("t1", forward, amount=1)
    assert (again.outcome, again.error, again.duplicate) == (
        Outcome.REFUSED,
        refused.error,
        True,
    )
    assert bank.runs[forward.value] == 1
    assert await bank.account() == ALICE


@pytest.mark.parametrize("forward", [Op.TRY, Op.ACTION])
async def test_undo_of_a_refused_forward_op_is_a_null_compensation(bank: Bank, forward: Op) -> None:
    """Cancel/compensate after a refused try/action succeeds without running its handler."""
    await bank.call("t1", forward, amount=10_000)
    undone = await bank.call("t1", UNDO[forward])
    assert undone.outcome is Outcome.OK and not undone.duplicate
    assert bank.runs[UNDO[forward].value] == 0
    state = await bank.state()
    assert state.accounts["alice"] == ALICE
    assert state.barrier[("t1", "payment", UNDO[forward].value)] == Kind.NULL


async def test_exception_rolls_back_everything_and_a_retry_applies(bank: Bank) -> None:
    """A non-refusal exception leaves no barrier row and no business change; a retry applies."""
    with pytest.raises(RuntimeError, match="disk on fire"):
        await bank.call("t1", Op.TRY, fail=RuntimeError("disk on fire"))
    state = await bank.state()
    assert state.barrier == {}
    assert state.ledger == []
    assert state.accounts["alice"] == ALICE

    retried = await bank.call("t1", Op.TRY)
    assert retried.outcome is Outcome.OK and not retried.duplicate
    assert await bank.account() == (990, 10, 0)
    assert bank.runs["try"] == 2


async def test_unencodable_result_rolls_back_everything(bank: Bank) -> None:
    """A result that cannot be stored as JSON fails the call and changes nothing."""
    with pytest.raises(TypeError):
        await bank.call("t1", Op.TRY, result={"when": object()})
    state = await bank.state()
    assert (state.barrier, state.ledger, state.accounts["alice"]) == ({}, [], ALICE)


@pytest.mark.parametrize("forward", [Op.TRY, Op.ACTION])
async def test_undo_before_forward_is_null_and_blocks_it(bank: Bank, forward: Op) -> None:
    """Cancel/compensate first: success without its handler, and the late try/action is refused."""
    undo = UNDO[forward]
    undone = await bank.call("t1", undo)
    assert undone.outcome is Outcome.OK and undone.result is None
    assert bank.runs[undo.value] == 0
    assert await bank.rows() == {
        ("t1", "payment", undo.value): Kind.NULL,
        ("t1", "payment", forward.value): Kind.BLOCKED,
    }

    late = await bank.call("t1", forward)
    assert late.outcome is Outcome.REFUSED
    assert f"{undo} arrived before {forward}" in late.error
    assert bank.runs[forward.value] == 0
    again = await bank.call("t1", undo)
    assert again.outcome is Outcome.OK and again.duplicate
    state = await bank.state()
    assert state.accounts["alice"] == ALICE
    assert state.ledger == []


@pytest.mark.parametrize("forward", [Op.TRY, Op.ACTION])
async def test_undo_after_forward_runs_once(bank: Bank, forward: Op) -> None:
    """Cancel/compensate of an applied try/action runs once; duplicates change nothing."""
    await bank.call("t1", forward)
    first = await bank.call("t1", UNDO[forward])
    second = await bank.call("t1", UNDO[forward])
    assert first.outcome is second.outcome is Outcome.OK
    assert (first.duplicate, second.duplicate) == (False, True)
    assert first.result == second.result
    assert bank.runs[UNDO[forward].value] == 1
    assert await bank.account() == ALICE


async def test_confirm_after_try_applies_once(bank: Bank) -> None:
    """Confirm of an applied try runs once; a duplicate confirm is answered from the barrier."""
    await bank.call("t1", Op.TRY)
    first = await bank.call("t1", Op.CONFIRM)
    second = await bank.call("t1", Op.CONFIRM)
    assert first.outcome is second.outcome is Outcome.OK and second.duplicate
    assert bank.runs["confirm"] == 1
    assert await bank.account() == (990, 0, 10)


@pytest.mark.parametrize(
    ("before", "op", "reason"),
    [
        ((), Op.CONFIRM, "confirm without a try"),
        ((Op.CANCEL,), Op.CONFIRM, "confirm after cancel"),
        ((Op.TRY, Op.CANCEL), Op.CONFIRM, "confirm after cancel"),
        ((Op.TRY, Op.CONFIRM), Op.CANCEL, "cancel after confirm"),
    ],
)
async def test_out_of_order_phase2_is_rejected_and_not_recorded(
    bank: Bank, before: tuple[Op, ...], op: Op, reason: str
) -> None:
    """Confirm needs an applied try and no cancel, cancel no applied confirm; none is recorded."""
    for earlier in before:
        assert (await bank.call("t1", earlier)).outcome is Outcome.OK
    state = await bank.state()
    runs = bank.runs[op.value]
    rejected = await bank.call("t1", op)
    assert rejected.outcome is Outcome.REJECTED
    assert reason in rejected.error
    assert bank.runs[op.value] == runs
    assert await bank.state() == state


async def test_confirm_of_a_refused_try_is_rejected(bank: Bank) -> None:
    """A confirm whose try was refused is rejected and changes nothing."""
    await bank.call("t1", Op.TRY, amount=10_000)
    rejected = await bank.call("t1", Op.CONFIRM)
    assert rejected.outcome is Outcome.REJECTED
    assert "did not apply (refused)" in rejected.error
    assert bank.runs["confirm"] == 0


async def test_refused_phase2_op_is_not_recorded(bank: Bank) -> None:
    """A confirm whose handler refuses is rolled back and unrecorded, so a retry can apply it."""
    await bank.call("t1", Op.TRY)
    refused = await bank.call("t1", Op.CONFIRM, amount=10_000, fail=Refusal("not today"))
    assert refused.outcome is Outcome.REFUSED and refused.error == "not today"
    state = await bank.state()
    assert ("t1", "payment", "confirm") not in state.barrier
    assert state.accounts["alice"] == (990, 10, 0)

    confirmed = await bank.call("t1", Op.CONFIRM)
    assert confirmed.outcome is Outcome.OK and not confirmed.duplicate
    assert await bank.account() == (990, 0, 10)


async def test_keys_are_per_branch_and_transaction(bank: Bank) -> None:
    """The same op on another branch or transaction is a different call, not a duplicate."""
    a = await bank.call("t1", Op.TRY)
    b = await bank.call("t1", Op.TRY, branch="other")
    c = await bank.call("t2", Op.TRY)
    assert not (a.duplicate or b.duplicate or c.duplicate)
    assert bank.runs["try"] == 3
    assert await bank.account() == (970, 30, 0)


@pytest.mark.parametrize(
    ("txid", "branch", "op", "message"),
    [
        ("", "payment", "try", "txid must be a non-empty string"),
        ("t1", "x" * (MAX_KEY_CHARS + 1), "try", f"the limit is {MAX_KEY_CHARS}"),
        ("t\x001", "payment", "try", "NUL"),
        ("t1", "payment", "prepare", "op must be one of"),
    ],
)
async def test_bad_keys_are_refused_before_any_change(
    bank: Bank, txid: str, branch: str, op: str, message: str
) -> None:
    """An empty, overlong or NUL-bearing key or an unknown op raises ValueError; nothing changes."""
    with pytest.raises(ValueError, match=message):
        await bank.barrier.run(txid, branch, op, bank.handler("t1", Op.TRY))
    assert bank.runs["try"] == 0
    assert await bank.rows() == {}


async def test_migrate_is_idempotent(bank: Bank) -> None:
    """Running migrate again keeps the table and its rows."""
    await bank.call("t1", Op.TRY)
    await bank.barrier.migrate()
    assert await bank.rows() == {("t1", "payment", "try"): Kind.APPLIED}


async def test_cleanup_deletes_only_old_rows(bank: Bank) -> None:
    """cleanup removes the rows older than the retention and keeps the newer ones."""
    await bank.call("old", Op.TRY)
    await bank.call("old", Op.CONFIRM)
    await bank.call("never", Op.CANCEL)  # a null cancel plus its blocked try
    bank.clock.now_s += 8 * DAY_S
    await bank.call("new", Op.TRY)
    bank.clock.now_s += 1 * DAY_S

    deleted = await bank.barrier.cleanup(DEFAULT_MIN_RETENTION_S)
    assert deleted == 4
    assert await bank.rows() == {("new", "payment", "try"): Kind.APPLIED}
    assert await bank.barrier.cleanup(DEFAULT_MIN_RETENTION_S) == 0


@pytest.mark.parametrize("older_than_s", [0, 3600.0, DEFAULT_MIN_RETENTION_S - 1, math.nan])
async def test_cleanup_refuses_a_too_short_retention(bank: Bank, older_than_s: float) -> None:
    """cleanup refuses less than the minimum retention (or NaN) and deletes nothing."""
    await bank.call("t1", Op.TRY)
    bank.clock.now_s += 30 * DAY_S
    with pytest.raises(ValueError, match="older_than_s"):
        await bank.barrier.cleanup(older_than_s)
    assert len(await bank.rows()) == 1


def test_min_retention_must_be_positive(tmp_path: Path) -> None:
    """A barrier cannot be configured with a zero, negative or infinite minimum retention."""
    for bad in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="min_retention_s"):
            SQLiteBarrier(tmp_path / "x.db", min_retention_s=bad)


async def test_sqlite_refuses_async_handlers(tmp_path: Path) -> None:
    """The SQLite barrier runs handlers in a thread, so a coroutine function is refused."""

    async def handler(conn: sqlite3.Connection) -> None:
        return None

    async with SQLiteBarrier(tmp_path / "b.db") as barrier:
        await barrier.migrate()
        with pytest.raises(TypeError, match="plain functions"):
            await barrier.run("t1", "b", Op.TRY, handler)


async def test_sqlite_handler_that_commits_fails_loudly(tmp_path: Path) -> None:
    """A handler that commits the barrier's transaction is an error, never a silent success."""

    def handler(conn: sqlite3.Connection) -> None:
        conn.commit()

    async with SQLiteBarrier(tmp_path / "b.db") as barrier:
        await barrier.migrate()
        with pytest.raises(BarrierError, match="must not commit"):
            await barrier.run("t1", "b", Op.TRY, handler)
        # The pending row it committed is never taken for an answer.
        with pytest.raises(BarrierError, match="pending"):
            await barrier.run("t1", "b", Op.TRY, lambda conn: None)


async def test_sqlite_handler_that_commits_is_not_run_again_by_a_waiting_duplicate(
    tmp_path: Path,
) -> None:
    """The claim row commits with a handler that commits on its own: a duplicate
    waiting for the write lock meanwhile fails loudly instead of applying again."""
    runs = []

    def handler(conn: sqlite3.Connection) -> None:
        runs.append(1)
        conn.execute("INSERT INTO effects VALUES ('x')")
        conn.commit()  # the misuse
        time.sleep(0.2)  # the duplicate is waiting for the lock by now

    async with SQLiteBarrier(tmp_path / "b.db", max_workers=2) as barrier:
        await barrier.migrate()
        with sqlite3.connect(tmp_path / "b.db") as conn:
            conn.execute("CREATE TABLE effects (v TEXT)")

        async def duplicate() -> Any:
            await asyncio.sleep(0.05)
            return await barrier.run("t1", "b", Op.TRY, handler)

        first, again = await asyncio.gather(
            barrier.run("t1", "b", Op.TRY, handler), duplicate(), return_exceptions=True
        )
    assert isinstance(first, BarrierError) and "must not commit" in str(first)
    assert isinstance(again, BarrierError) and "pending" in str(again)
    assert runs == [1]
    with sqlite3.connect(tmp_path / "b.db") as conn:
        assert conn.execute("SELECT count(*) FROM effects").fetchone() == (1,)


async def test_sqlite_handler_that_rolls_back_leaves_the_call_to_be_retried(
    tmp_path: Path,
) -> None:
    """A handler that rolls the transaction back undoes its claim too: it fails,
    and the next delivery runs the handler as if it were the first."""
    async with SQLiteBarrier(tmp_path / "b.db", max_workers=1) as barrier:
        await barrier.migrate()
        with pytest.raises(BarrierError, match="must not commit"):
            await barrier.run("t1", "b", Op.TRY, lambda conn: conn.rollback())
        result = await barrier.run("t1", "b", Op.TRY, lambda conn: {"ok": True})
    assert (result.outcome, result.result, result.duplicate) == (Outcome.OK, {"ok": True}, False)


async def test_closed_sqlite_barrier_refuses_calls(tmp_path: Path) -> None:
    """After close, calls fail with BarrierError instead of hanging."""
    barrier = SQLiteBarrier(tmp_path / "b.db")
    await barrier.migrate()
    await barrier.close()
    with pytest.raises(BarrierError, match="closed"):
        await barrier.run("t1", "b", Op.TRY, lambda conn: None)


def test_bad_table_names_are_refused(tmp_path: Path) -> None:
    """Table names are identifiers, never SQL."""
    for bad in ("x; DROP TABLE y", "", "a.b.c", '"q"'):
        with pytest.raises(ValueError, match="table"):
            SQLiteBarrier(tmp_path / "x.db", table=bad)


def test_retry_horizon_of_the_default_policy() -> None:
    """The horizon is deadline + the longest phase-2 retry span + the signature skew."""
    spec = TransactionSpec(
        protocol=Protocol.TCC,
        branches=(BranchSpec("a", "p"), BranchSpec("b", "p", timeout_s=1.0)),
        timeout_s=30.0,
    )
    # Default policy: caps 0.05 .. 2 s between 10 attempts (9.15 s) + 10 x 5 s timeouts.
    assert retry_horizon_s(spec) == pytest.approx(30.0 + 9.15 + 50.0 + MAX_SKEW_S)
    assert retry_horizon_s(spec) < DEFAULT_MIN_RETENTION_S


def test_retry_horizon_adds_up_saga_compensations() -> None:
    """A saga's compensations run one after another, so their spans add up."""
    policy = RetryPolicy(initial_interval_s=1.0, maximum_interval_s=1.0, maximum_attempts=3)
    branches = tuple(BranchSpec(n, "p", retry=policy, timeout_s=2.0) for n in "abc")
    saga = TransactionSpec(protocol=Protocol.SAGA, branches=branches, timeout_s=10.0)
    tcc = TransactionSpec(protocol=Protocol.TCC, branches=branches, timeout_s=10.0)
    span = 2 * 1.0 + 3 * 2.0
    assert retry_horizon_s(saga) == pytest.approx(10.0 + 3 * span + MAX_SKEW_S)
    assert retry_horizon_s(tcc) == pytest.approx(10.0 + span + MAX_SKEW_S)
