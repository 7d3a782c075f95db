"""Operator actions on a cluster's transactions (retry, abort, resolve): queued
by a ClusterClient, acted on by the shard's owner through its coordinator,
answered as the API answers them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from accord.cluster import ClusterClient, ClusterNode
from accord.cluster.leases import read_status
from accord.cluster.shards import shard_of
from accord.core.machine import Outcome
from accord.core.records import TxnStatus
from accord.core.spec import BranchSpec, Op, Protocol, RetryPolicy, TransactionSpec
from accord.errors import TransactionNotFound
from accord.transport.base import Call, Reply, Transport

from .db import PG_DSN, pg

SHARDS = 8


class Scripted(Transport):
    """Participants that apply everything, except that confirms are refused
    as malformed (the transaction parks) until ``fixed``, and a try whose
    payload says ``hang`` never answers (the transaction stays undecided)."""

    def __init__(self) -> None:
        self.fixed = False
        self.calls: list[tuple[str, Op]] = []

    async def call(self, call: Call) -> Reply:
        self.calls.append((call.txid, call.op))
        if call.op is Op.TRY and call.payload.get("hang"):
            await asyncio.sleep(3600)
        if call.op is Op.CONFIRM and not self.fixed:
            return Reply(Outcome.REJECTED, error="HTTP 400: the confirm is malformed")
        return Reply(Outcome.OK)


def spec(txid: str, *, hang: bool = False) -> TransactionSpec:
    return TransactionSpec(
        id=txid,
        protocol=Protocol.TCC,
        timeout_s=600,
        branches=tuple(
            BranchSpec(name, name, {"hang": hang}, RetryPolicy(maximum_attempts=3), 300.0)
            for name in ("a", "b")
        ),
    )


@pytest.fixture
async def cluster(schema: str) -> AsyncIterator[tuple[ClusterNode, ClusterClient, Scripted]]:
    """One node holding every shard, and a client."""
    participants = Scripted()
    node = ClusterNode(
        PG_DSN, participants, node_id="solo", schema=schema, shards=SHARDS, ttl_s=2.0, poll_s=0.1
    )
    await node.start()
    try:
        deadline = time.monotonic() + 20
        while not (node.owns(range(SHARDS)) and set(node.owned().values()) == {"ready"}):
            assert time.monotonic() < deadline, node.owned()
            await asyncio.sleep(0.05)
        async with ClusterClient(PG_DSN, schema=schema) as client:
            yield node, client, participants
    finally:
        await node.close()


async def status_of(client: ClusterClient, txid: str) -> TxnStatus | None:
    snap = await client.store.get(txid)
    return None if snap is None else snap.status


async def until(client: ClusterClient, txid: str, status: TxnStatus) -> None:
    deadline = time.monotonic() + 20
    while (found := await status_of(client, txid)) is not status:
        assert time.monotonic() < deadline, f"{txid} is {found}, waited for {status}"
        await asyncio.sleep(0.05)


async def test_retry_of_a_parked_transaction_resumes_it_on_its_owner(
    cluster: tuple[ClusterNode, ClusterClient, Scripted],
) -> None:
    """A commit parked in needs_attention (its confirms refused) is retried by
    an operator once the participant is fixed: 202, then committed, and the
    operator's note is in the log, written by the owner under its lease."""
    node, client, participants = cluster
    result = await client.submit(spec("t-retry"))
    assert result.status is TxnStatus.NEEDS_ATTENTION
    participants.fixed = True
    answered = await client.operate("t-retry", "retry", "the participant is fixed")
    assert answered is not None
    code, body = answered  # 202 under way, or 200 if it already ended
    assert (code, body["txid"], body["action"], body["decision"]) in (
        (202, "t-retry", "retry", "commit"),
        (200, "t-retry", "retry", "commit"),
    )
    assert code == 202 or body["status"] == "committed"
    await until(client, "t-retry", TxnStatus.COMMITTED)
    snap = await client.store.get("t-retry")
    assert snap is not None and "retried by operator: the participant is fixed" in [
        getattr(r, "reason", None) for r in snap.history
    ]
    rows = pg(f"SELECT DISTINCT node FROM {node.schema}.log WHERE txid = 't-retry'")
    assert rows == [("solo",)]
    assert node.stats.operator_requests == 1


