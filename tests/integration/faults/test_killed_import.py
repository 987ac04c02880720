"""`loyalty import orders` killed (SIGKILL) part-way through a large file, then run again on the same file.

The import commits one batch per transaction, in file order: the kill leaves whole batches, the first ones of the
file, and nothing of the batch it was writing. The re-run imports the rest and reports the rows already stored as
duplicates; at the end every order of the file is stored exactly once, with exactly its items.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from loyalty.db.models import Customer, Order, OrderItem
from loyalty.db.session import read_only
from tests.support import loyalty_command, loyalty_environment, run_to_completion, wait_for

pytestmark = pytest.mark.slow

ORDERS = 8000
BATCH = 400
CUSTOMERS = 3000


def _items(number: int) -> int:
    return 1 + number % 3


def _write_file(path: Path) -> list[str]:
    """A generic order file, one to three item rows per order; answers the order ids in file order."""
    ids = []
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("order_id,customer_id,placed_at,total,currency,sku,category,quantity,unit_price\n")
        for number in range(ORDERS):
            order_id = f"imp-{number}"
            ids.append(order_id)
            placed = f"2025-{1 + number % 12:02d}-{1 + number % 28:02d}T10:{number % 60:02d}:00Z"
            total = f"{10 * _items(number)}.00"
            for line in range(_items(number)):
                out.write(f"{order_id},cust-{number % CUSTOMERS},{placed},{total},USD,SKU-{line},tops,1,10.00\n")
    return ids


async def _stored(session_maker: Any) -> dict[str, int]:
    """Each stored order with its number of items."""
    async with read_only(session_maker)() as session:
        rows = await session.execute(
            select(Order.external_id, func.count(OrderItem.order_id))
            .outerjoin(OrderItem, OrderItem.order_id == Order.id)
            .group_by(Order.external_id)
        )
        return dict(rows.all())


async def _count(session_maker: Any, model: Any) -> int:
    # Read-only: on SQLite it reads a snapshot and never queues behind the import's write transaction.
    async with read_only(session_maker)() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


def _summary(output: str) -> dict[str, int]:
    """The figures the command prints, e.g. ``  duplicates (already stored)       1,000``."""
    figures = {}
    for line in output.splitlines():
        label, _, value = line.strip().rpartition(" ")
        if label and value.replace(",", "").isdigit():
            figures[label.strip()] = int(value.replace(",", ""))
    return figures


async def test_an_import_killed_part_way_is_completed_by_running_it_again(settings, engine, session_maker, tmp_path):
    path = tmp_path / "orders.csv"
    ids = _write_file(path)
    expected = {order_id: _items(number) for number, order_id in enumerate(ids)}
    environment = loyalty_environment(settings)
    arguments = ["import", "orders", str(path), "--batch-size", str(BATCH)]
    log = tmp_path / "import.log"

    with loyalty_command(arguments, environment, log) as first:

        async def batches_landing() -> bool:
            return await _count(session_maker, Order) >= 2 * BATCH

        await wait_for(batches_landing, "the first batches to be stored", within=120, every=0.02, watched=first)
        first.kill()

    stored = await _stored(session_maker)
    assert len(stored) < ORDERS, "the import finished before it could be killed; use a larger file"
    # Whole batches, the first of the file, each order with all its items: the batch being written left nothing.
    assert len(stored) % BATCH == 0
    assert stored == {order_id: expected[order_id] for order_id in ids[: len(stored)]}
    already = len(stored)

    output = await run_to_completion(arguments, environment, log, within=300)
    figures = _summary(output)
    assert figures["rows read"] == sum(expected.values())
    assert figures["orders imported"] == ORDERS - already
    assert figures["duplicates (already stored)"] == already
    assert (figures["skipped"], figures["rejected"]) == (0, 0)
    assert figures["customers created"] == CUSTOMERS - len({number % CUSTOMERS for number in range(already)})

    # Every order of the file exactly once, with exactly its items; every customer once.
    assert await _stored(session_maker) == expected
    assert await _count(session_maker, OrderItem) == sum(expected.values())
    assert await _count(session_maker, Customer) == CUSTOMERS
