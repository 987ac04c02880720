"""Offers and campaigns through the API: validation, dispatch with holdouts, idempotent retries, results."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from loyalty.db.models import CampaignMember, CampaignSend, Customer, CustomerTier, IssuedCode, OutboxEvent
from loyalty.db.session import transaction
from loyalty.offers.dispatch import OfferJobs, claim_send, dispatch_send, schedule_due_occurrences

VIP_OFFER = {"name": "vip-15", "kind": "percent_off", "value": "15", "valid_days": 30, "min_order_total": "50.00"}


def soon(seconds: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def create_offer(client: Any, marketing: dict[str, str], **overrides: Any) -> int:
    response = await client.post("/v1/offers", json={**VIP_OFFER, **overrides}, headers=marketing)
    assert response.status_code == 201, response.text
    return int(response.json()["offer_id"])


async def test_offer_validation(client, keys) -> None:
    marketing = keys.headers("marketing")
    offer_id = await create_offer(client, marketing)
    assert (await client.get(f"/v1/offers/{offer_id}", headers=marketing)).json()["value"] == "15.00"
    assert (await client.post("/v1/offers", json=VIP_OFFER, headers=marketing)).status_code == 409
    for overrides, field in [
        ({"value": "101"}, "body"),
        ({"value": "-5"}, "value"),
        ({"kind": "amount_off", "value": "0"}, "body"),
        ({"kind": "free_shipping", "value": "5"}, "body"),
        ({"kind": "teleport"}, "kind"),
        ({"valid_days": 0}, "valid_days"),
        ({"uses_per_code": 0}, "uses_per_code"),
        ({"min_order_total": "-1"}, "min_order_total"),
    ]:
        response = await client.post("/v1/offers", json={**VIP_OFFER, "name": "x", **overrides}, headers=marketing)
        assert response.status_code == 422, overrides
        errors = response.json()["errors"]
        assert field in [e["field"] for e in errors], errors
        if field == "body":
            assert any("value" in e["message"] for e in errors)
    listed = (await client.get("/v1/offers", headers=marketing)).json()
    assert [o["offer_id"] for o in listed["items"]] == [offer_id]
    assert (await client.post("/v1/offers", json=VIP_OFFER, headers=keys.headers("storefront"))).status_code == 403


async def test_campaign_validation(client, keys) -> None:
    marketing = keys.headers("marketing")
    offer_id = await create_offer(client, marketing)
    base = {"name": "c", "offer_id": offer_id, "tiers": ["vip"], "holdout_pct": 20}
    for body, field in [
        ({**base}, "body"),
        ({**base, "send_at": soon(60), "cron": "0 9 * * *"}, "body"),
        ({**base, "cron": "every day"}, "cron"),
        ({**base, "send_at": "2020-01-01T00:00:00Z"}, "send_at"),
        ({**base, "send_at": soon(60), "holdout_pct": 60}, "holdout_pct"),
        ({**base, "send_at": soon(60), "tiers": ["gold"]}, "tiers[0]"),
        ({**base, "send_at": soon(60), "tiers": []}, "tiers"),
        ({**base, "send_at": soon(60), "offer_id": 999}, "offer_id"),
        ({**base, "send_at": soon(60), "filters": {"min_value_score": 101}}, "filters.min_value_score"),
    ]:
        response = await client.post("/v1/campaigns", json=body, headers=marketing)
        assert response.status_code == 422, (body, response.text)
        assert field in [e["field"] for e in response.json()["errors"]], response.json()
    recurring = await client.post("/v1/campaigns", json={**base, "cron": "0 9 * * 1"}, headers=marketing)
    assert recurring.status_code == 201
    assert recurring.json()["status"] == "scheduled"
    assert recurring.json()["next_send_at"] is not None
    campaign_id = recurring.json()["campaign_id"]
    cancelled = await client.post(f"/v1/campaigns/{campaign_id}/cancel", headers=marketing)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["next_send_at"] is None
    assert (await client.post(f"/v1/campaigns/{campaign_id}/cancel", headers=marketing)).status_code == 409
    assert (await client.post("/v1/campaigns/999/cancel", headers=marketing)).status_code == 404


async def _code_holders(session_maker: Any) -> dict[str, list[str]]:
    async with session_maker() as session:
        rows = await session.execute(
            select(CustomerTier.tier, Customer.marketing_opt_out, func.count(IssuedCode.id))
            .join(Customer, Customer.id == IssuedCode.customer_id)
            .join(CustomerTier, CustomerTier.customer_id == IssuedCode.customer_id)
            .group_by(CustomerTier.tier, Customer.marketing_opt_out)
        )
        return {f"{tier}:{opt_out}": count for tier, opt_out, count in rows}


async def test_dispatch_issues_one_code_per_eligible_vip_and_keeps_a_holdout(
    client, keys, scored_shop, dispatch_due, session_maker
) -> None:
    marketing = keys.headers("marketing")
    offer_id = await create_offer(client, marketing)
    created = await client.post(
        "/v1/campaigns",
        json={"name": "VIP week", "offer_id": offer_id, "tiers": ["vip"], "send_at": soon(), "holdout_pct": 20},
        headers=marketing,
    )
    campaign_id = created.json()["campaign_id"]
    await dispatch_due()
    campaign = (await client.get(f"/v1/campaigns/{campaign_id}", headers=marketing)).json()
    assert campaign["status"] == "completed"
    assert len(campaign["sends"]) == 1
    send = campaign["sends"][0]
    assert send["late_seconds"] is not None
    async with session_maker() as session:
        eligible = await session.scalar(
            select(func.count())
            .select_from(CustomerTier)
            .join(Customer, Customer.id == CustomerTier.customer_id)
            .where(CustomerTier.tier == "vip", Customer.marketing_opt_out.is_(False))
        )
        opted_out_vips = await session.scalar(
            select(func.count())
            .select_from(CustomerTier)
            .join(Customer, Customer.id == CustomerTier.customer_id)
            .where(CustomerTier.tier == "vip", Customer.marketing_opt_out.is_(True))
        )
        per_customer = (
            await session.execute(select(IssuedCode.customer_id, func.count()).group_by(IssuedCode.customer_id))
        ).all()
        codes = (await session.scalars(select(IssuedCode.code))).all()
        issued_events = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.event_type == "offer.issued")
        )
    assert eligible is not None
    assert eligible > 200
    assert opted_out_vips, "the demo data should include opted-out VIPs"
    assert send["issued"] + send["holdout"] == eligible
    share = send["holdout"] / eligible
    assert abs(share - 0.20) < 3 * (0.2 * 0.8 / eligible) ** 0.5 + 0.01, share
    assert all(count == 1 for _, count in per_customer)
    assert len(set(codes)) == len(codes) == send["issued"]
    assert all(len(code) == 16 for code in codes)
    assert issued_events == send["issued"]
    holders = await _code_holders(session_maker)
    assert set(holders) == {"vip:False"}, holders

    # A duplicated or retried dispatch of the same send issues nothing more.
    async with transaction(session_maker) as session:
        send_id = await session.scalar(select(CampaignSend.id))
        await session.execute(update(CampaignSend).values(status="due"))
    await dispatch_due()
    async with session_maker() as session:
        assert await session.scalar(select(func.count()).select_from(IssuedCode)) == send["issued"]
        assert await session.scalar(select(func.count()).select_from(CampaignMember)) == eligible
    assert send_id is not None


async def test_two_dispatchers_racing_over_one_send_issue_one_code_each(
    client, keys, scored_shop, session_maker, database
) -> None:
    if database.dialect != "postgresql":
        pytest.skip("concurrent dispatchers need concurrent writers: PostgreSQL")
    marketing = keys.headers("marketing")
    offer_id = await create_offer(client, marketing)
    await client.post(
        "/v1/campaigns",
        json={"name": "race", "offer_id": offer_id, "tiers": ["vip", "nurture"], "send_at": soon(), "holdout_pct": 10},
        headers=marketing,
    )
    async with transaction(session_maker) as session:
        await schedule_due_occurrences(session, "UTC")
    async with transaction(session_maker) as session:
        send_id = await claim_send(session, 60)
    assert send_id is not None
    # Both believe they own it (a lease taken over while the first was still working).

    async def dispatcher() -> None:
        async with transaction(session_maker) as session:
            await dispatch_send(session, send_id)

    await asyncio.gather(dispatcher(), dispatcher())
    async with session_maker() as session:
        duplicates = (
            await session.execute(
                select(IssuedCode.customer_id).group_by(IssuedCode.customer_id).having(func.count() > 1)
            )
        ).all()
        members = await session.scalar(select(func.count()).select_from(CampaignMember).where(~CampaignMember.holdout))
        codes = await session.scalar(select(func.count()).select_from(IssuedCode))
    assert duplicates == []
    assert codes == members
    # Two polls at once: exactly one claims the next due send.
    await client.post(
        "/v1/campaigns",
        json={"name": "race 2", "offer_id": offer_id, "tiers": ["vip"], "send_at": soon(), "holdout_pct": 10},
        headers=marketing,
    )
    async with transaction(session_maker) as session:
        await schedule_due_occurrences(session, "UTC")

    async def claimer() -> int | None:
        async with transaction(session_maker) as session:
            return await claim_send(session, 60)

    claimed = [c for c in await asyncio.gather(claimer(), claimer()) if c is not None]
    assert len(claimed) == 1


async def test_a_send_held_up_past_its_lease_keeps_it_and_is_done_once(
    client, keys, scored_shop, session_maker, settings, database
) -> None:
    if database.dialect != "postgresql":
        pytest.skip("a send is taken over only by a concurrent writer (another replica): PostgreSQL")
    marketing = keys.headers("marketing")
    offer_id = await create_offer(client, marketing)
    await client.post(
        "/v1/campaigns",
        json={"name": "slow send", "offer_id": offer_id, "tiers": ["vip", "nurture"], "send_at": soon()},
        headers=marketing,
    )
    lease_seconds = 0.9
    jobs = OfferJobs(session_maker, settings.timezone, lease_seconds)
    # Another transaction holds the codes table, so the send's inserts wait for several of its leases.
    async with session_maker() as blocker:
        await blocker.execute(text("LOCK TABLE issued_code IN SHARE MODE"))
        sending = asyncio.create_task(jobs.dispatch_due())
        for _ in range(600):
            async with session_maker() as session:
                if await session.scalar(select(func.count()).where(CampaignSend.status == "running")):
                    break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the send was not claimed within 30 s")
        await asyncio.sleep(lease_seconds * 4)
        # A second replica polling now finds nothing to take over: the lease was renewed while the send waited.
        async with transaction(session_maker) as session:
            assert await claim_send(session, lease_seconds) is None
        await blocker.rollback()
    summary = await asyncio.wait_for(sending, timeout=60)
    assert [send["status"] for send in summary["sends"]] == ["done"]
    async with session_maker() as session:
        send = (await session.execute(select(CampaignSend.attempts, CampaignSend.status))).one()
        codes = await session.scalar(select(func.count()).select_from(IssuedCode))
    assert tuple(send) == (1, "done")
    assert codes == summary["sends"][0]["issued"] > 0


async def test_results_recover_a_known_uplift(client, keys, scored_shop, dispatch_due, session_maker) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    offer_id = await create_offer(client, marketing)
    created = await client.post(
        "/v1/campaigns",
        json={
            "name": "uplift",
            "offer_id": offer_id,
            "tiers": ["vip", "nurture"],
            "send_at": soon(),
            "holdout_pct": 40,
        },
        headers=marketing,
    )
    campaign_id = created.json()["campaign_id"]
    await dispatch_due()
    async with session_maker() as session:
        members = (
            await session.execute(
                select(Customer.external_id, CampaignMember.holdout)
                .join(Customer, Customer.id == CampaignMember.customer_id)
                .where(CampaignMember.campaign_id == campaign_id)
            )
        ).all()
    assert len(members) > 300
    # Everyone spends a base amount that varies; the treatment group spends 12.00 more on average.
    orders = []
    for index, (customer, holdout) in enumerate(members):
        base = 20 + (index * 37) % 60
        total = base + (0 if holdout else 12)
        orders.append(
            {
                "order_id": f"uplift-{index}",
                "customer_id": customer,
                "placed_at": soon(1),
                "total": f"{total}.00",
                "currency": "USD",
            }
        )
    await asyncio.sleep(1.2)
    for start in range(0, len(orders), 1000):
        response = await client.post(
            "/v1/orders/batch", json={"orders": orders[start : start + 1000]}, headers=storefront
        )
        assert response.json()["failed"] == 0
    results = (await client.get(f"/v1/campaigns/{campaign_id}/results", headers=marketing)).json()
    assert results["insufficient_data"] is False
    assert results["issued"] + results["holdout"] == len(members)
    low, high = (float(v) for v in results["incremental_revenue"]["ci95"])
    assert low < 12.0 < high, results
    assert low > 0, results
    assert "Welch" in results["incremental_revenue"]["method"]
    assert float(results["revenue_per_customer"]["treatment"]) > float(results["revenue_per_customer"]["holdout"])


async def test_results_with_too_few_customers_say_so(client, keys, session_maker, dispatch_due) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    for i in range(5):
        await client.post(
            "/v1/orders",
            json={
                "order_id": f"o-{i}",
                "customer_id": f"c-{i}",
                "placed_at": soon(-3600),
                "total": "900.00",
                "currency": "USD",
            },
            headers=storefront,
        )
    offer_id = await create_offer(client, marketing)
    created = await client.post(
        "/v1/campaigns",
        json={
            "name": "tiny",
            "offer_id": offer_id,
            "tiers": ["one_time", "nurture", "vip"],
            "send_at": soon(),
            "holdout_pct": 50,
        },
        headers=marketing,
    )
    await dispatch_due()
    results = (await client.get(f"/v1/campaigns/{created.json()['campaign_id']}/results", headers=marketing)).json()
    assert results["insufficient_data"] is True
    assert results["incremental_revenue"]["ci95"] is None
    assert results["issued"] + results["holdout"] == 5


async def test_missed_occurrences_send_once_and_say_how_late(client, keys, session_maker) -> None:
    marketing = keys.headers("marketing")
    offer_id = await create_offer(client, marketing)
    created = await client.post(
        "/v1/campaigns",
        json={"name": "weekly", "offer_id": offer_id, "tiers": ["vip"], "cron": "*/5 * * * *", "holdout_pct": 10},
        headers=marketing,
    )
    campaign_id = created.json()["campaign_id"]
    # No replica ran for an hour: twelve occurrences were missed.
    later = datetime.now(UTC) + timedelta(hours=1)
    async with transaction(session_maker) as session:
        assert await schedule_due_occurrences(session, "UTC", now=later) == 1
    async with transaction(session_maker) as session:
        assert await schedule_due_occurrences(session, "UTC", now=later) == 0
        send_id = await claim_send(session, 60, now=later)
        assert send_id is not None
        await dispatch_send(session, send_id, now=later)
    campaign = (await client.get(f"/v1/campaigns/{campaign_id}", headers=marketing)).json()
    assert len(campaign["sends"]) == 1
    send = campaign["sends"][0]
    occurrence = datetime.fromisoformat(send["occurrence_at"].replace("Z", "+00:00"))
    assert later - timedelta(minutes=5) < occurrence <= later
    assert send["late_seconds"] >= 0
    assert campaign["status"] == "running"
    assert datetime.fromisoformat(campaign["next_send_at"].replace("Z", "+00:00")) > later
