"""The trade store in SQL (SQLAlchemy 2 core): PostgreSQL over psycopg 3, or a SQLite file.

One implementation serves both profiles; the dialects differ only in the upsert construct
and in how the migration writes the version guard.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Row,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError

from adapters.tables import request_outcomes, trades
from domain.decided import Decided, outcome_of
from domain.ports import StoredTrade, TradeFilter, Unavailable
from domain.status import Outcome, RequestState
from domain.trade import ReasonCode, Trade

T = TypeVar("T")


def make_engine(url: str, pool_size: int = 10) -> Engine:
    """A pooled engine: pre-pinged for PostgreSQL, WAL with a busy timeout for SQLite."""
    if url.startswith("sqlite"):
        engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5},
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back naive; every timestamp we write is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def expired_expr(as_of: date) -> ColumnElement[bool]:
    """Expired as reads must show it: flagged by the sweep, or matured since."""
    return or_(trades.c.expired, trades.c.maturity_date < as_of)


def _stored(row: Row[Any]) -> StoredTrade:
    return StoredTrade(
        trade=Trade(
            trade_id=row.trade_id,
            version=row.version,
            counterparty_id=row.counterparty_id,
            book_id=row.book_id,
            maturity_date=row.maturity_date,
            created_date=row.created_date,
        ),
        expired=bool(row.is_expired),
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


def dedupe_last(trades_in: Sequence[Trade]) -> list[Trade]:
    """Keep the last submission of each (trade_id, version), ordered by (trade_id, version).

    One statement may not upsert a row twice, and ascending order per trade_id both matches
    the dataflow's order of acceptance and takes the store's row locks in one global order.
    """
    last = {(t.trade_id, t.version): t for t in trades_in}
    return [last[key] for key in sorted(last)]


class SqlTradeStore:
    """The trade store; the version guard is a trigger in the database (see migrations)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise Unavailable(f"trade store unavailable: {exc.orig or exc}") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise Unavailable(f"trade store connection lost: {exc.orig or exc}") from exc
            raise

    def _run(self, fn: Callable[[Connection], T]) -> T:
        with self._connect() as conn:
            return fn(conn)

    def highest_versions(self, trade_ids: Collection[str]) -> dict[str, int]:
        if not trade_ids:
            return {}
        query = (
            select(trades.c.trade_id, func.max(trades.c.version))
            .where(trades.c.trade_id.in_(list(trade_ids)))
            .group_by(trades.c.trade_id)
        )
        return self._run(lambda conn: {tid: v for tid, v in conn.execute(query)})  # noqa: C416

    def apply(self, trades_in: Sequence[Trade]) -> set[tuple[str, int]]:
        return self._run(lambda conn: _upsert(conn, trades_in))

    def record(self, decided: Sequence[Decided]) -> list[Outcome]:
        return self._run(lambda conn: _record(conn, decided))

    def _select(self, as_of: date) -> Any:
        return select(
            trades.c.trade_id,
            trades.c.version,
            trades.c.counterparty_id,
            trades.c.book_id,
            trades.c.maturity_date,
            trades.c.created_date,
            expired_expr(as_of).label("is_expired"),
            trades.c.created_at,
            trades.c.updated_at,
        )

    def versions(self, trade_id: str, as_of: date) -> list[StoredTrade]:
        query = self._select(as_of).where(trades.c.trade_id == trade_id).order_by(trades.c.version)
        return self._run(lambda conn: [_stored(r) for r in conn.execute(query)])

    def page(
        self, after: tuple[str, int] | None, limit: int, where: TradeFilter, as_of: date
    ) -> list[StoredTrade]:
        conditions: list[ColumnElement[bool]] = []
        if after is not None:
            conditions.append(tuple_(trades.c.trade_id, trades.c.version) > tuple_(*after))
        if where.book_id is not None:
            conditions.append(trades.c.book_id == where.book_id)
        if where.counterparty_id is not None:
            conditions.append(trades.c.counterparty_id == where.counterparty_id)
        if where.expired is not None:
            flag = expired_expr(as_of)
            conditions.append(flag if where.expired else ~flag)
        query = (
            self._select(as_of)
            .where(and_(True, *conditions))
            .order_by(trades.c.trade_id, trades.c.version)
            .limit(limit)
        )
        return self._run(lambda conn: [_stored(r) for r in conn.execute(query)])

    def expire(self, as_of: date) -> int:
        stmt = (
            update(trades)
            .where(~trades.c.expired, trades.c.maturity_date < as_of)
            .values(expired=True, updated_at=datetime.now(UTC))
        )
        return self._run(lambda conn: conn.execute(stmt).rowcount)

    def ping(self) -> None:
        self._run(lambda conn: conn.execute(text("SELECT 1")))


def _upsert(conn: Connection, trades_in: Sequence[Trade]) -> set[tuple[str, int]]:
    """One multi-row upsert; the guard trigger silently skips rows below the head."""
    now = datetime.now(UTC)
    rows = [
        {
            "created_at": now,
            "updated_at": now,
            "trade_id": t.trade_id,
            "version": t.version,
            "counterparty_id": t.counterparty_id,
            "book_id": t.book_id,
            "maturity_date": t.maturity_date,
            "created_date": t.created_date,
            "expired": False,
        }
        for t in dedupe_last(trades_in)
    ]
    if not rows:
        return set()
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    values = insert(trades).values(rows)
    stmt = values.on_conflict_do_update(
        index_elements=[trades.c.trade_id, trades.c.version],
        set_={
            "counterparty_id": values.excluded.counterparty_id,
            "book_id": values.excluded.book_id,
            "maturity_date": values.excluded.maturity_date,
            "created_date": values.excluded.created_date,
            "expired": values.excluded.expired,
            "updated_at": values.excluded.updated_at,
        },
    ).returning(trades.c.trade_id, trades.c.version)
    return {(tid, v) for tid, v in conn.execute(stmt)}


def _logged(row: Row[Any]) -> Outcome:
    return Outcome(
        request_id=row.request_id,
        trade_id=row.trade_id,
        version=row.version,
        state=RequestState(row.state),
        reason_code=ReasonCode(row.reason_code) if row.reason_code else None,
        failure_reason=row.failure_reason,
        accepted_at=as_utc(row.accepted_at) if row.accepted_at else None,
    )


def _record(conn: Connection, decided: Sequence[Decided]) -> list[Outcome]:
    """Skip requests already logged, apply the rest, log their outcomes; all in one txn."""
    if not decided:
        return []
    ids = [d.message.request_id for d in decided]
    logged = {
        row.request_id: _logged(row)
        for row in conn.execute(
            select(request_outcomes).where(request_outcomes.c.request_id.in_(ids))
        )
    }
    fresh = [d for d in decided if d.message.request_id not in logged]
    stored = _upsert(conn, [d.message.trade for d in fresh if d.accepted])
    outcomes = {d.message.request_id: outcome_of(d, stored) for d in fresh}
    if outcomes:
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        conn.execute(
            insert(request_outcomes)
            .values(
                [
                    {
                        "request_id": o.request_id,
                        "trade_id": o.trade_id,
                        "version": o.version,
                        "state": o.state.value,
                        "reason_code": o.reason_code.value if o.reason_code else None,
                        "failure_reason": o.failure_reason,
                        "accepted_at": o.accepted_at,
                        "decided_at": datetime.now(UTC),
                    }
                    for o in outcomes.values()
                ]
            )
            .on_conflict_do_nothing(index_elements=[request_outcomes.c.request_id])
        )
    return [logged.get(rid) or outcomes[rid] for rid in ids]
