"""The trade store on PostgreSQL and on SQLite: upserts, the version guard, paging, expiry.

Every test runs against both, so the two profiles cannot drift apart.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from adapters.sql import SqlTradeStore, make_engine
from config.clock import business_today
from config.settings import Settings
from domain.message import TradeMessage
from domain.ports import TradeFilter, Unavailable
from domain.status import RequestState
from domain.trade import Decision, Trade
from tests.conftest import settings_env, unique
from tests.support import record, upsert, wait_for

TODAY = business_today("UTC")
RAW_INSERT = text(
    "INSERT INTO trades (trade_id, version, counterparty_id, book_id, maturity_date,"
    " created_date, created_at, updated_at)"
    " VALUES (:t, :v, 'CP', 'B', CURRENT_DATE, CURRENT_DATE, CURRENT_TIMESTAMP,"
    " CURRENT_TIMESTAMP)"
)
BLOCKED_BY = text(
    "SELECT l.pid, l.locktype FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE NOT l.granted AND a.wait_event_type = 'Lock'"
    " AND :holder = ANY(pg_blocking_pids(l.pid))"
)


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated trade store: the services test database, or a fresh SQLite file."""
    if request.param == "postgres":
        migrated: Settings = request.getfixturevalue("migrated")
        return migrated.trade_store_url
    settings = Settings(profile="embedded", data_dir=tmp_path_factory.mktemp("embedded"))
    subprocess.run(
        [sys.executable, "-m", "cli.main", "migrate"], env=settings_env(settings), check=True
    )
    return settings.trade_store_url


@pytest.fixture(scope="module")
def trade_store(store_url: str) -> SqlTradeStore:
    return SqlTradeStore(make_engine(store_url))


def trade(tid: str, version: int, cp: str = "CP-1", book: str = "B1", days: int = 10) -> Trade:
    return Trade(tid, version, cp, book, TODAY + timedelta(days=days), TODAY)


def test_upsert_versions_and_replace(trade_store: SqlTradeStore) -> None:
    tid = unique("T")
    assert upsert(trade_store, [trade(tid, 1), trade(tid, 2)]) == {(tid, 1), (tid, 2)}
    first = trade_store.versions(tid, TODAY)
    assert upsert(trade_store, [trade(tid, 2, cp="CP-9")]) == {(tid, 2)}
    rows = trade_store.versions(tid, TODAY)
    assert [(r.trade.version, r.trade.counterparty_id) for r in rows] == [(1, "CP-1"), (2, "CP-9")]
    assert rows[1].created_at == first[1].created_at
    assert rows[1].updated_at >= first[1].updated_at
    assert trade_store.heads([tid, "absent"]) == {tid: 2}


def test_same_key_twice_in_one_batch_keeps_the_last(trade_store: SqlTradeStore) -> None:
    tid = unique("T")
    assert upsert(trade_store, [trade(tid, 1, cp="A"), trade(tid, 1, cp="B")]) == {(tid, 1)}
    assert trade_store.versions(tid, TODAY)[0].trade.counterparty_id == "B"


def test_a_batch_is_applied_as_if_one_by_one_in_queue_order(trade_store: SqlTradeStore) -> None:
    """Versions decided against a head that was already stale (an earlier, higher version
    still on its way to the store) may land in one batch: the lower one, queued after the
    higher, must end FAILED as stale, not be stored because a batch writes in key order."""
    tid = unique("T")

    def accepted(version: int) -> Decision:
        message = TradeMessage(unique("r"), "c", TODAY, datetime.now(UTC), trade(tid, version))
        return Decision(message)

    outcomes = record(trade_store, [accepted(3), accepted(2), accepted(3), accepted(4)])
    assert [(o.state, o.reason_code) for o in outcomes] == [
        (RequestState.SUCCESS, None),
        (RequestState.FAILED, "STALE_VERSION"),
        (RequestState.SUCCESS, None),
        (RequestState.SUCCESS, None),
    ]
    assert [r.trade.version for r in trade_store.versions(tid, TODAY)] == [3, 4]


def test_guard_refuses_lower_versions(trade_store: SqlTradeStore) -> None:
    tid = unique("T")
    upsert(trade_store, [trade(tid, 3)])
    assert upsert(trade_store, [trade(tid, 2)]) == set()
    assert [r.trade.version for r in trade_store.versions(tid, TODAY)] == [3]


def test_guard_holds_for_any_client(store_url: str) -> None:
    """The store guards itself: raw SQL can neither insert below the head nor re-key a row."""
    engine = make_engine(store_url)
    tid = unique("T")
    with engine.begin() as conn:
        conn.execute(RAW_INSERT, {"t": tid, "v": 5})
        conn.execute(RAW_INSERT, {"t": tid, "v": 4})
        versions = conn.execute(text("SELECT version FROM trades WHERE trade_id = :t"), {"t": tid})
        assert versions.scalars().all() == [5]
    with pytest.raises(Exception, match="immutable"), engine.begin() as conn:
        conn.execute(text("UPDATE trades SET version = 1 WHERE trade_id = :t"), {"t": tid})
    engine.dispose()


