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

Every metric lives in the observer's own ``CollectorRegistry``, never the
process-global one: a process (or a test run) can hold many coordinators.
The metrics and their meaning are listed in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
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

_TERMINAL = (TxnStatus.COMMITTED, TxnStatus.ABORTED, TxnStatus.NEEDS_ATTENTION)


class MetricsObserver(Observer):
    """Counts calls and latencies into a private registry.

    ::

        metrics = MetricsObserver()
        coordinator = Coordinator(store, transport, observer=metrics)
        app = Starlette(routes=[metrics_route(coordinator, metrics)])

    ``registry`` defaults to a new ``CollectorRegistry`` of this observer's
    own (with the process collector: CPU, memory, open files).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
        self.registry = registry
        self._calls = Counter(
            "accord_branch_calls",
            "Participant calls that returned, by operation and outcome.",
            ("op", "outcome"),
            registry=registry,
        )
        self._call_seconds = Histogram(
            "accord_branch_call_duration_seconds",
            "Latency of participant calls, from send to reply, by operation and outcome.",
            ("op", "outcome"),
            buckets=CALL_BUCKETS_S,
            registry=registry,
        )
        self._retries = Counter(
            "accord_branch_call_retries",
            "Participant calls sent that were not a branch operation's first attempt.",
            ("op",),
            registry=registry,
        )
        self._calls_in_flight = Gauge(
            "accord_branch_calls_in_flight",
            "Participant calls sent and not yet answered.",
            registry=registry,
        )
        self._txn_seconds = Histogram(
            "accord_transaction_duration_seconds",
            "End-to-end latency of transactions driven by this process, from start"
            " (or recovery) to terminal status, by status.",
            ("status",),
            buckets=TXN_BUCKETS_S,
            registry=registry,
        )
        # Label lookups cost a lock and a tuple hash each; resolve them once.
        self._by_outcome: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._retries_by_op: dict[str, Counter] = {}
        self._txn_by_status = {s: self._txn_seconds.labels(s.value) for s in _TERMINAL}
        self._bound: Coordinator | None = None

    def bind(self, coordinator: Coordinator) -> None:
        """Also export what ``coordinator`` and its log count (read at scrape
        time). Once per observer; binding the same coordinator again is a no-op."""
        if self._bound is coordinator:
            return
        if self._bound is not None:
            raise ValueError("this MetricsObserver already exports another coordinator")
        self.registry.register(CoordinatorCollector(coordinator))
        self._bound = coordinator

    # ------------------------------------------------------------ observer hooks

    def txn_started(self, txid: str, spec: TransactionSpec, recovered: bool) -> None:
        pass  # counted by the coordinator itself (Metrics.started / .recovered)

    def call_started(self, txid: str, branch: str, op: str, attempt: int) -> None:
        self._calls_in_flight.inc()
        if attempt > 1:
            retries = self._retries_by_op.get(op)
            if retries is None:
                retries = self._retries_by_op[op] = self._retries.labels(op)
            retries.inc()

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
        self._calls_in_flight.dec()
        key = (op, outcome)
        children = self._by_outcome.get(key)
        if children is None:
            children = self._by_outcome[key] = (
                self._calls.labels(op, outcome),
                self._call_seconds.labels(op, outcome),
            )
        children[0].inc()
        children[1].observe(latency_s)

    def txn_finished(self, txid: str, status: TxnStatus, reason: str, latency_s: float) -> None:
        self._txn_by_status[status].observe(latency_s)


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
    registry = observer.registry

    # async: runs on the event loop's thread, the thread that owns the
    # coordinator's state (a sync endpoint would run in a worker thread).
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", metrics, methods=["GET"], name="metrics")
