"""The /api/v1 routes. Each handler's docstring is its OpenAPI description."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from config.clock import business_today
from config.settings import Settings
from domain.message import normalise_id, valid_id, valid_version
from domain.ports import TradeFilter, Unavailable
from domain.use_cases import trade_page
from ingest_api.auth import (
    AUTHENTICATED,
    REQUESTS_READ,
    TRADES_READ,
    Client,
    authenticated,
    require,
    sees,
)
from ingest_api.deps import HealthDep, ReadsDep, ServicesDep, SettingsDep
from ingest_api.openapi import HEADERS, UNAVAILABLE, problem
from ingest_api.problems import ProblemError
from ingest_api.quotas import OVER_QUOTA, quota
from ingest_api.reads import ReadPool, versions_of
from ingest_api.schemas import (
    ID_SCHEMA,
    HealthOut,
    Identifier,
    RequestOut,
    RequestsOut,
    TradeOut,
)

router = APIRouter(prefix="/api/v1")
T = TypeVar("T")
# One callable per scope: listed first in a route's dependencies, so the caller is known
# before its quota is charged, and, asked again as a parameter, run once (FastAPI caches it).
READS_TRADES = require(TRADES_READ)
READS_REQUESTS = require(REQUESTS_READ)
# Path ids are looked up as the id grammar reads them; one outside it is simply not there.
PathId = Annotated[str, Path(json_schema_extra=ID_SCHEMA)]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return _encoded(status, orjson.dumps(body), headers)


def _encoded(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers=headers, media_type="application/json")


@router.get(
    "/requests/{request_id}",
    operation_id="get_request",
    response_model=RequestOut,
    responses={
        # From the status, not from the 202: the trade is stored once it is decided.
        200: {
            "links": {
                "GetTrade": {
                    "operationId": "get_trade",
                    "parameters": {"trade_id": "$response.body#/trade_id"},
                }
            }
        },
        404: problem("Unknown request id, or another client's (code NOT_FOUND)"),
        **AUTHENTICATED,
        **OVER_QUOTA,
        **UNAVAILABLE,
    },
    dependencies=[Depends(READS_REQUESTS), quota("reads")],
)
async def get_request(
    request_id: PathId,
    services: ServicesDep,
    settings: SettingsDep,
    client: Annotated[Client | None, Depends(READS_REQUESTS)],
    reads: ReadsDep,
) -> Response:
    """The status of one submission: PENDING, then SUCCESS or FAILED with a reason."""
    status = None
    request_id = normalise_id(request_id)
    if valid_id(request_id):
        # Bounded like a submission: a hung status store is a 503 in time.
        timeout_s = settings.produce_timeout_ms / 1000
        try:
            status = await asyncio.wait_for(reads.run(services.statuses.get, request_id), timeout_s)
        except TimeoutError:
            raise Unavailable(f"status store did not answer within {timeout_s:g} s") from None
    if status is None or not sees(client, status):  # another client's: as if unknown
        raise ProblemError(404, "NOT_FOUND", "No such request", field="request_id")
    return _json(200, RequestOut.of(status).model_dump(mode="json"))


# GET /api/v1/requests?ids=: as many as the status store reads in one round trip, none empty.
MAX_IDS = 100
IDS_PATTERN = rf"^[^,]+(?:,[^,]+){{0,{MAX_IDS - 1}}}$"


async def read_statuses(
    reads: ReadPool, settings: Settings, read: Callable[..., T], *args: Any
) -> T:
    """A status store read on the read threads, bounded like a submission: a hung status
    store is a 503 in time."""
    timeout_s = settings.produce_timeout_ms / 1000
    try:
        return await asyncio.wait_for(reads.run(read, *args), timeout_s)
    except TimeoutError:
        raise Unavailable(f"status store did not answer within {timeout_s:g} s") from None


@router.get(
    "/requests",
    operation_id="get_requests",
    response_model=RequestsOut,
    responses={**AUTHENTICATED, **OVER_QUOTA, **UNAVAILABLE},
    dependencies=[Depends(READS_REQUESTS), quota("reads")],
)
async def get_requests(
    services: ServicesDep,
    settings: SettingsDep,
    client: Annotated[Client | None, Depends(READS_REQUESTS)],
    reads: ReadsDep,
    ids: Annotated[
        str, Query(description=f"1 to {MAX_IDS} request ids, comma-separated", pattern=IDS_PATTERN)
    ],
) -> Response:
    """Many submissions' statuses in one call (one status store round trip), in the order
    asked, each once; `missing` lists the unknown, expired and other clients' ones (and any
    outside the id grammar, as it reads them)."""
    asked = list(dict.fromkeys(normalise_id(rid) for rid in ids.split(",")))
    wanted = [rid for rid in asked if valid_id(rid)]
    found = await read_statuses(reads, settings, services.statuses.get_many, wanted)
    shown = {rid: s for rid, s in found.items() if sees(client, s)}
    body = RequestsOut(
        requests=[RequestOut.of(shown[rid]) for rid in asked if rid in shown],
        missing=[rid for rid in asked if rid not in shown],
    )
    return _json(200, body.model_dump(mode="json"))


def encode_cursor(trade_id: str, version: int) -> str:
    raw = json.dumps([trade_id, version], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, int]:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: nested too deep
        value = None
    if (
        isinstance(value, list)
        and len(value) == 2
        and valid_id(value[0])
        and valid_version(value[1])
    ):
        return value[0], value[1]
    raise ProblemError(400, "INVALID_CURSOR", "The 'after' cursor is not valid", field="after")


@router.get(
    "/trades",
    operation_id="list_trades",
    response_model=list[TradeOut],
    responses={
        200: {"headers": {"Link": HEADERS["Link"]}},
        400: problem("Invalid cursor (code INVALID_CURSOR)"),
        **AUTHENTICATED,
        **OVER_QUOTA,
        **UNAVAILABLE,
    },
    dependencies=[Depends(READS_TRADES), quota("reads")],
)
async def list_trades(
    request: Request,
    settings: SettingsDep,
    reads: ReadsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="Cursor from the Link header")] = None,
    book_id: Identifier | None = None,
    counterparty_id: Identifier | None = None,
    expired: bool | None = None,
) -> Response:
    """Stored trade versions ordered by (trade_id bytes, version); `Link: rel="next"` pages."""
    body, following = await reads.trades(
        trade_page,
        decode_cursor(after) if after else None,
        limit,
        TradeFilter(book_id=book_id, counterparty_id=counterparty_id, expired=expired),
        business_today(settings.business_timezone),
    )
    headers = {}
    if following is not None:
        url = request.url.include_query_params(after=encode_cursor(*following))
        headers["Link"] = f'<{settings.public_url(f"{url.path}?{url.query}")}>; rel="next"'
    return _encoded(200, body, headers)


@router.get(
    "/trades/{trade_id}",
    operation_id="get_trade",
    response_model=list[TradeOut],
    responses={
        404: problem("No stored version (code NOT_FOUND)"),
        **AUTHENTICATED,
        **OVER_QUOTA,
        **UNAVAILABLE,
    },
    dependencies=[Depends(READS_TRADES), quota("reads")],
)
async def get_trade(trade_id: PathId, settings: SettingsDep, reads: ReadsDep) -> Response:
    """Every stored version of one trade, ascending."""
    trade_id = normalise_id(trade_id)
    body = None
    if valid_id(trade_id):
        today = business_today(settings.business_timezone)
        body = await reads.trades(versions_of, trade_id, today)
    if body is None:
        raise ProblemError(404, "NOT_FOUND", "No such trade", field="trade_id")
    return _encoded(200, body)


@router.get("/health/live")
async def liveness() -> Response:
    """The process answers; checks nothing else (for load balancers and restarts)."""
    return _json(200, {"status": "ok"})


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(health: HealthDep, known: Annotated[bool, Depends(authenticated)]) -> Response:
    """Whether writes can succeed: the queue takes appends (embedded: the inbound log's write
    lock is free; services: the producer has a broker connection up), the status store takes
    a write, and the trade store answers a query. Each probe's result is reused for
    HEALTH_CACHE_SECONDS. Each part only to an authenticated caller (when authentication is
    on), the overall state to anyone."""
    parts = await health.parts()
    healthy = all(v == "ok" for v in parts.values())
    shown = parts if known else {}
    return _json(200 if healthy else 503, {"status": "ok" if healthy else "degraded", **shown})