async def test_requests_on_one_transaction_are_acted_on_one_at_a_time(
    cluster: tuple[ClusterNode, ClusterClient, Scripted],
) -> None:
    """A retry and a resolve of one parked transaction queued together: the
    owner acts on them one after the other, so the retry's run is not left
    without its epoch; the transaction commits and the node keeps nothing of
    it once done."""
    node, client, participants = cluster
    assert (await client.submit(spec("t-both"))).status is TxnStatus.NEEDS_ATTENTION
    participants.fixed = True
    retried, resolved = await asyncio.gather(
        client.operate("t-both", "retry", "fixed"), client.operate("t-both", "resolve", "fixed")
    )
    assert retried is not None and resolved is not None
    assert sorted([retried[0], resolved[0]]) in ([200, 409], [202, 409], [200, 200])
    await until(client, "t-both", TxnStatus.COMMITTED)
    deadline = time.monotonic() + 10
    while "t-both" in node._epochs or any("t-both" in d for d in node._driving.values()):
        assert time.monotonic() < deadline, "the node still tracks the finished transaction"
        await asyncio.sleep(0.05)
    assert node.stats.refused_appends == 0


async def test_resolve_ends_a_parked_transaction_as_decided(
    cluster: tuple[ClusterNode, ClusterClient, Scripted],
) -> None:
    """resolve: 200 with the final state at once; a second resolve is 409."""
    _, client, _ = cluster
    assert (await client.submit(spec("t-resolve"))).status is TxnStatus.NEEDS_ATTENTION
    answered = await client.operate("t-resolve", "resolve", "confirmed by hand")
    assert answered is not None
    code, body = answered
    assert (code, body["status"], body["decision"]) == (200, "committed", "commit")
    assert await status_of(client, "t-resolve") is TxnStatus.COMMITTED
    again = await client.operate("t-resolve", "resolve", "once more")
    assert again is not None and again[0] == 409 and "needs_attention" in again[1]["error"]


async def test_abort_of_an_undecided_transaction_cancels_it(
    cluster: tuple[ClusterNode, ClusterClient, Scripted],
) -> None:
    """A transaction whose tries hang is undecided; abort: 202, then aborted,
    its branches cancelled."""
    _, client, participants = cluster
    await client.submit_many([spec("t-abort", hang=True)])
    wait_for_tries = time.monotonic() + 20
    while sum(1 for t, op in participants.calls if t == "t-abort" and op is Op.TRY) < 2:
        assert time.monotonic() < wait_for_tries
        await asyncio.sleep(0.05)
    answered = await client.operate("t-abort", "abort", "the customer cancelled")
    assert answered is not None and answered[0] in (200, 202)
    assert answered[0] == 202 or answered[1]["status"] == "aborted"
    await until(client, "t-abort", TxnStatus.ABORTED)
    assert {op for t, op in participants.calls if t == "t-abort"} == {Op.TRY, Op.CANCEL}


async def test_unknown_and_inapplicable_requests_are_answered_404_and_409(
    cluster: tuple[ClusterNode, ClusterClient, Scripted],
) -> None:
    """An id nobody knows: 404. Retry or abort of a committed transaction: 409,
    with its state; nothing is written for it."""
    _, client, participants = cluster
    participants.fixed = True
    assert (await client.submit(spec("t-done"))).status is TxnStatus.COMMITTED
    missing = await client.operate("t-nobody", "retry", "why not")
    assert missing is not None and missing[0] == 404
    records = len((await client.store.get("t-done")).history)  # type: ignore[union-attr]
    for action in ("retry", "abort"):
        answered = await client.operate("t-done", action, "too late")
        assert answered is not None
        code, body = answered
        assert (code, body["status"]) == (409, "committed"), body
    assert len((await client.store.get("t-done")).history) == records  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("txid", "action", "reason", "message"),
    [
        ("t1", "delete", "x", "action must be one of retry, abort, resolve"),
        ("t1", "retry", "  ", "reason must be a non-empty text"),
        ("t1", "retry", "x" * 1001, "at most 1000"),
        ("", "retry", "x", "txid must be a non-empty string"),
    ],
)
async def test_bad_requests_are_refused_before_anything_is_queued(
    cluster: tuple[ClusterNode, ClusterClient, Scripted],
    txid: str,
    action: str,
    reason: str,
    message: str,
) -> None:
    _, client, _ = cluster
    with pytest.raises(ValueError, match=message):
        await client.operate(txid, action, reason)
    assert pg(f"SELECT count(*) FROM {client.schema}.operator_request") == [(0,)]


