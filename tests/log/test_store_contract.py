"""One contract for every durable log: MemoryStore, SQLiteStore and PostgresStore
(another backend is one more ``Backend`` in ``BACKENDS`` below).

PostgreSQL runs at ``ACCORD_TEST_PG_DSN`` (default
``postgresql://postgres@127.0.0.1/test``), each test in a fresh schema dropped
afterwards; if the server is unreachable its tests are skipped, or fail when
``CI`` is set.

Tests that need a store to survive a close (reopen, schema version, corruption)
skip for backends that cannot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from accord.core import machine
from accord.core.machine import ScheduleRetry, Send
from accord.core.records import (
    Attempted,
    Begin,
    BranchSummary,
    Decided,
    Decision,
    Ended,
    LogRecord,
    OperatorAction,
    TxnStatus,
)
from accord.core.spec import BranchSpec, Op, Protocol, RetryPolicy, TransactionSpec
from accord.errors import SchemaVersionError, StoreError
from accord.log import (
    SCHEMA_VERSION,
    MemoryStore,
    PostgresStore,
    SQLiteStore,
    Store,
    open_store,
)

T0 = 1_700_000_000_000


# ------------------------------------------------------------------ backends


@dataclass
class Backend:
    name: str
    make: Callable[[], Store]  # a new store object over the same data
    durable: bool = False  # survives close() and a new make()
    group_commit: bool = False  # sync() resolves on a later loop turn, for a whole batch
    corrupt: Callable[[str, str, bytes], None] | None = None  # (txid, kind, body)
    set_schema_version: Callable[[int], None] | None = None
    cleanup: Callable[[], Awaitable[None]] | None = None  # after the test


def _memory(_: Path) -> Backend:
    shared = MemoryStore()  # the same object "reopened": memory lives as long as it
    return Backend("memory", lambda: shared)


def _sqlite(tmp: Path) -> Backend:
    path = tmp / "log.db"

    def corrupt(txid: str, kind: str, body: bytes) -> None:
        with sqlite3.connect(path) as conn:
            n = conn.execute(
                "UPDATE log SET body = ? WHERE txid = ? AND kind = ?", (body, txid, kind)
            ).rowcount
        assert n == 1

    def set_version(version: int) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))

    return Backend(
        "sqlite",
        lambda: SQLiteStore(path),
        durable=True,
        group_commit=True,
        corrupt=corrupt,
        set_schema_version=set_version,
    )


PG_DSN = os.environ.get("ACCORD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1/test")


def _pg_run(sql: str, *args: Any) -> str:
    """Run one statement on a connection of its own, from a thread of its own
    (the test's event loop may be running)."""

    async def run() -> str:
        conn = await asyncpg.connect(PG_DSN, timeout=5)
        try:
            return str(await conn.execute(sql, *args))
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def _pg_reachable() -> None:
    try:
        _pg_run("SELECT 1")
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL unreachable at {PG_DSN}: {exc!r}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _postgres(_: Path) -> Backend:
    _pg_reachable()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    made: list[PostgresStore] = []

    def make() -> Store:
        s = PostgresStore(PG_DSN, schema=schema, pool_size=2)
        made.append(s)
        return s

    def corrupt(txid: str, kind: str, body: bytes) -> None:
        done = _pg_run(
            f"UPDATE {schema}.log SET body = $1 WHERE txid = $2 AND kind = $3", body, txid, kind
        )
        assert done == "UPDATE 1"

    def set_version(version: int) -> None:
        _pg_run(f"UPDATE {schema}.meta SET value = $1 WHERE key = 'schema_version'", str(version))

    async def cleanup() -> None:
        for s in made:
            await s.close()
        _pg_run(f"DROP SCHEMA IF EXISTS {schema} CASCADE")

    return Backend(
        "postgres",
        make,
        durable=True,
        group_commit=True,
        corrupt=corrupt,
        set_schema_version=set_version,
        cleanup=cleanup,
    )


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "postgres": _postgres,
}
# Backends that lack a capability: tests marked with it are not generated for
# them (tests/conftest.py deselects those combinations instead of skipping).
BACKENDS_WITHOUT = {"durable": {"memory"}, "group_commit": {"memory"}}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b = BACKENDS[request.param](tmp_path)
    yield b
    if b.cleanup is not None:
        await b.cleanup()


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = backend.make()
    await s.open()
    yield s
    await s.close()


async def corrupted(backend: Backend, store: Store, txid: str, kind: str, body: bytes) -> Store:
    """Close ``store``, overwrite ``txid``'s ``kind`` record with ``body``; a new
    store over the same data, not opened."""
    assert backend.corrupt is not None
    await store.close()
    backend.corrupt(txid, kind, body)
    return backend.make()


async def reopen(backend: Backend, store: Store) -> Store:
    await store.close()
    fresh = backend.make()
    await fresh.open()
    return fresh


# ------------------------------------------------------------------ records


