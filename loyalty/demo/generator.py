"""A realistic shop history, simulated with numpy and written in bulk, so a new user sees meaningful tiers at once.

Purchases follow the buy-till-you-die story the scoring assumes (BG/NBD: each customer buys at a Poisson rate
drawn from a Gamma distribution and, after each repeat purchase, drops out with a probability drawn from a Beta
distribution); spend per order follows a Gamma-Gamma-like structure (a log-normal spending level per customer,
Gamma noise per order). Customers are generated and written chunk by chunk, so memory stays bounded however
many are asked for. Every table is written with bulk statements (``executemany`` on SQLite, ``COPY`` on
PostgreSQL) inside one transaction, so a failed load leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Table, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from loyalty.db.base import Base
from loyalty.db.models import Customer, InteractionEvent, Order, OrderItem, Referral, Refund
from loyalty.db.models.activity import EVENT_TYPES
from loyalty.db.staging import EPOCH, stored_instants, write_rows
from loyalty.db.statistics import analyze_after_load
from loyalty.lib.clock import utcnow
from loyalty.lib.money import STORAGE_SCALE
from loyalty.settings import get_settings

Floats: TypeAlias = NDArray[np.float64]
Ints: TypeAlias = NDArray[np.int64]
Indices: TypeAlias = NDArray[np.intp]
Flags: TypeAlias = NDArray[np.bool_]
Row: TypeAlias = tuple[Any, ...]
Progress: TypeAlias = Callable[[str, int, int], None]

STAGE_CUSTOMERS = "customers"
STAGE_REFERRALS = "referrals"

CUSTOMER, ORDER, ORDER_ITEM, REFUND, EVENT, REFERRAL = (
    Base.metadata.tables[model.__tablename__]
    for model in (Customer, Order, OrderItem, Refund, InteractionEvent, Referral)
)
TABLES = (CUSTOMER, ORDER, ORDER_ITEM, REFUND, EVENT, REFERRAL)

FIRST_CUSTOMER_ID = "demo-000001"
CUSTOMERS_PER_CHUNK = 20_000

MICROS_PER_DAY = 86_400_000_000
HOUR = 1 / 24
MINUTE = 1 / 1440
HISTORY_DAYS = 3 * 365.0
# Sign-ups grow over the history (e times as many in the last month as in the first), as in a growing shop.
SIGNUP_GROWTH = 1.0
PROSPECT_SHARE = 0.2
OPT_OUT_SHARE = 0.05

# BG/NBD population: mean rate r/alpha ≈ 2.3 purchases a year with a long right tail (a few heavy buyers) and a
# mean dropout a/(a+b) ≈ 0.24 per repeat purchase (many lapse after a few orders). With about a year and a half
# since the typical first purchase, (alpha / (alpha + T)) ** r ≈ 55% of buyers never buy a second time.
PURCHASE_RATE_SHAPE = 0.25
PURCHASE_RATE_SCALE_DAYS = 40.0
DROPOUT_A = 0.8
DROPOUT_B = 2.5
# One improbable draw (a huge rate and no dropout) would otherwise give a single customer thousands of orders.
MAX_ORDERS_PER_CUSTOMER = 400
# Share of buyers whose first order comes minutes after signing up; the others take days to weeks.
IMMEDIATE_BUYER_SHARE = 0.4
FIRST_PURCHASE_DELAY_DAYS = 21.0

TYPICAL_ORDER_VALUE = 70.0
MINIMUM_ORDER_VALUE = 5.0
SPENDING_LEVEL_SIGMA = 0.55
ORDER_VALUE_SHAPE = 4.0
MAX_LINES_PER_ORDER = 5
DISCOUNTED_ORDER_SHARE = 0.45
REFUNDED_ORDER_SHARE = 0.05
FULL_REFUND_SHARE = 0.4
SECOND_REFUND_SHARE = 0.2

REFERRER_SHARE = 0.04
REFERRED_SHARE = 0.1
# Pareto tail index of a referrer's pull: below 2, so a handful of referrers bring a large share of referees.
REFERRER_TAIL = 1.6
# Referrers recruit mostly in their first months; without this fading the earliest strong referrer would claim
# most referees of a small demo.
REFERRER_FADING_DAYS = 180.0
# People who never bought recommend the shop less convincingly.
PROSPECT_REFERRER_PULL = 0.25
IMMEDIATE_REFERRAL_SHARE = 0.3

COUNTRIES = ("US", "GB", "DE", "FR", "CA", "AU", "NL", "ES", "IT", "SE", "JP", "BR")
COUNTRY_WEIGHTS = (0.38, 0.12, 0.10, 0.07, 0.07, 0.05, 0.04, 0.04, 0.04, 0.03, 0.03, 0.03)
DEVICES = ("mobile", "desktop", "tablet")
DEVICE_WEIGHTS = (0.58, 0.33, 0.09)
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_BAND_WEIGHTS = (0.14, 0.30, 0.24, 0.16, 0.10, 0.06)
# Relative spending level by age band, so segment reports show differences worth looking at.
AGE_BAND_SPEND = (0.7, 0.95, 1.15, 1.2, 1.05, 0.9)

CHANNELS = ("web", "app", "store")
# Channel mix by device (rows follow DEVICES): phone owners use the app, desktop users the web shop.
CHANNEL_WEIGHTS_BY_DEVICE = ((0.40, 0.50, 0.10), (0.82, 0.03, 0.15), (0.55, 0.35, 0.10))

# Category, SKU prefix, popularity and typical unit price (at TYPICAL_ORDER_VALUE's price level).
CATALOGUE = (
    ("tops", "TOP", 0.22, 35.0),
    ("bottoms", "BTM", 0.14, 55.0),
    ("shoes", "SHO", 0.14, 85.0),
    ("accessories", "ACC", 0.16, 25.0),
    ("outerwear", "OUT", 0.08, 140.0),
    ("dresses", "DRS", 0.09, 70.0),
    ("bags", "BAG", 0.07, 60.0),
    ("sportswear", "SPT", 0.10, 45.0),
)
CATEGORIES = tuple(name for name, *_ in CATALOGUE)
SKUS_PER_CATEGORY = 15
SKUS = tuple(f"{prefix}-{100 + rank}" for _name, prefix, *_ in CATALOGUE for rank in range(SKUS_PER_CATEGORY))
# Within a category a few products sell most (Zipf-like).
SKU_POPULARITY = tuple(1.0 / (rank + 1) ** 1.1 for rank in range(SKUS_PER_CATEGORY))
# How far a unit price may stray from its category's typical price and still plausibly belong to it.
CATEGORY_PRICE_SIGMA = 0.7
QUANTITIES = (1, 2, 3)
QUANTITY_WEIGHTS = (0.86, 0.10, 0.04)

PAGE_TARGETS = (
    "page:/",
    "page:/new-in",
    "page:/sale",
    "page:/lookbook",
    "page:/stores",
    "page:/help/returns",
    *(f"page:/category/{name}" for name in CATEGORIES),
)
PRODUCT_TARGETS = tuple(f"product:{sku}" for sku in SKUS)
AD_TARGETS = (
    "ad:brand-search",
    "ad:retargeting",
    "ad:spring-sale",
    "ad:summer-launch",
    "ad:black-friday",
    "ad:influencer-collab",
)
EMAIL_TARGETS = ("page:/campaign/weekly-picks", "page:/campaign/back-in-stock", "page:/campaign/new-season")
TARGETS = PAGE_TARGETS + PRODUCT_TARGETS + AD_TARGETS + EMAIL_TARGETS
PRODUCT_TARGET_OFFSET = len(PAGE_TARGETS)
AD_TARGET_OFFSET = PRODUCT_TARGET_OFFSET + len(PRODUCT_TARGETS)
EMAIL_TARGET_OFFSET = AD_TARGET_OFFSET + len(AD_TARGETS)

PAGE_VIEW, PRODUCT_VIEW, AD_CLICK, EMAIL_CLICK, REVIEW, SOCIAL_SHARE = (
    EVENT_TYPES.index(name)
    for name in ("page_view", "product_view", "ad_click", "email_click", "review", "social_share")
)
# Browsing happens any time a customer is around; "purchase drivers" are the touches just before an order.
BROWSING_TYPES = (PAGE_VIEW, PRODUCT_VIEW, AD_CLICK, EMAIL_CLICK)
BROWSING_TYPE_WEIGHTS = (0.55, 0.33, 0.07, 0.05)
DRIVER_TYPE_WEIGHTS = (0.14, 0.50, 0.22, 0.14)
PROSPECT_BROWSING = 2.0
BUYER_BROWSING = 2.0
BROWSING_PER_ORDER = 1.0
MAX_BROWSING_EVENTS = 300
DRIVERS_PER_ORDER = 1.5
DRIVER_LEAD_DAYS = 1.5
REVIEWED_ORDER_SHARE = 0.04
REVIEW_DELAY_DAYS = 12.0
BASE_SHARES = 0.03
SHARED_PAGE_SHARE = 0.3
# The customers with the most referral pull are the ones who share the most.
SHARES_PER_REFERRER_PULL = 0.15
MAX_SHARING_PULL = 200.0
# Lapsed buyers keep browsing a while after their last order; prospects for a while after signing up.
LAPSED_BROWSING_DAYS = 45.0
PROSPECT_BROWSING_DAYS = 60.0


@dataclass(frozen=True)
class DemoSummary:
    """Rows written by one demo load and how long it took."""

    customers: int
    orders: int
    order_items: int
    refunds: int
    events: int
    referrals: int
    seconds: float

    @property
    def rows(self) -> int:
        return self.customers + self.orders + self.order_items + self.refunds + self.events + self.referrals


async def load_demo(
    engine: AsyncEngine,
    *,
    customers: int = 5000,
    seed: int = 7,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> DemoSummary:
    """Write ``customers`` demo customers with their orders, refunds, events and referrals, all at or before ``now``.

    The same seed gives the same data. ``progress(stage, done, total)`` is called after each chunk of customers
    and once for the referrals. Raises ``ValueError`` (and writes nothing) when demo data is already loaded.
    """
    if customers < 1:
        raise ValueError("customers must be at least 1")
    now = utcnow() if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    started = time.perf_counter()
    now_micros = (now - EPOCH) // timedelta(microseconds=1)
    settings = get_settings()
    money = _Money(settings.currency, settings.currency_exponent)
    population = _population(np.random.default_rng([seed, 0]), customers)
    chunks = [
        slice(start, min(start + CUSTOMERS_PER_CHUNK, customers)) for start in range(0, customers, CUSTOMERS_PER_CHUNK)
    ]
    async with engine.begin() as connection:
        postgres = connection.dialect.name == "postgresql"
        await _lock_tables(connection, postgres)
        if await connection.scalar(select(Customer.id).where(Customer.external_id == FIRST_CUSTOMER_ID)) is not None:
            raise ValueError(f"demo data already loaded: customer {FIRST_CUSTOMER_ID!r} exists")
        cursors = await _cursors(connection)
        first_customer_id = cursors[CUSTOMER].next_id
        encoding = _Encoding(postgres, now_micros)
        if progress:
            progress(STAGE_CUSTOMERS, 0, customers)
        for number, chunk in enumerate(chunks, start=1):
            # One generator per chunk, so a chunk's data depends only on the seed and its position.
            rng = np.random.default_rng([seed, number])
            for rows in _generate_chunk(rng, population, chunk, cursors, money, encoding):
                await _write(connection, rows)
            if progress:
                progress(STAGE_CUSTOMERS, chunk.stop, customers)
        referrals = _referrals(np.random.default_rng([seed, 0, 1]), population, first_customer_id, cursors, encoding)
        await _write(connection, referrals)
        if progress:
            progress(STAGE_REFERRALS, len(referrals.values), len(referrals.values))
        if postgres:
            await _advance_sequences(connection)
    await analyze_after_load(engine, (table.name for table in cursors))
    return DemoSummary(
        customers=cursors[CUSTOMER].written,
        orders=cursors[ORDER].written,
        order_items=cursors[ORDER_ITEM].written,
        refunds=cursors[REFUND].written,
        events=cursors[EVENT].written,
        referrals=cursors[REFERRAL].written,
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _Money:
    """Rounding to the store currency and conversion to the stored integer form (ten-thousandths)."""

    currency: str
    exponent: int

    @property
    def price_level(self) -> float:
        # Zero-decimal currencies (JPY, KRW, ...) have small units and three-decimal ones (KWD, BHD, ...) large
        # ones; shifting prices with the exponent keeps the amounts looking like prices in either.
        return float(10.0 ** (2 - self.exponent))

    def minor_units(self, amounts: Floats, minimum: int = 1) -> Ints:
        return np.maximum(np.rint(amounts * 10.0**self.exponent), minimum).astype(np.int64)

    def stored(self, minor_units: Ints) -> list[int]:
        scaled: list[int] = (minor_units * 10 ** (STORAGE_SCALE - self.exponent)).tolist()
        return scaled


@dataclass
class _Cursor:
    """Ids handed out for one table: the database id continues after the existing rows, the demo number from 1."""

    next_id: int
    written: int = 0

    def take(self, count: int) -> tuple[Ints, range]:
        ids = np.arange(self.next_id, self.next_id + count, dtype=np.int64)
        numbers = range(self.written + 1, self.written + count + 1)
        self.next_id += count
        self.written += count
        return ids, numbers


@dataclass(frozen=True)
class _Rows:
    """Rows for one table in storage form: explicit ids, money as integer ten-thousandths, driver timestamps."""

    table: Table
    columns: tuple[str, ...]
    values: list[Row]


class _Encoding:
    """Values in the form each driver takes for the service's column types."""

    def __init__(self, postgres: bool, now_micros: int) -> None:
        self.postgres = postgres
        self.now_micros = now_micros
        self.now = self.timestamps(np.array([now_micros], dtype=np.int64))[0]

    def timestamps(self, micros: Ints) -> list[Any]:
        """Instants (microseconds since the epoch) as a DateTimeUTC column stores them."""
        return stored_instants(self.postgres, micros)

    def instants(self, days: Floats) -> list[Any]:
        return self.timestamps(_instants(self.now_micros, days))


