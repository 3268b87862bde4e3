"""The interfaces the use cases need from the outside world, one per role and caller.

Implemented in ``adapters/`` (some by one adapter in both profiles, the SQL trade store;
some by one per profile) and, for unit tests, by the fakes in ``tests/fakes.py``, which
pass the same contract tests.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from domain.idempotency import KeyRecord
from domain.message import TradeMessage
from domain.status import Batch, BatchProgress, Outcome, RequestState, RequestStatus
from domain.trade import Trade


class Unavailable(Exception):
    """A dependency is down or timing out; the caller may retry later."""


class Overloaded(Exception):
    """Too much already waits on a dependency; the caller may retry after ``retry_after_s``."""

    def __init__(self, reason: str, retry_after_s: int | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class StoredTrade:
    """A row of the trade store as read back: the trade plus its bookkeeping."""

    trade: Trade
    expired: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EncodedPage:
    """A page of the trade listing as the store encoded it: ``body``, the JSON array of its
    rows as the API serves them; ``last``, the key (trade_id, version) of its last row when
    the page is full (as many rows as asked for), else None; and ``more``, whether rows
    follow it."""

    body: bytes
    last: tuple[str, int] | None
    more: bool


@dataclass(frozen=True, slots=True)
class TradeFilter:
    """Optional filters of the trade listing."""

    book_id: str | None = None
    counterparty_id: str | None = None
    expired: bool | None = None


class Reachable(Protocol):
    """What the API's health check asks of a dependency."""

    def ping(self) -> None:
        """Raise Unavailable unless it answers."""
        ...


class TradeReader(Protocol):
    """The API's read side of the trade store."""

    def versions(self, trade_id: str, as_of: date) -> list[StoredTrade]:
        """Every stored version of one trade, ascending."""
        ...

    def page(
        self, after: tuple[str, int] | None, limit: int, where: TradeFilter, as_of: date
    ) -> list[StoredTrade]:
        """Up to ``limit`` rows after the keyset cursor, ordered by (trade_id bytes, version)."""
        ...

    def encoded_page(
        self, after: tuple[str, int] | None, limit: int, where: TradeFilter, as_of: date
    ) -> EncodedPage:
        """``page``'s rows as the API's JSON, encoded by the store itself: a flood of reads
        then costs the API's interpreter nothing per row."""
        ...

    def ping(self) -> None:
        """Raise Unavailable unless the store answers."""
        ...


class DecisionLog(Protocol):
    """The primitives of recording decisions, all inside one transaction of the trade
    store: whatever the calls do commits together or not at all."""

    def logged(self, request_ids: Sequence[str]) -> dict[str, Outcome]:
        """The logged outcome of each of ``request_ids`` that has one."""
        ...

    def upsert(self, trades: Sequence[Trade]) -> set[tuple[str, int]]:
        """Upsert rows; the keys written. The store guards itself (a trigger, whoever
        writes): a row below the highest stored version of its trade_id is skipped."""
        ...

    def log(self, outcomes: Sequence[Outcome]) -> None:
        """Log outcomes of requests that have none (``decided_at`` set)."""
        ...


class DecisionStore(Protocol):
    """The processor's side of the trade store: heads to decide against, and one
    transaction per batch to record what was decided."""

    def heads(self, trade_ids: Collection[str]) -> dict[str, int]:
        """The highest stored version of each of ``trade_ids`` that has any row."""
        ...

    def transaction(self) -> AbstractContextManager[DecisionLog]:
        """One transaction: committed when the block ends, rolled back if it raises;
        an outage raises Unavailable."""
        ...


class TradeSweeps(Protocol):
    """The processor's housekeeping of the trade store."""

    def expire(self, as_of: date) -> int:
        """Flag rows whose maturity date is before ``as_of``; return how many changed."""
        ...

    def delete_outcomes(self, decided_before: datetime) -> int:
        """Forget decision-log rows decided before ``decided_before``; return how many."""
        ...


class PendingWriter(Protocol):
    """The API's writes to the status store: a request is PENDING before it is queued."""

    async def put_pending(self, status: RequestStatus) -> None:
        """Durably record a new request as PENDING; called before its trade is queued."""
        ...

    async def withdraw(self, request_id: str) -> None:
        """Delete a PENDING record whose trade could not be queued (never a terminal one)."""
        ...

    async def put_batch(self, batch: Batch) -> None:
        """Durably record a batch, once its accepted items are PENDING and queued."""
        ...


class OutcomeWriter(Protocol):
    """The processor's writes to the status store. One contract for every implementation
    (proven by shared contract tests): a terminal state is never replaced by a different
    one; a rewrite of a terminal state is identical to the byte (its timestamps come from
    the decision log); a dead letter only moves a PENDING record to FAILED."""

    def write_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Write logged outcomes: created when absent, over PENDING, never over a terminal
        state. ``updated_at`` is the outcome's ``decided_at``; expiry counts from it."""
        ...

    def fail_pending(self, outcomes: Sequence[Outcome]) -> None:
        """Dead letters' logged outcomes: move a PENDING record to FAILED, keeping its
        trade_id and version; an absent or terminal record is left as it is."""
        ...


class StatusReader(Protocol):
    """Request statuses by request_id, as clients poll them."""

    def get(self, request_id: str) -> RequestStatus | None:
        """The status, or None when unknown or expired."""
        ...

    def get_many(self, request_ids: Sequence[str]) -> dict[str, RequestStatus]:
        """The statuses of up to 100 requests in one round trip; unknown or expired ones
        are absent."""
        ...

    def batch(self, batch_id: str) -> BatchProgress | None:
        """A batch and its requests counted by state, or None when unknown or expired."""
        ...

    def batch_record(self, batch_id: str) -> Batch | None:
        """The batch as recorded, without counting its requests; None when unknown or
        expired (what a page of its items is checked against)."""
        ...

    def batch_items(
        self, batch_id: str, state: RequestState | None, after: int | None, limit: int
    ) -> list[RequestStatus]:
        """Up to ``limit`` of a batch's requests (in ``state``, if given) with a
        ``batch_index`` above ``after``, by ``batch_index``."""
        ...

    def ping(self) -> None:
        """Raise Unavailable unless the store answers."""
        ...


@dataclass(frozen=True, slots=True)
class Submission:
    """What one POST hands the intake: each accepted trade's PENDING record and queued
    message, the batch they came in (if any) and the idempotency key it holds (if any)."""

    accepted: Sequence[tuple[RequestStatus, TradeMessage]]
    batch: Batch | None = None
    key: KeyRecord | None = None


class Intake(Protocol):
    """Takes in one POST's accepted trades."""

    async def accept(self, submission: Submission) -> KeyRecord | None:
        """Return None once every PENDING record and message, then the batch and key
        records, are durable; or, when the key is held already, the held record, having
        written nothing. An outage raises Unavailable and leaves no PENDING record of a
        trade that was not queued."""
        ...


class TradeQueue(Protocol):
    """The durable inbound queue, keyed by trade_id."""

    async def publish(self, message: TradeMessage) -> None:
        """Return only once the queue has durably acknowledged the message."""
        ...

    def ping(self) -> None: ...
