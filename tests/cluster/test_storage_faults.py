"""Storage faults under a cluster (TESTING.md tier 4): connections killed
(pg_terminate_backend) during the decision write and during recovery, and
PostgreSQL itself restarted. The nodes reconnect with backoff, never send a
confirm whose decision the log has not acknowledged, and converge."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from accord.cluster import ClusterClient
from accord.core.records import Begin, Decided, Decision
from accord.core.spec import BranchSpec, Protocol, TransactionSpec
from accord.log import PostgresStore

from .db import PG_DSN, pg
from .world import TTL_S, World


async def submit_everywhere(w: World) -> list[Any]:
    """Every order, submitted to the nodes in turn; their results."""
    nodes = list(w.nodes.values())
    futures = [await nodes[i % len(nodes)].submit(spec) for i, spec in enumerate(w.specs)]
    return list(await asyncio.gather(*futures))


@pytest.mark.parametrize("when", ["before", "after"])
async def test_connection_killed_during_the_decision_write(
    world: Callable[..., World], when: str
) -> None:
    """The connection writing a commit decision is killed (before the insert, or
    after it and before the commit): the batch is written again on a new
    connection, no confirm leaves before that, every order ends, invariants hold."""
    w = world(orders=100)
    for name in ("a", "b"):
        await w.node(name)
        w.watch_decisions(name)
    await w.settled("a", "b")
    cuts = [w.cut_decision_writes(name, times=3, when=when) for name in ("a", "b")]
    results = await submit_everywhere(w)
    assert [len(c) for c in cuts] == [3, 3]
    assert all(r.status.terminal for r in results)
    committed = {r.txid for r in results if r.committed}
    assert committed and committed <= w.durable
    assert w.early == []
    await w.check()


async def test_connections_killed_during_recovery(world: Callable[..., World], schema: str) -> None:
    """A node is killed; the survivor's log connections are cut right before it
    reads the shards it took over, and again and again while it resumes them: it
    reads again, resumes every open transaction, sends no early confirm, and
    everything ends with the invariants holding."""
    w = world(orders=300, latency_ms=20.0)
    a, b = await w.node("a"), await w.node("b")
    w.watch_decisions("b")
    await w.settled("a", "b")
    load = b.store.load_active
    cuts: list[str] = []

    def cut() -> int:
        return len(
            pg(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                " WHERE application_name = $1",
                f"accord-log:{schema}:b",
            )
        )

    async def cut_then_load(shards: Any = None) -> Any:
        if shards is not None:
            cuts.append(cut())
        return await load(shards)

    async def keep_cutting(until: float) -> int:
        killed = 0
        while time.monotonic() < until:
            killed += await asyncio.to_thread(cut)
            await asyncio.sleep(0.05)
        return killed

    b.store.load_active = cut_then_load  # type: ignore[method-assign]
    async with ClusterClient(PG_DSN, schema=schema) as client:
        await client.submit_many(w.specs)
        sql = f"SELECT count(*) FROM {schema}.txn_open WHERE shard = ANY($1)"
        while pg(sql, list(a.owned()))[0][0] < 10:
            await asyncio.sleep(0.01)
        await a.kill()
        while not cuts:  # b's first read of a's shards
            await asyncio.sleep(0.01)
        chaos = await keep_cutting(time.monotonic() + 1.0)
        results = await asyncio.gather(*(client.result(s, timeout_s=60) for s in w.specs))
    assert cuts[0] > 0 and chaos > 0
    assert b.stats.resumed >= 10
    assert all(r.status.terminal for r in results)
    assert w.early == []
    await w.check()


class _LostAfterCommit:
    """A pooled connection whose first transaction commits, then loses the
    connection the way asyncpg reports it when it noticed first: the proxy
    was already handed back to the pool and refuses terminate()."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.first = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    def terminate(self) -> None:
        raise asyncpg.InterfaceError(
            "cannot call Connection.terminate(): connection has been released back to the pool"
        )

    def transaction(self) -> Any:
        tx = self.conn.transaction()
        if not self.first:
            return tx
        self.first = False

        class Committing:
            async def __aenter__(self) -> Any:
                return await tx.__aenter__()

            async def __aexit__(self, *exc: Any) -> None:
                await tx.__aexit__(*exc)  # COMMIT goes through...
                raise ConnectionResetError("...and the connection is gone")

        return Committing()


