"""Coordinator.resolve and Coordinator.abort_any over every store: what they write
to the log, that the log agrees after a reopen, and "twice, one effect"."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from accord import (
    Coordinator,
    MemoryStore,
    SQLiteStore,
    Store,
    TransactionNotFound,
    TransactionSpec,
    TxnStatus,
)
from accord.core.records import Begin, Decided, Decision, OperatorAction
from accord.log.postgres import PostgresStore
from accord.server.app import ServerConfig, create_app

from .conftest import FakeParticipants, order_body

PG_DSN = os.environ.get("ACCORD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1/test")
Factory = Callable[[], Store]


async def _pg(sql: str) -> None:
    conn = await asyncpg.connect(PG_DSN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _require_pg() -> None:
    """Skip without PostgreSQL, except under CI, where its absence fails."""
    try:
        await _pg("SELECT 1")
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL unreachable: {exc!r}")
        pytest.skip(f"PostgreSQL unreachable: {exc!r}")


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """A factory of stores over one log (the memory one is the same object)."""
    if request.param == "memory":
        memory = MemoryStore()
        yield lambda: memory
    elif request.param == "sqlite":
        yield lambda: SQLiteStore(tmp_path / "log.db")
    else:
        await _require_pg()
        schema = f"t_{uuid.uuid4().hex[:16]}"
        yield lambda: PostgresStore(PG_DSN, schema=schema, pool_size=2)
        await _pg(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _spec(txid: str) -> TransactionSpec:
    return TransactionSpec.from_dict(order_body(txid))


async def _parked(stores: Factory, participants: FakeParticipants, txid: str) -> Coordinator:
    coordinator = Coordinator(stores(), participants.transport())
    await coordinator.start()
    result = await coordinator.run(_spec(txid))
    assert result.status is TxnStatus.NEEDS_ATTENTION
    return coordinator


async def _reopened(stores: Factory, txid: str) -> tuple[TxnStatus, list[str]]:
    store = stores()
    await store.open()
    try:
        snap = await store.get(txid)
        assert snap is not None
        active = [s.txid for s in await store.load_active()]
        return snap.status, active
    finally:
        await store.close()


async def test_resolve_ends_a_parked_commit_as_committed_and_only_once(stores: Factory) -> None:
    """needs_attention with decision commit: resolve logs OperatorAction("resolve") and
    the transaction is committed, with the reason; a second resolve changes nothing."""
    participants = FakeParticipants()
    participants.mode["payment"] = "fail_phase2"  # the confirm never gets through
    coordinator = await _parked(stores, participants, "res-1")
    try:
        assert await coordinator.resolve("res-1", "payment confirmed by hand") is (
            TxnStatus.COMMITTED
        )
        snap = await coordinator.store.get("res-1")
        assert snap is not None
        assert snap.status is TxnStatus.COMMITTED
        assert snap.decision is Decision.COMMIT
        assert snap.reason == "resolved by operator: payment confirmed by hand"
        notes = [r for r in snap.history if isinstance(r, OperatorAction)]
        assert [(n.action, n.reason) for n in notes] == [("resolve", "payment confirmed by hand")]
        assert await coordinator.resolve("res-1", "again") is None
        assert await coordinator.retry("res-1", "too late") is None
        assert coordinator.store.violations == []
        calls = len(participants.calls)
        await asyncio.sleep(0.05)
        assert len(participants.calls) == calls  # resolving calls no participant
    finally:
        await coordinator.close()
    status, active = await _reopened(stores, "res-1")
    assert status is TxnStatus.COMMITTED
    assert "res-1" not in active


async def test_resolve_ends_a_parked_abort_as_aborted(stores: Factory) -> None:
    """needs_attention with decision abort (a refusal, then a stuck cancel): resolve aborts it."""
    participants = FakeParticipants()
    participants.mode["order"] = "refuse"
    participants.mode["payment"] = "fail_phase2"
    coordinator = await _parked(stores, participants, "res-2")
    try:
        assert await coordinator.resolve("res-2", "hold released by hand") is TxnStatus.ABORTED
        snap = await coordinator.store.get("res-2")
        assert snap is not None and snap.decision is Decision.ABORT
    finally:
        await coordinator.close()
    status, _ = await _reopened(stores, "res-2")
    assert status is TxnStatus.ABORTED


async def test_resolve_applies_only_to_needs_attention(stores: Factory) -> None:
    """A committed transaction is not resolved (None); an unknown id raises."""
    coordinator = Coordinator(stores(), FakeParticipants().transport())
    await coordinator.start()
    try:
        assert (await coordinator.run(_spec("ok-1"))).committed
        assert await coordinator.resolve("ok-1", "nothing to do") is None
        with pytest.raises(TransactionNotFound):
            await coordinator.resolve("nope", "no such")
        snap = await coordinator.store.get("ok-1")
        assert snap is not None
        assert not any(isinstance(r, OperatorAction) for r in snap.history)
    finally:
        await coordinator.close()


async def test_abort_any_aborts_a_logged_transaction_nobody_drives(stores: Factory) -> None:
    """In the log, undecided, not driven (a crashed run not yet recovered): abort_any logs
    the operator's note and the abort decision, then drives the cancels to the end."""
    store = stores()
    await store.open()
    spec = _spec("idle-1")
    store.append(Begin(spec, 1_000, 10**13))
    await store.flush()
    await store.close()
    participants = FakeParticipants()
    coordinator = Coordinator(stores(), participants.transport())
    await coordinator.start(recover=False)
    try:
        fut = await coordinator.abort_any("idle-1", "customer cancelled")
        assert fut is not None
        result = await fut
        assert result.status is TxnStatus.ABORTED
        assert result.reason == "aborted by operator: customer cancelled"
        snap = await coordinator.store.get("idle-1")
        assert snap is not None
        assert [
            (type(r).__name__, getattr(r, "action", getattr(r, "decision", None)))
            for r in snap.history[1:3]
        ] == [
            ("OperatorAction", "abort"),
            ("Decided", Decision.ABORT),
        ]
        assert {c.op.value for c in participants.calls} == {"cancel"}
        assert await coordinator.abort_any("idle-1", "again") is None
        again = await coordinator.store.get("idle-1")
        assert again is not None
        assert sum(isinstance(r, Decided) for r in again.history) == 1
        assert sum(isinstance(r, OperatorAction) for r in again.history) == 1
    finally:
        await coordinator.close()
    status, active = await _reopened(stores, "idle-1")
    assert status is TxnStatus.ABORTED and active == []


