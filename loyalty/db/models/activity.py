"""What customers do: orders with their items, refunds, interaction events and referrals."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.db.base import Base, BigIntPK, CreatedAtMixin, IdMixin, kept_reference
from loyalty.db.types import DateTimeUTC, Money

EVENT_TYPES = ("page_view", "product_view", "ad_click", "email_click", "review", "social_share")


class Order(IdMixin, CreatedAtMixin, Base):
    """A paid order; ``external_id`` is the storefront's order id and the idempotency key."""

    __tablename__ = "customer_order"
    __table_args__ = (
        Index("ix_customer_order_customer_id_placed_at", "customer_id", "placed_at"),
        CheckConstraint("total >= 0", name="total_non_negative"),
        CheckConstraint("refunded >= 0 AND refunded <= total", name="refunded_within_total"),
    )

    external_id: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    # Kept by every writer of orders (see kept_reference): the single order, the batch and the import each take it
    # from the customer they find or create in the same transaction, and customers are never deleted (erasure
    # anonymises; a batch deletes only customers it created itself and gave no order).
    customer_id: Mapped[int] = mapped_column(BigIntPK, nullable=False, info=kept_reference("customer.id"))
    placed_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    total: Mapped[Decimal] = mapped_column(Money(), nullable=False)
    # Kept on the order so that "refunds never exceed the total" is one conditional UPDATE, safe under races.
    refunded: Mapped[Decimal] = mapped_column(Money(), nullable=False, default=Decimal(0), server_default="0")
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    channel: Mapped[str | None] = mapped_column(String(255))
    # SHA-256 of the canonical request, to tell a faithful replay (200) from a conflicting one (409).
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False)


class OrderItem(IdMixin, Base):
    __tablename__ = "order_item"
    __table_args__ = (
        UniqueConstraint("order_id", "line_no"),
        CheckConstraint("quantity >= 1", name="quantity_positive"),
    )

    # Kept by the statements that write items (see kept_reference): each takes the id from the order it has just
    # inserted, in the same transaction, and orders are never deleted.
    order_id: Mapped[int] = mapped_column(BigIntPK, nullable=False, info=kept_reference("customer_order.id"))
    line_no: Mapped[int] = mapped_column(Integer, nullable=False)
    sku: Mapped[str] = mapped_column(String(255), nullable=False)
    category: Mapped[str | None] = mapped_column(String(255))
    quantity: Mapped[int] = mapped_column(Integer, nullable=False)
    unit_price: Mapped[Decimal] = mapped_column(Money(), nullable=False)


class Refund(IdMixin, CreatedAtMixin, Base):
    __tablename__ = "refund"
    __table_args__ = (
        Index("ix_refund_customer_id_refunded_at", "customer_id", "refunded_at"),
        CheckConstraint("amount > 0", name="amount_positive"),
    )

    external_id: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    order_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("customer_order.id"), nullable=False, index=True)
    # Denormalised from the order so per-customer aggregates need no join.
    customer_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("customer.id"), nullable=False)
    amount: Mapped[Decimal] = mapped_column(Money(), nullable=False)
    refunded_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
    content_hash: Mapped[str] = mapped_column(String(64), nullable=False)


class InteractionEvent(IdMixin, CreatedAtMixin, Base):
    __tablename__ = "interaction_event"
    __table_args__ = (
        Index("ix_interaction_event_customer_id_occurred_at", "customer_id", "occurred_at"),
        CheckConstraint(
            "type IN ('page_view', 'product_view', 'ad_click', 'email_click', 'review', 'social_share')",
            name="type_known",
        ),
    )

    external_id: Mapped[str] = mapped_column(String(255), unique=True, nullable=False)
    customer_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("customer.id"), nullable=False)
    type: Mapped[str] = mapped_column(String(32), nullable=False)
    target: Mapped[str] = mapped_column(String(512), nullable=False)
    occurred_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)


class Referral(IdMixin, CreatedAtMixin, Base):
    """Who brought whom; a customer can be referred once (``referee_id`` unique)."""

    __tablename__ = "referral"
    __table_args__ = (CheckConstraint("referrer_id <> referee_id", name="not_self"),)

    referrer_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("customer.id"), nullable=False, index=True)
    referee_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("customer.id"), nullable=False, unique=True)
    occurred_at: Mapped[datetime] = mapped_column(DateTimeUTC(), nullable=False)