async def _write(connection: AsyncConnection, rows: _Rows) -> None:
    await write_rows(connection, rows.table.name, rows.columns, rows.values)


async def _lock_tables(connection: AsyncConnection, postgres: bool) -> None:
    """Keep other writers out until commit, because the ids are chosen here rather than by the database.

    On PostgreSQL, EXCLUSIVE mode still lets a running service read. On SQLite nothing is needed: every write
    transaction begins IMMEDIATE and so already holds the database's single write lock.
    """
    if postgres:
        await connection.execute(text(f"LOCK TABLE {', '.join(t.name for t in TABLES)} IN EXCLUSIVE MODE"))


async def _cursors(connection: AsyncConnection) -> dict[Table, _Cursor]:
    cursors: dict[Table, _Cursor] = {}
    for target in TABLES:
        highest = await connection.scalar(select(func.max(target.c.id)))
        cursors[target] = _Cursor(next_id=(highest or 0) + 1)
    return cursors


async def _advance_sequences(connection: AsyncConnection) -> None:
    """Move each id sequence past the rows written with explicit ids, so the service's next insert fits."""
    for target in TABLES:
        highest = select(func.max(target.c.id)).scalar_subquery()
        await connection.execute(select(func.setval(func.pg_get_serial_sequence(target.name, "id"), highest)))