async def test_abort_any_aborts_a_running_transaction_but_not_a_decided_one(
    stores: Factory,
) -> None:
    """Running and undecided: aborted with the operator's reason. Decided: None."""
    participants = FakeParticipants()
    participants.mode["shipping"] = "hang"
    coordinator = Coordinator(stores(), participants.transport())
    await coordinator.start()
    try:
        running = await coordinator.submit(_spec("run-1"))
        await asyncio.sleep(0.05)
        fut = await coordinator.abort_any("run-1", "stop it")
        assert fut is running
        participants.release()
        result = await fut
        assert result.status is TxnStatus.ABORTED
        assert result.reason == "aborted by operator: stop it"
        assert (await coordinator.run(_spec("done-1"))).committed
        assert await coordinator.abort_any("done-1", "too late") is None
        with pytest.raises(TransactionNotFound):
            await coordinator.abort_any("nope", "no such")
    finally:
        await coordinator.close()


async def test_serve_refuses_a_clusters_log() -> None:
    """A log that belongs to a cluster (its nodes write it, fenced by leases) is
    refused at start: the server would otherwise look ready and accept nothing."""
    await _require_pg()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    lone = PostgresStore(PG_DSN, schema=schema, pool_size=1)
    await lone.open()
    await lone.close()
    await _pg(f"INSERT INTO {schema}.meta(key, value) VALUES ('cluster_shards', '16')")
    try:
        coordinator = Coordinator(
            PostgresStore(PG_DSN, schema=schema, pool_size=1),
            FakeParticipants().transport(),
        )
        app = create_app(coordinator, ServerConfig(require_auth=False))
        with pytest.raises(RuntimeError, match="the log is a cluster's"):
            async with app.router.lifespan_context(app):
                pass
    finally:
        await _pg(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
