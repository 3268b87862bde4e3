"""The queue's wire format: round trips, and every way a message can be unusable."""

from __future__ import annotations

import json
import unicodedata
from datetime import UTC, date, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.message import (
    MAX_REASON_CHARS,
    TradeMessage,
    UndecodableMessage,
    decode,
    encode,
    normalise_id,
    request_id_of,
    valid_id,
)
from domain.trade import Trade

# Ids as the API hands them on: normalised, so the grammar holds them all.
ids = st.text(
    alphabet=st.characters(codec="utf-8", categories=["L", "N", "P", "S"], exclude_characters="/"),
    min_size=1,
    max_size=64,
).filter(valid_id)


def message(**trade_fields: object) -> TradeMessage:
    fields: dict[str, object] = {
        "trade_id": "T1",
        "version": 1,
        "counterparty_id": "CP-1",
        "book_id": "B1",
        "maturity_date": date(2030, 1, 1),
        "created_date": date(2026, 11, 28),
    }
    fields.update(trade_fields)
    return TradeMessage(
        request_id="r-1",
        correlation_id="c-1",
        accepted_on=date(2026, 11, 28),
        accepted_at=datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
        trade=Trade(**fields),  # type: ignore[arg-type]
    )


@given(trade_id=ids, version=st.integers(1, 2**31 - 1), book=ids)
def test_round_trip(trade_id: str, version: int, book: str) -> None:
    original = message(
        trade_id=trade_id.strip() or "x", version=version, book_id=book.strip() or "b"
    )
    assert decode(encode(original)) == original


def mutate(path: list[str], value: object, delete: bool = False) -> bytes:
    obj = json.loads(encode(message()))
    target = obj
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("raw", "reason", "request_id"),
    [
        (b"\xff\xfe", "value is not JSON", "hint"),
        (b"not json", "value is not JSON", "hint"),
        (b"[" * 100_000, "value is not JSON", "hint"),  # deeper than the recursion limit
        (b'{"schema_version": ' + b"9" * 5000 + b"}", "value is not JSON", "hint"),  # int limit
        (None, "value is not a JSON object", "hint"),
        (b"[1, 2]", "value is not a JSON object", "hint"),
        (mutate(["schema_version"], 99), "unsupported schema_version 99", "r-1"),
        (mutate(["request_id"], ""), "invalid 'request_id'", None),
        (mutate(["trade"], "x"), "'trade' is not an object", "r-1"),
        (mutate(["trade", "version"], 1.5), "invalid 'version'", "r-1"),
        (mutate(["trade", "version"], True), "invalid 'version'", "r-1"),
        (mutate(["trade", "version"], 0), "invalid 'version'", "r-1"),
        (mutate(["trade", "trade_id"], " T1"), "invalid 'trade_id'", "r-1"),
        (mutate(["trade", "book_id"], "x" * 65), "invalid 'book_id'", "r-1"),
        (
            mutate(["trade", "maturity_date"], "2030-13-01"),
            "invalid date in 'maturity_date'",
            "r-1",
        ),
        (mutate(["trade", "counterparty_id"], None, delete=True), "missing field", "r-1"),
        (mutate(["accepted_at"], "yesterday"), "invalid 'accepted_at'", "r-1"),
    ],
)
def test_undecodable(raw: bytes | None, reason: str, request_id: str | None) -> None:
    hint = "hint" if request_id == "hint" else None
    with pytest.raises(UndecodableMessage) as caught:
        decode(raw)
    assert reason in caught.value.reason
    if request_id == "r-1":
        assert caught.value.request_id == "r-1"
    if hint:  # an unreadable body names no request: the header does
        assert request_id_of(caught.value, hint) == hint


def test_mismatched_header_and_body_request_id_uses_body() -> None:
    with pytest.raises(UndecodableMessage) as caught:
        decode(mutate(["trade"], "x"))
    assert request_id_of(caught.value, "other") == "r-1"


def test_body_without_request_id_is_refused_with_header_hint() -> None:
    with pytest.raises(UndecodableMessage) as caught:
        decode(mutate(["request_id"], None, delete=True))
    assert request_id_of(caught.value, "from-header") == "from-header"


@pytest.mark.parametrize(
    "value", ["", " x", "x ", "a\nb", "x" * 65, 5, None, "a/b", "a\u202eb", "e\u0301"]
)
def test_invalid_ids(value: object) -> None:
    assert not valid_id(value)


@pytest.mark.parametrize(
    ("raw", "normal"), [("  T1 ", "T1"), ("e\u0301", "\xe9"), ("a b", "a b"), ("x" * 64, "x" * 64)]
)
def test_ids_are_trimmed_and_nfc(raw: str, normal: str) -> None:
    assert normalise_id(raw) == normal
    assert valid_id(normal)


NOT_IN_IDS = {"Cc", "Cf", "Cs", "Co", "Zs", "Zl", "Zp"}


def test_the_id_grammar_refuses_exactly_controls_formats_separators_and_slash() -> None:
    """Checked against this Python's Unicode database, so the written-out pattern (the one
    OpenAPI shows) cannot drift from the categories it stands for. Planes 4 to 13 hold no
    assigned character and are left out. Beyond them it refuses only the Egyptian format
    controls Unicode 15 added (unassigned in Python 3.11's database) and the noncharacters
    closing the private-use planes."""
    beyond = set()
    for code in [*range(0x40000), *range(0xE0000, 0x110000)]:
        char = chr(code)
        refused = (
            char == "/"
            or (unicodedata.category(char) in NOT_IN_IDS and char != " ")
            or code in (0xFFFE, 0xFFFF)
        )
        accepted = valid_id(normalise_id(f"a{char}a"))
        if refused:
            assert not accepted, hex(code)
        elif not accepted:
            beyond.add(code)
    assert beyond <= {*range(0x13430, 0x13440), 0xFFFFE, 0xFFFFF, 0x10FFFE, 0x10FFFF}


def test_a_quoted_value_is_clipped() -> None:
    """The one reason that quotes input shows at most 64 characters of it."""
    with pytest.raises(UndecodableMessage) as caught:
        decode(mutate(["schema_version"], "x" * 1_000_000))
    assert caught.value.reason == "unsupported schema_version '" + "x" * 62 + "…"


def test_every_reason_is_capped() -> None:
    long = UndecodableMessage("y" * 10_000)
    assert len(long.reason) == MAX_REASON_CHARS
    assert long.reason.endswith("…")
    assert str(long) == long.reason
    assert UndecodableMessage("short").reason == "short"


def test_an_invalid_request_id_header_names_no_request() -> None:
    """A forged header cannot give a dead letter an unbounded request id."""
    with pytest.raises(UndecodableMessage) as caught:
        decode(b"not json")
    assert request_id_of(caught.value, "x" * 100_000) is None
