"""The demo generator on SQLite and PostgreSQL: consistent, shop-like data that the service's own ORM reads back.

Self-contained for now: each backend gets its own database (a temporary SQLite file; on PostgreSQL a fresh
database next to ``LOYALTY_TEST_POSTGRES_URL``'s, dropped afterwards), migrated and loaded once per module.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import func, make_url, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from loyalty.db.migrate import upgrade_database
from loyalty.db.models import Customer, InteractionEvent, Order, OrderItem, Referral, Refund
from loyalty.db.models.activity import EVENT_TYPES
from loyalty.db.session import create_engine, create_session_maker
from loyalty.demo.generator import CATEGORIES, DemoSummary, load_demo
from loyalty.settings import Settings, get_settings
from tests.support import has_sqlite_statistics, planner_statistics

POSTGRES_URL = os.environ.get("LOYALTY_TEST_POSTGRES_URL", "")
REQUIRE_POSTGRES = os.environ.get("LOYALTY_TEST_REQUIRE_POSTGRES", "") not in ("", "0", "false")
NOW = datetime(2026, 6, 30, 12, 0, tzinfo=UTC)
CUSTOMERS = 2000
SEED = 11


@dataclass(frozen=True)
class LoadedDemo:
    engine: AsyncEngine
    summary: DemoSummary


@dataclass(frozen=True)
class Snapshot:
    """Every demo row, read through the service's ORM models (and so through its Money and DateTimeUTC types)."""

    customers: dict[int, Customer]
    orders: list[Order]
    items: list[OrderItem]
    refunds: list[Refund]
    events: list[InteractionEvent]
    referrals: list[Referral]


async def _on_postgres_admin_database(statement: str) -> None:
    url = make_url(POSTGRES_URL)
    connection = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, password=url.password, database="postgres"
    )
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def _settings(url: str) -> Settings:
    return Settings(database_url=url, _env_file=None)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def demo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LoadedDemo]:
    database: str | None = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('demo') / 'demo.db'}"
    else:
        if not POSTGRES_URL:
            reason = "LOYALTY_TEST_POSTGRES_URL is not set"
            if REQUIRE_POSTGRES:
                pytest.fail(f"PostgreSQL is required (LOYALTY_TEST_REQUIRE_POSTGRES) but {reason}")
            pytest.skip(f"PostgreSQL half skipped: {reason}")
        # A unique name, so concurrent test runs on one server never drop each other's database.
        database = f"loyalty_test_demo_{uuid.uuid4().hex[:8]}"
        await _on_postgres_admin_database(f'CREATE DATABASE "{database}"')
        url = make_url(POSTGRES_URL).set(database=database).render_as_string(hide_password=False)
    engine = create_engine(_settings(url))
    try:
        await upgrade_database(engine)
        summary = await load_demo(engine, customers=CUSTOMERS, seed=SEED, now=NOW)
        yield LoadedDemo(engine=engine, summary=summary)
    finally:
        await engine.dispose()
        if database is not None:
            await _on_postgres_admin_database(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="module")
async def snapshot(demo: LoadedDemo) -> Snapshot:
    async with create_session_maker(demo.engine)() as session:
        return Snapshot(
            customers={c.id: c for c in (await session.scalars(select(Customer))).all()},
            orders=list((await session.scalars(select(Order).order_by(Order.id))).all()),
            items=list((await session.scalars(select(OrderItem).order_by(OrderItem.id))).all()),
            refunds=list((await session.scalars(select(Refund).order_by(Refund.id))).all()),
            events=list((await session.scalars(select(InteractionEvent).order_by(InteractionEvent.id))).all()),
            referrals=list((await session.scalars(select(Referral).order_by(Referral.id))).all()),
        )


async def _row_counts(engine: AsyncEngine) -> dict[str, int]:
    async with create_session_maker(engine)() as session:
        return {
            model.__tablename__: await session.scalar(select(func.count()).select_from(model)) or 0
            for model in (Customer, Order, OrderItem, Refund, InteractionEvent, Referral)
        }


def _orders_per_customer(snapshot: Snapshot) -> Counter[int]:
    return Counter(order.customer_id for order in snapshot.orders)


