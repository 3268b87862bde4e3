"""/docs (Swagger UI) and /redoc (ReDoc) from the files the fastapi-offline package ships,
pinned by the lock and served by the API itself: the pages load nothing from elsewhere, so
they work offline."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.responses import FileResponse, Response

from ingest_api.problems import ProblemError
from ingest_api.semantics import CACHEABLE_PREFIX

ASSETS = Path(fastapi_offline.__file__).parent / "static"
FILES = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"})


def install(app: FastAPI) -> None:
    """Add the two pages and their assets (the app is made with docs_url=redoc_url=None)."""
    openapi_url = app.openapi_url or "/openapi.json"
    favicon = f"{CACHEABLE_PREFIX}favicon.png"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> Response:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{CACHEABLE_PREFIX}swagger-ui-bundle.js",
            swagger_css_url=f"{CACHEABLE_PREFIX}swagger-ui.css",
            swagger_favicon_url=favicon,
            swagger_ui_parameters={"validatorUrl": None},  # no badge from an online validator
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> Response:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{CACHEABLE_PREFIX}redoc.standalone.js",
            redoc_favicon_url=favicon,
            with_google_fonts=False,
        )

    @app.get(CACHEABLE_PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in FILES:
            raise ProblemError(404, "NOT_FOUND", "No such file")
        return FileResponse(ASSETS / name)
