"""The re-score inside POST /v1/orders: concurrent orders all counted, referrers up to two levels re-scored, rows
locked in a full run's order."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loyalty.db.models import Customer, CustomerScore
from loyalty.recalc import incremental
from loyalty.settings import Settings
from loyalty.tiers.config import load_tiers


def order(order_id: str, customer_id: str, total: str = "40.00") -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "placed_at": "2026-03-01T10:15:00Z",
        "total": total,
        "currency": "USD",
        "items": [{"sku": "SKU-1", "quantity": 1, "unit_price": total}],
    }


async def score_of(session_maker: async_sessionmaker[AsyncSession], customer_id: str) -> CustomerScore:
    async with session_maker() as session:
        score = await session.scalar(
            select(CustomerScore)
            .join(Customer, Customer.id == CustomerScore.customer_id)
            .where(Customer.external_id == customer_id)
        )
    assert score is not None, customer_id
    return score


async def test_concurrent_orders_of_one_customer_are_all_in_its_score(client, storefront, session_maker) -> None:
    # Each re-score locks the customer, so the last one to commit has seen every order before it.
    responses = await asyncio.gather(
        *(client.post("/v1/orders", json=order(f"o-{i}", "c-busy"), headers=storefront) for i in range(20))
    )
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses if r.status_code != 201]
    assert (await score_of(session_maker, "c-busy")).paid_orders == 20


async def test_an_order_rescores_the_referrers_two_levels_up(client, storefront, session_maker) -> None:
    for referrer, referee in (("grandparent", "parent"), ("parent", "child"), ("outsider", "other")):
        referral = {"referrer_id": referrer, "referee_id": referee, "occurred_at": "2026-02-01T10:00:00Z"}
        assert (await client.post("/v1/referrals", json=referral, headers=storefront)).status_code == 201
    before: dict[str, datetime] = {
        name: (await score_of(session_maker, name)).computed_at
        for name in ("grandparent", "parent", "child", "outsider")
    }

    assert (await client.post("/v1/orders", json=order("o-child", "child"), headers=storefront)).status_code == 201

    parent = await score_of(session_maker, "parent")
    grandparent = await score_of(session_maker, "grandparent")
    assert parent.computed_at > before["parent"]
    assert grandparent.computed_at > before["grandparent"]
    assert parent.converted_referrals == 1
    assert parent.referred_revenue > 0
    # The second level counts at the configured decay.
    assert grandparent.referred_revenue > 0
    assert (await score_of(session_maker, "outsider")).computed_at == before["outsider"]


class RescoreOnOneConnection:
    """Re-scores of one customer on one connection of their own, so a test knows their server process (``pid``) and
    can run the statements before the one it watches: a prepared statement reused from the connection's cache is
    planned once, and can lock in another order than on its first run."""

    def __init__(self, engine: AsyncEngine, settings: Settings, customer_id: int) -> None:
        self.engine, self.customer_id = engine, customer_id
        self.tiers = load_tiers(settings.tiers_file)

    async def __aenter__(self) -> RescoreOnOneConnection:
        self.connection = await self.engine.connect()
        self.pid = await self.connection.scalar(text("SELECT pg_backend_pid()"))
        await self.connection.commit()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.connection.close()

    async def rescore(self) -> dict[int, str]:
        async with AsyncSession(bind=self.connection) as session:
            tiers = await incremental.rescore(session, [self.customer_id], self.tiers, incremental.ModelCache())
            await session.commit()
        return tiers


async def customer_and_two_sessions(
    client: Any, storefront: dict[str, str], database: Any, name: str
) -> tuple[asyncpg.Connection, asyncpg.Connection, int]:
    """A customer with an order (so a score and a tier row), and two sessions of the test's own: one holds locks,
    one looks at them. PostgreSQL only: SQLite has one writer at a time, no locks to order."""
    if database.dialect != "postgresql":
        pytest.skip("SQLite has one writer at a time: no locks to order")
    assert (await client.post("/v1/orders", json=order(f"o-{name}", name), headers=storefront)).status_code == 201
    url = database.url.replace("postgresql+asyncpg://", "postgresql://")
    holder, prober = await asyncpg.connect(url), await asyncpg.connect(url)
    customer_id = await holder.fetchval("SELECT id FROM customer WHERE external_id = $1", name)
    return holder, prober, customer_id


async def waiting(prober: asyncpg.Connection, pid: int) -> bool:
    for _ in range(200):
        if await prober.fetchval("SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted", pid):
            return True
        await asyncio.sleep(0.025)
    return False


async def test_a_rescore_locks_the_score_row_before_the_tier_row(
    client, storefront, database, settings, engine
) -> None:
    """A full run's write locks scores, then tiers (``staged.apply``); the re-score must take them in that order
    too, or the two can wait on each other in a cycle. With the tier row held elsewhere, a re-score that is
    waiting for it must already hold the score row; on a statement reused from the cache as on a first one."""
    holder, prober, customer_id = await customer_and_two_sessions(client, storefront, database, "c-locks")
    try:
        async with RescoreOnOneConnection(engine, settings, customer_id) as rescorer:
            for warm_runs in (0, 3):
                for _ in range(warm_runs):
                    await rescorer.rescore()
                holding_tier = holder.transaction()
                await holding_tier.start()
                await holder.execute("SELECT 1 FROM customer_tier WHERE customer_id = $1 FOR UPDATE", customer_id)
                rescoring = asyncio.create_task(rescorer.rescore())
                assert await waiting(prober, rescorer.pid), "the re-score never waited for the held tier row"
                try:
                    async with prober.transaction():
                        await prober.execute(
                            "SELECT 1 FROM customer_score WHERE customer_id = $1 FOR UPDATE NOWAIT", customer_id
                        )
                    score_locked = False
                except asyncpg.LockNotAvailableError:
                    score_locked = True
                await holding_tier.rollback()
                assert score_locked, f"after {warm_runs} runs: waits for the tier row without holding the score row"
                assert (await asyncio.wait_for(rescoring, 10)) == {customer_id: "one_time"}
    finally:
        await holder.close()
        await prober.close()


async def test_a_rescore_locks_the_score_table_before_the_tier_table(
    client, storefront, database, settings, engine
) -> None:
    """A full run's write locks the score table, then the tier table (``staged.apply``). A re-score waiting for the
    score table must not already hold the tier table in a mode that run's lock waits for: on its statement's
    first run, and on the plan reused from the connection's statement cache after it."""
    holder, prober, customer_id = await customer_and_two_sessions(client, storefront, database, "c-tables")
    try:
        async with RescoreOnOneConnection(engine, settings, customer_id) as rescorer:
            for warm_runs in (0, 1, 5):
                for _ in range(warm_runs):
                    await rescorer.rescore()
                holding_scores = holder.transaction()
                await holding_scores.start()
                await holder.execute("LOCK TABLE customer_score IN SHARE ROW EXCLUSIVE MODE")
                rescoring = asyncio.create_task(rescorer.rescore())
                assert await waiting(prober, rescorer.pid), "the re-score never waited for the score table"
                tier_writes = await prober.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE pid = $1 AND granted AND mode = 'RowExclusiveLock' "
                    "AND relation = 'customer_tier'::regclass",
                    rescorer.pid,
                )
                await holding_scores.rollback()
                assert tier_writes == 0, f"after {warm_runs} runs: holds the tier table while waiting for scores"
                assert (await asyncio.wait_for(rescoring, 10)) == {customer_id: "one_time"}
    finally:
        await holder.close()
        await prober.close()
