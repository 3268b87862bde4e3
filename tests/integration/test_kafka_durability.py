"""Ack means durable: the API's Kafka producer really runs with acks=all, idempotence and the
produce timeout, read back from librdkafka's own dump of the producer's configuration."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from confluent_kafka import Producer

from adapters import kafka, wiring
from config.settings import Settings
from tests.conftest import unique
from tests.integration.test_kafka_queue import message


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def explicit_settings(lines: list[str]) -> dict[str, str]:
    """The ``name = value`` lines of librdkafka's debug=conf dump: the properties set."""
    pairs = (line.split("]:", 1)[-1].strip().partition(" = ") for line in lines)
    return {name: value for name, sep, value in pairs if sep}


async def test_the_queue_publishes_with_acks_all_idempotence_and_the_timeout(
    migrated: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = migrated.model_copy(
        update={"inbound_topic": unique("durable"), "produce_timeout_ms": 4321}
    )
    kafka.ensure_topics(settings.kafka_bootstrap_servers, {settings.inbound_topic: 1}, 1)
    dump = Lines()
    librdkafka = logging.getLogger(unique("librdkafka"))
    librdkafka.addHandler(dump)
    librdkafka.setLevel(logging.DEBUG)
    built: list[Producer] = []

    def producer(config: dict[str, Any]) -> Producer:
        built.append(Producer({**config, "debug": "conf", "logger": librdkafka}))
        return built[-1]

    monkeypatch.setattr(kafka, "Producer", producer)
    queue = wiring.trade_queue(settings)
    await queue.publish(message(unique("T")))  # acknowledged through that very producer
    queue.close()

    assert len(built) == 1
    effective = explicit_settings(dump.lines)
    assert effective.get("request.required.acks") == "-1"  # acks=all
    assert effective.get("enable.idempotence") == "true"
    assert effective.get("message.timeout.ms") == "4321"  # delivery.timeout.ms
    assert int(effective["request.timeout.ms"]) <= 4321
