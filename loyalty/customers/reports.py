"""Marketing reads of customers: one customer in full, lists with filters, CSV export, segment summaries."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import numpy as np
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from loyalty.customers import schemas
from loyalty.customers.services import get_customer
from loyalty.db.models import Customer, CustomerScore, CustomerTier
from loyalty.lib.money import format_money
from loyalty.lib.pagination import Page, decode_int_cursor, encode_cursor
from loyalty.tiers.config import TiersConfig

# Selects of members with their tier and score rows; filters add WHERE clauses without changing the columns.
MemberSelect = Select[*tuple[Any, ...]]
EXPORT_CHUNK = 5_000
EXPORT_COLUMNS = (
    "customer_id",
    "email",
    "tier",
    "value_score",
    "frequency_score",
    "influence_score",
    "paid_orders",
    "occasions",
    "orders_in_window",
    "net_spend",
    "lifetime_spend",
    "average_order_value",
    "predicted_value",
    "expected_purchases",
    "p_alive",
    "days_since_last",
    "converted_referrals",
    "referred_revenue",
    "reviews",
    "shares",
    "marketing_opt_out",
)


def _money(value: float | Decimal) -> str:
    return format_money(Decimal(str(value)))


def scores_of(score: CustomerScore | None) -> schemas.Scores:
    if score is None:
        return schemas.Scores(value=0.0, frequency=0.0, influence=0.0)
    return schemas.Scores(value=score.value_score, frequency=score.frequency_score, influence=score.influence_score)


def figures_of(score: CustomerScore | None) -> schemas.Figures | None:
    if score is None:
        return None
    return schemas.Figures(
        paid_orders=score.paid_orders,
        occasions=score.occasions,
        orders_in_window=score.orders_in_window,
        net_spend=_money(score.net_spend),
        lifetime_spend=_money(score.lifetime_spend),
        average_order_value=_money(score.average_order_value),
        first_purchase_at=score.first_purchase_at,
        last_purchase_at=score.last_purchase_at,
        days_since_last=None if score.days_since_last is None else round(score.days_since_last, 2),
        predicted_value=_money(round(score.predicted_value, 2)),
        expected_purchases=round(score.expected_purchases, 4),
        p_alive=round(score.p_alive, 4),
        expected_spend=_money(round(score.expected_spend, 2)),
        converted_referrals=score.converted_referrals,
        referred_revenue=_money(round(score.referred_revenue, 2)),
        reviews=score.reviews,
        shares=score.shares,
        as_of=score.as_of,
    )


def _tier_view(tiers: TiersConfig, row: CustomerTier | None) -> schemas.CustomerTierView:
    if row is None:
        prospect = tiers.get("prospect")
        return schemas.CustomerTierView(
            tier="prospect",
            tier_name=prospect.name if prospect else "Prospect",
            since=None,
            qualified_tier="prospect",
            explanation=f"{prospect.name if prospect else 'Prospect'}: no paid order yet",
            progress={"next_tier": None, "text": "place a first order", "missing": []},
            pinned_tier=None,
            pinned_until=None,
            pin_reason=None,
        )
    tier = tiers.get(row.tier)
    return schemas.CustomerTierView(
        tier=row.tier,
        tier_name=tier.name if tier else row.tier,
        since=row.since,
        qualified_tier=row.qualified_tier,
        explanation=row.explanation,
        progress=row.progress,
        pinned_tier=row.pinned_tier,
        pinned_until=row.pinned_until,
        pin_reason=row.pin_reason,
    )


async def customer_detail(session: AsyncSession, tiers: TiersConfig, external_id: str) -> schemas.CustomerDetail:
    profile = await get_customer(session, external_id)
    customer_id = await session.scalar(select(Customer.id).where(Customer.external_id == external_id))
    tier = await session.get(CustomerTier, customer_id)
    score = await session.get(CustomerScore, customer_id)
    return schemas.CustomerDetail(
        **profile.model_dump(),
        tier=_tier_view(tiers, tier),
        scores=scores_of(score),
        figures=figures_of(score),
        interests=[schemas.Interest(**item) for item in (score.interests if score else [])],
    )


def _filtered(statement: MemberSelect, tier: str | None, min_value_score: float | None) -> MemberSelect:
    if tier is not None:
        statement = statement.where(func.coalesce(CustomerTier.tier, "prospect") == tier)
    if min_value_score is not None:
        statement = statement.where(CustomerScore.value_score >= min_value_score)
    return statement


def _base() -> MemberSelect:
    statement: MemberSelect = (
        select(
            Customer.id,
            Customer.external_id,
            Customer.email,
            Customer.marketing_opt_out,
            CustomerTier.tier,
            CustomerScore,
        )
        .outerjoin(CustomerTier, CustomerTier.customer_id == Customer.id)
        .outerjoin(CustomerScore, CustomerScore.customer_id == Customer.id)
        .where(Customer.external_id.is_not(None))
    )
    return statement


async def list_customers(
    session: AsyncSession, tier: str | None, min_value_score: float | None, limit: int, cursor: str | None
) -> Page[schemas.CustomerListItem]:
    statement = _filtered(_base(), tier, min_value_score).order_by(Customer.id).limit(limit + 1)
    if cursor:
        statement = statement.where(Customer.id > decode_int_cursor(cursor))
    rows = (await session.execute(statement)).all()
    items = [
        schemas.CustomerListItem(
            customer_id=row.external_id,
            email=row.email,
            tier=row.tier or "prospect",
            scores=scores_of(row.CustomerScore),
            figures=figures_of(row.CustomerScore),
        )
        for row in rows[:limit]
    ]
    next_cursor = encode_cursor(str(rows[limit - 1].id)) if len(rows) > limit else None
    return Page(items=items, next_cursor=next_cursor)


async def export_csv(
    session_maker: async_sessionmaker[AsyncSession], tier: str | None, min_value_score: float | None
) -> AsyncIterator[bytes]:
    """Every matching member as CSV, streamed from a server-side cursor in chunks (constant memory)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EXPORT_COLUMNS)
    yield buffer.getvalue().encode()
    async with session_maker() as session:
        statement = _filtered(_base(), tier, min_value_score).order_by(Customer.id)
        result = await session.stream(statement.execution_options(yield_per=EXPORT_CHUNK))
        async for partition in result.partitions(EXPORT_CHUNK):
            buffer.seek(0)
            buffer.truncate()
            for row in partition:
                score: CustomerScore | None = row.CustomerScore
                writer.writerow(
                    [
                        _csv_safe(row.external_id),
                        _csv_safe(row.email or ""),
                        row.tier or "prospect",
                        *(
                            [score.value_score, score.frequency_score, score.influence_score, score.paid_orders]
                            if score
                            else [0, 0, 0, 0]
                        ),
                        *(
                            [
                                score.occasions,
                                score.orders_in_window,
                                _money(score.net_spend),
                                _money(score.lifetime_spend),
                                _money(score.average_order_value),
                                _money(round(score.predicted_value, 2)),
                                round(score.expected_purchases, 4),
                                round(score.p_alive, 4),
                                "" if score.days_since_last is None else round(score.days_since_last, 2),
                                score.converted_referrals,
                                _money(round(score.referred_revenue, 2)),
                                score.reviews,
                                score.shares,
                            ]
                            if score
                            else [0, 0, "0.00", "0.00", "0.00", "0.00", 0, 0, "", 0, "0.00", 0, 0]
                        ),
                        "true" if row.marketing_opt_out else "false",
                    ]
                )
            yield buffer.getvalue().encode()
        await session.rollback()


