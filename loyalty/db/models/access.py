from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from loyalty.db.base import Base, CreatedAtMixin, IdMixin
from loyalty.db.types import DateTimeUTC


class ApiKey(IdMixin, CreatedAtMixin, Base):
    """An API key; only the SHA-256 of the secret is stored, and looked up by it."""

    __tablename__ = "api_key"
    __table_args__ = (CheckConstraint("scope IN ('storefront', 'marketing', 'admin')", name="scope_known"),)

    name: Mapped[str] = mapped_column(String(100), nullable=False)
    scope: Mapped[str] = mapped_column(String(20), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    # The first characters of the key, so an operator can tell keys apart in listings without the secret.
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTimeUTC())