def _instants(now_micros: int, days: Floats) -> Ints:
    """Days relative to now (<= 0) as microseconds since the epoch; rounding is monotonic, so order survives."""
    return now_micros + np.rint(days * MICROS_PER_DAY).astype(np.int64)


def _categorical(rng: np.random.Generator, weights: Sequence[float], size: int) -> Indices:
    probabilities = np.asarray(weights, dtype=np.float64)
    return rng.choice(probabilities.size, size=size, p=probabilities / probabilities.sum()).astype(np.intp)


def _sha256_hex(values: Sequence[str]) -> list[str]:
    return [hashlib.sha256(value.encode()).hexdigest() for value in values]


# ---------------------------------------------------------------- population and referrals


@dataclass(frozen=True)
class _Population:
    """What is decided for every customer up front; everything else is generated chunk by chunk from it."""

    joined: Floats  # days relative to now (<= 0), ascending, so demo numbers follow sign-up order
    prospect: Flags
    referrer_pull: Floats  # zero for the many who never refer anybody


def _population(rng: np.random.Generator, customers: int) -> _Population:
    # Inverse CDF of a sign-up density growing as exp(SIGNUP_GROWTH * t) over the history.
    position = np.log1p(rng.random(customers) * math.expm1(SIGNUP_GROWTH)) / SIGNUP_GROWTH
    joined = np.sort(-HISTORY_DAYS * (1.0 - position))
    prospect = rng.random(customers) < PROSPECT_SHARE
    refers = rng.random(customers) < REFERRER_SHARE
    pull = np.where(refers, rng.pareto(REFERRER_TAIL, customers) + 1.0, 0.0)
    pull = np.where(prospect, pull * PROSPECT_REFERRER_PULL, pull)
    return _Population(joined=joined, prospect=prospect, referrer_pull=pull)


