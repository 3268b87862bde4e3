"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from adapters.intake import BoundedIntake
from adapters.wiring import Services, api_services
from config import tracing
from config.logs import configure_logging
from config.runtime import tune_gc, tune_switching
from config.settings import Settings, get_settings
from ingest_api import auth, batches, docs, metrics, openapi, problems, quotas, submissions
from ingest_api.health import Health
from ingest_api.middleware import BodyLimitMiddleware, CorrelationMiddleware
from ingest_api.problems import UnexpectedErrorMiddleware
from ingest_api.reads import read_pool
from ingest_api.routes import router
from ingest_api.semantics import HttpSemanticsMiddleware, add_cors
from ingest_api.tracing import TracingMiddleware

log = structlog.get_logger("ingest_api")
# Beyond the produce timeout, so the queue's own delivery report decides when it can.
INTAKE_GRACE_S = 0.2
# The longest Retry-After an overloaded worker asks for, however slowly it drains.
MOST_RETRY_AFTER_S = 30


def create_app(
    settings: Settings | None = None,
    services: Callable[[Settings], Services] = api_services,
) -> FastAPI:
    """Build the app; ``services`` makes the adapters at startup and they close at shutdown."""
    settings = settings or get_settings()
    # Also in uvicorn's worker processes, which never run our CLI's set-up.
    configure_logging(settings.log_level, settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.services = services(settings)
        app.state.services.intake = BoundedIntake(
            app.state.services.intake,
            "inbound log" if settings.embedded else "status store or queue",
            settings.max_in_flight,
            settings.produce_timeout_ms / 1000 + INTAKE_GRACE_S,
            MOST_RETRY_AFTER_S,
        )
        app.state.reads = read_pool(
            settings, app.state.services.trades, own_stores=services is api_services
        )
        await app.state.reads.warm()
        app.state.health = Health(app.state.services, settings.health_cache_seconds)
        tune_gc()
        tune_switching()
        log.info("api started")
        try:
            yield
        finally:
            app.state.reads.close()
            app.state.services.close()
            metrics.worker_stopped()
            log.info("api stopped")

    app = FastAPI(
        title="Trade Store",
        version="0.1.0",
        summary="Ingest trade versions over REST; poll each request to SUCCESS or FAILED.",
        lifespan=lifespan,
        docs_url=None,  # served from local files by ingest_api.docs
        redoc_url=None,
        redirect_slashes=False,  # a redirect would name another resource ("T%2F" → "T")
    )
    problems.install(app, settings.retry_after_seconds)
    auth.install(app, settings)
    quotas.install(app, settings)
    # Outermost last: CORS, correlation id, HTTP semantics, the catch-all 500, body limit.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        batch_bytes=settings.max_batch_bytes,
    )
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(HttpSemanticsMiddleware, router=app.router)
    app.add_middleware(CorrelationMiddleware)
    add_cors(app, settings.cors_origins)
    app.include_router(router)
    app.include_router(submissions.router)
    app.include_router(batches.router)
    app.add_route("/metrics", metrics.metrics, include_in_schema=False)
    docs.install(app)
    openapi.install(app)
    # Outermost of all, added once every route exists: it sees every answer.
    app.add_middleware(metrics.MetricsMiddleware, routes=[*router.routes, *app.router.routes])
    tracing.configure(settings.tracing, "trade-store-api")
    if (tracer := tracing.tracer()) is not None:  # off: not even a middleware
        app.add_middleware(TracingMiddleware, routes=app.router.routes, tracer=tracer)
    return app
