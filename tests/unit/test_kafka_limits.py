"""Reading a topic's record limit right after creating it (KRaft spreads the new topic's
metadata asynchronously, so the first answer may not know it yet)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from adapters.kafka import max_message_bytes


class Entry:
    value = "2000000"


class Admin:
    """Answers UNKNOWN_TOPIC_OR_PART ``unknown_for`` times, then the topic's limit."""

    def __init__(self, unknown_for: int, code: int = KafkaError.UNKNOWN_TOPIC_OR_PART) -> None:
        self.unknown_for = unknown_for
        self.code = code
        self.calls = 0

    def describe_configs(self, resources: list[Any], request_timeout: float) -> dict[Any, Any]:
        self.calls += 1
        answers = {}
        for resource in resources:
            future: Future[dict[str, Entry]] = Future()
            if self.calls <= self.unknown_for:
                future.set_exception(KafkaException(KafkaError(self.code)))
            else:
                future.set_result({"max.message.bytes": Entry()})
            answers[resource] = future
        return answers


def test_a_topic_not_known_yet_is_asked_again() -> None:
    admin = Admin(unknown_for=2)
    assert max_message_bytes(admin, {"t"}, timeout_s=5) == {"t": 2_000_000}  # type: ignore[arg-type]
    assert admin.calls == 3


def test_it_gives_up_at_the_timeout() -> None:
    admin = Admin(unknown_for=1_000)
    with pytest.raises(KafkaException):
        max_message_bytes(admin, {"t"}, timeout_s=0.3)  # type: ignore[arg-type]
    assert 1 < admin.calls < 10


def test_other_errors_are_not_retried() -> None:
    admin = Admin(unknown_for=1, code=KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        max_message_bytes(admin, {"t"}, timeout_s=5)  # type: ignore[arg-type]
    assert admin.calls == 1
