"""Offers, campaigns, sends and members, issued codes, redemptions, outbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "offer",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=True),
        sa.Column("valid_days", sa.Integer(), nullable=False),
        sa.Column("min_order_total", sa.BigInteger(), nullable=True),
        sa.Column("uses_per_code", sa.Integer(), nullable=False),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('percent_off', 'amount_off', 'free_shipping', 'gift')", name=op.f("ck_offer_kind_known")
        ),
        sa.CheckConstraint("uses_per_code >= 1", name=op.f("ck_offer_uses_positive")),
        sa.CheckConstraint("valid_days >= 1", name=op.f("ck_offer_valid_days_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_offer")),
        sa.UniqueConstraint("name", name=op.f("uq_offer_name")),
    )
    op.create_table(
        "outbox_event",
        sa.Column("event_type", sa.String(length=32), nullable=False),
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("dedupe_key", sa.String(length=128), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["customer_id"], ["customer.id"], name=op.f("fk_outbox_event_customer_id_customer")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_event")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_outbox_event_dedupe_key")),
    )
    with op.batch_alter_table("outbox_event", schema=None) as batch_op:
        batch_op.create_index("ix_outbox_event_delivered_at_id", ["delivered_at", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_outbox_event_customer_id"), ["customer_id"], unique=False)

    op.create_table(
        "campaign",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("offer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("tiers", sa.JSON(), nullable=False),
        sa.Column("filters", sa.JSON(), nullable=False),
        sa.Column("send_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cron", sa.String(length=100), nullable=True),
        sa.Column("holdout_pct", sa.Float(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("next_send_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("holdout_pct >= 0 AND holdout_pct <= 50", name=op.f("ck_campaign_holdout_range")),
        sa.ForeignKeyConstraint(["offer_id"], ["offer.id"], name=op.f("fk_campaign_offer_id_offer")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign")),
    )
    with op.batch_alter_table("campaign", schema=None) as batch_op:
        batch_op.create_index("ix_campaign_status_next_send_at", ["status", "next_send_at"], unique=False)

    op.create_table(
        "campaign_send",
        sa.Column("campaign_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("occurrence_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("issued", sa.Integer(), nullable=False),
        sa.Column("holdout", sa.Integer(), nullable=False),
        sa.Column("late_seconds", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"], name=op.f("fk_campaign_send_campaign_id_campaign")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_campaign_send")),
        sa.UniqueConstraint("campaign_id", "occurrence_at", name=op.f("uq_campaign_send_campaign_id_occurrence_at")),
    )
    with op.batch_alter_table("campaign_send", schema=None) as batch_op:
        batch_op.create_index("ix_campaign_send_status_occurrence_at", ["status", "occurrence_at"], unique=False)

    op.create_table(
        "campaign_member",
        sa.Column("send_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("campaign_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("holdout", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"], name=op.f("fk_campaign_member_campaign_id_campaign")),
        sa.ForeignKeyConstraint(["customer_id"], ["customer.id"], name=op.f("fk_campaign_member_customer_id_customer")),
        sa.ForeignKeyConstraint(
            ["send_id"], ["campaign_send.id"], name=op.f("fk_campaign_member_send_id_campaign_send")
        ),
        sa.PrimaryKeyConstraint("send_id", "customer_id", name=op.f("pk_campaign_member")),
    )
    with op.batch_alter_table("campaign_member", schema=None) as batch_op:
        batch_op.create_index(
            "ix_campaign_member_campaign_id_customer_id", ["campaign_id", "customer_id"], unique=False
        )

    op.create_table(
        "issued_code",
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("offer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("campaign_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("send_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("welcome_entry_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.CheckConstraint("uses_left >= 0", name=op.f("ck_issued_code_uses_left_non_negative")),
        sa.ForeignKeyConstraint(["campaign_id"], ["campaign.id"], name=op.f("fk_issued_code_campaign_id_campaign")),
        sa.ForeignKeyConstraint(["customer_id"], ["customer.id"], name=op.f("fk_issued_code_customer_id_customer")),
        sa.ForeignKeyConstraint(["offer_id"], ["offer.id"], name=op.f("fk_issued_code_offer_id_offer")),
        sa.ForeignKeyConstraint(["send_id"], ["campaign_send.id"], name=op.f("fk_issued_code_send_id_campaign_send")),
        sa.ForeignKeyConstraint(
            ["welcome_entry_id"], ["tier_history.id"], name=op.f("fk_issued_code_welcome_entry_id_tier_history")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_issued_code")),
        sa.UniqueConstraint("code", name=op.f("uq_issued_code_code")),
        sa.UniqueConstraint("send_id", "customer_id", name=op.f("uq_issued_code_send_id_customer_id")),
        sa.UniqueConstraint("welcome_entry_id", name=op.f("uq_issued_code_welcome_entry_id")),
    )
    with op.batch_alter_table("issued_code", schema=None) as batch_op:
        batch_op.create_index("ix_issued_code_customer_id_issued_at", ["customer_id", "issued_at"], unique=False)
        batch_op.create_index("ix_issued_code_status_expires_at", ["status", "expires_at"], unique=False)

    op.create_table(
        "redemption",
        sa.Column("code_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("customer_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("order_ref", sa.String(length=255), nullable=False),
        sa.Column("order_total", sa.BigInteger(), nullable=False),
        sa.Column("redeemed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("voided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.ForeignKeyConstraint(["code_id"], ["issued_code.id"], name=op.f("fk_redemption_code_id_issued_code")),
        sa.ForeignKeyConstraint(["customer_id"], ["customer.id"], name=op.f("fk_redemption_customer_id_customer")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_redemption")),
        sa.UniqueConstraint("code_id", "order_ref", name=op.f("uq_redemption_code_id_order_ref")),
    )
    with op.batch_alter_table("redemption", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_redemption_code_id"), ["code_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("redemption", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_redemption_code_id"))

    op.drop_table("redemption")
    with op.batch_alter_table("issued_code", schema=None) as batch_op:
        batch_op.drop_index("ix_issued_code_status_expires_at")
        batch_op.drop_index("ix_issued_code_customer_id_issued_at")

    op.drop_table("issued_code")
    with op.batch_alter_table("campaign_member", schema=None) as batch_op:
        batch_op.drop_index("ix_campaign_member_campaign_id_customer_id")

    op.drop_table("campaign_member")
    with op.batch_alter_table("campaign_send", schema=None) as batch_op:
        batch_op.drop_index("ix_campaign_send_status_occurrence_at")

    op.drop_table("campaign_send")
    with op.batch_alter_table("campaign", schema=None) as batch_op:
        batch_op.drop_index("ix_campaign_status_next_send_at")

    op.drop_table("campaign")
    with op.batch_alter_table("outbox_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_event_customer_id"))
        batch_op.drop_index("ix_outbox_event_delivered_at_id")

    op.drop_table("outbox_event")
    op.drop_table("offer")
