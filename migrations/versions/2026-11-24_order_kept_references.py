"""The write paths of orders and placements keep their customer and order references instead of foreign keys.

Every order write (single, batch, import) inserts the order with the customer id it found or created in the same
transaction, and the order's items with the order id its insert has just returned. Every writer of a score, a tier
or a history entry (the full run, the real-time re-score, a pin) takes the customer id from a customer row it read.
Customers and orders are never deleted (erasure anonymises a customer; a batch deletes only customers it created
itself and gave no order), so these foreign keys were per-row checks that could not fail: a lookup and a KEY SHARE
lock of the referred row for every order, item, new score, new tier and history entry. PostgreSQL's statement log
over ten batches of 1,000 orders (2,000 items, 200 new customers) on a new database: the items' COPY 43.6 -> 9.2
ms per batch and the orders' insert 26.1 -> 11.7 ms without the first two; the re-score's placement statement
(scores, tiers and history of the 200 customers) 9.5 -> 3.5 ms without the other three.
``kept_reference`` in loyalty.db.base says so on each column, and ``loyalty doctor``'s ``references`` check
verifies them as it does foreign keys.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column, referred table, ON DELETE of the key) of each foreign key this revision drops.
KEPT_REFERENCES = (
    ("order_item", "order_id", "customer_order", "CASCADE"),
    ("customer_order", "customer_id", "customer", None),
    ("customer_score", "customer_id", "customer", "CASCADE"),
    ("customer_tier", "customer_id", "customer", "CASCADE"),
    ("tier_history", "customer_id", "customer", "CASCADE"),
)


def upgrade() -> None:
    # On SQLite batch mode rebuilds each table (with foreign keys off: loyalty.db.migrate.schema_change).
    for table, column, referred, _on_delete in KEPT_REFERENCES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_constraint(f"fk_{table}_{column}_{referred}", type_="foreignkey")


def downgrade() -> None:
    for table, column, referred, on_delete in reversed(KEPT_REFERENCES):
        with op.batch_alter_table(table) as batch_op:
            name = f"fk_{table}_{column}_{referred}"
            batch_op.create_foreign_key(name, referred, [column], ["id"], ondelete=on_delete)
