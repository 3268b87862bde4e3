"""A message with its decision, and the outcome that follows once the store has spoken."""

from __future__ import annotations

from dataclasses import dataclass

from domain.message import TradeMessage
from domain.status import Outcome, RequestState
from domain.trade import Accepted, Decision, ReasonCode, Rejected


@dataclass(frozen=True, slots=True)
class Decided:
    """A message and the dataflow's decision on it."""

    message: TradeMessage
    decision: Decision

    @property
    def accepted(self) -> bool:
        return isinstance(self.decision, Accepted)


def outcome_of(decided: Decided, stored: set[tuple[str, int]]) -> Outcome:
    """The request's final state given the keys the store actually wrote.

    An accepted trade whose row the store refused (it already holds a higher version) is
    FAILED as stale: the store's guard has the last word.
    """
    message, trade = decided.message, decided.message.trade
    decision = decided.decision
    if isinstance(decision, Rejected):
        code, reason = decision.code, decision.message
    elif (trade.trade_id, trade.version) in stored:
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
