"""Referrals: replay, self-referral, claimed referee, cycles — also when two race."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from loyalty.db.models import Referral


def referral(referrer: str, referee: str, at: str = "2026-03-01T10:00:00Z") -> dict[str, str]:
    return {"referrer_id": referrer, "referee_id": referee, "occurred_at": at}


async def test_referral_replay_and_conflict(client, storefront) -> None:
    assert (await client.post("/v1/referrals", json=referral("a", "b"), headers=storefront)).status_code == 201
    assert (await client.post("/v1/referrals", json=referral("a", "b"), headers=storefront)).status_code == 200
    later = await client.post("/v1/referrals", json=referral("a", "b", "2026-03-02T10:00:00Z"), headers=storefront)
    assert later.status_code == 409


async def test_refused_referrals(client, storefront, session_maker) -> None:
    self_referral = await client.post("/v1/referrals", json=referral("a", "a"), headers=storefront)
    assert self_referral.status_code == 422
    assert self_referral.json()["type"] == "/problems/self-referral"
    assert self_referral.json()["errors"][0]["field"] == "referee_id"

    await client.post("/v1/referrals", json=referral("a", "b"), headers=storefront)
    claimed = await client.post("/v1/referrals", json=referral("c", "b"), headers=storefront)
    assert claimed.status_code == 422
    assert claimed.json()["type"] == "/problems/referee-already-claimed"

    await client.post("/v1/referrals", json=referral("b", "c"), headers=storefront)
    direct_cycle = await client.post("/v1/referrals", json=referral("b", "a"), headers=storefront)
    indirect_cycle = await client.post("/v1/referrals", json=referral("c", "a"), headers=storefront)
    assert direct_cycle.status_code == indirect_cycle.status_code == 422
    assert indirect_cycle.json()["type"] == "/problems/referral-cycle"
    async with session_maker() as session:
        assert await session.scalar(select(func.count()).select_from(Referral)) == 2


async def test_racing_opposite_referrals_cannot_make_a_cycle(client, storefront, session_maker) -> None:
    for _ in range(5):
        responses = await asyncio.gather(
            client.post("/v1/referrals", json=referral("x", "y"), headers=storefront),
            client.post("/v1/referrals", json=referral("y", "x"), headers=storefront),
        )
        assert sorted(r.status_code for r in responses) in ([200, 422], [201, 422]), [r.text for r in responses]
    async with session_maker() as session:
        assert await session.scalar(select(func.count()).select_from(Referral)) == 1
