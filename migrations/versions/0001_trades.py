"""Create the trades table, its version guard and the decision log.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The store guards itself (README, Guarantees): whatever the client, a version below the
# highest stored for its trade_id is skipped (the row is not written), and a row's key never
# changes. The advisory lock serialises concurrent writers of one trade_id so the check
# cannot race.
PG_GUARD = """
CREATE FUNCTION trades_guard_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF NEW.trade_id <> OLD.trade_id OR NEW.version <> OLD.version THEN
            RAISE EXCEPTION 'trades: trade_id and version are immutable';
        END IF;
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended(NEW.trade_id, 0));
    IF EXISTS (
        SELECT 1 FROM trades WHERE trade_id = NEW.trade_id AND version > NEW.version
    ) THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER trades_guard_version
    BEFORE INSERT OR UPDATE ON trades
    FOR EACH ROW EXECUTE FUNCTION trades_guard_version();
"""

# SQLite has one writer at a time, so the check needs no lock; RAISE(IGNORE) skips the row.
SQLITE_GUARD = [
    """
    CREATE TRIGGER trades_guard_version BEFORE INSERT ON trades
    BEGIN
        SELECT RAISE(IGNORE) WHERE EXISTS (
            SELECT 1 FROM trades WHERE trade_id = NEW.trade_id AND version > NEW.version
        );
    END
    """,
    """
    CREATE TRIGGER trades_immutable_key BEFORE UPDATE OF trade_id, version ON trades
    WHEN NEW.trade_id <> OLD.trade_id OR NEW.version <> OLD.version
    BEGIN
        SELECT RAISE(ABORT, 'trades: trade_id and version are immutable');
    END
    """,
]


def byte_ordered_id() -> sa.types.TypeEngine[str]:
    return sa.String(64).with_variant(sa.String(64, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "trades",
        sa.Column("trade_id", byte_ordered_id(), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("counterparty_id", sa.String(64), nullable=False),
        sa.Column("book_id", sa.String(64), nullable=False),
        sa.Column("maturity_date", sa.Date, nullable=False),
        sa.Column("created_date", sa.Date, nullable=False),
        sa.Column("expired", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint("version >= 1", name="trades_version_positive"),
    )
    op.create_index("ix_trades_book_id", "trades", ["book_id"])
    op.create_index("ix_trades_counterparty_id", "trades", ["counterparty_id"])
    op.create_index(
        "ix_trades_unexpired_maturity",
        "trades",
        ["maturity_date"],
        postgresql_where=sa.text("NOT expired"),
        sqlite_where=sa.text("NOT expired"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_GUARD)
    else:
        for statement in SQLITE_GUARD:
            op.execute(statement)
    op.create_table(
        "request_outcomes",
        sa.Column("request_id", byte_ordered_id(), primary_key=True),
        sa.Column("trade_id", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason_code", sa.String(32)),
        sa.Column("failure_reason", sa.String(256)),
        sa.Column("accepted_at", sa.DateTime(timezone=True)),
        sa.Column(
            "decided_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )


def downgrade() -> None:
    op.drop_table("request_outcomes")
    op.drop_table("trades")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS trades_guard_version()")
