"""Set-based statements over many rows, in the form each database runs fastest.

PostgreSQL receives a whole column of values as one array parameter (``= ANY(:ids)``, ``unnest``), so a statement
over 5,000 rows is one short, prepared-once statement instead of 5,000 bound parameters rendered into SQL text.
SQLite has no arrays; it gets the portable forms (``IN (...)``, a multi-row ``INSERT``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Table, any_, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from loyalty.db.staging import write_rows


def in_list(session: AsyncSession, column: InstrumentedAttribute[Any], values: Sequence[Any]) -> ColumnElement[bool]:
    """``column IN values``; on PostgreSQL ``column = ANY(:array)``, one prepared statement whatever the count."""
    return _membership(session.get_bind().dialect.name, column, None, list(values))


PLAN_SIZED_UP_TO = 1024
# What the padding repeats: no row's id, so it matches nothing, and it weighs in no row estimate as a real
# customer's id would (a heavy customer repeated a hundred times could tip a plan to a scan of the table).
NO_ID = -1


def plan_sized(ids: Sequence[int]) -> list[int]:
    """Ids for an expanded ``IN`` list, padded with ``NO_ID`` up to the next power of two.

    Each length of an expanded list is a statement of its own, which PostgreSQL plans anew on each of its first
    five executions on a connection, and after that whenever the generic plan looks costlier: the real-time
    re-score's figures read took 1.3-2.4 ms on those and 0.5-0.7 ms once generic (one connection, 20k demo
    customers). Its lists of customers, referrers and referees came in dozens of lengths, so under load most
    executions were still among a shape's first five: PostgreSQL's statement log over 236 re-scores showed
    0.62 ms of planning in each figures read. Rounded up, a few lengths cover them all. (An array parameter is one
    statement, but its generic plan guesses ten elements, which looks costlier than a list of one or two: the
    server kept planning it anew.) Longer lists than ``PLAN_SIZED_UP_TO`` stay as they are: rare, their planning
    is small beside their reading, and doubled they would near SQLite's limit of bound parameters sooner.
    """
    padded = list(ids)
    if 0 < len(padded) <= PLAN_SIZED_UP_TO:
        padded += [NO_ID] * ((1 << (len(padded) - 1).bit_length()) - len(padded))
    return padded


def in_parameter(dialect: str, column: InstrumentedAttribute[Any], name: str) -> ColumnElement[bool]:
    """``in_list``'s comparison with the values left to a named parameter, for a statement built once and run
    with a new list each time (the hot paths: building a statement costs more than running a small one)."""
    return _membership(dialect, column, name, None)


def _membership(
    dialect: str, column: InstrumentedAttribute[Any], name: str | None, values: list[Any] | None
) -> ColumnElement[bool]:
    if dialect == "postgresql":
        return column == any_(bindparam(name, values, type_=postgresql.ARRAY(column.type)))
    return column.in_(bindparam(name, values, expanding=True))


def storage_form(
    dialect: Dialect, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> list[list[Any]]:
    """Each column's values as the driver receives them (money as integers, times in UTC), one list per column."""
    arrays: list[list[Any]] = []
    for position, processor in enumerate(_bind_processors(dialect, table, tuple(columns))):
        values = [row[position] for row in rows]
        arrays.append([processor(value) for value in values] if processor else values)
    return arrays


@functools.lru_cache(maxsize=64)  # bounded: every engine has a dialect of its own, and the key keeps it alive
def _bind_processors(dialect: Dialect, table: Table, columns: tuple[str, ...]) -> list[Any]:
    """The columns' bind processors, looked up once per process: the real-time re-score converts a row of some
    thirty columns on every order, and asking each type for its processor cost more than the conversions."""
    return [table.c[name].type.bind_processor(dialect) for name in columns]


