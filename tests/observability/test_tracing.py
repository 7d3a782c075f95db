"""Tracing: a span per transaction with a child per call, and the call's trace
context carried to a real participant over HTTP."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from accord import (
    BranchSpec,
    Call,
    Coordinator,
    HttpTransport,
    InProcessTransport,
    MemoryStore,
    Op,
    Outcome,
    Protocol,
    TransactionSpec,
    wire,
)
from accord.observability import TracingObserver, tracing_from_env
from accord.participant import Participant as SdkParticipant
from accord.participant import Refusal, SQLiteBarrier

from .conftest import FAST, Participant, fail_first, tcc

pytestmark = pytest.mark.timeout(60)

TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
KEY = ("k1", b"tracing-test-secret")


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    yield p
    p.shutdown()


def spans_by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


async def test_a_transaction_span_parents_one_span_per_call(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """One root span per transaction with txid, protocol and status; a child per
    call attempt (a transient try and its retry included) with branch, op,
    attempt, outcome and error, all in the transaction's trace."""
    tracing = TracingObserver(provider)
    parts = {"ok": Participant(), "flaky": Participant(fail_first(Outcome.TRANSIENT))}
    coord = Coordinator(MemoryStore(), InProcessTransport(parts), observer=tracing)
    await coord.start()
    try:
        assert (await coord.run(tcc("t1", "ok", "flaky"))).committed
    finally:
        await coord.close()

    spans = spans_by_name(exporter)
    [txn] = spans["accord.transaction"]
    assert txn.parent is None
    assert txn.attributes is not None
    assert dict(txn.attributes) == {
        "accord.txid": "t1",
        "accord.protocol": "tcc",
        "accord.recovered": False,
        "accord.branches": 2,
        "accord.status": "committed",
        "accord.reason": "all branches prepared",
    }
    calls = spans["accord.try"] + spans["accord.confirm"]
    assert len(calls) == sum(len(p.calls) for p in parts.values()) == 5
    for span in calls:
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None
        assert span.parent.span_id == txn.context.span_id
        assert span.context.trace_id == txn.context.trace_id
        assert txn.start_time is not None and span.start_time is not None
        assert txn.end_time is not None and span.end_time is not None
        assert txn.start_time <= span.start_time <= span.end_time <= txn.end_time
    seen = sorted(
        (
            a["accord.branch"],
            a["accord.op"],
            a["accord.attempt"],
            a["accord.outcome"],
            a.get("accord.error", ""),
            a["accord.participant"],
        )
        for a in (dict(s.attributes or {}) for s in calls)
    )
    assert seen == [
        ("b0", "confirm", 1, "ok", "", "ok"),
        ("b0", "try", 1, "ok", "", "ok"),
        ("b1", "confirm", 1, "ok", "", "flaky"),
        ("b1", "try", 1, "transient", "transient from the test", "flaky"),
        ("b1", "try", 2, "ok", "", "flaky"),
    ]
    failed = [s for s in calls if s.status.status_code is StatusCode.ERROR]
    assert [dict(s.attributes or {})["accord.attempt"] for s in failed] == [1]
    assert tracing.open_spans == 0


