"""Orders through the real app, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.db.models import Customer, Order, OrderItem

PROBLEM = "application/problem+json"


def order(order_id: str = "o-1", customer_id: str = "c-1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "order_id": order_id,
        "customer_id": customer_id,
        "placed_at": "2026-03-01T10:15:00+01:00",
        "total": "129.90",
        "currency": "USD",
        "items": [{"sku": "SKU-1", "category": "shoes", "quantity": 2, "unit_price": "64.95"}],
        "channel": "web",
    }
    body.update(overrides)
    return body


async def count(session_maker: async_sessionmaker[AsyncSession], model: Any) -> int:
    async with session_maker() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_create_order_creates_unknown_customer(client, storefront, session_maker) -> None:
    response = await client.post("/v1/orders", json=order(), headers=storefront)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["order_id"] == "o-1"
    assert body["customer_id"] == "c-1"
    assert body["total"] == "129.90"
    assert body["placed_at"] == "2026-03-01T09:15:00Z"
    assert body["items"] == [{"sku": "SKU-1", "category": "shoes", "quantity": 2, "unit_price": "64.95"}]
    async with session_maker() as session:
        stored = await session.scalar(select(Order).where(Order.external_id == "o-1"))
        assert stored is not None
        assert stored.total == Decimal("129.90")
        assert await session.scalar(select(Customer.external_id).where(Customer.id == stored.customer_id)) == "c-1"
        assert await session.scalar(select(func.count()).select_from(OrderItem)) == 1


async def test_replay_returns_stored_order_and_conflict_is_409(client, storefront, session_maker) -> None:
    first = await client.post("/v1/orders", json=order(), headers=storefront)
    replay = await client.post("/v1/orders", json=order(), headers=storefront)
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.json()["items"] == first.json()["items"]
    conflict = await client.post("/v1/orders", json=order(total="10.00"), headers=storefront)
    assert conflict.status_code == 409
    assert conflict.headers["content-type"].startswith(PROBLEM)
    assert conflict.json()["type"] == "/problems/idempotency-conflict"
    assert await count(session_maker, Order) == 1


async def test_an_order_of_several_lines_stores_each_line_as_sent(client, storefront, session_maker) -> None:
    # On PostgreSQL the lines are inserted by the order's own statement: each keeps its number, amount and category.
    items = [
        {"sku": "A-1", "category": None, "quantity": 3, "unit_price": "0.05"},
        {"sku": "B-2", "category": "shoes", "quantity": 1, "unit_price": "1234.56"},
        {"sku": "A-1", "category": "hats", "quantity": 2, "unit_price": "0.00"},
    ]
    body = order("o-lines", total="1234.71", items=items)
    first = await client.post("/v1/orders", json=body, headers=storefront)
    replay = await client.post("/v1/orders", json=body, headers=storefront)
    assert (first.status_code, replay.status_code) == (201, 200), first.text
    assert first.json()["items"] == replay.json()["items"] == items
    async with session_maker() as session:
        stored = (
            await session.execute(select(OrderItem.line_no, OrderItem.unit_price).order_by(OrderItem.line_no))
        ).all()
    assert [tuple(row) for row in stored] == [(0, Decimal("0.05")), (1, Decimal("1234.56")), (2, Decimal("0"))]


async def test_replay_with_same_instant_in_another_offset_is_a_replay(client, storefront) -> None:
    await client.post("/v1/orders", json=order(), headers=storefront)
    replay = await client.post("/v1/orders", json=order(placed_at="2026-03-01T09:15:00Z"), headers=storefront)
    assert replay.status_code == 200


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"placed_at": "2026-03-01T10:15:00"}, "placed_at"),
        ({"currency": "EUR"}, "currency"),
        ({"total": "-1.00"}, "total"),
        ({"total": "10.001"}, "total"),
        ({"total": 10.5}, "total"),
        ({"total": "NaN"}, "total"),
        ({"total": "1e308"}, "total"),
        ({"items": [{"sku": "A", "quantity": 0, "unit_price": "1.00"}]}, "items[0].quantity"),
        ({"items": [{"sku": "A", "quantity": 1, "unit_price": "-1.00"}]}, "items[0].unit_price"),
        ({"placed_at": "9999-01-01T00:00:00Z"}, "placed_at"),
        ({"placed_at": "1969-12-31T23:59:59Z"}, "placed_at"),
        ({"order_id": ""}, "order_id"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
async def test_invalid_orders_name_the_field_and_write_nothing(
    client, storefront, session_maker, overrides: dict[str, Any], field: str
) -> None:
    response = await client.post("/v1/orders", json=order(**overrides), headers=storefront)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    problem = response.json()
    assert problem["type"] == "/problems/validation"
    assert field in [error["field"] for error in problem["errors"]]
    assert await count(session_maker, Order) == 0
    assert await count(session_maker, Customer) == 0


async def test_missing_fields_are_listed_together(client, storefront) -> None:
    response = await client.post("/v1/orders", json={"order_id": "o-1"}, headers=storefront)
    assert response.status_code == 422
    fields = {error["field"] for error in response.json()["errors"]}
    assert {"customer_id", "placed_at", "total", "currency"} <= fields


async def test_malformed_json_is_a_problem(client, storefront) -> None:
    response = await client.post(
        "/v1/orders", content=b'{"order_id": ', headers={**storefront, "content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith(PROBLEM)


async def test_batch_reports_each_item_and_keeps_the_good_ones(client, storefront, session_maker) -> None:
    await client.post("/v1/orders", json=order("o-existing"), headers=storefront)
    batch = {
        "orders": [
            order("o-a"),
            order("o-existing"),
            order("o-existing", total="1.00"),
            order("o-b", total="1.001"),
            "not an object",
            order("o-c", customer_id="c-2"),
        ]
    }
    response = await client.post("/v1/orders/batch", json=batch, headers=storefront)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["status"] for r in body["results"]] == [201, 200, 409, 422, 422, 201]
    assert (body["created"], body["replayed"], body["failed"]) == (2, 1, 3)
    assert body["results"][3]["problem"]["errors"][0]["field"] == "orders[3].total"
    assert body["results"][2]["problem"]["type"] == "/problems/idempotency-conflict"
    assert await count(session_maker, Order) == 3
    assert await count(session_maker, OrderItem) == 3


async def test_batch_above_limit_is_refused(client, storefront, session_maker) -> None:
    batch = {"orders": [order(f"o-{i}") for i in range(1001)]}
    response = await client.post("/v1/orders/batch", json=batch, headers=storefront)
    assert response.status_code in (413, 422)
    assert response.headers["content-type"].startswith(PROBLEM)
    assert await count(session_maker, Order) == 0


async def test_fifty_concurrent_posts_of_one_order_create_one(concurrent_client, storefront, session_maker) -> None:
    responses = await asyncio.gather(
        *(concurrent_client.post("/v1/orders", json=order(), headers=storefront) for _ in range(50))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == 1, statuses
    assert statuses.count(200) == 49, statuses
    assert await count(session_maker, Order) == 1
    assert await count(session_maker, OrderItem) == 1
    assert await count(session_maker, Customer) == 1


async def test_fifty_concurrent_orders_for_one_customer_all_land(concurrent_client, storefront, session_maker) -> None:
    responses = await asyncio.gather(
        *(concurrent_client.post("/v1/orders", json=order(f"o-{i}", "c-shared"), headers=storefront) for i in range(50))
    )
    assert [r.status_code for r in responses] == [201] * 50, [r.text for r in responses if r.status_code != 201]
    assert await count(session_maker, Order) == 50
    assert await count(session_maker, Customer) == 1


async def test_a_channel_as_long_as_the_api_allows_is_stored(client, storefront) -> None:
    # The API accepts labels of up to 255 characters; the column once held 64, which PostgreSQL refused with a 500.
    channel = "c" * 255
    created = await client.post("/v1/orders", json=order(channel=channel), headers=storefront)
    assert created.status_code == 201, created.text
    assert created.json()["channel"] == channel
    too_long = await client.post("/v1/orders", json=order("o-2", channel="c" * 256), headers=storefront)
    assert too_long.status_code == 422
    assert too_long.json()["errors"][0]["field"] == "channel"
