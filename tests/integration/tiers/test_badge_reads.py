"""The badge's one-statement reads (`read_first`): more at once than the pool holds wait their turn, in order, and
no longer than the pool itself would."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import event, literal, select, text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from loyalty.db.session import create_engine, read_first


async def test_reads_beyond_the_pool_are_served_in_arrival_order(settings, database) -> None:
    # One connection on PostgreSQL; SQLite's pool never has fewer than two, so there two reads run at once.
    engine = create_engine(settings.model_copy(update={"db_pool_size": 1, "db_max_overflow": 0}))
    executed: list[int] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _record(_connection: Any, _cursor: Any, statement: str, parameters: Any, *_rest: Any) -> None:
        if statement.startswith("SELECT"):  # not SQLite's BEGIN
            executed.append(parameters[0])

    async def read(number: int) -> int:
        row = await read_first(engine, select(literal(number)), {})
        assert row is not None
        return int(row[0])

    try:
        answers = await asyncio.gather(*(read(number) for number in range(24)))
    finally:
        await engine.dispose()
    assert answers == list(range(24))
    # Each read had its statement run in the order it asked for a connection.
    assert sorted(executed) == list(range(24))
    if database.dialect == "postgresql":
        assert executed == list(range(24))


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
