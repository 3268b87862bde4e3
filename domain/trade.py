"""A trade, the version rule that decides whether a submitted version is stored, and the
decision on a message: the rule applied in queue order, and the outcome that follows once
the store has spoken."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

from domain.status import Outcome, ReasonCode, RequestState

if TYPE_CHECKING:  # a message carries a Trade: only its type is needed here
    from domain.message import TradeMessage


@dataclass(frozen=True, slots=True)
class Trade:
    """One version of a trade as submitted; (trade_id, version) identifies a stored row."""

    trade_id: str
    version: int
    counterparty_id: str
    book_id: str
    maturity_date: date
    created_date: date


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a version must not be stored: a machine-readable ``code`` and a sentence."""

    code: ReasonCode
    message: str


def maturity_passed(maturity_date: date, as_of: date) -> bool:
    """A trade whose maturity date is before the business date has matured."""
    return maturity_date < as_of


def check_maturity(trade: Trade, as_of: date) -> Rejected | None:
    """Reject a trade that matured before ``as_of``; used by the API and the dataflow alike."""
    if maturity_passed(trade.maturity_date, as_of):
        return Rejected(
            ReasonCode.MATURITY_PASSED,
            f"maturity_date {trade.maturity_date.isoformat()} is before {as_of.isoformat()}",
        )
    return None


def decide(head: int | None, trade: Trade, as_of: date) -> Rejected | None:
    """The version rule: decide a submitted version against its trade_id's head (the
    highest stored version, ``None`` when it has no row); ``None`` means store it.

    Lower than the head is stale; equal replaces that row; higher (or first) is a new row.
    A maturity date before ``as_of`` (the business date the request was accepted) is rejected.
    """
    if head is not None and trade.version < head:
        return Rejected(
            ReasonCode.STALE_VERSION,
            f"version {trade.version} is lower than stored version {head}",
        )
    return check_maturity(trade, as_of)


def head_after(head: int | None, trade: Trade, rejected: Rejected | None) -> int | None:
    """The head once ``trade`` has been stored, or not (``rejected``)."""
    if rejected is not None:
        return head
    return trade.version if head is None else max(head, trade.version)


@dataclass(frozen=True, slots=True)
class Decision:
    """A message and what was decided: store its trade (``rejected`` is None), or not."""

    message: TradeMessage
    rejected: Rejected | None = None

    @property
    def accepted(self) -> bool:
        return self.rejected is None


def decide_in_order(items: Iterable[tuple[TradeMessage, int | None]]) -> list[Decision]:
    """Messages decided in queue order, each against its trade_id's head (given with it,
    as stored when it was looked up) raised by the versions accepted before it."""
    heads: dict[str, int | None] = {}
    decisions = []
    for message, stored in items:
        trade = message.trade
        earlier = heads.get(trade.trade_id)
        head = stored if earlier is None else max(earlier, stored or 0)
        rejected = decide(head, trade, message.accepted_on)
        heads[trade.trade_id] = head_after(head, trade, rejected)
        decisions.append(Decision(message, rejected))
    return decisions


def outcome_of(decision: Decision, stored: bool) -> Outcome:
    """The request's final state given whether the store wrote its row.

    An accepted trade whose row the store refused (it already holds a higher version) is
    FAILED as stale: the store's guard has the last word.
    """
    message, trade = decision.message, decision.message.trade
    if decision.rejected is not None:
        code, reason = decision.rejected.code, decision.rejected.message
    elif stored:
        return Outcome(
            message.request_id,
            trade.trade_id,
            trade.version,
            RequestState.SUCCESS,
            accepted_at=message.accepted_at,
        )
    else:
        code = ReasonCode.STALE_VERSION
        reason = f"version {trade.version} is lower than a version already stored"
    return Outcome(
        message.request_id,
        trade.trade_id,
        trade.version,
        RequestState.FAILED,
        code,
        reason,
        message.accepted_at,
    )
