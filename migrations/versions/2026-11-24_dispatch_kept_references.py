"""A campaign send's rows keep their references in the statements that write them, not in per-row foreign keys.

A send writes a member row per eligible customer, a code per treatment member and an event per code in one
statement. Their nine foreign keys were nine per-row checks (each a lookup and a row lock) for every treatment
member: 12 of the statement's 22.6 s at 200,000 members (EXPLAIN ANALYZE). Every value they checked comes from a
row the same transaction reads or writes (the send, its campaign and offer, the eligible customer, the tier entry
of a welcome code), in a table whose committed rows are never deleted; so no check could fail. ``kept_reference``
in loyalty.db.base says so on each column, and ``loyalty doctor``'s ``references`` check verifies them as it does
foreign keys. A campaign's members are read through its sends' keys, so their campaign index goes; the
one-code-per-tier-entry index becomes partial, so campaign codes (no entry) add nothing to it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column, referred table) of each foreign key this revision drops.
KEPT_REFERENCES = (
    ("campaign_member", "send_id", "campaign_send"),
    ("campaign_member", "customer_id", "customer"),
    ("campaign_member", "campaign_id", "campaign"),
    ("issued_code", "offer_id", "offer"),
    ("issued_code", "customer_id", "customer"),
    ("issued_code", "campaign_id", "campaign"),
    ("issued_code", "send_id", "campaign_send"),
    ("issued_code", "welcome_entry_id", "tier_history"),
    ("outbox_event", "customer_id", "customer"),
)


def upgrade() -> None:
    for table in dict.fromkeys(table for table, _column, _referred in KEPT_REFERENCES):
        # On SQLite batch mode rebuilds the table once; PostgreSQL drops each constraint in place.
        with op.batch_alter_table(table) as batch_op:
            for _table, column, referred in (key for key in KEPT_REFERENCES if key[0] == table):
                batch_op.drop_constraint(f"fk_{table}_{column}_{referred}", type_="foreignkey")
            if table == "campaign_member":
                batch_op.drop_index("ix_campaign_member_campaign_id_customer_id")
            if table == "issued_code":
                batch_op.drop_constraint("uq_issued_code_welcome_entry_id", type_="unique")
                batch_op.create_index(
                    "uq_issued_code_welcome_entry_id",
                    ["welcome_entry_id"],
                    unique=True,
                    postgresql_where=sa.text("welcome_entry_id IS NOT NULL"),
                    sqlite_where=sa.text("welcome_entry_id IS NOT NULL"),
                )


def downgrade() -> None:
    for table in dict.fromkeys(table for table, _column, _referred in KEPT_REFERENCES):
        with op.batch_alter_table(table) as batch_op:
            for _table, column, referred in (key for key in KEPT_REFERENCES if key[0] == table):
                batch_op.create_foreign_key(f"fk_{table}_{column}_{referred}", referred, [column], ["id"])
            if table == "campaign_member":
                batch_op.create_index(
                    "ix_campaign_member_campaign_id_customer_id", ["campaign_id", "customer_id"], unique=False
                )
            if table == "issued_code":
                batch_op.drop_index("uq_issued_code_welcome_entry_id")
                batch_op.create_unique_constraint("uq_issued_code_welcome_entry_id", ["welcome_entry_id"])
