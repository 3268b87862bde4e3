"""A trade and the rules that decide whether a submitted version is stored."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from enum import StrEnum


class ReasonCode(StrEnum):
    """Why a request ended FAILED; machine-readable, stable across releases."""

    STALE_VERSION = "STALE_VERSION"
    MATURITY_PASSED = "MATURITY_PASSED"
    INVALID_MESSAGE = "INVALID_MESSAGE"


@dataclass(frozen=True, slots=True)
class Trade:
    """One version of a trade as submitted; (trade_id, version) identifies a stored row."""

    trade_id: str
    version: int
    counterparty_id: str
    book_id: str
    maturity_date: date
    created_date: date


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a version must not be stored: a machine-readable ``code`` and a sentence."""

    code: ReasonCode
    message: str


def maturity_passed(maturity_date: date, as_of: date) -> bool:
    """A trade whose maturity date is before the business date has matured."""
    return maturity_date < as_of


def check_maturity(trade: Trade, as_of: date) -> Rejected | None:
    """Reject a trade that matured before ``as_of``; used by the API and the dataflow alike."""
    if maturity_passed(trade.maturity_date, as_of):
        return Rejected(
            ReasonCode.MATURITY_PASSED,
            f"maturity_date {trade.maturity_date.isoformat()} is before {as_of.isoformat()}",
        )
    return None


def decide(head: int | None, trade: Trade, as_of: date) -> Rejected | None:
    """The version rule: decide a submitted version against its trade_id's head (the
    highest stored version, ``None`` when it has no row); ``None`` means store it.

    Lower than the head is stale; equal replaces that row; higher (or first) is a new row.
    A maturity date before ``as_of`` (the business date the request was accepted) is rejected.
    """
    if head is not None and trade.version < head:
        return Rejected(
            ReasonCode.STALE_VERSION,
            f"version {trade.version} is lower than stored version {head}",
        )
    return check_maturity(trade, as_of)


def head_after(head: int | None, trade: Trade, rejected: Rejected | None) -> int | None:
    """The head once ``trade`` has been stored, or not (``rejected``)."""
    if rejected is not None:
        return head
    return trade.version if head is None else max(head, trade.version)
