from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, String, false
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.db.base import Base, CreatedAtMixin, IdMixin
from loyalty.db.types import DateTimeUTC
from loyalty.lib.clock import utcnow


class Customer(IdMixin, CreatedAtMixin, Base):
    """A shopper as the storefront knows them; ``external_id`` is the storefront's id (NULL once erased)."""

    __tablename__ = "customer"

    external_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    joined_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, nullable=False)
    marketing_opt_out: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTimeUTC(), default=utcnow, onupdate=utcnow, nullable=False)
    erased_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
