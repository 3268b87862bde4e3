"""The trade-store and status-store sinks."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import structlog
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from adapters.retry import until_available
from config import tracing
from config.clock import utc_now
from domain.ports import DecisionStore, OutcomeWriter
from domain.status import Outcome, RequestState
from domain.trade import Decision
from domain.use_cases import record_dead_letters, record_decisions
from sinks import metrics

log = structlog.get_logger("sinks")


def log_outcomes(outcomes: list[Outcome], correlation: dict[str, str]) -> None:
    """One line per FAILED request (with its correlation id); successes only at debug (and
    not even built otherwise: thousands a second)."""
    debug = log.is_enabled_for(logging.DEBUG)
    for o in outcomes:
        if o.state is RequestState.FAILED:
            level = log.info
        elif debug:
            level = log.debug
        else:
            continue
        level(
            "request decided",
            request_id=o.request_id,
            correlation_id=correlation.get(o.request_id),
            trade_id=o.trade_id,
            version=o.version,
            status=o.state.value,
            reason_code=o.reason_code.value if o.reason_code else None,
        )


CHUNK = 1000


class _TradePartition(StatelessSinkPartition[Decision]):
    def __init__(self, trades: DecisionStore, statuses: OutcomeWriter) -> None:
        self._trades = trades
        self._statuses = statuses
        self._status_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outcomes")

    def _record(self, chunk: list[Decision]) -> list[Outcome]:
        metrics.BATCH_SIZE.observe(len(chunk))
        return until_available(
            lambda: metrics.timed_commit(lambda: record_decisions(self._trades, chunk, utc_now())),
            "trade store",
        )

    def _write_outcomes(self, chunk: list[Decision], outcomes: list[Outcome]) -> None:
        until_available(lambda: self._statuses.write_outcomes(outcomes), "status store")
        metrics.observe_written(chunk, time.time())
        metrics.count_decided(outcomes)
        log_outcomes(outcomes, {d.message.request_id: d.message.correlation_id for d in chunk})

    def write_batch(self, items: list[Decision]) -> None:
        """With tracing on, the batch is one span, linked to its messages' contexts."""
        with tracing.processing((d.message.trace for d in items), len(items)):
            self._write_chunks(items)

    def _write_chunks(self, items: list[Decision]) -> None:
        """Chunk by chunk: commit chunk n+1 while chunk n's outcomes are being written.

        Every outcome is written before this returns, so a recovery snapshot never covers a
        request whose status is still unwritten.
        """
        in_flight: Future[None] | None = None
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            outcomes = self._record(chunk)
            # Only now, with the rows committed, may any request say SUCCESS.
            if in_flight is not None:
                in_flight.result()
            in_flight = self._status_writer.submit(self._write_outcomes, chunk, outcomes)
        if in_flight is not None:
            in_flight.result()

    def close(self) -> None:
        self._status_writer.shutdown(wait=True)


class TradeSink(DynamicSink[Decision]):
    """Commits a batch's accepted rows in one transaction, then writes every outcome.

    At-least-once; idempotent by request_id (the decision log) and by (trade_id, version)
    in the store, so outcomes rewritten on replay are identical. Outages are retried with
    backoff, never dropped.
    """

    def __init__(
        self, trades: Callable[[], DecisionStore], statuses: Callable[[], OutcomeWriter]
    ) -> None:
        self._trades = trades
        self._statuses = statuses

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _TradePartition:
        return _TradePartition(self._trades(), self._statuses())


class _DeadLetterStatusPartition(StatelessSinkPartition[Outcome]):
    def __init__(self, trades: DecisionStore, statuses: OutcomeWriter) -> None:
        self._trades = trades
        self._statuses = statuses

    def write_batch(self, items: list[Outcome]) -> None:
        logged = until_available(
            lambda: record_dead_letters(self._trades, items, utc_now()),
            "trade store (decision log)",
        )
        until_available(lambda: self._statuses.fail_pending(logged), "status store")
        metrics.count_decided(logged)


class DeadLetterStatusSink(DynamicSink[Outcome]):
    """Fails the requests of dead letters, through the decision log like every decision:
    a request decided otherwise keeps its outcome, and only a PENDING status turns FAILED.
    At-least-once; idempotent (the log returns the same outcome on every replay)."""

    def __init__(
        self, trades: Callable[[], DecisionStore], statuses: Callable[[], OutcomeWriter]
    ) -> None:
        self._trades = trades
        self._statuses = statuses

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _DeadLetterStatusPartition:
        return _DeadLetterStatusPartition(self._trades(), self._statuses())
