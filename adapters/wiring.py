"""Builds each role's adapter from Settings; the one place that picks implementations."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from adapters.dynamodb import DynamoStatusStore, make_client
from adapters.kafka import KafkaTradeQueue, ensure_topics
from adapters.postgres import PostgresTradeStore, make_engine
from config.settings import Settings
from domain.ports import StatusStore, TradeQueue, TradeStore


def trade_store(settings: Settings) -> PostgresTradeStore:
    return PostgresTradeStore(
        make_engine(settings.database_url.get_secret_value(), settings.db_pool_size)
    )


def status_store(settings: Settings) -> DynamoStatusStore:
    return DynamoStatusStore(
        make_client(settings.dynamodb_endpoint_url, settings.aws_region),
        settings.status_table,
        settings.status_ttl_days,
    )


def trade_queue(settings: Settings) -> KafkaTradeQueue:
    return KafkaTradeQueue(
        settings.kafka_bootstrap_servers,
        settings.inbound_topic,
        settings.produce_timeout_ms,
        settings.producer_linger_ms,
    )


def create_topics(settings: Settings) -> list[str]:
    """Create trades-inbound and trades-dlq when missing; return the names created."""
    return ensure_topics(
        settings.kafka_bootstrap_servers,
        {settings.inbound_topic: settings.inbound_partitions, settings.dlq_topic: 1},
        settings.replication_factor,
    )


@dataclass
class Services:
    """The adapters the API holds for its lifetime."""

    trades: TradeStore
    statuses: StatusStore
    queue: TradeQueue
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()


def api_services(settings: Settings) -> Services:
    queue = trade_queue(settings)
    return Services(trade_store(settings), status_store(settings), queue, [queue.close])
