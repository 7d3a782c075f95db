"""The barrier under real concurrency: many connections (PostgreSQL) or threads (SQLite).

Handlers sleep while their transaction is open, so that concurrent calls
overlap inside the barrier rather than one after another.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from accord.core.machine import Outcome
from accord.core.spec import Op
from accord.participant import BarrierResult, Kind

from .conftest import INITIAL, Bank

COPIES = 30
ROUNDS = 15
DELAY_S = 0.005
PREREQUISITE = {Op.CONFIRM: Op.TRY, Op.CANCEL: Op.TRY, Op.COMPENSATE: Op.ACTION}


async def _gather(
    bank: Bank, calls: list[tuple[str, Op]], rng: random.Random | None = None
) -> list[BarrierResult]:
    """Run ``calls`` concurrently; with ``rng``, each starts after a random delay
    of up to DELAY_S, so that either of two racing operations can go first."""

    async def one(txid: str, op: Op, start_s: float) -> BarrierResult:
        if start_s:
            await asyncio.sleep(start_s)
        return await bank.call(txid, op, delay_s=DELAY_S)

    starts = [rng.uniform(0, DELAY_S) if rng else 0.0 for _ in calls]
    pending = (one(txid, op, s) for (txid, op), s in zip(calls, starts, strict=True))
    return list(await asyncio.gather(*pending))


@pytest.mark.parametrize("op", list(Op))
async def test_concurrent_duplicates_apply_once(bank: Bank, op: Op) -> None:
    """Many identical concurrent calls run the handler once and all get the same answer."""
    if op in PREREQUISITE:
        assert (await bank.call("t1", PREREQUISITE[op])).outcome is Outcome.OK
    results = await _gather(bank, [("t1", op)] * COPIES)

    assert bank.runs[op.value] == 1
    assert {(r.outcome, repr(r.result), r.error) for r in results} == {
        (Outcome.OK, repr(results[0].result), "")
    }
    assert sum(not r.duplicate for r in results) == 1
    state = await bank.state()
    assert state.ledger.count(("t1", "payment", op.value)) == 1
    assert state.barrier[("t1", "payment", op.value)] == Kind.APPLIED


@pytest.mark.parametrize("undo", [Op.CANCEL, Op.COMPENSATE])
async def test_concurrent_null_compensations_agree(bank: Bank, undo: Op) -> None:
    """Concurrent cancels with no try all succeed as one null compensation that blocks the try."""
    results = await _gather(bank, [("t1", undo)] * COPIES)
    assert all(r.outcome is Outcome.OK for r in results)
    assert sum(not r.duplicate for r in results) == 1
    assert bank.runs[undo.value] == 0
    forward = PREREQUISITE[undo]
    assert (await bank.call("t1", forward)).outcome is Outcome.REFUSED
    assert bank.runs[forward.value] == 0
    assert await bank.account() == (INITIAL["alice"], 0, 0)


async def test_concurrent_refusals_agree(bank: Bank) -> None:
    """Concurrent duplicates of a refused try run the handler once and all get the refusal."""
    results = await asyncio.gather(
        *(bank.call("t1", Op.TRY, amount=10_000, delay_s=DELAY_S) for _ in range(COPIES))
    )
    assert {(r.outcome, r.error) for r in results} == {
        (Outcome.REFUSED, "insufficient funds: alice cannot pay 10000")
    }
    assert bank.runs["try"] == 1
    assert await bank.account() == (INITIAL["alice"], 0, 0)


async def test_confirm_racing_cancel_never_both_apply(bank: Bank) -> None:
    """Confirms and cancels of one branch, sent together: exactly one of the two ever applies."""
    rng = random.Random(7)
    winners: Counter[str] = Counter()
    for i in range(ROUNDS):
        txid = f"t{i}"
        assert (await bank.call(txid, Op.TRY)).outcome is Outcome.OK
        calls = [(txid, Op.CONFIRM)] * 4 + [(txid, Op.CANCEL)] * 4
        rng.shuffle(calls)
        results = await _gather(bank, calls, rng)

        by_op: dict[Op, set[Outcome]] = {Op.CONFIRM: set(), Op.CANCEL: set()}
        for (_, op), result in zip(calls, results, strict=True):
            by_op[op].add(result.outcome)
        applied = [op for op, outcomes in by_op.items() if outcomes == {Outcome.OK}]
        assert len(applied) == 1, by_op
        loser = Op.CANCEL if applied[0] is Op.CONFIRM else Op.CONFIRM
        assert by_op[loser] == {Outcome.REJECTED}
        winners[applied[0].value] += 1

    state = await bank.state()
    for i in range(ROUNDS):
        entries = {op for txid, _, op in state.ledger if txid == f"t{i}"}
        assert entries in ({"try", "confirm"}, {"try", "cancel"})
    balance, held, spent = state.accounts["alice"]
    assert held == 0
    assert balance + spent == INITIAL["alice"]
    assert spent == 10 * winners["confirm"]


async def test_try_racing_cancel_never_leaves_a_hanging_reservation(bank: Bank) -> None:
    """A try and its cancel sent together: either both apply or neither; nothing stays held."""
    rng = random.Random(11)
    for i in range(ROUNDS):
        txid = f"t{i}"
        calls = [(txid, Op.TRY)] * 3 + [(txid, Op.CANCEL)] * 3
        rng.shuffle(calls)
        await _gather(bank, calls, rng)
        # Whatever the order, one more cancel afterwards changes nothing.
        assert (await bank.call(txid, Op.CANCEL)).duplicate

    state = await bank.state()
    for i in range(ROUNDS):
        txid = f"t{i}"
        entries = sorted(op for t, _, op in state.ledger if t == txid)
        assert entries in ([], ["cancel", "try"])
        kinds = (
            state.barrier[(txid, "payment", "try")],
            state.barrier[(txid, "payment", "cancel")],
        )
        assert kinds in ((Kind.APPLIED, Kind.APPLIED), (Kind.BLOCKED, Kind.NULL))
    assert state.accounts["alice"] == (INITIAL["alice"], 0, 0)
