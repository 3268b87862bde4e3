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
class Accepted:
    """The version is to be stored: as a new row, or replacing the row of the same version."""

    replaces: bool


@dataclass(frozen=True, slots=True)
class Rejected:
    """The version must not be stored; ``code`` says why."""

    code: ReasonCode
    message: str


Decision = Accepted | Rejected


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


def decide(highest_version: int | None, trade: Trade, as_of: date) -> Decision:
    """Decide a submitted version against the highest version stored for its trade_id.

    Lower than stored is stale; equal replaces that row; higher (or first) is a new row.
    A maturity date before ``as_of`` (the business date the request was accepted) is rejected.
    """
    if highest_version is not None and trade.version < highest_version:
        return Rejected(
            ReasonCode.STALE_VERSION,
            f"version {trade.version} is lower than stored version {highest_version}",
        )
    matured = check_maturity(trade, as_of)
    if matured is not None:
        return matured
    return Accepted(replaces=highest_version == trade.version)


def next_highest(highest_version: int | None, trade: Trade, decision: Decision) -> int | None:
    """The highest stored version after ``decision`` has been applied."""
    if isinstance(decision, Rejected):
        return highest_version
    return trade.version if highest_version is None else max(highest_version, trade.version)
