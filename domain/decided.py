"""A message with its decision, the version rule applied in queue order, and the outcome
that follows once the store has spoken."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from domain.message import TradeMessage
from domain.status import Outcome, RequestState
from domain.trade import Accepted, Decision, ReasonCode, Rejected, decide, next_highest


@dataclass(frozen=True, slots=True)
class Decided:
    """A message and the dataflow's decision on it."""

    message: TradeMessage
    decision: Decision

    @property
    def accepted(self) -> bool:
        return isinstance(self.decision, Accepted)


def decide_in_order(items: Iterable[tuple[TradeMessage, int | None]]) -> list[Decided]:
    """Messages decided in queue order, each against the highest version of its trade_id
    stored (given with it, ``None`` when it has no row) or accepted before it."""
    highest: dict[str, int | None] = {}
    decided = []
    for message, stored in items:
        trade = message.trade
        before = highest.get(trade.trade_id)
        known = stored if before is None else max(before, stored or 0)
        decision = decide(known, trade, message.accepted_on)
        highest[trade.trade_id] = next_highest(known, trade, decision)
        decided.append(Decided(message, decision))
    return decided


def outcome_of(decided: Decided, stored: bool) -> Outcome:
    """The request's final state given whether the store wrote its row.

    An accepted trade whose row the store refused (it already holds a higher version) is
    FAILED as stale: the store's guard has the last word.
    """
    message, trade = decided.message, decided.message.trade
    decision = decided.decision
    if isinstance(decision, Rejected):
        code, reason = decision.code, decision.message
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
