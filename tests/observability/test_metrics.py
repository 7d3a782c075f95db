"""GET /metrics: what a scrape reports after real transactions, compared with
what the participants saw and what the coordinator and its log counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from accord import Coordinator, InProcessTransport, MemoryStore, Outcome, SQLiteStore, Store
from accord.observability import MetricsObserver, metrics_route

from .conftest import Participant, fail_first, saga, tcc

pytestmark = pytest.mark.timeout(60)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Service:
    """A coordinator with a MetricsObserver and its /metrics app."""

    def __init__(self, store: Store, **participants: Participant) -> None:
        self.parts = participants
        self.metrics = MetricsObserver()
        self.coord = Coordinator(store, InProcessTransport(participants), observer=self.metrics)
        self.app = Starlette(routes=[metrics_route(self.coord, self.metrics)])

    async def scrape(self) -> Samples:
        transport = httpx.ASGITransport(app=self.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://accord") as client:
            resp = await client.get("/metrics")
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain; version=")
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text)
            for s in family.samples
        }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str, *keys: str) -> Counter[tuple[str, ...]]:
    """The samples of ``name`` summed by the values of ``keys`` (zeros omitted)."""
    out: Counter[tuple[str, ...]] = Counter()
    for (sample, labels), v in samples.items():
        if sample == name and v:
            d = dict(labels)
            out[tuple(d[k] for k in keys)] += int(v)
    return out


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    s = Service(
        MemoryStore(),
        ok=Participant(),
        flaky=Participant(fail_first(Outcome.TRANSIENT, times=2)),
        refuses=Participant(fail_first(Outcome.REFUSED)),
    )
    await s.coord.start()
    yield s
    await s.coord.close()


async def test_counters_move_by_the_transactions_and_calls_that_ran(service: Service) -> None:
    """After 3 commits, one commit with 2 transient tries and one refusal, the
    scrape counts each terminal status, every call by op and outcome as the
    participants saw it, and the retries, and each histogram counts its events."""
    before = await service.scrape()
    assert value(before, "accord_transactions_started_total") == 0
    results = [await service.coord.run(tcc(f"ok-{i}", "ok", "ok")) for i in range(3)]
    results.append(await service.coord.run(tcc("retried", "ok", "flaky")))
    results.append(await service.coord.run(tcc("refused", "ok", "refuses")))
    assert [r.status.value for r in results] == ["committed"] * 4 + ["aborted"]

    after = await service.scrape()
    assert value(after, "accord_transactions_started_total") == 5
    assert value(after, "accord_transactions_recovered_total") == 0
    finished = labelled(after, "accord_transactions_finished_total", "status")
    assert finished == {("committed",): 4, ("aborted",): 1}
    assert value(after, "accord_transactions_in_flight") == 0
    assert value(after, "accord_transactions_in_flight_limit") == service.coord.max_in_flight

    seen: Counter[tuple[str, str]] = Counter()
    for part in service.parts.values():
        seen += part.by_op_and_outcome()
    assert seen[("try", "transient")] == 2
    assert labelled(after, "accord_branch_calls_total", "op", "outcome") == seen
    # One latency per call, in the histogram of the call's op and outcome.
    assert labelled(after, "accord_branch_call_duration_seconds_count", "op", "outcome") == seen
    assert value(after, "accord_branch_calls_in_flight") == 0
    # The flaky try was sent three times: attempts 2 and 3 are retries.
    assert labelled(after, "accord_branch_call_retries_total", "op") == {("try",): 2}
    assert value(after, "accord_retries_scheduled_total") == 2
    durations = labelled(after, "accord_transaction_duration_seconds_count", "status")
    assert durations == {("committed",): 4, ("aborted",): 1}
    assert value(after, "accord_transaction_duration_seconds_sum", status="committed") > 0


async def test_saga_compensations_are_counted_by_op(service: Service) -> None:
    """A saga whose second action is refused: one action ok, one refused, and
    both compensated (the refused one too, which bars a late action)."""
    result = await service.coord.run(saga("s1", "ok", "refuses"))
    assert result.status.value == "aborted"
    samples = await service.scrape()
    calls = labelled(samples, "accord_branch_calls_total", "op", "outcome")
    assert calls == {("action", "ok"): 1, ("action", "refused"): 1, ("compensate", "ok"): 2}


async def test_in_flight_gauges_count_a_transaction_waiting_on_a_call(service: Service) -> None:
    """While a try is outstanding, one transaction and two calls are in flight;
    both gauges return to zero once the calls are answered."""
    slow = service.parts["ok"]
    slow.held = asyncio.get_running_loop().create_future()
    result = await service.coord.submit(tcc("slow", "ok", "ok"))
    while len(slow.calls) < 2:
        await asyncio.sleep(0.001)
    during = await service.scrape()
    assert value(during, "accord_transactions_in_flight") == 1
    assert value(during, "accord_branch_calls_in_flight") == 2
    slow.held.set_result(None)
    slow.held = None
    assert (await asyncio.wait_for(result, 10)).committed
    after = await service.scrape()
    assert value(after, "accord_transactions_in_flight") == 0
    assert value(after, "accord_branch_calls_in_flight") == 0


async def test_recovered_transactions_are_counted(tmp_path: Path) -> None:
    """A transaction left unfinished in the log is counted as recovered, not
    started, by the coordinator that resumes it (and, undecided, it aborts)."""
    path = tmp_path / "log.db"
    held = Participant()
    held.held = asyncio.get_running_loop().create_future()
    first = Service(SQLiteStore(path), ok=held)
    await first.coord.start()
    pending = await first.coord.submit(tcc("left", "ok"))
    while not held.calls:
        await asyncio.sleep(0.001)
    await first.coord.close()  # the try never answered: "left" stays open in the log
    with pytest.raises(Exception, match="stopped"):
        await pending

    second = Service(SQLiteStore(path), ok=Participant())
    await second.coord.start()
    try:
        while second.coord.in_flight:
            await asyncio.sleep(0.001)
        samples = await second.scrape()
    finally:
        await second.coord.close()
    assert value(samples, "accord_transactions_started_total") == 0
    assert value(samples, "accord_transactions_recovered_total") == 1
    assert labelled(samples, "accord_transactions_finished_total", "status") == {("aborted",): 1}


async def test_log_group_commit_is_exported_from_the_store(tmp_path: Path) -> None:
    """The log's records, batches and commit time come from store.stats(); every
    transaction writes the same number of records, and 20 submitted at once
    share batches (more than one record per batch)."""
    store = SQLiteStore(tmp_path / "log.db")
    service = Service(store, ok=Participant())
    await service.coord.start()
    try:
        await service.coord.run(tcc("first", "ok", "ok"))
        await store.flush()  # the terminal record is appended, not awaited, by run()
        one = await service.scrape()
        per_txn = value(one, "accord_log_records_total")
        assert per_txn >= 2  # at least Begin and Ended
        futures = [await service.coord.submit(tcc(f"t{i}", "ok", "ok")) for i in range(20)]
        await asyncio.wait_for(asyncio.gather(*futures), 30)
        await store.flush()
        samples = await service.scrape()
        stats = store.stats()
    finally:
        await service.coord.close()
    assert value(samples, "accord_log_records_total") == 21 * per_txn == stats.records
    batches = value(samples, "accord_log_batch_records_count")
    assert batches == stats.batches
    assert value(samples, "accord_log_batch_records_sum") == stats.records
    assert batches < stats.records
    assert value(samples, "accord_log_records_per_batch") == pytest.approx(stats.records / batches)
    commit_s = value(samples, "accord_log_commit_seconds_sum")
    assert commit_s == pytest.approx(stats.commit_seconds)
    assert commit_s > 0  # SQLite commits with an fsync
    assert value(samples, "accord_log_commit_seconds_count") == batches


async def test_each_observer_has_a_private_registry() -> None:
    """Two coordinators in one process export their own counts, not a shared sum."""
    a = Service(MemoryStore(), ok=Participant())
    b = Service(MemoryStore(), ok=Participant())
    await a.coord.start()
    await b.coord.start()
    try:
        await a.coord.run(tcc("a1", "ok"))
        await a.coord.run(tcc("a2", "ok"))
        await b.coord.run(tcc("b1", "ok"))
        sa, sb = await a.scrape(), await b.scrape()
    finally:
        await a.coord.close()
        await b.coord.close()
    assert value(sa, "accord_transactions_started_total") == 2
    assert value(sb, "accord_transactions_started_total") == 1
    assert labelled(sa, "accord_branch_calls_total", "op") == {("try",): 2, ("confirm",): 2}
    assert labelled(sb, "accord_branch_calls_total", "op") == {("try",): 1, ("confirm",): 1}


def test_an_observer_exports_one_coordinator() -> None:
    """Binding the same coordinator twice is harmless; a second coordinator is refused."""
    metrics = MetricsObserver()
    first = Coordinator(MemoryStore(), InProcessTransport({}), observer=metrics)
    metrics_route(first, metrics)
    metrics_route(first, metrics)
    other = Coordinator(MemoryStore(), InProcessTransport({}))
    with pytest.raises(ValueError, match="another coordinator"):
        metrics_route(other, metrics)


async def test_latency_buckets_are_cumulative_and_inclusive() -> None:
    """A latency equal to a bucket's bound counts in that bucket (le), one above
    every bound only in +Inf; _sum is the sum of the latencies."""
    service = Service(MemoryStore())
    for latency_s in (0.005, 0.0051, 100.0):
        service.metrics.call_started("t", "b", "try", 1)
        service.metrics.call_finished("t", "b", "try", 1, "ok", latency_s, "")
    samples = await service.scrape()

    def bucket(le: str) -> float:
        return value(
            samples, "accord_branch_call_duration_seconds_bucket", op="try", outcome="ok", le=le
        )

    assert (bucket("0.0025"), bucket("0.005"), bucket("0.01"), bucket("30.0")) == (0, 1, 2, 2)
    assert bucket("+Inf") == 3
    total = value(samples, "accord_branch_call_duration_seconds_sum", op="try", outcome="ok")
    assert total == pytest.approx(100.0101)