class _Pool:
    """The store's pool, whose first connection is handed out wrapped by
    ``first`` (a misbehaving proxy with the real connection as ``.conn``), if
    given; with ``reset_fails`` the first release fails after the batch committed."""

    def __init__(
        self, real: Any, first: Callable[[Any], Any] | None = None, *, reset_fails: bool = False
    ) -> None:
        self.real = real
        self.first = first
        self.reset_fails = reset_fails
        self.wrapped: Any = None
        self.acquired = 0
        self.released = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def acquire(self) -> Any:
        self.acquired += 1
        first = self.first
        if self.acquired > 1 or first is None:
            return self.real.acquire()

        async def wrapped() -> Any:
            self.wrapped = first(await self.real.acquire())
            return self.wrapped

        return wrapped()

    async def release(self, conn: Any) -> None:
        self.released += 1
        await self.real.release(
            conn.conn if self.wrapped is not None and conn is self.wrapped else conn
        )
        if self.reset_fails and self.released == 1:
            # The batch committed; resetting the connection for reuse failed.
            raise asyncpg.ConnectionDoesNotExistError(
                "connection was closed in the middle of operation"
            )


class _LostWithReusedXid:
    """A pooled connection whose first transaction never commits (the server
    crashed before its COMMIT was durable) and whose xid, after the restart,
    belongs to another transaction, a committed one."""

    def __init__(self, conn: Any, other_xid: int) -> None:
        self.conn = conn
        self.other_xid = other_xid
        self.first = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        if "txid_current" in sql:
            await self.conn.fetchval(sql, *args)
            return self.other_xid
        return await self.conn.fetchval(sql, *args)

    def transaction(self) -> Any:
        tx = self.conn.transaction()
        if not self.first:  # the batch's savepoint
            return tx
        self.first = False

        class Lost:
            async def __aenter__(self) -> Any:
                return await tx.__aenter__()

            async def __aexit__(self, *exc: Any) -> None:
                await tx.__aexit__(
                    ConnectionResetError, ConnectionResetError(), None
                )  # rolled back
                raise ConnectionResetError("the server went away during COMMIT")

        return Lost()


async def test_an_interrupted_commit_is_not_believed_from_a_reused_xid(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash PostgreSQL may hand an unlogged xid out again, and txid_status
    then reports another transaction's commit: the batch is written again unless
    its own rows are in the log, so nothing it holds is lost."""
    store = PostgresStore(PG_DSN, schema=schema, pool_size=2)
    await store.open()
    try:
        (committed_xid,) = pg("SELECT txid_current()")[0]  # someone else's, committed
        pool = _Pool(store._pool, lambda conn: _LostWithReusedXid(conn, committed_xid))
        monkeypatch.setattr(store, "_pool", pool)
        spec = TransactionSpec(
            protocol=Protocol.TCC, branches=(BranchSpec("b0", "p0", {"n": 1}),), id="kept"
        )
        store.append(Begin(spec, 1, 30_001))
        store.append(Decided("kept", Decision.COMMIT, "all prepared", 2))
        assert await store.flush() == frozenset()
        monkeypatch.undo()
        snap = await store.get("kept")
        assert snap is not None and [type(r) for r in snap.history] == [Begin, Decided]
    finally:
        await store.close()


@pytest.mark.parametrize("how", ["terminate refused", "reset fails"])
async def test_a_committed_batch_is_never_written_twice(
    schema: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose COMMIT went through is not written again when the connection
    dies right after it, however asyncpg reports that: it refuses terminate() on a
    connection it already took back (the in-doubt commit must still be checked),
    or fails to reset the connection after the commit (nothing is in doubt)."""
    store = PostgresStore(PG_DSN, schema=schema, pool_size=2)
    await store.open()
    try:
        if how == "terminate refused":
            pool = _Pool(store._pool, _LostAfterCommit)
        else:
            pool = _Pool(store._pool, reset_fails=True)
        monkeypatch.setattr(store, "_pool", pool)
        spec = TransactionSpec(
            protocol=Protocol.TCC,
            branches=(BranchSpec("b0", "p0", {"n": 1}),),
            id="once",
        )
        store.append(Begin(spec, 1, 30_001))
        store.append(Decided("once", Decision.ABORT, "test", 2))
        assert await store.flush() == frozenset()  # not "refused as a duplicate"
        monkeypatch.undo()
        snap = await store.get("once")
        assert snap is not None and [type(r) for r in snap.history] == [Begin, Decided]
        assert store.stats().batches == 1
    finally:
        await store.close()


def restarts_allowed() -> None:
    """A restart breaks whatever else uses the server at that moment. CI runs one
    suite alone: there it always runs. Elsewhere (a shared development server)
    only when asked: ACCORD_TEST_PG_RESTART=1, or a server of one's own named by
    ACCORD_TEST_PG_CTL."""
    if os.environ.get("CI") or os.environ.get("ACCORD_TEST_PG_RESTART") == "1":
        return
    if os.environ.get("ACCORD_TEST_PG_CTL"):
        return
    pytest.skip(
        "restarts the PostgreSQL server that others may be using: runs in CI,"
        " or with ACCORD_TEST_PG_RESTART=1 (or ACCORD_TEST_PG_CTL for a server of your own)"
    )


def pg_ctl(action: str) -> list[str]:
    """The command that does ``action`` (restart, stop, start) to the PostgreSQL
    server, in immediate mode for restart and stop: ``ACCORD_TEST_PG_CTL`` (with
    ``{action}`` and ``{mode}`` in it), or pg_ctlcluster on the local cluster."""
    mode = "" if action == "start" else "-m immediate"
    given = os.environ.get("ACCORD_TEST_PG_CTL")
    if given:
        return shlex.split(given.format(action=action, mode=mode))
    etc = Path("/etc/postgresql")
    versions = sorted(etc.glob("*/main")) if etc.exists() else []
    if not shutil.which("pg_ctlcluster") or not versions:
        message = "no way to restart PostgreSQL here (set ACCORD_TEST_PG_CTL)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    version = versions[-1].parent.name
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action, *mode.split()]


