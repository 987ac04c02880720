"""A full run over many chunks: each chunk applies the rules with the stored tiers of its own customers, which the
run reads one chunk ahead while the previous chunk is being computed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from loyalty.db.models import CustomerTier, TierHistory
from loyalty.recalc import full
from tests.integration.recalc.test_recalculation import NOW, seed_shop


async def test_each_chunk_reads_the_stored_tiers_of_its_own_customers(
    client, keys, run_due, session_maker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(full, "WRITE_CHUNK", 7)  # 45 customers: seven chunks, the last one short
    marketing = keys.headers("marketing")
    await seed_shop(client, keys.headers("storefront"))
    await client.post("/v1/recalculations", json={}, headers=marketing)
    await run_due()
    async with session_maker() as session:
        first = {row.customer_id: row for row in (await session.execute(select(CustomerTier))).scalars()}
        ids = sorted(first)
        # Pins on customers of the first, a middle and the last chunk, to a tier each does not have.
        pinned = {ids[0], ids[len(ids) // 2], ids[-1]}
        for customer_id in pinned:
            target = "vip" if first[customer_id].tier != "vip" else "one_time"
            await session.execute(
                update(CustomerTier)
                .where(CustomerTier.customer_id == customer_id)
                .values(pinned_tier=target, pinned_until=NOW + timedelta(days=30), pin_reason="launch")
            )
        await session.commit()
    assert len(first) == 45

    await client.post("/v1/recalculations", json={}, headers=marketing)
    await run_due()

    async with session_maker() as session:
        second = {row.customer_id: row for row in (await session.execute(select(CustomerTier))).scalars()}
        latest = await session.scalar(select(func.max(TierHistory.run_id)))
        moves = (
            await session.execute(select(TierHistory.customer_id, TierHistory.kind).where(TierHistory.run_id == latest))
        ).all()
    for customer_id, row in second.items():
        if customer_id in pinned:
            assert (row.tier, row.pinned_tier, row.pin_reason) == (row.pinned_tier, row.pinned_tier, "launch")
        else:
            # Read back from its chunk's stored row: the same tier, kept since the first run.
            assert (row.tier, row.since) == (first[customer_id].tier, first[customer_id].since)
    # The second run's history: the pins, and no customer taken for one without a stored tier ("initial").
    assert sorted(moves) == sorted((customer_id, "pinned") for customer_id in pinned)
