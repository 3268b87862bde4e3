"""Alembic migrations: the only code that creates or alters the trade store's schema."""
