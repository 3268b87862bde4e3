"""A dead letter: a queued record the dataflow cannot decide, kept with why and where from.

A pure value. The sinks (``sinks.dead_letter``) only deliver it: its headers, its size and
how it is cut down to fit a topic's limit are its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from domain.message import MAX_ID_LENGTH, valid_id
from domain.status import Outcome, ReasonCode, RequestState

# Kafka Connect's names for where a dead letter came from (DeadLetterQueueReporter).
TOPIC_HEADER = "__connect.errors.topic"
PARTITION_HEADER = "__connect.errors.partition"
OFFSET_HEADER = "__connect.errors.offset"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A refused queued message (undecodable, or queued too late): the original bytes plus
    why it was refused and where it was read from; ``original_size`` is set once it has
    been cut down to fit."""

    reason: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    request_id: str | None = None
    correlation_id: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    original_size: int | None = None

    def kafka_headers(self) -> list[tuple[str, str | bytes | None]]:
        """The original headers plus ``dlq_reason`` and the source's topic, partition and
        offset, so the record can be found, fixed and replayed; a cut one says so."""
        added = [("dlq_reason", self.reason)]
        for name, value in (
            (TOPIC_HEADER, self.topic),
            (PARTITION_HEADER, self.partition),
            (OFFSET_HEADER, self.offset),
        ):
            if value is not None:
                added.append((name, str(value)))
        if self.original_size is not None:
            added += [("dlq_truncated", "true"), ("dlq_original_size", str(self.original_size))]
        return [*self.headers, *((name, value.encode()) for name, value in added)]

    def size(self) -> int:
        """Bytes of its key, value and original headers: what a cut can shrink."""
        headers = sum(len(name) + len(value or b"") for name, value in self.headers)
        return len(self.key or b"") + len(self.value or b"") + headers

    def cut_to(self, limit: int) -> DeadLetter:
        """At most ``limit`` bytes of key, original headers and value (in that order of
        priority), marked with the size it had before any cut."""
        key = None if self.key is None else self.key[:limit]
        room = limit - len(key or b"")
        headers = []
        for name, value in self.headers:
            need = len(name) + len(value or b"")
            if need > room:
                break
            headers.append((name, value))
            room -= need
        return replace(
            self,
            key=key,
            value=None if self.value is None else self.value[:room],
            headers=headers,
            original_size=self.original_size or self.size(),
        )


def dead_letter_outcome(letter: DeadLetter) -> Outcome | None:
    """The FAILED outcome for a dead letter that names a request id the API could have
    issued (its trade_id and version are the PENDING record's: the status store keeps
    them; the log gets the record's key, cut to an id's length)."""
    if not valid_id(letter.request_id):
        return None
    assert letter.request_id is not None
    key = letter.key.decode(errors="replace") if letter.key else ""
    return Outcome(
        request_id=letter.request_id,
        trade_id=key[:MAX_ID_LENGTH],
        version=0,  # unknown: the body could not be read
        state=RequestState.FAILED,
        reason_code=ReasonCode.INVALID_MESSAGE,
        failure_reason=letter.reason,  # capped where it is made (UndecodableMessage)
    )
