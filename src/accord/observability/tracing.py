"""OpenTelemetry tracing: a span per transaction, a child span per call.

The coordinator is driven by callbacks, not a task per transaction or call,
so OpenTelemetry's implicit context (contextvars) cannot carry a span from
where a call starts to where the HTTP request is built. The spans are kept
here instead, keyed by ``(txid, branch, op, attempt)``, and the HTTP
transport asks for the context of the call it is about to send::

    tracing = TracingObserver(provider)
    transport = HttpTransport(keys, traceparent=tracing.traceparent)
    coordinator = Coordinator(store, transport, observer=tracing)

``call_started`` runs right before the transport starts the call, so the
span exists when the request is built, and each participant receives a
``traceparent`` whose trace id is its transaction's.

Exporters are chosen with ``ACCORD_OTEL_EXPORTER`` (see
:func:`tracing_from_env`): ``none`` (the default), ``console``, or ``otlp``
when an OTLP exporter package is installed (accord does not depend on one).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from accord.coordinator import Observer
from accord.core.machine import Outcome
from accord.core.records import TxnStatus

if TYPE_CHECKING:
    from accord.core.spec import TransactionSpec
    from accord.transport.base import Call

log = logging.getLogger("accord.observability")

ENV_EXPORTER = "ACCORD_OTEL_EXPORTER"
EXPORTERS = ("none", "console", "otlp")
# Spans whose end the coordinator never reports (a run dropped by close()
# or by a lost lease) are ended once this many are open, oldest first.
DEFAULT_MAX_OPEN_SPANS = 100_000
# Where an installed OTLP exporter may live: HTTP/protobuf first, then gRPC.
_OTLP_MODULES = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
)

_CallKey = tuple[str, str, str, int]


class TracingObserver(Observer):
    """Spans for transactions and their participant calls.

    A transaction's span (``accord.transaction``) runs from ``txn_started``
    to ``txn_finished``, with attributes ``accord.txid``,
    ``accord.protocol``, ``accord.recovered``, ``accord.branches`` and, at
    the end, ``accord.status`` and ``accord.reason``. Each call gets a child
    span (``accord.<op>``, kind CLIENT) with ``accord.branch``,
    ``accord.participant``, ``accord.op``, ``accord.attempt``,
    ``accord.outcome`` and ``accord.error``.

    ``tracer_provider`` defaults to the global one (a no-op unless the
    application configured the SDK); with a no-op provider
    :meth:`traceparent` returns ``None`` and the transport sends a fresh
    random context, as without tracing.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        max_open_spans: int = DEFAULT_MAX_OPEN_SPANS,
    ) -> None:
        if max_open_spans < 1:
            raise ValueError(f"max_open_spans must be at least 1, got {max_open_spans}")
        self.tracer_provider = tracer_provider
        self._tracer = trace.get_tracer("accord", tracer_provider=tracer_provider)
        self._max_open = max_open_spans
        # Insertion order is age: the first entry is the oldest open span.
        self._txns: dict[str, tuple[Span, Mapping[str, str]]] = {}
        self._calls: dict[_CallKey, Span] = {}

    # ------------------------------------------------------------ the transport's seam

    def traceparent(self, call: Call) -> str | None:
        """The W3C ``traceparent`` of ``call``'s span, or ``None`` if there is
        none (no such call open, or a non-recording provider)."""
        span = self._calls.get((call.txid, call.branch, str(call.op), call.attempt))
        if span is None:
            return None
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return None
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"

    # ------------------------------------------------------------ observer hooks

    def txn_started(self, txid: str, spec: TransactionSpec, recovered: bool) -> None:
        stale = self._txns.pop(txid, None)
        if stale is not None:  # driven again (e.g. resumed) before it ever finished
            _end_unfinished(stale[0], "resumed")
        span = self._tracer.start_span(
            "accord.transaction",
            kind=SpanKind.INTERNAL,
            attributes={
                "accord.txid": txid,
                "accord.protocol": spec.protocol.value,
                "accord.recovered": recovered,
                "accord.branches": len(spec.branches),
            },
        )
        participants = {b.name: b.participant for b in spec.branches}
        self._txns[txid] = (span, participants)
        if len(self._txns) > self._max_open:
            _, (oldest, _) = _pop_first(self._txns)
            _end_unfinished(oldest, "evicted")

    def call_started(self, txid: str, branch: str, op: str, attempt: int) -> None:
        txn = self._txns.get(txid)
        attributes: dict[str, Any] = {
            "accord.txid": txid,
            "accord.branch": branch,
            "accord.op": op,
            "accord.attempt": attempt,
        }
        if txn is None:
            context = None
        else:
            context = trace.set_span_in_context(txn[0])
            participant = txn[1].get(branch)
            if participant is not None:
                attributes["accord.participant"] = participant
        span = self._tracer.start_span(
            f"accord.{op}", context=context, kind=SpanKind.CLIENT, attributes=attributes
        )
        key = (txid, branch, op, attempt)
        stale = self._calls.pop(key, None)
        if stale is not None:
            _end_unfinished(stale, "superseded")
        self._calls[key] = span
        if len(self._calls) > self._max_open:
            _, oldest = _pop_first(self._calls)
            _end_unfinished(oldest, "evicted")

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
        span = self._calls.pop((txid, branch, op, attempt), None)
        if span is None:
            return
        span.set_attribute("accord.outcome", outcome)
        if error:
            span.set_attribute("accord.error", error)
        # A refusal is the participant's business answer, not a fault.
        if outcome in (Outcome.TRANSIENT, Outcome.REJECTED):
            span.set_status(Status(StatusCode.ERROR, error or outcome))
        span.end()

    def txn_finished(self, txid: str, status: TxnStatus, reason: str, latency_s: float) -> None:
        txn = self._txns.pop(txid, None)
        if txn is None:
            return
        span = txn[0]
        span.set_attribute("accord.status", status.value)
        if reason:
            span.set_attribute("accord.reason", reason)
        if status is TxnStatus.NEEDS_ATTENTION:
            span.set_status(Status(StatusCode.ERROR, reason or status.value))
        span.end()

    # ------------------------------------------------------------ lifecycle

    @property
    def open_spans(self) -> int:
        """Transaction and call spans started and not yet ended."""
        return len(self._txns) + len(self._calls)

    def shutdown(self) -> None:
        """End every open span (as ``unfinished``), then flush and shut down
        the provider if it is an SDK provider. Call after the coordinator closed."""
        calls, self._calls = self._calls, {}
        for span in calls.values():
            _end_unfinished(span, "coordinator stopped")
        txns, self._txns = self._txns, {}
        for span, _ in txns.values():
            _end_unfinished(span, "coordinator stopped")
        shutdown = getattr(self.tracer_provider, "shutdown", None)
        if callable(shutdown):
            shutdown()