def _referrals(
    rng: np.random.Generator,
    population: _Population,
    first_customer_id: int,
    cursors: dict[Table, _Cursor],
    encoding: _Encoding,
) -> _Rows:
    """Each referee gets one referrer, drawn among those who signed up earlier, by pull fading with time apart.

    Drawing only among earlier sign-ups makes the graph a forest: no cycles, no self-referral. The fading weight
    pull * exp((joined_referrer - joined_referee) / fading) factors into a per-referrer weight times a constant
    per referee, so one cumulative sum serves every draw.
    """
    joined = population.joined
    cumulative_weight = np.cumsum(population.referrer_pull * np.exp(joined / REFERRER_FADING_DAYS))
    weight_before = np.concatenate(([0.0], cumulative_weight[:-1]))
    referee = np.flatnonzero((rng.random(joined.size) < REFERRED_SHARE) & (weight_before > 0.0))
    drawn = rng.random(referee.size) * weight_before[referee]
    referrer = np.searchsorted(cumulative_weight, drawn, side="right")
    # The invitation comes shortly before the sign-up it leads to, never before the referrer's own sign-up.
    lead = np.minimum(rng.exponential(0.5, referee.size), joined[referee] - joined[referrer])
    lead[rng.random(referee.size) < IMMEDIATE_REFERRAL_SHARE] = 0.0
    ids, _numbers = cursors[REFERRAL].take(referee.size)
    values = list(
        zip(
            ids.tolist(),
            (referrer + first_customer_id).tolist(),
            (referee + first_customer_id).tolist(),
            encoding.instants(joined[referee] - lead),
            [encoding.now] * referee.size,
            strict=True,
        )
    )
    return _Rows(REFERRAL, ("id", "referrer_id", "referee_id", "occurred_at", "created_at"), values)


# ---------------------------------------------------------------- one chunk of customers


