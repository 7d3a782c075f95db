"""Prometheus metrics of a coordinator, served at ``GET /metrics``.

Two sources, so that the hot path pays only for what it alone can tell:

* :class:`MetricsObserver`, installed as the coordinator's observer, counts
  what needs a label or a latency: branch calls by operation and outcome,
  their latency, retries by operation, calls in flight, and the end-to-end
  latency of transactions by terminal status.
* A collector bound to the coordinator (by :func:`metrics_route`) reads,
  at scrape time, what the coordinator and its log already count for free:
  transactions started, recovered and finished, transactions in flight and
  the limit, retries scheduled, and the log's group commit (records,
  batches, commit time: ``store.stats()``). No store has to be changed.

The observer counts in plain ints and lists on the event loop's thread and
builds the Prometheus families only when scraped: prometheus_client's own
``Counter``/``Histogram`` take a lock per update, which measured about 10 us
per participant call here, against about 1 us this way (see
docs/operations.md). The scrape must therefore run on the loop's thread too,
as the ``async`` endpoint of :func:`metrics_route` does.

Every metric lives in the observer's own ``CollectorRegistry``, never the
process-global one: a process (or a test run) can hold many coordinators.
The metrics and their meaning are listed in docs/operations.md.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_float_to_go_string
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from accord.coordinator import Observer
from accord.core.records import TxnStatus

if TYPE_CHECKING:
    from accord.coordinator import Coordinator
    from accord.core.spec import TransactionSpec

# Calls to participants in the same process take microseconds; over HTTP,
# milliseconds; a timeout, up to the branch's timeout_s.
CALL_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
# A transaction spans several calls and, when they fail, retries with backoff.
TXN_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
)  # fmt: skip


# How Prometheus spells a bucket bound ("0.005", "1.0", "+Inf").
_le = cast(Callable[[float], str], _untyped_float_to_go_string)


class _Histogram:
    """Bucket counts and a sum; ``counts[i]`` holds values in ``(bounds[i-1], bounds[i]]``
    and the last slot those above every bound."""

    __slots__ = ("bounds", "counts", "labels", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.labels = [_le(b) for b in bounds]
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for label, count in zip(self.labels, self.counts, strict=False):
            total += count
            out.append((label, total))
        out.append(("+Inf", total + self.counts[-1]))
        return out


class MetricsObserver(Observer):
    """Counts calls and latencies; exports them through a private registry.

    ::

        metrics = MetricsObserver()
        coordinator = Coordinator(store, transport, observer=metrics)
        app = Starlette(routes=[metrics_route(coordinator, metrics)])

    ``registry`` defaults to a new ``CollectorRegistry`` of this observer's
    own (with the process collector: CPU, memory, open files). Hooks and
    scrapes must run on the coordinator's event loop thread.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
        self.registry = registry
        # (op, outcome) -> [calls, latency histogram]
        self._calls: dict[tuple[str, str], tuple[list[int], _Histogram]] = {}
        self._retries: dict[str, int] = {}
        self._calls_started = 0
        self._calls_finished = 0
        self._txns = {s: _Histogram(TXN_BUCKETS_S) for s in TxnStatus if s.terminal}
        self._bound: Coordinator | None = None
        registry.register(_ObserverCollector(self))

    def bind(self, coordinator: Coordinator) -> None:
        """Also export what ``coordinator`` and its log count (read at scrape
        time). Once per observer; binding the same coordinator again is a no-op."""
        if self._bound is coordinator:
            return
        if self._bound is not None:
            raise ValueError("this MetricsObserver already exports another coordinator")
        self.registry.register(CoordinatorCollector(coordinator))
        self._bound = coordinator

    def generate_latest(self) -> bytes:
        """The registry in the Prometheus text format (call on the loop's thread)."""
        return _generate_latest(self.registry)

    # ------------------------------------------------------------ observer hooks

    def txn_started(self, txid: str, spec: TransactionSpec, recovered: bool) -> None:
        pass  # counted by the coordinator itself (Metrics.started / .recovered)

    def call_started(self, txid: str, branch: str, op: str, attempt: int) -> None:
        self._calls_started += 1
        if attempt > 1:
            self._retries[op] = self._retries.get(op, 0) + 1

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
        self._calls_finished += 1
        entry = self._calls.get((op, outcome))
        if entry is None:
            entry = self._calls[(op, outcome)] = ([0], _Histogram(CALL_BUCKETS_S))
        entry[0][0] += 1
        entry[1].observe(latency_s)

    def txn_finished(self, txid: str, status: TxnStatus, reason: str, latency_s: float) -> None:
        self._txns[status].observe(latency_s)


