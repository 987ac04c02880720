"""Money: decimals in the store currency, parsed strictly and stored as integer ten-thousandths."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from loyalty.settings import get_settings

# Stored scale: four decimal places covers every ISO 4217 minor unit (at most three) with exact integers,
# and integer sums are exact and fast on both SQLite (which has no decimal type) and PostgreSQL.
STORAGE_SCALE = 4
STORAGE_FACTOR = 10**STORAGE_SCALE
# Far above any real order, far below the 64-bit limit of the stored integer.
MAX_AMOUNT = Decimal("1000000000")


def parse_money(value: Any) -> Decimal:
    """Accept a decimal string (or an integer); refuse floats, which have already lost precision."""
    if isinstance(value, bool | float):
        raise ValueError('must be a decimal string such as "129.90", not a JSON number with a fraction')
    if isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f'"{value[:40]}" is not a decimal amount') from None
    elif isinstance(value, Decimal):
        amount = value
    else:
        raise ValueError('must be a decimal string such as "129.90"')
    if not amount.is_finite():
        raise ValueError("must be a finite amount")
    # Only exact comparisons until the amount is known to be in range and precise enough: arithmetic rounds to the
    # context's 28 digits (1.000...0001 became 1.00) and overflows on a huge exponent (1e999999999 was a 500).
    if amount < 0:
        raise ValueError("must not be negative")
    if amount > MAX_AMOUNT:
        raise ValueError(f"must not exceed {MAX_AMOUNT}")
    exponent = get_settings().currency_exponent
    if amount != amount.quantize(Decimal(1).scaleb(-exponent)):
        raise ValueError(f"has more than {exponent} decimal places for {get_settings().currency}")
    return amount + 0  # "-0" is zero, and should read as "0.00"


def format_money(amount: Decimal) -> str:
    """The API form: a string with the currency's decimal places."""
    return str(amount.quantize(Decimal(1).scaleb(-get_settings().currency_exponent)))


def to_storage(amount: Decimal) -> int:
    return int(amount.scaleb(STORAGE_SCALE))


def from_storage(value: int) -> Decimal:
    return Decimal(value).scaleb(-STORAGE_SCALE)


Money = Annotated[
    Decimal,
    BeforeValidator(parse_money),
    PlainSerializer(format_money, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^\d+(\.\d+)?$", "examples": ["129.90"]}),
]