def _generate_chunk(
    rng: np.random.Generator,
    population: _Population,
    chunk: slice,
    cursors: dict[Table, _Cursor],
    money: _Money,
    encoding: _Encoding,
) -> list[_Rows]:
    """The rows of one chunk of customers for every table but referrals, parents before children."""
    joined = population.joined[chunk]
    prospect = population.prospect[chunk]
    device = _categorical(rng, DEVICE_WEIGHTS, joined.size)
    age_band = _categorical(rng, AGE_BAND_WEIGHTS, joined.size)
    customer_ids, customers = _customer_rows(rng, cursors[CUSTOMER], encoding, joined, device, age_band)

    buyers = np.flatnonzero(~prospect)
    buyer_of_order, order_day, dropped = _simulate_purchases(rng, _first_purchase_days(rng, joined[buyers]))
    order_customer = buyers[buyer_of_order]
    spending_level = (
        TYPICAL_ORDER_VALUE
        * money.price_level
        * np.asarray(AGE_BAND_SPEND)[age_band]
        * rng.lognormal(0.0, SPENDING_LEVEL_SIGMA, joined.size)
    )
    order_value = spending_level[order_customer] * rng.gamma(
        ORDER_VALUE_SHAPE, 1.0 / ORDER_VALUE_SHAPE, order_customer.size
    )
    smallest_total = money.minor_units(np.array([MINIMUM_ORDER_VALUE * money.price_level]))[0]
    total_minor = money.minor_units(order_value, minimum=int(smallest_total))
    placed = _instants(encoding.now_micros, order_day)
    refunds = _refunds(rng, placed, total_minor, encoding.now_micros)
    channel = _categorical_by_row(rng, CHANNEL_WEIGHTS_BY_DEVICE, device[order_customer])
    order_customer_ids = customer_ids[order_customer]
    order_ids, orders = _order_rows(
        cursors[ORDER], encoding, money, order_customer_ids, placed, total_minor, channel, refunds
    )
    lines = _order_lines(rng, total_minor, money)

    active_until = _active_until(rng, joined, prospect, buyers, buyer_of_order, order_day, dropped)
    events = _events(
        rng, joined, active_until, order_customer, order_day, lines.first_sku, population.referrer_pull[chunk]
    )
    return [
        customers,
        orders,
        _order_item_rows(cursors[ORDER_ITEM], money, order_ids, lines),
        _refund_rows(cursors[REFUND], encoding, money, order_ids, order_customer_ids, refunds),
        _event_rows(cursors[EVENT], encoding, customer_ids, events),
    ]


def _categorical_by_row(rng: np.random.Generator, weights: Sequence[Sequence[float]], rows: Indices) -> Indices:
    """One draw per entry of ``rows``, each from the categorical distribution in that row of ``weights``."""
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64), axis=1)
    # Dividing by the row total makes the last bound exactly 1.0, so a draw in [0, 1) never falls off the end.
    cumulative /= cumulative[:, -1:]
    picks: Indices = (rng.random(rows.size)[:, None] >= cumulative[rows]).sum(axis=1).astype(np.intp)
    return picks


def _customer_rows(
    rng: np.random.Generator,
    cursor: _Cursor,
    encoding: _Encoding,
    joined: Floats,
    device: Indices,
    age_band: Indices,
) -> tuple[Ints, _Rows]:
    size = joined.size
    country = _categorical(rng, COUNTRY_WEIGHTS, size)
    # Every attribute combination is serialised once; each customer then points at one of them.
    profiles = [
        json.dumps({"country": c, "device": d, "age_band": a}) for c in COUNTRIES for d in DEVICES for a in AGE_BANDS
    ]
    profile = (country * len(DEVICES) + device) * len(AGE_BANDS) + age_band
    ids, numbers = cursor.take(size)
    external_ids = [f"demo-{number:06d}" for number in numbers]
    values = list(
        zip(
            ids.tolist(),
            external_ids,
            [f"{external_id}@example.com" for external_id in external_ids],
            encoding.instants(joined),
            [profiles[index] for index in profile.tolist()],
            (rng.random(size) < OPT_OUT_SHARE).tolist(),
            [encoding.now] * size,
            [encoding.now] * size,
            strict=True,
        )
    )
    columns = ("id", "external_id", "email", "joined_at", "attributes", "marketing_opt_out", "updated_at", "created_at")
    return ids, _Rows(CUSTOMER, columns, values)


def _first_purchase_days(rng: np.random.Generator, joined: Floats) -> Floats:
    immediate = rng.random(joined.size) < IMMEDIATE_BUYER_SHARE
    delay = np.where(
        immediate, rng.exponential(10 * MINUTE, joined.size), rng.exponential(FIRST_PURCHASE_DELAY_DAYS, joined.size)
    )
    first = joined + delay
    # A recent sign-up still buys before now: its first purchase falls somewhere in the time it has had.
    late = first > 0.0
    first[late] = joined[late] * (1.0 - rng.random(int(late.sum())))
    return first


