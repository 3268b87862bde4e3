"""The processor's expiry sweep on a real SQLite trade store, under a clock that moves on."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import pytest

from adapters import wiring
from adapters.sql import SqlTradeStore
from cli import sweeps
from cli.migrate import migrate
from cli.sweeps import ExpirySweeper
from config.settings import Settings
from domain.ports import Unavailable
from domain.trade import Trade
from tests.support import upsert

DAY = date(2026, 11, 28)
NEXT_DAY = DAY + timedelta(days=1)
LONG_AGO = DAY - timedelta(days=400)  # reads "as of" it show only the stored flag


@pytest.fixture
def store(tmp_path: Path) -> SqlTradeStore:
    """A migrated SQLite trade store with one trade matured on DAY and one due on DAY."""
    settings = Settings(profile="embedded", data_dir=tmp_path)
    migrate(settings)
    store = wiring.trade_store(settings)
    upsert(
        store,
        [
            Trade("matured", 1, "CP", "B", DAY - timedelta(days=1), LONG_AGO),
            Trade("due-today", 1, "CP", "B", DAY, LONG_AGO),
        ],
    )
    return store


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[date]:
    """The business date the sweeper sees: the last element of the list."""
    dates = [DAY]
    monkeypatch.setattr(sweeps, "business_today", lambda _zone: dates[-1])
    return dates


def stored_flags(store: SqlTradeStore) -> dict[str, bool]:
    return {t: store.versions(t, LONG_AGO)[0].expired for t in ("matured", "due-today")}


def test_sweeps_once_per_business_date(
    store: SqlTradeStore, clock: list[date], monkeypatch: pytest.MonkeyPatch
) -> None:
    swept: list[date] = []
    expire = store.expire

    def counted(as_of: date) -> int:
        swept.append(as_of)
        return expire(as_of)

    monkeypatch.setattr(store, "expire", counted)
    sweeper = ExpirySweeper(store, "UTC", every_s=60)

    sweeper.sweep_if_due()
    assert swept == [DAY]
    assert stored_flags(store) == {"matured": True, "due-today": False}

    sweeper.sweep_if_due()  # the same business date: nothing to do
    assert swept == [DAY]

    clock.append(NEXT_DAY)
    sweeper.sweep_if_due()
    sweeper.sweep_if_due()
    assert swept == [DAY, NEXT_DAY]
    assert stored_flags(store) == {"matured": True, "due-today": True}


def test_a_postponed_sweep_is_retried_the_same_day(
    store: SqlTradeStore, clock: list[date], monkeypatch: pytest.MonkeyPatch
) -> None:
    expire = store.expire
    outages = [Unavailable("trade store is down")]

    def flaky(as_of: date) -> int:
        if outages:
            raise outages.pop()
        return expire(as_of)

    monkeypatch.setattr(store, "expire", flaky)
    sweeper = ExpirySweeper(store, "UTC", every_s=60)
    sweeper.sweep_if_due()
    assert stored_flags(store) == {"matured": False, "due-today": False}
    sweeper.sweep_if_due()
    assert stored_flags(store) == {"matured": True, "due-today": False}
