"""The HTTP contract's pydantic models, kept apart from the domain's dataclasses."""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    WithJsonSchema,
)

from domain.message import ID_PATTERN, MAX_ID_LENGTH, MAX_VERSION, normalise_id, valid_id
from domain.ports import StoredTrade
from domain.status import BatchProgress, ReasonCode, RequestState, RequestStatus
from domain.trade import Trade


def _identifier(value: str) -> str:
    value = normalise_id(value)
    if not valid_id(value):
        raise ValueError(ID_RULE)
    return value


ID_RULE = (
    f"1–{MAX_ID_LENGTH} characters after trimming and NFC normalisation: no control, format,"
    ' private-use or separator characters (the space only inside), no "/"'
)
# The grammar as the API reads it: surrounding whitespace is trimmed. Python ``re`` syntax
# (astral code points as \U escapes), which schemathesis generates from.
ID_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": rf"^\s*{ID_PATTERN}\s*$",
    "description": f"An id: {ID_RULE}.",
}
Identifier = Annotated[str, AfterValidator(_identifier), WithJsonSchema(ID_SCHEMA)]


def _whole_number(value: object) -> object:
    """JSON Schema's integer, which the OpenAPI document promises: 7 and 7.0 alike, never
    7.5, "7" or true."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _iso_date(value: object) -> object:
    """Only ISO dates (YYYY-MM-DD) as strings: no timestamps, no other formats."""
    if isinstance(value, date):
        return value
    if not isinstance(value, str) or not ISO_DATE.fullmatch(value):
        raise ValueError("must be an ISO date string, YYYY-MM-DD")
    return date.fromisoformat(value)


ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
IsoDate = Annotated[date, BeforeValidator(_iso_date)]


class TradeIn(BaseModel):
    """A trade version as submitted by an upstream system."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "trade_id": "T1",
                    "version": 1,
                    "counterparty_id": "CP-1",
                    "book_id": "B1",
                    "maturity_date": "2030-05-20",
                }
            ]
        },
    )

    trade_id: Identifier
    version: Annotated[StrictInt, Field(ge=1, le=MAX_VERSION), BeforeValidator(_whole_number)]
    counterparty_id: Identifier
    book_id: Identifier
    maturity_date: IsoDate
    created_date: IsoDate | None = Field(default=None, description="Defaults to today.")

    def to_domain(self, today: date) -> Trade:
        return Trade(
            trade_id=self.trade_id,
            version=self.version,
            counterparty_id=self.counterparty_id,
            book_id=self.book_id,
            maturity_date=self.maturity_date,
            created_date=self.created_date or today,
        )


class AcceptedOut(BaseModel):
    """The acknowledgement: the trade is durably queued; poll the Location for the outcome."""

    request_id: str
    status: RequestState = RequestState.PENDING
    trade_id: str
    version: int


class ItemResult(BaseModel):
    """One batch item's result: 202 with its request, or a 4xx with the problem."""

    index: int
    status: int
    request_id: str | None = None
    trade_id: str | None = None
    version: int | None = None
    problem: dict[str, Any] | None = None


class BatchAcceptedOut(BaseModel):
    """A batch's acknowledgement: every accepted item is durably queued and PENDING."""

    batch_id: str
    accepted: int
    rejected: int
    results: list[ItemResult]


class RequestOut(BaseModel):
    """A request's status as the client polls it."""

    request_id: str
    status: RequestState
    trade_id: str
    version: int
    failure_reason: str | None
    reason_code: ReasonCode | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, status: RequestStatus) -> RequestOut:
        return cls(
            request_id=status.request_id,
            status=status.state,
            trade_id=status.trade_id,
            version=status.version,
            failure_reason=status.failure_reason,
            reason_code=status.reason_code,
            created_at=status.created_at,
            updated_at=status.updated_at,
        )


class TradeOut(BaseModel):
    """One stored version of a trade."""

    trade_id: str
    version: int
    counterparty_id: str
    book_id: str
    maturity_date: date
    created_date: date
    expired: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, stored: StoredTrade) -> TradeOut:
        t = stored.trade
        return cls(
            trade_id=t.trade_id,
            version=t.version,
            counterparty_id=t.counterparty_id,
            book_id=t.book_id,
            maturity_date=t.maturity_date,
            created_date=t.created_date,
            expired=stored.expired,
            created_at=stored.created_at,
            updated_at=stored.updated_at,
        )


class HealthOut(BaseModel):
    """ "ok" only when every dependency answered; otherwise "degraded" with the failing part.
    With authentication on, the parts are shown to authenticated callers only."""

    status: str
    db: str | None = None
    kafka: str | None = None
    status_store: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details, with a machine-readable ``code`` and the offending ``field``."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    code: str
    field: str | None = None
    errors: list[dict[str, object]] | None = None


class RequestsOut(BaseModel):
    """Many requests' statuses at once, in the order asked; ``missing``: those unknown,
    expired or another client's."""

    requests: list[RequestOut]
    missing: list[str]


class BatchOut(BaseModel):
    """A batch's progress: ``total`` is its accepted items, each PENDING, SUCCESS or FAILED."""

    batch_id: str
    total: int
    pending: int
    success: int
    failed: int
    created_at: datetime

    @classmethod
    def of(cls, progress: BatchProgress) -> BatchOut:
        batch = progress.batch
        return cls(
            batch_id=batch.batch_id,
            total=batch.accepted,
            pending=progress.pending,
            success=progress.success,
            failed=progress.failed,
            created_at=batch.created_at,
        )


class BatchItemOut(BaseModel):
    """One accepted item of a batch: its position in the batch and its request's status."""

    index: int
    request_id: str
    trade_id: str
    version: int
    status: RequestState
    reason_code: ReasonCode | None
    failure_reason: str | None
