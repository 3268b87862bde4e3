"""The Kafka inbound queue: an idempotent acks=all producer and topic administration."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from adapters.batching import resolve
from config.logs import kafka_logger
from domain.message import TradeMessage, encode
from domain.ports import Unavailable


def producer_config(bootstrap: str, timeout_ms: int, linger_ms: int) -> dict[str, Any]:
    """Durable by construction: every in-sync replica acknowledges, retries never duplicate."""
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": linger_ms,
        "delivery.timeout.ms": timeout_ms,
        "request.timeout.ms": min(timeout_ms, 30_000),
        "socket.connection.setup.timeout.ms": max(1_000, min(timeout_ms, 10_000)),
        "compression.type": "lz4",
        "logger": kafka_logger(),
    }


def _settle(reports: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for acked, err in reports:
        failed = None if err is None else Unavailable(f"queue did not acknowledge: {err.str()}")
        resolve(acked, failed)


def headers_of(message: TradeMessage) -> list[tuple[str, str | bytes | None]]:
    return [
        ("request_id", message.request_id.encode()),
        ("correlation_id", message.correlation_id.encode()),
    ]


class KafkaTradeQueue:
    """Publishes trades keyed by trade_id, so one trade's messages share a partition.

    Delivery reports are served by one poll thread and handed to each event loop once per
    ``poll()`` (one wake-up for however many reports it served), not once per message.
    No timer per message either: librdkafka reports every message, delivered or failed,
    within ``delivery.timeout.ms``.
    """

    def __init__(self, bootstrap: str, topic: str, timeout_ms: int, linger_ms: int) -> None:
        self._topic = topic
        self._bootstrap = bootstrap
        self._timeout_s = timeout_ms / 1000
        self._producer = Producer(producer_config(bootstrap, timeout_ms, linger_ms))
        self._reports: list[tuple[asyncio.Future[None], KafkaError | None]] = []
        self._running = True
        self._poller = threading.Thread(target=self._poll, name="kafka-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        running = True
        while running:
            running = self._running  # one last round after close() has flushed
            self._producer.poll(0.05)  # runs _delivered for each report it serves
            if self._reports:
                reports, self._reports = self._reports, []
                by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
                for report in reports:
                    by_loop.setdefault(report[0].get_loop(), []).append(report)
                for loop, settled in by_loop.items():
                    with contextlib.suppress(RuntimeError):  # that loop has closed
                        loop.call_soon_threadsafe(_settle, settled)

    def _delivered(self, acked: asyncio.Future[None], err: KafkaError | None, _: Message) -> None:
        self._reports.append((acked, err))

    async def publish(self, message: TradeMessage) -> None:
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._producer.produce(
                self._topic,
                key=message.trade.trade_id.encode(),
                value=encode(message),
                headers=headers_of(message),
                on_delivery=partial(self._delivered, acked),
            )
        except (BufferError, KafkaException) as exc:
            raise Unavailable(f"queue refused the message: {exc}") from exc
        await acked

    def ping(self) -> None:
        try:
            meta = self._producer.list_topics(self._topic, timeout=2)
        except KafkaException as exc:
            raise Unavailable(f"kafka unavailable: {exc}") from exc
        topic = meta.topics.get(self._topic)
        if topic is None or topic.error is not None or not meta.brokers:
            raise Unavailable(f"kafka topic {self._topic} unavailable")

    def close(self) -> None:
        self._producer.flush(self._timeout_s)
        self._running = False
        self._poller.join(timeout=1)


def ensure_topics(
    bootstrap: str, topics: dict[str, int], replication_factor: int, timeout_s: float = 30
) -> list[str]:
    """Create the missing topics (name → partitions); return the names created."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": kafka_logger()})  # type: ignore[dict-item]
    existing = admin.list_topics(timeout=timeout_s).topics
    wanted = [
        NewTopic(name, num_partitions=parts, replication_factor=replication_factor)
        for name, parts in topics.items()
        if name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, request_timeout=timeout_s).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    return created
