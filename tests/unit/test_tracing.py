"""Tracing (README "Tracing"): the API's server span, its context in every queued record's
headers, the processor's batch span linked to the records' contexts; nothing when off."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from adapters.inbound_log import SqliteInboundLog, decode_headers
from adapters.intake import PendingThenQueue
from adapters.kafka import headers_of
from adapters.wiring import Services
from config import tracing
from config.clock import business_today
from config.settings import Settings
from dataflows.trades import decode_batch
from domain.message import TradeMessage, encode
from domain.trade import Decision, Trade
from ingest_api.app import create_app
from ingest_api.tracing import TracingMiddleware
from sinks.stores import TradeSink
from tests.fakes import FakeKeys, FakeQueue, FakeStatusStore, FakeTradeStore
from tests.flows.conftest import Record

TODAY = business_today("UTC")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@contextmanager
def recorded() -> Iterator[InMemorySpanExporter]:
    """Spans exported to memory, each as it ends; tracing is off again afterwards."""
    exporter = InMemorySpanExporter()
    tracing.install(exporter, "trade-store-test", batched=False)
    try:
        yield exporter
    finally:
        tracing.uninstall()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded() as exporter:
        yield exporter


@dataclass
class Api:
    client: TestClient
    queue: FakeQueue
    middleware: list[type]


@pytest.fixture
def api() -> Iterator[Api]:
    """The app on fakes, made after the test's tracing set-up (as a worker makes it)."""
    queue, statuses = FakeQueue(), FakeStatusStore()
    app = create_app(
        Settings(tracing="otlp"),  # an installed provider is kept: the in-memory one
        services=lambda _: Services(
            FakeTradeStore(), statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    threshold = gc.get_threshold()
    with TestClient(app) as client:
        yield Api(client, queue, [m.cls for m in app.user_middleware])  # type: ignore[misc]
    gc.unfreeze()
    gc.set_threshold(*threshold)


def body(trade_id: str = "T1") -> dict[str, object]:
    return {
        "trade_id": trade_id,
        "version": 1,
        "counterparty_id": "CP-1",
        "book_id": "B1",
        "maturity_date": (TODAY + timedelta(days=30)).isoformat(),
    }


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def traceparent_of(message: TradeMessage) -> tuple[str, str]:
    """(trace id, span id) of the sampled traceparent a message carries."""
    version, trace_id, span_id, flags = dict(message.trace)["traceparent"].split("-")
    assert version == "00"
    assert int(flags, 16) & 1  # sampled
    return trace_id, span_id


def test_a_post_is_a_server_span_whose_context_every_record_header_carries(
    spans: InMemorySpanExporter, api: Api, tmp_path: Path
) -> None:
    reply = api.client.post("/api/v1/trades", json=body(), headers={"X-Correlation-ID": "c-9"})
    assert reply.status_code == 202
    (span,) = server_spans(spans)
    assert span.name == "POST /api/v1/trades"
    assert span.parent is None  # no incoming traceparent: a new trace
    assert span.attributes is not None
    assert span.attributes["http.route"] == "/api/v1/trades"
    assert span.attributes["http.response.status_code"] == 202
    assert span.attributes["trade_store.correlation_id"] == "c-9"
    (message,) = api.queue.messages
    context = span.get_span_context()
    assert context is not None
    assert traceparent_of(message) == (
        format(context.trace_id, "032x"),
        format(context.span_id, "016x"),
    )
    # Kafka's record headers and the embedded log's carry it, beside the others.
    carrier = dict(message.trace)["traceparent"]
    assert ("traceparent", carrier) in headers_of(message, 123)
    row_headers = SqliteInboundLog(tmp_path / "unused.db", 4).row(message)[3]
    assert ("traceparent", carrier.encode()) in decode_headers(str(row_headers))


def test_an_incoming_traceparent_is_the_server_spans_parent(
    spans: InMemorySpanExporter, api: Api
) -> None:
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    reply = api.client.post("/api/v1/trades", json=body(), headers={"traceparent": incoming})
    assert reply.status_code == 202
    (span,) = server_spans(spans)
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT_ID
    context = span.get_span_context()
    assert context is not None
    assert format(context.trace_id, "032x") == TRACE_ID
    (message,) = api.queue.messages
    assert traceparent_of(message) == (TRACE_ID, format(context.span_id, "016x"))


def test_each_trade_of_a_batch_carries_the_batch_requests_context(
    spans: InMemorySpanExporter, api: Api
) -> None:
    reply = api.client.post("/api/v1/trades/batch", json={"trades": [body("T1"), body("T2")]})
    assert reply.status_code == 202
    (span,) = server_spans(spans)
    assert span.name == "POST /api/v1/trades/batch"
    context = span.get_span_context()
    assert context is not None
    assert [traceparent_of(m) for m in api.queue.messages] == [
        (format(context.trace_id, "032x"), format(context.span_id, "016x"))
    ] * 2


def test_off_no_middleware_no_span_no_header(spans: InMemorySpanExporter) -> None:
    """The default: no provider, so the app has no tracing middleware and queues no
    trace-context header (and the exporter, had it stayed installed, gets nothing)."""
    tracing.uninstall()
    queue, statuses = FakeQueue(), FakeStatusStore()
    app = create_app(
        Settings(),
        services=lambda _: Services(
            FakeTradeStore(), statuses, queue, PendingThenQueue(statuses, queue, FakeKeys())
        ),
    )
    threshold = gc.get_threshold()
    with TestClient(app) as client:
        assert client.post("/api/v1/trades", json=body()).status_code == 202
    gc.unfreeze()
    gc.set_threshold(*threshold)
    assert TracingMiddleware not in [m.cls for m in app.user_middleware]
    (message,) = queue.messages
    assert message.trace == ()
    assert [name for name, _ in headers_of(message, 123)] == [
        "request_id",
        "correlation_id",
        "queue_deadline_ms",
    ]
    assert spans.get_finished_spans() == ()


def message_of(n: int, trace: tuple[tuple[str, str], ...] = ()) -> TradeMessage:
    return TradeMessage(
        request_id=f"r{n}",
        correlation_id=f"c{n}",
        accepted_on=TODAY,
        accepted_at=datetime.now(UTC),
        trade=Trade(f"T{n}", 1, "CP", "B", TODAY + timedelta(days=5), TODAY),
        trace=trace,
    )


def carrier(trace_id: int, span_id: int) -> tuple[tuple[str, str], ...]:
    return (("traceparent", f"00-{trace_id:032x}-{span_id:016x}-01"),)


def decisions(traces: list[tuple[tuple[str, str], ...]]) -> list[Decision]:
    return [Decision(message_of(n, t), None) for n, t in enumerate(traces)]


def write(items: list[Decision]) -> None:
    partition = TradeSink(FakeTradeStore, FakeStatusStore).build("store", 0, 1)
    partition.write_batch(items)
    partition.close()


def test_a_batch_is_one_consumer_span_linked_to_each_distinct_record_context(
    spans: InMemorySpanExporter,
) -> None:
    write(decisions([carrier(1, 1), carrier(2, 2), carrier(1, 1), ()]))
    (span,) = spans.get_finished_spans()
    assert (span.name, span.kind, span.parent) == ("process trades", SpanKind.CONSUMER, None)
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
        (1, 1),
        (2, 2),
    ]
    assert span.attributes is not None
    assert span.attributes["messaging.batch.message_count"] == 4
    assert span.attributes["trade_store.links_dropped"] == 0


def test_links_are_capped(spans: InMemorySpanExporter) -> None:
    write(decisions([carrier(n, n) for n in range(1, tracing.MAX_LINKS + 3)]))
    (span,) = spans.get_finished_spans()
    assert len(span.links) == tracing.MAX_LINKS
    assert span.attributes is not None
    assert span.attributes["trade_store.links_dropped"] == 2


def test_off_the_sink_makes_no_span(spans: InMemorySpanExporter) -> None:
    tracing.uninstall()
    write(decisions([carrier(1, 1)]))
    assert spans.get_finished_spans() == ()


def record_of(message: TradeMessage) -> Record:
    headers = [("request_id", message.request_id.encode())]
    headers += [(name, value.encode()) for name, value in message.trace]
    return Record(message.trade.trade_id.encode(), encode(message), headers)


def test_decoding_keeps_a_records_trace_context_only_when_on(
    spans: InMemorySpanExporter,
) -> None:
    sent = message_of(1, (*carrier(7, 8), ("tracestate", "vendor=x")))
    (traced,) = decode_batch([record_of(sent)])
    assert isinstance(traced, TradeMessage)
    assert traced.trace == sent.trace
    tracing.uninstall()
    (untraced,) = decode_batch([record_of(sent)])
    assert untraced == replace(sent, trace=())


def test_otlp_is_configured_once_and_names_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    tracing.configure("off", "trade-store-api")
    assert tracing.tracer() is None
    try:
        tracing.configure("otlp", "trade-store-api")
        first = tracing.tracer()
        assert first is not None
        assert first.resource.attributes["service.name"] == "trade-store-api"  # type: ignore[attr-defined]
        tracing.configure("otlp", "trade-store-api")
        assert tracing.tracer() is first
    finally:
        tracing.uninstall()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "trades-eu")
    try:
        tracing.configure("otlp", "trade-store-api")
        assert tracing.tracer().resource.attributes["service.name"] == "trades-eu"  # type: ignore[union-attr]
    finally:
        tracing.uninstall()
