"""The Kafka inbound source: one Bytewax partition per topic partition.

Offsets are snapshotted by Bytewax recovery (not committed to a consumer group), so a
restart resumes exactly where the last snapshot left off and replays only what followed.
"""

from __future__ import annotations

import structlog
from bytewax import operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow, Stream

from config.logs import kafka_logger

log = structlog.get_logger("sources.kafka")
KAFKA_STEP = "kafka-inbound"


def log_consumer_error(step_id: str, error: KafkaError[bytes | None, bytes | None]) -> None:
    """Consumer errors carry no trade; librdkafka retries them, so they are only logged."""
    log.warning("kafka consumer error", step_id=step_id, error=str(error.err))


def kafka_inbound(
    flow: Dataflow, brokers: str, topic: str, batch_size: int = 1000
) -> Stream[KafkaSourceMessage[bytes | None, bytes | None]]:
    """Read ``topic`` from the beginning (or the recovered offsets) and tail it."""
    out = kop.input(
        KAFKA_STEP,
        flow,
        brokers=brokers.split(","),
        topics=[topic],
        add_config={"enable.partition.eof": "false", "logger": kafka_logger()},  # type: ignore[dict-item]
        batch_size=batch_size,
    )
    op.inspect("log-consumer-errors", out.errs, log_consumer_error)
    return out.oks
