"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path)."""

from __future__ import annotations

import time
import uuid

import structlog
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from domain.message import valid_id
from ingest_api.problems import problem_response

log = structlog.get_logger("ingest_api")
CORRELATION_HEADER = b"x-correlation-id"


def correlation_id_of(scope: Scope) -> str:
    """The caller's X-Correlation-ID when it is an id in ASCII, else a fresh one: header bytes
    are opaque (RFC 9110), and others would be echoed as what they decode to, re-encoded."""
    for name, value in scope.get("headers", ()):
        if name == CORRELATION_HEADER:
            candidate: str = value.decode("latin-1").strip()
            if candidate.isascii() and valid_id(candidate):
                return candidate
    return uuid.uuid4().hex


class CorrelationMiddleware:
    """Binds correlation_id to every log line of the request and echoes it back, with the
    time the app took to start answering (``Server-Timing: app;dur=<ms>``), so a client
    can tell the API's wait from its own and the network's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        correlation_id = correlation_id_of(scope)
        scope.setdefault("state", {})["correlation_id"] = correlation_id
        structlog.contextvars.bind_contextvars(correlation_id=correlation_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((CORRELATION_HEADER, correlation_id.encode()))
                took_ms = (time.perf_counter() - started) * 1000
                headers.append((b"server-timing", f"app;dur={took_ms:.1f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # Successes at debug: at thousands of requests/s an info line each is real CPU.
            (log.info if status >= 400 else log.debug)(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
            structlog.contextvars.unbind_contextvars("correlation_id")


BATCH_PATH = "/api/v1/trades/batch"
NDJSON = "application/x-ndjson"


def media_type(scope: Scope) -> str:
    """The request's Content-Type without its parameters, lower-cased."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media: str = value.decode("latin-1").split(";")[0].strip().lower()
            return media
    return ""


class BodyLimitMiddleware:
    """Answers 413 for bodies over ``max_bytes`` (a batch: ``batch_bytes``), whether declared
    or streamed. An NDJSON stream has no total: its route caps each line."""

    def __init__(self, app: ASGIApp, max_bytes: int, batch_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.batch_bytes = batch_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        if scope["path"] == BATCH_PATH:
            if media_type(scope) == NDJSON:
                await self.app(scope, receive, send)
                return
            limit = self.batch_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(limit)(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # Raised inside the app, so the exception handlers turn it into problem+json.
                raise HTTPException(413, _title(limit))
            return message

        await self.app(scope, limited_receive, send)


def _title(limit: int) -> str:
    return f"Request body exceeds {limit} bytes"


def _too_large(limit: int) -> Response:
    return problem_response(413, "PAYLOAD_TOO_LARGE", _title(limit))
