"""Foundation: customers, orders and items, refunds, interaction events, referrals, API keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "api_key",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("scope", sa.String(length=20), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("scope IN ('storefront', 'marketing', 'admin')", name=op.f("ck_api_key_scope_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_key_key_hash")),
    )
    op.create_table(
        "customer",
        sa.Column("external_id", sa.String(length=255), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("joined_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attributes", sa.JSON(), nullable=False),
        sa.Column("marketing_opt_out", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customer")),
        sa.UniqueConstraint("external_id", name=op.f("uq_customer_external_id")),
    )
    op.create_table(
        "customer_order",
        sa.Column("external_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("placed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("refunded", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=True),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("refunded >= 0 AND refunded <= total", name=op.f("ck_customer_order_refunded_within_total")),
        sa.CheckConstraint("total >= 0", name=op.f("ck_customer_order_total_non_negative")),
        sa.ForeignKeyConstraint(["customer_id"], ["customer.id"], name=op.f("fk_customer_order_customer_id_customer")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customer_order")),
        sa.UniqueConstraint("external_id", name=op.f("uq_customer_order_external_id")),
    )
    with op.batch_alter_table("customer_order", schema=None) as batch_op:
        batch_op.create_index("ix_customer_order_customer_id_placed_at", ["customer_id", "placed_at"], unique=False)

    op.create_table(
        "interaction_event",
        sa.Column("external_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("target", sa.String(length=512), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "type IN ('page_view', 'product_view', 'ad_click', 'email_click', 'review', 'social_share')",
            name=op.f("ck_interaction_event_type_known"),
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customer.id"], name=op.f("fk_interaction_event_customer_id_customer")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_interaction_event")),
        sa.UniqueConstraint("external_id", name=op.f("uq_interaction_event_external_id")),
    )
    with op.batch_alter_table("interaction_event", schema=None) as batch_op:
        batch_op.create_index(
            "ix_interaction_event_customer_id_occurred_at", ["customer_id", "occurred_at"], unique=False
        )

    op.create_table(
        "referral",
        sa.Column("referrer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("referee_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("referrer_id <> referee_id", name=op.f("ck_referral_not_self")),
        sa.ForeignKeyConstraint(["referee_id"], ["customer.id"], name=op.f("fk_referral_referee_id_customer")),
        sa.ForeignKeyConstraint(["referrer_id"], ["customer.id"], name=op.f("fk_referral_referrer_id_customer")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_referral")),
        sa.UniqueConstraint("referee_id", name=op.f("uq_referral_referee_id")),
    )
    with op.batch_alter_table("referral", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_referral_referrer_id"), ["referrer_id"], unique=False)

    op.create_table(
        "order_item",
        sa.Column("order_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("sku", sa.String(length=255), nullable=False),
        sa.Column("category", sa.String(length=255), nullable=True),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price", sa.BigInteger(), nullable=False),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.CheckConstraint("quantity >= 1", name=op.f("ck_order_item_quantity_positive")),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["customer_order.id"],
            name=op.f("fk_order_item_order_id_customer_order"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_item")),
        sa.UniqueConstraint("order_id", "line_no", name=op.f("uq_order_item_order_id_line_no")),
    )
    op.create_table(
        "refund",
        sa.Column("external_id", sa.String(length=255), nullable=False),
        sa.Column("order_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("refunded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_refund_amount_positive")),
        sa.ForeignKeyConstraint(["customer_id"], ["customer.id"], name=op.f("fk_refund_customer_id_customer")),
        sa.ForeignKeyConstraint(["order_id"], ["customer_order.id"], name=op.f("fk_refund_order_id_customer_order")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refund")),
        sa.UniqueConstraint("external_id", name=op.f("uq_refund_external_id")),
    )
    with op.batch_alter_table("refund", schema=None) as batch_op:
        batch_op.create_index("ix_refund_customer_id_refunded_at", ["customer_id", "refunded_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_refund_order_id"), ["order_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("refund", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_refund_order_id"))
        batch_op.drop_index("ix_refund_customer_id_refunded_at")

    op.drop_table("refund")
    op.drop_table("order_item")
    with op.batch_alter_table("referral", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_referral_referrer_id"))

    op.drop_table("referral")
    with op.batch_alter_table("interaction_event", schema=None) as batch_op:
        batch_op.drop_index("ix_interaction_event_customer_id_occurred_at")

    op.drop_table("interaction_event")
    with op.batch_alter_table("customer_order", schema=None) as batch_op:
        batch_op.drop_index("ix_customer_order_customer_id_placed_at")

    op.drop_table("customer_order")
    op.drop_table("customer")
    op.drop_table("api_key")