def make_spec(txid: str, n: int = 2, protocol: str = "tcc") -> TransactionSpec:
    return TransactionSpec(
        protocol=Protocol(protocol),
        branches=tuple(
            BranchSpec(f"b{i}", f"p{i}", {"amount": 10 * i}, RetryPolicy(maximum_attempts=4))
            for i in range(n)
        ),
        id=txid,
        timeout_s=30,
    )


def begin(txid: str, at: int = T0, **kw: Any) -> Begin:
    return Begin(make_spec(txid, **kw), at, at + 30_000)


def decided(txid: str, decision: Decision, at: int = T0 + 1) -> Decided:
    return Decided(txid, decision, f"{decision} reason", at)


def ended(txid: str, status: TxnStatus, at: int = T0 + 2, result: Any = None) -> Ended:
    branches = (
        BranchSummary("b0", "done", "confirm", 1, "", result),
        BranchSummary("b1", "done", "confirm", 2, "", None),
    )
    return Ended(txid, status, f"{status} reason", at, branches)


def attempted(txid: str, branch: int, op: Op, attempt: int, next_at: int) -> Attempted:
    return Attempted(txid, branch, op, attempt, "503", next_at - 100, next_at)


class Receipt:
    """A participant result JSON cannot encode."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Receipt) and other.n == self.n

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Receipt({self.n})"


async def write(store: Store, *records: LogRecord) -> frozenset[str]:
    for record in records:
        store.append(record)
    return await store.flush()


async def active_ids(store: Store) -> list[str]:
    return sorted(s.txid for s in await store.load_active())


# ------------------------------------------------------------------ basics


async def test_begin_is_readable_back_after_flush(store: Store) -> None:
    """A flushed Begin is active and folds into a preparing snapshot of the same spec."""
    assert await write(store, begin("a")) == frozenset()
    snap = await store.get("a")
    assert snap is not None
    assert snap.spec == make_spec("a")
    assert (snap.status, snap.decision, snap.created_at_ms, snap.deadline_at_ms) == (
        TxnStatus.PREPARING,
        None,
        T0,
        T0 + 30_000,
    )
    assert [s.txid for s in await store.load_active()] == ["a"]
    assert await store.get("missing") is None


async def test_reads_see_every_record_appended_before_them(store: Store) -> None:
    """Read your writes: records appended but not yet flushed (a TCC commit's end is
    not waited for) are seen by get, list, counts and snapshots right after."""
    await write(store, begin("a"), decided("a", Decision.COMMIT))
    store.append(ended("a", TxnStatus.COMMITTED))  # no flush
    snap = await store.get("a")
    assert snap is not None and snap.status is TxnStatus.COMMITTED
    store.append(begin("b"))
    store.append(decided("b", Decision.ABORT))
    store.append(ended("b", TxnStatus.ABORTED))
    assert [r.status for r in await store.list()] == [TxnStatus.COMMITTED, TxnStatus.ABORTED]
    assert await store.count_by_status() == {TxnStatus.COMMITTED: 1, TxnStatus.ABORTED: 1}
    assert {s.txid for s in await store.snapshots()} == {"a", "b"}


async def test_full_lifecycle_folds_and_leaves_the_active_set(store: Store) -> None:
    """Begin, Decided(commit), Ended(committed): get shows it committed, load_active drops it."""
    await write(store, begin("a"), decided("a", Decision.COMMIT), ended("a", TxnStatus.COMMITTED))
    snap = await store.get("a")
    assert snap is not None
    assert (snap.status, snap.decision, snap.reason) == (
        TxnStatus.COMMITTED,
        Decision.COMMIT,
        "committed reason",
    )
    assert snap.updated_at_ms == T0 + 2
    assert snap.branches == ended("a", TxnStatus.COMMITTED).branches
    assert [type(r) for r in snap.history] == [Begin, Decided, Ended]
    assert await store.load_active() == []


async def test_list_filters_pages_and_counts(store: Store) -> None:
    """list() is ordered by id, filters by status, pages with after_id; counts agree."""
    await write(
        store,
        begin("c"),
        begin("a"),
        begin("b"),
        decided("b", Decision.ABORT),
        ended("b", TxnStatus.ABORTED),
        begin("d"),
        decided("d", Decision.COMMIT),
    )
    rows = await store.list()
    assert [r.id for r in rows] == ["a", "b", "c", "d"]
    assert rows[1].status is TxnStatus.ABORTED and rows[1].decision == "abort"
    assert rows[3].status is TxnStatus.COMMITTING and rows[3].decision == "commit"
    assert rows[0].protocol == "tcc" and rows[0].branches == 2
    assert [r.id for r in await store.list(status=TxnStatus.PREPARING)] == ["a", "c"]
    assert [r.id for r in await store.list(limit=2)] == ["a", "b"]
    assert [r.id for r in await store.list(after_id="b", limit=1)] == ["c"]
    assert await store.count_by_status() == {
        TxnStatus.PREPARING: 2,
        TxnStatus.ABORTED: 1,
        TxnStatus.COMMITTING: 1,
    }
    assert sorted(s.txid for s in await store.snapshots()) == ["a", "b", "c", "d"]


async def test_records_of_many_transactions_interleave_correctly(store: Store) -> None:
    """Interleaved records of 50 transactions fold per transaction, in append order."""
    for i in range(50):
        store.append(begin(f"t{i:02}"))
    for i in range(0, 50, 2):
        store.append(decided(f"t{i:02}", Decision.ABORT))
    for i in range(0, 50, 4):
        store.append(ended(f"t{i:02}", TxnStatus.ABORTED))
    assert await store.flush() == frozenset()
    counts = await store.count_by_status()
    assert counts == {TxnStatus.PREPARING: 25, TxnStatus.ABORTING: 12, TxnStatus.ABORTED: 13}
    assert len(await store.load_active()) == 37


async def test_counts_and_filtered_lists_agree_with_the_folded_log(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """count_by_status and list(status=...), which the SQL stores answer from
    the last End record of each finished transaction and from txn_open, agree
    with folding every transaction: through reopened and twice-ended ones,
    pages, the since filter and reads split in chunks; also transactions an
    operator resolved (their last word is the operator's, not an End)."""
    for module in ("accord.log.sqlite", "accord.log.postgres"):
        monkeypatch.setattr(f"{module}.FOLD_CHUNK", 2)
    shapes: dict[str, list[Callable[[str], LogRecord]]] = {
        "prep": [],
        "cmtg": [lambda t: decided(t, Decision.COMMIT)],
        "abtg": [lambda t: decided(t, Decision.ABORT)],
        "done": [lambda t: decided(t, Decision.COMMIT), lambda t: ended(t, TxnStatus.COMMITTED)],
        "undo": [lambda t: decided(t, Decision.ABORT), lambda t: ended(t, TxnStatus.ABORTED)],
        "park": [
            lambda t: decided(t, Decision.COMMIT),
            lambda t: ended(t, TxnStatus.NEEDS_ATTENTION),
        ],
        "back": [  # parked, then retried by an operator: open again
            lambda t: decided(t, Decision.ABORT),
            lambda t: ended(t, TxnStatus.NEEDS_ATTENTION),
            lambda t: OperatorAction(t, "retry", "fixed", T0 + 5),
        ],
        "fixd": [  # parked, then resolved by an operator: no End of its own
            lambda t: decided(t, Decision.COMMIT),
            lambda t: ended(t, TxnStatus.NEEDS_ATTENTION),
            lambda t: OperatorAction(t, "resolve", "repaired by hand", T0 + 5),
        ],
        "twice": [  # parked, retried, then ended: two End records, the last one counts
            lambda t: decided(t, Decision.COMMIT),
            lambda t: ended(t, TxnStatus.NEEDS_ATTENTION),
            lambda t: OperatorAction(t, "retry", "fixed", T0 + 5),
            lambda t: ended(t, TxnStatus.COMMITTED, at=T0 + 6),
        ],
    }
    for n in range(3):
        for shape, steps in shapes.items():
            txid = f"{shape}-{n}"
            await write(store, begin(txid, at=T0 + n))
            for step in steps:  # one batch each, as a coordinator would write them
                await write(store, step(txid))
    assert store.violations == []
    snaps = await store.snapshots()
    assert len(snaps) == 3 * len(shapes)
    expected: dict[TxnStatus, int] = {}
    for snap in snaps:
        expected[snap.status] = expected.get(snap.status, 0) + 1
    assert await store.count_by_status() == expected
    for status in TxnStatus:
        want = sorted(s.txid for s in snaps if s.status is status)
        assert [r.id for r in await store.list(status=status, limit=1000)] == want, status
        paged: list[str] = []
        after = None
        while rows := await store.list(status=status, limit=2, after_id=after):
            paged += [r.id for r in rows]
            after = rows[-1].id
        assert paged == want, status
        recent = sorted(s.txid for s in snaps if s.status is status and s.created_at_ms >= T0 + 1)
        listed = await store.list(status=status, limit=1000, since_ms=T0 + 1)
        assert [r.id for r in listed] == recent, status


async def test_purge_deletes_only_transactions_that_ended_for_good_before_the_time(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """purge(before) deletes the committed and aborted transactions whose last
    record is older than ``before`` (read in pages); open, parked and newer
    ones stay; a purged id can begin again as a new transaction."""
    for module in ("accord.log.sqlite", "accord.log.postgres"):
        monkeypatch.setattr(f"{module}.FOLD_CHUNK", 2)
    old, new = T0, T0 + 10_000
    for n in range(3):
        await write(store, begin(f"c{n}", at=old), decided(f"c{n}", Decision.COMMIT, at=old))
        await write(store, ended(f"c{n}", TxnStatus.COMMITTED, at=old))
        await write(store, begin(f"a{n}", at=old), decided(f"a{n}", Decision.ABORT, at=old))
        await write(store, ended(f"a{n}", TxnStatus.ABORTED, at=old))
    await write(store, begin("parked", at=old), decided("parked", Decision.COMMIT, at=old))
    await write(store, ended("parked", TxnStatus.NEEDS_ATTENTION, at=old))
    await write(store, begin("open", at=old), decided("open", Decision.COMMIT, at=old))
    await write(store, begin("late", at=old), decided("late", Decision.ABORT, at=old))
    await write(store, ended("late", TxnStatus.ABORTED, at=new))  # ended after the cut
    assert await store.purge(new) == 6
    assert sorted(s.txid for s in await store.snapshots()) == ["late", "open", "parked"]
    assert await store.get("c0") is None
    assert await store.count_by_status() == {
        TxnStatus.NEEDS_ATTENTION: 1,
        TxnStatus.COMMITTING: 1,
        TxnStatus.ABORTED: 1,
    }
    assert await store.purge(new) == 0  # nothing left to purge
    assert await write(store, begin("c0", at=new)) == frozenset()  # the id is free again
    assert (await store.get("c0")).status is TxnStatus.PREPARING  # type: ignore[union-attr]
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="before_ms"):
            await store.purge(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------ group commit


async def test_one_sync_covers_everything_appended_before_it(store: Store) -> None:
    """All sync() calls of one loop turn share one awaitable; then every append is readable."""
    syncs = []
    for i in range(100):
        store.append(begin(f"t{i}"))
        syncs.append(store.sync())
    assert len({id(s) for s in syncs}) == 1
    if syncs[0] is not None:
        assert await syncs[0] == frozenset()
    assert len(await store.load_active()) == 100


@pytest.mark.group_commit
async def test_many_transactions_share_a_batch(backend: Backend, store: Store) -> None:
    """Concurrent writers in one loop turn are committed together: records per batch > 1."""
    before = store.stats()

    async def one(i: int) -> None:
        store.append(begin(f"t{i}"))
        store.append(decided(f"t{i}", Decision.COMMIT))
        pending = store.sync()
        assert pending is not None
        assert await pending == frozenset()

    await asyncio.gather(*(one(i) for i in range(200)))
    after = store.stats()
    batches = after.batches - before.batches
    assert after.records - before.records == 400
    assert 1 <= batches <= 3
    assert after.records_per_batch > 1


async def test_sync_with_nothing_pending_is_none(backend: Backend, store: Store) -> None:
    """sync() with nothing appended returns None and flush() an empty set."""
    await write(store, begin("a"))
    assert store.sync() is None
    assert await store.flush() == frozenset()


# ------------------------------------------------------------------ durability


@pytest.mark.durable
async def test_everything_survives_close_and_reopen(backend: Backend, store: Store) -> None:
    """What was flushed is there after a close and a new store over the same data."""
    await write(
        store,
        begin("a"),
        decided("a", Decision.COMMIT),
        ended("a", TxnStatus.COMMITTED, result={"receipt": [1, 2]}),
        begin("b", n=3, protocol="saga"),
    )
    store.append(decided("b", Decision.ABORT))  # appended, never flushed: close() flushes
    store = await reopen(backend, store)
    try:
        a = await store.get("a")
        assert a is not None and a.status is TxnStatus.COMMITTED
        assert a.branches[0].result == {"receipt": [1, 2]}
        [b] = await store.load_active()
        assert b.spec == make_spec("b", n=3, protocol="saga")
        assert b.status is TxnStatus.ABORTING
    finally:
        await store.close()


async def test_load_active_after_reopen_folds_the_retry_schedule(
    backend: Backend, store: Store
) -> None:
    """Attempted records fold to the last (attempt, next_at_ms) per (branch, op) for recovery."""
    await write(
        store,
        begin("a"),
        attempted("a", 0, Op.TRY, 1, T0 + 50),
        decided("a", Decision.COMMIT),
        attempted("a", 0, Op.CONFIRM, 1, T0 + 100),
        attempted("a", 0, Op.CONFIRM, 2, T0 + 900),
        attempted("a", 1, Op.CONFIRM, 1, T0 + 10),
    )
    if backend.durable:
        store = await reopen(backend, store)
    try:
        [snap] = await store.load_active()
    finally:
        if backend.durable:
            await store.close()
    assert snap.attempts == {
        (0, Op.TRY): (1, T0 + 50),
        (0, Op.CONFIRM): (2, T0 + 900),
        (1, Op.CONFIRM): (1, T0 + 10),
    }
    assert snap.status is TxnStatus.COMMITTING
    _, actions = machine.recover(snap, T0 + 500)
    assert actions == [ScheduleRetry(0, Op.CONFIRM, 3, T0 + 900), Send(1, Op.CONFIRM, 2)]


# ------------------------------------------------------------------ duplicate ids


async def test_begin_for_an_open_id_is_rejected_through_sync(store: Store) -> None:
    """A second Begin with an id in use is refused, reported by sync(), and changes nothing."""
    await write(store, begin("a"))
    rejected = await write(store, begin("a", at=T0 + 5, n=3), begin("b"))
    assert rejected == frozenset({"a"})
    snap = await store.get("a")
    assert snap is not None and snap.spec == make_spec("a") and snap.created_at_ms == T0
    assert await active_ids(store) == ["a", "b"]
    assert await store.flush() == frozenset()  # reported once


@pytest.mark.durable
async def test_begin_for_an_id_of_an_earlier_run_is_rejected(
    backend: Backend, store: Store
) -> None:
    """After a reopen, a Begin reusing the id of a finished or an open transaction is refused."""
    await write(store, begin("done"), decided("done", Decision.ABORT))
    await write(store, ended("done", TxnStatus.ABORTED), begin("open"))
    store = await reopen(backend, store)
    try:
        assert await write(store, begin("done", at=T0 + 9)) == frozenset({"done"})
        assert await write(store, begin("open", at=T0 + 9)) == frozenset({"open"})
        # Records the refused duplicate might send next are not taken as the original's.
        await write(store, decided("done", Decision.COMMIT))
        done = await store.get("done")
        assert done is not None and done.status is TxnStatus.ABORTED
        assert [type(r) for r in done.history] == [Begin, Decided, Ended]
        assert await active_ids(store) == ["open"]
    finally:
        await store.close()


async def test_duplicate_begin_in_the_batch_that_ends_the_original(store: Store) -> None:
    """End and duplicate Begin in one batch: end kept, duplicate refused, nothing active."""
    await write(store, begin("a"), decided("a", Decision.ABORT))
    rejected = await write(store, ended("a", TxnStatus.ABORTED), begin("a", at=T0 + 9))
    assert rejected == frozenset({"a"})
    snap = await store.get("a")
    assert snap is not None and snap.status is TxnStatus.ABORTED and snap.created_at_ms == T0
    assert await store.load_active() == []
    store.append(decided("a", Decision.COMMIT))  # the duplicate carrying on
    await store.flush()
    assert store.violations  # refused, not written into the original's history
    snap = await store.get("a")
    assert snap is not None and snap.decision is Decision.ABORT


# ------------------------------------------------------------------ transition checks


async def test_a_decision_never_flips(backend: Backend, store: Store) -> None:
    """A contradicting Decided or Ended is not written, only listed in violations."""
    await write(store, begin("a"), decided("a", Decision.COMMIT))
    await write(store, decided("a", Decision.COMMIT, at=T0 + 3))
    assert store.violations == []
    await write(store, decided("a", Decision.ABORT, at=T0 + 4))
    await write(store, ended("a", TxnStatus.ABORTED, at=T0 + 5))
    assert len(store.violations) == 2
    assert all("a" in v for v in store.violations)
    if backend.durable:
        store = await reopen(backend, store)
        await write(store, decided("a", Decision.ABORT, at=T0 + 6))
        assert len(store.violations) == 1
    try:
        snap = await store.get("a")
        assert snap is not None
        assert (snap.status, snap.decision) == (TxnStatus.COMMITTING, Decision.COMMIT)
    finally:
        if backend.durable:
            await store.close()


@pytest.mark.parametrize("status", [TxnStatus.COMMITTED, TxnStatus.ABORTED])
async def test_nothing_follows_a_terminal_status(store: Store, status: TxnStatus) -> None:
    """After committed/aborted only an operator's note is accepted, and it changes nothing."""
    decision = Decision.COMMIT if status is TxnStatus.COMMITTED else Decision.ABORT
    await write(store, begin("a"), decided("a", decision), ended("a", status))
    await write(
        store,
        decided("a", decision, at=T0 + 10),
        attempted("a", 0, Op.CONFIRM, 1, T0 + 20),
        ended("a", TxnStatus.NEEDS_ATTENTION, at=T0 + 30),
        ended("a", status, at=T0 + 40),
    )
    assert len(store.violations) == 4
    await write(store, OperatorAction("a", "retry", "looks odd", T0 + 50))
    assert len(store.violations) == 4
    snap = await store.get("a")
    assert snap is not None
    assert (snap.status, snap.decision, snap.attempts) == (status, decision, {})
    assert await store.load_active() == []


async def test_records_for_an_unknown_transaction_are_violations(store: Store) -> None:
    """A record (even an operator's) for a transaction never begun is refused."""
    await write(
        store,
        decided("ghost", Decision.ABORT),
        OperatorAction("ghost", "retry", "x", T0),
    )
    assert len(store.violations) == 2
    assert await store.get("ghost") is None
    assert await store.list() == []


# ------------------------------------------------------------------ operator retry


async def needs_attention(store: Store, txid: str, decision: Decision) -> None:
    await write(
        store,
        begin(txid),
        decided(txid, decision),
        attempted(txid, 1, Op.CONFIRM, 4, T0 + 700),
        ended(txid, TxnStatus.NEEDS_ATTENTION),
    )


@pytest.mark.parametrize("decision", list(Decision))
async def test_operator_retry_reopens_needs_attention(
    backend: Backend, store: Store, decision: Decision
) -> None:
    """retry reopens needs_attention in its decision's phase with a fresh budget; it can end."""
    await needs_attention(store, "a", decision)
    assert await store.load_active() == []
    await write(store, OperatorAction("a", "retry", "fixed the participant", T0 + 10))
    [snap] = await store.load_active()
    phase = TxnStatus.COMMITTING if decision is Decision.COMMIT else TxnStatus.ABORTING
    assert (snap.status, snap.decision, snap.attempts) == (phase, decision, {})
    assert snap.reason == "retried by operator: fixed the participant"
    final = TxnStatus.COMMITTED if decision is Decision.COMMIT else TxnStatus.ABORTED
    await write(store, attempted("a", 0, Op.CONFIRM, 1, T0 + 30), ended("a", final, at=T0 + 40))
    assert store.violations == []
    if backend.durable:
        store = await reopen(backend, store)
    try:
        assert await store.load_active() == []
        snap2 = await store.get("a")
        assert snap2 is not None and snap2.status is final
    finally:
        if backend.durable:
            await store.close()


@pytest.mark.durable
async def test_operator_retry_of_needs_attention_from_an_earlier_run(
    backend: Backend, store: Store
) -> None:
    """A transaction parked before a restart is reopened by a retry after it."""
    await needs_attention(store, "a", Decision.ABORT)
    store = await reopen(backend, store)
    try:
        await write(store, OperatorAction("a", "retry", "now", T0 + 10))
        [snap] = await store.load_active()
        assert snap.status is TxnStatus.ABORTING
        await write(store, ended("a", TxnStatus.ABORTED, at=T0 + 20))
        assert store.violations == []
        assert await store.load_active() == []
        store = await reopen(backend, store)
        assert await store.load_active() == []
    finally:
        await store.close()


async def test_retry_note_and_end_in_one_batch_leave_it_finished(
    backend: Backend, store: Store
) -> None:
    """A retry note and the end in one batch leave the transaction finished, also after a reopen."""
    await write(store, begin("a"))
    await write(
        store,
        OperatorAction("a", "retry", "retry", T0 + 1),
        decided("a", Decision.ABORT),
        OperatorAction("a", "abort", "retry", T0 + 2),
        ended("a", TxnStatus.ABORTED),
    )
    assert store.violations == []
    if backend.durable:
        store = await reopen(backend, store)
    try:
        assert await store.load_active() == []
    finally:
        if backend.durable:
            await store.close()


async def test_needs_attention_then_retry_in_one_batch_is_active(store: Store) -> None:
    """Parking and the operator's retry in the same batch leave the transaction active."""
    await write(store, begin("a"), decided("a", Decision.COMMIT))
    await write(
        store, ended("a", TxnStatus.NEEDS_ATTENTION), OperatorAction("a", "retry", "go", T0 + 5)
    )
    assert await active_ids(store) == ["a"]


# ------------------------------------------------------------------ robustness


async def test_end_with_a_result_json_cannot_carry_is_still_logged(
    backend: Backend, store: Store
) -> None:
    """A participant result that is not JSON does not stop the end from being logged."""
    odd = Receipt(7)
    await write(store, begin("a"), decided("a", Decision.COMMIT))
    await write(store, ended("a", TxnStatus.COMMITTED, result=odd))
    if backend.durable:
        store = await reopen(backend, store)
    try:
        snap = await store.get("a")
        assert snap is not None and snap.status is TxnStatus.COMMITTED
        assert snap.branches[0].result in (odd, "Receipt(7)")
    finally:
        if backend.durable:
            await store.close()


@pytest.mark.durable
async def test_schema_version_is_stored_and_a_newer_one_refuses_to_open(
    backend: Backend, store: Store
) -> None:
    """The log records its schema version; a log from a newer build is not opened."""
    assert backend.set_schema_version is not None
    await write(store, begin("a"))
    await store.close()
    backend.set_schema_version(SCHEMA_VERSION)  # what is there already: still opens
    again = backend.make()
    await again.open()
    assert await active_ids(again) == ["a"]
    await again.close()
    backend.set_schema_version(SCHEMA_VERSION + 1)
    newer = backend.make()
    with pytest.raises(SchemaVersionError, match="newer") as info:
        await newer.open()
    assert info.value.retryable is False
    assert isinstance(info.value, StoreError)


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("begin", b"{not json"),
        ("begin", b'{"spec": {"protocol": "tcc", "branches": []}, "deadline_at_ms": 1}'),
        (
            "attempt",
            b'{"branch": "zero", "op": "confirm", "attempt": 1, "error": "", "next_at_ms": 5}',
        ),
        ("attempt", b'{"branch": 0, "op": "explode", "attempt": 1, "error": "", "next_at_ms": 5}'),
        ("decided", b'{"decision": "maybe", "reason": ""}'),
        ("decided", b"[]"),
    ],
    ids=["garbage", "invalid-spec", "mistyped-field", "unknown-op", "unknown-decision", "array"],
)
@pytest.mark.durable
async def test_a_corrupted_record_fails_loudly_naming_the_transaction(
    backend: Backend, store: Store, kind: str, body: bytes
) -> None:
    """An undecodable record makes reads raise StoreError naming its txid, never a silent skip."""
    assert backend.corrupt is not None
    await write(
        store,
        begin("good"),
        begin("bad-1"),
        decided("bad-1", Decision.COMMIT),
        attempted("bad-1", 0, Op.CONFIRM, 1, T0 + 5),
    )
    store = await corrupted(backend, store, "bad-1", kind, body)
    with pytest.raises(StoreError, match="bad-1") as info:
        await store.open()  # open reads the active transactions
    assert info.value.txid == "bad-1"
    with pytest.raises(StoreError, match="bad-1"):
        await store.get("bad-1")
    good = await store.get("good")
    assert good is not None and good.status is TxnStatus.PREPARING


