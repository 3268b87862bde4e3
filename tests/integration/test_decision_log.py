"""Recording decisions: one algorithm (domain.use_cases) on PostgreSQL, SQLite and the fake.

The same tests run on every implementation, so the fake the flow tests use cannot drift
from the stores the processor uses.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from adapters.sql import SqlTradeStore, make_engine
from config.clock import business_today
from config.settings import Settings
from domain.message import TradeMessage
from domain.status import Outcome, ReasonCode, RequestState
from domain.trade import Decision, Rejected, Trade
from tests.conftest import settings_env, unique
from tests.fakes import FakeTradeStore
from tests.support import record, record_failed

TODAY = business_today("UTC")


@pytest.fixture(scope="module", params=["postgres", "sqlite", "fake"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> SqlTradeStore | FakeTradeStore:
    if request.param == "fake":
        return FakeTradeStore()
    if request.param == "postgres":
        migrated: Settings = request.getfixturevalue("migrated")
        return SqlTradeStore(make_engine(migrated.trade_store_url))
    settings = Settings(profile="embedded", data_dir=tmp_path_factory.mktemp("embedded"))
    subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate"], env=settings_env(settings), check=True
    )
    return SqlTradeStore(make_engine(settings.trade_store_url))


def decided(tid: str, version: int, rid: str | None = None, ok: bool = True) -> Decision:
    trade = Trade(tid, version, "CP-1", "B1", TODAY + timedelta(days=10), TODAY)
    message = TradeMessage(rid or unique("r"), "c", TODAY, datetime.now(UTC), trade)
    return Decision(message, None if ok else Rejected(ReasonCode.MATURITY_PASSED, "old"))


def dead_letter(rid: str) -> Outcome:
    return Outcome(rid, "k", 0, RequestState.FAILED, ReasonCode.INVALID_MESSAGE, "not JSON")


def test_outcomes_are_stamped_once_and_replays_return_them_unchanged(
    store: SqlTradeStore | FakeTradeStore,
) -> None:
    tid = unique("T")
    batch = [decided(tid, 1), decided(tid, 2), decided(tid, 1, ok=False)]
    first = record(store, batch)
    assert [o.state for o in first] == [RequestState.SUCCESS] * 2 + [RequestState.FAILED]
    assert all(o.decided_at is not None and o.decided_at.tzinfo is not None for o in first)
    rows = store.versions(tid, TODAY)
    # A replay, even mixed with new work, is neither applied nor decided again.
    again = record(store, [*batch, decided(tid, 3)])
    assert again[:3] == first
    assert [r.trade.version for r in store.versions(tid, TODAY)] == [1, 2, 3]
    assert store.versions(tid, TODAY)[:2] == rows


def test_a_request_twice_in_one_batch_is_decided_once(
    store: SqlTradeStore | FakeTradeStore,
) -> None:
    tid, rid = unique("T"), unique("r")
    outcomes = record(store, [decided(tid, 2, rid), decided(tid, 2, rid)])
    assert outcomes[0] == outcomes[1]
    assert outcomes[0].state is RequestState.SUCCESS


def test_dead_letters_are_logged_like_decisions(store: SqlTradeStore | FakeTradeStore) -> None:
    fresh = unique("r")
    [logged] = record_failed(store, [dead_letter(fresh), dead_letter(fresh)])
    assert (logged.request_id, logged.reason_code) == (fresh, ReasonCode.INVALID_MESSAGE)
    assert logged.decided_at is not None
    assert record_failed(store, [dead_letter(fresh)]) == [logged]  # a replay
    # The request's own message, arriving after its dead letter, is not decided again.
    assert record(store, [decided(unique("T"), 1, fresh)]) == [logged]


def test_a_dead_letter_cannot_change_a_decided_request(
    store: SqlTradeStore | FakeTradeStore,
) -> None:
    tid = unique("T")
    [success] = record(store, [decided(tid, 1)])
    assert record_failed(store, [dead_letter(success.request_id)]) == []
    assert record(store, [decided(tid, 1, success.request_id)]) == [success]
