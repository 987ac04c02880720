"""The full population's figures (streamed by COPY and grouped in NumPy on PostgreSQL) equal the per-customer SQL.

The full run and the real-time re-score compute the same figures by different routes on PostgreSQL; on SQLite both
are the SQL statement. Demo data plus the edge cases of the definitions: same-day orders (one occasion), a free
order (counts), a fully refunded order (does not), a partial refund, and a refund made after the instant.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import insert, select

from loyalty.db.models import Customer, Order
from loyalty.db.session import read_only
from loyalty.demo.generator import load_demo
from loyalty.recalc import incremental
from loyalty.scoring.config import ScoringConfig
from loyalty.scoring.figures import (
    Figures,
    interests_from_json,
    load_figures,
    load_interest_texts,
    load_interests,
)

FIELDS = (
    "customer_id",
    "occasions",
    "paid_orders",
    "first_day",
    "last_day",
    "lifetime_spend",
    "net_spend",
    "orders_in_window",
    "repeat_spend",
    "reviews",
    "shares",
)


def order(order_id: str, customer: str, placed_at: str, total: str) -> dict[str, Any]:
    return {"order_id": order_id, "customer_id": customer, "placed_at": placed_at, "total": total, "currency": "USD"}


async def edge_cases(client: Any, storefront: dict[str, str]) -> None:
    orders = [
        order("same-1", "edge-a", "2026-01-10T09:00:00Z", "10.00"),
        order("same-2", "edge-a", "2026-01-10T23:59:59Z", "15.00"),
        order("later", "edge-a", "2026-02-01T12:00:00Z", "20.00"),
        order("free", "edge-b", "2026-01-05T12:00:00Z", "0.00"),
        order("cancelled", "edge-c", "2026-01-05T12:00:00Z", "30.00"),
        order("partly", "edge-c", "2026-01-07T12:00:00Z", "50.00"),
        order("late-refund", "edge-d", "2026-01-05T12:00:00Z", "40.00"),
    ]
    for body in orders:
        assert (await client.post("/v1/orders", json=body, headers=storefront)).status_code == 201
    refunds = [
        ("cancelled", "30.00", "2026-01-06T00:00:00Z"),
        ("partly", "20.00", "2026-01-08T00:00:00Z"),
        ("late-refund", "40.00", "2026-03-01T00:00:00Z"),
    ]
    for order_id, amount, at in refunds:
        body = {"refund_id": f"r-{order_id}", "amount": amount, "refunded_at": at}
        response = await client.post(f"/v1/orders/{order_id}/refunds", json=body, headers=storefront)
        assert response.status_code == 201, response.text


async def order_of_no_customer(engine: Any) -> None:
    """An order whose customer is missing, written around the service (an order keeps its customer by a kept
    reference, no foreign key): both ways leave it out, and no customer takes its figures. Its id sorts after every
    customer's, past the end of the population's positions."""
    async with engine.begin() as connection:
        await connection.execute(
            insert(Order).values(
                external_id="order-of-no-customer",
                customer_id=2**40,
                placed_at=datetime(2026, 1, 20, tzinfo=UTC),
                total=Decimal("99.00"),
                refunded=Decimal(0),
                currency="USD",
                content_hash="0" * 64,
                created_at=datetime(2026, 1, 20, tzinfo=UTC),
            )
        )


async def post_odd_targets(client: Any, storefront: dict[str, str], targets: list[str]) -> None:
    """Views by ``edge-odd`` of targets that JSON escapes, a day apart (the later one counts as more recent)."""
    events = [
        {
            "event_id": f"odd-{index}",
            "customer_id": "edge-odd",
            "type": "product_view",
            "target": target,
            "occurred_at": f"2026-03-{10 + index}T10:00:00Z",
        }
        for index, target in enumerate(targets)
    ]
    assert (await client.post("/v1/events", json={"events": events}, headers=storefront)).status_code == 202


async def both_ways(session_maker: Any, as_of: datetime) -> tuple[Figures, Figures]:
    config = ScoringConfig()
    async with read_only(session_maker)() as session:
        everyone = await load_figures(session, as_of, config)
        ids = list((await session.scalars(select(Customer.id).order_by(Customer.id))).all())
        each = await load_figures(session, as_of, config, ids)
    return everyone, each


async def test_the_whole_population_and_single_customers_get_the_same_figures(
    client, storefront, engine, session_maker
) -> None:
    await load_demo(engine, customers=1500, seed=21, now=datetime(2026, 4, 1, tzinfo=UTC))
    await edge_cases(client, storefront)
    await order_of_no_customer(engine)
    for as_of in (datetime(2026, 2, 15, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)):
        everyone, each = await both_ways(session_maker, as_of)
        assert len(everyone) == len(each) > 1500
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(everyone, name), getattr(each, name), err_msg=name)
        # The edge cases came out as the definitions say, not merely alike.
        external = {
            row.id: row.external_id
            for row in (await _customers(session_maker)).values()
            if row.external_id and row.external_id.startswith("edge-")
        }
        at = {external[int(cid)]: position for position, cid in enumerate(everyone.customer_id) if cid in external}
        assert everyone.occasions[at["edge-a"]] == 2  # two orders on 2026-01-10 are one occasion
        assert everyone.paid_orders[at["edge-a"]] == 3
        assert everyone.repeat_spend[at["edge-a"]] == 20.0
        assert everyone.paid_orders[at["edge-b"]] == 1  # a free order is a purchase
        assert everyone.paid_orders[at["edge-c"]] == 1  # the fully refunded one is not
        assert everyone.lifetime_spend[at["edge-c"]] == 30.0
        # Refunded on 2026-03-01: still a purchase as of mid-February, gone as of April.
        expected = 1 if as_of.month == 2 else 0
        assert everyone.paid_orders[at["edge-d"]] == expected


async def test_the_full_runs_interest_texts_are_the_interests_as_json(
    client, storefront, engine, session_maker
) -> None:
    """The full run stores each customer's interests as text built from the rows: exactly what ``json.dumps`` makes
    of ``load_interests``, with targets that JSON escapes."""
    now = datetime(2026, 4, 1, tzinfo=UTC)
    await load_demo(engine, customers=300, seed=5, now=now)
    await post_odd_targets(client, storefront, ['category:"quoted"', "category:é ✓", "category:back\\slash"])
    config = ScoringConfig()
    async with read_only(session_maker)() as session:
        interests = await load_interests(session, now, config)
        texts = await load_interest_texts(session, now, config)
    assert len(interests) > 100
    assert texts == {customer_id: json.dumps(items) for customer_id, items in interests.items()}
    assert any("\\u00e9" in text for text in texts.values())


async def test_no_orders_at_all(client, storefront, session_maker) -> None:
    for as_of in (datetime(2026, 4, 1, tzinfo=UTC),):
        everyone, _each = await both_ways(session_maker, as_of)
        assert len(everyone) == 0
    body = {"referrer_id": "edge-x", "referee_id": "edge-y", "occurred_at": "2026-01-01T00:00:00Z"}
    assert (await client.post("/v1/referrals", json=body, headers=storefront)).status_code == 201
    everyone, each = await both_ways(session_maker, datetime(2026, 4, 1, tzinfo=UTC))
    assert len(everyone) == 2
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(everyone, name), getattr(each, name), err_msg=name)
    assert not everyone.scored.any()


async def _customers(session_maker: Any) -> dict[int, Any]:
    async with read_only(session_maker)() as session:
        rows = (await session.execute(select(Customer.id, Customer.external_id))).all()
    return {row.id: row for row in rows}


async def test_the_rescore_reads_each_customers_interests_as_the_set_based_load(
    client, storefront, engine, session_maker
) -> None:
    """The real-time re-score takes its customers' interests from its one figures read; they must be what
    ``load_interests`` gives for the same ids: for one customer with targets JSON escapes, for a few, for many."""
    now = datetime(2026, 4, 1, tzinfo=UTC)
    await load_demo(engine, customers=600, seed=9, now=now)
    await post_odd_targets(
        client, storefront, ['category:"quoted"', "category:é ✓", "category:back\\slash", "category:é ✓"]
    )
    config = ScoringConfig()
    async with read_only(session_maker)() as session:
        ids = list((await session.scalars(select(Customer.id).order_by(Customer.id))).all())
        odd = await session.scalar(select(Customer.id).where(Customer.external_id == "edge-odd"))
        assert odd is not None
        connection = await session.connection()
        for chosen in ([odd], ids[:3], ids[:400], ids):
            rows = await incremental.read_customers(connection, now, config, chosen)
            assert [row[0] for row in rows] == chosen
            interests = await load_interests(session, now, config, chosen)
            assert len(interests) > 200 or chosen != ids
            assert {row[0]: interests_from_json(row.interests) for row in rows} == {
                customer_id: interests.get(customer_id, []) for customer_id in chosen
            }
        read = await incremental.read_customers(connection, now, config, [odd])
        assert interests_from_json(read[0].interests)[0] == {"target": "category:é ✓", "engagements": 2}
