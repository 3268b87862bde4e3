"""HTTP semantics the framework leaves out: HEAD on every GET route, OPTIONS and ``Allow``
from every route of a path (FastAPI makes one route per method, and its 405 names only the
first), the headers every answer carries, and CORS for an allow-list of origins."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingest_api.problems import problem_response

# Static files may be cached; API answers are per request and may not.
CACHEABLE_PREFIX = "/docs-assets/"
PROBED_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# What a browser script may read of an answer from another origin.
EXPOSED_HEADERS = (
    "Location",
    "Link",
    "X-Correlation-ID",
    "Retry-After",
    "Server-Timing",
    "RateLimit",
    "RateLimit-Policy",
    "Idempotent-Replayed",
)


def allowed_methods(router: Router, scope: Scope) -> list[str]:
    """The methods some route of this path answers (each asked of the routes, which may be
    nested routers, in a scope of its own), HEAD with GET, OPTIONS with any."""
    path = {"type": "http", "path": scope["path"], "root_path": scope.get("root_path", "")}
    methods = {
        method
        for method in PROBED_METHODS
        for route in router.routes
        if route.matches({**path, "method": method})[0] is Match.FULL
    }
    if "GET" in methods:
        methods.add("HEAD")
    if methods:
        methods.add("OPTIONS")
    return sorted(methods)


class HttpSemanticsMiddleware:
    """HEAD runs the GET route and drops the body (same status and headers); OPTIONS on a
    known path is 204 with ``Allow``; a 405 lists what the path really allows; every answer
    says ``X-Content-Type-Options: nosniff`` and, but for static assets, ``no-store``."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        cacheable = scope["path"].startswith(CACHEABLE_PREFIX)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if not cacheable:
                    headers["Cache-Control"] = "no-store"
                if message["status"] == 405:
                    headers["Allow"] = ", ".join(allowed_methods(self.router, scope))
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        if scope["method"] == "OPTIONS":
            allowed = allowed_methods(self.router, scope)
            if allowed:
                answer = Response(status_code=204, headers={"Allow": ", ".join(allowed)})
                await answer(scope, receive, send_with_headers)
                return
        if head:
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send_with_headers)


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered as a problem (it says which part:
    origin, method or headers) rather than in text/plain."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code != 400:
            return answer
        return problem_response(400, "CORS_REFUSED", bytes(answer.body).decode())


def add_cors(app: Starlette, origins: str) -> None:
    """CORS for a comma-separated allow-list of origins; for '' none at all (CORS off)."""
    allowed = [origin.strip() for origin in origins.split(",") if origin.strip()]
    if allowed:
        app.add_middleware(
            ProblemCORSMiddleware,
            allow_origins=allowed,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["Content-Type", "X-Correlation-ID", "Authorization", "X-API-Key"],
            expose_headers=EXPOSED_HEADERS,
        )
