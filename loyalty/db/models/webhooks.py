"""Webhook endpoints registered by admins, and one delivery row per (endpoint, outbox event)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.db.base import Base, BigIntPK, CreatedAtMixin, IdMixin
from loyalty.db.types import DateTimeUTC

DELIVERY_STATUSES = ("pending", "sending", "failed", "delivered", "dead", "abandoned")


class WebhookEndpoint(IdMixin, CreatedAtMixin, Base):
    """A receiver URL and the event types it subscribed to.

    The signing secret is kept as is, not hashed: signing each delivery needs the key itself (an HMAC cannot be
    computed from a hash of its key). It leaves the service only in the creation response.
    """

    __tablename__ = "webhook_endpoint"

    url: Mapped[str] = mapped_column(String(2048), nullable=False)
    events: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    secret: Mapped[str] = mapped_column(String(128), nullable=False)
    # Deleted endpoints stay (soft delete) so the rows of their past deliveries keep a parent.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())


class WebhookDelivery(IdMixin, CreatedAtMixin, Base):
    """Leased work: one outbox event to send to one endpoint, retried with back-off until delivered or dead."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        # One delivery per event and endpoint: fan-out can run any number of times, on any number of replicas.
        UniqueConstraint("endpoint_id", "outbox_event_id"),
        Index("ix_webhook_delivery_endpoint_id_status_next_attempt_at", "endpoint_id", "status", "next_attempt_at"),
        Index("ix_webhook_delivery_endpoint_id_id", "endpoint_id", "id"),
        CheckConstraint(
            "status IN ('pending', 'sending', 'failed', 'delivered', 'dead', 'abandoned')", name="status_known"
        ),
    )

    endpoint_id: Mapped[int] = mapped_column(BigIntPK, ForeignKey("webhook_endpoint.id"), nullable=False)
    # Erasing a customer deletes the outbox events about them; their deliveries go too, so nothing erased is sent.
    outbox_event_id: Mapped[int] = mapped_column(
        BigIntPK, ForeignKey("outbox_event.id", ondelete="CASCADE"), nullable=False, index=True
    )
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