def unnest_insert_sql(
    dialect: Dialect, table: Table, columns: Sequence[str], first_parameter: int = 1, where: str = ""
) -> str:
    """PostgreSQL: ``INSERT INTO table (columns) SELECT * FROM unnest($n::type[], ...) [WHERE where]``.

    Each column travels as one array parameter (``storage_form``), numbered from ``first_parameter``, so the
    statement is the same short text, prepared once, for one row or thousands. Only identifiers from the table's
    metadata and the caller's own SQL are spliced in; every value is a parameter. Built once per shape: compiling
    the column types took about 27 us, on every batch and every group of single orders.
    """
    return _unnest_insert_sql(dialect, table, tuple(columns), first_parameter, where)


@functools.cache
def _unnest_insert_sql(
    dialect: Dialect, table: Table, columns: tuple[str, ...], first_parameter: int, where: str
) -> str:
    quote = dialect.identifier_preparer.quote
    array_types = ", ".join(
        f"${position}::{table.c[name].type.compile(dialect=dialect)}[]"
        for position, name in enumerate(columns, start=first_parameter)
    )
    return (
        f"INSERT INTO {quote(table.name)} ({', '.join(quote(table.c[name].name) for name in columns)}) "  # noqa: S608
        f"SELECT * FROM unnest({array_types}){f' WHERE {where}' if where else ''}"
    )


def on_conflict_update_sql(dialect: Dialect, table: Table, columns: Sequence[str], conflict_column: str) -> str:
    """``ON CONFLICT (conflict_column) DO UPDATE`` setting every other of ``columns`` to the new row's value."""
    quote = dialect.identifier_preparer.quote
    updates = ", ".join(
        f"{quote(table.c[name].name)} = EXCLUDED.{quote(table.c[name].name)}"
        for name in columns
        if name != conflict_column
    )
    return f"ON CONFLICT ({quote(table.c[conflict_column].name)}) DO UPDATE SET {updates}"


async def insert_new_rows(
    connection: AsyncConnection,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    conflict_column: str,
    returning: Sequence[str],
) -> list[tuple[Any, ...]]:
    """``INSERT ... ON CONFLICT (conflict_column) DO NOTHING RETURNING ...``: answers the rows actually inserted.

    Rows are inserted in the order given; callers sort them by key, so two transactions inserting overlapping keys
    wait for each other in one direction only and never deadlock. On PostgreSQL each column travels as one array
    and ``unnest`` turns them back into rows, all in one statement.
    """
    if not rows:
        return []
    dialect = connection.dialect
    if dialect.name != "postgresql":
        statement = (
            sqlite.insert(table)
            .on_conflict_do_nothing(index_elements=[conflict_column])
            .returning(*(table.c[name] for name in returning))
        )
        result = await connection.execute(statement, [dict(zip(columns, row, strict=True)) for row in rows])
        return [tuple(row) for row in result]
    quote = dialect.identifier_preparer.quote
    sql = (
        f"{unnest_insert_sql(dialect, table, columns)} ON CONFLICT ({quote(table.c[conflict_column].name)}) "
        f"DO NOTHING RETURNING {', '.join(quote(table.c[name].name) for name in returning)}"
    )
    # Through SQLAlchemy, not on the driver: a lost connection is then reported and invalidated as on every other
    # statement (a 503 while the database restarts).
    result = await connection.exec_driver_sql(sql, tuple(storage_form(dialect, table, columns, rows)))
    return [tuple(row) for row in result]


# Up to this many rows, ``insert_rows`` sends one INSERT rather than a COPY.
_FEW_ROWS = 200


async def insert_rows(
    connection: AsyncConnection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Plain inserts of rows that cannot conflict (children of rows inserted just now): on PostgreSQL, COPY for
    many rows and one ``unnest`` insert for a few (the driver's COPY first asks for the table's column types, a
    round trip of its own that a handful of rows, such as a few orders' items, do not repay)."""
    if not rows:
        return
    dialect = connection.dialect
    arrays = storage_form(dialect, table, columns, rows)
    if dialect.name == "postgresql" and len(rows) <= _FEW_ROWS:
        await connection.exec_driver_sql(unnest_insert_sql(dialect, table, columns), tuple(arrays))
        return
    await write_rows(connection, table.name, columns, list(zip(*arrays, strict=True)))
