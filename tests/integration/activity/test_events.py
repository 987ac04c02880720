"""Interaction events: bulk, idempotent, each rejection reported by index."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from loyalty.db.models import Customer, InteractionEvent


def event(event_id: str, **overrides: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "customer_id": "c-1",
        "type": "product_view",
        "target": "product:SKU-1",
        "occurred_at": "2026-03-01T10:00:00Z",
        **overrides,
    }


async def test_events_accepted_duplicates_rejected(client, storefront, session_maker) -> None:
    first = await client.post("/v1/events", json={"events": [event("e-1"), event("e-2")]}, headers=storefront)
    assert first.status_code == 202
    assert first.json() == {"accepted": 2, "duplicates": 0, "rejected": []}
    second = await client.post(
        "/v1/events",
        json={
            "events": [
                event("e-2"),
                event("e-3", type="teleport"),
                event("e-4", occurred_at="2026-03-01T10:00:00"),
                event("e-5", customer_id="c-2", type="review"),
                event("e-5", customer_id="c-2", type="review"),
            ]
        },
        headers=storefront,
    )
    body = second.json()
    assert (body["accepted"], body["duplicates"]) == (1, 2)
    assert [r["index"] for r in body["rejected"]] == [1, 2]
    assert body["rejected"][0]["problem"]["errors"][0]["field"] == "events[1].type"
    assert body["rejected"][1]["problem"]["errors"][0]["field"] == "events[2].occurred_at"
    async with session_maker() as session:
        assert await session.scalar(select(func.count()).select_from(InteractionEvent)) == 3
        assert await session.scalar(select(func.count()).select_from(Customer)) == 2


async def test_event_batch_limit(client, storefront) -> None:
    response = await client.post(
        "/v1/events", json={"events": [event(f"e-{i}") for i in range(1001)]}, headers=storefront
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "events"
