"""Money arithmetic, as properties: parsing never changes an amount, text and storage round trips are exact.

The oracle is exact rational arithmetic (``Fraction``), never ``Decimal`` with its 28-digit context, so a rounding
or an overflow inside the code cannot hide behind the same rounding in the test. Run for a currency with 2, 0 and 3
decimal places.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from loyalty.lib.money import MAX_AMOUNT, STORAGE_FACTOR, format_money, from_storage, parse_money, to_storage
from loyalty.settings import get_settings

MAX = Fraction(MAX_AMOUNT)
# Derandomized: the same examples on every run, so CI cannot flake; raise max_examples for a longer search.
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)

# Finite decimals of every size and precision, including more significant digits than Decimal's default context
# keeps (28) and exponents far outside the money range.
DECIMALS = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False),
    st.builds(
        lambda mantissa, exponent: Decimal(mantissa).scaleb(exponent),
        st.integers(-(10**40), 10**40),
        st.integers(-45, 12),
    ),
)
# Text that looks like a number, in every notation Decimal reads, with exponents up to twelve digits long.
NUMERIC_TEXT = st.from_regex(r"\A\s?[+-]?(\d{1,40}(\.\d{0,40})?|\.\d{1,40})([eE][+-]?\d{1,12})?\s?\Z")
NOT_FINITE = st.sampled_from(["NaN", "nan", "-NaN", "sNaN", "-sNaN", "Infinity", "-Infinity", "inf", "-inf", "+Inf"])


@pytest.fixture(scope="module", params=["USD", "JPY", "KWD"])
def places(request: pytest.FixtureRequest) -> Iterator[int]:
    """The store currency for the module's tests; yields its number of decimal places (2, 0, 3)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOYALTY_CURRENCY", request.param)
        get_settings.cache_clear()
        yield get_settings().currency_exponent
    get_settings.cache_clear()


def acceptable(amount: Fraction, places: int) -> bool:
    """What the API promises to take: from zero to the maximum, in whole minor units of the currency."""
    return 0 <= amount <= MAX and (amount * 10**places).denominator == 1


def exact(value: Decimal, places: int) -> Fraction | None:
    """The value as a fraction, or None when it cannot be an amount: nonzero and beyond the maximum, or nonzero
    and below the smallest minor unit (its exponent may have nine digits: no big integer is made for those)."""
    _sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    if not any(digits):
        return Fraction(0)
    if exponent > 12 or len(digits) + exponent <= -places:
        return None
    return Fraction(value)


def amounts(places: int) -> st.SearchStrategy[Decimal]:
    minor_units = int(MAX_AMOUNT) * 10**places
    return st.integers(0, minor_units).map(lambda units: Decimal(units).scaleb(-places))


@PROPERTY
@given(value=DECIMALS, notation=st.sampled_from(["{}", "{:f}", "{:e}", " {} "]))
@example(value=Decimal("1.00000000000000000000000000001"), notation="{}")  # once rounded to 1.00
@example(value=Decimal("1e999999999"), notation="{}")  # once a decimal.Overflow, i.e. a 500
@example(value=Decimal("1e-999999999"), notation="{}")  # once silently zero
@example(value=Decimal("-0"), notation="{}")
def test_parsing_never_changes_an_amount(places: int, value: Decimal, notation: str) -> None:
    """An amount is taken exactly as written, or refused with a ValueError: never rounded, never clamped."""
    text = notation.format(value)
    expected = exact(value, places)
    takes = expected is not None and acceptable(expected, places)
    try:
        parsed = parse_money(text)
    except ValueError:
        assert not takes, f"{text!r} refused"
        return
    assert takes, f"{text!r} taken as {parsed!r}"
    assert Fraction(parsed) == expected


@PROPERTY
@given(raw=st.one_of(st.text(), NUMERIC_TEXT, NOT_FINITE, st.integers(), st.floats(), st.booleans(), st.none()))
def test_anything_else_is_a_value_error(places: int, raw: object) -> None:
    """Whatever arrives in a JSON field, the answer is an amount or a ValueError (a 422 naming the field)."""
    try:
        parsed = parse_money(raw)
    except ValueError:
        return
    assert not isinstance(raw, bool | float)
    assert acceptable(Fraction(parsed), places)


@PROPERTY
@given(raw=st.one_of(NOT_FINITE, st.floats(), st.booleans()))
def test_floats_and_non_finite_amounts_are_refused(places: int, raw: object) -> None:
    """A JSON number with a fraction has already lost precision; NaN and infinities are not amounts."""
    with pytest.raises(ValueError, match=r"decimal string|finite"):
        parse_money(raw)


@PROPERTY
@given(whole=st.integers(0, int(MAX_AMOUNT) - 1), beyond=st.integers(1, 40), data=st.data())
def test_a_fraction_of_the_minor_unit_is_refused(places: int, whole: int, beyond: int, data: st.DataObject) -> None:
    """ "0.001" dollars is refused, not rounded, however far down the digit is (40 places is past Decimal's 28)."""
    digits = places + beyond
    fraction = data.draw(st.integers(1, 10**digits - 1).filter(lambda value: value % 10**beyond != 0))
    with pytest.raises(ValueError, match="decimal places"):
        parse_money(f"{whole}.{fraction:0{digits}d}")


@PROPERTY
@given(data=st.data())
def test_text_round_trip(places: int, data: st.DataObject) -> None:
    """The API form reads back as the same amount, and is plain digits with exactly the currency's decimals."""
    amount = data.draw(amounts(places))
    text = format_money(amount)
    assert re.fullmatch(r"\d+" + (rf"\.\d{{{places}}}" if places else ""), text), text
    assert parse_money(text) == amount
    assert format_money(parse_money(text)) == text


@PROPERTY
@given(text=NUMERIC_TEXT)
def test_every_accepted_notation_is_written_back_plainly(places: int, text: str) -> None:
    """ "1E+2", " 5.5 " and "+.50" are read; the answer is always written "100.00", never in exponent notation."""
    try:
        amount = parse_money(text)
    except ValueError:
        return
    written = format_money(amount)
    assert re.fullmatch(r"\d+" + (rf"\.\d{{{places}}}" if places else ""), written), (text, written)
    assert Fraction(written) == Fraction(amount)


@PROPERTY
@given(value=st.one_of(DECIMALS, NUMERIC_TEXT))
def test_storage_round_trip_is_exact(places: int, value: Decimal | str) -> None:
    """Every amount the API takes is stored as a whole number of ten-thousandths and read back unchanged."""
    try:
        amount = parse_money(str(value))
    except ValueError:
        return
    stored = to_storage(amount)
    assert isinstance(stored, int)
    assert Fraction(stored) == Fraction(amount) * STORAGE_FACTOR
    assert from_storage(stored) == amount


@PROPERTY
@given(data=st.data())
def test_sums_in_storage_are_exact(places: int, data: st.DataObject) -> None:
    """Totals summed as stored integers (as both databases sum them) are the exact sum, however many amounts there
    are; float arithmetic would drift (0.10 + 0.20)."""
    orders = data.draw(st.lists(amounts(places), max_size=300))
    stored_sum = sum(to_storage(amount) for amount in orders)
    assert Fraction(from_storage(stored_sum)) == sum((Fraction(amount) for amount in orders), Fraction(0))
    refunded = data.draw(st.lists(amounts(places), max_size=30))
    stored_refunds = sum(to_storage(amount) for amount in refunded)
    net = from_storage(stored_sum - stored_refunds)
    assert Fraction(net) == sum(map(Fraction, orders), Fraction(0)) - sum(map(Fraction, refunded), Fraction(0))
