"""The trade store in SQL (SQLAlchemy 2 core): PostgreSQL over psycopg 3, or a SQLite file.

One implementation serves both profiles; the dialects differ only in the upsert construct
and in how the migration writes the version guard.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime
from functools import cache, partial
from typing import Any, TypeVar

import psycopg
from psycopg.abc import RV, PQGen
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import (
    ColumnElement,
    Connection,
    Date,
    Engine,
    Integer,
    Row,
    Select,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    delete,
    event,
    func,
    literal,
    make_url,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.exc import DBAPIError, OperationalError

from adapters.sqlite_file import DELETE_CHUNK, PRAGMAS, READ_PRAGMAS
from adapters.tables import request_outcomes, trades
from domain.ports import DecisionLog, EncodedPage, StoredTrade, TradeFilter, Unavailable
from domain.status import Outcome, ReasonCode, RequestState
from domain.trade import Trade

T = TypeVar("T")


def make_engine(
    url: str, pool_size: int = 10, statement_timeout_ms: int = 5_000, reads_only: bool = False
) -> Engine:
    """A pooled engine: pre-pinged for PostgreSQL, WAL with a busy timeout for SQLite.

    Every PostgreSQL call is bounded: connecting by ``connect_timeout``; a statement, and a
    transaction left idle, by the server after ``statement_timeout_ms``; and any wait for a
    reply by the client, ``REPLY_GRACE_S`` later (see ``_BoundedConnection``).

    SQLite keeps at most ``pool_size`` connections (each may grow its page cache), and an
    engine that only reads (the API's) opens them with the readers' small cache.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, pool_size=pool_size, max_overflow=0)
        event.listen(
            engine, "connect", partial(_sqlite_pragmas, READ_PRAGMAS if reads_only else PRAGMAS)
        )
        return engine
    timeouts = (
        f"-c statement_timeout={statement_timeout_ms}"
        f" -c idle_in_transaction_session_timeout={statement_timeout_ms}"
    )
    # connect_args replace the URL's own ``options`` (e.g. a search_path): keep them.
    given = make_url(url).query.get("options", "")
    options = " ".join([*(given if isinstance(given, tuple) else [given]), timeouts]).strip()
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "options": options},
    )
    reply_timeout_s = statement_timeout_ms / 1000 + REPLY_GRACE_S
    event.listen(engine, "do_connect", partial(_bounded_connect, reply_timeout_s))
    event.listen(engine, "connect", _binary_arrays)
    return engine


# Time for the server's own statement_timeout error to arrive before the client gives up.
REPLY_GRACE_S = 2.0


class _BoundedConnection(psycopg.Connection[Any]):
    """A psycopg connection that stops waiting for a server that stops answering.

    A frozen server (SIGSTOP, a hung host) enforces no statement_timeout, and its kernel
    still acknowledges every packet, so TCP keepalives and tcp_user_timeout never fire (a
    frozen proxy left a query blocked for 20 s with both set to 2 s). So every wait for a
    reply is bounded here; on expiry the connection is closed, as its protocol state is
    unknown, which SQLAlchemy treats as a disconnect.
    """

    reply_timeout_s: float

    def wait(self, gen: PQGen[RV], interval: float = 0.1, timeout: float | None = None) -> RV:
        if timeout is not None:  # psycopg's own bounded waits handle their timeout
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, self.reply_timeout_s)
        except psycopg.errors._WaitTimeout as exc:  # documented by wait(), though private
            self.pgconn.finish()
            raise psycopg.errors.ConnectionTimeout(
                f"no reply from the server in {self.reply_timeout_s:g} s; connection closed"
            ) from exc


def _bounded_connect(
    reply_timeout_s: float, _dialect: Any, _record: Any, cargs: Any, cparams: Any
) -> _BoundedConnection:
    conn = _BoundedConnection.connect(*cargs, **cparams)
    conn.reply_timeout_s = reply_timeout_s
    return conn


def _binary_arrays(dbapi_connection: Any, _record: Any) -> None:
    """Send list parameters (the unnest() columns) in binary: psycopg's text array dumper
    escapes every element with a regex, a quarter of the processor's time at 1,000-row
    batches; binary is 4× cheaper."""
    dbapi_connection.adapters.register_dumper(list, ListBinaryDumper)


