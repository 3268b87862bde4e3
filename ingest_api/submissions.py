"""The write routes: one trade (``POST /api/v1/trades``) or many (``POST
/api/v1/trades/batch``, a JSON batch or an NDJSON stream), each acknowledged once durable,
and each, with an ``Idempotency-Key``, taken in at most once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from config.clock import business_today, utc_now
from config.settings import Settings
from domain.idempotency import Answer, KeyRecord, fingerprint, scoped, valid_key
from domain.message import TradeMessage
from domain.ports import Overloaded, Unavailable
from domain.status import Batch, RequestState
from domain.trade import Rejected, Trade
from domain.use_cases import Admitted, Arrival, admit, submit
from ingest_api.auth import AUTHENTICATED, TRADES_WRITE, Client, require
from ingest_api.deps import ServicesDep, SettingsDep
from ingest_api.middleware import NDJSON, media_type
from ingest_api.openapi import HEADERS, UNAVAILABLE, problem
from ingest_api.problems import (
    IDEMPOTENCY_KEY,
    MALFORMED_JSON,
    ProblemError,
    invalid,
    problem_body,
)
from ingest_api.quotas import OVER_QUOTA, RateLimited, charge, quota
from ingest_api.schemas import AcceptedOut, BatchAcceptedOut, TradeIn
from ingest_api.tracing import TRACE_KEY

log = structlog.get_logger("ingest_api")
router = APIRouter(prefix="/api/v1")
WRITES_TRADES = require(TRADES_WRITE)
WRITER = Annotated[Client | None, Depends(WRITES_TRADES)]
KEYED: dict[int | str, dict[str, Any]] = {
    409: problem("The key's first request is still being taken in (IDEMPOTENCY_IN_PROGRESS)"),
    429: problem(
        "Over quota (RATE_LIMITED) or too many trades in flight (OVERLOADED)", "Retry-After"
    ),
}
REPLAYED = "Idempotent-Replayed"
KEY_PARAMETER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Send a retry with the same key and body: the first answer comes again",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"},
}


def _arrival(request: Request, settings: Settings, client: Client | None) -> Arrival:
    return Arrival(
        correlation_id=request.scope["state"]["correlation_id"],
        today=business_today(settings.business_timezone),
        now=utc_now(),
        client_id=client.id if client else None,
        trace=request.scope["state"].get(TRACE_KEY, ()),
    )


def _key_header(request: Request) -> str | None:
    """The Idempotency-Key, if sent (as the draft's quoted sf-string, or bare)."""
    value = request.headers.get(IDEMPOTENCY_KEY)
    if value is None:
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not valid_key(value):
        raise ProblemError(
            400,
            "INVALID_IDEMPOTENCY_KEY",
            "An Idempotency-Key is 1 to 255 visible ASCII characters",
            field=IDEMPOTENCY_KEY,
        )
    return value


async def _keyed(request: Request, arrival: Arrival, answer: Answer) -> KeyRecord | None:
    """The key record this request would write, holding ``answer``; None without a key."""
    key = _key_header(request)
    if key is None:
        return None
    body = await request.body()  # already read for the route: cached
    return KeyRecord(
        key=scoped(arrival.client_id, key),
        fingerprint=fingerprint(request.url.path, media_type(request.scope), body),
        created_at=arrival.now,
        answer=answer,
        done=False,
    )


def _answered(answer: Answer, replayed: bool) -> Response:
    headers = {"Location": answer.location} if answer.location else {}
    if replayed:
        headers[REPLAYED] = "true"
    return Response(answer.body, answer.status, headers=headers, media_type="application/json")


async def _submitted(
    request: Request,
    services: ServicesDep,
    admitted: Admitted,
    arrival: Arrival,
    answer: Answer,
    batch: Batch | None = None,
) -> Response:
    """Take the admitted trades in and answer, or replay the key's first answer."""
    key = await _keyed(request, arrival, answer)
    first = await submit(services.intake, admitted, arrival, batch, key)
    return _answered(first or answer, first is not None)


def _accepted(message: TradeMessage) -> dict[str, Any]:
    return {
        "request_id": message.request_id,
        "status": RequestState.PENDING.value,
        "trade_id": message.trade.trade_id,
        "version": message.trade.version,
    }


@router.post(
    "/trades",
    operation_id="submit_trade",
    status_code=202,
    response_model=AcceptedOut,
    responses={
        202: {
            "headers": {"Location": HEADERS["Location"], REPLAYED: HEADERS[REPLAYED]},
            "links": {
                "GetRequest": {
                    "operationId": "get_request",
                    "parameters": {"request_id": "$response.body#/request_id"},
                }
            },
        },
        400: problem("Maturity date before today (MATURITY_PASSED), bad Idempotency-Key"),
        413: problem("Body too large (code PAYLOAD_TOO_LARGE)"),
        422: problem(
            "Body not JSON (MALFORMED_JSON) or invalid (VALIDATION_ERROR, field), or the"
            " Idempotency-Key was first sent with another body (IDEMPOTENCY_KEY_REUSED)"
        ),
        **AUTHENTICATED,
        **OVER_QUOTA,
        **KEYED,
        **UNAVAILABLE,
    },
    dependencies=[Depends(WRITES_TRADES), quota("writes")],
    openapi_extra={"parameters": [KEY_PARAMETER]},
)
async def submit_trade(
    body: TradeIn,
    request: Request,
    services: ServicesDep,
    settings: SettingsDep,
    client: WRITER,
) -> Response:
    """Accept a trade version; 202 once it is durably queued and its request is PENDING.
    With an `Idempotency-Key`, a retry gets the first answer again (`Idempotent-Replayed`)."""
    arrival = _arrival(request, settings, client)
    admitted = admit([(0, body.to_domain(arrival.today))], arrival)
    _, message = admitted[0]
    if isinstance(message, Rejected):
        raise ProblemError(400, message.code.value, message.message, field="maturity_date")
    location = settings.public_url(f"/api/v1/requests/{message.request_id}")
    answer = Answer(202, orjson.dumps(_accepted(message)), location)
    return await _submitted(request, services, admitted, arrival, answer)


def _parse(item: object, today: Any) -> Trade | dict[str, Any]:
    """One batch item as a trade, or the problem document that refuses it."""
    try:
        return TradeIn.model_validate(item).to_domain(today)
    except ValidationError as exc:
        return invalid(exc.errors())


def _result(index: int, outcome: TradeMessage | Rejected | dict[str, Any]) -> dict[str, Any]:
    if isinstance(outcome, TradeMessage):
        return {"index": index, **_accepted(outcome), "status": 202}
    if isinstance(outcome, Rejected):
        document = problem_body(400, outcome.code.value, outcome.message, field="maturity_date")
        return {"index": index, "status": 400, "problem": document}
    return {"index": index, "status": outcome["status"], "problem": outcome}


def _items(trades: list[Any], arrival: Arrival) -> tuple[Admitted, list[dict[str, Any]]]:
    """Parse and admit a batch's items; the trades admitted, and every item's result."""
    parsed = [_parse(item, arrival.today) for item in trades]
    admitted = admit(((i, t) for i, t in enumerate(parsed) if isinstance(t, Trade)), arrival)
    outcomes: dict[int, Any] = dict(enumerate(parsed)) | dict(admitted)
    return admitted, [_result(i, outcomes[i]) for i in range(len(parsed))]


def _envelope(raw: bytes, most: int) -> list[Any]:
    """The ``trades`` list of a JSON batch, or the 422 that refuses the whole batch."""
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProblemError(422, "MALFORMED_JSON", MALFORMED_JSON["title"]) from None
    if not isinstance(envelope, dict) or set(envelope) != {"trades"}:
        raise ProblemError(
            422, "VALIDATION_ERROR", 'A batch is an object with one member, "trades"', "trades"
        )
    trades = envelope["trades"]
    if not isinstance(trades, list) or not 1 <= len(trades) <= most:
        raise ProblemError(
            422, "VALIDATION_ERROR", f'"trades" is a list of 1 to {most} trades', "trades"
        )
    return trades


@router.post(
    "/trades/batch",
    operation_id="submit_batch",
    status_code=202,
    response_model=BatchAcceptedOut,
    responses={
        202: {
            "description": "Every item accepted",
            "headers": {"Location": HEADERS["Location"], REPLAYED: HEADERS[REPLAYED]},
        },
        207: {
            "description": "Some items refused (their results say why); the others accepted",
            "model": BatchAcceptedOut,
        },
        400: problem("Bad Idempotency-Key (INVALID_IDEMPOTENCY_KEY)"),
        413: problem("Body over MAX_BATCH_BYTES (code PAYLOAD_TOO_LARGE)"),
        415: problem("Neither application/json nor application/x-ndjson"),
        422: problem(
            "Not JSON (MALFORMED_JSON), a bad envelope (VALIDATION_ERROR, field trades), or"
            " the Idempotency-Key first sent with another body (IDEMPOTENCY_KEY_REUSED)"
        ),
        **AUTHENTICATED,
        **KEYED,
        **UNAVAILABLE,
    },
    dependencies=[Depends(WRITES_TRADES)],
    openapi_extra={
        "parameters": [KEY_PARAMETER],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["trades"],
                        "additionalProperties": False,
                        "properties": {
                            "trades": {
                                "type": "array",
                                "minItems": 1,
                                "description": "1 to BATCH_MAX_ITEMS (1000) trades",
                                # Any value: each is read as a TradeIn, and one
                                # that is not is refused in its result (207).
                                "items": {
                                    "description": "A trade (schema TradeIn); an item that"
                                    " is not one is refused in its own result, 400 or 422"
                                },
                            }
                        },
                    },
                },
                NDJSON: {"schema": {"type": "string", "description": "One trade (JSON) per line"}},
            },
        },
    },
)
async def submit_batch(
    request: Request, services: ServicesDep, settings: SettingsDep, client: WRITER
) -> Response:
    """Accept up to BATCH_MAX_ITEMS trade versions at once: 202 when every item was
    accepted, else 207, with one result per item in input order, once every accepted item
    is durably queued and PENDING. `application/x-ndjson`: one trade per line, any number
    of lines, answered as a stream of result lines (README "Feeds")."""
    kind = media_type(request.scope)
    if kind == NDJSON:
        if _key_header(request) is not None:
            raise ProblemError(
                400,
                "IDEMPOTENCY_KEY_NOT_SUPPORTED",
                "A stream's answer is too long to replay; resume it from its last result",
                field=IDEMPOTENCY_KEY,
            )
        return NdjsonStream(services, settings, client, request)
    if kind != "application/json":
        raise ProblemError(415, "UNSUPPORTED_MEDIA_TYPE", "Send application/json or " + NDJSON)
    trades = _envelope(await request.body(), settings.batch_max_items)
    charge(request, "writes", len(trades))
    arrival = _arrival(request, settings, client)
    admitted, results = _items(trades, arrival)
    batch = _batch(arrival, admitted)
    accepted = sum(1 for r in results if r["status"] == 202)
    body = {
        "batch_id": batch.batch_id,
        "accepted": accepted,
        "rejected": len(results) - accepted,
        "results": results,
    }
    location = settings.public_url(f"/api/v1/batches/{batch.batch_id}")
    answer = Answer(202 if accepted == len(results) else 207, orjson.dumps(body), location)
    return await _submitted(request, services, admitted, arrival, answer, batch)


