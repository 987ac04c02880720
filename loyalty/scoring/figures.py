"""Per-customer figures, computed set-based in the database as of an instant.

One statement aggregates orders (net of refunds as of the instant) into purchase occasions — orders on the same
UTC day are one occasion, valued at their sum — and joins review and share counts; the rows stream back in
customer order into columnar arrays. An order counts as a purchase unless it was refunded in full (a
cancellation); an order of zero value (a free item) still counts. Referral figures and top interests are two
more set-based statements. The same definitions serve the full recalculation (all customers; on PostgreSQL its
paid orders are streamed by COPY and grouped in NumPy) and the real-time re-score (a few customers).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.bulk import plan_sized
from loyalty.db.staging import COPY_SIGNATURE, EPOCH, POSTGRES_EPOCH, driver_in_transaction
from loyalty.db.types import DateTimeUTC
from loyalty.lib.money import STORAGE_FACTOR
from loyalty.scoring.config import ScoringConfig

SECONDS_PER_DAY = 86_400.0
STREAM_CHUNK = 50_000

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# The UTC day number (days since 1970-01-01) of a stored timestamp: SQLite keeps UTC text, PostgreSQL timestamptz.
_DAY_NUMBER = {
    # Date arithmetic is integer arithmetic; extract(epoch) would be numeric, several times slower over millions.
    "postgresql": "(CAST(({column} AT TIME ZONE 'UTC') AS date) - DATE '1970-01-01')",
    # The date part only: julianday() of the full text rounds to milliseconds and can tip 23:59:59.9995 over.
    "sqlite": "CAST(julianday(substr({column}, 1, 10)) - 2440587.5 AS INTEGER)",
}

# An order's net value as of the instant is its total less the refunds made by then. The order row keeps the sum of
# all its refunds (`refunded`), so only refunds made after the instant are read back from the refund table: none at
# all for a run as of now, which spares a join of every order with its refunds. An order counts as paid unless it
# was refunded in full; a free order counts. One definition for both routes below ({as_of} is the parameter).
_PAID_ORDERS_SQL = """
SELECT o.customer_id, {day} AS day, o.total - o.refunded + COALESCE(r.amount, 0) AS value
FROM customer_order o
LEFT JOIN (
    SELECT order_id, CAST(SUM(amount) AS BIGINT) AS amount
    FROM refund WHERE refunded_at > {as_of} {refund_filter} GROUP BY order_id
) r ON r.order_id = o.id
WHERE o.placed_at <= {as_of} AND (o.total - o.refunded + COALESCE(r.amount, 0) > 0 OR o.total = 0) {order_filter}
"""

_ENGAGEMENT_SQL = """
SELECT customer_id,
       CAST(SUM(CASE WHEN type = 'review' THEN 1 ELSE 0 END) AS BIGINT) AS reviews,
       CAST(SUM(CASE WHEN type = 'social_share' THEN 1 ELSE 0 END) AS BIGINT) AS shares
FROM interaction_event
WHERE occurred_at <= {as_of} AND type IN ('review', 'social_share') {event_filter}
GROUP BY customer_id
"""

# Paid orders grouped into purchase occasions (orders on the same UTC day are one, valued at their sum), then per
# customer; every customer, with engagement counts, in id order.
_FIGURES_SQL = """
WITH order_days AS (
    SELECT customer_id, day, SUM(value) AS value, COUNT(*) AS orders
    FROM ({paid_orders}) paid
    GROUP BY customer_id, day
),
with_first AS (
    SELECT customer_id, day, value, orders, MIN(day) OVER (PARTITION BY customer_id) AS first_day FROM order_days
),
purchases AS (
    SELECT customer_id,
           COUNT(*) AS occasions,
           SUM(orders) AS paid_orders,
           MIN(day) AS first_day,
           MAX(day) AS last_day,
           SUM(value) AS lifetime_spend,
           SUM(CASE WHEN day >= :window_start_day THEN value ELSE 0 END) AS net_spend,
           SUM(CASE WHEN day >= :window_start_day THEN orders ELSE 0 END) AS orders_in_window,
           SUM(CASE WHEN day > first_day THEN value ELSE 0 END) AS repeat_spend
    FROM with_first GROUP BY customer_id
)
SELECT c.id, COALESCE(p.occasions, 0), COALESCE(p.paid_orders, 0), p.first_day, p.last_day,
       COALESCE(p.lifetime_spend, 0), COALESCE(p.net_spend, 0), COALESCE(p.orders_in_window, 0),
       COALESCE(p.repeat_spend, 0), COALESCE(e.reviews, 0), COALESCE(e.shares, 0)
