"""An order's channel holds what the API accepts: up to 255 characters, like every other label.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # On SQLite a type change rebuilds the table (batch mode); on PostgreSQL widening a varchar is instant.
    with op.batch_alter_table("customer_order") as batch:
        batch.alter_column("channel", existing_type=sa.String(length=64), type_=sa.String(length=255))


def downgrade() -> None:
    with op.batch_alter_table("customer_order") as batch:
        batch.alter_column("channel", existing_type=sa.String(length=255), type_=sa.String(length=64))
