"""The dead-letter sink's own logic: headers, cutting a letter down, what is retried."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from domain.dead_letter import DeadLetter
from sinks.dead_letter import OWN_HEADER_ROOM, _KafkaDeadLetterPartition

LIMIT = 10_000


def letter(value: bytes, headers: list[tuple[str, bytes]] | None = None) -> DeadLetter:
    return DeadLetter(
        reason="value is not JSON",
        key=b"T1",
        value=value,
        headers=headers if headers is not None else [("request_id", b"r-1")],
        request_id="r-1",
        topic="trades-inbound",
        partition=2,
        offset=41,
    )


class FakeProducer:
    """Refuses records over ``LIMIT`` bytes as librdkafka does at produce(), or, with
    ``broker_limit``, in the delivery report as the broker does; ``outages`` reports fail."""

    def __init__(self, broker_limit: int | None = None, outages: int = 0) -> None:
        self.broker_limit = broker_limit
        self.outages = outages
        self.sent: list[dict[str, Any]] = []
        self._reports: list[tuple[Callable[..., None], KafkaError | None, dict[str, Any]]] = []

    def produce(self, topic: str, key: bytes, value: bytes, headers: Any, on_delivery: Any) -> None:
        size = len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)
        if size > LIMIT:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        err = None
        if self.outages:
            self.outages -= 1
            err = KafkaError(KafkaError._MSG_TIMED_OUT)
        elif self.broker_limit is not None and size > self.broker_limit:
            err = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
        record = {"key": key, "value": value, "headers": dict(headers)}
        self._reports.append((on_delivery, err, record))

    def poll(self, _timeout: float) -> None:
        pass

    def flush(self, *_timeout: float) -> None:
        for callback, err, record in self._reports:
            if err is None:
                self.sent.append(record)
            callback(err, None)
        self._reports = []


def deliver(producer: FakeProducer, *letters: DeadLetter) -> list[dict[str, Any]]:
    _KafkaDeadLetterPartition(producer, "dlq", LIMIT).write_batch(list(letters))  # type: ignore[arg-type]
    return producer.sent


def test_headers_name_the_source_kafka_connect_style() -> None:
    assert letter(b"x").kafka_headers() == [
        ("request_id", b"r-1"),
        ("dlq_reason", b"value is not JSON"),
        ("__connect.errors.topic", b"trades-inbound"),
        ("__connect.errors.partition", b"2"),
        ("__connect.errors.offset", b"41"),
    ]


def test_a_cut_keeps_key_then_headers_then_value_and_marks_the_original_size() -> None:
    big = letter(b"v" * 1000, [("request_id", b"r-1"), ("huge", b"h" * 500)])
    cut = big.cut_to(300)
    assert (cut.key, cut.headers) == (b"T1", [("request_id", b"r-1")])
    assert cut.value == b"v" * (300 - 2 - len("request_id") - 3)
    assert cut.size() == 300
    assert cut.original_size == big.size() == 2 + 1000 + len("request_id") + 3 + 4 + 500
    assert cut.kafka_headers()[-2:] == [
        ("dlq_truncated", b"true"),
        ("dlq_original_size", str(big.size()).encode()),
    ]
    assert cut.cut_to(10).original_size == big.size()  # the size before any cut


def test_a_letter_refused_at_produce_is_sent_once_truncated() -> None:
    sent = deliver(FakeProducer(), letter(b"small"), letter(b"v" * 50_000))
    assert [r["value"] for r in sent[:1]] == [b"small"]
    assert "dlq_truncated" not in sent[0]["headers"]
    assert len(sent) == 2
    assert sent[1]["headers"]["dlq_truncated"] == b"true"
    assert sent[1]["headers"]["dlq_original_size"] == str(letter(b"v" * 50_000).size()).encode()
    assert sent[1]["headers"]["__connect.errors.offset"] == b"41"
    assert len(sent[1]["value"]) == LIMIT - OWN_HEADER_ROOM - 2 - len("request_id") - 3


def test_a_letter_the_broker_refuses_is_halved_until_it_fits() -> None:
    """The broker's limit can be lower than the producer's (compression, framing): each
    refusal halves the letter, so it always ends up sent, never dropped."""
    sent = deliver(FakeProducer(broker_limit=1000), letter(b"v" * 50_000))
    assert len(sent) == 1
    assert sent[0]["headers"]["dlq_truncated"] == b"true"
    assert 0 < len(sent[0]["value"]) < 1000


def test_a_transient_failure_is_retried_whole() -> None:
    sent = deliver(FakeProducer(outages=2), letter(b"v"))
    assert sent == [
        {"key": b"T1", "value": b"v", "headers": dict(letter(b"v").kafka_headers())},
    ]