FROM customer c
LEFT JOIN purchases p ON p.customer_id = c.id
LEFT JOIN ({engagement}) e ON e.customer_id = c.id
{customer_filter}
ORDER BY c.id
"""

# The full population on PostgreSQL: every paid order as (customer, placed_at, net value), streamed out with a
# binary COPY and grouped by day and customer in NumPy. Grouping ten million orders by (customer, day) in SQL needs a
# sort of all of them; NumPy sorts the same keys several times faster, and the rows cross the socket as fixed-width
# binary. _FIGURES_SQL stays the form for SQLite and for the real-time path (a few customers).
#
# The paid orders are _PAID_ORDERS_SQL's, in two forms, of which each run takes one in the same statement: the
# check for refunds made after the instant is a one-time filter on each part. For a run as of now there are none,
# and the orders are read as stored (joining ten million orders with the empty set cost a third of the statement);
# for a run as of an earlier instant, the join adds those refunds back, a hash join whatever their number. The
# instant itself is sent, and its UTC day taken in NumPy: cheaper than the time zone conversion per order in SQL.
_EVERY_PAID_ORDER_SQL = """
SELECT o.customer_id, o.placed_at, o.total - o.refunded AS value
FROM customer_order o
WHERE o.placed_at <= $1 AND (o.total - o.refunded > 0 OR o.total = 0)
  AND NOT EXISTS (SELECT 1 FROM refund WHERE refunded_at > $1)
UNION ALL
SELECT * FROM ({paid_orders}) paid WHERE EXISTS (SELECT 1 FROM refund WHERE refunded_at > $1)
""".format(  # noqa: S608 (our own SQL text, no value spliced in)
    paid_orders=_PAID_ORDERS_SQL.format(day="o.placed_at", as_of="$1", refund_filter="", order_filter="")
)
_EVERY_CUSTOMER_ENGAGEMENT_SQL = """
SELECT c.id, COALESCE(e.reviews, 0), COALESCE(e.shares, 0)
FROM customer c
LEFT JOIN ({engagement}) e ON e.customer_id = c.id
ORDER BY c.id
"""


def _copy_row(fields: Sequence[tuple[str, str]]) -> np.dtype[Any]:
    """The layout of a binary COPY row of non-null fixed-width fields (``i8`` bigint, ``i4`` integer): the field
    count, then each field's length and value, all big-endian."""
    layout: list[tuple[str, str]] = [("fields", ">i2")]
    for name, kind in fields:
        layout += [(f"{name}_length", ">i4"), (name, f">{kind}")]
    return np.dtype(layout)


# placed_at: a timestamptz travels as microseconds since 2000-01-01 UTC.
_PAID_ORDER_FIELDS = (("customer_id", "i8"), ("placed_at", "i8"), ("value", "i8"))
_POSTGRES_EPOCH_DAY = (POSTGRES_EPOCH - EPOCH).days
_MICROS_PER_DAY = 86_400_000_000
_ENGAGEMENT_FIELDS = (("customer_id", "i8"), ("reviews", "i8"), ("shares", "i8"))
_COPY_HEADER = len(COPY_SIGNATURE) + 8  # flags and header-extension length, both int32

_REFERRALS_SQL = """
SELECT referrer_id, referee_id FROM referral WHERE occurred_at <= :as_of {filter}
"""

_INTERESTS_SQL = """
WITH counted AS (
    SELECT customer_id, target, COUNT(*) AS engagements, MAX(occurred_at) AS last_at
    FROM interaction_event
    WHERE occurred_at <= :as_of AND occurred_at > :since {filter}
    GROUP BY customer_id, target
),
ranked AS (
    SELECT customer_id, target, engagements,
           ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY engagements DESC, last_at DESC, target) AS position
    FROM counted
)
SELECT customer_id, target, engagements, position FROM ranked WHERE position <= :top ORDER BY customer_id, position
"""


