"""The dead-letter commands' pure parts: which trade a letter holds, the redrive key, the
listing's order and filters, and text safe to print."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime

import pytest

from cli.dlq import escaped, newest, timestamp
from cli.main import parser
from domain.idempotency import valid_key
from domain.message import UndecodableMessage
from domain.redrive import StoredDeadLetter, redrive_key, redrive_key_name, redriven_as, trade_of

AT = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
TRADE = {
    "trade_id": "T1",
    "version": 3,
    "counterparty_id": "CP-1",
    "book_id": "B1",
    "maturity_date": "2031-01-01",
    "created_date": "2026-01-01",
}


def letter(value: bytes | None, reason: str = "r", letter_id: str = "1") -> StoredDeadLetter:
    return StoredDeadLetter(letter_id, AT, reason, b"T1", value, [("request_id", b"req-1")])


def test_the_trade_of_a_refused_envelope_is_read_with_the_dataflows_checks() -> None:
    body = json.dumps({"schema_version": 99, "trade": TRADE}).encode()
    trade = trade_of(letter(body))
    assert (trade.trade_id, trade.version, trade.maturity_date.isoformat()) == (
        "T1",
        3,
        "2031-01-01",
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"garbage", "value is not JSON"),
        (None, "value is not JSON"),
        (b"[1]", "value holds no 'trade' object"),
        (json.dumps({"trade": "T1"}).encode(), "value holds no 'trade' object"),
        (json.dumps({"trade": TRADE | {"version": 0}}).encode(), "invalid 'version'"),
        (json.dumps({"trade": TRADE | {"book_id": " "}}).encode(), "invalid 'book_id'"),
    ],
)
def test_a_body_without_a_sound_trade_stays_undecodable(value: bytes | None, reason: str) -> None:
    with pytest.raises(UndecodableMessage) as refused:
        trade_of(letter(value))
    assert refused.value.reason == reason


def test_the_request_id_comes_from_the_header_else_the_body() -> None:
    assert letter(b"x").request_id == "req-1"
    body = json.dumps({"request_id": "req-2"}).encode()
    bare = StoredDeadLetter("1", AT, "r", None, body, [("request_id", b"bad/id")])
    assert bare.request_id == "req-2"


def test_the_redrive_key_is_one_per_letter_and_store_and_no_clients() -> None:
    first = redrive_key("trades-dlq", "0:5", "new-1", AT)
    again = redrive_key("trades-dlq", "0:5", "new-2", AT)
    assert first.key == again.key == redrive_key_name("trades-dlq", "0:5")
    assert first.fingerprint == again.fingerprint  # so a second redrive replays the first
    assert redrive_key("other-dlq", "0:5", "new-1", AT).key != first.key
    assert redrive_key("trades-dlq", "0:6", "new-1", AT).key != first.key
    assert redriven_as(first.answer) == "new-1"
    assert not valid_key("redrive trades-dlq 0:5")  # no Idempotency-Key can name it


def test_the_listing_is_the_newest_matching_first() -> None:
    letters = [letter(b"", reason, str(i)) for i, reason in enumerate(["A x", "b", "a y", "A z"])]
    assert [x.id for x in newest(letters, None, 50)] == ["3", "2", "1", "0"]
    assert [x.id for x in newest(letters, "a", 2)] == ["3", "2"]
    assert newest(letters, "nothing", 5) == []


def test_printed_text_has_no_control_characters() -> None:
    assert escaped("a\x1b[31mb\nc\u202ed é") == "a\\x1b[31mb\\nc\\u202ed é"


def test_since_without_a_zone_is_utc() -> None:
    assert timestamp("2026-12-01T10:00") == AT
    with pytest.raises(argparse.ArgumentTypeError):
        timestamp("yesterday")


def test_the_commands_are_registered_with_the_common_options() -> None:
    args = parser().parse_args(
        ["dlq", "redrive", "0:1", "0:2", "--dry-run", "--profile", "services"]
    )
    assert (args.action, args.ids, args.dry_run, args.force, args.profile) == (
        "redrive",
        ["0:1", "0:2"],
        True,
        False,
        "services",
    )
    assert parser().parse_args(["dlq", "list"]).limit == 50
