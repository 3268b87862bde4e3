"""The interfaces the API and the dataflow need from the outside world, one per role.

Each has one real implementation per deployment profile in ``adapters/``; unit tests use
small hand-written fakes of these, not mocks.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Protocol

from domain.decided import Decided
from domain.message import TradeMessage
from domain.status import Outcome, RequestStatus
from domain.trade import Trade


class Unavailable(Exception):
    """A dependency is down or timing out; the caller may retry later."""


@dataclass(frozen=True, slots=True)
class StoredTrade:
    """A row of the trade store as read back: the trade plus its bookkeeping."""

    trade: Trade
    expired: bool
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class TradeFilter:
    """Optional filters of the trade listing."""

    book_id: str | None = None
    counterparty_id: str | None = None
    expired: bool | None = None


class TradeStore(Protocol):
    """Every stored version of every trade. Guards itself: never stores below its highest."""

    def highest_versions(self, trade_ids: Collection[str]) -> dict[str, int]:
        """The highest stored version of each of ``trade_ids`` that has any row."""
        ...

    def apply(self, trades: Sequence[Trade]) -> set[tuple[str, int]]:
        """Upsert in one transaction; return the (trade_id, version) keys actually written.

        A row below the stored highest version of its trade_id is skipped, not written.
        """
        ...

    def record(self, decided: Sequence[Decided]) -> list[Outcome]:
        """``record_decisions`` in one transaction: apply, log, one outcome per input."""
        ...

    def record_dead_letters(self, failed: Sequence[Outcome]) -> list[Outcome]:
        """``record_dead_letters`` in one transaction: the outcomes statuses should take."""
        ...

    def versions(self, trade_id: str, as_of: date) -> list[StoredTrade]:
        """Every stored version of one trade, ascending."""
        ...

    def page(
        self, after: tuple[str, int] | None, limit: int, where: TradeFilter, as_of: date
    ) -> list[StoredTrade]:
        """Up to ``limit`` rows after the keyset cursor, ordered by (trade_id bytes, version)."""
        ...

    def expire(self, as_of: date) -> int:
        """Flag rows whose maturity date is before ``as_of``; return how many changed."""
        ...

    def ping(self) -> None:
        """Raise Unavailable unless the store answers."""
        ...


class StatusStore(Protocol):
    """Request statuses by request_id. One contract for every implementation (proven by
    shared contract tests): a terminal state is never replaced by a different one; a
    rewrite of a terminal state is identical to the byte (its timestamps come from the
    decision log); a dead letter only moves a PENDING record to FAILED."""

    async def put_pending(self, status: RequestStatus) -> None:
        """Durably record a new request as PENDING; called before its trade is queued."""
        ...

    async def withdraw(self, request_id: str) -> None:
        """Delete a PENDING record whose trade could not be queued (never a terminal one)."""
        ...

    def complete(self, outcomes: Sequence[Outcome]) -> None:
        """Write logged outcomes: created when absent, over PENDING, never over a terminal
        state. ``updated_at`` is the outcome's ``decided_at``; expiry counts from it."""
        ...

    def fail_pending(self, outcomes: Sequence[Outcome]) -> None:
        """Dead letters' logged outcomes: move a PENDING record to FAILED, keeping its
        trade_id and version; an absent or terminal record is left as it is."""
        ...

    def get(self, request_id: str) -> RequestStatus | None: ...

    def ping(self) -> None: ...


class Intake(Protocol):
    """Takes in one accepted submission: its PENDING record and its queued trade."""

    async def accept(self, pending: RequestStatus, message: TradeMessage) -> None:
        """Return once both are durable; raise Unavailable and leave no PENDING behind."""
        ...


class TradeQueue(Protocol):
    """The durable inbound queue, keyed by trade_id."""

    async def publish(self, message: TradeMessage) -> None:
        """Return only once the queue has durably acknowledged the message."""
        ...

    def ping(self) -> None: ...
