"""Dead-letter sinks: messages the dataflow cannot decode, kept with the reason.

The Kafka topic in the services profile, a table of the log file when embedded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import KafkaError, Message, Producer

from adapters.kafka import producer_config
from adapters.sqlite import encode_headers, write_dead_letters
from domain.ports import Unavailable
from sinks.retry import until_available


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An undecodable queued message: the original bytes plus why it was refused."""

    reason: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    request_id: str | None = None
    correlation_id: str | None = None

    def kafka_headers(self) -> list[tuple[str, str | bytes | None]]:
        """The original headers plus ``dlq_reason``, so the record can be fixed and replayed."""
        return [*self.headers, ("dlq_reason", self.reason.encode())]


class _KafkaDeadLetterPartition(StatelessSinkPartition[DeadLetter]):
    def __init__(self, producer: Producer, topic: str) -> None:
        self._producer = producer
        self._topic = topic

    def _deliver(self, letters: list[DeadLetter]) -> None:
        failed: list[DeadLetter] = []

        def on_delivery(letter: DeadLetter) -> Callable[[KafkaError | None, Message], None]:
            def callback(err: KafkaError | None, _msg: Message) -> None:
                if err is not None:
                    failed.append(letter)

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
                failed.append(letter)
        self._producer.flush()
        if failed:
            letters[:] = failed
            raise Unavailable(f"{len(failed)} dead letters not acknowledged")

    def write_batch(self, items: list[DeadLetter]) -> None:
        pending = list(items)
        until_available(lambda: self._deliver(pending), "dead-letter topic")

    def close(self) -> None:
        self._producer.flush()


class KafkaDeadLetterSink(DynamicSink[DeadLetter]):
    """Produces dead letters to the DLQ topic, acks=all; at-least-once."""

    def __init__(self, brokers: str, topic: str, timeout_ms: int = 10_000) -> None:
        self._brokers = brokers
        self._topic = topic
        self._timeout_ms = timeout_ms

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> _KafkaDeadLetterPartition:
        producer = Producer(producer_config(self._brokers, self._timeout_ms, linger_ms=5))
        return _KafkaDeadLetterPartition(producer, self._topic)


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
