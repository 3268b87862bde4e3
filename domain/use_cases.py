"""The use cases, each a plain function over the ports it needs: admit and submit a POST's
trades (the API), record decisions and dead letters (the processor's sinks), page through
trades (the API's reads). The adapters only carry them out; the HTTP and Bytewax layers only
call them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime

from domain.idempotency import Answer, KeyRecord, replay
from domain.message import TradeMessage
from domain.ports import (
    DecisionLog,
    DecisionStore,
    Intake,
    Submission,
    TradeFilter,
    TradeReader,
)
from domain.status import Batch, Outcome, ReasonCode, RequestState, RequestStatus
from domain.trade import Decision, Rejected, Trade, check_maturity, decide_in_order, outcome_of


@dataclass(frozen=True, slots=True)
class Arrival:
    """Where a POST's trades come from: its correlation id, the business date and moment it
    arrived, the client that sent it (None: authentication is off) and the trace-context
    headers its messages carry (empty: tracing is off)."""

    correlation_id: str
    today: date
    now: datetime
    client_id: str | None = None
    trace: tuple[tuple[str, str], ...] = ()


Admitted = list[tuple[int, TradeMessage | Rejected]]


def admit(trades: Iterable[tuple[int, Trade]], arrival: Arrival) -> Admitted:
    """Each trade (with its position in the POST) refused at once if it matured before the
    business date, else given a request id: what the answer says before anything is written."""
    admitted: Admitted = []
    for index, trade in trades:
        rejected = check_maturity(trade, arrival.today)
        admitted.append(
            (
                index,
                rejected
                or TradeMessage(
                    request_id=str(uuid.uuid4()),
                    correlation_id=arrival.correlation_id,
                    accepted_on=arrival.today,
                    accepted_at=arrival.now,
                    trade=trade,
                    trace=arrival.trace,
                ),
            )
        )
    return admitted


async def submit(
    intake: Intake,
    admitted: Admitted,
    arrival: Arrival,
    batch: Batch | None = None,
    key: KeyRecord | None = None,
) -> Answer | None:
    """Make the admitted trades durable: PENDING (naming the client, who alone may read them
    back, and the batch) and queued, then the batch and the key with its answer. Return
    None; or, if the key was held already, the answer to replay, having queued nothing."""
    accepted = [
        (_pending(message, arrival, batch, index), message)
        for index, message in admitted
        if isinstance(message, TradeMessage)
    ]
    held = await intake.accept(Submission(accepted, batch, key))
    if held is None or key is None:
        return None
    return replay(held, key.fingerprint)


def _pending(
    message: TradeMessage, arrival: Arrival, batch: Batch | None, index: int
) -> RequestStatus:
    return RequestStatus(
        request_id=message.request_id,
        state=RequestState.PENDING,
        trade_id=message.trade.trade_id,
        version=message.trade.version,
        created_at=arrival.now,
        updated_at=arrival.now,
        client_id=arrival.client_id,
        batch_id=batch.batch_id if batch else None,
        batch_index=index if batch else None,
    )


def record_decisions(
    store: DecisionStore, decisions: Sequence[Decision], now: datetime
) -> list[Outcome]:
    """Apply and log a batch of decisions in one transaction; one outcome per input, in order.

    A request already in the log keeps its logged outcome and is not applied again, so a
    replay after a crash changes nothing: neither the store nor, since the outcome and its
    ``decided_at`` come back from the log, any status written from it.
    """
    if not decisions:
        return []
    ids = [d.message.request_id for d in decisions]
    with store.transaction() as log:
        logged = log.logged(ids)
        fresh: dict[str, Decision] = {}
        for d in decisions:
            if d.message.request_id not in logged:
                fresh.setdefault(d.message.request_id, d)
        outcomes = _apply_in_queue_order(log, list(fresh.values()), now)
        if outcomes:
            log.log(outcomes)
    by_id = logged | {o.request_id: o for o in outcomes}
    return [by_id[rid] for rid in ids]


def _apply_in_queue_order(
    log: DecisionLog, decisions: list[Decision], now: datetime
) -> list[Outcome]:
    """Upsert a batch's accepted trades and tell each request's outcome, as applying them
    one by one in queue order would: the accepted ones are decided again among themselves
    (a version below one accepted earlier in the batch was decided before that one reached
    the store, so it ends stale), and the store's guard refuses any below its head."""
    again = decide_in_order((d.message, None) for d in decisions if d.accepted)
    redecided = {d.message.request_id: d for d in again}
    final = [redecided.get(d.message.request_id, d) for d in decisions]
    stored = log.upsert([d.message.trade for d in final if d.accepted])
    return [
        replace(
            outcome_of(d, (d.message.trade.trade_id, d.message.trade.version) in stored),
            decided_at=now,
        )
        for d in final
    ]


def record_dead_letters(
    store: DecisionStore, failed: Sequence[Outcome], now: datetime
) -> list[Outcome]:
    """Log the FAILED outcomes of dead letters whose request is not decided yet; return
    those the status store should take (first logged now, or on a replay, before).

    A dead letter naming a request that was decided otherwise (a forged or reused
    request_id) changes nothing: that request keeps its logged outcome and status.
    """
    if not failed:
        return []
    with store.transaction() as log:
        logged = log.logged([o.request_id for o in failed])
        fresh: dict[str, Outcome] = {}
        for o in failed:
            if o.request_id not in logged:
                fresh.setdefault(o.request_id, replace(o, decided_at=now))
        if fresh:
            log.log(list(fresh.values()))
    ours = {rid: o for rid, o in logged.items() if o.reason_code is ReasonCode.INVALID_MESSAGE}
    return list((ours | fresh).values())


def trade_page(
    reader: TradeReader,
    after: tuple[str, int] | None,
    limit: int,
    where: TradeFilter,
    as_of: date,
) -> tuple[bytes, tuple[str, int] | None]:
    """Up to ``limit`` rows after the keyset cursor, as JSON, and the cursor of the next page
    if there is one: the key of this page's last row."""
    page = reader.encoded_page(after, limit, where, as_of)
    return page.body, page.last if page.more else None