class _ObserverCollector(Collector):
    """Builds the observer's families from its plain counters at scrape time."""

    def __init__(self, observer: MetricsObserver) -> None:
        self._observer = observer

    def collect(self) -> Iterator[Metric]:
        o = self._observer
        calls = CounterMetricFamily(
            "accord_branch_calls",
            "Participant calls that returned, by operation and outcome.",
            labels=("op", "outcome"),
        )
        latency = HistogramMetricFamily(
            "accord_branch_call_duration_seconds",
            "Latency of participant calls, from send to reply, by operation and outcome.",
            labels=("op", "outcome"),
        )
        for (op, outcome), (counter, hist) in sorted(o._calls.items()):
            calls.add_metric([op, outcome], counter[0])
            latency.add_metric([op, outcome], hist.buckets(), hist.sum)
        yield calls
        yield latency
        retries = CounterMetricFamily(
            "accord_branch_call_retries",
            "Participant calls sent that were not a branch operation's first attempt.",
            labels=("op",),
        )
        for op, n in sorted(o._retries.items()):
            retries.add_metric([op], n)
        yield retries
        yield GaugeMetricFamily(
            "accord_branch_calls_in_flight",
            "Participant calls sent and not yet answered.",
            value=o._calls_started - o._calls_finished,
        )
        txns = HistogramMetricFamily(
            "accord_transaction_duration_seconds",
            "End-to-end latency of transactions driven by this process, from start"
            " (or recovery) to terminal status, by status.",
            labels=("status",),
        )
        for status, hist in o._txns.items():
            txns.add_metric([status.value], hist.buckets(), hist.sum)
        yield txns


class CoordinatorCollector(Collector):
    """Reads a coordinator's own counters and its store's group-commit stats
    when Prometheus scrapes (nothing is counted twice on the hot path)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        coordinator = self._coordinator
        m = coordinator.metrics
        yield CounterMetricFamily(
            "accord_transactions_started",
            "Transactions submitted to this process and started.",
            value=m.started,
        )
        yield CounterMetricFamily(
            "accord_transactions_recovered",
            "Unfinished transactions found in the log and resumed by this process.",
            value=m.recovered,
        )
        finished = CounterMetricFamily(
            "accord_transactions_finished",
            "Transactions that reached a terminal status in this process, by status.",
            labels=("status",),
        )
        finished.add_metric([TxnStatus.COMMITTED.value], m.committed)
        finished.add_metric([TxnStatus.ABORTED.value], m.aborted)
        finished.add_metric([TxnStatus.NEEDS_ATTENTION.value], m.needs_attention)
        yield finished
        yield GaugeMetricFamily(
            "accord_transactions_in_flight",
            "Transactions being driven now (started or recovered, not yet terminal).",
            value=coordinator.in_flight,
        )
        yield GaugeMetricFamily(
            "accord_transactions_in_flight_limit",
            "max_in_flight: beyond it, submissions wait or are refused (503).",
            value=coordinator.max_in_flight,
        )
        yield CounterMetricFamily(
            "accord_retries_scheduled",
            "Retries of a failed participant call scheduled with backoff.",
            value=m.retries,
        )
        stats = coordinator.store.stats()
        yield CounterMetricFamily(
            "accord_log_records",
            "Records written to the durable log.",
            value=stats.records,
        )
        yield SummaryMetricFamily(
            "accord_log_batch_records",
            "Group commit: records per committed batch (_sum records, _count batches).",
            count_value=stats.batches,
            sum_value=stats.records,
        )
        yield SummaryMetricFamily(
            "accord_log_commit_seconds",
            "Group commit: time spent writing and committing (fsync) log batches"
            " (_sum seconds, _count batches).",
            count_value=stats.batches,
            sum_value=stats.commit_seconds,
        )
        yield GaugeMetricFamily(
            "accord_log_records_per_batch",
            "Group commit: average records per batch since the log was opened.",
            value=stats.records_per_batch,
        )


def metrics_route(coordinator: Coordinator, observer: MetricsObserver) -> Route:
    """``GET /metrics`` in the Prometheus text format, for ``coordinator``
    (binds it to ``observer``, see :meth:`MetricsObserver.bind`)."""
    observer.bind(coordinator)

    # async: runs on the event loop's thread, the thread that owns the
    # coordinator's and the observer's state (a sync endpoint would run in a
    # worker thread).
    async def metrics(request: Request) -> Response:
        return Response(observer.generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"], name="metrics")
