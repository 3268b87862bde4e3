"""Dead letters read back, and what redriving one means: its trade submitted again as a new
request, once per dead letter unless forced.

Pure values and functions; the readers are ``adapters.inbound_log.SqliteDeadLetters`` and
``adapters.kafka.KafkaDeadLetters``, the orchestration is ``cli.dlq``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from domain.dead_letter import OFFSET_HEADER, PARTITION_HEADER, TOPIC_HEADER
from domain.idempotency import Answer, KeyRecord, fingerprint, scoped
from domain.message import SCHEMA_VERSION, UndecodableMessage, decode, valid_id
from domain.trade import Trade

REDRIVEN_FROM_HEADER = "redriven_from"
"""On a redriven record: the dead-letter id it was redriven from (``StoredDeadLetter.id``)."""


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """A dead letter as kept: its id (embedded: the ``dead_letters`` row's ``seq``; services:
    ``<partition>:<offset>`` in the dead-letter topic), when it was kept, why, and the
    original key, value and headers with the ones the dataflow added."""

    id: str
    at: datetime
    reason: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> str | None:
        """The first header of that name, as text (bytes that are not UTF-8 escaped)."""
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", errors="backslashreplace")
        return None

    @property
    def request_id(self) -> str | None:
        """The original request: its ``request_id`` header (the API sets it on every record)
        or, without one, the body's; only a valid id counts."""
        named = self.header("request_id")
        if valid_id(named):
            return named
        body = _json(self.value)
        named = body.get("request_id") if isinstance(body, dict) else None
        return named if valid_id(named) else None

    @property
    def source(self) -> str | None:
        """``topic/partition/offset`` it was read from, as its Kafka Connect headers say."""
        parts = [self.header(h) for h in (TOPIC_HEADER, PARTITION_HEADER, OFFSET_HEADER)]
        return "/".join(p for p in parts if p is not None) or None


class DeadLetterReader(Protocol):
    """Where the dead letters are kept (the dead-letter topic, the log file's table)."""

    def letters(self, since: datetime | None = None) -> Iterator[StoredDeadLetter]:
        """Every dead letter kept at or after ``since``, oldest first."""
        ...

    def letter(self, letter_id: str) -> StoredDeadLetter | None:
        """One dead letter, or None when none has that id (any more); ValueError when the
        id is not one this store gives."""
        ...


def _json(value: bytes | None) -> object:
    try:
        return json.loads(value.decode()) if value is not None else None
    except (ValueError, RecursionError):
        return None


def trade_of(letter: StoredDeadLetter) -> Trade:
    """The trade a dead letter's body holds, held to the dataflow's own checks (``decode``)
    in a fresh envelope: the body's own envelope (schema version, request id, dates) may be
    what was refused, and a redrive replaces it anyway. Raises UndecodableMessage."""
    body = _json(letter.value)
    if body is None:
        raise UndecodableMessage("value is not JSON")
    if not isinstance(body, dict) or not isinstance(body.get("trade"), dict):
        raise UndecodableMessage("value holds no 'trade' object")
    envelope = {
        "schema_version": SCHEMA_VERSION,
        "request_id": "redrive",
        "accepted_on": "2000-01-01",
        "accepted_at": "2000-01-01T00:00:00+00:00",
        "trade": body["trade"],
    }
    return decode(json.dumps(envelope).encode()).trade


def redrive_key_name(store: str, letter_id: str) -> str:
    """The name of the idempotency key a redrive of one dead letter holds. It has spaces,
    which no ``Idempotency-Key`` has, so no client's key is ever taken for it; ``store``
    (the topic) keeps two topics' ids apart."""
    return scoped(None, f"redrive {store} {letter_id}")


def redrive_key(store: str, letter_id: str, new_request_id: str, at: datetime) -> KeyRecord:
    """That key, answering with the new request's id."""
    name = redrive_key_name(store, letter_id)
    body = json.dumps({"request_id": new_request_id, "redriven_from": letter_id}).encode()
    return KeyRecord(
        key=name,
        fingerprint=fingerprint("dlq redrive", "", name.encode()),
        created_at=at,
        answer=Answer(202, body),
    )


def redriven_as(answer: Answer) -> str:
    """The request id an earlier redrive of the letter made (its key's answer)."""
    return str(json.loads(answer.body)["request_id"])
