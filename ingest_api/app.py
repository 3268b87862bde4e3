"""The FastAPI application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from adapters.intake import BoundedIntake
from adapters.wiring import Services, api_services
from config.logs import configure_logging
from config.runtime import tune_gc, tune_switching
from config.settings import Settings, get_settings
from ingest_api import problems
from ingest_api.health import Health
from ingest_api.middleware import BodyLimitMiddleware, CorrelationMiddleware
from ingest_api.reads import ReadPool
from ingest_api.routes import router

log = structlog.get_logger("ingest_api")
# Beyond the produce timeout, so the queue's own delivery report decides when it can.
INTAKE_GRACE_S = 0.2


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
            settings.max_waiting_requests,
            settings.produce_timeout_ms / 1000 + INTAKE_GRACE_S,
        )
        app.state.reads = ReadPool(settings.read_threads, settings.max_waiting_reads)
        app.state.health = Health(app.state.services, settings.health_cache_seconds)
        tune_gc()
        tune_switching()
        log.info("api started")
        try:
            yield
        finally:
            app.state.reads.close()
            app.state.services.close()
            log.info("api stopped")

    app = FastAPI(
        title="Trade Store",
        version="0.1.0",
        summary="Ingest trade versions over REST; poll each request to SUCCESS or FAILED.",
        lifespan=lifespan,
    )
    problems.install(app, settings.retry_after_seconds)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(CorrelationMiddleware)
    app.include_router(router)
    return app
