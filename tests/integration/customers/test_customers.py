"""Customer profiles and customer tokens through the real app."""

from __future__ import annotations

from sqlalchemy import select

from loyalty.access.tokens import verify_customer_token
from loyalty.db.models import Customer
from tests.conftest import TEST_SECRET


async def test_put_creates_then_updates(client, storefront) -> None:
    created = await client.put(
        "/v1/customers/c-1",
        json={"email": "ana@example.com", "joined_at": "2025-01-02T03:04:05Z", "attributes": {"country": "PT"}},
        headers=storefront,
    )
    assert created.status_code == 201, created.text
    assert created.json()["email"] == "ana@example.com"
    assert created.json()["marketing_opt_out"] is False
    updated = await client.put("/v1/customers/c-1", json={"marketing_opt_out": True}, headers=storefront)
    assert updated.status_code == 200
    body = updated.json()
    assert body["marketing_opt_out"] is True
    assert body["email"] == "ana@example.com"
    assert body["attributes"] == {"country": "PT"}


async def test_put_with_referrer_records_a_referral(client, storefront) -> None:
    response = await client.put("/v1/customers/c-2", json={"referred_by": "c-1"}, headers=storefront)
    assert response.status_code == 201
    assert response.json()["referred_by"] == "c-1"
    again = await client.put("/v1/customers/c-2", json={"referred_by": "c-1"}, headers=storefront)
    assert again.status_code == 200
    claimed = await client.put("/v1/customers/c-2", json={"referred_by": "c-3"}, headers=storefront)
    assert claimed.status_code == 422
    assert claimed.json()["errors"][0]["field"] == "referred_by"
    self_referral = await client.put("/v1/customers/c-9", json={"referred_by": "c-9"}, headers=storefront)
    assert self_referral.status_code == 422
    assert self_referral.json()["type"] == "/problems/self-referral"


async def test_put_validation_writes_nothing(client, storefront, session_maker) -> None:
    for body, field in [
        ({"email": "not-an-email"}, "email"),
        ({"joined_at": "2025-01-02T03:04:05"}, "joined_at"),
        ({"attributes": {"x" * 65: 1}}, "attributes"),
        ({"marketing_opt_out": "maybe"}, "marketing_opt_out"),
    ]:
        response = await client.put("/v1/customers/c-1", json=body, headers=storefront)
        assert response.status_code == 422, body
        assert field in [e["field"] for e in response.json()["errors"]]
    async with session_maker() as session:
        assert (await session.scalars(select(Customer))).all() == []


async def test_token_for_known_customer_only(client, storefront) -> None:
    assert (await client.post("/v1/customers/ghost/token", headers=storefront)).status_code == 404
    await client.put("/v1/customers/c-1", json={}, headers=storefront)
    response = await client.post("/v1/customers/c-1/token", headers=storefront)
    assert response.status_code == 200, response.text
    principal = verify_customer_token(response.json()["token"], TEST_SECRET)
    assert principal.external_id == "c-1"
    assert response.json()["expires_at"].endswith("Z")
