"""Index the decision log by decided_at, for the retention sweep's deletes.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_request_outcomes_decided_at", "request_outcomes", ["decided_at"])


def downgrade() -> None:
    op.drop_index("ix_request_outcomes_decided_at", "request_outcomes")
