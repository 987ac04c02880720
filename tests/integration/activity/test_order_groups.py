"""Group commit of single orders (``loyalty.activity.order_groups``), through the real app on both databases.

Concurrent ``POST /v1/orders`` requests are written together; each must still get the answer it would have got
alone, and an order that cannot be written must fail only its own request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from loyalty.activity import schemas
from loyalty.activity.order_groups import OrderAnswer, OrderGroups
from loyalty.db.models import Customer, CustomerTier, Order, OrderItem, OutboxEvent, TierHistory
from loyalty.lib.errors import ProblemError
from tests.integration.activity.test_orders import order


class GroupSizes:
    """Reads the group-size histogram around a test: the registry is the process's, shared by every test."""

    def __init__(self) -> None:
        self.groups, self.orders = self._read()

    @staticmethod
    def _read() -> tuple[float, float]:
        count = REGISTRY.get_sample_value("loyalty_order_group_orders_count") or 0.0
        total = REGISTRY.get_sample_value("loyalty_order_group_orders_sum") or 0.0
        return count, total

    def since(self) -> tuple[int, int]:
        """Groups written and orders in them since this was made."""
        groups, orders = self._read()
        return int(groups - self.groups), int(orders - self.orders)


async def post_all(client: Any, headers: dict[str, str], bodies: list[dict[str, Any]]) -> list[Any]:
    return list(await asyncio.gather(*(client.post("/v1/orders", json=body, headers=headers) for body in bodies)))


async def stored(session_maker: async_sessionmaker[AsyncSession], model: Any) -> int:
    async with session_maker() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_concurrent_orders_share_transactions_and_get_their_own_answers(
    concurrent_client, storefront, session_maker
) -> None:
    client = concurrent_client
    replayed = await client.post("/v1/orders", json=order("o-stored", "c-stored"), headers=storefront)
    assert replayed.status_code == 201
    sizes = GroupSizes()
    bodies = [order(f"o-{n}", f"c-{n}", total=f"{50 + n}.00", items=[]) for n in range(30)]
    bodies += [
        order("o-twice", "c-twice"),
        order("o-twice", "c-twice"),
        order("o-clash", "c-clash"),
        # Other content under the same ids, for customers never seen: a 409 must leave no customer behind.
        order("o-clash", "c-clash-other"),
        order("o-stored", "c-stored"),
        order("o-stored", "c-stored-other"),
    ]
    responses = await post_all(client, storefront, bodies)

    groups, orders = sizes.since()
    assert orders == len(bodies)
    assert groups < orders, "no two orders were written together"
    statuses = [response.status_code for response in responses]
    assert statuses[:30] == [201] * 30, [response.text for response in responses[:30] if response.status_code != 201]
    # Which of two requests reaches the writer first is not the order they were sent in (each first awaits its key
    # check): the arrival order itself is held by the tests that queue orders directly, below.
    assert sorted(statuses[30:32]) == [200, 201]  # the same order twice: one creates it, the other replays it
    assert sorted(statuses[32:34]) == [201, 409]  # two contents for one id: one wins, the other conflicts
    assert statuses[34:] == [200, 409]  # against the order stored before
    assert responses[34].json() == replayed.json()
    clash, winner = (responses[33], responses[32]) if statuses[33] == 409 else (responses[32], responses[33])
    assert clash.headers["content-type"].startswith("application/problem+json")
    assert "o-clash" in clash.json()["detail"]
    for n, response in enumerate(responses[:30]):
        body = response.json()
        assert (body["order_id"], body["customer_id"], body["total"]) == (f"o-{n}", f"c-{n}", f"{50 + n}.00")
        # Each of these customers has this one order: the tier answered is the tier stored after it.
        badge = await client.get(f"/v1/customers/c-{n}/tier", headers=storefront)
        assert body["tier"] == badge.json()["tier"]
    async with session_maker() as session:
        customers = set((await session.scalars(select(Customer.external_id))).all())
    # No customer is left for a conflict: only the winner of o-clash has its customer.
    assert customers == {f"c-{n}" for n in range(30)} | {"c-twice", "c-stored", winner.json()["customer_id"]}
    assert await stored(session_maker, Order) == 33
    assert await stored(session_maker, OrderItem) == 3  # the 30 were sent without lines
    assert await stored(session_maker, CustomerTier) == 33  # every customer with a new order was re-scored


