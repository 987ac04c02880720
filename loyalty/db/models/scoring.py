"""What the recalculation produces: per-customer scores and figures, tiers, tier history, run records."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text, false
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.db.base import Base, BigIntPK, IdMixin, kept_reference
from loyalty.db.types import DateTimeUTC, Money

# Every full run rewrites each customer's score and tier row. Half of each page left free lets PostgreSQL write the
# new version beside the old one without touching an index (a heap-only update), several times cheaper than a row
# moved to another page, and prune the previous run's version when the page is next written (migration 0007).
REWRITE_FILLFACTOR = 50


class CustomerScore(Base):
    """The latest scores of a customer with the raw figures and model outputs behind them."""

    __tablename__ = "customer_score"
    # No index on a score: it would change with nearly every row a run writes and rule out heap-only updates.
    __table_args__ = ({"postgresql_with": {"fillfactor": REWRITE_FILLFACTOR}},)

    # Kept by the full run and the real-time re-score (see kept_reference), like the tier and history rows'.
    customer_id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, info=kept_reference("customer.id"))
    # The full run that last scored the customer; an incremental re-score keeps it and moves `computed_at`. Only
    # the run writes a new value, its own id, and runs are never deleted (see kept_reference).
    run_id: Mapped[int | None] = mapped_column(BigIntPK, info=kept_reference("recalc_run.id"))
    as_of: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    computed_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    value_score: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    frequency_score: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    influence_score: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    paid_orders: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    occasions: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    orders_in_window: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    net_spend: Mapped[Decimal] = mapped_column(Money(), nullable=False, default=Decimal(0))
    lifetime_spend: Mapped[Decimal] = mapped_column(Money(), nullable=False, default=Decimal(0))
    average_order_value: Mapped[Decimal] = mapped_column(Money(), nullable=False, default=Decimal(0))
    first_purchase_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    last_purchase_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    days_since_last: Mapped[float | None] = mapped_column(Float)
    # BG/NBD inputs in days, as defined in PRODUCT.md ("Model conventions").
    frequency: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    recency_days: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    age_days: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    mean_repeat_spend: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    expected_purchases: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    p_alive: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    expected_spend: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    predicted_value: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    converted_referrals: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    referred_revenue: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    reviews: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    shares: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    interests: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False, default=list)


class CustomerTier(Base):
    """A customer's current tier, kept ready for the badge read: one row by primary key, nothing to compute."""

    __tablename__ = "customer_tier"
    __table_args__ = (
        Index("ix_customer_tier_tier_customer_id", "tier", "customer_id"),
        {"postgresql_with": {"fillfactor": REWRITE_FILLFACTOR}},
    )

    # Kept by its writers (see kept_reference): the full run, the real-time re-score and a pin each take it from a
    # customer row they read, and customers are never deleted (erasure anonymises them).
    customer_id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, info=kept_reference("customer.id"))
    tier: Mapped[str] = mapped_column(String(16), nullable=False)
    since: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    # What the rules say now; differs from `tier` while a downgrade waits out the grace period or a pin holds.
    qualified_tier: Mapped[str] = mapped_column(String(16), nullable=False)
    below_since: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    explanation: Mapped[str] = mapped_column(Text, nullable=False, default="")
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    pinned_tier: Mapped[str | None] = mapped_column(String(16))
    pinned_until: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    pin_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)


class TierHistory(IdMixin, Base):
    """Append-only: every tier change with its reason."""

    __tablename__ = "tier_history"
    __table_args__ = (Index("ix_tier_history_customer_id_at", "customer_id", "at"),)

    # Kept by the writers of tiers, as customer_tier's (see kept_reference).
    customer_id: Mapped[int] = mapped_column(BigIntPK, nullable=False, info=kept_reference("customer.id"))
    from_tier: Mapped[str | None] = mapped_column(String(16))
    to_tier: Mapped[str] = mapped_column(String(16), nullable=False)
    at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    # Written by the run itself with its own id (a first run writes a row for every customer); see kept_reference.
    run_id: Mapped[int | None] = mapped_column(BigIntPK, info=kept_reference("recalc_run.id"))


class RecalcRun(IdMixin, Base):
    """A full recalculation: queued, claimed under a lease by one replica, then succeeded or failed."""

    __tablename__ = "recalc_run"
    __table_args__ = (Index("ix_recalc_run_status_queued_at", "status", "queued_at"),)

    trigger: Mapped[str] = mapped_column(String(16), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    as_of: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    dry_run: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    # One scheduled run per cron period, whichever replica inserts it first.
    period_key: Mapped[str | None] = mapped_column(String(64), unique=True)
    # 1 while queued or running, NULL after: the unique key allows one active run across all replicas.
    active_slot: Mapped[int | None] = mapped_column(Integer, unique=True)
    queued_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    started_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    finished_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    retry_of: Mapped[int | None] = mapped_column(BigIntPK, ForeignKey("recalc_run.id"))
    phases: Mapped[dict[str, float]] = mapped_column(JSON, nullable=False, default=dict)
    customers: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    moves: Mapped[dict[str, dict[str, int]]] = mapped_column(JSON, nullable=False, default=dict)
    config_hash: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    # Percentile cut-offs of each score's raw input, for re-scoring single customers between full runs.
    cutoffs: Mapped[dict[str, list[float]]] = mapped_column(JSON, nullable=False, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
