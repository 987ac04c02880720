"""The badge's one-statement reads (`read_first`): more at once than the pool holds wait their turn, in order, and
no longer than the pool itself would; on asyncpg, run on the driver's connection, they answer what SQLAlchemy
answers, and a lost connection is recovered from as SQLAlchemy recovers from it."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import Float, Numeric, bindparam, cast, event, func, insert, literal, make_url, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from loyalty.db.models import Customer, CustomerTier
from loyalty.db.session import create_engine, read_first
from loyalty.lib.clock import utcnow


async def test_reads_beyond_the_pool_are_served_in_arrival_order(settings, database) -> None:
    # One connection on PostgreSQL; SQLite's pool never has fewer than two, so there two reads run at once.
    engine = create_engine(settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0}))
    postgres = database.dialect == "postgresql"

    async def read(number: int) -> Any:
        # On PostgreSQL each read also answers when it ran, by the server's clock.
        statement = select(literal(number), func.clock_timestamp()) if postgres else select(literal(number))
        row = await read_first(engine, statement, {})
        assert row is not None
        return row

    try:
        rows = await asyncio.gather(*(read(number) for number in range(24)))
    finally:
        await engine.dispose()
    assert [int(row[0]) for row in rows] == list(range(24))
    if postgres:
        # Each read had its statement run in the order it asked for a connection.
        assert [int(row[0]) for row in sorted(rows, key=lambda row: row[1])] == list(range(24))


async def test_a_read_waits_no_longer_than_the_pool_timeout(settings, database) -> None:
    if database.dialect != "postgresql":
        pytest.skip("needs a statement that holds its connection for a while (pg_sleep)")
    engine = create_engine(
        settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0, "db_timeout_seconds": 0.5})
    )
    try:
        holder = asyncio.create_task(read_first(engine, text("SELECT pg_sleep(3)"), {}))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(PoolTimeoutError):
            await read_first(engine, select(literal(1)), {})
        assert time.monotonic() - started < 2.0
        await holder
        # The slot the timed-out read waited for is not lost: the next read is served.
        assert await read_first(engine, select(literal(2)), {}) == (2,)
    finally:
        await engine.dispose()


async def test_a_read_on_the_driver_answers_what_sqlalchemy_answers(engine, database) -> None:
    if database.dialect != "postgresql":
        pytest.skip("SQLite's reads run through SQLAlchemy itself")
    now = utcnow()
    progress = {"next_tier": "vip", "text": "spend 10.50 more", "missing": [{"figure": "net_spend", "needed": 1}]}
    async with engine.begin() as connection:
        customer_id = await connection.scalar(
            insert(Customer).values(external_id="reader-1", attributes={}).returning(Customer.id)
        )
        await connection.execute(insert(Customer).values(external_id="reader-2", attributes={}))
        await connection.execute(
            insert(CustomerTier).values(
                customer_id=customer_id,
                tier="loyal",
                since=now - timedelta(days=3),
                qualified_tier="loyal",
                progress=progress,
                pinned_until=now + timedelta(days=2),
                updated_at=now,
            )
        )
    statement = select(
        Customer.created_at, CustomerTier.tier, CustomerTier.since, CustomerTier.progress, CustomerTier.pinned_until
    ).outerjoin(CustomerTier, CustomerTier.customer_id == Customer.id)
    by_id = statement.where(Customer.external_id == bindparam("external_id"))
    for external_id in ("reader-1", "reader-2", "nobody"):
        async with engine.connect() as connection:
            expected = (await connection.execute(by_id, {"external_id": external_id})).first()
        row = await read_first(engine, by_id, {"external_id": external_id})
        assert (row is None) == (expected is None)
        if expected is not None:
            assert tuple(row) == tuple(expected)
            # Values, names and types alike: aware datetimes, the JSON document decoded.
            assert row._asdict() == expected._asdict()
            assert all(value is None or value.tzinfo is not None for value in (row.created_at, row.pinned_until))
    assert (await read_first(engine, by_id, {"external_id": "reader-1"})).progress == progress
    # Numbers whose processing depends on the type the server reports (left to SQLAlchemy): the same values too.
    numbers = select(
        cast(literal("12.50"), Numeric(10, 2)).label("amount"), cast(literal(0.25), Float).label("ratio")
    ).where(Customer.external_id == bindparam("external_id"))
    async with engine.connect() as connection:
        expected = (await connection.execute(numbers, {"external_id": "reader-1"})).first()
    row = await read_first(engine, numbers, {"external_id": "reader-1"})
    assert row is not None
    assert expected is not None
    assert tuple(row) == tuple(expected) == (Decimal("12.50"), 0.25)


async def test_a_read_on_a_lost_connection_is_answered_on_a_new_one(settings, database) -> None:
    if database.dialect != "postgresql":
        pytest.skip("needs a server connection to terminate")
    engine = create_engine(settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0}))
    backend = select(func.pg_backend_pid())
    try:
        first = await read_first(engine, backend, {})
        assert first is not None
        # The pooled connection dies (a database restart, an administrator), unnoticed by the pool.
        admin = create_engine(settings)
        try:
            async with admin.connect() as connection:
                await connection.execute(select(func.pg_terminate_backend(first[0])))
        finally:
            await admin.dispose()
        second = await read_first(engine, backend, {})
        assert second is not None
        assert second[0] != first[0]
        # The dead connection was not handed out again: the next read runs on the new one.
        assert await read_first(engine, backend, {}) == second
    finally:
        await engine.dispose()


async def test_a_database_out_of_reach_is_tried_once(settings, database) -> None:
    # A refused connection stands in for a host that does not answer: trying again would double that wait. The
    # error is what SQLAlchemy's own checkout raises (asyncpg's connect errors are OSErrors), which the API answers
    # with a 503.
    if database.dialect != "postgresql":
        pytest.skip("a server to be out of reach of")
    unreachable = make_url(settings.database_url).set(host="127.0.0.1", port=1).render_as_string(hide_password=False)
    engine = create_engine(settings.model_copy(update={"database_url": unreachable}))
    attempts: list[int] = []
    event.listen(engine.sync_engine, "do_connect", lambda *_arguments: attempts.append(1))
    try:
        with pytest.raises((DBAPIError, OSError)):
            await read_first(engine, select(literal(1)), {})
    finally:
        await engine.dispose()
    assert len(attempts) == 1
