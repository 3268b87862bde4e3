"""SQLAlchemy table definitions: the trade store's schema as Alembic migrates it."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    func,
    text,
)

metadata = MetaData()


def byte_ordered_id() -> String:
    """An id compared byte by byte: "C" collation on PostgreSQL, SQLite's default BINARY."""
    return String(64).with_variant(String(64, collation="C"), "postgresql")


# trade_id is byte-ordered so every store lists trades in the same order.
trades = Table(
    "trades",
    metadata,
    Column("trade_id", byte_ordered_id(), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("counterparty_id", String(64), nullable=False),
    Column("book_id", String(64), nullable=False),
    Column("maturity_date", Date, nullable=False),
    Column("created_date", Date, nullable=False),
    Column("expired", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# The decision log: one row per decided request, committed with the rows it caused, so a
# replay after a crash finds the original outcome instead of deciding again.
request_outcomes = Table(
    "request_outcomes",
    metadata,
    Column("request_id", byte_ordered_id(), primary_key=True),
    Column("trade_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("reason_code", String(32)),
    Column("failure_reason", String(512)),
    Column("accepted_at", DateTime(timezone=True)),
    Column("decided_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
# The retention sweep deletes by age (migration 0002).
Index("ix_request_outcomes_decided_at", request_outcomes.c.decided_at)