async def run(command: list[str]) -> None:
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{command}: {done.stderr}"


def wait_until_postgres_answers(timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            pg("SELECT 1")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.pg_restart
@pytest.mark.parametrize("outage", ["restart", "down past the lease"])
async def test_postgresql_restarted_under_load(
    world: Callable[..., World], schema: str, outage: str
) -> None:
    """PostgreSQL restarts in immediate mode (every connection dies, commits in
    flight are in doubt), or stays down longer than the leases, while two nodes
    drive orders: they reconnect with backoff, keep or take their shards back,
    never confirm before a durable decision, and every order ends with the
    invariants holding. The test ends only once PostgreSQL answers again."""
    restarts_allowed()
    commands = [pg_ctl("restart")] if outage == "restart" else [pg_ctl("stop"), pg_ctl("start")]
    w = world(orders=300, latency_ms=10.0)
    for name in ("a", "b"):
        await w.node(name)
        w.watch_decisions(name)
    await w.settled("a", "b")
    async with ClusterClient(PG_DSN, schema=schema) as client:
        await client.submit_many(w.specs)
        while pg(f"SELECT count(*) FROM {schema}.txn_open")[0][0] < 20:
            await asyncio.sleep(0.01)
        try:
            await run(commands[0])
            if len(commands) > 1:
                await asyncio.sleep(2 * TTL_S)
                await run(commands[1])
        finally:
            await asyncio.to_thread(wait_until_postgres_answers)
        results = await asyncio.gather(*(client.result(s, timeout_s=120) for s in w.specs))
    assert all(r.status.terminal for r in results)
    assert w.early == []
    assert {r.txid for r in results if r.committed} <= w.durable
    for node in w.nodes.values():
        assert node.stopped is not None and not node.stopped.done()  # it carried on
    if outage != "restart":
        assert all(n.stats.lost > 0 and n.stats.acquired > n.stats.lost for n in w.nodes.values())
    await w.settled("a", "b")
    await w.check()


@pytest.mark.slow
@pytest.mark.pg_restart
async def test_postgresql_restarted_while_a_node_takes_over(
    world: Callable[..., World], schema: str
) -> None:
    """A node is killed; PostgreSQL restarts (immediate mode) just as the survivor
    starts reading the shards it acquired: the survivor reads again once the server
    is back, resumes every open transaction, sends no early confirm, and every order
    ends with the invariants holding."""
    restarts_allowed()
    command = pg_ctl("restart")
    w = world(orders=300, latency_ms=20.0)
    a, b = await w.node("a"), await w.node("b")
    w.watch_decisions("b")
    await w.settled("a", "b")
    load = b.store.load_active
    restarting: list[asyncio.Task[None]] = []

    async def restart_then_load(shards: Any = None) -> Any:
        if shards is not None and not restarting:
            restarting.append(asyncio.ensure_future(run(command)))
            await asyncio.sleep(0.05)  # the server is going down under the read
        return await load(shards)

    b.store.load_active = restart_then_load  # type: ignore[method-assign]
    async with ClusterClient(PG_DSN, schema=schema) as client:
        await client.submit_many(w.specs)
        sql = f"SELECT count(*) FROM {schema}.txn_open WHERE shard = ANY($1)"
        while pg(sql, list(a.owned()))[0][0] < 10:
            await asyncio.sleep(0.01)
        await a.kill()
        try:
            while not restarting:
                await asyncio.sleep(0.05)
            await restarting[0]
        finally:
            await asyncio.to_thread(wait_until_postgres_answers)
        results = await asyncio.gather(*(client.result(s, timeout_s=120) for s in w.specs))
    assert all(r.status.terminal for r in results)
    assert b.stats.resumed >= 10
    assert w.early == []
    await w.check()
