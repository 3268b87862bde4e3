"""The OpenAPI document as the API really answers: errors as Problem documents under
application/problem+json, the headers every answer carries, query parameters that are
absent rather than null."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from ingest_api.problems import MEDIA_TYPE
from ingest_api.schemas import Problem

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
HEADERS: dict[str, dict[str, Any]] = {
    "Location": {
        "description": "The request to poll: a path, or a URL from TRADE_STORE_PUBLIC_BASE_URL",
        "required": True,
        "schema": {"type": "string"},
    },
    "Link": {
        "description": '`<url>; rel="next"` while more rows remain (a path, or a URL from '
        "TRADE_STORE_PUBLIC_BASE_URL)",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "required": True,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "X-Correlation-ID": {
        "description": "The caller's X-Correlation-ID when it is visible ASCII and an id, "
        "else a generated one; on every log line of the request",
        "required": True,
        "schema": {"type": "string"},
    },
    "Idempotent-Replayed": {
        "description": "`true` when this is the first answer to the Idempotency-Key, replayed",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Server-Timing": {
        "description": "`app;dur=<ms>`: how long the API took to start answering",
        "required": True,
        "schema": {"type": "string"},
    },
}
EVERY_ANSWER = ("X-Correlation-ID", "Server-Timing")


def problem(description: str, *headers: str) -> dict[str, Any]:
    """An error answer as the document states it: a Problem, with these headers."""
    answer: dict[str, Any] = {
        "description": description,
        "content": {MEDIA_TYPE: {"schema": PROBLEM_REF}},
    }
    if headers:
        answer["headers"] = {name: HEADERS[name] for name in headers}
    return answer


UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: problem("A dependency is down; retry after Retry-After", "Retry-After")
}


def _absent_not_null(parameter: dict[str, Any]) -> None:
    """An optional query parameter is left out, never sent as null."""
    schema = parameter.get("schema", {})
    options = [o for o in schema.get("anyOf", ()) if o != {"type": "null"}]
    if len(options) == 1 and len(schema["anyOf"]) == 2:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        parameter["schema"] = {**options[0], **rest}


def _complete(document: dict[str, Any]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema()
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body
        schemas.pop(unused, None)
    for path_item in document["paths"].values():
        for operation in path_item.values():
            for parameter in operation.get("parameters", ()):
                _absent_not_null(parameter)
            answers = operation["responses"]
            if "application/json" in answers.get("422", {}).get("content", {}):
                answers["422"] = problem("Invalid parameters (code VALIDATION_ERROR, field)")
            answers.setdefault("500", problem("A bug (code INTERNAL_ERROR), logged"))
            for answer in answers.values():
                headers = answer.setdefault("headers", {})
                for name in EVERY_ANSWER:
                    headers.setdefault(name, HEADERS[name])


def install(app: FastAPI) -> None:
    """Complete the generated document once, when it is first asked for."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        document = app.openapi_schema
        if document is None:
            document = generate()  # which FastAPI keeps as app.openapi_schema
            _complete(document)
        return document

    app.openapi = openapi  # type: ignore[method-assign]
