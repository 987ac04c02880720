"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from decimal import Decimal

from advanced_alchemy.types import DateTimeUTC
from sqlalchemy import BigInteger
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from loyalty.lib.money import from_storage, to_storage

__all__ = ["DateTimeUTC", "Money"]


class Money(TypeDecorator[Decimal]):
    """An exact decimal amount stored as integer ten-thousandths (see ``loyalty.lib.money``)."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> int | None:
        return None if value is None else to_storage(value)

    def process_result_value(self, value: int | None, dialect: Dialect) -> Decimal | None:
        return None if value is None else from_storage(value)
