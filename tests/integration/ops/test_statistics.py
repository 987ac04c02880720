"""Planner statistics: where autovacuum is off, the timer's `db.analyze` analyzes what changed; SQLite is left alone.

The loaders' own ANALYZE (demo data, imports) is tested beside them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from loyalty.app import create_app
from loyalty.db.statistics import _ANALYZE_LOCK_KEY, StatisticsJobs, analyze_where_autovacuum_is_off
from loyalty.scheduling.timer import Timer
from loyalty.settings import Settings
from tests.conftest import Keys
from tests.support import has_sqlite_statistics, planner_statistics, wait_for

ORDERS = 80  # past autovacuum's default base threshold of 50 changed rows, on an empty table


def _orders_batch(tag: str) -> dict[str, Any]:
    return {
        "orders": [
            {
                "order_id": f"{tag}-{number}",
                "customer_id": f"{tag}-c-{number % 20}",
                "placed_at": "2024-05-01T10:00:00Z",
                "total": "25.00",
                "currency": "USD",
            }
            for number in range(ORDERS)
        ]
    }


@pytest.fixture
async def orders_without_autovacuum(engine: AsyncEngine) -> AsyncIterator[None]:
    """Autovacuum off for the orders table, whatever the server's own setting."""
    if engine.dialect.name != "postgresql":
        yield
        return
    async with engine.begin() as connection:
        await connection.execute(text("ALTER TABLE customer_order SET (autovacuum_enabled = false)"))
    try:
        yield
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("ALTER TABLE customer_order RESET (autovacuum_enabled)"))


async def test_the_served_app_runs_the_job_on_its_timer(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"scheduler_enabled": True}))
    async with AsyncTestClient(app=app):
        assert "db.analyze" in app.state.timer.job_names()


@pytest.mark.usefixtures("orders_without_autovacuum")
async def test_the_timer_analyzes_a_table_autovacuum_leaves_alone(
    settings: Settings, engine: AsyncEngine, keys: Keys
) -> None:
    postgres = engine.dialect.name == "postgresql"
    before = await planner_statistics(engine) if postgres else {}
    timer = Timer(poll_seconds=0.1, poll_jobs=StatisticsJobs(engine, every_seconds=0.1).poll_jobs())
    timer.start()
    try:
        async with AsyncTestClient(app=create_app(settings)) as client:
            response = await client.post(
                "/v1/orders/batch", json=_orders_batch("timer"), headers=keys.headers("storefront")
            )
            assert response.json()["created"] == ORDERS
        if not postgres:
            await asyncio.sleep(0.5)  # five polls
            assert not await has_sqlite_statistics(engine)
            return
        analyzed_before = before.get("customer_order", (0, 0))[0]

        async def orders_analyzed() -> bool:
            return (await planner_statistics(engine))["customer_order"][0] > analyzed_before

        await wait_for(orders_analyzed, "the timer never analyzed customer_order", within=30)
    finally:
        await timer.stop()


@pytest.mark.usefixtures("orders_without_autovacuum")
async def test_a_table_is_analyzed_once_per_change_past_the_threshold_by_one_replica_at_a_time(
    settings: Settings, engine: AsyncEngine, keys: Keys
) -> None:
    async with AsyncTestClient(app=create_app(settings)) as client:
        response = await client.post("/v1/orders/batch", json=_orders_batch("once"), headers=keys.headers("storefront"))
        assert response.json()["created"] == ORDERS
    # The app's engine is gone with its connections, and with them their row counts went to the server.
    if engine.dialect.name != "postgresql":
        assert await analyze_where_autovacuum_is_off(engine) == []
        assert not await has_sqlite_statistics(engine)
        return

    # PostgreSQL takes a backend's row counts when it goes idle or exits, not at once.
    async def orders_counted() -> bool:
        return (await planner_statistics(engine))["customer_order"][1] >= ORDERS

    await wait_for(orders_counted, "PostgreSQL never counted the new orders", within=30)

    # Another replica holding the lock: this one neither waits nor analyzes.
    async with engine.connect() as other_replica:
        await other_replica.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ANALYZE_LOCK_KEY})
        assert await asyncio.wait_for(analyze_where_autovacuum_is_off(engine), timeout=10) == []
        await other_replica.rollback()

    analyzed_before = (await planner_statistics(engine))["customer_order"][0]
    assert "customer_order" in await analyze_where_autovacuum_is_off(engine)
    analyzed, changed = (await planner_statistics(engine))["customer_order"]
    assert (analyzed, changed) == (analyzed_before + 1, 0)
    # Nothing changed since: nothing to do until the table changes past the threshold again.
    assert "customer_order" not in await analyze_where_autovacuum_is_off(engine)
    assert (await planner_statistics(engine))["customer_order"][0] == analyzed_before + 1


@pytest.mark.usefixtures("orders_without_autovacuum")
async def test_the_job_looks_at_most_once_a_minute(settings: Settings, engine: AsyncEngine, keys: Keys) -> None:
    jobs = StatisticsJobs(engine)
    await jobs.analyze_due()
    async with AsyncTestClient(app=create_app(settings)) as client:
        response = await client.post(
            "/v1/orders/batch", json=_orders_batch("minute"), headers=keys.headers("storefront")
        )
        assert response.json()["created"] == ORDERS
    if engine.dialect.name == "postgresql":

        async def orders_counted() -> bool:
            return (await planner_statistics(engine))["customer_order"][1] >= ORDERS

        await wait_for(orders_counted, "PostgreSQL never counted the new orders", within=30)
    assert await jobs.analyze_due() == {}  # due, but checked less than a minute ago
    another_process = await StatisticsJobs(engine).analyze_due()
    if engine.dialect.name == "postgresql":
        assert "customer_order" in another_process["analyzed"]
    else:
        assert another_process == {}
