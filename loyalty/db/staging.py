"""Rows in storage form, written in bulk: COPY on PostgreSQL, the driver's executemany on SQLite.

Bulk paths (the demo loader, the full recalculation) bypass SQLAlchemy's per-row parameter handling, which costs
more than the write itself at a million rows. They hand the driver values already in the form the service's column
types store: money as integer ten-thousandths (``loyalty.lib.money``), instants as below, JSON as text.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import column, table
from sqlalchemy.ext.asyncio import AsyncConnection

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ROWS_PER_STATEMENT = 50_000
Row = tuple[Any, ...]
SQLITE_INSTANT_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def is_postgres_connection(connection: AsyncConnection) -> bool:
    return connection.dialect.name == "postgresql"


def micros_of(instant: datetime) -> int:
    return (instant - EPOCH) // timedelta(microseconds=1)


def stored_instants(postgres: bool, micros: NDArray[np.int64]) -> list[Any]:
    """Instants (microseconds since the epoch) as a DateTimeUTC column stores them."""
    moments = micros.astype("datetime64[us]")
    if postgres:
        # asyncpg reads a naive datetime as local time, so each one must carry UTC.
        return [moment.replace(tzinfo=UTC) for moment in moments.tolist()]
    # SQLAlchemy keeps SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' text in UTC and compares them as text, so
    # bulk values must have exactly that form: ISO 8601 with a space in place of the 'T'.
    strings = np.datetime_as_string(moments, unit="us")
    strings.view(np.uint32).reshape(strings.size, -1)[:, 10] = ord(" ")
    as_list: list[Any] = strings.tolist()
    return as_list


def stored_instant(postgres: bool, instant: datetime | None) -> Any:
    """One instant as ``stored_instants`` encodes it (None stays None)."""
    if instant is None:
        return None
    utc = instant.astimezone(UTC)
    return utc if postgres else utc.strftime(SQLITE_INSTANT_FORMAT)


def stored_optional_instants(postgres: bool, micros: NDArray[np.float64]) -> list[Any]:
    """As ``stored_instants`` for a float column where NaN means NULL."""
    present = ~np.isnan(micros)
    values: list[Any] = [None] * micros.size
    if present.any():
        # Purchase dates are whole days, shared by many customers: each distinct instant is encoded once.
        distinct, inverse = np.unique(micros[present], return_inverse=True)
        encoded = stored_instants(postgres, distinct.astype(np.int64))
        for index, position in zip(np.flatnonzero(present).tolist(), inverse.tolist(), strict=True):
            values[index] = encoded[position]
    return values


async def driver_in_transaction(connection: AsyncConnection) -> Any:
    """The asyncpg connection under ``connection``, inside the transaction SQLAlchemy runs on it.

    SQLAlchemy's adapter sends BEGIN lazily, with its first statement; a statement sent to the driver before that
    would run outside the transaction (and commit on its own), so one cheap statement through SQLAlchemy starts it.
    """
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None  # a checked-out connection always wraps a live asyncpg connection
    if not driver.is_in_transaction():
        await connection.exec_driver_sql("SELECT 1")
    return driver


async def write_rows(connection: AsyncConnection, table_name: str, columns: Sequence[str], rows: Sequence[Row]) -> None:
    """Append rows (tuples in ``columns`` order, storage form) inside the connection's current transaction."""
    batches = [rows[start : start + ROWS_PER_STATEMENT] for start in range(0, len(rows), ROWS_PER_STATEMENT)]
    if is_postgres_connection(connection):
        driver = await driver_in_transaction(connection)
        for batch in batches:
            # COPY runs inside the transaction SQLAlchemy has already begun on this asyncpg connection.
            await driver.copy_records_to_table(table_name, records=batch, columns=list(columns))
        return
    # The Core insert, compiled once, runs as the driver's executemany on plain tuples.
    statement = str(table(table_name, *(column(name) for name in columns)).insert().compile(dialect=connection.dialect))
    for batch in batches:
        await connection.exec_driver_sql(statement, list(batch))