def _simulate_purchases(rng: np.random.Generator, first_purchase: Floats) -> tuple[Indices, Floats, Flags]:
    """BG/NBD purchase days (relative to now) for buyers whose first purchase is given.

    Returns the buyer of each purchase and its day, sorted by buyer then day, and for each buyer whether they
    dropped out (rather than still being active now).
    """
    buyers = first_purchase.size
    # A Gamma draw with shape 0.25 can underflow to zero; the floor only avoids dividing by it.
    rate = np.maximum(rng.gamma(PURCHASE_RATE_SHAPE, 1.0 / PURCHASE_RATE_SCALE_DAYS, buyers), 1e-12)
    dropout = rng.beta(DROPOUT_A, DROPOUT_B, buyers)
    clock = first_purchase.copy()
    dropped = np.zeros(buyers, dtype=bool)
    owners: list[Indices] = [np.arange(buyers, dtype=np.intp)]
    days: list[Floats] = [first_purchase]
    # In each round every buyer still active makes at most one more purchase, so rounds bound orders per buyer.
    active = np.arange(buyers, dtype=np.intp)
    for _round in range(1, MAX_ORDERS_PER_CUSTOMER):
        if active.size == 0:
            break
        next_day = clock[active] + rng.exponential(1.0, active.size) / rate[active]
        bought = next_day <= 0.0
        active = active[bought]
        clock[active] = next_day[bought]
        owners.append(active)
        days.append(next_day[bought])
        leaving = rng.random(active.size) < dropout[active]
        dropped[active[leaving]] = True
        active = active[~leaving]
    owner = np.concatenate(owners)
    day = np.concatenate(days)
    by_buyer_then_day = np.lexsort((day, owner))
    return owner[by_buyer_then_day], day[by_buyer_then_day], dropped


@dataclass(frozen=True)
class _Refunds:
    order: Indices  # position among the chunk's orders
    amount_minor: Ints
    refunded_at: Ints  # microseconds since the epoch


def _refunds(rng: np.random.Generator, placed: Ints, total_minor: Ints, now_micros: int) -> _Refunds:
    """Cancellations (full refunds) and partial refunds, a few of them in two steps, never above the total."""
    # An order placed at this very instant has no time left for a refund after it.
    refunded = np.flatnonzero((rng.random(placed.size) < REFUNDED_ORDER_SHARE) & (placed < now_micros))
    total = total_minor[refunded]
    full = rng.random(refunded.size) < FULL_REFUND_SHARE
    partial = np.clip(np.rint(total * rng.uniform(0.1, 0.7, refunded.size)), 1, total).astype(np.int64)
    first_amount = np.where(full, total, partial)
    delay = _micros(HOUR + rng.exponential(6.0, refunded.size))
    first_at = np.minimum(placed[refunded] + delay, now_micros)
    rest = total - first_amount
    again = np.flatnonzero((rest >= 1) & (rng.random(refunded.size) < SECOND_REFUND_SHARE))
    second_amount = np.clip(np.rint(rest[again] * rng.uniform(0.2, 1.0, again.size)), 1, rest[again]).astype(np.int64)
    second_at = np.minimum(first_at[again] + _micros(HOUR + rng.exponential(5.0, again.size)), now_micros)
    order = np.concatenate((refunded, refunded[again])).astype(np.intp)
    refunded_at = np.concatenate((first_at, second_at))
    by_order_then_time = np.lexsort((refunded_at, order))
    return _Refunds(
        order=order[by_order_then_time],
        amount_minor=np.concatenate((first_amount, second_amount))[by_order_then_time],
        refunded_at=refunded_at[by_order_then_time],
    )


def _micros(days: Floats) -> Ints:
    return np.rint(days * MICROS_PER_DAY).astype(np.int64)


def _order_rows(
    cursor: _Cursor,
    encoding: _Encoding,
    money: _Money,
    customer_id: Ints,
    placed: Ints,
    total_minor: Ints,
    channel: Indices,
    refunds: _Refunds,
) -> tuple[Ints, _Rows]:
    count = placed.size
    # Kept on the order as in the service: the sum of the order's refunds.
    refunded_minor = np.zeros(count, dtype=np.int64)
    np.add.at(refunded_minor, refunds.order, refunds.amount_minor)
    ids, numbers = cursor.take(count)
    external_ids = [f"demo-o-{number:07d}" for number in numbers]
    values = list(
        zip(
            ids.tolist(),
            external_ids,
            customer_id.tolist(),
            encoding.timestamps(placed),
            money.stored(total_minor),
            money.stored(refunded_minor),
            [money.currency] * count,
            [CHANNELS[index] for index in channel.tolist()],
            _sha256_hex(external_ids),
            [encoding.now] * count,
            strict=True,
        )
    )
    columns = (
        "id", "external_id", "customer_id", "placed_at", "total", "refunded", "currency", "channel", "content_hash",
        "created_at",
    )  # fmt: skip
    return ids, _Rows(ORDER, columns, values)


@dataclass(frozen=True)
class _Lines:
    order: Indices  # position among the chunk's orders
    line_no: Ints
    sku: Indices  # position in SKUS
    quantity: Ints
    unit_price_minor: Ints
    first_sku: Indices  # per order: the SKU of its first line, the product its purchase drivers point at


