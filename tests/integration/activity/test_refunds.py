"""Refunds: idempotent, never above the order total, even when they race."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from loyalty.db.models import Order, Refund

ORDER = {
    "order_id": "o-1",
    "customer_id": "c-1",
    "placed_at": "2026-03-01T10:00:00Z",
    "total": "100.00",
    "currency": "USD",
}


def refund(refund_id: str = "r-1", amount: str = "40.00", **overrides: Any) -> dict[str, Any]:
    return {"refund_id": refund_id, "amount": amount, "refunded_at": "2026-03-05T10:00:00Z", **overrides}


async def refunded_total(session_maker) -> Decimal:
    async with session_maker() as session:
        return await session.scalar(select(Order.refunded).where(Order.external_id == "o-1"))


async def test_refund_replay_and_conflict(client, storefront, session_maker) -> None:
    await client.post("/v1/orders", json=ORDER, headers=storefront)
    first = await client.post("/v1/orders/o-1/refunds", json=refund(), headers=storefront)
    assert first.status_code == 201, first.text
    assert first.json() | {"created_at": None} == {
        "refund_id": "r-1",
        "order_id": "o-1",
        "customer_id": "c-1",
        "amount": "40.00",
        "refunded_at": "2026-03-05T10:00:00Z",
        "created_at": None,
    }
    assert (await client.post("/v1/orders/o-1/refunds", json=refund(), headers=storefront)).status_code == 200
    conflict = await client.post("/v1/orders/o-1/refunds", json=refund(amount="41.00"), headers=storefront)
    assert conflict.status_code == 409
    assert await refunded_total(session_maker) == Decimal("40.00")


async def test_refunds_above_total_are_refused_and_write_nothing(client, storefront, session_maker) -> None:
    await client.post("/v1/orders", json=ORDER, headers=storefront)
    assert (
        await client.post("/v1/orders/o-1/refunds", json=refund("r-1", "60.00"), headers=storefront)
    ).status_code == 201
    over = await client.post("/v1/orders/o-1/refunds", json=refund("r-2", "40.01"), headers=storefront)
    assert over.status_code == 422
    assert over.json()["type"] == "/problems/refund-exceeds-total"
    assert over.json()["errors"][0]["field"] == "amount"
    exact = await client.post("/v1/orders/o-1/refunds", json=refund("r-3", "40.00"), headers=storefront)
    assert exact.status_code == 201
    assert await refunded_total(session_maker) == Decimal("100.00")
    async with session_maker() as session:
        assert await session.scalar(select(func.count()).select_from(Refund)) == 2


async def test_concurrent_refunds_never_exceed_total(client, storefront, session_maker) -> None:
    await client.post("/v1/orders", json=ORDER, headers=storefront)
    responses = await asyncio.gather(
        *(client.post("/v1/orders/o-1/refunds", json=refund(f"r-{i}", "30.00"), headers=storefront) for i in range(10))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 3 + [422] * 7, statuses
    assert await refunded_total(session_maker) == Decimal("90.00")


async def test_refund_validation(client, storefront) -> None:
    await client.post("/v1/orders", json=ORDER, headers=storefront)
    cases = [
        (refund(amount="0"), "amount"),
        (refund(amount="-5.00"), "amount"),
        (refund(amount="1.234"), "amount"),
        (refund(refunded_at="2026-03-05T10:00:00"), "refunded_at"),
        (refund(refunded_at="2026-02-01T10:00:00Z"), "refunded_at"),
    ]
    for body, field in cases:
        response = await client.post("/v1/orders/o-1/refunds", json=body, headers=storefront)
        assert response.status_code == 422, (body, response.text)
        assert field in [e["field"] for e in response.json()["errors"]]


async def test_refund_of_unknown_order_is_404(client, storefront) -> None:
    response = await client.post("/v1/orders/nope/refunds", json=refund(), headers=storefront)
    assert response.status_code == 404
    assert response.json()["type"] == "/problems/not-found"
