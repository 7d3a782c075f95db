"""SQLite group commit: the calls of one event-loop turn share a transaction and a COMMIT.

The barrier's rules under group commit are also run by every test of
test_barrier.py, test_concurrency.py and test_app.py (backend
``sqlite-grouped``); these pin what is specific to batches.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from pathlib import Path

import pytest

from accord.core.machine import Outcome
from accord.core.spec import Op
from accord.participant import BarrierError, Kind, SQLiteBarrier

from .conftest import INITIAL, open_bank


def _trace(barrier: SQLiteBarrier) -> list[str]:
    statements: list[str] = []
    barrier._connection().set_trace_callback(statements.append)
    return statements


def _count(statements: list[str], sql: str) -> int:
    return sum(s == sql for s in statements)


async def test_a_refusal_in_a_batch_rolls_back_only_its_own_call(tmp_path: Path) -> None:
    """One transaction for three calls: the refused one is recorded as refused, the others apply."""
    async with open_bank("sqlite-grouped", tmp_path) as bank:
        statements = _trace(bank.barrier)
        results = await asyncio.gather(
            bank.call("t1", Op.TRY),
            bank.call("t2", Op.TRY, amount=10_000),
            bank.call("t3", Op.TRY),
        )
        assert [r.outcome for r in results] == [Outcome.OK, Outcome.REFUSED, Outcome.OK]
        assert (_count(statements, "BEGIN IMMEDIATE"), _count(statements, "COMMIT")) == (1, 1)
        state = await bank.state()
        assert state.accounts["alice"] == (INITIAL["alice"] - 20, 20, 0)
        assert state.ledger == [("t1", "payment", "try"), ("t3", "payment", "try")]
        assert state.barrier == {
            ("t1", "payment", "try"): Kind.APPLIED,
            ("t2", "payment", "try"): Kind.REFUSED,
            ("t3", "payment", "try"): Kind.APPLIED,
        }


async def test_calls_in_one_batch_see_each_other_in_order(tmp_path: Path) -> None:
    """Try, its duplicate, confirm and a late cancel in one batch answer as one after another."""
    async with open_bank("sqlite-grouped", tmp_path) as bank:
        statements = _trace(bank.barrier)
        tried, again, confirmed, cancelled = await asyncio.gather(
            bank.call("t1", Op.TRY),
            bank.call("t1", Op.TRY),
            bank.call("t1", Op.CONFIRM),
            bank.call("t1", Op.CANCEL),
        )
        assert _count(statements, "COMMIT") == 1
        assert tried.outcome is again.outcome is confirmed.outcome is Outcome.OK
        assert again.duplicate and again.result == tried.result
        assert (cancelled.outcome, cancelled.error) == (Outcome.REJECTED, "cancel after confirm")
        assert await bank.account() == (INITIAL["alice"] - 10, 0, 10)
        assert bank.runs == {"try": 1, "confirm": 1}


async def test_a_cancel_before_its_try_in_one_batch_blocks_it(tmp_path: Path) -> None:
    """Null compensation, then the try of the same batch is refused for good."""
    async with open_bank("sqlite-grouped", tmp_path) as bank:
        cancelled, tried = await asyncio.gather(bank.call("t1", Op.CANCEL), bank.call("t1", Op.TRY))
        assert (cancelled.outcome, cancelled.result) == (Outcome.OK, None)
        assert tried.outcome is Outcome.REFUSED and "cancel arrived before try" in tried.error
        assert bank.runs["try"] == 0
        assert (await bank.rows()) == {
            ("t1", "payment", "cancel"): Kind.NULL,
            ("t1", "payment", "try"): Kind.BLOCKED,
        }


async def test_an_exception_in_a_batch_fails_only_its_call(tmp_path: Path) -> None:
    """The failing call raises (a 500); the batch's other calls commit."""
    async with open_bank("sqlite-grouped", tmp_path) as bank:
        results = await asyncio.gather(
            bank.call("t1", Op.TRY),
            bank.call("t2", Op.TRY, fail=RuntimeError("ledger gone")),
            bank.call("t3", Op.TRY),
            return_exceptions=True,
        )
        assert isinstance(results[1], RuntimeError)
        state = await bank.state()
        assert state.ledger == [("t1", "payment", "try"), ("t3", "payment", "try")]
        assert ("t2", "payment", "try") not in state.barrier
        assert (await bank.call("t2", Op.TRY)).outcome is Outcome.OK


async def test_a_failed_commit_fails_every_call_and_keeps_nothing(tmp_path: Path) -> None:
    """A COMMIT that fails (a deferred constraint) fails the whole batch; retries then apply."""
    async with open_bank("sqlite-grouped", tmp_path) as bank:
        conn = sqlite3.connect(bank.path)
        conn.executescript(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
            "CREATE TABLE child (parent INTEGER"
            " REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);"
        )
        conn.close()
        bank.barrier._connection().execute("PRAGMA foreign_keys = ON")
        before = await bank.state()

        def orphan(tx: sqlite3.Connection) -> str:
            tx.execute("INSERT INTO child VALUES (42)")  # fails only at COMMIT
            return "inserted"

        results = await asyncio.gather(
            bank.call("t1", Op.TRY),
            bank.barrier.run("t2", "other", Op.TRY, orphan),
            bank.call("t3", Op.TRY),
            return_exceptions=True,
        )
        assert all(isinstance(r, sqlite3.IntegrityError) for r in results), results
        assert await bank.state() == before

        retried = await asyncio.gather(bank.call("t1", Op.TRY), bank.call("t3", Op.TRY))
        assert [r.outcome for r in retried] == [Outcome.OK, Outcome.OK]
        assert not any(r.duplicate for r in retried)
        assert await bank.account() == (INITIAL["alice"] - 20, 20, 0)


