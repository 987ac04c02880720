"""Money parsing: decimal strings only, exact, within bounds, in the currency's precision."""

from __future__ import annotations

from decimal import Decimal

import pytest

from loyalty.lib.money import format_money, from_storage, parse_money, to_storage


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("129.90", Decimal("129.90")), ("0", Decimal(0)), (12, Decimal(12)), (" 5.5 ", Decimal("5.5"))],
)
def test_accepted(raw: object, expected: Decimal) -> None:
    assert parse_money(raw) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (1.5, "decimal string"),
        (True, "decimal string"),
        ("abc", "not a decimal"),
        ("NaN", "finite"),
        ("Infinity", "finite"),
        ("-0.01", "negative"),
        ("1e308", "exceed"),
        ("0.001", "decimal places"),
        (None, "decimal string"),
        # Once a decimal.Overflow (a 500), a silent rounding to 1.00, and a silent zero.
        ("1e999999999", "exceed"),
        ("1.00000000000000000000000000001", "decimal places"),
        ("1e-999999999", "decimal places"),
    ],
)
def test_refused(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_money(raw)


def test_storage_round_trip_is_exact() -> None:
    for text in ("0.01", "129.90", "999999999999.99"):
        amount = Decimal(text)
        assert from_storage(to_storage(amount)) == amount
    assert format_money(Decimal("5")) == "5.00"
