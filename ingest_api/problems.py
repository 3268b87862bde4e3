"""RFC 9457 problem+json: every error the API returns goes through here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from domain.idempotency import KeyInProgress, KeyReused
from domain.ports import Overloaded, Unavailable
from ingest_api.metrics import CAUSE_KEY

MEDIA_TYPE = "application/problem+json"
IDEMPOTENCY_KEY = "Idempotency-Key"
# The dependencies a 503 may name; an adapter's own error text stays in the log.
DEPENDENCIES = ("status store or queue", "status store", "inbound log", "trade store", "queue")


class ProblemError(Exception):
    """Raise from a route to answer with a problem document."""

    def __init__(self, status: int, code: str, title: str, field: str | None = None) -> None:
        super().__init__(title)
        self.status = status
        self.code = code
        self.title = title
        self.field = field


def problem_body(
    status: int,
    code: str,
    title: str,
    *,
    detail: str | None = None,
    field: str | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A problem document (also one batch item's, inside the batch's answer)."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "code": code}
    if detail is not None:
        body["detail"] = detail
    if field is not None:
        body["field"] = field
    if errors is not None:
        body["errors"] = errors
    return body


def problem_response(
    status: int,
    code: str,
    title: str,
    *,
    detail: str | None = None,
    field: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = problem_body(status, code, title, detail=detail, field=field, errors=errors)
    return Response(orjson.dumps(body), status, headers=headers, media_type=MEDIA_TYPE)


def invalid(errors: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The 422 VALIDATION_ERROR document for pydantic's errors, the first one's field named."""
    listed = [
        {"field": _field_of(tuple(e.get("loc", ()))), "type": e.get("type"), "msg": e.get("msg")}
        for e in errors
    ]
    first = listed[0] if listed else {}
    return problem_body(
        422,
        "VALIDATION_ERROR",
        "Request is invalid",
        detail=str(first.get("msg")) if first else None,
        field=first.get("field"),
        errors=listed,
    )


MALFORMED_JSON = problem_body(
    422, "MALFORMED_JSON", "Request body is not valid JSON", detail="JSON decode error"
)


def log_error(event: str, **fields: Any) -> None:
    """Every 5xx is logged at error. The logger is looked up now, not cached at import, so it
    renders with the logging set-up in force."""
    structlog.get_logger("ingest_api").error(event, **fields)


def malformed_json() -> Response:
    """Every way a body can fail to decode (syntax, UTF-8, nesting depth, an integer too
    long for Python) is the same answer."""
    return Response(orjson.dumps(MALFORMED_JSON), 422, media_type=MEDIA_TYPE)


def _field_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def dependency_of(exc: Exception) -> str:
    """Which dependency an Unavailable is about, by the name its message starts with."""
    text = str(exc)
    return next((name for name in DEPENDENCIES if text.startswith(name)), "dependency")


class UnexpectedErrorMiddleware:
    """A bug is a 500 problem with a generic detail, logged at error with its traceback
    (and, bound by the correlation middleware outside, the request's correlation id)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            log_error("unexpected error", method=scope["method"], path=scope["path"], exc_info=exc)
            if not started:
                await problem_response(
                    500,
                    "INTERNAL_ERROR",
                    "Internal server error",
                    detail="An unexpected error; it is logged with this X-Correlation-ID",
                )(scope, receive, send)


def install(app: FastAPI, retry_after_seconds: int) -> None:
    """Map validation errors, HTTP errors, domain rejections and outages to problem+json."""

    async def on_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":
            return malformed_json()
        return Response(orjson.dumps(invalid(errors)), 422, media_type=MEDIA_TYPE)

    async def on_problem(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProblemError)
        return problem_response(exc.status, exc.code, exc.title, field=exc.field)

    async def on_unavailable(request: Request, exc: Exception) -> Response:
        log_error("dependency unavailable", error=str(exc))
        request.scope.setdefault("state", {})[CAUSE_KEY] = dependency_of(exc)
        return problem_response(
            503,
            "SERVICE_UNAVAILABLE",
            "A dependency is unavailable; retry later",
            detail=f"The {dependency_of(exc)} is unavailable or did not answer in time",
            headers={"Retry-After": str(retry_after_seconds)},
        )

    async def on_overloaded(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, Overloaded)
        return problem_response(
            429,
            "OVERLOADED",
            "Too much is waiting already; retry after Retry-After",
            detail=str(exc),
            headers={"Retry-After": str(exc.retry_after_s or retry_after_seconds)},
        )

    async def on_key_reused(_: Request, exc: Exception) -> Response:
        return problem_response(
            422,
            "IDEMPOTENCY_KEY_REUSED",
            "This Idempotency-Key was first sent with another request",
            field=IDEMPOTENCY_KEY,
        )

    async def on_key_in_progress(_: Request, exc: Exception) -> Response:
        return problem_response(
            409,
            "IDEMPOTENCY_IN_PROGRESS",
            "The request that first sent this Idempotency-Key is still being taken in",
            field=IDEMPOTENCY_KEY,
            headers={"Retry-After": "1"},
        )

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
            return malformed_json()  # FastAPI's 400 for what json.loads raised
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}.get(
            exc.status_code, "HTTP_ERROR"
        )
        return problem_response(
            exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None)
        )

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(Unavailable, on_unavailable)
    app.add_exception_handler(Overloaded, on_overloaded)
    app.add_exception_handler(KeyReused, on_key_reused)
    app.add_exception_handler(KeyInProgress, on_key_in_progress)
    app.add_exception_handler(HTTPException, on_http)