async def test_a_handler_that_commits_fails_the_rest_of_its_batch(tmp_path: Path) -> None:
    """A handler ending the shared transaction is an error for it and for its batch."""
    async with open_bank("sqlite-grouped", tmp_path) as bank:

        def commits(tx: sqlite3.Connection) -> None:
            tx.commit()

        results = await asyncio.gather(
            bank.call("t1", Op.TRY),
            bank.barrier.run("t2", "other", Op.TRY, commits),
            bank.call("t3", Op.TRY),
            return_exceptions=True,
        )
        assert all(isinstance(r, BarrierError) for r in results), results
        # t1 was committed by the rogue handler: its retry gets the stored answer, no rerun.
        again = await bank.call("t1", Op.TRY)
        assert again.outcome is Outcome.OK and again.duplicate
        assert (await bank.call("t3", Op.TRY)).outcome is Outcome.OK
        assert bank.runs["try"] == 2  # t1 once; t3 only on its retry (refused to run outside)


async def test_a_call_that_cannot_be_rolled_back_fails_its_batch(tmp_path: Path) -> None:
    """If a failed call's work cannot be undone, the batch is rolled back, not committed."""
    async with open_bank("sqlite-grouped", tmp_path) as bank:
        before = await bank.state()

        def releases_the_call(tx: sqlite3.Connection) -> None:
            tx.execute("INSERT INTO ledger VALUES ('rogue', 'b', 'try')")
            tx.execute("RELEASE accord_call")  # the barrier's own savepoint, gone

        results = await asyncio.gather(
            bank.call("t1", Op.TRY),
            bank.barrier.run("t2", "other", Op.TRY, releases_the_call),
            bank.call("t3", Op.TRY),
            return_exceptions=True,
        )
        assert isinstance(results[1], sqlite3.OperationalError)
        assert isinstance(results[0], BarrierError) and isinstance(results[2], BarrierError)
        assert await bank.state() == before
        assert (await bank.call("t1", Op.TRY)).outcome is Outcome.OK


async def test_cleanup_and_close_wait_for_an_open_batch(tmp_path: Path) -> None:
    """Cleanup and close share the batch's connection: they run after its COMMIT."""
    async with open_bank("sqlite-grouped", tmp_path) as bank:
        bank.clock.now_s -= 30 * 24 * 3600
        await bank.call("t0", Op.TRY)
        bank.clock.now_s += 30 * 24 * 3600
        tried, deleted = await asyncio.gather(
            bank.call("t1", Op.TRY), bank.barrier.cleanup(7 * 24 * 3600)
        )
        assert (tried.outcome, deleted) == (Outcome.OK, 1)
        pending = asyncio.ensure_future(bank.call("t2", Op.TRY))
        await asyncio.sleep(0)
        await bank.barrier.close()
        assert (await pending).outcome is Outcome.OK
        with pytest.raises(BarrierError, match="closed"):
            await bank.call("t3", Op.TRY)
        assert set(await bank.rows()) == {("t1", "payment", "try"), ("t2", "payment", "try")}


def test_group_commit_needs_the_loop_thread(tmp_path: Path) -> None:
    """Group commit runs on the event loop's thread; worker threads are refused up front."""
    with pytest.raises(ValueError, match="max_workers=0"):
        SQLiteBarrier(tmp_path / "b.db", group_commit=True)


RIVAL_PROCESS = """
import asyncio, sys
from accord.participant import SQLiteBarrier

async def main(path, op, n):
    barrier = SQLiteBarrier(path, max_workers=0, group_commit=True)

    async def one(txid):
        def run(conn):
            conn.execute("INSERT INTO effects VALUES (?, ?)", (txid, op))
        return await barrier.run(txid, "b", op, run)

    for start in range(0, n, 10):  # batches of up to 10 calls
        await asyncio.gather(*(one(f"t{i}") for i in range(start, start + 10)))
    await barrier.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_confirm_and_cancel_from_two_processes_never_both_apply(tmp_path: Path) -> None:
    """Two processes with grouped barriers on one file race confirm against cancel per branch."""
    path, n = tmp_path / "shared.db", 200
    async with SQLiteBarrier(path, max_workers=0, group_commit=True) as barrier:
        await barrier.migrate()
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE effects (txid TEXT, op TEXT)")
        conn.commit()
        conn.close()

        def tried(txid: str) -> object:
            def run(tx: sqlite3.Connection) -> None:
                tx.execute("INSERT INTO effects VALUES (?, 'try')", (txid,))

            return run

        await asyncio.gather(*(barrier.run(f"t{i}", "b", Op.TRY, tried(f"t{i}")) for i in range(n)))
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", RIVAL_PROCESS, str(path), op, str(n)
            )
            for op in ("confirm", "cancel")
        ]
        codes = [await p.wait() for p in procs]
        assert codes == [0, 0]
    conn = sqlite3.connect(path)
    effects = sorted(conn.execute("SELECT txid, op FROM effects WHERE op != 'try'"))
    kinds = dict(
        ((txid, op), kind)
        for txid, op, kind in conn.execute("SELECT txid, op, kind FROM accord_barrier")
    )
    conn.close()
    applied = [txid for txid, _ in effects]
    assert sorted(applied) == sorted(f"t{i}" for i in range(n))  # each branch exactly once
    for txid, op in effects:
        assert kinds[(txid, op)] == Kind.APPLIED
        rival = "cancel" if op == "confirm" else "confirm"
        assert (txid, rival) not in kinds
