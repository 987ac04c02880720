"""Input that once reached the database or the runtime unguarded: every case is a 4xx problem, never a 500."""

from __future__ import annotations

import base64

import pytest

EXTREME_TIMES = ["0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00", "1969-12-31T23:59:59Z"]


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize("instant", EXTREME_TIMES)
async def test_timestamps_out_of_range(client, keys, instant: str) -> None:
    storefront = keys.headers("storefront")
    order = {"order_id": "o", "customer_id": "c", "placed_at": instant, "total": "1.00", "currency": "USD"}
    assert (await client.post("/v1/orders", json=order, headers=storefront)).status_code == 422
    batch = await client.post("/v1/orders/batch", json={"orders": [order]}, headers=storefront)
    assert batch.status_code == 200
    assert batch.json()["results"][0]["status"] == 422
    event = {"event_id": "e", "customer_id": "c", "type": "review", "target": "p", "occurred_at": instant}
    assert (await client.post("/v1/events", json={"events": [event]}, headers=storefront)).json()["rejected"]
    assert (await client.put("/v1/customers/c", json={"joined_at": instant}, headers=storefront)).status_code == 422
    await client.put("/v1/customers/c", json={}, headers=storefront)
    pin = {"tier": "vip", "until": "9999-12-31T23:30:00-01:00", "reason": "x"}
    assert (
        await client.put("/v1/customers/c/tier-pin", json=pin, headers=keys.headers("marketing"))
    ).status_code == 422


@pytest.mark.parametrize("cursor", [_cursor("²"), _cursor("9" * 30), _cursor("-5"), "%%%", "x" * 199])
async def test_cursors_we_did_not_make(client, keys, cursor: str) -> None:
    marketing = keys.headers("marketing")
    for path in ("/v1/customers", "/v1/recalculations", "/v1/offers", "/v1/campaigns"):
        response = await client.get(path, params={"cursor": cursor}, headers=marketing)
        assert response.status_code == 422, (path, response.text)
        assert response.json()["errors"][0]["field"] == "cursor"


@pytest.mark.parametrize("path", ["/v1/recalculations/99999999999999999999", "/v1/recalculations/0", "/v1/offers/-1"])
async def test_ids_out_of_range(client, keys, path: str) -> None:
    response = await client.get(path, headers=keys.headers("marketing"))
    assert response.status_code in (400, 404, 422), response.text
    assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/customers/a%00b/tier"),
        ("PUT", "/v1/customers/a%00b"),
        ("POST", "/v1/customers/a%01b/token"),
        ("POST", "/v1/orders/a%00b/refunds"),
        ("GET", "/v1/customers/a%00b"),
    ],
)
async def test_control_characters_in_path_ids(client, keys, method: str, path: str) -> None:
    body = {"refund_id": "r", "amount": "1.00", "refunded_at": "2026-01-01T00:00:00Z"} if "refunds" in path else {}
    response = await client.request(method, path, json=body if method != "GET" else None, headers=keys.headers("admin"))
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_control_characters_and_odd_amounts_in_bodies(client, keys) -> None:
    storefront = keys.headers("storefront")
    assert (
        await client.put("/v1/customers/c", json={"email": "a\u0000b@example.com"}, headers=storefront)
    ).status_code == 422
    order = {
        "order_id": "o\u0000",
        "customer_id": "c",
        "placed_at": "2026-01-01T00:00:00Z",
        "total": "1.00",
        "currency": "USD",
    }
    assert (await client.post("/v1/orders", json=order, headers=storefront)).status_code == 422
    zero = await client.post("/v1/orders", json={**order, "order_id": "o-zero", "total": "-0"}, headers=storefront)
    assert zero.status_code == 201
    assert zero.json()["total"] == "0.00"
    huge = await client.post("/v1/orders", json={**order, "order_id": "o-huge", "total": "1e15"}, headers=storefront)
    assert huge.status_code == 422