def _csv_safe(value: str) -> str:
    """Keep spreadsheet programs from running a cell as a formula (CSV injection)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


async def segments(session_maker: async_sessionmaker[AsyncSession], tiers: TiersConfig) -> schemas.SegmentList:
    """Tier sizes, shares of customers and of revenue (net spend in the window), and score spreads."""
    tier_codes: dict[str, int] = {tier.id: index for index, tier in enumerate(tiers.tier)}
    columns: list[np.ndarray[Any, Any]] = []
    async with session_maker() as session:
        statement = (
            select(
                func.coalesce(CustomerTier.tier, "prospect"),
                func.coalesce(CustomerScore.value_score, 0.0),
                func.coalesce(CustomerScore.frequency_score, 0.0),
                func.coalesce(CustomerScore.influence_score, 0.0),
                func.coalesce(CustomerScore.net_spend, 0),
            )
            .select_from(Customer)
            .outerjoin(CustomerTier, CustomerTier.customer_id == Customer.id)
            .outerjoin(CustomerScore, CustomerScore.customer_id == Customer.id)
        )
        result = await session.stream(statement.execution_options(yield_per=50_000))
        async for partition in result.partitions(50_000):
            columns.append(
                np.array(
                    [(tier_codes.get(t, -1), v, f, i, float(s)) for t, v, f, i, s in partition], dtype=np.float64
                ).reshape(-1, 5)
            )
        await session.rollback()
    table = np.concatenate(columns) if columns else np.zeros((0, 5))
    total = table.shape[0]
    revenue_total = float(table[:, 4].sum())
    items = []
    for tier in tiers.tier:
        mask = table[:, 0] == tier_codes[tier.id]
        count = int(mask.sum())
        spreads = {}
        for column, name in ((1, "value"), (2, "frequency"), (3, "influence")):
            values = table[mask, column]
            p10, p50, p90 = np.percentile(values, [10, 50, 90]) if count else (0.0, 0.0, 0.0)
            spreads[name] = schemas.ScoreSpread(
                p10=round(float(p10), 2), p50=round(float(p50), 2), p90=round(float(p90), 2)
            )
        revenue = float(table[mask, 4].sum())
        items.append(
            schemas.Segment(
                tier=tier.id,
                name=tier.name,
                customers=count,
                share=round(count / total, 4) if total else 0.0,
                revenue_share=round(revenue / revenue_total, 4) if revenue_total else 0.0,
                scores=spreads,
            )
        )
    return schemas.SegmentList(items=items, customers=total)
