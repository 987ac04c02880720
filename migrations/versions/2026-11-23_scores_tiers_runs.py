"""Scores, tiers, tier history and recalculation runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "recalc_run",
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dry_run", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("period_key", sa.String(length=64), nullable=True),
        sa.Column("active_slot", sa.Integer(), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("retry_of", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("phases", sa.JSON(), nullable=False),
        sa.Column("customers", sa.Integer(), nullable=False),
        sa.Column("moves", sa.JSON(), nullable=False),
        sa.Column("config_hash", sa.String(length=64), nullable=True),
        sa.Column("model", sa.JSON(), nullable=False),
        sa.Column("cutoffs", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.ForeignKeyConstraint(["retry_of"], ["recalc_run.id"], name=op.f("fk_recalc_run_retry_of_recalc_run")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recalc_run")),
        sa.UniqueConstraint("active_slot", name=op.f("uq_recalc_run_active_slot")),
        sa.UniqueConstraint("period_key", name=op.f("uq_recalc_run_period_key")),
    )
    with op.batch_alter_table("recalc_run", schema=None) as batch_op:
        batch_op.create_index("ix_recalc_run_status_queued_at", ["status", "queued_at"], unique=False)

    op.create_table(
        "customer_score",
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("value_score", sa.Float(), nullable=False),
        sa.Column("frequency_score", sa.Float(), nullable=False),
        sa.Column("influence_score", sa.Float(), nullable=False),
        sa.Column("paid_orders", sa.Integer(), nullable=False),
        sa.Column("occasions", sa.Integer(), nullable=False),
        sa.Column("orders_in_window", sa.Integer(), nullable=False),
        sa.Column("net_spend", sa.BigInteger(), nullable=False),
        sa.Column("lifetime_spend", sa.BigInteger(), nullable=False),
        sa.Column("average_order_value", sa.BigInteger(), nullable=False),
        sa.Column("first_purchase_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_purchase_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("days_since_last", sa.Float(), nullable=True),
        sa.Column("frequency", sa.Integer(), nullable=False),
        sa.Column("recency_days", sa.Float(), nullable=False),
        sa.Column("age_days", sa.Float(), nullable=False),
        sa.Column("mean_repeat_spend", sa.Float(), nullable=False),
        sa.Column("expected_purchases", sa.Float(), nullable=False),
        sa.Column("p_alive", sa.Float(), nullable=False),
        sa.Column("expected_spend", sa.Float(), nullable=False),
        sa.Column("predicted_value", sa.Float(), nullable=False),
        sa.Column("converted_referrals", sa.Integer(), nullable=False),
        sa.Column("referred_revenue", sa.Float(), nullable=False),
        sa.Column("reviews", sa.Integer(), nullable=False),
        sa.Column("shares", sa.Integer(), nullable=False),
        sa.Column("interests", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customer.id"], name=op.f("fk_customer_score_customer_id_customer"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["recalc_run.id"], name=op.f("fk_customer_score_run_id_recalc_run")),
        sa.PrimaryKeyConstraint("customer_id", name=op.f("pk_customer_score")),
    )
    with op.batch_alter_table("customer_score", schema=None) as batch_op:
        batch_op.create_index("ix_customer_score_value_score", ["value_score"], unique=False)

    op.create_table(
        "customer_tier",
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("tier", sa.String(length=16), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("qualified_tier", sa.String(length=16), nullable=False),
        sa.Column("below_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("explanation", sa.Text(), nullable=False),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("pinned_tier", sa.String(length=16), nullable=True),
        sa.Column("pinned_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pin_reason", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customer.id"], name=op.f("fk_customer_tier_customer_id_customer"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("customer_id", name=op.f("pk_customer_tier")),
    )
    with op.batch_alter_table("customer_tier", schema=None) as batch_op:
        batch_op.create_index("ix_customer_tier_tier_customer_id", ["tier", "customer_id"], unique=False)

    op.create_table(
        "tier_history",
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("from_tier", sa.String(length=16), nullable=True),
        sa.Column("to_tier", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customer.id"], name=op.f("fk_tier_history_customer_id_customer"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["recalc_run.id"], name=op.f("fk_tier_history_run_id_recalc_run")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tier_history")),
    )
    with op.batch_alter_table("tier_history", schema=None) as batch_op:
        batch_op.create_index("ix_tier_history_customer_id_at", ["customer_id", "at"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("tier_history", schema=None) as batch_op:
        batch_op.drop_index("ix_tier_history_customer_id_at")

    op.drop_table("tier_history")
    with op.batch_alter_table("customer_tier", schema=None) as batch_op:
        batch_op.drop_index("ix_customer_tier_tier_customer_id")

    op.drop_table("customer_tier")
    with op.batch_alter_table("customer_score", schema=None) as batch_op:
        batch_op.drop_index("ix_customer_score_value_score")

    op.drop_table("customer_score")
    with op.batch_alter_table("recalc_run", schema=None) as batch_op:
        batch_op.drop_index("ix_recalc_run_status_queued_at")

    op.drop_table("recalc_run")
