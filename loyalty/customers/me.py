"""A customer's own view: rewards status, offers, history, and everything held about them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from loyalty.customers import reports
from loyalty.customers.services import get_customer
from loyalty.db.models import (
    Customer,
    CustomerScore,
    CustomerTier,
    InteractionEvent,
    IssuedCode,
    Offer,
    Order,
    OrderItem,
    Redemption,
    Referral,
    Refund,
)
from loyalty.lib.clock import utcnow
from loyalty.lib.money import format_money
from loyalty.offers.services import offer_view
from loyalty.tiers import services as tier_services
from loyalty.tiers.config import TiersConfig


def describe_scores(value: float, frequency: float, influence: float, scored: bool) -> dict[str, str]:
    """Scores in words for the customer: where they stand, not raw percentiles."""
    if not scored:
        return {
            "value": "no purchases yet",
            "frequency": "no purchases yet",
            "influence": "no referrals or reviews yet",
        }

    def standing(score: float, what: str) -> str:
        if score >= 90:
            return f"among our top 10% of customers by {what}"
        if score >= 75:
            return f"in our top quarter of customers by {what}"
        if score >= 50:
            return f"above the median customer by {what}"
        if score > 0:
            return f"growing: more {what} moves you up"
        return f"just getting started on {what}"

    return {
        "value": standing(value, "value"),
        "frequency": standing(frequency, "how often you shop"),
        "influence": standing(influence, "referrals, reviews and shares")
        if influence > 0
        else "no referrals or reviews yet",
    }


async def my_status(session: AsyncSession, tiers: TiersConfig, customer_id: int) -> dict[str, Any]:
    """The badge plus scores in words: one read of the customer with their tier and score rows."""
    row = (
        await session.execute(
            select(
                Customer.external_id,
                Customer.created_at,
                CustomerTier.tier,
                CustomerTier.since,
                CustomerTier.progress,
                CustomerTier.pinned_until,
                CustomerScore.value_score,
                CustomerScore.frequency_score,
                CustomerScore.influence_score,
                CustomerScore.paid_orders,
            )
            .outerjoin(CustomerTier, CustomerTier.customer_id == Customer.id)
            .outerjoin(CustomerScore, CustomerScore.customer_id == Customer.id)
            .where(Customer.id == customer_id)
        )
    ).one()
    badge = tier_services.badge_from_row(tiers, row.external_id, row)
    scored = bool(row.paid_orders)
    return {
        "customer_id": row.external_id,
        "tier": badge.tier,
        "tier_name": badge.tier_name,
        "since": badge.since,
        "benefits": badge.benefits,
        "next_tier": badge.next_tier,
        "progress": badge.progress.model_dump(mode="json"),
        "scores_text": describe_scores(
            row.value_score or 0.0, row.frequency_score or 0.0, row.influence_score or 0.0, scored
        ),
        "pinned_until": badge.pinned_until,
    }


async def my_offers(session: AsyncSession, customer_id: int) -> list[dict[str, Any]]:
    """Own codes, newest first, with their status now."""
    now = utcnow()
    rows = await session.execute(
        select(IssuedCode, Offer)
        .join(Offer, Offer.id == IssuedCode.offer_id)
        .where(IssuedCode.customer_id == customer_id)
        .order_by(IssuedCode.issued_at.desc(), IssuedCode.id.desc())
        .limit(500)
    )
    items = []
    for code, offer in rows:
        if code.uses_left <= 0:
            status = "used"
        elif code.expires_at <= now or code.status == "expired":
            status = "expired"
        else:
            status = "active"
        items.append(
            {
                "code": code.code,
                "offer": offer_view(offer).model_dump(mode="json"),
                "status": status,
                "issued_at": code.issued_at,
                "expires_at": code.expires_at,
                "uses_left": code.uses_left,
            }
        )
    return items


async def my_history(session: AsyncSession, customer_id: int) -> list[dict[str, Any]]:
    return [item.model_dump(mode="json", by_alias=True) for item in await tier_services.history(session, customer_id)]


async def my_export(session: AsyncSession, tiers: TiersConfig, customer_id: int) -> dict[str, Any]:
    """Everything held about the customer, as one document (data portability)."""
    external_id = await session.scalar(select(Customer.external_id).where(Customer.id == customer_id))
    assert external_id is not None
    profile = await get_customer(session, external_id)
    orders = []
    for order in await session.scalars(select(Order).where(Order.customer_id == customer_id).order_by(Order.placed_at)):
        items = await session.scalars(
            select(OrderItem).where(OrderItem.order_id == order.id).order_by(OrderItem.line_no)
        )
        orders.append(
            {
                "order_id": order.external_id,
                "placed_at": order.placed_at,
                "total": format_money(order.total),
                "refunded": format_money(order.refunded),
                "currency": order.currency,
                "channel": order.channel,
                "items": [
                    {
                        "sku": i.sku,
                        "category": i.category,
                        "quantity": i.quantity,
                        "unit_price": format_money(i.unit_price),
                    }
                    for i in items
                ],
            }
        )
    refunds = [
        {"refund_id": r.external_id, "amount": format_money(r.amount), "refunded_at": r.refunded_at}
        for r in await session.scalars(
            select(Refund).where(Refund.customer_id == customer_id).order_by(Refund.refunded_at)
        )
    ]
    events = [
        {"event_id": e.external_id, "type": e.type, "target": e.target, "occurred_at": e.occurred_at}
        for e in await session.scalars(
            select(InteractionEvent)
            .where(InteractionEvent.customer_id == customer_id)
            .order_by(InteractionEvent.occurred_at)
        )
    ]
    referrer, referee = aliased(Customer), aliased(Customer)
    referrals = [
        {"referrer_id": row.referrer, "referee_id": row.referee, "occurred_at": row.occurred_at}
        for row in await session.execute(
            select(referrer.external_id.label("referrer"), referee.external_id.label("referee"), Referral.occurred_at)
            .join(referrer, referrer.id == Referral.referrer_id)
            .join(referee, referee.id == Referral.referee_id)
            .where(or_(Referral.referrer_id == customer_id, Referral.referee_id == customer_id))
        )
    ]
    score = await session.get(CustomerScore, customer_id)
    redemptions = [
        {
            "redemption_id": r.id,
            "code": code,
            "order_id": r.order_ref,
            "order_total": format_money(r.order_total),
            "redeemed_at": r.redeemed_at,
            "voided_at": r.voided_at,
        }
        for r, code in await session.execute(
            select(Redemption, IssuedCode.code)
            .join(IssuedCode, IssuedCode.id == Redemption.code_id)
            .where(Redemption.customer_id == customer_id)
        )
    ]
    return {
        "profile": profile.model_dump(mode="json"),
        "orders": orders,
        "refunds": refunds,
        "events": events,
        "referrals": referrals,
        "scores": reports.scores_of(score).model_dump(mode="json"),
        "figures": None if score is None else reports.figures_of(score).model_dump(mode="json"),  # type: ignore[union-attr]
        "tier": await my_status(session, tiers, customer_id),
        "tier_history": await my_history(session, customer_id),
        "offers": await my_offers(session, customer_id),
        "redemptions": redemptions,
        "exported_at": utcnow(),
    }
