"""The importer's fast validation accepts only what ``OrderCreate`` accepts, with the same values and hash."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from loyalty.activity.importer import _fast_order
from loyalty.activity.schemas import OrderCreate, order_content_hash


def raw_order(**overrides: Any) -> dict[str, Any]:
    """An order as the generic CSV layout hands it to validation: every cell a string."""
    body: dict[str, Any] = {
        "order_id": "o-1",
        "customer_id": "c-1",
        "placed_at": "2024-03-01T10:15:00+01:00",
        "total": "129.90",
        "currency": "USD",
        "items": [{"sku": "SKU-1", "category": "shoes", "quantity": "2", "unit_price": "64.95"}],
    }
    body.update(overrides)
    return body


def raw_item(**overrides: Any) -> dict[str, Any]:
    return {"sku": "A", "category": None, "quantity": "1", "unit_price": "1.00", **overrides}


def assert_agrees_with_schema(raw: dict[str, Any]) -> bool:
    """Fast path and schema agree; answers whether the fast path took the order."""
    fast = _fast_order(raw)
    try:
        model: OrderCreate | None = OrderCreate.model_validate(raw)
    except ValidationError:
        model = None
    if fast is None:
        return False
    assert model is not None, f"the fast path accepted what the schema refuses: {raw}"
    for name in ("order_id", "customer_id", "placed_at", "total", "currency", "channel"):
        assert getattr(fast, name) == getattr(model, name), name
    assert fast.placed_at.tzinfo == model.placed_at.tzinfo
    assert [(i.sku, i.category, i.quantity, i.unit_price) for i in fast.items] == [
        (i.sku, i.category, i.quantity, i.unit_price) for i in model.items
    ]
    assert order_content_hash(fast) == model.content_hash()
    return True


PLAIN = [
    raw_order(),
    raw_order(placed_at="2024-03-01T10:15:00Z"),
    raw_order(placed_at="2024-03-01T10:15:00.5-05:30"),
    raw_order(placed_at="1969-12-31T23:59:59-01:00"),
    raw_order(placed_at=datetime(2024, 3, 5, 14, 3, 21, tzinfo=timezone(timedelta(hours=-5)))),
    raw_order(total="0", items=[]),
    raw_order(total="1000000000"),
    raw_order(currency="usd", channel="web"),
    raw_order(order_id="x" * 255, customer_id='ünïcödé "quoted" \\'),
    raw_order(items=[raw_item(quantity="1000000"), raw_item(category="tops", sku="B")]),
    raw_order(items=[{"sku": "A", "quantity": "3", "unit_price": "2"}]),
]


@pytest.mark.parametrize("raw", PLAIN)
def test_plain_orders_take_the_fast_path_with_the_schemas_values(raw: dict[str, Any]) -> None:
    assert assert_agrees_with_schema(raw)


@pytest.mark.parametrize(
    "raw",
    [
        *(
            raw_order(placed_at=value)
            for value in [
                "2024-03-01T10:15:00.1234567Z",
                "2024-03-01 10:15:00+01:00",
                "2024-03-01T10:15+01:00",
                "2024-03-01T10:15:00+0100",
                "2024-02-30T10:15:00Z",
                "2024-03-01T24:00:00Z",
                "2024-03-01T10:15:60Z",
                "2024-03-01T10:15:00",
                "2024-03-01T10:15:00+24:00",
                "2024-03-01t10:15:00z",
                "9999-01-01T00:00:00Z",
                "1969-12-31T23:59:59Z",
                "0000-01-01T00:00:00Z",
                "",
                datetime(2024, 3, 1, 10, 15),
            ]
        ),
        *(
            raw_order(total=value)
            for value in ["1.505", "-1", "-0", "1e3", "NaN", "Infinity", " 2 ", "1000000000.01", "", "abc", "1,50"]
        ),
        *(raw_order(currency=value) for value in ["EUR", "", "US"]),
        *(raw_order(order_id=value) for value in ["", "x" * 256, "a\tb", "a\x7fb"]),
        *(raw_order(customer_id=value) for value in ["", "c\n1"]),
        *(raw_order(channel=value) for value in ["", "x" * 256, "w\x00b"]),
        *(
            raw_order(items=[raw_item(quantity=value)])
            for value in ["0", "01", "1000001", "1.0", " 1", "+1", "-1", "", "١"]
        ),
        *(raw_order(items=[raw_item(unit_price=value)]) for value in ["-1.00", "1.001", "", "x"]),
        *(raw_order(items=[raw_item(sku=value)]) for value in ["", "x" * 256, "a\rb"]),
        raw_order(items=[raw_item(category="")]),
        raw_order(items=[raw_item()] * 1001),
        raw_order(unexpected="1"),
    ],
)
def test_everything_else_agrees_with_the_schema(raw: dict[str, Any]) -> None:
    assert_agrees_with_schema(raw)


def test_what_the_schema_refuses_never_takes_the_fast_path() -> None:
    refused = [raw_order(total="-1"), raw_order(placed_at="2024-03-01T10:15:00"), raw_order(currency="EUR")]
    for raw in refused:
        with pytest.raises(ValidationError):
            OrderCreate.model_validate(raw)
        assert _fast_order(raw) is None
