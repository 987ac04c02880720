"""Statements whose best form differs by database, each behind one function with both forms side by side."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.dml import Insert

from loyalty.db.base import Base


def is_postgres(session: AsyncSession | str) -> bool:
    """``session`` may be the dialect's name, for SQL built once per process and reused."""
    return (session if isinstance(session, str) else session.get_bind().dialect.name) == "postgresql"


def insert_ignoring_conflicts(
    session: AsyncSession | str, model: type[Base], conflict_columns: Sequence[str] | None = None
) -> Insert:
    """``INSERT ... ON CONFLICT (cols) DO NOTHING``: the losing side of a race inserts nothing and raises nothing.

    Without columns, a conflict on any unique key is ignored. Both PostgreSQL and SQLite (3.24+) have the
    statement; only the SQLAlchemy construct differs. ``session`` may be the dialect's name, for statements built
    once and reused.
    """
    elements = list(conflict_columns) if conflict_columns else None
    dialect = session if isinstance(session, str) else session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(model).on_conflict_do_nothing(index_elements=elements)
    return sqlite.insert(model).on_conflict_do_nothing(index_elements=elements)


async def bulk_upsert(
    session: AsyncSession,
    model: type[Base],
    rows: Sequence[dict[str, Any]],
    key_columns: Sequence[str],
    where: ColumnElement[bool] | None = None,
    returning: Any = None,
) -> list[Any]:
    """Insert or update many rows by key in batched statements; ``where`` can veto the update of a row.

    With ``returning`` (a column), answers that column for the rows actually inserted or updated.
    """
    if not rows:
        return []
    statement: Any = postgresql.insert(model) if is_postgres(session) else sqlite.insert(model)
    update_columns = [column for column in rows[0] if column not in key_columns]
    statement = statement.on_conflict_do_update(
        index_elements=list(key_columns),
        set_={column: statement.excluded[column] for column in update_columns},
        where=where,
    )
    if returning is not None:
        return list((await session.execute(statement.returning(returning), list(rows))).scalars().all())
    await session.execute(statement, list(rows))
    return []


async def advisory_lock(session: AsyncSession, key: int) -> None:
    """Serialise writers of one thing (referral cycles, a campaign send) within the current transaction.

    PostgreSQL takes a transaction-scoped advisory lock; SQLite needs nothing, because every write transaction
    begins IMMEDIATE and so already holds the database's single write lock.
    """
    if is_postgres(session):
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


async def plan_for_these_parameters(session: AsyncSession) -> None:
    """For the rest of the transaction, PostgreSQL plans each statement for its own parameters and table sizes.

    A prepared statement run a few times gets a generic plan that PostgreSQL keeps until the tables' statistics
    change, which on a young database is the first autovacuum ANALYZE, a minute or more away. Made while the
    tables were nearly empty, that plan scans them whole: a bulk load from an empty database then slowed batch by
    batch (20,000 orders in batches of 1000: 2,548, then 1,481, then 1,114 orders/s; 2,339, 2,821 and 3,446 with
    this). Planning costs little beside a batch's work; SQLite has no plan cache to steer.
    """
    if is_postgres(session):
        await session.execute(text("SET LOCAL plan_cache_mode = force_custom_plan"))


def random_code_sql(session: AsyncSession) -> str:
    """SQL for a fresh 64-bit random code in upper-case hex, drawn from the database's strong random source.

    PostgreSQL's gen_random_uuid() and SQLite's randomblob() both use a cryptographic generator, so codes issued
    in one set-based statement are as unguessable as ``secrets.token_hex``.
    """
    if is_postgres(session):
        return "upper(substr(replace(CAST(gen_random_uuid() AS text), '-', ''), 1, 16))"
    return "hex(randomblob(8))"


def json_rows_sql(dialect: str, expressions: Sequence[str]) -> str:
    """An aggregate: the group's rows as JSON text, ``[[e1, e2, ...], ...]`` in no set order; ``NULL`` or ``[]``
    when there are none."""
    row = ", ".join(expressions)
    if dialect == "postgresql":
        return f"CAST(json_agg(json_build_array({row})) AS TEXT)"
    return f"json_group_array(json_array({row}))"


def json_object_sql(session: AsyncSession | str, fields: Sequence[tuple[str, str]]) -> str:
    """SQL building a JSON object from (key, SQL expression) pairs."""
    function = "json_build_object" if is_postgres(session) else "json_object"
    arguments = ", ".join(f"'{key}', {expression}" for key, expression in fields)
    return f"{function}({arguments})"
