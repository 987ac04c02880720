"""The re-score inside POST /v1/orders: concurrent orders all counted, referrers up to two levels re-scored."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.db.models import Customer, CustomerScore


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
