"""Builds each role's adapter from Settings: the one place that picks implementations.

The profile decides: "embedded" → SQLite files under data_dir; "services" → PostgreSQL,
Kafka and DynamoDB. Everything else in the codebase is the same for both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from adapters.dynamodb import DynamoStatusStore, make_client
from adapters.idempotency import DynamoKeys, ensure_key_schema, held_key
from adapters.inbound_log import PartitionCountMismatch, SqliteDeadLetters, SqliteInboundLog
from adapters.intake import PendingThenQueue, SqliteIntake
from adapters.kafka import INBOUND_TOPIC_CONFIG, KafkaDeadLetters, KafkaTradeQueue, ensure_topics
from adapters.sql import SqlTradeStore, make_engine
from adapters.sqlite_status import SqliteStatusStore
from config.settings import Settings
from domain.idempotency import KeyRecord
from domain.ports import Intake, Reachable, StatusReader, TradeReader
from domain.redrive import DeadLetterReader

log = structlog.get_logger("adapters")


def api_readers(settings: Settings) -> int:
    """Connections an API worker reads a store with at once: its read threads and health."""
    return settings.read_threads + 1


def trade_store(settings: Settings, reads_only: bool = False) -> SqlTradeStore:
    """``reads_only``: the API's, which needs no more connections than it reads with."""
    return SqlTradeStore(
        make_engine(
            settings.trade_store_url,
            api_readers(settings) if reads_only else settings.db_pool_size,
            settings.db_statement_timeout_ms,
            reads_only,
        )
    )


def status_store(settings: Settings) -> SqliteStatusStore | DynamoStatusStore:
    if settings.embedded:
        # In the inbound log's file: the API commits a PENDING record and its log entry at once.
        return SqliteStatusStore(
            inbound_log_path(settings), settings.status_ttl_days, api_readers(settings)
        )
    return DynamoStatusStore(
        make_client(settings.dynamodb_endpoint_url, settings.aws_region),
        settings.status_table,
        settings.status_ttl_days,
    )


def key_claims(settings: Settings) -> DynamoKeys:
    """The services profile's idempotency keys, in the status table (its own connections:
    claims are few, and never wait behind a batch of PENDING writes)."""
    return DynamoKeys(
        make_client(settings.dynamodb_endpoint_url, settings.aws_region, pool=8),
        settings.status_table,
        settings.status_ttl_days,
    )


def inbound_log_path(settings: Settings) -> Path:
    return settings.data_dir / "inbound.db"


def inbound_log(settings: Settings) -> SqliteInboundLog:
    return SqliteInboundLog(inbound_log_path(settings), settings.inbound_partitions)


def trade_queue(settings: Settings) -> KafkaTradeQueue:
    """The services profile's queue (embedded, the API appends through ``SqliteIntake``)."""
    return KafkaTradeQueue(
        settings.kafka_bootstrap_servers,
        settings.inbound_topic,
        settings.produce_timeout_ms,
        settings.producer_linger_ms,
    )


def _kept(retention: timedelta) -> dict[str, str]:
    return {"retention.ms": str(int(retention.total_seconds() * 1000))}


def create_topics(settings: Settings) -> list[str]:
    """Create the inbound queue and dead letters if missing; return what was created.

    The dead-letter topic is sized to take any inbound record plus its headers (and an
    existing one raised to that), so no record is too large to dead-letter whole. New
    topics keep records as long as the embedded profile does (``retention.ms``): the
    inbound topic no longer than the decision log remembers its requests, so a replay
    from the beginning never decides a forgotten request again.
    """
    if settings.embedded:
        inbound_log(settings).ensure_schema()
        return []
    return ensure_topics(
        settings.kafka_bootstrap_servers,
        {settings.inbound_topic: settings.inbound_partitions, settings.dlq_topic: 1},
        settings.replication_factor,
        dead_letters={settings.dlq_topic: settings.inbound_topic},
        configs={
            settings.inbound_topic: INBOUND_TOPIC_CONFIG | _kept(settings.inbound_retention),
            settings.dlq_topic: _kept(timedelta(days=settings.dead_letter_retention_days)),
        },
    )


