"""Codes at checkout: check, redeem (never past the uses allowed, under any concurrency), void, expiry."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from loyalty.db.models import Customer, IssuedCode, OutboxEvent, Redemption
from loyalty.db.session import transaction
from loyalty.offers.dispatch import OfferJobs
from tests.integration.offers.test_offers import VIP_OFFER, create_offer, soon


async def issued_code(client: Any, keys: Any, dispatch_due: Any, session_maker: Any, **offer: Any) -> tuple[str, str]:
    """A code issued by a campaign to the one-time buyer `c-1`; returns (code, customer id)."""
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await client.post(
        "/v1/orders",
        json={"order_id": "o-1", "customer_id": "c-1", "placed_at": soon(-60), "total": "20.00", "currency": "USD"},
        headers=storefront,
    )
    await client.put("/v1/customers/c-2", json={}, headers=storefront)
    offer_id = await create_offer(client, marketing, **offer)
    await client.post(
        "/v1/campaigns",
        json={
            "name": "all",
            "offer_id": offer_id,
            "tiers": ["one_time", "nurture", "vip"],
            "send_at": soon(),
            "holdout_pct": 0,
        },
        headers=marketing,
    )
    await dispatch_due()
    async with session_maker() as session:
        code = await session.scalar(
            select(IssuedCode.code)
            .join(Customer, Customer.id == IssuedCode.customer_id)
            .where(Customer.external_id == "c-1")
        )
    assert code is not None
    return code, "c-1"


def redemption(code: str, order_id: str = "o-100", customer_id: str = "c-1", total: str = "80.00") -> dict[str, str]:
    return {"code": code, "customer_id": customer_id, "order_id": order_id, "order_total": total}


async def test_check_redeem_replay_void(client, keys, dispatch_due, session_maker) -> None:
    storefront = keys.headers("storefront")
    code, _ = await issued_code(client, keys, dispatch_due, session_maker)
    check = (await client.get(f"/v1/codes/{code}?customer_id=c-1&order_total=80.00", headers=storefront)).json()
    assert check["valid"] is True
    assert check["offer"]["name"] == VIP_OFFER["name"]
    low = (await client.get(f"/v1/codes/{code}?customer_id=c-1&order_total=10.00", headers=storefront)).json()
    assert low["valid"] is False
    assert "at least" in low["reason"]
    other = (await client.get(f"/v1/codes/{code.lower()}?customer_id=c-2", headers=storefront)).json()
    assert other["valid"] is False
    assert (await client.get(f"/v1/codes/{code}?order_total=abc", headers=storefront)).status_code == 422

    first = await client.post("/v1/redemptions", json=redemption(code), headers=storefront)
    assert first.status_code == 201, first.text
    redemption_id = first.json()["redemption_id"]
    assert (await client.post("/v1/redemptions", json=redemption(code), headers=storefront)).status_code == 200
    conflict = await client.post("/v1/redemptions", json=redemption(code, total="90.00"), headers=storefront)
    assert conflict.status_code == 409
    used_up = await client.post("/v1/redemptions", json=redemption(code, order_id="o-101"), headers=storefront)
    assert used_up.status_code == 409
    assert used_up.json()["type"] == "/problems/code-used-up"

    assert (await client.delete(f"/v1/redemptions/{redemption_id}", headers=storefront)).status_code == 204
    assert (await client.delete(f"/v1/redemptions/{redemption_id}", headers=storefront)).status_code == 204
    again = await client.post("/v1/redemptions", json=redemption(code, order_id="o-101"), headers=storefront)
    assert again.status_code == 201
    assert (await client.delete("/v1/redemptions/999999", headers=storefront)).status_code == 404
    async with session_maker() as session:
        assert await session.scalar(select(IssuedCode.uses_left).where(IssuedCode.code == code)) == 0
        redeemed = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.event_type == "offer.redeemed")
        )
    assert redeemed == 2


async def test_refusals_have_distinct_problem_types(client, keys, dispatch_due, session_maker) -> None:
    storefront = keys.headers("storefront")
    code, _ = await issued_code(client, keys, dispatch_due, session_maker)
    cases = [
        (redemption("NOPE0000NOPE0000"), 404, "/problems/code-not-found", "code"),
        (redemption(code, customer_id="c-2"), 422, "/problems/code-not-theirs", "customer_id"),
        (redemption(code, total="49.99"), 422, "/problems/below-minimum-order", "order_total"),
        (redemption(code, total="-1"), 422, "/problems/validation", "order_total"),
    ]
    for body, status, problem_type, field in cases:
        response = await client.post("/v1/redemptions", json=body, headers=storefront)
        assert response.status_code == status, (body, response.text)
        assert response.json()["type"] == problem_type
        assert field in [e["field"] for e in response.json()["errors"]]
    async with transaction(session_maker) as session:
        await session.execute(update(IssuedCode).values(expires_at=datetime.now(UTC) - timedelta(minutes=1)))
    expired = await client.post("/v1/redemptions", json=redemption(code), headers=storefront)
    assert expired.status_code == 422
    assert expired.json()["type"] == "/problems/code-expired"
    async with session_maker() as session:
        assert await session.scalar(select(func.count()).select_from(Redemption)) == 0


async def test_fifty_concurrent_redemptions_of_one_code_one_succeeds(client, keys, dispatch_due, session_maker) -> None:
    storefront = keys.headers("storefront")
    code, _ = await issued_code(client, keys, dispatch_due, session_maker)
    responses = await asyncio.gather(
        *(
            client.post("/v1/redemptions", json=redemption(code, order_id=f"o-{i}"), headers=storefront)
            for i in range(50)
        )
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 49, statuses
    async with session_maker() as session:
        assert await session.scalar(select(func.count()).select_from(Redemption)) == 1
        assert await session.scalar(select(IssuedCode.uses_left).where(IssuedCode.code == code)) == 0


async def test_scheduler_marks_expired_codes(client, keys, dispatch_due, session_maker, settings) -> None:
    code, _ = await issued_code(client, keys, dispatch_due, session_maker)
    async with transaction(session_maker) as session:
        await session.execute(
            update(IssuedCode)
            .where(IssuedCode.code == code)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    result = await OfferJobs(session_maker, settings.timezone, 60).expire()
    assert result == {"expired": 1}
    async with session_maker() as session:
        assert await session.scalar(select(IssuedCode.status).where(IssuedCode.code == code)) == "expired"