async def test_a_customers_concurrent_orders_answer_the_tiers_of_posting_them_in_turn(
    app, concurrent_client, storefront, session_maker
) -> None:
    # Orders that move a customer up more than once, posted in turn for one customer and all at once for another,
    # among others' orders so that groups form: the tiers answered and the history kept must be the same.
    placed = [("2026-03-01T10:00:00Z", "40.00"), ("2026-03-05T10:00:00Z", "90.00"), ("2026-03-09T10:00:00Z", "4000.00")]
    in_turn = [
        await concurrent_client.post(
            "/v1/orders",
            json=order(f"o-turn-{number}", "c-in-turn", placed_at=at, total=total, items=[]),
            headers=storefront,
        )
        for number, (at, total) in enumerate(placed)
    ]
    expected = ([response.json()["tier"] for response in in_turn], await tier_history(session_maker, "c-in-turn"))
    sizes = GroupSizes()
    bodies = [order(f"o-other-{n}", f"c-other-{n}", items=[]) for n in range(12)]
    for number, (at, total) in enumerate(placed):
        bodies.insert(4 * number + 1, order(f"o-burst-{number}", "c-burst", placed_at=at, total=total, items=[]))
    outcomes = await queue_all(app, bodies)

    groups, orders = sizes.since()
    assert groups < orders, "no two orders were written together"
    assert all(isinstance(outcome, OrderAnswer) and outcome.created for outcome in outcomes), outcomes
    burst = [outcome.order.tier for outcome in outcomes if outcome.order.customer_id == "c-burst"]
    assert (burst, await tier_history(session_maker, "c-burst")) == expected
    assert len(expected[1]) > 1, "the orders should move the customer more than once"
    await assert_every_tier_change_announced(session_maker)


async def assert_every_tier_change_announced(session_maker: async_sessionmaker[AsyncSession]) -> None:
    """One tier.changed event per history row, as ``announce_tier_changes`` writes it (on PostgreSQL the re-score
    writes them in its placements statement)."""
    async with session_maker() as session:
        history = (
            await session.execute(
                select(TierHistory.id, TierHistory.at, TierHistory.from_tier, TierHistory.to_tier, Customer.external_id)
                .add_columns(TierHistory.kind, TierHistory.reason)
                .join(Customer, Customer.id == TierHistory.customer_id)
            )
        ).all()
        events = {
            event.dedupe_key: event
            for event in (
                await session.scalars(select(OutboxEvent).where(OutboxEvent.event_type == "tier.changed"))
            ).all()
        }
    assert len(history) > 1
    assert set(events) == {f"tier.changed:{entry.id}" for entry in history}
    for entry in history:
        event = events[f"tier.changed:{entry.id}"]
        assert (event.occurred_at, event.created_at) == (entry.at, entry.at)
        assert event.payload == {
            "customer_id": entry.external_id,
            "from": entry.from_tier,
            "to": entry.to_tier,
            "kind": entry.kind,
            "reason": entry.reason,
        }


async def queue_all(app: Any, bodies: list[dict[str, Any]]) -> list[OrderAnswer | BaseException]:
    """Hand the orders to the app's writer directly, queued in this order (over HTTP each request first awaits its
    key check, so the order they reach the writer in is not the order they were sent in); a conflict or a failure
    is its exception. Queued together, they are written in as few groups as the rules allow."""
    writes = [
        asyncio.create_task(app.state.order_groups.write(schemas.OrderCreate.model_validate(body))) for body in bodies
    ]
    return list(await asyncio.gather(*writes, return_exceptions=True))


