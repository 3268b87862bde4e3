"""The business date: the only place that reads the wall clock for a decision."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo


def utc_now() -> datetime:
    return datetime.now(UTC)


def business_today(timezone: str) -> date:
    """Today's date in the business timezone (default UTC)."""
    return datetime.now(ZoneInfo(timezone)).date()
