"""End to end: `trade-store dev` with ``TRADE_STORE_TRACING=otlp`` exports its spans by
OTLP/HTTP to where ``OTEL_EXPORTER_OTLP_ENDPOINT`` says (here a receiver of the test's own
on 127.0.0.1), and the processor's batch span links to the API span of the request."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from config.clock import business_today
from config.settings import Settings
from tests.conftest import settings_env
from tests.support import free_port, start, stop, wait_for

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
INCOMING = f"00-{TRACE_ID}-b7ad6b7169203331-01"


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: keeps every span with its service's name."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[tuple[str, Span]] = []
        self.paths: set[str] = set()


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        request = ExportTraceServiceRequest.FromString(
            self.rfile.read(int(self.headers["Content-Length"]))
        )
        self.server.paths.add(self.path)
        for resource_spans in request.resource_spans:
            names = [a.value.string_value for a in resource_spans.resource.attributes]
            keys = [a.key for a in resource_spans.resource.attributes]
            service = dict(zip(keys, names, strict=True)).get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                self.server.spans += [(service, span) for span in scope_spans.spans]
        body = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test reads what arrived, not the access log."""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:  # closed on the way out
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield server
        server.shutdown()


def test_spans_reach_the_otlp_endpoint_linked_across_processes(
    receiver: Receiver, tmp_path: Path
) -> None:
    settings = Settings(
        profile="embedded", data_dir=tmp_path / "data", port=free_port(), tracing="otlp"
    )
    env = settings_env(settings) | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms between exports
    }
    env.pop("OTEL_SERVICE_NAME", None)
    dev = start("e2e-tracing-dev", ["dev"], env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=10)
    try:

        def healthy() -> bool:
            try:
                return client.get("/api/v1/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 60, "API health ok")
        maturity = (business_today("UTC") + timedelta(days=30)).isoformat()
        reply = client.post(
            "/api/v1/trades",
            json={
                "trade_id": "TR-1",
                "version": 1,
                "counterparty_id": "CP-1",
                "book_id": "B1",
                "maturity_date": maturity,
            },
            headers={"traceparent": INCOMING},
        )
        assert reply.status_code == 202
        request_id = reply.json()["request_id"]
        wait_for(
            lambda: client.get(f"/api/v1/requests/{request_id}").json()["status"] == "SUCCESS",
            30,
            "the request's SUCCESS",
        )

        def api_span() -> Span | None:
            return next(
                (
                    s
                    for service, s in receiver.spans
                    if service == "trade-store-api" and s.name == "POST /api/v1/trades"
                ),
                None,
            )

        server = wait_for(api_span, 30, "the API's span at the OTLP endpoint")
        assert server.trace_id.hex() == TRACE_ID
        assert server.kind == Span.SPAN_KIND_SERVER

        def linked() -> Span | None:
            return next(
                (
                    s
                    for service, s in receiver.spans
                    if service == "trade-store-processor"
                    and any(link.span_id == server.span_id for link in s.links)
                ),
                None,
            )

        process = wait_for(linked, 30, "a processor span linked to the API's span")
        assert process.name == "process trades"
        assert process.kind == Span.SPAN_KIND_CONSUMER
        assert not process.parent_span_id
        assert receiver.paths == {"/v1/traces"}
    finally:
        client.close()
        assert stop(dev, signal.SIGINT) == 0
