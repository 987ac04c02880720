"""An order's customer and an item's order are kept references, not foreign keys.

Every order write (single, batch, import) inserts the order with the customer id it found or created in the same
transaction, and the order's items with the order id its insert has just returned. Customers and orders are never
deleted (erasure anonymises a customer; a batch deletes only customers it created itself and gave no order), so
the two foreign keys were per-row checks that could not fail: a lookup and a KEY SHARE lock of the referred row for
every order and every item. PostgreSQL's statement log over ten batches of 1,000 orders (2,000 items) on a new
database: the items' COPY 43.6 -> 9.2 ms per batch and the orders' insert 26.1 -> 11.7 ms once they were dropped.
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

# (table, column, referred table, ON DELETE of the key) of each foreign key this revision drops. The items first:
# on SQLite batch mode rebuilds each table, and nothing refers to order_item.
KEPT_REFERENCES = (
    ("order_item", "order_id", "customer_order", "CASCADE"),
    ("customer_order", "customer_id", "customer", None),
)


def upgrade() -> None:
    for table, column, referred, _on_delete in KEPT_REFERENCES:
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_constraint(f"fk_{table}_{column}_{referred}", type_="foreignkey")


def downgrade() -> None:
    for table, column, referred, on_delete in reversed(KEPT_REFERENCES):
        with op.batch_alter_table(table) as batch_op:
            name = f"fk_{table}_{column}_{referred}"
            batch_op.create_foreign_key(name, referred, [column], ["id"], ondelete=on_delete)