@dataclass
class Figures:
    """Columnar per-customer figures, aligned by position with ``customer_id`` (ascending).

    Derived columns are computed once per population (cached), as the rules read them customer by customer.
    """

    customer_id: IntArray
    occasions: IntArray
    paid_orders: IntArray
    first_day: FloatArray  # NaN without a paid order
    last_day: FloatArray
    lifetime_spend: FloatArray
    net_spend: FloatArray
    orders_in_window: IntArray
    repeat_spend: FloatArray
    reviews: IntArray
    shares: IntArray
    as_of_day: float  # fractional day number of the instant the figures are as of

    def __len__(self) -> int:
        return int(self.customer_id.shape[0])

    @functools.cached_property
    def scored(self) -> NDArray[np.bool_]:
        """Customers with at least one paid order: the population percentiles are taken over."""
        return self.occasions > 0

    @functools.cached_property
    def frequency(self) -> FloatArray:
        return np.maximum(self.occasions - 1, 0).astype(np.float64)

    @functools.cached_property
    def recency(self) -> FloatArray:
        return np.where(self.scored, self.last_day - self.first_day, 0.0)

    @functools.cached_property
    def age(self) -> FloatArray:
        return np.where(self.scored, self.as_of_day - self.first_day, 0.0)

    @functools.cached_property
    def mean_repeat_spend(self) -> FloatArray:
        repeats = self.frequency
        return np.divide(self.repeat_spend, repeats, out=np.zeros_like(self.repeat_spend), where=repeats > 0)

    @functools.cached_property
    def average_order_value(self) -> FloatArray:
        orders = self.paid_orders.astype(np.float64)
        return np.divide(self.lifetime_spend, orders, out=np.zeros_like(self.lifetime_spend), where=orders > 0)

    @functools.cached_property
    def days_since_last(self) -> FloatArray:
        return np.where(self.scored, self.as_of_day - self.last_day, np.nan)

    def index_of(self, customer_ids: IntArray) -> IntArray:
        """Positions of the given ids (which must be present)."""
        return np.searchsorted(self.customer_id, customer_ids).astype(np.int64)


@dataclass(frozen=True)
class ReferralFigures:
    converted_referrals: IntArray
    referred_revenue: FloatArray


def day_number(instant: datetime) -> float:
    return instant.timestamp() / SECONDS_PER_DAY


def _bind_times(statement: Any) -> Any:
    return statement.bindparams(
        bindparam("as_of", type_=DateTimeUTC()),
        bindparam("since", type_=DateTimeUTC()),
    )


def _filters(filtered: bool) -> dict[str, str]:
    if not filtered:
        return {"refund_filter": "", "order_filter": "", "event_filter": "", "customer_filter": ""}
    return {
        "refund_filter": "AND customer_id IN :ids",
        "order_filter": "AND o.customer_id IN :ids",
        "event_filter": "AND customer_id IN :ids",
        "customer_filter": "WHERE c.id IN :ids",
    }


def _expanding(statement: Any, filtered: bool) -> Any:
    return statement.bindparams(bindparam("ids", expanding=True)) if filtered else statement


# The figures query's columns, in the order ``figures_from_rows`` reads them.
FIGURE_COLUMNS = 11


@functools.cache
def figures_statement(dialect: str, filtered: bool, around: str = "{figures}") -> Any:
    """The figures query for every customer or for an ``ids`` list, built once per process and shape.

    The real-time re-score runs it on every order: formatting and parsing the SQL text anew each time cost more
    than the database's work for one customer. ``around`` is SQL that reads the query as ``{figures}``: a caller
    adding its own columns to each customer's row (the real-time path's stored state) saves a round trip; its
    rows start with the ``FIGURE_COLUMNS``, in order, for ``figures_from_rows``.
    """
    filters = _filters(filtered)
    day = _DAY_NUMBER[dialect].format(column="o.placed_at")
    sql = _FIGURES_SQL.format(
        paid_orders=_PAID_ORDERS_SQL.format(
            day=day, as_of=":as_of", refund_filter=filters["refund_filter"], order_filter=filters["order_filter"]
        ),
        engagement=_ENGAGEMENT_SQL.format(as_of=":as_of", event_filter=filters["event_filter"]),
        customer_filter=filters["customer_filter"],
    )
    statement = text(around.format(figures=sql)).bindparams(bindparam("as_of", type_=DateTimeUTC()))
    return _expanding(statement, filtered)


