"""The queued message: a trade plus what the decision needs to be reproducible.

The wire format is JSON with a ``schema_version``; the business date the API accepted the
request on travels with it, so replaying the queue later gives the same decisions.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from domain.trade import Trade

SCHEMA_VERSION = 1
MAX_ID_LENGTH = 64
MAX_VERSION = 2**31 - 1
MAX_REASON_CHARS = 512
MAX_QUOTED_CHARS = 64


@dataclass(frozen=True, slots=True)
class TradeMessage:
    """One accepted submission on its way to the dataflow."""

    request_id: str
    correlation_id: str
    accepted_on: date
    accepted_at: datetime
    trade: Trade
    redriven_from: str | None = None  # a redrive's dead-letter id, queued as a header
    # W3C trace-context headers (traceparent, tracestate) it was queued under, as opaque
    # (name, value) pairs; they travel as record headers, never in the value. Empty when
    # tracing is off (README "Tracing").
    trace: tuple[tuple[str, str], ...] = ()


class UndecodableMessage(ValueError):
    """A queued message that cannot become a TradeMessage; ``request_id`` when its body named
    a valid one.

    The reason is capped at ``MAX_REASON_CHARS``: it travels into a status record (DynamoDB
    items are limited to 400 KB) and a Kafka header, so input must never make it unbounded.
    """

    def __init__(self, reason: str, request_id: str | None = None) -> None:
        reason = _clip(reason, MAX_REASON_CHARS)
        super().__init__(reason)
        self.reason = reason
        self.request_id = request_id


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quoted(value: object) -> str:
    """``repr(value)`` clipped to ``MAX_QUOTED_CHARS``, for quoting input in a reason."""
    return _clip(repr(value), MAX_QUOTED_CHARS)


# What an id may not contain: controls (Cc), format characters (Cf: bidi overrides, zero-width
# characters, tags), private use, separators but the space, the noncharacters U+FFFE/U+FFFF,
# and "/" (an id is a path segment). Written out so the same text is the OpenAPI pattern
# (tests hold it to the running Python's Unicode database). Lone surrogates, which JSON can
# spell but no text holds, are refused apart: schema validators' regexes cannot name them.
_NOT_IN_ID = (
    r"\x00-\x1f\x7f-\x9f\xa0\xad/\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    r"\u1680\u180e\u2000-\u200f\u2028-\u202f\u205f-\u2064\u2066-\u206f\u3000"
    r"\ue000-\uf8ff\ufeff\ufff9-\ufffb\ufffe\uffff\U000110bd\U000110cd\U00013430-\U0001343f"
    r"\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
    r"\U000f0000-\U0010ffff"
)
# 1 to 64 other characters, the space allowed only inside.
ID_PATTERN = rf"[^ {_NOT_IN_ID}](?:[^{_NOT_IN_ID}]{{0,{MAX_ID_LENGTH - 2}}}[^ {_NOT_IN_ID}])?"
_ID = re.compile(ID_PATTERN)
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def normalise_id(value: str) -> str:
    """An id as it is stored and compared: trimmed, then NFC (one spelling of "é")."""
    return unicodedata.normalize("NFC", value.strip())


def valid_id(value: object) -> bool:
    """The one id grammar: a normalised string matching ``ID_PATTERN``."""
    return (
        isinstance(value, str)
        and _ID.fullmatch(value) is not None
        and _SURROGATE.search(value) is None
        and unicodedata.is_normalized("NFC", value)
    )


def valid_version(value: object) -> bool:
    """A version is a positive 32-bit integer; booleans and floats are not versions."""
    return type(value) is int and 1 <= value <= MAX_VERSION


def encode(message: TradeMessage) -> bytes:
    """Serialise to the queue's JSON value."""
    trade = message.trade
    return json.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "request_id": message.request_id,
            "correlation_id": message.correlation_id,
            "accepted_on": message.accepted_on.isoformat(),
            "accepted_at": message.accepted_at.isoformat(),
            "trade": {
                "trade_id": trade.trade_id,
                "version": trade.version,
                "counterparty_id": trade.counterparty_id,
                "book_id": trade.book_id,
                "maturity_date": trade.maturity_date.isoformat(),
                "created_date": trade.created_date.isoformat(),
            },
        },
        separators=(",", ":"),
    ).encode()


def _field(obj: dict[str, Any], name: str, request_id: str | None) -> Any:
    if name not in obj:
        raise UndecodableMessage(f"missing field {name!r}", request_id)
    return obj[name]


def _id(obj: dict[str, Any], name: str, request_id: str | None) -> str:
    value = _field(obj, name, request_id)
    if not valid_id(value):
        raise UndecodableMessage(f"invalid {name!r}", request_id)
    return str(value)


def _date(obj: dict[str, Any], name: str, request_id: str | None) -> date:
    value = _field(obj, name, request_id)
    try:
        return date.fromisoformat(value)
    except (TypeError, ValueError):
        raise UndecodableMessage(f"invalid date in {name!r}", request_id) from None


def decode(value: bytes | None) -> TradeMessage:
    """Parse and validate a queued value, raising UndecodableMessage with the reason and,
    once the body has named a valid one, its request id (see ``request_id_of``)."""
    try:
        # str, not bytes: json.loads would first sniff a bytes value's encoding
        obj = json.loads(value.decode()) if value is not None else None
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, too deep, an int too long
        raise UndecodableMessage("value is not JSON") from None
    if not isinstance(obj, dict):
        raise UndecodableMessage("value is not a JSON object")
    request_id = obj.get("request_id")
    rid = request_id if valid_id(request_id) else None
    if obj.get("schema_version") != SCHEMA_VERSION:
        version = quoted(obj.get("schema_version"))
        raise UndecodableMessage(f"unsupported schema_version {version}", rid)
    if rid is None:
        raise UndecodableMessage("invalid 'request_id'")
    trade = _field(obj, "trade", rid)
    if not isinstance(trade, dict):
        raise UndecodableMessage("'trade' is not an object", rid)
    version = _field(trade, "version", rid)
    if not valid_version(version):
        raise UndecodableMessage("invalid 'version'", rid)
    accepted_at_raw = _field(obj, "accepted_at", rid)
    try:
        accepted_at = datetime.fromisoformat(accepted_at_raw)
    except (TypeError, ValueError):
        raise UndecodableMessage("invalid 'accepted_at'", rid) from None
    return TradeMessage(
        request_id=rid,
        correlation_id=str(obj.get("correlation_id") or rid),
        accepted_on=_date(obj, "accepted_on", rid),
        accepted_at=accepted_at,
        trade=Trade(
            trade_id=_id(trade, "trade_id", rid),
            version=version,
            counterparty_id=_id(trade, "counterparty_id", rid),
            book_id=_id(trade, "book_id", rid),
            maturity_date=_date(trade, "maturity_date", rid),
            created_date=_date(trade, "created_date", rid),
        ),
    )


def request_id_of(refused: UndecodableMessage, header: str | None) -> str | None:
    """The request a refused value belongs to: the one its body named or, when the body
    named none, its ``request_id`` header's. Only a valid id counts, so a forged header
    cannot name an unbounded one."""
    if refused.request_id is not None:
        return refused.request_id
    return header if valid_id(header) else None
