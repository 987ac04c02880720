"""Full recalculation through the API: runs, records, tiers, dry runs, the one-run-at-a-time rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from loyalty.db.models import CustomerScore, CustomerTier, TierHistory

NOW = datetime.now(UTC).replace(microsecond=0)


def order(order_id: str, customer_id: str, days_ago: float, total: str) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "placed_at": (NOW - timedelta(days=days_ago)).isoformat(),
        "total": total,
        "currency": "USD",
    }


async def seed_shop(client: Any, headers: dict[str, str], customers: int = 40) -> None:
    """A small shop: heavy repeat buyers, occasional ones, one-time buyers, and prospects."""
    orders = []
    for i in range(customers):
        customer = f"c-{i:03d}"
        purchases = 1 if i % 3 == 0 else (2 + i % 4 if i % 3 == 1 else 6 + i % 5)
        for k in range(purchases):
            orders.append(order(f"o-{i:03d}-{k}", customer, 300 - k * 25 - i % 7, f"{20 + (i * 7) % 90}.{i % 100:02d}"))
    for start in range(0, len(orders), 500):
        response = await client.post("/v1/orders/batch", json={"orders": orders[start : start + 500]}, headers=headers)
        assert response.json()["failed"] == 0, response.text
    for i in range(5):
        await client.put(f"/v1/customers/p-{i}", json={}, headers=headers)


async def test_run_scores_every_customer_and_records_itself(client, keys, run_due, session_maker) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await seed_shop(client, storefront)
    requested = await client.post("/v1/recalculations", json={}, headers=marketing)
    assert requested.status_code == 202, requested.text
    run_id = requested.json()["run_id"]
    assert (await client.post("/v1/recalculations", json={}, headers=marketing)).status_code == 409
    await run_due()
    run = (await client.get(f"/v1/recalculations/{run_id}", headers=marketing)).json()
    assert run["status"] == "succeeded", run
    assert run["trigger"] == "manual"
    assert run["customers"] == 40
    assert set(run["phases"]) >= {"aggregate", "fit", "score", "rules", "write"}
    assert run["model"]["time_unit"] == "day"
    # 40 customers cannot support a fit: the documented defaults are used and the record says so.
    assert run["model"]["fallback"]
    assert set(run["model"]["bgnbd"]) == {"r", "alpha", "a", "b", "log_likelihood"}
    moved = sum(n for targets in run["moves"].values() for n in targets.values())
    assert moved == 45
    assert run["moves"]["none"]["prospect"] == 5 or run["moves"].get("prospect", {}).get("prospect") == 5
    assert len(run["config_hash"]) == 64
    async with session_maker() as session:
        assert await session.scalar(select(func.count()).select_from(CustomerScore)) == 45
        tiers = dict((await session.execute(select(CustomerTier.tier, func.count()).group_by(CustomerTier.tier))).all())
    assert tiers["prospect"] == 5
    assert tiers.get("vip", 0) >= 1
    assert sum(tiers.values()) == 45

    badge = (await client.get("/v1/customers/c-002/tier", headers=storefront)).json()
    assert badge["tier"] in ("vip", "nurture")
    assert badge["benefits"]
    detail = (await client.get("/v1/customers/c-002", headers=marketing)).json()
    assert detail["tier"]["explanation"]
    assert detail["figures"]["occasions"] >= 2
    assert 0 <= detail["scores"]["value"] <= 100

    listing = (await client.get("/v1/recalculations", headers=marketing)).json()
    assert [item["run_id"] for item in listing["items"]] == [run_id]


async def test_dry_run_records_moves_but_writes_nothing(client, keys, run_due, session_maker) -> None:
    await seed_shop(client, keys.headers("storefront"), customers=12)
    async with session_maker() as session:
        before = (await session.execute(select(CustomerTier.customer_id, CustomerTier.tier))).all()
    response = await client.post("/v1/recalculations", json={"dry_run": True}, headers=keys.headers("marketing"))
    await run_due()
    run = (
        await client.get(f"/v1/recalculations/{response.json()['run_id']}", headers=keys.headers("marketing"))
    ).json()
    assert run["status"] == "succeeded"
    assert run["dry_run"] is True
    assert sum(n for targets in run["moves"].values() for n in targets.values()) == 17
    async with session_maker() as session:
        after = (await session.execute(select(CustomerTier.customer_id, CustomerTier.tier))).all()
        history = await session.scalar(
            select(func.count()).select_from(TierHistory).where(TierHistory.run_id.is_not(None))
        )
    assert sorted(before) == sorted(after)
    assert history == 0


async def test_as_of_ignores_later_orders(client, keys, run_due, session_maker) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await client.post("/v1/orders", json=order("early", "c-1", 100, "10.00"), headers=storefront)
    await client.post("/v1/orders", json=order("late", "c-1", 10, "500.00"), headers=storefront)
    as_of = (NOW - timedelta(days=50)).isoformat()
    response = await client.post("/v1/recalculations", json={"as_of": as_of}, headers=marketing)
    assert response.status_code == 202, response.text
    await run_due()
    detail = (await client.get("/v1/customers/c-1", headers=marketing)).json()
    assert detail["figures"]["occasions"] == 1
    assert detail["figures"]["lifetime_spend"] == "10.00"


async def test_invalid_recalculation_requests(client, keys) -> None:
    marketing = keys.headers("marketing")
    future = (NOW + timedelta(days=3)).isoformat()
    for body, field in [
        ({"as_of": "2026-01-01T00:00:00"}, "as_of"),
        ({"as_of": future}, "as_of"),
        ({"dry_run": "x"}, "dry_run"),
    ]:
        response = await client.post("/v1/recalculations", json=body, headers=marketing)
        assert response.status_code == 422, body
        assert field in [e["field"] for e in response.json()["errors"]]
    assert (await client.post("/v1/recalculations", json={}, headers=keys.headers("storefront"))).status_code == 403
    assert (await client.get("/v1/recalculations/999", headers=marketing)).status_code == 404