def _order_lines(rng: np.random.Generator, total_minor: Ints, money: _Money) -> _Lines:
    count = total_minor.size
    total = total_minor / 10.0**money.exponent
    relative_size = total / (TYPICAL_ORDER_VALUE * money.price_level)
    lines_per_order = np.minimum(1 + rng.poisson(0.2 + 0.6 * relative_size), MAX_LINES_PER_ORDER)
    order = np.repeat(np.arange(count, dtype=np.intp), lines_per_order)
    first_line = np.cumsum(lines_per_order) - lines_per_order
    line_no = np.arange(order.size, dtype=np.int64) - first_line[order]
    share = rng.gamma(2.0, 1.0, order.size)
    share /= np.bincount(order, weights=share, minlength=count)[order]
    # Unit prices are before the order's discount, so lines add up to somewhat more than the total paid.
    discount = np.where(rng.random(count) < DISCOUNTED_ORDER_SHARE, rng.uniform(0.05, 0.3, count), 0.0)
    quantity = np.asarray(QUANTITIES, dtype=np.int64)[_categorical(rng, QUANTITY_WEIGHTS, order.size)]
    unit_price = total[order] * share / (1.0 - discount[order]) / quantity
    category = _categories_fitting(rng, unit_price / money.price_level)
    sku = category * SKUS_PER_CATEGORY + _categorical(rng, SKU_POPULARITY, order.size)
    return _Lines(
        order=order,
        line_no=line_no,
        sku=sku,
        quantity=quantity,
        unit_price_minor=money.minor_units(unit_price),
        first_sku=sku[first_line],
    )


def _categories_fitting(rng: np.random.Generator, unit_price: Floats) -> Indices:
    """A category per price, drawn by popularity times how typical the price is for it (log-normal)."""
    popularity = np.log([weight for _name, _prefix, weight, _price in CATALOGUE])
    typical_price = np.log([price for _name, _prefix, _weight, price in CATALOGUE])
    log_weight = popularity[None, :] - (np.log(unit_price)[:, None] - typical_price[None, :]) ** 2 / (
        2 * CATEGORY_PRICE_SIGMA**2
    )
    # Gumbel-max trick: the argmax of log-weights plus Gumbel noise is a draw proportional to the weights.
    picks: Indices = np.argmax(log_weight + rng.gumbel(size=log_weight.shape), axis=1).astype(np.intp)
    return picks


