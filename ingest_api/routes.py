"""The /api/v1 routes. Each handler's docstring is its OpenAPI description."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from config.clock import business_today, utc_now
from domain.message import valid_id, valid_version
from domain.ports import TradeFilter, Unavailable
from domain.status import RequestState
from domain.trade import Rejected
from domain.use_cases import accept, trade_page
from ingest_api.auth import (
    AUTHENTICATED,
    REQUESTS_READ,
    TRADES_READ,
    TRADES_WRITE,
    Client,
    authenticated,
    require,
    sees,
)
from ingest_api.deps import ServicesDep, SettingsDep
from ingest_api.problems import MEDIA_TYPE, ProblemError
from ingest_api.quotas import OVER_QUOTA, quota
from ingest_api.schemas import AcceptedOut, HealthOut, Problem, RequestOut, TradeIn, TradeOut

router = APIRouter(prefix="/api/v1")
# One callable per scope: listed first in a route's dependencies, so the caller is known
# before its quota is charged, and, asked again as a parameter, run once (FastAPI caches it).
WRITES_TRADES = require(TRADES_WRITE)
READS_TRADES = require(TRADES_READ)
READS_REQUESTS = require(REQUESTS_READ)
PROBLEM: dict[str, Any] = {"model": Problem, "content": {MEDIA_TYPE: {}}}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {**PROBLEM, "description": "A dependency is down; retry after Retry-After"}
}


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


@router.post(
    "/trades",
    status_code=202,
    response_model=AcceptedOut,
    responses={
        400: {**PROBLEM, "description": "Maturity date before today (code MATURITY_PASSED)"},
        413: {**PROBLEM, "description": "Body too large"},
        422: {**PROBLEM, "description": "Malformed or invalid body"},
        **AUTHENTICATED,
        **OVER_QUOTA,
        **UNAVAILABLE,
    },
    dependencies=[Depends(WRITES_TRADES), quota("writes")],
)
async def submit_trade(
    body: TradeIn,
    request: Request,
    services: ServicesDep,
    settings: SettingsDep,
    client: Annotated[Client | None, Depends(WRITES_TRADES)],
) -> Response:
    """Accept a trade version; 202 once it is durably queued and its request is PENDING."""
    today = business_today(settings.business_timezone)
    correlation_id = request.scope["state"]["correlation_id"]
    message = await accept(
        services.intake,
        body.to_domain(today),
        correlation_id,
        today,
        utc_now(),
        client.id if client else None,
    )
    if isinstance(message, Rejected):
        raise ProblemError(400, message.code.value, message.message, field="maturity_date")
    trade = message.trade
    return _json(
        202,
        {
            "request_id": message.request_id,
            "status": RequestState.PENDING.value,
            "trade_id": trade.trade_id,
            "version": trade.version,
        },
        {"Location": f"/api/v1/requests/{message.request_id}"},
    )


@router.get(
    "/requests/{request_id}",
    response_model=RequestOut,
    responses={
        404: {**PROBLEM, "description": "Unknown request id, or another client's"},
        **AUTHENTICATED,
        **OVER_QUOTA,
        **UNAVAILABLE,
    },
    dependencies=[Depends(READS_REQUESTS), quota("reads")],
)
async def get_request(
    request_id: str,
    services: ServicesDep,
    settings: SettingsDep,
    client: Annotated[Client | None, Depends(READS_REQUESTS)],
) -> Response:
    """The status of one submission: PENDING, then SUCCESS or FAILED with a reason."""
    status = None
    if valid_id(request_id):
        # Bounded like a submission: a hung status store is a 503 in time.
        timeout_s = settings.produce_timeout_ms / 1000
        try:
            status = await asyncio.wait_for(
                run_in_threadpool(services.statuses.get, request_id), timeout_s
            )
        except TimeoutError:
            raise Unavailable(f"status store did not answer within {timeout_s:g} s") from None
    if status is None or not sees(client, status):  # another client's: as if unknown
        raise ProblemError(404, "NOT_FOUND", f"No request {request_id}", field="request_id")
    return _json(200, RequestOut.of(status).model_dump(mode="json"))


def encode_cursor(trade_id: str, version: int) -> str:
    raw = json.dumps([trade_id, version], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, int]:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
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
    response_model=list[TradeOut],
    responses={
        400: {**PROBLEM, "description": "Invalid cursor"},
        **AUTHENTICATED,
        **OVER_QUOTA,
        **UNAVAILABLE,
    },
    dependencies=[Depends(READS_TRADES), quota("reads")],
)
def list_trades(
    request: Request,
    services: ServicesDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="Cursor from the Link header")] = None,
    book_id: str | None = None,
    counterparty_id: str | None = None,
    expired: bool | None = None,
) -> Response:
    """Stored trade versions ordered by (trade_id bytes, version); `Link: rel="next"` pages."""
    rows, following = trade_page(
        services.trades,
        decode_cursor(after) if after else None,
        limit,
        TradeFilter(book_id=book_id, counterparty_id=counterparty_id, expired=expired),
        business_today(settings.business_timezone),
    )
    headers = {}
    if following is not None:
        url = request.url.include_query_params(after=encode_cursor(*following))
        headers["Link"] = f'<{url}>; rel="next"'
    return _json(200, [TradeOut.of(r).model_dump(mode="json") for r in rows], headers)


@router.get(
    "/trades/{trade_id}",
    response_model=list[TradeOut],
    responses={
        404: {**PROBLEM, "description": "No stored version"},
        **AUTHENTICATED,
        **OVER_QUOTA,
        **UNAVAILABLE,
    },
    dependencies=[Depends(READS_TRADES), quota("reads")],
)
def get_trade(trade_id: str, services: ServicesDep, settings: SettingsDep) -> Response:
    """Every stored version of one trade, ascending."""
    rows = (
        services.trades.versions(trade_id, business_today(settings.business_timezone))
        if valid_id(trade_id)
        else []
    )
    if not rows:
        raise ProblemError(404, "NOT_FOUND", f"No trade {trade_id}", field="trade_id")
    return _json(200, [TradeOut.of(r).model_dump(mode="json") for r in rows])


async def _check(ping: Any, timeout_s: float = 3.0) -> str:
    try:
        await asyncio.wait_for(run_in_threadpool(ping), timeout_s)
    except (Unavailable, TimeoutError):
        return "unavailable"
    return "ok"


@router.get("/health/live")
async def liveness() -> Response:
    """The process answers; checks nothing else (for load balancers and restarts)."""
    return _json(200, {"status": "ok"})


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(services: ServicesDep, known: Annotated[bool, Depends(authenticated)]) -> Response:
    """Real checks of the trade store, the queue and the status store; each part only to an
    authenticated caller (when authentication is on), the overall state to anyone."""
    db, kafka, status_store = await asyncio.gather(
        _check(services.trades.ping), _check(services.queue.ping), _check(services.statuses.ping)
    )
    parts = {"db": db, "kafka": kafka, "status_store": status_store}
    healthy = all(v == "ok" for v in parts.values())
    shown = parts if known else {}
    return _json(200 if healthy else 503, {"status": "ok" if healthy else "degraded", **shown})
