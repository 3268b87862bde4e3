"""Optional OpenTelemetry tracing (README "Tracing"), off unless ``TRADE_STORE_TRACING``.

The API's server span travels as W3C trace-context headers (``traceparent``,
``tracestate``) with every message it queues (``TradeMessage.trace``, opaque strings to the
domain); the processor opens one span per record batch, linked to each record's context,
the way opentelemetry-instrumentation-confluent-kafka links its consumer spans (links, not
a parent: a batch serves many traces). Off, ``tracer()`` is None, no span is made and no
header written. The process keeps a provider of its own rather than OpenTelemetry's global
one, which can be set only once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

Mode = Literal["off", "otlp"]
Carrier = tuple[tuple[str, str], ...]
"""Trace-context headers as (name, value) pairs: what a message carries."""

PROPAGATOR = TraceContextTextMapPropagator()
FIELDS = frozenset(PROPAGATOR.fields)  # traceparent, tracestate
# A batch span's links, at most: the SDK's own default span link limit, so none is dropped
# silently; the rest are counted in the span's trade_store.links_dropped.
MAX_LINKS = 128
SCOPE = "trade-store"


@dataclass
class _Active:
    provider: TracerProvider | None = None
    tracer: trace.Tracer | None = None


_active = _Active()  # the process's; empty while tracing is off


def configure(mode: Mode, service: str) -> None:
    """Export spans by OTLP/HTTP when ``mode`` says so, once per process: the exporter,
    its endpoint and the sampler come from the standard ``OTEL_*`` variables. A provider
    installed already (by a test) is kept."""
    if mode == "otlp" and _active.provider is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        install(OTLPSpanExporter(), service)


def install(exporter: SpanExporter, service: str, batched: bool = True) -> None:
    """Send this process's spans to ``exporter``: in batches off the caller's thread, or
    (``batched=False``, for tests) each as it ends."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    uninstall()
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if not os.environ.get("OTEL_SERVICE_NAME") and str(
        resource.attributes.get(SERVICE_NAME, "")
    ).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    provider = TracerProvider(resource=resource)
    processor = BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    _active.provider, _active.tracer = provider, provider.get_tracer(SCOPE)


def uninstall() -> None:
    """Flush and drop the provider: tracing is off again."""
    if _active.provider is not None:
        _active.provider.shutdown()
    _active.provider = _active.tracer = None


def tracer() -> trace.Tracer | None:
    """The process's tracer, or None when tracing is off."""
    return _active.tracer


def current_carrier() -> Carrier:
    """The current span's context as trace-context headers."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return tuple(carrier.items())


def carried(headers: Iterable[tuple[str, bytes | str | None]] | None) -> Carrier:
    """The trace-context headers among a queued record's headers."""
    return tuple(
        (name, value.decode("latin-1") if isinstance(value, bytes) else value)
        for name, value in headers or ()
        if name in FIELDS and value
    )


def _links(carriers: Iterable[Carrier]) -> tuple[list[trace.Link], int]:
    """A link to each distinct valid context (at most ``MAX_LINKS``), and how many more."""
    links: list[trace.Link] = []
    seen: set[Carrier] = set()
    dropped = 0
    for carrier in carriers:
        if not carrier or carrier in seen:
            continue
        seen.add(carrier)
        if len(links) == MAX_LINKS:
            dropped += 1
            continue
        context = trace.get_current_span(PROPAGATOR.extract(dict(carrier))).get_span_context()
        if context.is_valid:
            links.append(trace.Link(context))
    return links, dropped


def processing(carriers: Iterable[Carrier], count: int) -> AbstractContextManager[object]:
    """The span of one record batch of ``count`` records, linked to the records' contexts
    (``carriers``, read only when tracing is on); a no-op when it is off."""
    if _active.tracer is None:
        return nullcontext()
    return _processing(_active.tracer, carriers, count)


@contextmanager
def _processing(tracer: trace.Tracer, carriers: Iterable[Carrier], count: int) -> Iterator[object]:
    links, dropped = _links(carriers)
    attributes: dict[str, str | int] = {
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.batch.message_count": count,
        "trade_store.links_dropped": dropped,
    }
    with tracer.start_as_current_span(
        "process trades", kind=trace.SpanKind.CONSUMER, links=links, attributes=attributes
    ) as span:
        yield span
