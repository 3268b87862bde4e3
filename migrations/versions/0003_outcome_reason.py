"""Decision log: failure reasons up to 512 characters (dead-letter reasons are cut there).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("request_outcomes") as batch:
        batch.alter_column("failure_reason", type_=sa.String(512), existing_type=sa.String(256))


def downgrade() -> None:
    with op.batch_alter_table("request_outcomes") as batch:
        batch.alter_column("failure_reason", type_=sa.String(256), existing_type=sa.String(512))