def prepare_status_store(settings: Settings) -> str:
    """Create the status table (DynamoDB, TTL on) or schema (SQLite); return its name."""
    store = status_store(settings)
    if isinstance(store, SqliteStatusStore):
        store.ensure_schema()
        ensure_key_schema(store.path)
        store.adopt(settings.data_dir / "status.db")
        return str(store.path)
    store.ensure_table()
    return settings.status_table


@dataclass
class Services:
    """The adapters the API holds for its lifetime; ``queue`` is there for health only
    (the Kafka producer, or the embedded inbound log)."""

    trades: TradeReader
    statuses: StatusReader
    queue: Reachable
    intake: Intake
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()


def api_services(settings: Settings) -> Services:
    """The API's adapters; the queue is created if missing, as on the processor's first start."""
    try:
        create_topics(settings)
    except PartitionCountMismatch:
        raise  # the wrong setting, not an outage: never start on it
    except Exception as exc:  # the API still starts; health reports the queue
        log.warning("could not create the inbound queue", error=str(exc))
    statuses = status_store(settings)
    if isinstance(statuses, SqliteStatusStore):
        inbound = inbound_log(settings)
        intake = SqliteIntake(inbound, statuses, timedelta(days=settings.status_ttl_days))
        return Services(
            trade_store(settings, reads_only=True), statuses, inbound, intake, [intake.close]
        )
    queue = trade_queue(settings)
    return Services(
        trade_store(settings, reads_only=True),
        statuses,
        queue,
        PendingThenQueue(statuses, queue, key_claims(settings)),
        [queue.close, statuses.close],
    )


def dead_letters(settings: Settings) -> tuple[DeadLetterReader, str]:
    """The dead letters' reader, and the name of where they are kept (the topic, or the
    log file's table), which tells two stores' letter ids apart."""
    if settings.embedded:
        return SqliteDeadLetters(inbound_log_path(settings)), "dead_letters"
    return KafkaDeadLetters(
        settings.kafka_bootstrap_servers, settings.dlq_topic
    ), settings.dlq_topic


HeldKeys = Callable[[str], Coroutine[Any, Any, KeyRecord | None]]


def _redrive_key_days(settings: Settings) -> int:
    """A redrive's key lives as long as its dead letter can (and a status at least)."""
    return math.ceil(max(settings.status_ttl_days, settings.dead_letter_retention_days))


def held_keys(settings: Settings) -> HeldKeys:
    """Reads an idempotency key's record without claiming it (what a redrive holds)."""
    if settings.embedded:
        path = inbound_log_path(settings)

        async def held(key: str) -> KeyRecord | None:
            return held_key(path, key)

        return held
    client = make_client(settings.dynamodb_endpoint_url, settings.aws_region, pool=2)
    return DynamoKeys(client, settings.status_table, _redrive_key_days(settings)).held


@dataclass
class Redrive:
    """What ``trade-store dlq redrive`` submits through: the API's intake, its idempotency
    keys (one per redriven dead letter) kept as long as a dead letter is."""

    intake: Intake
    statuses: StatusReader
    held: HeldKeys
    closers: list[Callable[[], None]]

    def close(self) -> None:
        for close in self.closers:
            close()


def redrive(settings: Settings) -> Redrive:
    days = _redrive_key_days(settings)
    statuses = status_store(settings)
    if isinstance(statuses, SqliteStatusStore):
        intake = SqliteIntake(inbound_log(settings), statuses, timedelta(days=days))
        return Redrive(intake, statuses, held_keys(settings), [intake.close])
    queue = trade_queue(settings)
    client = make_client(settings.dynamodb_endpoint_url, settings.aws_region, pool=2)
    keys = DynamoKeys(client, settings.status_table, days)
    return Redrive(
        PendingThenQueue(statuses, queue, keys), statuses, keys.held, [queue.close, statuses.close]
    )