def _batch(arrival: Arrival, admitted: Admitted) -> Batch:
    """A JSON batch's record: a new id, and how many of its items were admitted."""
    accepted = sum(1 for _, m in admitted if isinstance(m, TradeMessage))
    return Batch(str(uuid.uuid4()), arrival.now, accepted, arrival.client_id)


# An NDJSON stream is taken in a chunk of lines at a time: what arrived, up to this many.
STREAM_CHUNK_LINES = 1000
# How long a stream waits, in all, for room when its worker is overloaded or over quota.
STREAM_PATIENCE_S = 30.0


class NdjsonStream(Response):
    """The answer to an NDJSON batch: the request body is read a chunk at a time as it
    arrives and each chunk's result lines are written once its trades are durable, so
    memory holds one chunk whatever the stream's length. Streamed by hand: Starlette's
    StreamingResponse would read the request's messages itself, looking for a disconnect.
    """

    media_type = NDJSON

    def __init__(
        self, services: Any, settings: Settings, client: Client | None, request: Request
    ) -> None:
        super().__init__(status_code=200, media_type=NDJSON)
        self._services = services
        self._settings = settings
        self._client = client
        self._request = request
        self._started = utc_now()
        self.batch_id = str(uuid.uuid4())
        self._admitted = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        location = self._settings.public_url(f"/api/v1/batches/{self.batch_id}")
        self.headers["Location"] = location
        # No Content-Length: the answer is as long as the stream (chunked).
        headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        counts = {"accepted": 0, "rejected": 0}
        summary: dict[str, Any] = {"batch_id": self.batch_id}
        # Two chunks at a time: the next one is parsed while the last one is committed.
        in_flight: list[asyncio.Task[list[dict[str, Any]]]] = []
        try:
            lines_of = _chunks(
                receive, self._settings.max_body_bytes, self._settings.body_timeout_s
            )
            async for lines in lines_of:
                in_flight.append(asyncio.ensure_future(self._take_in(lines)))
                if len(in_flight) > 1:
                    await _answer(send, await in_flight.pop(0), counts)
            while in_flight:
                await _answer(send, await in_flight.pop(0), counts)
        except (Unavailable, Overloaded, RateLimited, TimeoutError) as exc:
            log.warning("stream stopped", batch_id=self.batch_id, error=repr(exc))
            summary["error"] = _stream_error(exc)
        finally:
            for task in in_flight:
                task.cancel()
        summary |= counts
        await send({"type": "http.response.body", "body": orjson.dumps(summary) + b"\n"})

    async def _take_in(self, lines: list[tuple[int, bytes | None]]) -> list[dict[str, Any]]:
        """One chunk: parsed, admitted, durable (waiting for room while the worker is
        overloaded or the client over quota, up to ``STREAM_PATIENCE_S``); its results.
        The batch record counts the chunks admitted so far. Each chunk arrives when it is
        read: its trades' queue deadline counts from then, not from the stream's start."""
        arrival = _arrival(self._request, self._settings, self._client)
        parsed = {n: _parse_line(raw, arrival) for n, raw in lines}
        admitted = admit(((n, t) for n, t in parsed.items() if isinstance(t, Trade)), arrival)
        accepted = self._admitted + sum(1 for _, m in admitted if isinstance(m, TradeMessage))
        batch = Batch(self.batch_id, self._started, accepted, arrival.client_id)
        self._admitted = accepted
        waited = 0.0
        while True:
            try:
                charge(self._request, "writes", len(admitted))
                await submit(self._services.intake, admitted, arrival, batch)
                break
            except (Overloaded, RateLimited) as exc:
                pause = _pause_s(exc)
                if waited + pause > STREAM_PATIENCE_S:
                    raise
                waited += pause
                await asyncio.sleep(pause)
        outcomes: dict[int, Any] = parsed | dict(admitted)
        return [_result(n, outcomes[n]) for n, _ in lines]