@pytest.mark.durable
async def test_counting_or_listing_past_a_corrupted_end_record_names_its_transaction(
    backend: Backend, store: Store
) -> None:
    """count_by_status and a listing by status read End records with SQL; one
    SQL cannot read makes them fold instead, which raises StoreError naming
    the transaction."""
    assert backend.corrupt is not None
    await write(
        store,
        begin("good"),
        begin("bad-1"),
        decided("bad-1", Decision.ABORT),
        ended("bad-1", TxnStatus.ABORTED),
    )
    store = await corrupted(backend, store, "bad-1", "end", b"garbage")
    await store.open()  # it reads only what is open
    try:
        with pytest.raises(StoreError, match="bad-1"):
            await store.count_by_status()
        for status in (TxnStatus.ABORTED, TxnStatus.COMMITTED):
            with pytest.raises(StoreError, match="bad-1"):
                await store.list(status=status)
    finally:
        await store.close()


@pytest.mark.durable
async def test_purge_leaves_an_unreadable_transaction_and_goes_on(
    backend: Backend, store: Store
) -> None:
    """A transaction whose records do not hold together is left alone by a
    purge (with a warning), which purges the others all the same."""
    assert backend.corrupt is not None
    for txid in ("a-good", "bad-1", "z-good"):
        await write(store, begin(txid), decided(txid, Decision.ABORT))
        await write(store, ended(txid, TxnStatus.ABORTED))
    store = await corrupted(backend, store, "bad-1", "decided", b"garbage")
    await store.open()
    try:
        assert await store.purge(T0 + 10_000) == 2
        assert await store.get("a-good") is None and await store.get("z-good") is None
        with pytest.raises(StoreError, match="bad-1"):
            await store.get("bad-1")
    finally:
        await store.close()