async def test_needs_attention_marks_the_transaction_span_as_an_error(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A confirm that exhausts its attempts ends the span needs_attention, status ERROR."""
    tracing = TracingObserver(provider)
    stuck = Participant(fail_first(Outcome.TRANSIENT, times=100, ops=(Op.CONFIRM,)))
    coord = Coordinator(MemoryStore(), InProcessTransport({"p": stuck}), observer=tracing)
    await coord.start()
    try:
        result = await coord.run(tcc("t1", "p"))
    finally:
        await coord.close()
    assert result.status.value == "needs_attention"
    [txn] = spans_by_name(exporter)["accord.transaction"]
    assert (txn.attributes or {})["accord.status"] == "needs_attention"
    assert txn.status.status_code is StatusCode.ERROR
    assert len(spans_by_name(exporter)["accord.confirm"]) == FAST.maximum_attempts


def test_unfinished_spans_end_on_shutdown_and_beyond_the_bound(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Spans the coordinator never closes (a dropped run) do not pile up: the
    oldest are ended past max_open_spans, the rest by shutdown()."""
    tracing = TracingObserver(provider, max_open_spans=2)
    spec = tcc("x", "p")
    for txid in ("a", "b", "c"):
        tracing.txn_started(txid, spec, False)
    ended = exporter.get_finished_spans()
    assert [(s.attributes or {})["accord.txid"] for s in ended] == ["a"]
    assert (ended[0].attributes or {})["accord.status"] == "unfinished"
    tracing.call_started("c", "b0", "try", 1)
    tracing.shutdown()
    assert tracing.open_spans == 0
    assert len(exporter.get_finished_spans()) == 4
    assert all(
        (s.attributes or {})["accord.status"] == "unfinished" for s in exporter.get_finished_spans()
    )


def test_without_a_recording_provider_there_is_no_context_to_send() -> None:
    """With OpenTelemetry's no-op provider, traceparent() is None, so the HTTP
    transport falls back to a fresh random context."""
    tracing = TracingObserver(trace.NoOpTracerProvider())
    tracing.txn_started("t", tcc("t", "p"), False)
    tracing.call_started("t", "b0", "try", 1)
    call = Call("t", "b0", Op.TRY, "p", None, 1, 1.0)
    assert tracing.traceparent(call) is None


def test_exporter_is_chosen_by_the_environment() -> None:
    """none/unset: no observer; console: an SDK provider; anything else: a clear error."""
    assert tracing_from_env({}) is None
    assert tracing_from_env({"ACCORD_OTEL_EXPORTER": "none"}) is None
    console = tracing_from_env({"ACCORD_OTEL_EXPORTER": "console"})
    assert console is not None
    assert isinstance(console.tracer_provider, TracerProvider)
    assert console.tracer_provider.resource.attributes["service.name"] == "accord"
    processors = console.tracer_provider._active_span_processor._span_processors
    assert [type(p) for p in processors] == [BatchSpanProcessor]
    console.shutdown()
    with pytest.raises(ValueError, match="ACCORD_OTEL_EXPORTER must be one of"):
        tracing_from_env({"ACCORD_OTEL_EXPORTER": "jaeger"})


def importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def test_otlp_needs_its_package() -> None:
    """otlp without an OTLP exporter installed is refused with the package to install."""
    installed = any(
        importable(name)
        for name in (
            "opentelemetry.exporter.otlp.proto.http.trace_exporter",
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        )
    )
    if installed:
        observer = tracing_from_env({"ACCORD_OTEL_EXPORTER": "otlp"})
        assert observer is not None
        observer.shutdown()
    else:
        with pytest.raises(ValueError, match="pip install opentelemetry-exporter-otlp"):
            tracing_from_env({"ACCORD_OTEL_EXPORTER": "otlp"})


# ---------------------------------------------------------------- over HTTP


class HeaderRecorder:
    """ASGI middleware: remembers each request's path and traceparent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            self.seen.append((scope["path"], headers.get(b"traceparent", b"").decode()))
        await self.app(scope, receive, send)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
async def participant_url(tmp_path: Path) -> AsyncIterator[tuple[str, HeaderRecorder]]:
    """The participant SDK over uvicorn: try refuses qty > 5, everything else ok."""
    barrier = SQLiteBarrier(tmp_path / "participant.db")
    await barrier.migrate()
    sdk: SdkParticipant[sqlite3.Connection] = SdkParticipant(
        barrier, wire.Verifier({KEY[0]: KEY[1]})
    )

    @sdk.try_
    def reserve(conn: sqlite3.Connection, call: wire.WireRequest) -> None:
        if call.payload["qty"] > 5:
            raise Refusal("short")

    @sdk.confirm
    def confirm(conn: sqlite3.Connection, call: wire.WireRequest) -> None:
        pass

    @sdk.cancel
    def cancel(conn: sqlite3.Connection, call: wire.WireRequest) -> None:
        pass

    recorder = HeaderRecorder(Starlette(routes=[Mount("/stock", sdk)]))
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(recorder, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}/stock", recorder
    finally:
        server.should_exit = True
        await serving
        await barrier.close()


async def test_participants_receive_the_call_spans_trace_context(
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    participant_url: tuple[str, HeaderRecorder],
) -> None:
    """Over real HTTP, every request carries a traceparent whose trace id is its
    transaction span's and whose parent id is the span of that very call."""
    url, recorder = participant_url
    tracing = TracingObserver(provider)
    transport = HttpTransport({}, default_key=KEY, traceparent=tracing.traceparent)
    coord = Coordinator(MemoryStore(), transport, observer=tracing)

    def spec(txid: str, qty: int) -> TransactionSpec:
        return TransactionSpec(
            protocol=Protocol.TCC,
            branches=(
                BranchSpec("a", url, {"qty": qty}, FAST),
                BranchSpec("b", url, {"qty": 1}, FAST),
            ),
            id=txid,
        )

    await coord.start()
    try:
        assert (await coord.run(spec("committed", 1))).committed
        assert (await coord.run(spec("aborted", 9))).status.value == "aborted"
    finally:
        await coord.close()

    spans = exporter.get_finished_spans()
    txn_trace = {
        (s.attributes or {})["accord.txid"]: s.context.trace_id
        for s in spans
        if s.name == "accord.transaction"
    }
    assert len(txn_trace) == 2
    assert txn_trace["committed"] != txn_trace["aborted"]
    call_spans = {s.context.span_id: s for s in spans if s.name != "accord.transaction"}
    assert len(recorder.seen) == len(call_spans) == 8  # 2 x (2 tries + 2 confirms/cancels)
    for path, header in recorder.seen:
        match = TRACEPARENT_RE.fullmatch(header)
        assert match, header
        trace_id, parent_id = int(match[1], 16), int(match[2], 16)
        assert int(match[3], 16) & 1  # sampled
        span = call_spans[parent_id]
        attrs = span.attributes or {}
        assert trace_id == txn_trace[str(attrs["accord.txid"])]
        assert path == f"/stock/{attrs['accord.op']}"


async def test_a_failing_traceparent_provider_never_fails_a_call(
    participant_url: tuple[str, HeaderRecorder],
) -> None:
    """A provider that raises is logged; the call goes out with a random context."""
    url, recorder = participant_url

    def broken(call: Call) -> str | None:
        raise RuntimeError("tracing bug")

    transport = HttpTransport({}, default_key=KEY, traceparent=broken)
    coord = Coordinator(MemoryStore(), transport)
    await coord.start()
    try:
        spec = TransactionSpec(
            protocol=Protocol.TCC, branches=(BranchSpec("a", url, {"qty": 1}, FAST),), id="t"
        )
        assert (await coord.run(spec)).committed
    finally:
        await coord.close()
    assert len(recorder.seen) == 2
    contexts = [TRACEPARENT_RE.fullmatch(header) for _, header in recorder.seen]
    assert all(m is not None and m[3] == "01" for m in contexts), recorder.seen