async def _answer(send: Send, results: list[dict[str, Any]], counts: dict[str, int]) -> None:
    """Write a chunk's result lines and count them."""
    ok = sum(1 for r in results if r["status"] == 202)
    counts["accepted"] += ok
    counts["rejected"] += len(results) - ok
    await send({"type": "http.response.body", "body": _lines(results), "more_body": True})


def _pause_s(exc: Overloaded | RateLimited) -> float:
    if isinstance(exc, RateLimited):
        return float(exc.verdict.retry_after_s)
    return min(float(exc.retry_after_s or 1), 1.0)


def _parse_line(raw: bytes | None, arrival: Arrival) -> Trade | dict[str, Any]:
    """One line as a trade, or the problem that refuses it."""
    if raw is None:
        return problem_body(413, "PAYLOAD_TOO_LARGE", "Line longer than MAX_BODY_BYTES")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return MALFORMED_JSON
    return _parse(value, arrival.today)


def _lines(results: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in results)


def _stream_error(exc: Exception) -> dict[str, Any]:
    """Why a stream ended early: the problem its unread lines would have got."""
    if isinstance(exc, Unavailable):
        return problem_body(503, "SERVICE_UNAVAILABLE", "A dependency is unavailable; retry later")
    if isinstance(exc, TimeoutError):
        return problem_body(
            408, "REQUEST_TIMEOUT", "No more of the stream came within BODY_TIMEOUT_S"
        )
    return problem_body(429, "OVERLOADED", "Too much is waiting already; retry later")


async def _chunks(
    receive: Receive, max_line: int, idle_s: float
) -> AsyncIterator[list[tuple[int, bytes | None]]]:
    """The body's lines as they arrive, numbered from 0, in chunks of at most
    ``STREAM_CHUNK_LINES``: what one read brought. Blank lines are numbered but not
    yielded; a line over ``max_line`` bytes is None (never held whole). A wait of more
    than ``idle_s`` for the next part raises TimeoutError (the server's total body
    timeout does not apply to a stream)."""
    partial = b""
    overlong = False
    number = 0
    more = True
    while more:
        message = await asyncio.wait_for(receive(), idle_s)
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
        *complete, partial = (partial + message.get("body", b"")).split(b"\n")
        if not more and partial:
            complete.append(partial)
            partial = b""
        chunk: list[tuple[int, bytes | None]] = []
        for raw in complete:
            if overlong or len(raw) > max_line:
                chunk.append((number, None))
                overlong = False
            elif raw.strip():
                chunk.append((number, raw))
            number += 1
        if len(partial) > max_line:
            partial, overlong = b"", True
        for at in range(0, len(chunk), STREAM_CHUNK_LINES):
            yield chunk[at : at + STREAM_CHUNK_LINES]
