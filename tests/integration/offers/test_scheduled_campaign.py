"""A campaign scheduled a few seconds ahead is sent by a running server's own timer."""

from __future__ import annotations

import asyncio
import time

import pytest
from litestar.testing import AsyncTestClient

from loyalty.app import create_app
from tests.integration.offers.test_offers import create_offer, soon


@pytest.mark.slow
async def test_campaign_three_seconds_ahead_is_dispatched_by_the_timer(settings, keys, scored_shop) -> None:
    running = settings.model_copy(update={"scheduler_enabled": True, "poll_seconds": 1.0})
    async with AsyncTestClient(app=create_app(running)) as client:
        marketing = keys.headers("marketing")
        offer_id = await create_offer(client, marketing)
        created = await client.post(
            "/v1/campaigns",
            json={"name": "timed", "offer_id": offer_id, "tiers": ["vip"], "send_at": soon(3), "holdout_pct": 20},
            headers=marketing,
        )
        campaign_id = created.json()["campaign_id"]
        started = time.monotonic()
        deadline = started + 3 + running.poll_seconds + 2
        campaign = created.json()
        while time.monotonic() < deadline:
            campaign = (await client.get(f"/v1/campaigns/{campaign_id}", headers=marketing)).json()
            if campaign["status"] == "completed":
                break
            await asyncio.sleep(0.2)
    assert campaign["status"] == "completed", campaign
    send = campaign["sends"][0]
    eligible = send["issued"] + send["holdout"]
    assert eligible > 200
    assert abs(send["holdout"] / eligible - 0.2) < 3 * (0.16 / eligible) ** 0.5 + 0.01
    assert send["late_seconds"] < running.poll_seconds + 2
