"""Tier reads and changes through the API: badge, tier list, real-time upgrades, pins, previews, reports."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from loyalty.db.models import Customer, TierHistory
from tests.integration.recalc.test_recalculation import order, seed_shop


async def _recalculate(client: Any, marketing: dict[str, str], run_due: Any) -> dict[str, Any]:
    response = await client.post("/v1/recalculations", json={}, headers=marketing)
    assert response.status_code == 202, response.text
    await run_due()
    return (await client.get(f"/v1/recalculations/{response.json()['run_id']}", headers=marketing)).json()


async def test_tier_list_and_prospect_badge(client, keys) -> None:
    storefront = keys.headers("storefront")
    tiers = (await client.get("/v1/tiers", headers=storefront)).json()["items"]
    assert [t["tier"] for t in tiers] == ["vip", "nurture", "one_time", "prospect"]
    assert tiers[0]["rule_text"]
    assert "80" in tiers[0]["rule_text"]
    assert (await client.get("/v1/tiers", headers=keys.headers("marketing"))).status_code == 200
    await client.put("/v1/customers/new", json={}, headers=storefront)
    badge = (await client.get("/v1/customers/new/tier", headers=storefront)).json()
    assert badge["tier"] == "prospect"
    assert badge["tier_name"] == "Guest"
    assert badge["next_tier"] == "one_time"
    assert "first order" in badge["progress"]["text"]
    assert (await client.get("/v1/customers/ghost/tier", headers=storefront)).status_code == 404


async def test_first_order_places_customer_in_real_time(client, keys) -> None:
    response = await client.post("/v1/orders", json=order("o-1", "c-1", 1, "30.00"), headers=keys.headers("storefront"))
    assert response.status_code == 201
    assert response.json()["tier"] in ("one_time", "nurture")
    badge = (await client.get("/v1/customers/c-1/tier", headers=keys.headers("storefront"))).json()
    assert badge["tier"] == response.json()["tier"]
    assert badge["since"] is not None


async def test_order_that_lifts_a_one_time_customer_into_vip_answers_vip(client, keys, run_due) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await seed_shop(client, storefront)
    await client.post("/v1/orders", json=order("lift-1", "lifted", 200, "25.00"), headers=storefront)
    await _recalculate(client, marketing, run_due)
    before = (await client.get("/v1/customers/lifted/tier", headers=storefront)).json()
    assert before["tier"] == "one_time"
    assert before["next_tier"] == "nurture"
    response = await client.post("/v1/orders", json=order("lift-2", "lifted", 0, "5000.00"), headers=storefront)
    assert response.status_code == 201
    assert response.json()["tier"] == "vip"
    after = (await client.get("/v1/customers/lifted/tier", headers=storefront)).json()
    assert after["tier"] == "vip"
    assert after["progress"]["next_tier"] is None
    history = (await client.get("/v1/customers/lifted", headers=marketing)).json()
    assert history["tier"]["explanation"].startswith("VIP")


async def test_refund_does_not_downgrade_in_real_time(client, keys, run_due, session_maker) -> None:
    storefront = keys.headers("storefront")
    await client.post("/v1/orders", json=order("o-1", "c-1", 30, "40.00"), headers=storefront)
    await client.post("/v1/orders", json=order("o-2", "c-1", 3, "40.00"), headers=storefront)
    assert (await client.get("/v1/customers/c-1/tier", headers=storefront)).json()["tier"] == "nurture"
    refund = {"refund_id": "r-1", "amount": "40.00", "refunded_at": datetime.now(UTC).isoformat()}
    assert (await client.post("/v1/orders/o-2/refunds", json=refund, headers=storefront)).status_code == 201
    assert (await client.get("/v1/customers/c-1/tier", headers=storefront)).json()["tier"] == "nurture"
    detail = (await client.get("/v1/customers/c-1", headers=keys.headers("marketing"))).json()
    assert detail["figures"]["occasions"] == 1
    assert detail["tier"]["qualified_tier"] == "one_time"


async def test_pins_win_until_removed(client, keys, session_maker) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await client.post("/v1/orders", json=order("o-1", "c-1", 3, "30.00"), headers=storefront)
    until = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    pinned = await client.put(
        "/v1/customers/c-1/tier-pin", json={"tier": "vip", "until": until, "reason": "press partner"}, headers=marketing
    )
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["tier"] == "vip"
    assert pinned.json()["pinned_until"] is not None
    # Real-time activity never overrides an active pin.
    response = await client.post("/v1/orders", json=order("o-2", "c-1", 1, "10.00"), headers=storefront)
    assert response.json()["tier"] == "vip"
    detail = (await client.get("/v1/customers/c-1", headers=marketing)).json()
    assert detail["tier"]["pin_reason"] == "press partner"
    assert (await client.delete("/v1/customers/c-1/tier-pin", headers=marketing)).status_code == 204
    assert (await client.get("/v1/customers/c-1/tier", headers=storefront)).json()["tier"] == "nurture"
    assert (await client.delete("/v1/customers/c-1/tier-pin", headers=marketing)).status_code == 404
    async with session_maker() as session:
        customer_id = await session.scalar(select(Customer.id).where(Customer.external_id == "c-1"))
        kinds = (
            await session.scalars(
                select(TierHistory.kind).where(TierHistory.customer_id == customer_id).order_by(TierHistory.id)
            )
        ).all()
    assert kinds[-2:] == ["pinned", "unpinned"]


async def test_pin_validation(client, keys) -> None:
    marketing = keys.headers("marketing")
    await client.put("/v1/customers/c-1", json={}, headers=keys.headers("storefront"))
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    for body, field in [
        ({"tier": "gold", "until": future, "reason": "x"}, "tier"),
        ({"tier": "vip", "until": past, "reason": "x"}, "until"),
        ({"tier": "vip", "until": "2030-01-01T00:00:00", "reason": "x"}, "until"),
        ({"tier": "vip", "until": future, "reason": ""}, "reason"),
    ]:
        response = await client.put("/v1/customers/c-1/tier-pin", json=body, headers=marketing)
        assert response.status_code == 422, body
        assert field in [e["field"] for e in response.json()["errors"]]
    ghost = await client.put(
        "/v1/customers/ghost/tier-pin", json={"tier": "vip", "until": future, "reason": "x"}, headers=marketing
    )
    assert ghost.status_code == 404


async def test_preview_counts_moves_and_changes_nothing(client, keys, run_due) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await seed_shop(client, storefront)
    await _recalculate(client, marketing, run_due)
    segments_before = (await client.get("/v1/segments", headers=marketing)).json()
    stricter = {
        "tier": [
            {"id": "vip", "name": "VIP", "all": [{"score": "value", "gte": 99.9}]},
            {"id": "nurture", "name": "Insider", "any": [{"figure": "occasions", "gte": 2}]},
            {"id": "one_time", "name": "Member"},
            {"id": "prospect", "name": "Guest"},
        ]
    }
    preview = await client.post("/v1/tiers/preview", json=stricter, headers=marketing)
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert body["customers"] == 45
    assert sum(body["moves"].get("vip", {}).get(t, 0) for t in ("nurture", "one_time")) >= 1
    assert (await client.get("/v1/segments", headers=marketing)).json() == segments_before

    invalid = {"tier": [{"id": "vip", "name": "VIP", "any": [{"score": "value", "gte": 180}]}]}
    refused = await client.post("/v1/tiers/preview", json=invalid, headers=marketing)
    assert refused.status_code == 422
    fields = [e["field"] for e in refused.json()["errors"]]
    assert "tier[0].any[0]" in fields
    assert (await client.post("/v1/tiers/preview", json=stricter, headers=storefront)).status_code == 403


async def test_member_list_export_and_segments(client, keys, run_due) -> None:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await seed_shop(client, storefront)
    await _recalculate(client, marketing, run_due)
    first = (await client.get("/v1/customers?limit=20", headers=marketing)).json()
    assert len(first["items"]) == 20
    second = (await client.get(f"/v1/customers?limit=50&cursor={first['next_cursor']}", headers=marketing)).json()
    assert second["next_cursor"] is None
    assert len(first["items"]) + len(second["items"]) == 45
    assert not {i["customer_id"] for i in first["items"]} & {i["customer_id"] for i in second["items"]}
    vips = (await client.get("/v1/customers?tier=vip&limit=500", headers=marketing)).json()["items"]
    assert vips
    assert all(item["tier"] == "vip" for item in vips)
    rich = (await client.get("/v1/customers?min_value_score=90", headers=marketing)).json()["items"]
    assert all(item["scores"]["value"] >= 90 for item in rich)
    assert (await client.get("/v1/customers?tier=gold", headers=marketing)).status_code == 422
    assert (await client.get("/v1/customers?cursor=!!!", headers=marketing)).status_code == 422

    export = await client.get("/v1/exports/customers?tier=vip", headers=marketing)
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(export.text)))
    assert {row["customer_id"] for row in rows} == {item["customer_id"] for item in vips}
    assert all(row["tier"] == "vip" for row in rows)

    segments = (await client.get("/v1/segments", headers=marketing)).json()
    assert segments["customers"] == 45
    by_tier = {item["tier"]: item for item in segments["items"]}
    assert by_tier["prospect"]["customers"] == 5
    assert abs(sum(item["share"] for item in segments["items"]) - 1) < 0.01
    assert abs(sum(item["revenue_share"] for item in segments["items"]) - 1) < 0.01
    assert by_tier["vip"]["scores"]["value"]["p50"] >= by_tier["one_time"]["scores"]["value"]["p50"]


async def test_expired_pin_gives_way_on_the_next_poll(app, client, keys, session_maker) -> None:
    import asyncio

    from loyalty.recalc.jobs import RecalcJobs

    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await client.post("/v1/orders", json=order("o-1", "c-1", 3, "30.00"), headers=storefront)
    until = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    pinned = await client.put(
        "/v1/customers/c-1/tier-pin", json={"tier": "vip", "until": until, "reason": "launch week"}, headers=marketing
    )
    assert pinned.json()["tier"] == "vip"
    await asyncio.sleep(1.2)
    jobs = RecalcJobs(session_maker, app.state.tiers, None, 60)  # type: ignore[arg-type]
    assert await jobs.expire_pins() == {"pins_expired": 1}
    badge = (await client.get("/v1/customers/c-1/tier", headers=storefront)).json()
    assert badge["tier"] == "one_time"
    assert badge["pinned_until"] is None
    assert await jobs.expire_pins() == {}
