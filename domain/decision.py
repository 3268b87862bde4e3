"""The dataflow's decision on a message, the version rule applied in queue order, and the
outcome that follows once the store has spoken."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from domain.message import TradeMessage
from domain.status import Outcome, RequestState
from domain.trade import ReasonCode, Rejected, decide, head_after


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