# ------------------------------------------------------------------ backend specifics


async def test_memory_store_crash_loses_only_what_was_not_synced() -> None:
    """MemoryStore(lose_unsynced=True): crash() drops pending records, keeps synced ones."""
    store = MemoryStore(lose_unsynced=True)
    store.append(begin("a"))
    assert store.sync_now() == frozenset()
    store.append(decided("a", Decision.ABORT))
    store.append(begin("b"))
    assert [(r.id, r.status) for r in await store.list()] == [("a", TxnStatus.PREPARING)]
    store.crash()
    store.sync_now()
    [a] = await store.load_active()
    assert a.txid == "a" and a.status is TxnStatus.PREPARING


async def test_sqlite_store_rejects_unknown_synchronous_mode(tmp_path: Path) -> None:
    """Only FULL, EXTRA and NORMAL are accepted for synchronous."""
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(tmp_path / "x.db", synchronous="OFF")


async def test_sqlite_append_after_close_raises_store_error(tmp_path: Path) -> None:
    """Appending to a closed SQLite log raises StoreError instead of losing the record."""
    store = SQLiteStore(tmp_path / "x.db")
    await store.open()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        store.append(begin("a"))


async def test_sqlite_write_failure_reaches_every_waiter(tmp_path: Path) -> None:
    """A failed log write fails the batch's sync and every later append with StoreError."""
    path = tmp_path / "x.db"
    store = SQLiteStore(path)
    await store.open()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE log")
    store.append(begin("a"))
    pending = store.sync()
    assert pending is not None
    with pytest.raises(StoreError):
        await pending
    with pytest.raises(StoreError, match="failed"):
        store.append(begin("b"))
    await store.close()


