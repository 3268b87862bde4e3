"""The Kafka producer: durable publish keyed by trade_id, headers, and outage behaviour."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient  # type: ignore[attr-defined]

from adapters import wiring
from adapters.kafka import INBOUND_TOPIC_CONFIG, KafkaTradeQueue, ensure_topics, topic_configs
from config.clock import business_today
from config.settings import Settings
from domain.deadline import LOG_APPEND_TIME, appended_late, deadline_ms, deadline_of
from domain.message import TradeMessage, decode
from domain.ports import Unavailable
from domain.trade import Trade
from tests.conftest import unique


def message(trade_id: str) -> TradeMessage:
    return TradeMessage(
        request_id=str(uuid.uuid4()),
        correlation_id="corr-1",
        accepted_on=business_today("UTC"),
        accepted_at=datetime.now(UTC),
        trade=Trade(trade_id, 1, "CP", "B", date(2099, 1, 1), business_today("UTC")),
    )


def read_all(bootstrap: str, topic: str, partitions: int, expect: int) -> list[object]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("g")})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got: list[object] = []
    for _ in range(100):
        got += [m for m in consumer.consume(100, 0.2) if m.error() is None]
        if len(got) >= expect:
            break
    consumer.close()
    return got


async def test_publish_round_trip(migrated: Settings) -> None:
    topic = unique("queue-test")
    ensure_topics(migrated.kafka_bootstrap_servers, {topic: 3}, 1)
    queue = KafkaTradeQueue(migrated.kafka_bootstrap_servers, topic, 5000, 1)
    sent = [message("T-same"), message("T-same"), message("T-other")]
    for m in sent:
        await queue.publish(m)
    queue.ping()
    queue.close()
    got = read_all(migrated.kafka_bootstrap_servers, topic, 3, 3)
    decoded = {decode(m.value()).request_id: m for m in got}  # type: ignore[attr-defined]
    assert set(decoded) == {m.request_id for m in sent}
    same = [decoded[m.request_id] for m in sent[:2]]
    assert {m.partition() for m in same} == {same[0].partition()}  # type: ignore[attr-defined]
    assert same[0].key() == b"T-same"  # type: ignore[attr-defined]
    headers = dict(same[0].headers())  # type: ignore[attr-defined]
    assert headers["request_id"] == sent[0].request_id.encode()
    assert headers["correlation_id"] == b"corr-1"


def test_ensure_topics_is_idempotent(migrated: Settings) -> None:
    topic = unique("topic")
    assert ensure_topics(migrated.kafka_bootstrap_servers, {topic: 2}, 1) == [topic]
    assert ensure_topics(migrated.kafka_bootstrap_servers, {topic: 2}, 1) == []


def test_topics_keep_records_as_long_as_the_embedded_profile(migrated: Settings) -> None:
    """retention.ms of new topics: the inbound topic's the log's retention (never longer
    than the decision log remembers), the dead letters' their retention."""
    settings = migrated.model_copy(
        update={
            "inbound_topic": unique("in"),
            "dlq_topic": unique("dlq"),
            "inbound_retention_days": 2.5,
            "dead_letter_retention_days": 30.0,
        }
    )
    assert sorted(wiring.create_topics(settings)) == sorted(
        [settings.inbound_topic, settings.dlq_topic]
    )
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    described = topic_configs(admin, {settings.inbound_topic, settings.dlq_topic}, timeout_s=15)
    kept = {name: int(config["retention.ms"]) for name, config in described.items()}
    assert kept == {settings.inbound_topic: 216_000_000, settings.dlq_topic: 2_592_000_000}
    assert timedelta(milliseconds=kept[settings.inbound_topic]) < settings.decision_log_retention
    admin.delete_topics([settings.inbound_topic, settings.dlq_topic])


async def test_unreachable_broker_is_unavailable() -> None:
    queue = KafkaTradeQueue("127.0.0.1:1", "nowhere", 300, 0)
    with pytest.raises(Unavailable):
        await queue.publish(message("T"))
    with pytest.raises(Unavailable):
        queue.ping()
    queue.close()


async def test_the_broker_stamps_the_append_and_a_late_one_is_not_acknowledged(
    migrated: Settings,
) -> None:
    """The inbound topic is created with LogAppendTime, so the delivery report and the
    consumer see the broker's append stamp; a message appended after the deadline it
    carries is refused by the API (503), the same rule by which the dataflow drops it."""
    topic = unique("stamped")
    ensure_topics(
        migrated.kafka_bootstrap_servers, {topic: 1}, 1, configs={topic: INBOUND_TOPIC_CONFIG}
    )
    queue = KafkaTradeQueue(migrated.kafka_bootstrap_servers, topic, 5000, 1)
    on_time = message("T-on-time")
    await queue.publish(on_time)
    late = replace(message("T-late"), accepted_at=datetime.now(UTC) - timedelta(seconds=6))
    with pytest.raises(Unavailable, match="after the deadline"):
        await queue.publish(late)
    queue.close()
    got = read_all(migrated.kafka_bootstrap_servers, topic, 1, 2)
    stamps = {m.key(): m.timestamp() for m in got}  # type: ignore[attr-defined]
    assert {kind for kind, _ in stamps.values()} == {LOG_APPEND_TIME}
    deadlines = {m.key(): deadline_of(m.headers()) for m in got}  # type: ignore[attr-defined]
    assert deadlines[b"T-on-time"] == deadline_ms(on_time.accepted_at, 5000)
    assert appended_late(deadlines[b"T-on-time"], stamps[b"T-on-time"]) is None
    assert appended_late(deadlines[b"T-late"], stamps[b"T-late"]) is not None