def _pop_first(spans: dict[Any, Any]) -> tuple[Any, Any]:
    key = next(iter(spans))
    return key, spans.pop(key)


def _end_unfinished(span: Span, why: str) -> None:
    span.set_attribute("accord.status", "unfinished")
    span.set_attribute("accord.reason", why)
    span.end()


def tracing_from_env(environ: Mapping[str, str] | None = None) -> TracingObserver | None:
    """A :class:`TracingObserver` exporting as ``ACCORD_OTEL_EXPORTER`` says.

    * unset, empty or ``none``: ``None`` (no tracing; participants still get
      a random ``traceparent`` from the HTTP transport);
    * ``console``: spans printed as JSON on stdout (batched);
    * ``otlp``: the OTLP exporter (HTTP/protobuf, else gRPC), configured by
      the standard ``OTEL_EXPORTER_OTLP_*`` variables; it must be installed
      (``pip install opentelemetry-exporter-otlp``), accord does not depend on it.

    The service name is ``OTEL_SERVICE_NAME``, else ``accord``. Raises
    ``ValueError`` naming the variable for an unknown value or a missing
    exporter package.
    """
    env = os.environ if environ is None else environ
    kind = env.get(ENV_EXPORTER, "").strip().lower() or "none"
    if kind == "none":
        return None
    if kind not in EXPORTERS:
        raise ValueError(f"{ENV_EXPORTER} must be one of {', '.join(EXPORTERS)}; got {kind!r}")
    exporter: Any = ConsoleSpanExporter() if kind == "console" else _otlp_exporter()
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "accord"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return TracingObserver(provider)


def _otlp_exporter() -> Any:
    for name in _OTLP_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        return module.OTLPSpanExporter()
    raise ValueError(
        f"{ENV_EXPORTER}=otlp needs an OTLP exporter package, which is not installed"
        " (pip install opentelemetry-exporter-otlp-proto-http)"
    )