async def tier_history(session_maker: async_sessionmaker[AsyncSession], customer_id: str) -> list[tuple[Any, ...]]:
    """The customer's tier history, (from, to), oldest first."""
    async with session_maker() as session:
        internal = await session.scalar(select(Customer.id).where(Customer.external_id == customer_id))
        history = await session.execute(
            select(TierHistory.from_tier, TierHistory.to_tier)
            .where(TierHistory.customer_id == internal)
            .order_by(TierHistory.id)
        )
        return [tuple(row) for row in history]


@pytest.fixture
async def poisoned_orders(engine: AsyncEngine) -> AsyncIterator[str]:
    """A trigger that refuses to store one order id: an order that passes validation but that the database
    will not take, as a failure no other order in its group shares."""
    poison = "o-poison"
    if engine.dialect.name == "postgresql":
        create = [
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.external_id = '{poison}' THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$",
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON customer_order "
            "FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
        ]
        drop = ["DROP TRIGGER refuse_poison ON customer_order", "DROP FUNCTION refuse_poison()"]
    else:
        create = [
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON customer_order "
            f"WHEN NEW.external_id = '{poison}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        ]
        drop = ["DROP TRIGGER refuse_poison"]
    async with engine.begin() as connection:
        for statement in create:
            await connection.execute(text(statement))
    try:
        yield poison
    finally:
        async with engine.begin() as connection:
            for statement in drop:
                await connection.execute(text(statement))


async def test_an_order_the_database_refuses_fails_only_its_own_request(
    app, concurrent_client, session_maker, poisoned_orders, caplog
) -> None:
    bodies = [order(f"o-{n}", f"c-{n}") for n in range(12)]
    bodies.insert(6, order(poisoned_orders, "c-poisoned"))
    # One id with two contents (for two customers, so both can share a group): written again one by one, the first
    # to arrive must still be the one created.
    bodies += [order("o-twice", "c-first"), order("o-twice", "c-second")]
    with caplog.at_level(logging.WARNING, logger="loyalty.orders"):
        outcomes = await queue_all(app, bodies)

    assert any("writing each alone" in record.getMessage() for record in caplog.records), "no group failed"
    refused = outcomes.pop(6)
    assert isinstance(refused, DBAPIError), refused
    assert all(isinstance(outcome, OrderAnswer) and outcome.created for outcome in outcomes[:13]), outcomes
    assert isinstance(outcomes[13], ProblemError)
    assert outcomes[13].status == 409
    async with session_maker() as session:
        ids = set((await session.scalars(select(Order.external_id))).all())
        customers = set((await session.scalars(select(Customer.external_id))).all())
    assert ids == {f"o-{n}" for n in range(12)} | {"o-twice"}
    assert await stored(session_maker, OrderItem) == 13
    assert customers == {f"c-{n}" for n in range(12)} | {"c-first"}  # none for the refused or the conflict


async def test_a_refused_order_is_a_problem_document_over_http(concurrent_client, storefront, poisoned_orders) -> None:
    responses = await post_all(
        concurrent_client, storefront, [order(f"o-{n}", f"c-{n}") for n in range(4)] + [order(poisoned_orders, "c-p")]
    )
    assert [response.status_code for response in responses] == [201] * 4 + [500]
    assert responses[4].headers["content-type"].startswith("application/problem+json")


async def test_a_cancelled_request_does_not_cancel_its_write(app, engine, session_maker) -> None:
    # The app's own writer, on the test's engine: the client disconnecting cancels the request's task only.
    groups = OrderGroups(session_maker, app.state.tiers, app.state.model_cache)
    first = asyncio.create_task(groups.write(schemas.OrderCreate.model_validate(order("o-1", "c-1"))))
    second = asyncio.create_task(groups.write(schemas.OrderCreate.model_validate(order("o-2", "c-2"))))
    await asyncio.sleep(0)  # both are queued, to be written together
    second.cancel()
    answer = await first
    await groups.close()
    assert answer.created
    assert answer.order.order_id == "o-1"
    assert second.cancelled()
    async with session_maker() as session:
        assert set((await session.scalars(select(Order.external_id))).all()) == {"o-1", "o-2"}
