"""Poison records on real Kafka: each ends in the dead-letter topic exactly once, with its
source and reason, and the processor keeps deciding what follows."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from confluent_kafka import Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from adapters.kafka import HEADER_ROOM, ensure_topics, max_message_bytes
from adapters.sql import SqlTradeStore
from config.settings import Settings
from domain.message import MAX_REASON_CHARS, encode
from tests.conftest import unique
from tests.integration.test_processor import Processor, message
from tests.support import wait_for

BROKER_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588  # message.max.bytes of a broker left as shipped


def topic_limit(settings: Settings, topic: str) -> int:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    return max_message_bytes(admin, {topic}, 15)[topic]


def dead_letters(settings: Settings, wanted: int) -> list[Message]:
    """Every record of the DLQ once ``wanted`` have arrived, after a quiet second more."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": unique("dlq-reader")}
    )
    consumer.assign([TopicPartition(settings.dlq_topic, 0, 0)])
    got: list[Message] = []

    def enough() -> bool:
        got.extend(m for m in consumer.consume(10, 0.5) if m.error() is None)
        return len(got) >= wanted

    wait_for(enough, 90, f"{wanted} dead letters")
    got.extend(m for m in consumer.consume(10, 2) if m.error() is None)
    consumer.close()
    return got


def test_oversized_and_huge_reason_records_are_dead_lettered_once_and_the_flow_goes_on(
    migrated: Settings,
    tmp_path: Path,
    trade_store: SqlTradeStore,
) -> None:
    settings = migrated.model_copy(
        update={
            "inbound_topic": unique("inbound"),
            "dlq_topic": unique("dlq"),
            "recovery_dir": tmp_path / "recovery",
        }
    )
    bootstrap = settings.kafka_bootstrap_servers
    # The topics as an earlier version created them: the DLQ with the broker's default limit.
    ensure_topics(bootstrap, {settings.inbound_topic: 2, settings.dlq_topic: 1}, 1)
    assert topic_limit(settings, settings.dlq_topic) == BROKER_DEFAULT_MAX_MESSAGE_BYTES

    # Straight to the inbound topic, as a console producer with max.request.size raised would.
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "message.max.bytes": 4_000_000,
            "compression.type": "lz4",
        }
    )
    oversized = os.urandom(1_030_000)  # near the broker's limit: too large for a default DLQ
    compressible = b"x" * 3_000_000  # taken compressed, far over any DLQ limit uncompressed
    huge_reason = json.dumps({"schema_version": "v" * 500_000, "request_id": "r"}).encode()
    poison = {
        "oversized": oversized,
        "compressible": compressible,
        "huge-reason": huge_reason,
    }
    for name, value in poison.items():
        producer.produce(
            settings.inbound_topic,
            key=b"T-poison",
            value=value,
            partition=0,
            headers=[("request_id", str(uuid.uuid4()).encode()), ("poison", name.encode())],
        )
    behind = [message(unique("T"), 1) for _ in range(3)]
    for m in behind:
        producer.produce(
            settings.inbound_topic,
            key=m.trade.trade_id.encode(),
            value=encode(m),
            partition=0,
            headers=[("request_id", m.request_id.encode())],
        )
    assert producer.flush(30) == 0

    processor = Processor(settings)
    try:
        ids = {m.trade.trade_id for m in behind}
        wait_for(lambda: len(trade_store.heads(ids)) == 3, 90, "the records behind")
        letters = dead_letters(settings, len(poison))
        assert processor.proc.poll() is None, "the processor exited"
    finally:
        processor.stop()
    assert topic_limit(settings, settings.dlq_topic) == (
        BROKER_DEFAULT_MAX_MESSAGE_BYTES + HEADER_ROOM
    )
    by_name = {dict(m.headers())["poison"].decode(): m for m in letters}
    assert len(letters) == len(by_name) == len(poison)  # each exactly once
    offsets = {}
    for name, letter in by_name.items():
        headers = dict(letter.headers())
        assert headers["__connect.errors.topic"] == settings.inbound_topic.encode()
        assert headers["__connect.errors.partition"] == b"0"
        offsets[name] = int(headers["__connect.errors.offset"])
        assert len(headers["dlq_reason"].decode()) <= MAX_REASON_CHARS
    assert sorted(offsets.values()) == [0, 1, 2]

    whole = dict(by_name["oversized"].headers())
    assert by_name["oversized"].value() == oversized  # whole: the raised DLQ limit takes it
    assert "dlq_truncated" not in whole

    cut = by_name["compressible"]
    cut_headers = dict(cut.headers())
    assert cut_headers["dlq_truncated"] == b"true"
    request_header = len("request_id") + 36 + len("poison") + len("compressible")
    original = len(b"T-poison") + len(compressible) + request_header
    assert cut_headers["dlq_original_size"] == str(original).encode()
    value = cut.value()
    assert value is not None
    assert 0 < len(value) < BROKER_DEFAULT_MAX_MESSAGE_BYTES + HEADER_ROOM
    assert compressible.startswith(value)

    reason = dict(by_name["huge-reason"].headers())["dlq_reason"].decode()
    assert reason.startswith("unsupported schema_version 'vvv")
    assert len(reason) < 100  # the bad value is quoted clipped, not echoed
    assert by_name["huge-reason"].value() == huge_reason
