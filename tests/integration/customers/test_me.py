"""A customer's own view: only their own data, only with their token; erasure removes what identifies them."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from litestar.routes import HTTPRoute
from sqlalchemy import String, Text, func, select

from loyalty.access.tokens import AUDIENCE, ISSUER
from loyalty.db.base import Base
from loyalty.db.models import Customer
from tests.conftest import TEST_SECRET
from tests.integration.offers.test_offers import create_offer, soon

EMAIL_A = "ana.unique.person@example.com"
OPEN_PREFIXES = ("/health", "/metrics", "/schema", "/problems", "/v1/me")


async def _shop(client: Any, keys: Any, run_due: Any, dispatch_due: Any) -> dict[str, str]:
    storefront, marketing = keys.headers("storefront"), keys.headers("marketing")
    await client.put("/v1/customers/a", json={"email": EMAIL_A, "attributes": {"city": "Porto"}}, headers=storefront)
    await client.put("/v1/customers/b", json={"email": "bo@example.com", "referred_by": "a"}, headers=storefront)
    for customer, days in (("a", 40), ("a", 3), ("b", 10)):
        order = {
            "order_id": f"{customer}-{days}",
            "customer_id": customer,
            "placed_at": (datetime.now(UTC) - timedelta(days=days)).isoformat(),
            "total": "70.00",
            "currency": "USD",
            "items": [{"sku": f"SKU-{customer}", "quantity": 1, "unit_price": "70.00"}],
        }
        assert (await client.post("/v1/orders", json=order, headers=storefront)).status_code == 201
    await client.post(
        "/v1/events",
        json={
            "events": [
                {
                    "event_id": "e-b",
                    "customer_id": "b",
                    "type": "review",
                    "target": "product:SKU-b",
                    "occurred_at": soon(-5),
                }
            ]
        },
        headers=storefront,
    )
    await client.post("/v1/recalculations", json={}, headers=marketing)
    await run_due()
    offer_id = await create_offer(client, marketing)
    await client.post(
        "/v1/campaigns",
        json={
            "name": "all",
            "offer_id": offer_id,
            "tiers": ["vip", "nurture", "one_time"],
            "send_at": soon(),
            "holdout_pct": 0,
        },
        headers=marketing,
    )
    await dispatch_due()
    tokens = {}
    for customer in ("a", "b"):
        response = await client.post(f"/v1/customers/{customer}/token", headers=storefront)
        tokens[customer] = response.json()["token"]
    return tokens


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_token_shows_only_its_own_customer(client, keys, run_due, dispatch_due) -> None:
    tokens = await _shop(client, keys, run_due, dispatch_due)
    me = (await client.get("/v1/me", headers=bearer(tokens["a"]))).json()
    assert me["customer_id"] == "a"
    assert me["tier"] in ("vip", "nurture")
    assert set(me["scores_text"]) == {"value", "frequency", "influence"}
    assert all(isinstance(v, str) and not re.fullmatch(r"[\d.]+", v) for v in me["scores_text"].values())
    offers = (await client.get("/v1/me/offers", headers=bearer(tokens["a"]))).json()["items"]
    assert len(offers) == 1
    assert offers[0]["status"] == "active"
    history = (await client.get("/v1/me/history", headers=bearer(tokens["a"]))).json()["items"]
    assert history
    assert {"from", "to", "at", "reason"} <= set(history[0])
    export = (await client.get("/v1/me/export", headers=bearer(tokens["a"]))).json()
    assert export["profile"]["email"] == EMAIL_A
    assert [o["order_id"] for o in export["orders"]] == ["a-40", "a-3"]
    assert export["offers"][0]["code"] == offers[0]["code"]
    assert export["referrals"] == [
        {"referrer_id": "a", "referee_id": "b", "occurred_at": export["referrals"][0]["occurred_at"]}
    ]
    serialized = json.dumps(export)
    assert "bo@example.com" not in serialized
    assert "b-10" not in serialized
    b_codes = (await client.get("/v1/me/offers", headers=bearer(tokens["b"]))).json()["items"]
    assert b_codes[0]["code"] not in serialized


async def test_customer_tokens_reach_no_other_route(app, client, keys, run_due, dispatch_due) -> None:
    tokens = await _shop(client, keys, run_due, dispatch_due)
    checked = 0
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path.startswith(OPEN_PREFIXES) or route.path == "/":
            continue
        path = re.sub(r"\{(\w+):int\}", "1", route.path)
        path = re.sub(r"\{(\w+)(:\w+)?\}", "a", path)
        for method in route.methods - {"OPTIONS", "HEAD"}:
            response = await client.request(
                method, path, headers=bearer(tokens["a"]), json={} if method != "GET" else None
            )
            assert response.status_code == 401, (method, route.path, response.status_code, response.text[:200])
            checked += 1
    assert checked >= 30
    # And API keys never reach the customer routes.
    for path in ("/v1/me", "/v1/me/offers", "/v1/me/history", "/v1/me/export"):
        for scope in ("storefront", "marketing", "admin"):
            assert (await client.get(path, headers=keys.headers(scope))).status_code == 401
        assert (await client.get(path)).status_code == 401


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "a", "cid": 1, "iat": now, "exp": now + 60, **overrides}


async def test_bad_tokens_are_401(client, keys, run_due, dispatch_due, session_maker) -> None:
    tokens = await _shop(client, keys, run_due, dispatch_due)
    async with session_maker() as session:
        a_id = await session.scalar(select(Customer.id).where(Customer.external_id == "a"))
    header, payload, signature = tokens["a"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "b"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    unsigned = base64.urlsafe_b64encode(json.dumps(_claims(cid=a_id)).encode()).rstrip(b"=").decode()
    for token in [
        f"{header}.{forged}.{signature}",
        jwt.encode(_claims(cid=a_id, exp=int(datetime.now(UTC).timestamp()) - 10), TEST_SECRET, algorithm="HS256"),
        jwt.encode(_claims(cid=a_id, aud="other"), TEST_SECRET, algorithm="HS256"),
        f"{none_header}.{unsigned}.",
        jwt.encode(_claims(cid=a_id), "some-other-secret-of-sufficient-length-0123456789", algorithm="HS256"),
    ]:
        assert (await client.get("/v1/me", headers=bearer(token))).status_code == 401
    assert (
        await client.get("/v1/me", headers=bearer(jwt.encode(_claims(cid=a_id), TEST_SECRET, algorithm="HS256")))
    ).status_code == 200


async def _text_columns_containing(session_maker: Any, needle: str) -> list[str]:
    found = []
    async with session_maker() as session:
        for table in Base.metadata.sorted_tables:
            for column in table.columns:
                if isinstance(column.type, String | Text) or column.type.__class__.__name__ == "JSON":
                    hits = await session.scalar(
                        select(func.count()).select_from(table).where(func.cast(column, Text).like(f"%{needle}%"))
                    )
                    if hits:
                        found.append(f"{table.name}.{column.name}")
    return found


async def test_erasure(client, keys, run_due, dispatch_due, session_maker) -> None:
    tokens = await _shop(client, keys, run_due, dispatch_due)
    marketing, admin = keys.headers("marketing"), keys.headers("admin")
    segments_before = (await client.get("/v1/segments", headers=marketing)).json()
    campaign_id = (await client.get("/v1/campaigns", headers=marketing)).json()["items"][0]["campaign_id"]
    results_before = (await client.get(f"/v1/campaigns/{campaign_id}/results", headers=marketing)).json()
    assert await _text_columns_containing(session_maker, EMAIL_A) == ["customer.email"]

    assert (await client.delete("/v1/customers/a", headers=keys.headers("storefront"))).status_code == 403
    assert (await client.delete("/v1/customers/a", headers=admin)).status_code == 204
    assert (await client.delete("/v1/customers/a", headers=admin)).status_code == 404
    assert (await client.get("/v1/me/export", headers=bearer(tokens["a"]))).status_code == 401
    assert (await client.get("/v1/me", headers=bearer(tokens["b"]))).status_code == 200
    assert await _text_columns_containing(session_maker, EMAIL_A) == []
    assert await _text_columns_containing(session_maker, "Porto") == []
    assert (await client.get("/v1/segments", headers=marketing)).json() == segments_before
    results_after = (await client.get(f"/v1/campaigns/{campaign_id}/results", headers=marketing)).json()
    # The window runs until now; everything computed over it is unchanged.
    assert {k: v for k, v in results_after.items() if k != "window"} == {
        k: v for k, v in results_before.items() if k != "window"
    }

    # The storefront id is free again: new activity under it is a new customer.
    again = await client.put("/v1/customers/a", json={}, headers=keys.headers("storefront"))
    assert again.status_code == 201
    assert (await client.get("/v1/customers/a/tier", headers=keys.headers("storefront"))).json()["tier"] == "prospect"
    async with session_maker() as session:
        assert (
            await session.scalar(select(func.count()).select_from(Customer).where(Customer.erased_at.is_not(None))) == 1
        )


@pytest.mark.parametrize("path", ["/v1/me", "/v1/me/export"])
async def test_me_without_credentials(client, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
