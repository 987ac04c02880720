"""The fast order content hash equals the schema's own, so batches, imports and single posts recognise each other."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from loyalty.activity.schemas import OrderCreate, order_content_hash

TEXTS = ["plain", 'with "quotes"', "back\\slash", "ünïcödé", "emoji 🛒", "tab-free/slash", "x" * 255, "<&>", "\u2028"]


def order(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "order_id": "o-1",
        "customer_id": "c-1",
        "placed_at": "2026-03-01T10:15:00+01:00",
        "total": "129.90",
        "currency": "usd",
        "items": [{"sku": "SKU-1", "category": "shoes", "quantity": 2, "unit_price": "64.95"}],
        "channel": "web",
    }
    body.update(overrides)
    return body


def assert_same_hash(body: dict[str, Any]) -> None:
    model = OrderCreate.model_validate(body)
    assert order_content_hash(model) == model.content_hash(), body


@pytest.mark.parametrize(("field", "text"), list(itertools.product(["order_id", "customer_id", "channel"], TEXTS)))
def test_every_text_field_escapes_as_json_dumps(field: str, text: str) -> None:
    assert_same_hash(order(**{field: text}))


@pytest.mark.parametrize(("field", "text"), list(itertools.product(["sku", "category"], TEXTS)))
def test_item_texts_escape_as_json_dumps(field: str, text: str) -> None:
    item = {"sku": "A", "category": None, "quantity": 1, "unit_price": "1.00", field: text}
    assert_same_hash(order(items=[item]))


@pytest.mark.parametrize(
    "placed_at",
    [
        "2026-03-01T10:15:00+01:00",
        "2026-03-01T10:15:00Z",
        "2026-03-01T10:15:00.5-07:30",
        "2026-03-01T10:15:00.000001Z",
        "2026-03-01T10:15:00.000000+00:00",
        "1970-01-01T00:00:00Z",
        "2026-03-01 10:15+05:45",
        datetime(2026, 3, 1, 10, 15, 0, 123456, tzinfo=timezone(timedelta(hours=-3))),
        datetime(2026, 3, 1, 10, 15, tzinfo=UTC),
    ],
)
def test_times_are_written_as_pydantic_writes_them(placed_at: Any) -> None:
    assert_same_hash(order(placed_at=placed_at))


@pytest.mark.parametrize("amount", ["0", "0.00", "-0", "129.9", "129.90", "1000000000", "5", " 7.10 ", 12])
def test_money_is_written_in_the_api_form(amount: Any) -> None:
    assert_same_hash(order(total=amount, items=[{"sku": "A", "quantity": 1_000_000, "unit_price": amount}]))


@pytest.mark.parametrize(
    "overrides",
    [
        {"items": []},
        {"channel": None},
        {"items": [{"sku": "A", "quantity": 1, "unit_price": "1"}] * 3},
        {"currency": "USD"},
    ],
)
def test_optional_parts(overrides: dict[str, Any]) -> None:
    assert_same_hash(order(**overrides))


def test_the_hash_covers_every_field_of_the_schema() -> None:
    # A field added to the schema changes content_hash at once; this fails until order_content_hash writes it too.
    assert set(OrderCreate.model_fields) == {
        "order_id",
        "customer_id",
        "placed_at",
        "total",
        "currency",
        "items",
        "channel",
    }
    body = order()
    body.pop("channel")
    assert_same_hash(body)
