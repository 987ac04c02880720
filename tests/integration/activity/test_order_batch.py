"""POST /v1/orders/batch, written set-based: each order's outcome is what posting them one by one would give."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.activity import schemas
from loyalty.activity.services import create_orders_batch, create_referral, write_orders
from loyalty.customers.lookup import ensure_customer_ids
from loyalty.db.models import Customer, CustomerTier, Order, OrderItem
from tests.integration.activity.test_orders import count, order


async def post_batch(client: Any, storefront: dict[str, str], orders: list[Any]) -> dict[str, Any]:
    response = await client.post("/v1/orders/batch", json={"orders": orders}, headers=storefront)
    assert response.status_code == 200, response.text
    return dict(response.json())


def statuses(body: dict[str, Any]) -> list[int]:
    return [result["status"] for result in body["results"]]


async def test_repeats_inside_one_batch_are_judged_against_the_first(client, storefront, session_maker) -> None:
    body = await post_batch(
        client,
        storefront,
        [order("o-a"), order("o-a"), order("o-a", total="1.00"), order("o-b", customer_id="c-2"), order("o-b")],
    )
    assert statuses(body) == [201, 200, 409, 201, 409]
    assert [result["order_id"] for result in body["results"]] == ["o-a", "o-a", "o-a", "o-b", "o-b"]
    assert (body["created"], body["replayed"], body["failed"]) == (2, 1, 2)
    assert body["results"][2]["problem"]["type"] == "/problems/idempotency-conflict"
    async with session_maker() as session:
        totals = dict((await session.execute(select(Order.external_id, Order.total))).all())
    assert totals == {"o-a": Decimal("129.90"), "o-b": Decimal("129.90")}
    assert await count(session_maker, OrderItem) == 2


async def test_an_invalid_first_occurrence_leaves_the_id_to_the_next(client, storefront, session_maker) -> None:
    body = await post_batch(client, storefront, [order("o-a", total="-1"), order("o-a"), order("o-a")])
    assert statuses(body) == [422, 201, 200]
    assert body["results"][0]["problem"]["errors"][0]["field"] == "orders[0].total"
    assert await count(session_maker, Order) == 1


async def test_replays_and_conflicts_of_stored_orders_create_no_customer(client, storefront, session_maker) -> None:
    assert (await client.post("/v1/orders", json=order("o-stored"), headers=storefront)).status_code == 201
    body = await post_batch(
        client,
        storefront,
        [order("o-stored"), order("o-stored", customer_id="c-new"), order("o-fresh", customer_id="c-fresh")],
    )
    assert statuses(body) == [200, 409, 201]
    async with session_maker() as session:
        customers = set((await session.scalars(select(Customer.external_id))).all())
    assert customers == {"c-1", "c-fresh"}


async def test_a_batch_and_single_posts_recognise_each_other(client, storefront, session_maker) -> None:
    body = await post_batch(client, storefront, [order("o-1"), order("o-2", items=[], channel=None)])
    assert statuses(body) == [201, 201]
    for body_sent in (order("o-1"), order("o-2", items=[], channel=None)):
        assert (await client.post("/v1/orders", json=body_sent, headers=storefront)).status_code == 200
    assert (await client.post("/v1/orders", json=order("o-3"), headers=storefront)).status_code == 201
    # The same instant in another offset is the same content, as for single posts.
    again = await post_batch(client, storefront, [order("o-3", placed_at="2026-03-01T09:15:00Z"), order("o-1")])
    assert statuses(again) == [200, 200]


async def test_items_are_stored_in_order_and_new_customers_are_rescored(client, storefront, session_maker) -> None:
    items = [
        {"sku": "A", "category": "tops", "quantity": 1, "unit_price": "10.00"},
        {"sku": "B", "quantity": 3, "unit_price": "0.50"},
    ]
    body = await post_batch(
        client, storefront, [order("o-1", "c-1", total="11.50", items=items), order("o-2", "c-2"), "not an order"]
    )
    assert statuses(body) == [201, 201, 422]
    assert body["results"][2]["order_id"] is None
    async with session_maker() as session:
        stored = (
            await session.execute(
                select(Order.external_id, OrderItem.line_no, OrderItem.sku, OrderItem.category, OrderItem.quantity)
                .join(Order, Order.id == OrderItem.order_id)
                .order_by(Order.external_id, OrderItem.line_no)
            )
        ).all()
        tiered = set(
            (
                await session.scalars(
                    select(Customer.external_id).join(CustomerTier, CustomerTier.customer_id == Customer.id)
                )
            ).all()
        )
    assert [tuple(row) for row in stored] == [
        ("o-1", 0, "A", "tops", 1),
        ("o-1", 1, "B", None, 3),
        ("o-2", 0, "SKU-1", "shoes", 2),
    ]
    assert tiered == {"c-1", "c-2"}


async def test_concurrent_batches_and_single_posts_store_each_order_once(client, storefront, session_maker) -> None:
    # Two batches overlap on half their ids (in opposite orders), and single posts race for some of the same ids.
    first = [order(f"o-{n}", f"c-{n % 7}") for n in range(0, 60)]
    second = [order(f"o-{n}", f"c-{n % 7}") for n in reversed(range(30, 90))]
    singles = [order(f"o-{n}", f"c-{n % 7}") for n in range(20, 100, 4)]
    responses = await asyncio.gather(
        client.post("/v1/orders/batch", json={"orders": first}, headers=storefront),
        client.post("/v1/orders/batch", json={"orders": second}, headers=storefront),
        *(client.post("/v1/orders", json=body, headers=storefront) for body in singles),
    )
    assert all(response.status_code in (200, 201) for response in responses), [r.text for r in responses]
    created: dict[str, int] = {}
    for response in responses[:2]:
        for result in response.json()["results"]:
            assert result["status"] in (200, 201), result
            created[result["order_id"]] = created.get(result["order_id"], 0) + (result["status"] == 201)
    for body, response in zip(singles, responses[2:], strict=True):
        created[body["order_id"]] = created.get(body["order_id"], 0) + (response.status_code == 201)
    assert set(created) == {f"o-{n}" for n in range(100) if n < 90 or n % 4 == 0}
    assert all(times == 1 for times in created.values()), {k: v for k, v in created.items() if v != 1}
    assert await count(session_maker, Order) == len(created)
    assert await count(session_maker, OrderItem) == len(created)
    assert await count(session_maker, Customer) == 7


async def _wait_for_a_lock_wait(session_maker: async_sessionmaker[AsyncSession], dialect: str) -> None:
    """Until another transaction waits on a row lock (PostgreSQL); SQLite's writers queue on the database lock."""
    if dialect != "postgresql":
        await asyncio.sleep(0.3)
        return
    for _attempt in range(200):
        async with session_maker() as session:
            waiting = await session.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        if waiting:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the second batch never waited for the first")


