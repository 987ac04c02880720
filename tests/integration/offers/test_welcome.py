"""Welcome offers: entering a tier that names one issues it once per entry, in runs and in real time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient
from sqlalchemy import func, select

from loyalty.app import create_app
from loyalty.db.models import Customer, CustomerTier, IssuedCode, OutboxEvent
from loyalty.recalc.jobs import RecalcJobs
from loyalty.settings import PROJECT_ROOT
from tests.integration.recalc.test_recalculation import order, seed_shop


async def _codes_of(session_maker: Any, external_id: str | None = None) -> int:
    async with session_maker() as session:
        statement = select(func.count()).select_from(IssuedCode).join(Customer, Customer.id == IssuedCode.customer_id)
        if external_id is not None:
            statement = statement.where(Customer.external_id == external_id)
        return int(await session.scalar(statement) or 0)


async def test_welcome_offer_once_per_entry(settings, keys, session_maker, tmp_path: Path) -> None:
    tiers_file = tmp_path / "tiers.toml"
    shipped = (PROJECT_ROOT / "config" / "tiers.toml").read_text()
    tiers_file.write_text(shipped.replace('id = "vip"\n', 'id = "vip"\nwelcome_offer = "vip-welcome"\n', 1))
    app = create_app(settings.model_copy(update={"tiers_file": tiers_file}))
    assert app.state.tiers.get("vip").welcome_offer == "vip-welcome"
    jobs = RecalcJobs(session_maker, app.state.tiers, None, 60)  # type: ignore[arg-type]
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    async with AsyncTestClient(app=app) as client:
        welcome = {"name": "vip-welcome", "kind": "free_shipping", "valid_days": 60}
        assert (await client.post("/v1/offers", json=welcome, headers=marketing)).status_code == 201
        await seed_shop(client, storefront)
        await client.post("/v1/orders", json=order("lift-1", "lifted", 200, "25.00"), headers=storefront)
        await client.post("/v1/recalculations", json={}, headers=marketing)
        await jobs.run_due()
        app.state.model_cache.invalidate()
        async with session_maker() as session:
            vips = await session.scalar(
                select(func.count()).select_from(CustomerTier).where(CustomerTier.tier == "vip")
            )
        assert vips
        assert await _codes_of(session_maker) == vips
        assert await _codes_of(session_maker, "lifted") == 0

        lifted = await client.post("/v1/orders", json=order("lift-2", "lifted", 0, "5000.00"), headers=storefront)
        assert lifted.json()["tier"] == "vip"
        assert await _codes_of(session_maker, "lifted") == 1
        # Still VIP: no new entry, no new code.
        await client.post("/v1/orders", json=order("lift-3", "lifted", 0, "10.00"), headers=storefront)
        await client.post("/v1/recalculations", json={}, headers=marketing)
        await jobs.run_due()
        assert await _codes_of(session_maker, "lifted") == 1
        assert await _codes_of(session_maker) == vips + 1

    async with session_maker() as session:
        changes = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.event_type == "tier.changed")
        )
        issued = await session.scalar(
            select(func.count()).select_from(OutboxEvent).where(OutboxEvent.event_type == "offer.issued")
        )
    assert changes >= 46
    assert issued == vips + 1
