"""The Kafka inbound source: one Bytewax partition per topic partition.

Offsets are snapshotted by Bytewax recovery (not committed to a consumer group), so a
restart resumes exactly where the last snapshot left off and replays only what followed.

A replay (``cli/replay.py``) reads the topic bounded (``BoundedKafkaSource``): each
partition from a start offset to an end offset pinned when the replay was planned
(``cli.replay.TopicExtent``), then it stops. Bytewax's own ``KafkaSource`` can only stop at the end
of the partition as it is when reached (``tail=False``), which moves while the API writes.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, cast

import structlog
from bytewax import operators as op
from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage
from bytewax.connectors.kafka.operators import KafkaOpOut
from bytewax.dataflow import Dataflow, Stream, operator
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka import KafkaError as ConsumerError

from config.logs import kafka_logger
from sources.stoppable import Stoppable

log = structlog.get_logger("sources.kafka")
KAFKA_STEP = "kafka-inbound"
Message = KafkaSourceMessage[bytes | None, bytes | None]
Error = KafkaError[bytes | None, bytes | None]


def log_consumer_error(step_id: str, error: Error) -> None:
    """Consumer errors carry no trade; librdkafka retries them, so they are only logged."""
    log.warning("kafka consumer error", step_id=step_id, error=str(error.err))


def kafka_inbound(
    flow: Dataflow, brokers: str, topic: str, stop: threading.Event, batch_size: int = 1000
) -> Stream[Message]:
    """Read ``topic`` from the beginning (or the recovered offsets) and tail it, until
    ``stop`` is set."""
    source = KafkaSource(
        brokers.split(","),
        [topic],
        add_config={"enable.partition.eof": "false", "logger": kafka_logger()},  # type: ignore[dict-item]
        batch_size=batch_size,
        raise_on_errors=False,  # consumer errors come as items, to be logged
    )
    out = _kafka_input(KAFKA_STEP, flow, Stoppable(source, stop))
    op.inspect("log-consumer-errors", out.errs, log_consumer_error)
    return out.oks


@operator
def _kafka_input(
    step_id: str, flow: Dataflow, source: FixedPartitionedSource[Message | Error, int | None]
) -> KafkaOpOut[Message, Error]:
    """Bytewax's ``kafka.operators.input`` over a source of our own: the same steps, so
    the offsets are snapshotted under the same step id as before."""
    split = op.branch(
        "split_err",
        op.input("kafka_input", flow, source),
        lambda item: isinstance(item, KafkaSourceMessage),
    )
    return KafkaOpOut(cast(Stream[Message], split.trues), cast(Stream[Error], split.falses))


class _BoundedPartition(StatefulSourcePartition[Message, int]):
    """One topic partition from ``start`` up to (not including) ``end``; the snapshot is
    the next offset to read."""

    def __init__(
        self, config: dict[str, Any], topic: str, partition: int, start: int, end: int, size: int
    ) -> None:
        self._consumer = Consumer(config)
        # assign(), not subscribe(): no consumer group, nothing committed anywhere.
        self._consumer.assign([TopicPartition(topic, partition, start)])
        self._next = start
        self._end = end
        self._size = size

    def next_batch(self) -> list[Message]:
        if self._next >= self._end:
            raise StopIteration
        batch: list[Message] = []
        for msg in self._consumer.consume(min(self._size, self._end - self._next), 0.05):
            error = msg.error()
            if error is not None and error.code() == ConsumerError._PARTITION_EOF:
                # The end was at or below the high watermark: nothing below it is left.
                self._next = self._end
                break
            if error is not None:  # librdkafka retries these itself, as for the live source
                log.warning("kafka consumer error", error=str(error))
                continue
            offset = msg.offset()
            if offset is None or offset >= self._end:
                self._next = self._end
                break
            batch.append(
                KafkaSourceMessage(
                    key=msg.key(),
                    value=msg.value(),
                    topic=msg.topic(),
                    headers=cast(list[tuple[str, bytes]], msg.headers() or []),
                    offset=offset,
                    partition=msg.partition(),
                    timestamp=msg.timestamp(),
                )
            )
            self._next = offset + 1
        return batch

    def snapshot(self) -> int:
        return self._next

    def close(self) -> None:
        self._consumer.close()


class BoundedKafkaSource(FixedPartitionedSource[Message, int]):
    """Reads the partitions of ``bounds`` (partition → start offset, end offset) of
    ``topic`` and ends; messages as Bytewax's ``KafkaSource`` makes them."""

    def __init__(
        self,
        brokers: str,
        topic: str,
        bounds: Mapping[int, tuple[int, int]],
        batch_size: int = 1000,
    ) -> None:
        self._topic = topic
        self._bounds = bounds
        self._batch_size = batch_size
        self._config = {
            "bootstrap.servers": brokers,
            "group.id": "trade-store-replay",  # required by librdkafka; never joined
            "enable.auto.commit": "false",
            "enable.partition.eof": "true",
            "auto.offset.reset": "earliest",  # a start deleted by retention since the plan
            "logger": kafka_logger(),
        }

    def list_parts(self) -> list[str]:
        return [str(p) for p in sorted(self._bounds)]

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _BoundedPartition:
        partition = int(for_part)
        start, end = self._bounds[partition]
        return _BoundedPartition(
            dict(self._config),
            self._topic,
            partition,
            start if resume_state is None else resume_state,
            end,
            self._batch_size,
        )
