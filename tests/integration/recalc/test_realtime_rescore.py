"""The re-score inside POST /v1/orders: concurrent orders all counted, referrers up to two levels re-scored, rows
locked in a full run's order."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.db.models import Customer, CustomerScore
from loyalty.db.session import transaction
from loyalty.recalc import incremental
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


async def test_a_rescore_locks_the_score_row_before_the_tier_row(
    client, storefront, database, settings, session_maker
) -> None:
    """A full run's write locks scores, then tiers (``staged.apply``); the re-score must take them in that order
    too, or the two can wait on each other in a cycle. With the tier row held elsewhere, a re-score that is
    waiting for it must already hold the score row."""
    if database.dialect != "postgresql":
        pytest.skip("SQLite has one writer at a time: no row locks to order")
    assert (await client.post("/v1/orders", json=order("o-first", "c-locks"), headers=storefront)).status_code == 201
    url = database.url.replace("postgresql+asyncpg://", "postgresql://")
    holder, prober = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        customer_id = await holder.fetchval("SELECT id FROM customer WHERE external_id = 'c-locks'")
        holding_tier = holder.transaction()
        await holding_tier.start()
        await holder.execute("SELECT 1 FROM customer_tier WHERE customer_id = $1 FOR UPDATE", customer_id)

        async def rescore() -> dict[int, str]:
            async with transaction(session_maker) as session:
                return await incremental.rescore(
                    session, [customer_id], load_tiers(settings.tiers_file), incremental.ModelCache()
                )

        rescoring = asyncio.create_task(rescore())
        score_locked = False
        for _ in range(200):
            # A row lock is waited for on the holder's transaction id: the only lock anyone here can wait for.
            waiting = await prober.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted")
            if waiting:
                try:
                    async with prober.transaction():
                        await prober.execute(
                            "SELECT 1 FROM customer_score WHERE customer_id = $1 FOR UPDATE NOWAIT", customer_id
                        )
                except asyncpg.LockNotAvailableError:
                    score_locked = True
                break
            await asyncio.sleep(0.025)
        else:
            pytest.fail("the re-score never waited for the held tier row")
        await holding_tier.rollback()
        assert score_locked, "the re-score waits for the tier row without holding the score row"
        assert (await asyncio.wait_for(rescoring, 10)) == {customer_id: "one_time"}
    finally:
        await holder.close()
        await prober.close()