def test_open_store_parses_urls(tmp_path: Path) -> None:
    """open_store: memory, sqlite:// and postgresql:// URLs, bare paths; unknown schemes refused."""
    assert isinstance(open_store("memory"), MemoryStore)
    s = open_store(f"sqlite://{tmp_path}/a.db", synchronous="normal")
    assert isinstance(s, SQLiteStore) and s.path == tmp_path / "a.db"
    assert s.synchronous == "NORMAL"
    bare = open_store(str(tmp_path / "b.db"))
    assert isinstance(bare, SQLiteStore) and bare.path == tmp_path / "b.db"
    pg = open_store("postgresql://u@db:5433/accord?schema=log_a&sslmode=disable")
    assert isinstance(pg, PostgresStore) and pg.schema == "log_a"
    assert pg.dsn == "postgresql://u@db:5433/accord?sslmode=disable"
    short = open_store("postgres://localhost/accord")
    assert isinstance(short, PostgresStore) and short.schema == "accord"
    with pytest.raises(ValueError, match="identifier"):
        open_store("postgresql://localhost/accord?schema=x;drop")
    with pytest.raises(ValueError, match="scheme"):
        open_store("redis://localhost")


@pytest.fixture
async def pg_store(tmp_path: Path) -> AsyncIterator[PostgresStore]:
    backend = _postgres(tmp_path)
    store = backend.make()
    assert isinstance(store, PostgresStore)
    await store.open()
    yield store
    assert backend.cleanup is not None
    await backend.cleanup()


