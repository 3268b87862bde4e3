"""A message with its decision, the outcome that follows once the store has spoken, and
the one way decisions are recorded."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

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


class DecisionLog(Protocol):
    """The primitives of recording decisions, all inside one transaction of the trade
    store: whatever the calls do commits together or not at all."""

    def logged(self, request_ids: Sequence[str]) -> dict[str, Outcome]:
        """The logged outcome of each of ``request_ids`` that has one."""
        ...

    def upsert(self, trades: Sequence[Trade]) -> set[tuple[str, int]]:
        """Upsert rows (the store's guard skips any below its head); the keys written."""
        ...

    def log(self, outcomes: Sequence[Outcome]) -> None:
        """Log outcomes of requests that have none (``decided_at`` set)."""
        ...


def record_decisions(log: DecisionLog, decided: Sequence[Decided], now: datetime) -> list[Outcome]:
    """Apply and log a batch of decisions; one outcome per input, in order.

    A request already in the log keeps its logged outcome and is not applied again, so a
    replay after a crash changes nothing: neither the store nor, since the outcome and its
    ``decided_at`` come back from the log, any status written from it.
    """
    ids = [d.message.request_id for d in decided]
    logged = log.logged(ids)
    fresh: dict[str, Decided] = {}
    for d in decided:
        if d.message.request_id not in logged:
            fresh.setdefault(d.message.request_id, d)
    outcomes = [
        replace(o, decided_at=now) for o in apply_in_queue_order(list(fresh.values()), log.upsert)
    ]
    if outcomes:
        log.log(outcomes)
    by_id = logged | {o.request_id: o for o in outcomes}
    return [by_id[rid] for rid in ids]


def record_dead_letters(
    log: DecisionLog, failed: Sequence[Outcome], now: datetime
) -> list[Outcome]:
    """Log the FAILED outcomes of dead letters whose request is not decided yet; return
    those the status store should take (first logged now, or on a replay, before).

    A dead letter naming a request that was decided otherwise (a forged or reused
    request_id) changes nothing: that request keeps its logged outcome and status.
    """
    logged = log.logged([o.request_id for o in failed])
    fresh: dict[str, Outcome] = {}
    for o in failed:
        if o.request_id not in logged:
            fresh.setdefault(o.request_id, replace(o, decided_at=now))
    if fresh:
        log.log(list(fresh.values()))
    ours = {rid: o for rid, o in logged.items() if o.reason_code is ReasonCode.INVALID_MESSAGE}
    return list((ours | fresh).values())
