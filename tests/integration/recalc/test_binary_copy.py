"""The full run's binary COPY payloads (``binary_copy``, built from columns) store exactly what the driver's own
encoding of the same rows stores: every type the stage tables have, NULLs in each way a column can carry them
(None, NaN), text beyond ASCII, instants before and after 2000, and no rows at all."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from loyalty.db.staging import EPOCH, binary_copy, column_types, copy_payload, is_postgres_connection, micros_of

COLUMNS = {
    "id": "BIGINT",
    "small": "INTEGER",
    "amount": "BIGINT",
    "ratio": "DOUBLE PRECISION",
    "maybe_ratio": "DOUBLE PRECISION",
    "flag": "BOOLEAN",
    "label": "VARCHAR(16)",
    "body": "TEXT",
    "document": "JSON",
    "at": "TIMESTAMP WITH TIME ZONE",
    "maybe_at": "TIMESTAMP WITH TIME ZONE",
    "day_at": "TIMESTAMP WITH TIME ZONE",
}
INSTANTS = [
    datetime(2026, 11, 24, 12, 30, 15, 123456, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    EPOCH,
]


def _columns(size: int) -> dict[str, Any]:
    """Columns in each form ``binary_copy`` takes: arrays (NaN for NULL) and lists (None for NULL)."""
    rng = np.random.default_rng(size)
    maybe_ratio = rng.random(size)
    maybe_ratio[::3] = math.nan
    day_micros = np.floor(rng.random(size) * 20_000) * 86_400_000_000.0
    maybe_day = day_micros.copy()
    maybe_day[1::4] = math.nan
    return {
        "id": np.arange(size, dtype=np.int64) * 7 - 3,
        "small": [index % 5 for index in range(size)],
        "amount": np.rint(rng.normal(0, 1e9, size)).astype(np.int64),
        "ratio": np.concatenate([[-0.0, 1e-300, 1.7976931348623157e308], rng.normal(size=size)])[:size],
        "maybe_ratio": maybe_ratio,
        "flag": [index % 2 == 0 for index in range(size)],
        "label": [None if index % 4 == 0 else ["vip", "nurture", "prospect"][index % 3] for index in range(size)],
        "body": [f"≥ {index} \\ \t \n ✓ {'é' * (index % 7)}" for index in range(size)],
        "document": [f'{{"next_tier": "vip", "missing": [{index}]}}' for index in range(size)],
        "at": [INSTANTS[index % 3] for index in range(size)],
        "maybe_at": [None if index % 2 else INSTANTS[index % 3] + timedelta(days=index) for index in range(size)],
        "day_at": maybe_day,
    }


def _rows(columns: dict[str, Any], size: int) -> list[tuple[Any, ...]]:
    """The same rows as the driver takes them."""
    values = []
    for name, column in columns.items():
        if isinstance(column, np.ndarray) and name == "day_at":
            values.append([None if math.isnan(v) else EPOCH + timedelta(microseconds=v) for v in column.tolist()])
        elif isinstance(column, np.ndarray):
            values.append([None if v != v else v for v in column.tolist()])
        else:
            values.append(column)
    return list(zip(*values, strict=True)) if size else []


@pytest.mark.parametrize("size", [0, 1, 257])
async def test_binary_copy_stores_what_the_driver_stores(engine, size: int) -> None:
    async with engine.connect() as connection:
        if not is_postgres_connection(connection):
            pytest.skip("binary COPY is PostgreSQL's")
        definition = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        async with connection.begin():
            for table in ("by_columns", "by_rows"):
                await connection.execute(text(f"CREATE TEMPORARY TABLE {table} ({definition})"))
            types = await column_types(connection, "by_columns")
            columns = _columns(size)
            names = list(COLUMNS)
            order, payload = binary_copy([types[name] for name in names], [columns[name] for name in names], size)
            await copy_payload(connection, "by_columns", [names[index] for index in order], payload)
            driver = (await connection.get_raw_connection()).driver_connection
            assert driver is not None
            await driver.copy_records_to_table("by_rows", records=_rows(columns, size), columns=names)
            listed = ", ".join(names)
            by_columns = (await connection.execute(text(f"SELECT {listed} FROM by_columns ORDER BY id"))).all()
            by_rows = (await connection.execute(text(f"SELECT {listed} FROM by_rows ORDER BY id"))).all()
            await connection.rollback()
    assert len(by_columns) == size
    assert by_columns == by_rows
    if size:
        assert micros_of(by_columns[0].at) == micros_of(INSTANTS[0])
        assert math.copysign(1.0, by_columns[0].ratio) == -1.0  # -0.0 kept
