"""A message with its decision, and the outcome that follows once the store has spoken."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from domain.message import TradeMessage
from domain.status import Outcome, RequestState
from domain.trade import Accepted, Decision, ReasonCode, Rejected, Trade


@dataclass(frozen=True, slots=True)
class Decided:
    """A message and the dataflow's decision on it."""

    message: TradeMessage
    decision: Decision

    @property
    def accepted(self) -> bool:
        return isinstance(self.decision, Accepted)


def apply_in_queue_order(
    decided: Sequence[Decided], apply: Callable[[list[Trade]], set[tuple[str, int]]]
) -> list[Outcome]:
    """Apply a batch's accepted trades with ``apply`` (which returns the keys the store
    wrote) and tell each request's outcome, as applying them one by one in queue order
    would: a version below one accepted earlier in the batch for its trade_id was decided
    before that one reached the store, so it is not applied and ends FAILED as stale."""
    highest: dict[str, int] = {}
    applied: list[bool] = []
    for d in decided:
        trade = d.message.trade
        ok = d.accepted and trade.version >= highest.get(trade.trade_id, 0)
        if ok:
            highest[trade.trade_id] = trade.version
        applied.append(ok)
    stored = apply([d.message.trade for d, ok in zip(decided, applied, strict=True) if ok])
    return [
        outcome_of(d, ok and (d.message.trade.trade_id, d.message.trade.version) in stored)
        for d, ok in zip(decided, applied, strict=True)
    ]


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
