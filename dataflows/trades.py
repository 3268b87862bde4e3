"""The trade dataflow: decode → look up heads → key by trade_id → decide → persist; dead
letters → their sink and their requests' FAILED statuses.

Each step is a module-level function over plain values, so it is testable without the
runtime; ``build_flow`` only wires them.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple, TypeGuard, cast

import structlog
from bytewax import operators as op
from bytewax.dataflow import Dataflow, Stream, operator
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink

from adapters.retry import until_available
from config import tracing
from domain.dead_letter import DeadLetter, dead_letter_outcome
from domain.deadline import appended_late, deadline_of
from domain.message import TradeMessage, UndecodableMessage, decode, request_id_of
from domain.ports import DecisionStore, OutcomeWriter
from domain.trade import Decision, decide_in_order
from sinks.metrics import DEAD_LETTERS, RECORDS_READ
from sinks.stores import DeadLetterStatusSink, TradeSink
from sources import RawRecord

log = structlog.get_logger("dataflows.trades")


class WithHead(NamedTuple):
    """A message and its trade_id's head (highest stored version) when it was looked up."""

    message: TradeMessage
    head: int | None


def _header(record: RawRecord, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name and value:
            return value.decode("utf-8", errors="replace")
    return None


def decode_record(record: RawRecord) -> TradeMessage | DeadLetter:
    """Parse a queued record; anything unusable becomes a dead letter, never an exception."""
    stamp = getattr(record, "timestamp", None)  # Kafka's (type, ms); the embedded log has none
    if stamp is not None and (late := appended_late(deadline_of(record.headers), stamp)):
        return _dead_letter(record, late, None)  # answered 503 and withdrawn: no status
    try:
        return decode(record.value)
    except UndecodableMessage as exc:  # only now are the headers read, to name its request
        return _dead_letter(record, exc.reason, request_id_of(exc, _header(record, "request_id")))


def _dead_letter(record: RawRecord, reason: str, request_id: str | None) -> DeadLetter:
    letter = DeadLetter(
        reason=reason,
        key=record.key,
        value=record.value,
        headers=list(record.headers or ()),
        request_id=request_id,
        correlation_id=_header(record, "correlation_id"),
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
    )
    DEAD_LETTERS.inc()
    log.warning(
        "dead letter",
        reason=reason,
        request_id=request_id,
        correlation_id=letter.correlation_id,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
    )
    return letter


def decode_batch(records: list[RawRecord]) -> list[TradeMessage | DeadLetter]:
    """``decode_record`` of each record of a batch, counted once per batch; with tracing
    on, each message takes its record's trace-context headers."""
    RECORDS_READ.inc(len(records))
    if tracing.tracer() is None:
        return [decode_record(r) for r in records]
    return [_traced(decode_record(r), r) for r in records]


def _traced(item: TradeMessage | DeadLetter, record: RawRecord) -> TradeMessage | DeadLetter:
    if isinstance(item, DeadLetter):
        return item
    return replace(item, trace=tracing.carried(record.headers))


def is_message(item: TradeMessage | DeadLetter) -> TypeGuard[TradeMessage]:
    """Typed, so the branch's ``trues`` stream is known to hold only messages."""
    return isinstance(item, TradeMessage)


@dataclass(frozen=True)
class Decoded:
    """What ``decode_records`` returns, as Bytewax's Kafka operators return ``KafkaOpOut``:
    a stream of what could be used and one of what could not."""

    messages: Stream[TradeMessage]
    dead_letters: Stream[DeadLetter]


@operator
def decode_records(step_id: str, up: Stream[RawRecord]) -> Decoded:
    """Decode every record (``decode_batch``), split into messages and dead letters."""
    split = op.branch("split", op.flat_map_batch("decode", up, decode_batch), is_message)
    # A TypeGuard types only the trues; decode_record returns nothing else but dead letters.
    return Decoded(split.trues, cast(Stream[DeadLetter], split.falses))


class HeadLookup:
    """Attaches its trade_id's head to each message: one query per batch."""

    def __init__(self, trades: Callable[[], DecisionStore]) -> None:
        self._factory = trades
        self._store: DecisionStore | None = None
        self._building = threading.Lock()  # the process's workers share this object

    def _shared_store(self) -> DecisionStore:
        with self._building:
            if self._store is None:
                self._store = self._factory()
            return self._store

    def __call__(self, messages: list[TradeMessage]) -> list[WithHead]:
        store = self._store or self._shared_store()
        ids = {m.trade.trade_id for m in messages}
        heads = until_available(lambda: store.heads(ids), "trade store lookup")
        return [WithHead(m, heads.get(m.trade.trade_id)) for m in messages]


KEY_SLOTS = 256


def key_slot(item: WithHead) -> str:
    """The key a message is routed by: one of ``KEY_SLOTS`` slots of its trade_id.

    Bytewax gives each key one worker and keeps each key's order, so every message of a
    trade_id is decided by one worker in queue order. Slots rather than raw trade_ids keep
    Bytewax's per-key bookkeeping (one logic object, one snapshot row each) bounded by 256
    however many trade_ids the flow sees.
    """
    return str(zlib.crc32(item.message.trade.trade_id.encode()) % KEY_SLOTS)


class DecideInOrder(StatefulBatchLogic[WithHead, Decision, None]):
    """Decides one key's share of a batch and keeps nothing afterwards.

    The store is the truth for a trade_id's head (looked up per batch). Keeping
    no state between batches keeps the processor's memory and Bytewax's recovery snapshots
    independent of how many trade_ids it has seen. A message decided while an earlier,
    higher version is still on its way to the store ends FAILED as stale all the same: the
    store's guard refuses it, or, when both reach the store in one batch, the batch is
    applied as if one by one in queue order (``domain.use_cases.record_decisions``).
    """

    def on_batch(self, values: list[WithHead]) -> tuple[list[Decision], bool]:
        return decide_in_order(values), StatefulBatchLogic.DISCARD

    def snapshot(self) -> None:
        """Never called: the logic is discarded after every batch."""


def build_flow(
    inbound: Callable[[Dataflow], Stream[RawRecord]],
    trades: Callable[[], DecisionStore],
    statuses: Callable[[], OutcomeWriter],
    dead_letters: Sink[DeadLetter],
) -> Dataflow:
    """Wire the trade dataflow from a source, store factories and a dead-letter sink.

    Each sink builds its own stores per worker; the head lookup builds one trade store per
    process, at its first batch, and the process's workers share it.
    """
    flow = Dataflow("trades")
    decoded = decode_records("decode", inbound(flow))

    with_heads = op.flat_map_batch("lookup-heads", decoded.messages, HeadLookup(trades))
    keyed = op.key_on("by-trade-id", with_heads, key_slot)
    decided = op.stateful_batch("decide", keyed, lambda _resume: DecideInOrder())
    op.output("store", op.key_rm("unkey", decided), TradeSink(trades, statuses))

    op.output("dead-letter", decoded.dead_letters, dead_letters)
    failed = op.filter_map("dead-letter-outcome", decoded.dead_letters, dead_letter_outcome)
    op.output("dead-letter-status", failed, DeadLetterStatusSink(trades, statuses))
    return flow
