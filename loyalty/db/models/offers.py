"""Offers, campaigns and their sends, issued codes, redemptions, and the outbox of effects to deliver."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.db.base import Base, BigIntPK, CreatedAtMixin, IdMixin, kept_reference
from loyalty.db.types import DateTimeUTC, Money


class Offer(IdMixin, CreatedAtMixin, Base):
    """A template: what a code gives, for how long, from which order total, how many times."""

    __tablename__ = "offer"
    __table_args__ = (
        CheckConstraint("kind IN ('percent_off', 'amount_off', 'free_shipping', 'gift')", name="kind_known"),
        CheckConstraint("uses_per_code >= 1", name="uses_positive"),
        CheckConstraint("valid_days >= 1", name="valid_days_positive"),
    )

    name: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    value: Mapped[Decimal | None] = mapped_column(Money())
    valid_days: Mapped[int] = mapped_column(Integer, nullable=False)
    min_order_total: Mapped[Decimal | None] = mapped_column(Money())
    uses_per_code: Mapped[int] = mapped_column(Integer, nullable=False, default=1)


class Campaign(IdMixin, CreatedAtMixin, Base):
    """An offer sent to tiers once (`send_at`) or on a cron, with a holdout kept as a control group."""

    __tablename__ = "campaign"
    __table_args__ = (
        Index("ix_campaign_status_next_send_at", "status", "next_send_at"),
        CheckConstraint("holdout_pct >= 0 AND holdout_pct <= 50", name="holdout_range"),
    )

    name: Mapped[str] = mapped_column(String(200), nullable=False)
    offer_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("offer.id"), nullable=False)
    tiers: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    filters: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    send_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    cron: Mapped[str | None] = mapped_column(String(100))
    holdout_pct: Mapped[float] = mapped_column(Float, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    # The next occurrence to send; NULL once a one-off campaign has been sent, or after a cancel.
    next_send_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    completed_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())


class CampaignSend(IdMixin, Base):
    """One occurrence of a campaign: leased work any replica can claim; its effects are idempotent."""

    __tablename__ = "campaign_send"
    __table_args__ = (
        UniqueConstraint("campaign_id", "occurrence_at"),
        Index("ix_campaign_send_status_occurrence_at", "status", "occurrence_at"),
    )

    campaign_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("campaign.id"), nullable=False)
    occurrence_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    finished_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    issued: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    holdout: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    late_seconds: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class CampaignMember(Base):
    """Who a send reached: treatment (a code was issued) or holdout (deliberately not)."""

    __tablename__ = "campaign_member"

    # A send writes a member row per eligible customer, with codes and events, in one statement: its references
    # are kept by that statement (see kept_reference), and a campaign's members are read through its sends' keys.
    send_id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, info=kept_reference("campaign_send.id"))
    customer_id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, info=kept_reference("customer.id"))
    campaign_id: Mapped[int] = mapped_column(BigIntPK, nullable=False, info=kept_reference("campaign.id"))
    holdout: Mapped[bool] = mapped_column(Boolean, nullable=False)


class IssuedCode(IdMixin, Base):
    """A unique, unguessable code for one customer: from a campaign send, or a welcome offer on a tier entry."""

    __tablename__ = "issued_code"
    __table_args__ = (
        UniqueConstraint("send_id", "customer_id"),
        # One code per tier entry; partial, so the many campaign codes (no entry) add nothing to it.
        Index(
            "uq_issued_code_welcome_entry_id",
            "welcome_entry_id",
            unique=True,
            postgresql_where=text("welcome_entry_id IS NOT NULL"),
            sqlite_where=text("welcome_entry_id IS NOT NULL"),
        ),
        Index("ix_issued_code_customer_id_issued_at", "customer_id", "issued_at"),
        Index("ix_issued_code_status_expires_at", "status", "expires_at"),
        CheckConstraint("uses_left >= 0", name="uses_left_non_negative"),
    )

    code: Mapped[str] = mapped_column(String(32), unique=True, nullable=False)
    # Kept by their writers (see kept_reference): a send's statement and a welcome offer's take them from the
    # member row, tier entry, customer, campaign and offer they read or write in the same transaction.
    offer_id: Mapped[int] = mapped_column(BigIntPK, nullable=False, info=kept_reference("offer.id"))
    customer_id: Mapped[int] = mapped_column(BigIntPK, nullable=False, info=kept_reference("customer.id"))
    campaign_id: Mapped[int | None] = mapped_column(BigIntPK, info=kept_reference("campaign.id"))
    send_id: Mapped[int | None] = mapped_column(BigIntPK, info=kept_reference("campaign_send.id"))
    # The tier entry (history row) a welcome offer celebrates: one code per entry. Kept by the welcome offer's
    # statement, which takes it from the entry it reads (see kept_reference); campaign codes have none.
    welcome_entry_id: Mapped[int | None] = mapped_column(BigIntPK, info=kept_reference("tier_history.id"))
    issued_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    uses_left: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="active")


class Redemption(IdMixin, Base):
    """A use of a code at checkout, with the order it paid towards; voiding gives the use back."""

    __tablename__ = "redemption"
    __table_args__ = (UniqueConstraint("code_id", "order_ref"),)

    code_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("issued_code.id"), nullable=False, index=True)
    customer_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("customer.id"), nullable=False)
    # The storefront's order id; the order may reach us later than the redemption.
    order_ref: Mapped[str] = mapped_column(String(255), nullable=False)
    order_total: Mapped[Decimal] = mapped_column(Money(), nullable=False)
    redeemed_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    voided_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())


class OutboxEvent(IdMixin, CreatedAtMixin, Base):
    """Effects to announce (webhooks), written in the same transaction as the change they describe."""

    __tablename__ = "outbox_event"
    __table_args__ = (Index("ix_outbox_event_delivered_at_id", "delivered_at", "id"),)

    event_type: Mapped[str] = mapped_column(String(32), nullable=False)
    # Whom the event is about, so an erasure can remove what it says about them. Kept by the writers (see
    # kept_reference): each takes it from the row it announces, in the same transaction.
    customer_id: Mapped[int | None] = mapped_column(BigIntPK, index=True, info=kept_reference("customer.id"))
    # Makes every producer idempotent: a retried dispatch or run announces nothing twice.
    dedupe_key: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
