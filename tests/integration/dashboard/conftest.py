"""Fixtures for dashboard tests: a scored shop with one dispatched campaign, as marketing would see it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from loyalty.db.models import CampaignMember, Customer
from loyalty.demo.generator import load_demo


@pytest.fixture
async def shop(engine: Any, session_maker: Any, client: Any, keys: Any, run_due: Any, dispatch_due: Any) -> int:
    """Generated customers, tiered by a full run, and a VIP campaign sent with a holdout; the campaign id."""
    marketing = keys.headers("marketing")
    await load_demo(engine, customers=800, seed=5)
    assert (await client.post("/v1/recalculations", json={}, headers=marketing)).status_code == 202
    await run_due()
    offer = await client.post(
        "/v1/offers",
        json={"name": "vip-15", "kind": "percent_off", "value": "15", "valid_days": 30, "min_order_total": "50.00"},
        headers=marketing,
    )
    assert offer.status_code == 201, offer.text
    campaign = await client.post(
        "/v1/campaigns",
        json={
            "name": "Spring VIP <thanks>",
            "offer_id": offer.json()["offer_id"],
            "tiers": ["vip", "nurture"],
            "send_at": datetime.now(UTC).isoformat(),
            "holdout_pct": 20,
        },
        headers=marketing,
    )
    assert campaign.status_code == 201, campaign.text
    await dispatch_due()
    campaign_id = int(campaign.json()["campaign_id"])
    # Orders after the send, a little larger in the treatment group, so the holdout comparison has numbers.
    async with session_maker() as session:
        members = (
            await session.execute(
                select(Customer.external_id, CampaignMember.holdout)
                .join(Customer, Customer.id == CampaignMember.customer_id)
                .where(CampaignMember.campaign_id == campaign_id)
            )
        ).all()
    placed_at = datetime.now(UTC).isoformat()
    orders = [
        {
            "order_id": f"after-campaign-{index}",
            "customer_id": customer,
            "placed_at": placed_at,
            "total": f"{40 + (index * 37) % 60 + (0 if holdout else 10)}.00",
            "currency": "USD",
        }
        for index, (customer, holdout) in enumerate(members)
    ]
    response = await client.post("/v1/orders/batch", json={"orders": orders}, headers=keys.headers("storefront"))
    assert response.json()["failed"] == 0, response.text
    return campaign_id