def _order_item_rows(cursor: _Cursor, money: _Money, order_ids: Ints, lines: _Lines) -> _Rows:
    ids, _numbers = cursor.take(lines.order.size)
    values = list(
        zip(
            ids.tolist(),
            order_ids[lines.order].tolist(),
            lines.line_no.tolist(),
            [SKUS[index] for index in lines.sku.tolist()],
            [CATEGORIES[index // SKUS_PER_CATEGORY] for index in lines.sku.tolist()],
            lines.quantity.tolist(),
            money.stored(lines.unit_price_minor),
            strict=True,
        )
    )
    return _Rows(ORDER_ITEM, ("id", "order_id", "line_no", "sku", "category", "quantity", "unit_price"), values)


def _refund_rows(
    cursor: _Cursor, encoding: _Encoding, money: _Money, order_ids: Ints, order_customer_ids: Ints, refunds: _Refunds
) -> _Rows:
    ids, numbers = cursor.take(refunds.order.size)
    external_ids = [f"demo-r-{number:07d}" for number in numbers]
    values = list(
        zip(
            ids.tolist(),
            external_ids,
            order_ids[refunds.order].tolist(),
            order_customer_ids[refunds.order].tolist(),
            money.stored(refunds.amount_minor),
            encoding.timestamps(refunds.refunded_at),
            _sha256_hex(external_ids),
            [encoding.now] * len(external_ids),
            strict=True,
        )
    )
    columns = ("id", "external_id", "order_id", "customer_id", "amount", "refunded_at", "content_hash", "created_at")
    return _Rows(REFUND, columns, values)


def _active_until(
    rng: np.random.Generator,
    joined: Floats,
    prospect: Flags,
    buyers: Indices,
    buyer_of_order: Indices,
    order_day: Floats,
    dropped: Flags,
) -> Floats:
    """The day (<= 0) until which a customer is around and browsing.

    Until now for active buyers, a while past the last order for lapsed ones, and for prospects a few weeks
    after they signed up.
    """
    until = np.zeros(joined.size)
    last_order = order_day[np.cumsum(np.bincount(buyer_of_order, minlength=buyers.size)) - 1]
    lapsed_until = np.minimum(last_order + rng.exponential(LAPSED_BROWSING_DAYS, buyers.size), 0.0)
    until[buyers] = np.where(dropped, lapsed_until, 0.0)
    prospects = np.flatnonzero(prospect)
    until[prospects] = np.minimum(joined[prospects] + rng.exponential(PROSPECT_BROWSING_DAYS, prospects.size), 0.0)
    return until


@dataclass(frozen=True)
class _Events:
    customer: Indices  # position in the chunk
    kind: Indices  # position in EVENT_TYPES
    target: Indices  # position in TARGETS
    day: Floats


def _events(
    rng: np.random.Generator,
    joined: Floats,
    active_until: Floats,
    order_customer: Indices,
    order_day: Floats,
    order_sku: Indices,
    referrer_pull: Floats,
) -> _Events:
    """Browsing, purchase drivers, reviews of bought products and social shares."""
    orders_per_customer = np.bincount(order_customer, minlength=joined.size)
    browsing_mean = np.where(
        orders_per_customer > 0, BUYER_BROWSING + BROWSING_PER_ORDER * orders_per_customer, PROSPECT_BROWSING
    )
    browser = np.repeat(
        np.arange(joined.size, dtype=np.intp), np.minimum(rng.poisson(browsing_mean), MAX_BROWSING_EVENTS)
    )
    browse_kind = np.asarray(BROWSING_TYPES, dtype=np.intp)[_categorical(rng, BROWSING_TYPE_WEIGHTS, browser.size)]

    driven = np.repeat(
        np.arange(order_customer.size, dtype=np.intp), rng.poisson(DRIVERS_PER_ORDER, order_customer.size)
    )
    driver = order_customer[driven]
    driver_day = np.maximum(order_day[driven] - rng.exponential(DRIVER_LEAD_DAYS, driven.size), joined[driver])
    driver_kind = np.asarray(BROWSING_TYPES, dtype=np.intp)[_categorical(rng, DRIVER_TYPE_WEIGHTS, driven.size)]
    driver_target = _targets(rng, driver_kind)
    viewed_bought_product = driver_kind == PRODUCT_VIEW
    driver_target[viewed_bought_product] = PRODUCT_TARGET_OFFSET + order_sku[driven[viewed_bought_product]]

    reviewed = np.flatnonzero(rng.random(order_customer.size) < REVIEWED_ORDER_SHARE)
    review_day = np.minimum(order_day[reviewed] + 1.0 + rng.exponential(REVIEW_DELAY_DAYS, reviewed.size), 0.0)

    sharing_rate = BASE_SHARES + SHARES_PER_REFERRER_PULL * np.minimum(referrer_pull, MAX_SHARING_PULL)
    sharer = np.repeat(np.arange(joined.size, dtype=np.intp), rng.poisson(sharing_rate))
    shared_page = rng.random(sharer.size) < SHARED_PAGE_SHARE
    share_target = np.where(
        shared_page, _pick(rng, len(PAGE_TARGETS), sharer.size), PRODUCT_TARGET_OFFSET + _popular_skus(rng, sharer.size)
    )

    customer = np.concatenate((browser, driver, order_customer[reviewed], sharer))
    day = np.concatenate(
        (
            _uniform_between(rng, joined[browser], active_until[browser]),
            driver_day,
            review_day,
            _uniform_between(rng, joined[sharer], active_until[sharer]),
        )
    )
    kind = np.concatenate(
        (browse_kind, driver_kind, np.full(reviewed.size, REVIEW, np.intp), np.full(sharer.size, SOCIAL_SHARE, np.intp))
    )
    target = np.concatenate(
        (_targets(rng, browse_kind), driver_target, PRODUCT_TARGET_OFFSET + order_sku[reviewed], share_target)
    )
    # Sorted as they would arrive per customer, which also keeps index inserts local.
    by_customer_then_day = np.lexsort((day, customer))
    return _Events(
        customer=customer[by_customer_then_day].astype(np.intp),
        kind=kind[by_customer_then_day].astype(np.intp),
        target=target[by_customer_then_day].astype(np.intp),
        day=day[by_customer_then_day],
    )


def _pick(rng: np.random.Generator, choices: int, size: int) -> Indices:
    return rng.integers(0, choices, size).astype(np.intp)


def _popular_skus(rng: np.random.Generator, size: int) -> Indices:
    category = _categorical(rng, [weight for _name, _prefix, weight, _price in CATALOGUE], size)
    return category * SKUS_PER_CATEGORY + _categorical(rng, SKU_POPULARITY, size)


def _targets(rng: np.random.Generator, kind: Indices) -> Indices:
    """A plausible target for each browsing-type event: a page, a product, an ad or an email campaign page."""
    targets: Indices = np.select(
        [kind == PAGE_VIEW, kind == PRODUCT_VIEW, kind == AD_CLICK],
        [
            _pick(rng, len(PAGE_TARGETS), kind.size),
            PRODUCT_TARGET_OFFSET + _popular_skus(rng, kind.size),
            AD_TARGET_OFFSET + _pick(rng, len(AD_TARGETS), kind.size),
        ],
        default=EMAIL_TARGET_OFFSET + _pick(rng, len(EMAIL_TARGETS), kind.size),
    ).astype(np.intp)
    return targets


def _uniform_between(rng: np.random.Generator, low: Floats, high: Floats) -> Floats:
    return low + (high - low) * rng.random(low.size)


def _event_rows(cursor: _Cursor, encoding: _Encoding, customer_ids: Ints, events: _Events) -> _Rows:
    ids, numbers = cursor.take(events.customer.size)
    values = list(
        zip(
            ids.tolist(),
            [f"demo-e-{number:08d}" for number in numbers],
            customer_ids[events.customer].tolist(),
            [EVENT_TYPES[index] for index in events.kind.tolist()],
            [TARGETS[index] for index in events.target.tolist()],
            encoding.instants(events.day),
            [encoding.now] * len(numbers),
            strict=True,
        )
    )
    columns = ("id", "external_id", "customer_id", "type", "target", "occurred_at", "created_at")
    return _Rows(EVENT, columns, values)