async def test_summary_counts_the_rows_written(demo: LoadedDemo, snapshot: Snapshot) -> None:
    summary = demo.summary
    assert await _row_counts(demo.engine) == {
        "customer": CUSTOMERS,
        "customer_order": summary.orders,
        "order_item": summary.order_items,
        "refund": summary.refunds,
        "interaction_event": summary.events,
        "referral": summary.referrals,
    }
    assert summary.customers == CUSTOMERS
    assert summary.rows == sum((await _row_counts(demo.engine)).values())
    assert summary.seconds > 0
    assert {c.external_id for c in snapshot.customers.values()} == {f"demo-{n:06d}" for n in range(1, CUSTOMERS + 1)}
    assert snapshot.orders[0].external_id == "demo-o-0000001"
    assert all(len(order.content_hash) == 64 for order in snapshot.orders)
    assert all(refund.external_id.startswith("demo-r-") for refund in snapshot.refunds)
    assert all(event.external_id.startswith("demo-e-") for event in snapshot.events)


async def test_customers_carry_profiles(snapshot: Snapshot) -> None:
    customers = list(snapshot.customers.values())
    assert all(c.email == f"{c.external_id}@example.com" for c in customers)
    assert all(set(c.attributes) == {"country", "device", "age_band"} for c in customers)
    assert {c.attributes["device"] for c in customers} == {"mobile", "desktop", "tablet"}
    assert len({c.attributes["country"] for c in customers}) >= 8
    opted_out = sum(c.marketing_opt_out for c in customers) / len(customers)
    assert 0.02 <= opted_out <= 0.08
    joined = sorted(c.joined_at for c in customers if c.joined_at is not None)
    assert len(joined) == CUSTOMERS
    assert NOW - timedelta(days=3 * 366) <= joined[0]
    assert joined[-1] <= NOW
    assert joined[len(joined) // 2] >= NOW - timedelta(days=600), "sign-ups should grow over time"


async def test_buyers_mix_prospects_one_time_repeat_and_a_heavy_tail(snapshot: Snapshot) -> None:
    orders_per_customer = _orders_per_customer(snapshot)
    prospects = CUSTOMERS - len(orders_per_customer)
    assert 0.15 * CUSTOMERS <= prospects <= 0.25 * CUSTOMERS
    one_time = sum(1 for n in orders_per_customer.values() if n == 1) / len(orders_per_customer)
    assert 0.45 <= one_time <= 0.7
    assert sum(1 for n in orders_per_customer.values() if n >= 5) >= 20
    assert max(orders_per_customer.values()) >= 15
    spend: defaultdict[int, Decimal] = defaultdict(Decimal)
    for order in snapshot.orders:
        spend[order.customer_id] += order.total - order.refunded
    ranked = sorted(spend.values(), reverse=True)
    top_tenth = sum(ranked[: len(ranked) // 10])
    assert top_tenth >= Decimal("0.35") * sum(ranked), "a tenth of the buyers should bring a large share of revenue"
    totals = sorted(order.total for order in snapshot.orders)
    assert totals[-1] >= 5 * totals[len(totals) // 2], "order values should be heavy-tailed"


async def test_money_reads_back_as_decimals_in_the_store_currency(demo: LoadedDemo) -> None:
    async with create_session_maker(demo.engine)() as session:
        orders = (await session.scalars(select(Order).order_by(Order.id).limit(20))).all()
        items = (await session.scalars(select(OrderItem).order_by(OrderItem.id).limit(20))).all()
    assert len(orders) == 20
    cent = Decimal("0.01")
    for order in orders:
        assert isinstance(order.total, Decimal)
        assert order.total == order.total.quantize(cent)
        assert order.total >= Decimal("5.00")
        assert order.refunded == order.refunded.quantize(cent)
        assert order.currency == get_settings().currency
        assert order.channel in {"web", "app", "store"}
    assert all(
        isinstance(item.unit_price, Decimal) and item.unit_price == item.unit_price.quantize(cent) for item in items
    )


async def test_refunds_add_up_to_each_orders_refunded_amount(snapshot: Snapshot) -> None:
    refunds_by_order: defaultdict[int, list[Refund]] = defaultdict(list)
    for refund in snapshot.refunds:
        refunds_by_order[refund.order_id].append(refund)
    orders = {order.id: order for order in snapshot.orders}
    assert set(refunds_by_order) <= set(orders)
    for order in snapshot.orders:
        refunds = refunds_by_order.get(order.id, [])
        assert order.refunded == sum((r.amount for r in refunds), Decimal(0))
        assert order.refunded <= order.total
        for refund in refunds:
            assert refund.amount > 0
            assert refund.customer_id == order.customer_id
            assert order.placed_at < refund.refunded_at <= NOW
    refunded_share = len(refunds_by_order) / len(orders)
    assert 0.03 <= refunded_share <= 0.08
    full = sum(1 for order_id in refunds_by_order if orders[order_id].refunded == orders[order_id].total)
    assert 0 < full < len(refunds_by_order), "both cancellations and partial refunds"


async def test_items_belong_to_orders_and_price_them_plausibly(snapshot: Snapshot) -> None:
    orders = {order.id: order for order in snapshot.orders}
    lines: defaultdict[int, list[OrderItem]] = defaultdict(list)
    for item in snapshot.items:
        lines[item.order_id].append(item)
    assert set(lines) == set(orders), "every item references an order and every order has items"
    for order_id, items in lines.items():
        assert 1 <= len(items) <= 5
        assert sorted(item.line_no for item in items) == list(range(len(items)))
        assert all(item.quantity >= 1 and item.unit_price > 0 for item in items)
        gross = sum((item.unit_price * item.quantity for item in items), Decimal(0))
        # Totals are after discounts, so the lines add up to the total or somewhat more.
        assert Decimal("0.95") * orders[order_id].total <= gross <= Decimal("1.6") * orders[order_id].total
    assert {item.category for item in snapshot.items} == set(CATEGORIES)
    assert all(item.sku[:3].isupper() and item.sku[3] == "-" for item in snapshot.items)


async def test_referrals_form_a_forest_with_a_few_strong_referrers(snapshot: Snapshot) -> None:
    referrer_of = {referral.referee_id: referral.referrer_id for referral in snapshot.referrals}
    assert len(referrer_of) == len(snapshot.referrals), "each referee is referred at most once"
    assert 0.05 * CUSTOMERS <= len(referrer_of) <= 0.15 * CUSTOMERS
    for referral in snapshot.referrals:
        assert referral.referrer_id != referral.referee_id
        referrer = snapshot.customers[referral.referrer_id]
        referee = snapshot.customers[referral.referee_id]
        assert referrer.joined_at is not None
        assert referee.joined_at is not None
        assert referrer.joined_at <= referral.occurred_at <= referee.joined_at <= NOW
        assert referee.joined_at - referral.occurred_at <= timedelta(days=10)
    for start in referrer_of:
        seen = {start}
        current = start
        while current in referrer_of:
            current = referrer_of[current]
            assert current not in seen, f"referral cycle through customer {current}"
            seen.add(current)
    per_referrer = sorted(Counter(referrer_of.values()).values(), reverse=True)
    assert per_referrer[0] >= 8
    assert per_referrer[0] >= 4 * per_referrer[len(per_referrer) // 2]


async def test_events_mix_browsing_drivers_reviews_and_shares(snapshot: Snapshot) -> None:
    kinds = Counter(event.type for event in snapshot.events)
    assert set(kinds) == set(EVENT_TYPES)
    assert kinds["page_view"] > 10 * kinds["review"]
    assert kinds["product_view"] > 10 * kinds["social_share"]
    assert all(event.target.split(":", 1)[0] in {"page", "product", "ad"} for event in snapshot.events)
    assert all(event.target.startswith("product:") for event in snapshot.events if event.type == "review")
    assert all(event.target.startswith("ad:") for event in snapshot.events if event.type == "ad_click")
    buyers = set(_orders_per_customer(snapshot))
    per_customer = Counter(event.customer_id for event in snapshot.events)
    prospects_with_events = sum(1 for customer_id in per_customer if customer_id not in buyers)
    assert prospects_with_events >= 0.5 * (CUSTOMERS - len(buyers))
    buyer_mean = sum(per_customer[c] for c in buyers) / len(buyers)
    prospect_mean = sum(n for c, n in per_customer.items() if c not in buyers) / (CUSTOMERS - len(buyers))
    assert buyer_mean > 2 * prospect_mean, "active customers engage more"
    reviewed_products = {event.target for event in snapshot.events if event.type == "review"}
    bought_products = {f"product:{item.sku}" for item in snapshot.items}
    assert reviewed_products <= bought_products


async def test_every_timestamp_is_aware_at_or_before_now_and_after_joining(snapshot: Snapshot) -> None:
    joined = {c.id: c.joined_at for c in snapshot.customers.values()}
    first_order: dict[int, datetime] = {}
    for order in snapshot.orders:
        assert order.placed_at.tzinfo is not None
        assert joined[order.customer_id] <= order.placed_at <= NOW  # type: ignore[operator]
        first_order[order.customer_id] = min(first_order.get(order.customer_id, order.placed_at), order.placed_at)
    for event in snapshot.events:
        assert joined[event.customer_id] <= event.occurred_at <= NOW  # type: ignore[operator]
    created = [
        *(c.created_at for c in snapshot.customers.values()),
        *(c.updated_at for c in snapshot.customers.values()),
        *(o.created_at for o in snapshot.orders),
        *(r.created_at for r in snapshot.refunds),
        *(e.created_at for e in snapshot.events),
        *(r.created_at for r in snapshot.referrals),
    ]
    assert all(moment.tzinfo is not None and moment <= NOW for moment in created)
    assert max(first_order.values()) <= NOW


async def test_a_second_load_is_refused_and_writes_nothing(demo: LoadedDemo) -> None:
    before = await _row_counts(demo.engine)
    with pytest.raises(ValueError, match="demo data already loaded"):
        await load_demo(demo.engine, customers=10, seed=SEED, now=NOW)
    assert await _row_counts(demo.engine) == before


async def test_the_services_own_inserts_continue_after_the_demo_ids(demo: LoadedDemo) -> None:
    async with demo.engine.connect() as connection:
        transaction = await connection.begin()
        session = AsyncSession(bind=connection, expire_on_commit=False)
        try:
            highest = await session.scalar(select(func.max(Customer.id)))
            highest_order = await session.scalar(select(func.max(Order.id)))
            assert highest is not None
            assert highest_order is not None
            customer = Customer(external_id="after-demo", attributes={})
            session.add(customer)
            await session.flush()
            order = Order(
                external_id="after-demo-order",
                customer_id=customer.id,
                placed_at=NOW,
                total=Decimal("10.00"),
                refunded=Decimal(0),
                currency=get_settings().currency,
                content_hash="0" * 64,
            )
            session.add(order)
            await session.flush()
            assert customer.id == highest + 1
            assert order.id == highest_order + 1
        finally:
            await session.close()
            await transaction.rollback()


async def test_the_same_seed_gives_the_same_data(tmp_path: Path) -> None:
    fingerprints = []
    for run in ("first", "second"):
        engine = create_engine(_settings(f"sqlite+aiosqlite:///{tmp_path / run}.db"))
        try:
            await upgrade_database(engine)
            summary = await load_demo(engine, customers=300, seed=5, now=NOW)
            async with create_session_maker(engine)() as session:
                totals = (await session.execute(select(Order.external_id, Order.total, Order.placed_at))).all()
        finally:
            await engine.dispose()
        fingerprints.append((summary.orders, summary.events, summary.referrals, sorted(totals)))
    assert fingerprints[0] == fingerprints[1]


async def test_the_loaded_tables_are_analyzed_for_the_planner(demo: LoadedDemo) -> None:
    """PostgreSQL plans the first requests on statistics of the loaded rows, not on guesses (``db.statistics``)."""
    if demo.engine.dialect.name != "postgresql":
        assert not await has_sqlite_statistics(demo.engine)
        return
    analyzed = await planner_statistics(demo.engine)
    async with demo.engine.connect() as connection:
        estimated = dict(
            (await connection.execute(text("SELECT relname, reltuples FROM pg_class WHERE relkind = 'r'"))).all()
        )
    rows = await _row_counts(demo.engine)
    for table, count in rows.items():
        assert analyzed[table][0] >= 1, table
        assert estimated[table] == count, table  # small tables: ANALYZE reads every row
