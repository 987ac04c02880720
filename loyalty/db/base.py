"""Declarative base with an explicit constraint naming convention, so migrations name things the same everywhere."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer, MetaData
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loyalty.db.types import DateTimeUTC
from loyalty.lib.clock import utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids for tables that grow large.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


def kept_reference(target: str) -> dict[str, str]:
    """Column info naming the row a column refers to where the application keeps the reference, not a foreign key.

    Only for columns on a bulk write path whose every writer takes the value from a row it has read or written
    (in the same transaction, or a committed one), of a table whose committed rows are never deleted: a foreign
    key there is a per-row check (and row lock) that cannot fail. ``loyalty doctor``'s ``references`` check
    verifies these like every foreign key.
    """
    return {"references": target}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class IdMixin:
    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)


class CreatedAtMixin:
    created_at: Mapped[datetime] = mapped_column(DateTimeUTC(), default=utcnow, nullable=False)