async def test_a_batch_losing_a_race_to_different_content_reports_a_conflict_and_keeps_no_customer(
    session_maker, database
) -> None:
    """The batch reads the id as new, then finds it stored by a concurrent transaction when it inserts."""
    async with session_maker() as winner:
        await winner.begin()
        won, _ = await create_orders_batch(winner, [order("o-race", "c-winner")])
        assert won.created == 1

        async def losing_batch() -> Any:
            async with session_maker() as loser, loser.begin():
                result, affected = await create_orders_batch(
                    loser, [order("o-race", "c-loser", total="5.00"), order("o-other", "c-other")]
                )
                return result, affected

        loser_task = asyncio.create_task(losing_batch())
        await _wait_for_a_lock_wait(session_maker, database.dialect)
        await winner.commit()
    result, affected = await loser_task
    assert statuses(result.model_dump()) == [409, 201]
    async with session_maker() as session:
        customers = dict((await session.execute(select(Customer.external_id, Customer.id))).all())
        stored = dict((await session.execute(select(Order.external_id, Order.total))).all())
    assert set(customers) == {"c-winner", "c-other"}
    assert stored == {"o-race": Decimal("129.90"), "o-other": Decimal("129.90")}
    assert affected == {customers["c-other"]}


async def test_a_group_locking_for_its_rescore_that_loses_a_race_locks_only_whom_it_wrote_for(
    session_maker, database
) -> None:
    """Single orders written together take the re-score's lock in their own insert (PostgreSQL): the lock covers
    the customers written for and their referrers, not a customer whose order lost (one known before, or one
    created for it and dropped with it), and the items of the inserted orders are stored as sent."""
    async with session_maker() as session, session.begin():
        await create_referral(
            session,
            schemas.ReferralCreate(referrer_id="c-referrer", referee_id="c-other", occurred_at="2026-02-01T00:00:00Z"),
        )
        await ensure_customer_ids(session, ["c-known"])
    items = [
        {"sku": "A", "category": "tops", "quantity": 1, "unit_price": "10.00"},
        {"sku": "B", "category": None, "quantity": 3, "unit_price": "0.50"},
    ]
    async with session_maker() as winner:
        await winner.begin()
        won, _ = await create_orders_batch(winner, [order("o-race", "c-winner"), order("o-race-known", "c-winner")])
        assert won.created == 2

        async def losing_group() -> Any:
            async with session_maker() as loser, loser.begin():
                offered = [
                    order("o-race", "c-loser", total="5.00"),
                    order("o-race-known", "c-known", total="5.00"),
                    order("o-other", "c-other", items=items),
                ]
                return await write_orders(
                    loser, [schemas.OrderCreate.model_validate(body) for body in offered], lock_for_rescore=True
                )

        loser_task = asyncio.create_task(losing_group())
        await _wait_for_a_lock_wait(session_maker, database.dialect)
        await winner.commit()
    written = await loser_task
    assert written.statuses == [409, 409, 201]
    async with session_maker() as session:
        customers = dict((await session.execute(select(Customer.external_id, Customer.id))).all())
        stored_items = (
            await session.execute(
                select(Order.external_id, OrderItem.line_no, OrderItem.sku, OrderItem.category, OrderItem.quantity)
                .add_columns(OrderItem.unit_price)
                .join(Order, Order.id == OrderItem.order_id)
                .order_by(Order.external_id, OrderItem.line_no)
            )
        ).all()
    assert set(customers) == {"c-winner", "c-known", "c-other", "c-referrer"}
    assert written.customers == {"o-other": customers["c-other"]}
    # SQLite needs no lock (one writer at a time): the re-score takes none there either.
    expected_lock = (
        tuple(sorted([customers["c-other"], customers["c-referrer"]])) if database.dialect == "postgresql" else None
    )
    assert written.locked == expected_lock
    assert [tuple(row) for row in stored_items] == [
        ("o-other", 0, "A", "tops", 1, Decimal("10.00")),
        ("o-other", 1, "B", None, 3, Decimal("0.50")),
        ("o-race", 0, "SKU-1", "shoes", 2, Decimal("64.95")),
        ("o-race-known", 0, "SKU-1", "shoes", 2, Decimal("64.95")),
    ]


async def test_a_batch_plans_its_statements_for_their_own_parameters_until_it_commits(session_maker, database) -> None:
    """A generic plan made while the tables were nearly empty would scan them whole as a bulk load grows them."""

    async def plan_cache_mode(session: AsyncSession) -> str:
        return str(await session.scalar(text("SHOW plan_cache_mode")))

    if database.dialect != "postgresql":
        async with session_maker() as session, session.begin():
            await create_orders_batch(session, [order("o-plan")])  # SQLite has no plan cache to steer
        return
    async with session_maker() as session:
        async with session.begin():
            assert await plan_cache_mode(session) == "auto"
            await create_orders_batch(session, [order("o-plan")])
            assert await plan_cache_mode(session) == "force_custom_plan"
        # Only that transaction: the connection goes back to the pool as it came.
        async with session.begin():
            assert await plan_cache_mode(session) == "auto"
