"""The listing's JSON as the database writes it equals, byte for byte, the API's own encoding
of the same rows (``trades_json`` over ``page``), on PostgreSQL and on SQLite; and its
cursor and "more" flag are those of the rows.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import update

from adapters.sql import SqlTradeStore
from adapters.tables import trades
from domain.ports import TradeFilter
from ingest_api.reads import trades_json
from tests.conftest import unique
from tests.integration.test_trade_store import TODAY, store_url, trade, trade_store
from tests.support import upsert

__all__ = ["store_url", "trade_store"]  # the fixtures, shared with the store's own tests

IDS = ["b", "a", "B", "é", "Z", "aa", 'q"uote', "back\\slash", "😀", "a b"]
FILTERS = [
    {},
    {"expired": True},
    {"expired": False},
    {"counterparty_id": "CP-2"},
    {"counterparty_id": "CP-2", "expired": False},
]


def test_encoded_pages_equal_the_apis_encoding_row_by_row(trade_store: SqlTradeStore) -> None:
    """Every shape of filter, walked in pages of 3 and read whole: same bytes, same cursor."""
    book = unique("book")
    rows = [
        trade(f"{book}-{tid}", version, cp=f"CP-{i % 3}", book=book, days=-2 if i % 4 else 5)
        for i, tid in enumerate(IDS)
        for version in (1, 2)
    ]
    upsert(trade_store, rows)
    assert trade_store.expire(TODAY - timedelta(days=30)) == 0  # flagged: none; computed: some
    with trade_store._engine.begin() as conn:  # a whole second: no fraction is written
        conn.execute(
            update(trades)
            .where(trades.c.trade_id == f"{book}-a")
            .values(created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
        )
    for fields in FILTERS:
        where = TradeFilter(book_id=book, **fields)  # type: ignore[arg-type]
        expected = trade_store.page(None, 1000, where, TODAY)
        assert expected, fields
        whole = trade_store.encoded_page(None, 1000, where, TODAY)
        assert whole.body == trades_json(expected), fields
        assert whole.more is False
        walked: list[object] = []
        after = None
        while True:
            page = trade_store.encoded_page(after, 3, where, TODAY)
            rows_ = trade_store.page(after, 4, where, TODAY)
            assert page.body == trades_json(rows_[:3]), fields
            assert page.more is (len(rows_) > 3)
            full = rows_[2].trade if len(rows_) >= 3 else None
            assert page.last == ((full.trade_id, full.version) if full else None)
            walked += orjson.loads(page.body)
            if not page.more:
                break
            after = page.last
        assert walked == orjson.loads(whole.body), fields
    listed = orjson.loads(
        trade_store.encoded_page(None, 1000, TradeFilter(book_id=book), TODAY).body
    )
    assert {r["expired"] for r in listed} == {True, False}
    assert "2026-01-02T03:04:05Z" in {r["created_at"] for r in listed}


def test_an_empty_page_is_an_empty_array(trade_store: SqlTradeStore) -> None:
    page = trade_store.encoded_page(None, 10, TradeFilter(book_id=unique("none")), TODAY)
    assert (page.body, page.last, page.more) == (b"[]", None, False)
