"""Dead-letter sinks: where ``domain.dead_letter.DeadLetter`` values are kept.

The Kafka topic in the services profile, a table of the log file when embedded. A dead
letter is never dropped: one too large for the topic is cut down to fit and marked.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import structlog
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from adapters.inbound_log import encode_headers, write_dead_letters
from adapters.kafka import dead_letter_producer_config
from adapters.retry import until_available
from domain.dead_letter import DeadLetter
from domain.ports import Unavailable

log = structlog.get_logger("sinks.dead_letter")

OWN_HEADER_ROOM = 4096
"""Bytes kept free for the headers a dead letter adds (the reason is at most 512 characters)."""


def _too_large(err: KafkaError) -> bool:
    """The record itself is refused for its size, by librdkafka or by the broker."""
    return err.code() in (KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE)


class _KafkaDeadLetterPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, producer: Producer, topic: str, max_bytes: int) -> None:
        self._producer = producer
        self._topic = topic
        self._max_bytes = max_bytes

    def _smaller(self, letter: DeadLetter) -> DeadLetter:
        """Cut to the topic's limit less room for our headers or, when it is already within
        that, to half its size: refused again and again, a letter still ends up sent."""
        cap = self._max_bytes - OWN_HEADER_ROOM
        cut = letter.cut_to(cap if letter.size() > cap else letter.size() // 2)
        log.warning(
            "dead letter too large, truncated",
            original_size=cut.original_size,
            size=cut.size(),
            topic=letter.topic,
            partition=letter.partition,
            offset=letter.offset,
            request_id=letter.request_id,
        )
        return cut

    def _round(self, letters: list[DeadLetter]) -> tuple[list[DeadLetter], list[DeadLetter]]:
        """Produce every letter once: (to retry after an outage, cut down to send again)."""
        retry: list[DeadLetter] = []
        cut: list[DeadLetter] = []

        def refused(letter: DeadLetter, err: KafkaError) -> None:
            # Nothing left to cut: then the size was not the problem after all.
            (cut if _too_large(err) and letter.size() else retry).append(letter)

        def on_delivery(letter: DeadLetter) -> Callable[[KafkaError | None, Message], None]:
            def callback(err: KafkaError | None, _msg: Message) -> None:
                if err is not None:
                    refused(letter, err)

            return callback

        for letter in letters:
            try:
                self._producer.produce(
                    self._topic,
                    key=letter.key,
                    value=letter.value,
                    headers=letter.kafka_headers(),
                    on_delivery=on_delivery(letter),
                )
            except BufferError:
                self._producer.poll(0.1)
                retry.append(letter)
            except KafkaException as exc:
                refused(letter, exc.args[0])
        self._producer.flush()
        return retry, [self._smaller(letter) for letter in cut]

    def _deliver(self, letters: list[DeadLetter]) -> None:
        while letters:
            retry, cut = self._round(letters)
            letters[:] = retry + cut
            if retry:
                raise Unavailable(f"{len(retry)} dead letters not acknowledged")

    def write_batch(self, items: list[DeadLetter]) -> None:
        pending = list(items)
        until_available(lambda: self._deliver(pending), "dead-letter topic")

    def close(self) -> None:
        self._producer.flush()


class KafkaDeadLetterSink(DynamicSink[DeadLetter]):
    """Produces dead letters to the DLQ topic, acks=all; at-least-once.

    The producer's record limit is the topic's own ``max.message.bytes``, read at start.
    """

    def __init__(self, brokers: str, topic: str, timeout_ms: int = 10_000) -> None:
        self._brokers = brokers
        self._topic = topic
        self._timeout_ms = timeout_ms

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _KafkaDeadLetterPartition:
        config = until_available(
            lambda: dead_letter_producer_config(self._brokers, self._topic, self._timeout_ms),
            "dead-letter topic limit",
        )
        return _KafkaDeadLetterPartition(
            Producer(config), self._topic, int(config["message.max.bytes"])
        )


class _SqliteDeadLetterPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, path: Path) -> None:
        self._path = path

    def write_batch(self, items: list[DeadLetter]) -> None:
        rows = [(d.reason, d.key, d.value, encode_headers(d.kafka_headers())) for d in items]
        until_available(lambda: write_dead_letters(self._path, rows), "dead letters")


class SqliteDeadLetterSink(DynamicSink[DeadLetter]):
    """Stores dead letters in the embedded log file's dead_letters table; at-least-once."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _SqliteDeadLetterPartition:
        return _SqliteDeadLetterPartition(self._path)
