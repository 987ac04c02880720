"""Statements whose best form differs by database, each behind one function with both forms side by side."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import Insert

from loyalty.db.base import Base


def is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def insert_ignoring_conflicts(session: AsyncSession, model: type[Base], conflict_columns: Sequence[str]) -> Insert:
    """``INSERT ... ON CONFLICT (cols) DO NOTHING``: the losing side of a race inserts nothing and raises nothing.

    Both PostgreSQL and SQLite (3.24+) have the statement; only the SQLAlchemy construct differs.
    """
    if is_postgres(session):
        return postgresql.insert(model).on_conflict_do_nothing(index_elements=list(conflict_columns))
    return sqlite.insert(model).on_conflict_do_nothing(index_elements=list(conflict_columns))


async def advisory_lock(session: AsyncSession, key: int) -> None:
    """Serialise a rare, global check (referral cycles) within the current transaction.

    PostgreSQL takes a transaction-scoped advisory lock; SQLite needs nothing, because every write transaction
    begins IMMEDIATE and so already holds the database's single write lock.
    """
    if is_postgres(session):
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
