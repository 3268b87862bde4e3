"""The lifecycle of one submission, as the client polls it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class ReasonCode(StrEnum):
    """Why a request ended FAILED; machine-readable, stable across releases."""

    STALE_VERSION = "STALE_VERSION"
    MATURITY_PASSED = "MATURITY_PASSED"
    INVALID_MESSAGE = "INVALID_MESSAGE"


class RequestState(StrEnum):
    """PENDING until the dataflow decides; SUCCESS and FAILED are final."""

    PENDING = "PENDING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self is not RequestState.PENDING


@dataclass(frozen=True, slots=True)
class RequestStatus:
    """What ``GET /api/v1/requests/{request_id}`` shows."""

    request_id: str
    state: RequestState
    trade_id: str
    version: int
    created_at: datetime
    updated_at: datetime
    reason_code: ReasonCode | None = None
    failure_reason: str | None = None
    client_id: str | None = None  # who submitted it (None: authentication was off)
    batch_id: str | None = None  # the batch it came in, if any
    batch_index: int | None = None  # its position in that batch, from 0


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch submission: its accepted items are requests naming it (``batch_id``,
    ``batch_index``); items refused at the door have no request and are not counted."""

    batch_id: str
    created_at: datetime
    accepted: int
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """What ``GET /api/v1/batches/{batch_id}`` shows: the batch and its requests by state."""

    batch: Batch
    pending: int
    success: int
    failed: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final state of one request, as the dataflow writes it.

    ``decided_at`` is stamped by the decision log when the outcome is first logged, and
    read back from it on every replay: status writes take their timestamps from it, never
    from the clock, so rewriting a terminal status is identical to the byte.
    """

    request_id: str
    trade_id: str
    version: int
    state: RequestState
    reason_code: ReasonCode | None = None
    failure_reason: str | None = None
    accepted_at: datetime | None = None  # when the API accepted it; None if unreadable
    decided_at: datetime | None = field(default=None, kw_only=True)

    def logged_at(self) -> datetime:
        """When the decision log took this outcome; status stores write only logged ones."""
        if self.decided_at is None:
            raise ValueError(f"outcome of {self.request_id} was never logged")
        return self.decided_at

    def as_status(self) -> RequestStatus:
        """The terminal status it makes, every timestamp from the decision log."""
        decided = self.logged_at()
        return RequestStatus(
            request_id=self.request_id,
            state=self.state,
            trade_id=self.trade_id,
            version=self.version,
            created_at=self.accepted_at or decided,
            updated_at=decided,
            reason_code=self.reason_code,
            failure_reason=self.failure_reason,
        )

    def __post_init__(self) -> None:
        if not self.state.terminal:
            raise ValueError("an outcome is SUCCESS or FAILED")