def test_concurrent_writers_cannot_store_below_the_head(migrated: Settings) -> None:
    """PostgreSQL's per-trade lock: while one transaction holds v5 uncommitted, a writer of v4
    waits for it (seen in pg_locks), then the guard sees v5 and skips v4. Without the lock,
    v4 would not wait: the guard's EXISTS cannot see the uncommitted v5, and both would land.
    A writer of another trade_id does not wait."""
    engine = make_engine(migrated.trade_store_url)
    store = SqlTradeStore(engine)
    tid = unique("T")
    written: list[set[tuple[str, int]]] = []
    with engine.connect() as holder:
        holding = holder.begin()
        holder.execute(RAW_INSERT, {"t": tid, "v": 5})
        holder_pid = holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
        writer = threading.Thread(target=lambda: written.append(upsert(store, [trade(tid, 4)])))
        writer.start()

        def waiting() -> list[Any]:
            # A fresh transaction per look: pg_stat_activity is a snapshot per transaction.
            with engine.connect() as watcher:
                return watcher.execute(BLOCKED_BY, {"holder": holder_pid}).all()

        blocked = wait_for(waiting, 10, "the v4 writer to wait for the v5 holder")
        assert len(blocked) == 1, blocked
        other = unique("T")
        elsewhere = threading.Thread(target=lambda: upsert(store, [trade(other, 1)]))
        elsewhere.start()
        elsewhere.join(10)
        assert not elsewhere.is_alive(), "a writer of another trade_id waited too"
        assert writer.is_alive()
        assert written == []
        holding.commit()
    writer.join(10)
    assert written == [set()]
    assert [r.trade.version for r in store.versions(tid, TODAY)] == [5]
    engine.dispose()


def test_page_is_byte_ordered_and_keyset(trade_store: SqlTradeStore) -> None:
    book = unique("book")
    ids = ["b", "a", "B", "é", "Z", "aa"]
    upsert(trade_store, [trade(f"{book}-{i}", 1, book=book) for i in ids])
    where = TradeFilter(book_id=book)
    seen: list[str] = []
    after = None
    while True:
        page = trade_store.page(after, 2, where, TODAY)
        if not page:
            break
        seen += [r.trade.trade_id for r in page]
        after = (page[-1].trade.trade_id, page[-1].trade.version)
    assert seen == sorted((f"{book}-{i}" for i in ids), key=str.encode)


def test_filters_and_expiry(trade_store: SqlTradeStore) -> None:
    book, cp = unique("book"), unique("cp")
    live, old = unique("T"), unique("T")
    upsert(trade_store, [trade(live, 1, cp=cp, book=book), trade(old, 1, book=book, days=-2)])
    rows = {
        r.trade.trade_id: r for r in trade_store.page(None, 10, TradeFilter(book_id=book), TODAY)
    }
    assert rows[old].expired is True  # computed on read before any sweep
    assert rows[live].expired is False
    assert [
        r.trade.trade_id for r in trade_store.page(None, 10, TradeFilter(counterparty_id=cp), TODAY)
    ] == [live]
    expired = trade_store.page(None, 10, TradeFilter(book_id=book, expired=True), TODAY)
    assert [r.trade.trade_id for r in expired] == [old]
    assert trade_store.expire(TODAY) >= 1
    assert trade_store.expire(TODAY) == 0
    # The flag is now stored: it stays even when read "as of" an earlier day.
    assert trade_store.versions(old, TODAY - timedelta(days=30))[0].expired is True


def test_unreachable_database_is_unavailable() -> None:
    store = SqlTradeStore(make_engine("postgresql+psycopg://x:y@127.0.0.1:1/none"))
    with pytest.raises(Unavailable):
        store.ping()


def test_expiry_sweeps_in_chunks_until_nothing_is_due(trade_store: SqlTradeStore) -> None:
    """Each chunk is its own statement (none may outlive the statement timeout), and the
    sweep goes on until a chunk comes back short."""
    tid = unique("T")
    upsert(trade_store, [trade(tid, v, days=-5) for v in range(1, 8)])
    trade_store.expire(TODAY - timedelta(days=30))  # nothing due yet on that date
    assert trade_store.expire(TODAY, chunk=3) >= 7
    assert all(r.expired for r in trade_store.versions(tid, TODAY - timedelta(days=30)))
    assert trade_store.expire(TODAY, chunk=3) == 0