def figures_parameters(as_of: datetime, config: ScoringConfig, customer_ids: Sequence[int] | None) -> dict[str, Any]:
    """The parameters of ``figures_statement`` (``ids`` only when it is filtered)."""
    window_start_day = math.floor(day_number(as_of)) - config.window_days + 1
    params: dict[str, Any] = {"as_of": as_of, "window_start_day": window_start_day}
    if customer_ids is not None:
        params["ids"] = plan_sized(customer_ids)
    return params


async def _partitions(
    session: AsyncSession, statement: Any, params: dict[str, Any], streamed: bool
) -> AsyncIterator[Sequence[Any]]:
    """The result in chunks: streamed from a server-side cursor for the whole population (bounded memory), and
    fetched in one round trip for a few customers (a cursor would add its own round trips to every order)."""
    if not streamed:
        yield (await session.execute(statement, params)).all()
        return
    result = await session.stream(statement, params)
    async for partition in result.partitions(STREAM_CHUNK):
        yield partition


async def load_figures(
    session: AsyncSession,
    as_of: datetime,
    config: ScoringConfig,
    customer_ids: Sequence[int] | None = None,
) -> Figures:
    """Figures for every customer (``customer_ids=None``) or for the given ones, streamed in chunks."""
    dialect = session.get_bind().dialect.name
    if customer_ids is None and dialect == "postgresql":
        return await _load_all_figures_by_copy(session, as_of, config)
    params = figures_parameters(as_of, config, customer_ids)
    statement = figures_statement(dialect, filtered=customer_ids is not None)
    chunks = [
        _figure_table(partition)
        async for partition in _partitions(session, statement, params, streamed=customer_ids is None)
    ]
    return _figures(np.concatenate(chunks) if chunks else _figure_table([]), day_number(as_of))


def figures_from_rows(rows: Sequence[Sequence[Any]], as_of: datetime) -> Figures:
    """Figures from rows of ``figures_statement`` (their first ``FIGURE_COLUMNS``), fetched by the caller."""
    return _figures(_figure_table(rows), day_number(as_of))


def _figure_table(rows: Sequence[Sequence[Any]]) -> NDArray[np.float64]:
    # Money arrives as integer ten-thousandths; float64 holds them exactly up to 9e15.
    return np.array([tuple(row[:FIGURE_COLUMNS]) for row in rows], dtype=np.float64).reshape(-1, FIGURE_COLUMNS)


def _figures(table: NDArray[np.float64], as_of_day: float) -> Figures:
    money = 1.0 / STORAGE_FACTOR
    return Figures(
        customer_id=table[:, 0].astype(np.int64),
        occasions=table[:, 1].astype(np.int64),
        paid_orders=table[:, 2].astype(np.int64),
        first_day=table[:, 3],
        last_day=table[:, 4],
        lifetime_spend=table[:, 5] * money,
        net_spend=table[:, 6] * money,
        orders_in_window=table[:, 7].astype(np.int64),
        repeat_spend=table[:, 8] * money,
        reviews=table[:, 9].astype(np.int64),
        shares=table[:, 10].astype(np.int64),
        as_of_day=as_of_day,
    )


