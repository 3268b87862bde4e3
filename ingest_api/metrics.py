"""The API's Prometheus metrics, served at ``GET /metrics`` (README "Metrics").

One pure ASGI middleware, outermost, times and counts every answer by route template
(never the raw path, so the series stay bounded), method and status. Refusals (429, 503)
are also counted by cause. With several uvicorn workers the values live in
prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, made fresh by
``serve``, see ingest_api.metrics_dir), so any worker's ``/metrics`` shows the sum of all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest_api.metrics_dir import MULTIPROC_ENV

# Seconds; from 1 ms (an embedded ack) to the produce timeout and beyond.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # the route label of a path no route has (a 404)
# A submission's answer once what it accepted is durable (a JSON batch: 207 if in part);
# an NDJSON stream's 200 starts before its lines are taken in, so it is no ack.
ACKED = frozenset({202, 207})
CAUSE_KEY = "refusal_cause"  # scope["state"] entry: what a 503 was about (problems.py)
# A refusal's cause by the problem's code; a 503 names its dependency instead.
CAUSES = {"RATE_LIMITED": "rate_limited", "OVERLOADED": "overloaded"}

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series: one more per series, read by no query here

REQUESTS = Counter(
    "trade_store_api_requests",
    "Answers by route template, method and status",
    ["route", "method", "status"],
)
DURATION = Histogram(
    "trade_store_api_request_duration_seconds",
    "From a request's arrival to the end of its answer",
    ["route", "method"],
    buckets=BUCKETS,
)
ACK = Histogram(
    "trade_store_api_ack_duration_seconds",
    "Submissions answered 202 or 207 (a batch in part): from arrival to the answer, i.e."
    " until what was accepted was durable",
    ["route"],
    buckets=BUCKETS,
)
IN_FLIGHT = Gauge(
    "trade_store_api_requests_in_flight",
    "Requests being answered now",
    multiprocess_mode="livesum",
)
REFUSALS = Counter(
    "trade_store_api_refusals",
    "429 and 503 answers by cause: rate_limited (a client's quota), overloaded (too much"
    " in flight on the intake or a read pool), connections (a worker's connection cap),"
    " degraded (health), else the dependency a 503 names",
    ["status", "cause"],
)


def route_of(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route that answered (``/api/v1/trades/{trade_id}``), as the
    router left it in the scope. HEAD and OPTIONS are answered on a copy of the scope
    (ingest_api.semantics), and a 404 has no route: only then are ``routes`` asked which
    one has this path."""
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    return str(getattr(route, "path_format", UNMATCHED))


def refusal_cause(status: int, body: bytes, state: dict[str, Any]) -> str:
    """Why a 429 or 503 was answered, from its problem document's code."""
    try:
        code = orjson.loads(body).get("code")
    except (orjson.JSONDecodeError, AttributeError):
        code = None
    if code == "SERVICE_UNAVAILABLE":
        return str(state.get(CAUSE_KEY, "dependency"))
    return CAUSES.get(code, "degraded" if status == 503 else "other")


def note_refusal(status: int, cause: str) -> None:
    """Count a refusal answered outside the app (the server's connection cap)."""
    REFUSALS.labels(str(status), cause).inc()


class MetricsMiddleware:
    """Counts and times every answer. Per request: the children of the label set are
    looked up in a dict of our own (prometheus-client's ``labels()`` costs more), and
    the body is read only for a 429 or a 503."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        # Only routes with a template: FastAPI wraps an included router in one without.
        self.routes = [r for r in routes if hasattr(r, "path_format")]
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._acks: dict[str, Any] = {}

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        method = scope["method"] if scope["method"] in METHODS else "other"
        key = (route_of(self.routes, scope), method, status)
        series = self._series.get(key)
        if series is None:
            series = (REQUESTS.labels(key[0], method, str(status)), DURATION.labels(*key[:2]))
            self._series[key] = series
        series[0].inc()
        series[1].observe(seconds)

    def _acked(self, scope: Scope, seconds: float) -> None:
        route = route_of(self.routes, scope)
        child = self._acks.get(route)
        if child is None:
            child = self._acks[route] = ACK.labels(route)
        child.observe(seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless an answer starts
        refused = False

        async def send_observed(message: Message) -> None:
            nonlocal status, refused
            if message["type"] == "http.response.start":
                status = message["status"]
                refused = status in (429, 503)
                if status in ACKED and scope["method"] == "POST":
                    self._acked(scope, time.perf_counter() - started)
            elif refused and message["type"] == "http.response.body":
                refused = False  # a problem document is one body message
                cause = refusal_cause(status, message.get("body", b""), scope.get("state", {}))
                note_refusal(status, cause)
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_observed)
        finally:
            IN_FLIGHT.dec()
            self._observe(scope, status, time.perf_counter() - started)


def exposition() -> bytes:
    """Every series of this API in the text format: of all workers when they share a
    multiprocess directory, else of this process (with its process_* and python_* ones)."""
    if MULTIPROC_ENV not in os.environ:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def metrics(_: Request) -> Response:
    """Prometheus text format; open like /api/v1/health/live (it names no client and no
    trade). Sync, so Starlette runs it on a thread: reading many workers' files takes ms."""
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


def worker_stopped() -> None:
    """Drop this worker's in-flight gauge from the shared directory (its counters stay)."""
    if MULTIPROC_ENV in os.environ:
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
