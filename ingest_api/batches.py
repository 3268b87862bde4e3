"""The /api/v1/batches routes: a batch's progress and its items, as the status store
counts and lists them. Each handler's docstring is its OpenAPI description."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from domain.message import normalise_id, valid_id
from domain.ports import StatusReader
from domain.status import RequestState, RequestStatus
from ingest_api.auth import AUTHENTICATED, Client, sees
from ingest_api.deps import ReadsDep, ServicesDep, SettingsDep
from ingest_api.openapi import HEADERS, UNAVAILABLE, problem
from ingest_api.problems import ProblemError
from ingest_api.quotas import OVER_QUOTA, quota
from ingest_api.routes import READS_REQUESTS, PathId, read_statuses
from ingest_api.schemas import BatchItemOut, BatchOut

router = APIRouter(prefix="/api/v1")
UNKNOWN = problem("Unknown batch id, or another client's (code NOT_FOUND)")


def _unknown() -> ProblemError:
    return ProblemError(404, "NOT_FOUND", "No such batch", field="batch_id")


@router.get(
    "/batches/{batch_id}",
    operation_id="get_batch",
    response_model=BatchOut,
    responses={
        200: {
            "links": {
                "ListBatchItems": {
                    "operationId": "list_batch_items",
                    "parameters": {"batch_id": "$response.body#/batch_id"},
                }
            }
        },
        404: UNKNOWN,
        **AUTHENTICATED,
        **OVER_QUOTA,
        **UNAVAILABLE,
    },
    dependencies=[Depends(READS_REQUESTS), quota("reads")],
)
async def get_batch(
    batch_id: PathId,
    services: ServicesDep,
    settings: SettingsDep,
    client: Annotated[Client | None, Depends(READS_REQUESTS)],
    reads: ReadsDep,
) -> Response:
    """A batch's accepted items (`total`) counted by state, from its items' statuses."""
    batch_id = normalise_id(batch_id)
    progress = None
    if valid_id(batch_id):
        progress = await read_statuses(reads, settings, services.statuses.batch, batch_id)
    if progress is None or not sees(client, progress.batch):  # another's: as if unknown
        raise _unknown()
    body = orjson.dumps(BatchOut.of(progress).model_dump(mode="json"))
    return Response(body, 200, media_type="application/json")


def encode_index(index: int) -> str:
    """The opaque cursor of the page after the item at ``index``."""
    return base64.urlsafe_b64encode(json.dumps([index]).encode()).decode().rstrip("=")


def decode_index(cursor: str) -> int:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: nested too deep
        value = None
    if isinstance(value, list) and len(value) == 1 and type(value[0]) is int and value[0] >= 0:
        return value[0]
    raise ProblemError(400, "INVALID_CURSOR", "The 'after' cursor is not valid", field="after")


def _items(
    statuses: StatusReader,
    batch_id: str,
    state: RequestState | None,
    after: int | None,
    limit: int,
    client: Client | None,
) -> tuple[bytes, int | None] | None:
    """On a read thread: a page of the batch's items, encoded, and the next page's cursor
    (the last index shown, when more follow); None for an unknown batch or another's."""
    batch = statuses.batch_record(batch_id)
    if batch is None or not sees(client, batch):
        return None
    rows = statuses.batch_items(batch_id, state, after, limit + 1)
    following = rows[limit - 1].batch_index if len(rows) > limit else None
    return orjson.dumps([_item_fields(s) for s in rows[:limit]]), following


def _item_fields(status: RequestStatus) -> dict[str, Any]:
    """``BatchItemOut``'s JSON, built by orjson straight from the status (as the trade list
    does: a page is up to 1,000 items, and pydantic's models cost the event loop's time)."""
    return {
        "index": status.batch_index,
        "request_id": status.request_id,
        "trade_id": status.trade_id,
        "version": status.version,
        "status": status.state,
        "reason_code": status.reason_code,
        "failure_reason": status.failure_reason,
    }


@router.get(
    "/batches/{batch_id}/items",
    operation_id="list_batch_items",
    response_model=list[BatchItemOut],
    responses={
        200: {"headers": {"Link": HEADERS["Link"]}},
        400: problem("Invalid cursor (code INVALID_CURSOR)"),
        404: UNKNOWN,
        **AUTHENTICATED,
        **OVER_QUOTA,
        **UNAVAILABLE,
    },
    dependencies=[Depends(READS_REQUESTS), quota("reads")],
)
async def list_batch_items(
    batch_id: PathId,
    request: Request,
    services: ServicesDep,
    settings: SettingsDep,
    client: Annotated[Client | None, Depends(READS_REQUESTS)],
    reads: ReadsDep,
    state: RequestState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="Cursor from the Link header")] = None,
) -> Response:
    """A batch's accepted items by index (only those in `state`, if given), each with its
    request's status; `Link: rel="next"` pages."""
    batch_id = normalise_id(batch_id)
    cursor = decode_index(after) if after else None
    page = None
    if valid_id(batch_id):
        page = await read_statuses(
            reads, settings, _items, services.statuses, batch_id, state, cursor, limit, client
        )
    if page is None:
        raise _unknown()
    body, following = page
    headers = {}
    if following is not None:
        url = request.url.include_query_params(after=encode_index(following))
        headers["Link"] = f'<{settings.public_url(f"{url.path}?{url.query}")}>; rel="next"'
    return Response(body, 200, headers=headers, media_type="application/json")