class _CopyColumns:
    """Collects a binary COPY stream of fixed-width rows into int64 columns, chunk by chunk (bounded memory)."""

    def __init__(self, fields: Sequence[tuple[str, str]]) -> None:
        self._names = [name for name, _kind in fields]
        self._row = _copy_row(fields)
        self._pending = b""
        self._header_seen = False
        self._chunks: list[dict[str, IntArray]] = []

    async def __call__(self, data: bytes) -> None:
        pending = self._pending + data
        if not self._header_seen:
            if len(pending) < _COPY_HEADER:
                self._pending = pending
                return
            if not pending.startswith(COPY_SIGNATURE):
                raise ValueError("not a binary COPY stream")
            extension = int.from_bytes(pending[_COPY_HEADER - 4 : _COPY_HEADER], "big")
            pending = pending[_COPY_HEADER + extension :]
            self._header_seen = True
        whole = len(pending) // self._row.itemsize * self._row.itemsize
        if whole:
            rows = np.frombuffer(pending, dtype=self._row, count=whole // self._row.itemsize)
            # The trailer (field count -1) is two bytes, shorter than a row, so it never parses as one.
            if np.any(rows["fields"] != len(self._names)):
                raise ValueError("unexpected row in the COPY stream")
            self._chunks.append({name: rows[name].astype(np.int64) for name in self._names})
        self._pending = pending[whole:]

    def columns(self) -> dict[str, IntArray]:
        if self._pending not in (b"", b"\xff\xff"):
            raise ValueError("the COPY stream ended inside a row")
        return {
            name: np.concatenate([chunk[name] for chunk in self._chunks])
            if self._chunks
            else np.zeros(0, dtype=np.int64)
            for name in self._names
        }


async def _copy_columns(
    driver: Any, sql: str, as_of: datetime, fields: Sequence[tuple[str, str]]
) -> dict[str, IntArray]:
    sink = _CopyColumns(fields)
    await driver.copy_from_query(sql, as_of, output=sink, format="binary")
    return sink.columns()


def _by_customer_and_day(customer: IntArray, days: IntArray, values: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """The orders sorted by customer, then day: the rows of one day of one customer are one purchase occasion.

    Both keys as one integer when their ranges allow, which one sort orders in half the time of sorting by each, and
    from which both are read back without gathering them."""
    if customer.size == 0:
        return customer, days, values
    low_customer, low_day = int(customer.min()), int(days.min())
    day_span = int(days.max()) - low_day + 1
    if (int(customer.max()) - low_customer + 1) * day_span >= 2**62:
        order = np.lexsort((days, customer))
        return customer[order], days[order], values[order]
    # In place where it can be: each new array of ten million is as costly to map as to compute.
    key = customer - low_customer
    key *= day_span
    key += days
    key -= low_day
    order = np.argsort(key)
    customer, days = np.divmod(key[order], day_span)
    customer += low_customer
    days += low_day
    return customer, days, values[order]


async def _load_all_figures_by_copy(session: AsyncSession, as_of: datetime, config: ScoringConfig) -> Figures:
    as_of_day = day_number(as_of)
    window_start_day = math.floor(as_of_day) - config.window_days + 1
    driver = await driver_in_transaction(await session.connection())
    paid = await _copy_columns(driver, _EVERY_PAID_ORDER_SQL, as_of, _PAID_ORDER_FIELDS)
    # The UTC day number, as _DAY_NUMBER takes it (floor division: days before 2000 too).
    days = paid["placed_at"] // _MICROS_PER_DAY
    days += _POSTGRES_EPOCH_DAY
    customer, days, values = _by_customer_and_day(paid["customer_id"], days, paid["value"])
    size = customer.size
    day_starts = np.flatnonzero(np.concatenate(([size > 0], (customer[1:] != customer[:-1]) | (days[1:] != days[:-1]))))
    occasion_customer = customer[day_starts]
    occasion_day = days[day_starts]
    occasion_value = np.add.reduceat(values, day_starts) if size else values
    occasion_orders = np.diff(np.append(day_starts, size))
    customer_starts = np.flatnonzero(
        np.concatenate(([occasion_customer.size > 0], occasion_customer[1:] != occasion_customer[:-1]))
    )
    customer_ends = np.append(customer_starts[1:], occasion_customer.size)[: customer_starts.size] - 1
    in_window = occasion_day >= window_start_day

    def per_customer(column: IntArray) -> IntArray:
        return np.add.reduceat(column, customer_starts) if customer_starts.size else column[:0]

    buyers = occasion_customer[customer_starts]
    lifetime = per_customer(occasion_value)

    engagement_sql = _EVERY_CUSTOMER_ENGAGEMENT_SQL.format(
        engagement=_ENGAGEMENT_SQL.format(as_of="$1", event_filter="")
    )
    engagement = await _copy_columns(driver, engagement_sql, as_of, _ENGAGEMENT_FIELDS)
    ids = engagement["customer_id"]
    count = ids.size
    position = np.searchsorted(ids, buyers)
    # An order names its customer by a kept reference, not a foreign key: should a customer ever be missing, its
    # orders are left out, as the SQL form's join from the customers leaves them out, instead of landing on the
    # next customer's position. `loyalty doctor`'s references check names such orders.
    known = ids[np.minimum(position, count - 1)] == buyers if count else np.zeros(buyers.size, dtype=bool)
    every_buyer_known = bool(known.all())
    if not every_buyer_known:
        position = position[known]

    def spread(values_for_buyers: NDArray[Any], empty: float) -> NDArray[np.float64]:
        full = np.full(count, empty, dtype=np.float64)
        full[position] = values_for_buyers if every_buyer_known else values_for_buyers[known]
        return full

    money = 1.0 / STORAGE_FACTOR
    return Figures(
        customer_id=ids,
        occasions=spread(np.diff(np.append(customer_starts, occasion_customer.size)), 0).astype(np.int64),
        paid_orders=spread(per_customer(occasion_orders), 0).astype(np.int64),
        first_day=spread(occasion_day[customer_starts], math.nan),
        last_day=spread(occasion_day[customer_ends], math.nan),
        lifetime_spend=spread(lifetime, 0) * money,
        net_spend=spread(per_customer(np.where(in_window, occasion_value, 0)), 0) * money,
        orders_in_window=spread(per_customer(np.where(in_window, occasion_orders, 0)), 0).astype(np.int64),
        # Repeat spend: everything after the first occasion (the first day's orders together).
        repeat_spend=spread(lifetime - occasion_value[customer_starts], 0) * money,
        reviews=engagement["reviews"],
        shares=engagement["shares"],
        as_of_day=as_of_day,
    )


@functools.cache
def _referral_edges_statement(filtered: bool) -> Any:
    # With ids: the edges of the given referrers and of their referees (two levels below each). One IN over a
    # union, not "referrer IN ids OR referrer IN (subquery)": PostgreSQL can answer that OR only by scanning every
    # referral, on every real-time re-score; this reads the referrer index. The ids are customers' (the foreign key
    # makes every referrer one), so taking them from the customer table keeps the same edges.
    sql = _REFERRALS_SQL.format(
        filter=(
            "AND referrer_id IN (SELECT id FROM customer WHERE id IN :ids "
            "UNION SELECT referee_id FROM referral WHERE referrer_id IN :ids)"
            if filtered
            else ""
        )
    )
    return _expanding(text(sql).bindparams(bindparam("as_of", type_=DateTimeUTC())), filtered)


async def load_referral_edges(
    session: AsyncSession, as_of: datetime, customer_ids: Sequence[int] | None = None
) -> tuple[IntArray, IntArray]:
    """(referrer, referee) pairs as of the instant; with ids, the edges touching those customers' two levels."""
    params: dict[str, Any] = {"as_of": as_of}
    if customer_ids is not None:
        params["ids"] = plan_sized(customer_ids)
    statement = _referral_edges_statement(filtered=customer_ids is not None)
    rows = (await session.execute(statement, params)).all()
    # Plain tuples: NumPy probes a Row for the array protocols first, and each probe raises inside SQLAlchemy.
    edges = np.array([tuple(row) for row in rows], dtype=np.int64).reshape(-1, 2)
    return edges[:, 0], edges[:, 1]


def referral_figures(
    figures: Figures,
    referrers: IntArray,
    referees: IntArray,
    decay: float,
    referee_figures: Figures | None = None,
) -> ReferralFigures:
    """Converted referrals and referred revenue (net spend in the window; a second level at ``decay``).

    A referral converts once the referee has a paid order. ``referee_figures`` holds the referees' figures when
    they are not in ``figures`` (the real-time path loads only the customers it needs).
    """
    source = referee_figures or figures
    n = len(figures)
    converted = np.zeros(n, dtype=np.int64)
    revenue = np.zeros(n, dtype=np.float64)
    if referrers.size == 0 or len(source) == 0:
        return ReferralFigures(converted, revenue)
    referee_pos = np.searchsorted(source.customer_id, referees)
    referee_pos = np.clip(referee_pos, 0, len(source) - 1)
    known = source.customer_id[referee_pos] == referees
    referee_paid = known & (source.occasions[referee_pos] > 0)
    referee_spend = np.where(known, source.net_spend[referee_pos], 0.0)

    # First level, credited to referrers present in `figures`.
    referrer_pos = np.clip(np.searchsorted(figures.customer_id, referrers), 0, n - 1)
    referrer_known = figures.customer_id[referrer_pos] == referrers
    np.add.at(converted, referrer_pos[referrer_known], referee_paid[referrer_known].astype(np.int64))
    np.add.at(revenue, referrer_pos[referrer_known], referee_spend[referrer_known])

    # Second level: the revenue a referee's own referees bring, credited to the first referrer at a decay.
    if decay > 0:
        order = np.argsort(referrers, kind="stable")
        sorted_referrers = referrers[order]
        first = np.searchsorted(sorted_referrers, referees, side="left")
        last = np.searchsorted(sorted_referrers, referees, side="right")
        spend_by_edge = referee_spend[order]
        cumulative = np.concatenate([[0.0], np.cumsum(spend_by_edge)])
        grandchild_spend = cumulative[last] - cumulative[first]
        np.add.at(revenue, referrer_pos[referrer_known], decay * grandchild_spend[referrer_known])
    return ReferralFigures(converted, revenue)


def interests_sql(filtered: bool) -> str:
    """(customer_id, target, engagements, position) of each customer's top ``:top`` interests in the window
    (``:since``, ``:as_of``], best first; with ``:ids``, of those customers only."""
    return _INTERESTS_SQL.format(filter="AND customer_id IN :ids" if filtered else "")


def interest_parameters(as_of: datetime, config: ScoringConfig) -> dict[str, Any]:
    return {"as_of": as_of, "since": as_of - timedelta(days=config.interest_window_days), "top": config.top_interests}


def interests_from_json(text: str | None) -> list[dict[str, Any]]:
    """A customer's interests from ``[[target, engagements, position], ...]`` (JSON text, in any order), as
    ``load_interests`` gives them."""
    if not text:
        return []
    return [
        {"target": target, "engagements": int(engagements)}
        for target, engagements, _position in sorted(json.loads(text), key=lambda entry: entry[2])
    ]


@functools.cache
def _interests_statement(filtered: bool) -> Any:
    return _expanding(_bind_times(text(interests_sql(filtered))), filtered)


async def load_interests(
    session: AsyncSession, as_of: datetime, config: ScoringConfig, customer_ids: Sequence[int] | None = None
) -> dict[int, list[dict[str, Any]]]:
    """The most engaged targets of each customer in the interest window."""
    interests: dict[int, list[dict[str, Any]]] = {}
    async for partition in _interest_rows(session, as_of, config, customer_ids):
        for customer_id, target, engagements, _position in partition:
            interests.setdefault(int(customer_id), []).append({"target": target, "engagements": int(engagements)})
    return interests


async def load_interest_texts(session: AsyncSession, as_of: datetime, config: ScoringConfig) -> dict[int, str]:
    """``load_interests`` for every customer, each customer's list as the JSON text ``json.dumps`` makes of it, which
    is what a full run stores: built from the rows, without a dict for each target (a million customers' dicts
    cost more time and memory than the rest of the population)."""
    entries: dict[int, list[str]] = {}
    # '{"target": "...", "engagements": ' for each target, escaped as json.dumps escapes a string.
    openings: dict[str, str] = {}
    async for partition in _interest_rows(session, as_of, config, None):
        for customer_id, target, engagements, _position in partition:
            opening = openings.get(target)
            if opening is None:
                opening = openings[target] = f'{{"target": {encode_basestring_ascii(target)}, "engagements": '
            entries.setdefault(int(customer_id), []).append(f"{opening}{int(engagements)}}}")
    return {customer_id: f"[{', '.join(items)}]" for customer_id, items in entries.items()}


async def _interest_rows(
    session: AsyncSession, as_of: datetime, config: ScoringConfig, customer_ids: Sequence[int] | None
) -> AsyncIterator[Sequence[Any]]:
    """(customer, target, engagements) of the top interests, in customer order and each customer's best first."""
    if config.top_interests == 0:
        return
    params = interest_parameters(as_of, config)
    if customer_ids is not None:
        params["ids"] = plan_sized(customer_ids)
    statement = _interests_statement(filtered=customer_ids is not None)
    async for partition in _partitions(session, statement, params, streamed=customer_ids is None):
        yield partition