def _sqlite_pragmas(pragmas: Sequence[str], dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    for pragma in pragmas:
        cursor.execute(pragma)
    cursor.close()


# SQLSTATE classes worth waiting out: connection exception, insufficient resources,
# operator intervention (e.g. admin shutdown), transaction rollback (deadlock, serialization).
TRANSIENT_SQLSTATE_CLASSES = {"08", "53", "57", "40"}


def transient(exc: DBAPIError) -> bool:
    """An outage to retry, as opposed to a bug or bad data that retrying cannot fix."""
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:  # psycopg could not talk to the server at all; SQLite: locked/busy
        return isinstance(exc, OperationalError)
    return str(sqlstate)[:2] in TRANSIENT_SQLSTATE_CLASSES


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back naive; every timestamp we write is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def expired_expr(as_of: date | ColumnElement[date]) -> ColumnElement[bool]:
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


def _document(dialect: str) -> ColumnElement[str]:
    """A row's JSON exactly as the API's own encoder writes it (``ingest_api.routes``'
    ``trades_json``: compact, fields in TradeOut's order, times in UTC with ``Z`` and
    microseconds unless zero), as one SQL text expression of ``dialect``."""
    postgres = dialect == "postgresql"

    def string(value: Any) -> ColumnElement[str]:
        return cast(func.to_json(value), Text) if postgres else func.json_quote(value)

    def day(column: Any) -> ColumnElement[str]:
        return string(func.to_char(column, "YYYY-MM-DD") if postgres else column)

    def moment(column: Any) -> ColumnElement[str]:
        # SQLite holds the naive UTC text SQLAlchemy writes, "YYYY-MM-DD HH:MM:SS.ffffff".
        if postgres:
            iso = func.to_char(func.timezone("UTC", column), 'YYYY-MM-DD"T"HH24:MI:SS.US')
        else:
            iso = func.replace(column, " ", "T")
        return string(func.replace(iso, ".000000", "").concat("Z"))

    fields: list[tuple[str, ColumnElement[Any]]] = [
        ("trade_id", string(trades.c.trade_id)),
        ("version", cast(trades.c.version, Text)),
        ("counterparty_id", string(trades.c.counterparty_id)),
        ("book_id", string(trades.c.book_id)),
        ("maturity_date", day(trades.c.maturity_date)),
        ("created_date", day(trades.c.created_date)),
        ("expired", case((expired_expr(AS_OF), "true"), else_="false")),
        ("created_at", moment(trades.c.created_at)),
        ("updated_at", moment(trades.c.updated_at)),
    ]
    document: ColumnElement[str] = literal("{")
    for i, (name, value) in enumerate(fields):
        document = document.concat(f'{"," if i else ""}"{name}":').concat(value)
    return document.concat("}")


# The listing's statements are built once per shape (which filters are given) and dialect,
# their values bound at each call: building and hashing a statement this size cost a read
# ~5 ms of the interpreter, about what the database took to run it.
AS_OF = bindparam("as_of", type_=Date)
_SELECT = select(
    trades.c.trade_id,
    trades.c.version,
    trades.c.counterparty_id,
    trades.c.book_id,
    trades.c.maturity_date,
    trades.c.created_date,
    expired_expr(AS_OF).label("is_expired"),
    trades.c.created_at,
    trades.c.updated_at,
)
# Which of a listing's conditions apply: after a cursor, by book, by counterparty, expired.
Shape = tuple[bool, bool, bool, bool | None]


def _shape(after: tuple[str, int] | None, where: TradeFilter) -> Shape:
    return (
        after is not None,
        where.book_id is not None,
        where.counterparty_id is not None,
        where.expired,
    )


def _params(after: tuple[str, int] | None, where: TradeFilter, as_of: date) -> dict[str, Any]:
    after_id, after_version = after or (None, None)
    return {
        "as_of": as_of,
        "after_id": after_id,
        "after_version": after_version,
        "book_id": where.book_id,
        "counterparty_id": where.counterparty_id,
    }


def _listing(query: Select[Any], shape: Shape, rows: str = "rows") -> Select[Any]:
    """``query`` over the rows of this shape's conditions, ordered by (trade_id bytes,
    version), at most the bound parameter ``rows`` of them."""
    keyset, by_book, by_counterparty, expired = shape
    conditions: list[ColumnElement[bool]] = []
    if keyset:
        after = tuple_(
            bindparam("after_id", type_=String), bindparam("after_version", type_=Integer)
        )
        conditions.append(tuple_(trades.c.trade_id, trades.c.version) > after)
    if by_book:
        conditions.append(trades.c.book_id == bindparam("book_id", type_=String))
    if by_counterparty:
        conditions.append(trades.c.counterparty_id == bindparam("counterparty_id", type_=String))
    if expired is not None:
        flag = expired_expr(AS_OF)
        conditions.append(flag if expired else ~flag)
    return (
        query.where(and_(True, *conditions))
        .order_by(trades.c.trade_id, trades.c.version)
        .limit(bindparam(rows, type_=Integer))
    )


@cache
def _page_query(shape: Shape) -> Select[Any]:
    return _listing(_SELECT, shape)


@cache
def _encoded_page_query(dialect: str, shape: Shape) -> Select[Any]:
    """The first ``limit`` rows' documents joined into one text; the key of row ``limit``
    (NULLs when there are fewer); and whether a row follows it. Scalar subqueries over the
    same listing, one statement: numbering the rows in a window instead cost SQLite a third
    of the statement (it buffers the rows, documents and all), and the keys alone are read
    from the index."""
    key = (trades.c.trade_id, trades.c.version)
    docs = _listing(select(*key, _document(dialect).label("doc")), shape, rows="limit").subquery()
    if dialect == "postgresql":
        joined = func.string_agg(docs.c.doc, aggregate_order_by(literal(","), *docs.c[:2]))
    else:  # SQLite before 3.44 has no ORDER BY in an aggregate; it joins in the order
        # the subquery yields (its LIMIT keeps it from being flattened into the aggregate)
        joined = func.group_concat(docs.c.doc, ",")

    def at(offset: str) -> Select[Any]:
        """The listing's key at row ``offset`` + 1, if there is one."""
        return _listing(select(*key), shape, rows="one").offset(bindparam(offset, type_=Integer))

    last = at("last_at").subquery()
    return select(
        select(joined).scalar_subquery(),
        select(last.c.trade_id).scalar_subquery(),
        select(last.c.version).scalar_subquery(),
        select(at("limit").exists()).scalar_subquery(),
    )


def dedupe_last(trades_in: Sequence[Trade]) -> list[Trade]:
    """Keep the last submission of each (trade_id, version), ordered by (trade_id, version).

    One statement may not upsert a row twice, and ascending order per trade_id both matches
    the dataflow's order of acceptance and takes the store's row locks in one global order.
    """
    last = {(t.trade_id, t.version): t for t in trades_in}
    return [last[key] for key in sorted(last)]


EXPIRE_CHUNK = 10_000  # rows per expiry statement: ~0.2 s on PostgreSQL here


class SqlTradeStore:
    """The trade store: the API's reads (``TradeReader``) and the processor's heads and
    decision log (``DecisionStore``); the version guard is a trigger (see migrations)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @contextmanager
    def _connect(self) -> Iterator[Connection]:
        try:
            with self._engine.begin() as conn:
                yield conn
        except DBAPIError as exc:
            if transient(exc):
                raise Unavailable(f"trade store unavailable: {exc.orig or exc}") from exc
            raise

    def _run(self, fn: Callable[[Connection], T]) -> T:
        with self._connect() as conn:
            return fn(conn)

    def heads(self, trade_ids: Collection[str]) -> dict[str, int]:
        if not trade_ids:
            return {}
        return self._run(lambda conn: statements_for(conn).heads(conn, list(trade_ids)))

    @contextmanager
    def transaction(self) -> Iterator[DecisionLog]:
        """One transaction's decision-log primitives (``domain.ports.DecisionLog``)."""
        with self._connect() as conn:
            yield _DecisionLog(conn)

    def versions(self, trade_id: str, as_of: date) -> list[StoredTrade]:
        query = _SELECT.where(trades.c.trade_id == trade_id).order_by(trades.c.version)
        return self._run(lambda conn: [_stored(r) for r in conn.execute(query, {"as_of": as_of})])

    def page(
        self, after: tuple[str, int] | None, limit: int, where: TradeFilter, as_of: date
    ) -> list[StoredTrade]:
        query = _page_query(_shape(after, where))
        params = _params(after, where, as_of) | {"rows": limit}
        return self._run(lambda conn: [_stored(r) for r in conn.execute(query, params)])

    def encoded_page(
        self, after: tuple[str, int] | None, limit: int, where: TradeFilter, as_of: date
    ) -> EncodedPage:
        """``page``'s rows as the database writes their JSON: one statement, one text value
        back, so no Python runs per row (building StoredTrades took ~28 µs a row, on read
        threads sharing the interpreter lock with the event loop that acknowledges POSTs).
        Whether more follow is asked of the index, past the page."""
        query = _encoded_page_query(self._engine.dialect.name, _shape(after, where))
        params = _params(after, where, as_of) | {"limit": limit, "last_at": limit - 1, "one": 1}

        def read(conn: Connection) -> EncodedPage:
            body, trade_id, version, more = conn.execute(query, params).one()
            return EncodedPage(
                f"[{body or ''}]".encode(),
                (trade_id, version) if trade_id is not None else None,
                bool(more),
            )

        return self._run(read)

    def expire(self, as_of: date, chunk: int = EXPIRE_CHUNK) -> int:
        """In chunks of ``chunk`` rows, one transaction each: however many trades mature on
        one day, no statement outlives the statement timeout, and a sweep cut short by an
        outage keeps what it did."""
        due = (
            select(trades.c.trade_id, trades.c.version)
            .where(~trades.c.expired, trades.c.maturity_date < as_of)
            .limit(chunk)
        )
        key = tuple_(trades.c.trade_id, trades.c.version)

        def one_chunk(conn: Connection) -> int:
            stmt = (
                update(trades)
                .where(key.in_(due))
                .values(expired=True, updated_at=datetime.now(UTC))
            )
            return conn.execute(stmt).rowcount

        return self._in_chunks(one_chunk, chunk)

    def delete_outcomes(self, decided_before: datetime) -> int:
        """Delete decision-log rows decided before ``decided_before``, a chunk per
        transaction so the sink never waits long behind the sweep; return how many."""
        oldest = (
            select(request_outcomes.c.request_id)
            # UTC: SQLite's DateTime drops the zone, and every stored time is UTC.
            .where(request_outcomes.c.decided_at < decided_before.astimezone(UTC))
            .limit(DELETE_CHUNK)
        )
        stmt = delete(request_outcomes).where(request_outcomes.c.request_id.in_(oldest))
        return self._in_chunks(lambda conn: conn.execute(stmt).rowcount, DELETE_CHUNK)

    def _in_chunks(self, one_chunk: Callable[[Connection], int], chunk: int) -> int:
        """Run ``one_chunk`` (at most ``chunk`` rows) a transaction each, until it comes
        back short; return how many rows it touched in all."""
        total = 0
        while True:
            count = self._run(one_chunk)
            total += count
            if count < chunk:
                return total

    def ping(self) -> None:
        self._run(lambda conn: conn.execute(text("SELECT 1")))

    def counts(self, as_of: date, decided_since: datetime) -> dict[str, int]:
        """`trade-store status`'s row counts, in one transaction: ``trades`` and how many of
        them are ``expired`` as reads show it, the ``decision_log``, and its rows
        ``decided_since`` (a range of the decided_at index)."""
        rows = select(
            func.count(), func.coalesce(func.sum(case((expired_expr(as_of), 1), else_=0)), 0)
        ).select_from(trades)
        logged = select(func.count()).select_from(request_outcomes)
        # UTC: SQLite's DateTime drops the zone, and every stored time is UTC.
        recent = logged.where(request_outcomes.c.decided_at >= decided_since.astimezone(UTC))

        def read(conn: Connection) -> dict[str, int]:
            total, expired = conn.execute(rows).one()
            return {
                "trades": total,
                "expired": expired,
                "decision_log": conn.execute(logged).scalar_one(),
                "decided_since": conn.execute(recent).scalar_one(),
            }

        return self._run(read)


class PostgresStatements:
    """Whole batches as one statement each, by passing columns as arrays to unnest()."""

    HEADS = text(
        "SELECT trade_id, max(version) FROM trades"
        " WHERE trade_id = ANY(CAST(:ids AS text[])) GROUP BY trade_id"
    )
    LOGGED = text(
        "SELECT request_id, trade_id, version, state, reason_code, failure_reason, accepted_at,"
        " decided_at FROM request_outcomes WHERE request_id = ANY(CAST(:ids AS text[]))"
    )
    UPSERT = text(
        "INSERT INTO trades (trade_id, version, counterparty_id, book_id, maturity_date,"
        " created_date, expired, created_at, updated_at)"
        " SELECT u.*, false, :now, :now FROM unnest(CAST(:ids AS text[]),"
        " CAST(:versions AS int[]), CAST(:cps AS text[]), CAST(:books AS text[]),"
        " CAST(:maturities AS date[]), CAST(:created AS date[])) AS u"
        " ON CONFLICT (trade_id, version) DO UPDATE SET"
        " counterparty_id = excluded.counterparty_id, book_id = excluded.book_id,"
        " maturity_date = excluded.maturity_date, created_date = excluded.created_date,"
        " expired = false, updated_at = excluded.updated_at"
        " RETURNING trade_id, version"
    )
    LOG = text(
        "INSERT INTO request_outcomes (request_id, trade_id, version, state, reason_code,"
        " failure_reason, accepted_at, decided_at)"
        " SELECT * FROM unnest(CAST(:rids AS text[]), CAST(:ids AS text[]),"
        " CAST(:versions AS int[]), CAST(:states AS text[]), CAST(:codes AS text[]),"
        " CAST(:reasons AS text[]), CAST(:accepted AS timestamptz[]),"
        " CAST(:decided AS timestamptz[]))"
        " ON CONFLICT (request_id) DO NOTHING"
    )

    def heads(self, conn: Connection, ids: list[str]) -> dict[str, int]:
        return {tid: v for tid, v in conn.execute(self.HEADS, {"ids": ids})}  # noqa: C416

    def logged(self, conn: Connection, ids: list[str]) -> dict[str, Outcome]:
        return {row[0]: _logged(row) for row in conn.execute(self.LOGGED, {"ids": ids})}

    def upsert(self, conn: Connection, rows: list[Trade], now: datetime) -> set[tuple[str, int]]:
        params = {
            "now": now,
            "ids": [t.trade_id for t in rows],
            "versions": [t.version for t in rows],
            "cps": [t.counterparty_id for t in rows],
            "books": [t.book_id for t in rows],
            "maturities": [t.maturity_date for t in rows],
            "created": [t.created_date for t in rows],
        }
        return {(tid, v) for tid, v in conn.execute(self.UPSERT, params)}

    def log(self, conn: Connection, outcomes: Sequence[Outcome]) -> None:
        conn.execute(
            self.LOG,
            {
                "rids": [o.request_id for o in outcomes],
                "ids": [o.trade_id for o in outcomes],
                "versions": [o.version for o in outcomes],
                "states": [o.state.value for o in outcomes],
                "codes": [o.reason_code.value if o.reason_code else None for o in outcomes],
                "reasons": [o.failure_reason for o in outcomes],
                "accepted": [o.accepted_at for o in outcomes],
                "decided": [o.logged_at() for o in outcomes],
            },
        )


def _sqlite_time(moment: datetime) -> str:
    """The text form SQLAlchemy's SQLite DateTime reads back (naive UTC)."""
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


class SqliteStatements:
    """SQLite runs in-process, so prepared statements per row cost microseconds; id lists
    travel as one JSON parameter."""

    HEADS = (
        "SELECT trade_id, max(version) FROM trades"
        " WHERE trade_id IN (SELECT value FROM json_each(?)) GROUP BY trade_id"
    )
    LOGGED = (
        "SELECT request_id, trade_id, version, state, reason_code, failure_reason, accepted_at,"
        " decided_at FROM request_outcomes WHERE request_id IN (SELECT value FROM json_each(?))"
    )
    UPSERT = (
        "INSERT INTO trades (trade_id, version, counterparty_id, book_id, maturity_date,"
        " created_date, expired, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)"
        " ON CONFLICT (trade_id, version) DO UPDATE SET"
        " counterparty_id = excluded.counterparty_id, book_id = excluded.book_id,"
        " maturity_date = excluded.maturity_date, created_date = excluded.created_date,"
        " expired = 0, updated_at = excluded.updated_at"
        " RETURNING trade_id, version"
    )
    LOG = (
        "INSERT INTO request_outcomes (request_id, trade_id, version, state, reason_code,"
        " failure_reason, accepted_at, decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (request_id) DO NOTHING"
    )

    @staticmethod
    def _cursor(conn: Connection) -> Any:
        return conn.connection.driver_connection.cursor()  # type: ignore[union-attr]

    def heads(self, conn: Connection, ids: list[str]) -> dict[str, int]:
        return dict(self._cursor(conn).execute(self.HEADS, (json.dumps(ids),)).fetchall())

    def logged(self, conn: Connection, ids: list[str]) -> dict[str, Outcome]:
        rows = self._cursor(conn).execute(self.LOGGED, (json.dumps(ids),)).fetchall()
        return {row[0]: _logged(row) for row in rows}

    def upsert(self, conn: Connection, rows: list[Trade], now: datetime) -> set[tuple[str, int]]:
        cursor = self._cursor(conn)
        stamp = _sqlite_time(now)
        written: set[tuple[str, int]] = set()
        for t in rows:
            cursor.execute(
                self.UPSERT,
                (
                    t.trade_id,
                    t.version,
                    t.counterparty_id,
                    t.book_id,
                    t.maturity_date.isoformat(),
                    t.created_date.isoformat(),
                    stamp,
                    stamp,
                ),
            )
            written.update((tid, v) for tid, v in cursor.fetchall())
        return written

    def log(self, conn: Connection, outcomes: Sequence[Outcome]) -> None:
        self._cursor(conn).executemany(
            self.LOG,
            [
                (
                    o.request_id,
                    o.trade_id,
                    o.version,
                    o.state.value,
                    o.reason_code.value if o.reason_code else None,
                    o.failure_reason,
                    _sqlite_time(o.accepted_at) if o.accepted_at else None,
                    _sqlite_time(o.logged_at()),
                )
                for o in outcomes
            ],
        )


POSTGRES = PostgresStatements()
SQLITE = SqliteStatements()


def statements_for(conn: Connection) -> PostgresStatements | SqliteStatements:
    return POSTGRES if conn.dialect.name == "postgresql" else SQLITE


def _upsert(conn: Connection, trades_in: Sequence[Trade]) -> set[tuple[str, int]]:
    """Upsert a batch; the guard trigger silently skips rows below the head."""
    rows = dedupe_last(trades_in)
    if not rows:
        return set()
    return statements_for(conn).upsert(conn, rows, datetime.now(UTC))


def _moment(value: datetime | str | None) -> datetime | None:
    """A logged timestamp in UTC (SQLite keeps naive text, PostgreSQL the session's zone),
    so a replayed outcome's status is written exactly as the first time."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return as_utc(moment).astimezone(UTC)


def _logged(row: Any) -> Outcome:
    request_id, trade_id, version, state, code, reason, accepted_at, decided_at = row
    return Outcome(
        request_id=request_id,
        trade_id=trade_id,
        version=version,
        state=RequestState(state),
        reason_code=ReasonCode(code) if code else None,
        failure_reason=reason,
        accepted_at=_moment(accepted_at),
        decided_at=_moment(decided_at),
    )


class _DecisionLog:
    """``domain.ports.DecisionLog`` on one open transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._sql = statements_for(conn)

    def logged(self, request_ids: Sequence[str]) -> dict[str, Outcome]:
        return self._sql.logged(self._conn, list(request_ids))

    def upsert(self, trades_in: Sequence[Trade]) -> set[tuple[str, int]]:
        return _upsert(self._conn, trades_in)

    def log(self, outcomes: Sequence[Outcome]) -> None:
        self._sql.log(self._conn, outcomes)
