"""`loyalty import`: generic and shop-export order files, customers and events, streamed, idempotent, with rejects."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from loyalty.activity.importer import (
    NOT_CONSECUTIVE,
    ORDER_CONFLICT,
    ImportFileError,
    ImportSummary,
    import_customers,
    import_events,
    import_orders,
)
from loyalty.cli import main
from loyalty.db.models import Customer, InteractionEvent, Order, OrderItem, Refund
from loyalty.settings import get_settings
from tests.support import has_sqlite_statistics, planner_statistics

GENERIC = """\
order_id,customer_id,placed_at,total,currency,sku,category,quantity,unit_price
o-1,c-1,2024-03-05T14:03:21-05:00,90.00,USD,TOP-101,tops,2,30.00
o-1,c-1,2024-03-05T14:03:21-05:00,90.00,USD,SHO-102,shoes,1,40.00
o-2,c-2,2024-04-01T09:00:00Z,25.50,usd,,,,
o-neg,c-3,2024-04-02T09:00:00Z,-5.00,USD,ACC-100,,1,5.00
o-naive,c-3,2024-04-02 09:00:00,12.00,USD,ACC-100,,1,12.00
o-eur,c-3,2024-04-02T09:00:00Z,12.00,EUR,ACC-100,,1,12.00
o-3,c-1,2024-05-01T10:00:00+02:00,10.00,USD,ACC-101,accessories,1,10.00
o-3,c-1,2024-05-01T10:00:00+02:00,10.00,USD,ACC-102,accessories,1,2.50
o-3,c-1,2024-05-01T10:00:00+02:00,10.00,USD,ACC-103,accessories,3,1.00
o-1,c-1,2024-03-05T14:03:21-05:00,90.00,USD,BAG-100,bags,1,20.00
"""

SHOP_HEADER = (
    "Name,Email,Financial Status,Paid at,Fulfillment Status,Fulfilled at,Accepts Marketing,Currency,Subtotal,"
    "Shipping,Taxes,Total,Discount Code,Discount Amount,Shipping Method,Created at,Lineitem quantity,Lineitem name,"
    "Lineitem price,Lineitem compare at price,Lineitem sku,Lineitem requires shipping,Lineitem taxable,"
    "Lineitem fulfillment status,Billing Name,Refunded Amount,Cancelled at,Payment Method,Id\n"
)
# A Shopify-like export: one row per line item, order-level fields on the first row of each order only.
SHOP = SHOP_HEADER + (
    "#1001,Ana@Example.com,paid,2024-03-05 14:03:21 -0500,fulfilled,2024-03-06 10:00:00 -0500,yes,USD,90.00,"
    "5.00,7.20,102.20,SPRING10,10.00,Standard,2024-03-05 14:03:19 -0500,2,Linen shirt,30.00,,TOP-101,true,true,"
    "fulfilled,Ana Lima,0.00,,Shopify Payments,5001\n"
    "#1001,Ana@Example.com,,,,,,,,,,,,,,,1,Canvas sneakers,40.00,45.00,SHO-102,true,true,fulfilled,,,,,\n"
    "#1002,bo@example.com,partially_refunded,2024-03-07 09:15:00 +0100,fulfilled,,no,USD,120.00,0.00,9.60,129.60,,"
    "0.00,Free,2024-03-07 09:14:50 +0100,1,Wool coat,80.00,,OUT-100,true,true,fulfilled,Bo Berg,30.00,,"
    "Shopify Payments,5002\n"
    "#1002,bo@example.com,,,,,,,,,,,,,,,1,Leather belt,25.00,,ACC-104,true,true,fulfilled,,,,,\n"
    "#1002,bo@example.com,,,,,,,,,,,,,,,1,Gift wrap,15.00,,,false,false,fulfilled,,,,,\n"
    "#1003,ana@example.com,refunded,2024-03-10 18:00:00 +0000,,,yes,USD,50.00,4.00,4.00,58.00,,0.00,Standard,"
    "2024-03-10 17:59:58 +0000,1,Silk dress,50.00,,DRS-101,true,true,,Ana Lima,58.00,2024-03-12 08:00:00 +0000,"
    "Shopify Payments,5003\n"
    "#1004,cy@example.com,pending,,,,no,USD,35.00,5.00,2.80,42.80,,0.00,Standard,2024-03-11 11:00:00 +0000,1,"
    "Cotton tee,35.00,,TOP-102,true,true,,Cy Dale,0.00,,Bank Deposit,5004\n"
)


def lines_of(text: str) -> Iterator[str]:
    """An unseekable stream of lines: the importer may only iterate, never seek, rewind or ask for a size."""
    yield from io.StringIO(text, newline="")


def rejected_rows(out: io.StringIO) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(out.getvalue())))


async def count(session_maker, model) -> int:
    async with session_maker() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_generic_orders_with_items_rejects_and_idempotent_rerun(engine, session_maker) -> None:
    rejects = io.StringIO()
    summary = await import_orders(engine, lines_of(GENERIC), rejects=rejects)
    assert (summary.rows, summary.imported, summary.duplicates, summary.rejected) == (10, 3, 0, 4)
    assert summary.customers_created == 2  # c-3 has only rejected orders: never created
    async with session_maker() as session:
        orders = {o.external_id: o for o in (await session.scalars(select(Order))).all()}
        assert set(orders) == {"o-1", "o-2", "o-3"}
        assert orders["o-1"].total == Decimal("90.00")
        assert orders["o-1"].placed_at == datetime(2024, 3, 5, 19, 3, 21, tzinfo=UTC)
        assert orders["o-2"].currency == "USD"
        items = (
            await session.execute(
                select(Order.external_id, OrderItem.line_no, OrderItem.sku, OrderItem.quantity, OrderItem.unit_price)
                .join(Order, Order.id == OrderItem.order_id)
                .order_by(Order.external_id, OrderItem.line_no)
            )
        ).all()
    assert [tuple(row) for row in items] == [
        ("o-1", 0, "TOP-101", 2, Decimal("30.00")),
        ("o-1", 1, "SHO-102", 1, Decimal("40.00")),
        ("o-3", 0, "ACC-101", 1, Decimal("10.00")),
        ("o-3", 1, "ACC-102", 1, Decimal("2.50")),
        ("o-3", 2, "ACC-103", 3, Decimal("1.00")),
    ]
    reasons = {row["order_id"]: row["reason"] for row in rejected_rows(rejects)}
    assert reasons["o-neg"] == "total: must not be negative"
    assert reasons["o-naive"] == "placed_at: Input should have timezone info"
    assert reasons["o-eur"].startswith("currency: must be USD")
    assert reasons["o-1"] == NOT_CONSECUTIVE
    assert rejected_rows(rejects)[0].keys() == {*GENERIC.splitlines()[0].split(","), "reason"}

    # The same file again, a batch at a time: nothing new, every stored order a duplicate.
    again = await import_orders(engine, lines_of(GENERIC), rejects=io.StringIO(), batch_size=1)
    assert (again.imported, again.duplicates, again.customers_created) == (0, 3, 0)
    # One batch per order now, so the late rows of o-1 meet the stored order: different content, a conflict.
    assert again.rejected == 4
    assert again.reasons[ORDER_CONFLICT] == 1
    assert await count(session_maker, Order) == 3
    assert await count(session_maker, OrderItem) == 5


async def _times_analyzed(engine, tables: list[str]) -> list[int]:
    counts = await planner_statistics(engine)
    return [counts.get(table, (0, 0))[0] for table in tables]


async def test_an_import_that_wrote_rows_analyzes_the_tables_it_filled(engine) -> None:
    """So the first requests after it are planned on the imported rows (``db.statistics``); SQLite is left alone."""
    if engine.dialect.name != "postgresql":
        await import_orders(engine, lines_of(GENERIC))
        assert not await has_sqlite_statistics(engine)
        return
    filled = ["customer", "customer_order", "order_item", "refund"]
    before = await _times_analyzed(engine, [*filled, "interaction_event"])
    await import_orders(engine, lines_of(GENERIC))
    assert await _times_analyzed(engine, [*filled, "interaction_event"]) == [count + 1 for count in before[:-1]] + [
        before[-1]
    ]
    # The same file again writes nothing, and analyzes nothing.
    await import_orders(engine, lines_of(GENERIC), rejects=io.StringIO())
    assert await _times_analyzed(engine, filled) == [count + 1 for count in before[:-1]]


async def test_a_changed_order_is_a_conflict_and_the_others_still_import(engine, session_maker) -> None:
    await import_orders(engine, lines_of(GENERIC))
    changed = (
        GENERIC.splitlines()[0]
        + "\n"
        + "o-2,c-2,2024-04-01T09:00:00Z,26.00,USD,,,,\no-9,c-9,2024-04-01T09:00:00Z,1.00,USD,,,,\n"
    )
    rejects = io.StringIO()
    summary = await import_orders(engine, lines_of(changed), rejects=rejects)
    assert (summary.imported, summary.rejected) == (1, 1)
    assert [row["order_id"] for row in rejected_rows(rejects)] == ["o-2"]
    assert rejected_rows(rejects)[0]["reason"] == ORDER_CONFLICT


async def test_import_streams_from_an_iterator(engine) -> None:
    """Batches are written while the file is still being read: memory holds two batches, not the file."""
    header = "order_id,customer_id,placed_at,total,currency\n"
    consumed = 0
    consumed_at_first_write: list[int] = []

    def lines() -> Iterator[str]:
        nonlocal consumed
        for line in [header, *(f"s-{n},c-{n % 7},2024-01-01T00:00:00Z,{n}.00,USD\n" for n in range(50))]:
            consumed += 1
            yield line

    def progress(summary: ImportSummary) -> None:
        if not consumed_at_first_write:
            consumed_at_first_write.append(consumed)

    summary = await import_orders(engine, lines(), batch_size=10, progress=progress)
    assert summary.imported == 50
    # The first batch is written while the second is read, so done by the time the second is full: the header,
    # two batches, and the one row read ahead to see that the last order has ended.
    assert consumed_at_first_write[0] <= 1 + 2 * 10 + 1


async def test_shop_export_is_mapped(engine, session_maker) -> None:
    rejects = io.StringIO()
    summary = await import_orders(engine, lines_of(SHOP), file_format="shop-export", rejects=rejects)
    assert (summary.rows, summary.imported, summary.refunds, summary.skipped, summary.rejected) == (7, 3, 2, 1, 0)
    assert summary.customers_created == 2  # Ana's two orders under one lower-cased email
    async with session_maker() as session:
        orders = {o.external_id: o for o in (await session.scalars(select(Order))).all()}
        assert {name: (o.total, o.refunded) for name, o in orders.items()} == {
            "#1001": (Decimal("90.00"), Decimal(0)),
            "#1002": (Decimal("120.00"), Decimal("30.00")),
            "#1003": (Decimal("50.00"), Decimal("50.00")),
        }
        assert orders["#1001"].placed_at == datetime(2024, 3, 5, 19, 3, 21, tzinfo=UTC)
        refunds = {
            r.external_id: (r.amount, r.refunded_at, r.order_id) for r in (await session.scalars(select(Refund))).all()
        }
        assert refunds == {
            "#1002-refund": (Decimal("30.00"), datetime(2024, 3, 7, 8, 15, tzinfo=UTC), orders["#1002"].id),
            # Refunded in full: the goods total, not the 58.00 with tax and shipping; dated when cancelled.
            "#1003-refund": (Decimal("50.00"), datetime(2024, 3, 12, 8, 0, tzinfo=UTC), orders["#1003"].id),
        }
        items = (
            await session.execute(
                select(Order.external_id, OrderItem.sku, OrderItem.quantity, OrderItem.unit_price)
                .join(Order, Order.id == OrderItem.order_id)
                .order_by(Order.external_id, OrderItem.line_no)
            )
        ).all()
        assert [tuple(row) for row in items] == [
            ("#1001", "TOP-101", 2, Decimal("30.00")),
            ("#1001", "SHO-102", 1, Decimal("40.00")),
            ("#1002", "OUT-100", 1, Decimal("80.00")),
            ("#1002", "ACC-104", 1, Decimal("25.00")),
            ("#1002", "Gift wrap", 1, Decimal("15.00")),  # no sku: the line item's name stands in
            ("#1003", "DRS-101", 1, Decimal("50.00")),
        ]
        customers = dict((await session.execute(select(Customer.external_id, Customer.email))).all())
        assert customers == {"ana@example.com": "ana@example.com", "bo@example.com": "bo@example.com"}
    skipped = rejected_rows(rejects)
    assert [row["Name"] for row in skipped] == ["#1004"]
    assert skipped[0]["reason"] == "financial status 'pending': not a paid order"

    again = await import_orders(engine, lines_of(SHOP), file_format="shop-export")
    assert (again.imported, again.refunds, again.duplicates, again.skipped, again.customers_created) == (0, 0, 3, 1, 0)
    assert await count(session_maker, Refund) == 2


async def test_wrong_format_is_refused_before_anything_is_written(engine, session_maker) -> None:
    with pytest.raises(ImportFileError, match="use --format shop-export"):
        await import_orders(engine, lines_of(SHOP))
    with pytest.raises(ImportFileError, match="empty"):
        await import_orders(engine, lines_of(""))
    assert await count(session_maker, Order) == 0


CUSTOMERS = """\
customer_id,email,joined_at,marketing_opt_out,country,device
c-1,ana@example.com,2023-01-05T10:00:00Z,false,PT,mobile
c-2,,,true,SE,
c-3,not-an-email,,,,
"""


async def test_customers_created_updated_and_rerun(engine, session_maker) -> None:
    rejects = io.StringIO()
    summary = await import_customers(engine, lines_of(CUSTOMERS), rejects=rejects)
    assert (summary.imported, summary.rejected, summary.customers_created) == (2, 1, 2)
    assert rejected_rows(rejects)[0]["customer_id"] == "c-3"
    assert rejected_rows(rejects)[0]["reason"].startswith("email:")
    async with session_maker() as session:
        c1 = await session.scalar(select(Customer).where(Customer.external_id == "c-1"))
        c2 = await session.scalar(select(Customer).where(Customer.external_id == "c-2"))
    assert c1 is not None
    assert c2 is not None
    assert (c1.email, c1.joined_at, c1.marketing_opt_out) == (
        "ana@example.com",
        datetime(2023, 1, 5, 10, tzinfo=UTC),
        False,
    )
    assert c1.attributes == {"country": "PT", "device": "mobile"}
    assert (c2.email, c2.marketing_opt_out, c2.attributes) == (None, True, {"country": "SE"})

    again = await import_customers(engine, lines_of(CUSTOMERS))
    assert (again.imported, again.updated, again.duplicates, again.customers_created) == (0, 0, 2, 0)
    changed = await import_customers(engine, lines_of("customer_id,device\nc-2,desktop\nc-1,mobile\n"))
    assert (changed.updated, changed.duplicates) == (1, 1)
    async with session_maker() as session:
        attributes = await session.scalar(select(Customer.attributes).where(Customer.external_id == "c-2"))
    assert attributes == {"country": "SE", "device": "desktop"}


EVENTS = """\
event_id,customer_id,type,target,occurred_at
e-1,c-1,product_view,product:TOP-101,2024-03-01T10:00:00Z
e-2,c-2,review,product:TOP-101,2024-03-02T10:00:00+01:00
e-3,c-2,teleport,page:/,2024-03-02T10:00:00Z
e-4,c-2,page_view,page:/,2024-03-02 10:00:00
e-1,c-1,product_view,product:TOP-101,2024-03-01T10:00:00Z
"""


async def test_events_import_and_rerun(engine, session_maker) -> None:
    rejects = io.StringIO()
    summary = await import_events(engine, lines_of(EVENTS), rejects=rejects)
    assert (summary.imported, summary.duplicates, summary.rejected, summary.customers_created) == (2, 1, 2, 2)
    reasons = {row["event_id"]: row["reason"] for row in rejected_rows(rejects)}
    assert reasons["e-3"].startswith("type: ")
    assert reasons["e-4"] == "occurred_at: Input should have timezone info"
    again = await import_events(engine, lines_of(EVENTS))
    assert (again.imported, again.duplicates) == (0, 3)
    assert await count(session_maker, InteractionEvent) == 2


async def test_cli_import_orders(settings, engine, session_maker, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "orders.csv"
    path.write_text(GENERIC, encoding="utf-8")
    monkeypatch.setenv("LOYALTY_DATABASE_URL", settings.database_url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        # The command runs its own event loop, so it runs in a thread beside this test's loop.
        first = await asyncio.to_thread(runner.invoke, main, ["import", "orders", str(path)])
        assert first.exit_code == 0, first.output
        assert "orders imported" in first.output
        assert "next full recalculation" in first.output
        rejects = list(csv.DictReader((tmp_path / "orders.csv.rejects.csv").open(encoding="utf-8")))
        assert len(rejects) == 4
        assert all(row["reason"] for row in rejects)
        second = await asyncio.to_thread(runner.invoke, main, ["import", "orders", str(path), "--batch-size", "2"])
        assert second.exit_code == 0, second.output
        lines = {line.split("  ")[1].strip(): line.split()[-1] for line in second.output.splitlines() if "  " in line}
        assert lines["orders imported"] == "0"
        assert lines["duplicates (already stored)"] == "3"
        wrong = await asyncio.to_thread(runner.invoke, main, ["import", "orders", str(path), "--format", "shop-export"])
        assert wrong.exit_code == 2
        assert "missing: name, email" in wrong.output
    finally:
        get_settings.cache_clear()
    assert await count(session_maker, Order) == 3


def _generic_lines(orders: int) -> Iterator[str]:
    """A generated generic export: every order with two items, one bad order in every thousand."""
    yield "order_id,customer_id,placed_at,total,currency,sku,category,quantity,unit_price\n"
    for n in range(orders):
        total = "-1.00" if n % 1000 == 999 else f"{20 + n % 80}.00"
        placed = f"2025-{1 + n % 12:02d}-{1 + n % 28:02d}T10:{n % 60:02d}:00Z"
        for sku in ("A", "B"):
            yield f"g-{n},gc-{n % 20000},{placed},{total},USD,{sku}-{n % 50},cat,1,10.00\n"


def _shop_lines(orders: int) -> Iterator[str]:
    """A generated shop export: two line items per order, some partly refunded, some pending (skipped)."""
    yield SHOP_HEADER
    blank = ",,,,,,,,,,,,,,"
    for n in range(orders):
        status = "pending" if n % 500 == 0 else ("partially_refunded" if n % 10 == 0 else "paid")
        refunded = "5.00" if status == "partially_refunded" else "0.00"
        paid = "" if status == "pending" else f"2025-03-{1 + n % 28:02d} 10:00:00 +0000"
        yield (
            f"#{n},s{n % 20000}@example.com,{status},{paid},,,no,USD,60.00,5.00,4.80,69.80,,0.00,Standard,"
            f"2025-03-{1 + n % 28:02d} 09:59:00 +0000,1,Shirt,30.00,,TOP-{n % 40},true,true,,Name,{refunded},,"
            f"Card,{n}\n"
        )
        yield f"#{n},s{n % 20000}@example.com{blank},1,Belt,30.00,,ACC-{n % 40},true,true,,,,,,\n"


@pytest.mark.slow
async def test_a_hundred_thousand_orders_in_each_format(engine, session_maker) -> None:
    rejects = io.StringIO()
    generic = await import_orders(engine, _generic_lines(100_000), rejects=rejects)
    assert generic.imported == 99_900
    assert generic.rejected == 100
    assert len(rejected_rows(rejects)) == 200  # both rows of each bad order, with the reason
    again = await import_orders(engine, _generic_lines(100_000), rejects=io.StringIO())
    assert (again.imported, again.duplicates) == (0, 99_900)

    shop = await import_orders(engine, _shop_lines(100_000), file_format="shop-export", rejects=io.StringIO())
    assert shop.imported == 99_800
    assert shop.skipped == 200
    assert shop.refunds == 100_000 // 10 - 100_000 // 500  # every tenth order, less the pending ones (every 500th)
    shop_again = await import_orders(engine, _shop_lines(100_000), file_format="shop-export")
    assert shop_again.imported == 0
    assert await count(session_maker, Order) == 99_900 + 99_800