async def test_postgres_appends_during_a_flush_go_to_the_next_batch(
    pg_store: PostgresStore,
) -> None:
    """While a batch is being written, appends accumulate for the next one; both commit."""
    pg_store.append(begin("a"))
    first = pg_store.sync()
    await asyncio.sleep(0)  # the flush of "a" is now in flight
    assert pg_store.sync() is first  # nothing new: the in-flight batch covers everything
    pg_store.append(begin("b"))
    second = pg_store.sync()
    assert first is not None and second is not None and second is not first
    assert await first == frozenset()
    assert await second == frozenset()
    assert pg_store.stats().batches == 2
    assert await active_ids(pg_store) == ["a", "b"]


async def test_postgres_batch_meeting_another_writers_begin(pg_store: PostgresStore) -> None:
    """A batch written in one statement whose Begin reuses an id another writer
    logged meanwhile is written again row by row: that Begin is refused, the
    rest of the batch is kept, and the other writer's transaction is intact."""
    other = PostgresStore(PG_DSN, schema=pg_store.schema, pool_size=1)
    await other.open()
    try:
        await write(other, begin("x", at=T0 + 5))
    finally:
        await other.close()
    rejected = await write(pg_store, begin("x"), begin("y"), decided("y", Decision.ABORT))
    assert rejected == frozenset({"x"})
    assert await active_ids(pg_store) == ["x", "y"]
    x = await pg_store.get("x")
    assert x is not None and x.created_at_ms == T0 + 5  # the other writer's
    y = await pg_store.get("y")
    assert y is not None and y.decision is Decision.ABORT
    assert pg_store.stats().batches == 1


