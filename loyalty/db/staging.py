"""Rows in storage form, written in bulk: COPY on PostgreSQL, the driver's executemany on SQLite.

Bulk paths (the demo loader, the full recalculation) bypass SQLAlchemy's per-row parameter handling, which costs
more than the write itself at a million rows. They hand the driver values already in the form the service's column
types store: money as integer ten-thousandths (``loyalty.lib.money``), instants as below, JSON as text.
"""

from __future__ import annotations

import itertools
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


# ---------------------------------------------------------------- binary COPY built from columns

# PostgreSQL's binary COPY: a signature, flags and header-extension length; then each row as its field count and,
# for each field, its length (-1 for NULL) and bytes; then -1 as the field count. Every number is big-endian.
COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEADER = COPY_SIGNATURE + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_NULL_FIELD = b"\xff\xff\xff\xff"
# timestamptz travels as microseconds since 2000-01-01 UTC.
POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_POSTGRES_EPOCH_MICROS = micros_of(POSTGRES_EPOCH)
_TIMESTAMP = "timestamp with time zone"
# The fixed-width types (as format_type names them) and their binary forms; text, varchar and json travel as
# their UTF-8 text.
_FIXED_WIDTH = {"bigint": ">i8", "integer": ">i4", "smallint": ">i2", "double precision": ">f8", "boolean": "?"}
_FIXED_WIDTH[_TIMESTAMP] = ">i8"
_TEXT_TYPES = frozenset({"text", "character varying", "json"})


class _EncodedFields(dict[Any, bytes]):
    """Each distinct value of a column encoded once, as its whole field (length and bytes)."""

    def __init__(self, encode: Any) -> None:
        super().__init__()
        self._encode = encode

    def __missing__(self, value: Any) -> bytes:
        if value is None:
            field = _NULL_FIELD
        else:
            data = self._encode(value)
            field = len(data).to_bytes(4, "big") + data
        self[value] = field
        return field


def _instant_bytes(instant: datetime) -> bytes:
    return (micros_of(instant) - _POSTGRES_EPOCH_MICROS).to_bytes(8, "big", signed=True)


def _fixed_column(type_name: str, values: Any) -> NDArray[Any] | None:
    """A column without NULLs as the array its binary form is a view of; None when it must go field by field.

    Arrays are in storage form: numbers as stored, instants as microseconds since the Unix epoch (float or int), NaN
    for NULL in a float array."""
    kind = _FIXED_WIDTH.get(type_name)
    if kind is None:
        return None
    if not isinstance(values, np.ndarray):
        if type_name == _TIMESTAMP or None in values:
            return None
        values = np.asarray(values)
    array: NDArray[Any] = values
    if array.dtype.kind == "f" and np.isnan(array).any():
        return None
    if type_name == _TIMESTAMP:
        return array.astype(np.int64) - _POSTGRES_EPOCH_MICROS
    return array


def _field_by_field(type_name: str, values: Any) -> list[bytes]:
    """Each row's whole field (length and bytes) of a column with NULLs or of variable width."""
    if isinstance(values, np.ndarray):
        present = ~np.isnan(values) if values.dtype.kind == "f" else np.ones(values.size, dtype=np.bool_)
        kind = _FIXED_WIDTH[type_name]
        if type_name == _TIMESTAMP:
            values = np.where(present, values, 0).astype(np.int64) - _POSTGRES_EPOCH_MICROS
        fields = np.empty(values.size, dtype=[("length", ">i4"), ("value", kind)])
        fields["length"] = np.dtype(kind).itemsize
        fields["value"] = values
        encoded: list[bytes] = fields.view(f"V{fields.dtype.itemsize}").tolist()
        for index in np.flatnonzero(~present).tolist():
            encoded[index] = _NULL_FIELD
        return encoded
    if type_name in _TEXT_TYPES:
        cache = _EncodedFields(str.encode)
    elif type_name == _TIMESTAMP:
        cache = _EncodedFields(_instant_bytes)
    elif type_name in _FIXED_WIDTH:
        form = np.dtype(_FIXED_WIDTH[type_name])
        cache = _EncodedFields(lambda value: np.asarray(value, dtype=form).tobytes())
    else:
        raise ValueError(f"no binary COPY form for the type {type_name}")
    return list(map(cache.__getitem__, values))


def binary_copy(type_names: Sequence[str], columns: Sequence[Any], size: int) -> tuple[list[int], bytes]:
    """``size`` rows given as columns, in PostgreSQL's binary COPY format, and the order of their fields (positions
    in ``columns``), which a COPY statement must name in that order.

    ``columns`` hold storage-form values (see ``_fixed_column``): numpy arrays or lists of Python values (text,
    aware datetimes, numbers, None for NULL), typed as ``format_type`` names the target columns. The columns without
    NULLs of fixed width go first, as one block per row built by NumPy; the others field by field, each distinct
    value encoded once. Building the payload this way costs a fraction of the driver's encoding of row tuples, and
    can run outside the event loop.
    """
    block: list[tuple[str, str]] = [("fields", ">i2")]
    fixed: list[tuple[int, NDArray[Any]]] = []
    varying: list[tuple[int, list[bytes]]] = []
    for index, (type_name, values) in enumerate(zip(type_names, columns, strict=True)):
        array = _fixed_column(type_name, values)
        if array is None:
            varying.append((index, _field_by_field(type_name, values)))
        else:
            fixed.append((index, array))
            block += [(f"length{index}", ">i4"), (f"value{index}", _FIXED_WIDTH[type_name])]
    rows = np.empty(size, dtype=block)
    rows["fields"] = len(type_names)
    for index, array in fixed:
        rows[f"length{index}"] = rows.dtype[f"value{index}"].itemsize
        rows[f"value{index}"] = array
    starts: list[bytes] = rows.view(f"V{rows.dtype.itemsize}").tolist()
    pieces = zip(starts, *(fields for _index, fields in varying), strict=True)
    payload = b"".join((_COPY_HEADER, *itertools.chain.from_iterable(pieces), _COPY_TRAILER))
    return [index for index, _array in fixed] + [index for index, _fields in varying], payload


async def column_types(connection: AsyncConnection, table_name: str) -> dict[str, str]:
    """The type of each column of a table (``format_type`` names), as ``binary_copy`` needs them (PostgreSQL)."""
    driver = await driver_in_transaction(connection)
    rows = await driver.fetch(
        "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
        "WHERE attrelid = CAST($1 AS regclass) AND attnum > 0 AND NOT attisdropped",
        table_name,
    )
    return {row[0]: row[1] for row in rows}


async def copy_payload(connection: AsyncConnection, table_name: str, columns: Sequence[str], payload: bytes) -> None:
    """Append rows encoded by ``binary_copy`` (fields in ``columns`` order) inside the current transaction."""
    driver = await driver_in_transaction(connection)
    # A memoryview: the driver would take bytes for a file name.
    await driver.copy_to_table(table_name, source=memoryview(payload), columns=list(columns), format="binary")
