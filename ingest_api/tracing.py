"""The API's server span (README "Tracing"): installed only when tracing is on.

A pure ASGI middleware, outermost: one span per request, the child of the caller's
``traceparent`` when it sent one (W3C trace context). Its context, as trace-context headers,
is left in the request's state for the submissions to queue with each message.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import tracing
from ingest_api.metrics import route_of

TRACE_KEY = "trace"  # scope["state"] entry: the server span's trace-context headers
_FIELDS = frozenset(name.encode() for name in tracing.FIELDS)


class TracingMiddleware:
    """A SERVER span per request, named by the route's template once it is known."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], tracer: trace.Tracer) -> None:
        self.app = app
        self.routes = [r for r in routes if hasattr(r, "path_format")]
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = {
            name.decode(): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in _FIELDS
        }
        method = scope["method"]
        status = 500  # unless an answer starts

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self.tracer.start_as_current_span(
            method,
            context=tracing.PROPAGATOR.extract(incoming),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        ) as span:
            state = scope.setdefault("state", {})
            state[TRACE_KEY] = tracing.current_carrier()
            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = route_of(self.routes, scope)
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if "correlation_id" in state:
                    span.set_attribute("trade_store.correlation_id", state["correlation_id"])
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