async def test_postgres_a_batch_opening_and_closing_one_id(pg_store: PostgresStore) -> None:
    """Begin and End of one transaction in one batch leave it closed."""
    await write(pg_store, begin("a"), decided("a", Decision.ABORT), ended("a", TxnStatus.ABORTED))
    assert await active_ids(pg_store) == []
    snap = await pg_store.get("a")
    assert snap is not None and snap.status is TxnStatus.ABORTED


async def test_postgres_flush_survives_dropped_connections(pg_store: PostgresStore) -> None:
    """A batch whose connection was killed is retried on a new one and commits."""
    await write(pg_store, begin("a"))
    killed = _pg_run(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        f"accord-log:{pg_store.schema}",
    )
    assert killed != "SELECT 0", killed
    assert await write(pg_store, decided("a", Decision.COMMIT), begin("b")) == frozenset()
    assert await active_ids(pg_store) == ["a", "b"]


async def test_postgres_write_failure_reaches_every_waiter(pg_store: PostgresStore) -> None:
    """A batch that cannot be written fails its sync and every later append with StoreError."""
    _pg_run(f"DROP TABLE {pg_store.schema}.log")
    pg_store.append(begin("a"))
    pending = pg_store.sync()
    assert pending is not None
    with pytest.raises(StoreError):
        await pending
    with pytest.raises(StoreError, match="failed"):
        pg_store.append(begin("b"))
    with pytest.raises(StoreError, match="failed"):
        pg_store.sync()


