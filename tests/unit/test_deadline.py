"""The queue deadline: one rule for the API's delivery report and the dataflow's decode."""

from __future__ import annotations

from datetime import UTC, date, datetime

from bytewax.connectors.kafka import KafkaSourceMessage

from adapters.kafka import delivery_error, headers_of, producer_config
from dataflows.trades import decode_record
from domain.dead_letter import DeadLetter, dead_letter_outcome
from domain.deadline import (
    DEADLINE_HEADER,
    LOG_APPEND_TIME,
    appended_late,
    deadline_ms,
    deadline_of,
)
from domain.message import TradeMessage, decode, encode
from domain.ports import Unavailable
from domain.trade import Trade

CREATE_TIME = 1
ACCEPTED = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
TRADE = Trade("T1", 1, "CP-1", "B1", date(2026, 6, 1), date(2026, 1, 2))


def test_the_deadline_is_accepted_at_plus_the_produce_timeout() -> None:
    assert deadline_ms(ACCEPTED, 5000) == int(ACCEPTED.timestamp() * 1000) + 5000


def test_only_an_append_after_the_deadline_is_late() -> None:
    deadline = deadline_ms(ACCEPTED, 5000)
    assert appended_late(deadline, (LOG_APPEND_TIME, deadline)) is None
    reason = appended_late(deadline, (LOG_APPEND_TIME, deadline + 1))
    assert reason is not None
    assert reason.startswith("queued after the API answered 503")


def test_without_a_broker_stamp_or_a_deadline_the_message_is_accepted() -> None:
    """Messages of earlier versions carry no deadline; a CreateTime topic's stamp is the
    producer's clock, which says nothing about when the broker wrote it."""
    assert appended_late(None, (LOG_APPEND_TIME, 10**15)) is None
    assert appended_late(1, (CREATE_TIME, 10**15)) is None
    assert appended_late(1, None) is None


def test_the_deadline_header() -> None:
    assert deadline_of([("request_id", b"r"), (DEADLINE_HEADER, b"1700000000000")]) == 1700000000000
    assert deadline_of([(DEADLINE_HEADER, b"soon")]) is None
    assert deadline_of([]) is None
    assert deadline_of(None) is None


def test_a_bulk_loaded_record_carries_no_deadline_and_is_never_late() -> None:
    """Records no API waits on (a preload, a backfill) are decided however late they land."""
    message = decode(encode(TradeMessage("r-1", "c-1", ACCEPTED.date(), ACCEPTED, TRADE)))
    headers = headers_of(message, None)
    assert deadline_of(headers) is None
    record = KafkaSourceMessage(
        b"T1", encode(message), headers=headers, timestamp=(LOG_APPEND_TIME, 2**41)
    )
    assert decode_record(record) == message
    assert deadline_of(headers_of(message, 1234)) == 1234


def test_librdkafka_reports_every_message_within_the_produce_timeout() -> None:
    """The delivery report, not a timer of ours, decides; durable and idempotent."""
    config = producer_config("b:9092", 1234, 2)
    assert config["delivery.timeout.ms"] == 1234
    assert config["request.timeout.ms"] <= 1234
    assert (config["acks"], config["enable.idempotence"]) == ("all", True)


def test_the_dataflow_refuses_a_record_appended_after_its_deadline() -> None:
    """Not stored and no status: the API answered 503 and withdrew its PENDING record."""
    deadline = deadline_ms(ACCEPTED, 5000)
    headers = [
        ("request_id", b"r-1"),
        ("correlation_id", b"c-1"),
        (DEADLINE_HEADER, b"%d" % deadline),
    ]
    late = KafkaSourceMessage(
        b"T1", b"{}", headers=headers, timestamp=(LOG_APPEND_TIME, deadline + 700)
    )
    letter = decode_record(late)
    assert isinstance(letter, DeadLetter)
    assert letter.request_id is None
    assert dead_letter_outcome(letter) is None
    assert letter.reason == "queued after the API answered 503: appended 700 ms after its deadline"


def test_the_api_answers_503_for_an_acknowledgement_stamped_after_the_deadline() -> None:
    """Same stamp, same rule as the dataflow: a 202 is never given for a refused record."""

    class Report:
        def __init__(self, stamp: int) -> None:
            self.stamp = stamp

        def timestamp(self) -> tuple[int, int]:
            return (LOG_APPEND_TIME, self.stamp)

    assert delivery_error(None, 1000, Report(1000)) is None  # type: ignore[arg-type]
    late = delivery_error(None, 1000, Report(1001))  # type: ignore[arg-type]
    assert isinstance(late, Unavailable)