async def test_retry_on_the_node_that_took_over_a_parked_transaction(schema: str) -> None:
    """A transaction parked by node a, whose shard node b takes over after a
    dies: b knows it is parked, so an operator's retry reopens it there and it
    commits (before, b wrote the retry as a plain note and the run it resumed
    could never write its end)."""
    on_a, on_b = Scripted(), Scripted()
    a = ClusterNode(PG_DSN, on_a, node_id="a", schema=schema, shards=SHARDS, ttl_s=2.0, poll_s=0.1)
    b = ClusterNode(PG_DSN, on_b, node_id="b", schema=schema, shards=SHARDS, ttl_s=2.0, poll_s=0.1)
    await a.start()
    await b.start()
    try:
        deadline = time.monotonic() + 20
        while len(a.owned()) + len(b.owned()) < SHARDS or len(a.owned()) == 0:
            assert time.monotonic() < deadline, (a.owned(), b.owned())
            await asyncio.sleep(0.05)
        txid = next(t for t in (f"t-{i}" for i in range(1000)) if shard_of(t, SHARDS) in a.owned())
        async with ClusterClient(PG_DSN, schema=schema) as client:
            assert (await client.submit(spec(txid))).status is TxnStatus.NEEDS_ATTENTION
            await a.kill()
            while not (b.owns(range(SHARDS)) and set(b.owned().values()) == {"ready"}):
                assert time.monotonic() < deadline + 30, b.owned()
                await asyncio.sleep(0.05)
            on_b.fixed = True
            answered = await client.operate(txid, "retry", "fixed", timeout_s=20)
            assert answered is not None and answered[0] in (200, 202), answered
            await until(client, txid, TxnStatus.COMMITTED)
            assert b.store.violations == []
            assert await client.store.count_by_status() == {TxnStatus.COMMITTED: 1}
    finally:
        await b.close()


async def test_waiting_for_a_purged_transaction_fails_instead_of_hanging(
    cluster: tuple[ClusterNode, ClusterClient, Scripted],
) -> None:
    """An id in neither the log nor the inbox (purged, or never submitted):
    waiting for its result raises TransactionNotFound rather than waiting forever."""
    _, client, participants = cluster
    participants.fixed = True
    done = spec("t-purged")
    assert (await client.submit(done)).status is TxnStatus.COMMITTED
    assert await client.store.purge(int(time.time() * 1000) + 1) == 1
    with pytest.raises(TransactionNotFound, match="neither in the log nor in the inbox"):
        await client.result(done, timeout_s=10)
    with pytest.raises(TransactionNotFound):
        await client.result(spec("t-never-submitted"), timeout_s=10)


async def test_a_request_no_node_answers_stays_queued(schema: str) -> None:
    """With no node running, operate returns None after its timeout; the
    request waits, and the node that takes the shard answers it."""
    participants = Scripted()
    first = ClusterNode(PG_DSN, participants, node_id="n1", schema=schema, shards=SHARDS)
    await first.start()  # creates the cluster's tables
    await first.close()
    async with ClusterClient(PG_DSN, schema=schema) as client:
        assert await client.operate("t-later", "abort", "no hurry", timeout_s=0.3) is None
        status = await read_status(PG_DSN, schema, 2.0)
        assert status["operator_requests_waiting"] == 1
        node = ClusterNode(
            PG_DSN, participants, node_id="n2", schema=schema, shards=SHARDS, ttl_s=2.0,
            poll_s=0.1,
        )  # fmt: skip
        await node.start()
        try:
            deadline = time.monotonic() + 20
            while not (answered := pg(f"SELECT code FROM {schema}.operator_request")[0][0]):
                assert time.monotonic() < deadline, "the queued request was not answered"
                await asyncio.sleep(0.1)  # the node runs on this loop
            assert answered == 404
        finally:
            await node.close()
