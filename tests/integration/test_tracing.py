"""Traces link the API span to the processor span (README "Tracing"), embedded profile: the
real API and intake write the inbound log, whose records the real dataflow, its sinks and
SQLite stores then process in-process. And the context crosses a real Kafka broker."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from bytewax import operators as op
from bytewax.testing import TestingSink, TestingSource, run_main
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from adapters import wiring
from adapters.inbound_log import LogRecord, read_partition
from adapters.kafka import KafkaTradeQueue, ensure_topics
from adapters.sqlite_file import connect
from config import tracing
from config.settings import Settings
from dataflows.trades import build_flow
from domain.dead_letter import DeadLetter
from domain.status import RequestState
from ingest_api.app import create_app
from tests.conftest import settings_env, unique
from tests.integration.test_kafka_queue import message, read_all
from tests.unit.test_tracing import body as trade
from tests.unit.test_tracing import recorded

INCOMING = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def embedded(tmp_path: Path) -> Settings:
    settings = Settings(
        profile="embedded", data_dir=tmp_path / "data", inbound_partitions=2, tracing="otlp"
    )
    subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate"], env=settings_env(settings), check=True
    )
    return settings


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded() as exporter:
        yield exporter


def log_records(settings: Settings) -> list[LogRecord]:
    conn = connect(wiring.inbound_log_path(settings))
    try:
        return [
            r for p in range(settings.inbound_partitions) for r in read_partition(conn, p, 0, 100)
        ]
    finally:
        conn.close()


def test_the_processors_batch_span_links_to_each_api_span(
    embedded: Settings, spans: InMemorySpanExporter
) -> None:
    app = create_app(embedded)
    threshold = gc.get_threshold()
    with TestClient(app) as client:
        one = client.post("/api/v1/trades", json=trade("T1"), headers={"traceparent": INCOMING})
        batch = client.post("/api/v1/trades/batch", json={"trades": [trade("T2"), trade("T3")]})
    gc.unfreeze()
    gc.set_threshold(*threshold)
    assert (one.status_code, batch.status_code) == (202, 202)
    api_spans = {s.name: s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER}
    single, batched = api_spans["POST /api/v1/trades"], api_spans["POST /api/v1/trades/batch"]
    assert single.context is not None
    assert batched.context is not None
    assert format(single.context.trace_id, "032x") == INCOMING.split("-")[1]

    # The log's records carry their request's span context in their headers.
    records = log_records(embedded)
    parents = {dict(r.headers)["traceparent"].split(b"-")[2] for r in records}
    assert parents == {
        format(single.context.span_id, "016x").encode(),
        format(batched.context.span_id, "016x").encode(),
    }

    spans.clear()
    dead: list[DeadLetter] = []
    run_main(
        build_flow(
            inbound=lambda f: op.input("inbound", f, TestingSource(records, batch_size=10)),
            trades=lambda: wiring.trade_store(embedded),
            statuses=lambda: wiring.status_store(embedded),
            dead_letters=TestingSink(dead),
        )
    )
    statuses = wiring.status_store(embedded)
    request_ids = [batch.json()["results"][i]["request_id"] for i in (0, 1)]
    for request_id in [one.json()["request_id"], *request_ids]:
        status = statuses.get(request_id)
        assert status is not None
        assert status.state is RequestState.SUCCESS
    assert dead == []

    (process,) = spans.get_finished_spans()
    assert (process.name, process.kind, process.parent) == (
        "process trades",
        SpanKind.CONSUMER,
        None,
    )
    assert process.attributes is not None
    assert process.attributes["messaging.batch.message_count"] == 3
    linked = {(link.context.trace_id, link.context.span_id) for link in process.links}
    assert linked == {
        (single.context.trace_id, single.context.span_id),
        (batched.context.trace_id, batched.context.span_id),
    }


async def test_kafka_records_carry_the_trace_context_over_the_broker(migrated: Settings) -> None:
    """Services profile: the trace context is a header of the Kafka record itself, read back
    by a consumer as the processor's source reads it."""
    topic = unique("trace-test")
    ensure_topics(migrated.kafka_bootstrap_servers, {topic: 1}, 1)
    queue = KafkaTradeQueue(migrated.kafka_bootstrap_servers, topic, 5000, 1)
    sent = replace(message("T-traced"), trace=(("traceparent", INCOMING), ("tracestate", "k=v")))
    await queue.publish(sent)
    queue.close()
    (got,) = read_all(migrated.kafka_bootstrap_servers, topic, 1, 1)
    assert tracing.carried(got.headers()) == sent.trace  # type: ignore[attr-defined]