class _CommitThenDrop:
    """A connection whose first transaction commits, then reports a lost connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.first = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def transaction(self) -> Any:
        tx = self.conn.transaction()
        if not self.first:
            return tx
        self.first = False

        class Dropping:
            async def __aenter__(self) -> Any:
                return await tx.__aenter__()

            async def __aexit__(self, *exc: Any) -> None:
                await tx.__aexit__(*exc)  # COMMIT goes through...
                raise ConnectionResetError("...but its acknowledgement is lost")

        return Dropping()


async def test_postgres_commit_in_doubt_is_not_written_twice(
    pg_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose COMMIT succeeded unacknowledged is found committed, not rewritten."""
    real = pg_store._pool
    calls = 0

    class Pool:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def acquire(self) -> Any:
            nonlocal calls
            calls += 1
            if calls > 1:
                return real.acquire()

            async def first() -> Any:
                return _CommitThenDrop(await real.acquire())

            return first()

        async def release(self, conn: Any) -> None:
            await real.release(conn.conn if isinstance(conn, _CommitThenDrop) else conn)

    monkeypatch.setattr(pg_store, "_pool", Pool())
    assert await write(pg_store, begin("a"), decided("a", Decision.ABORT)) == frozenset()
    monkeypatch.undo()
    snap = await pg_store.get("a")
    assert snap is not None and [type(r) for r in snap.history] == [Begin, Decided]
    assert calls == 2 and pg_store.stats().batches == 1  # the write, the status check
