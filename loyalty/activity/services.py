"""Idempotent ingestion: each write is keyed by the storefront's id, so retries and races never double a record."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from sqlalchemy import insert, literal, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.activity import schemas
from loyalty.customers.lookup import ensure_customer_id, ensure_customer_ids
from loyalty.db.dialect import advisory_lock, insert_ignoring_conflicts
from loyalty.db.models import Customer, InteractionEvent, Order, OrderItem, Referral, Refund
from loyalty.lib.clock import utcnow
from loyalty.lib.errors import (
    CONFLICT,
    NOT_FOUND,
    REFEREE_CLAIMED,
    REFERRAL_CYCLE,
    REFUND_EXCEEDS,
    SELF_REFERRAL,
    FieldError,
    ProblemError,
    field_problem,
    validation_problem,
)
from loyalty.lib.schemas import Schema

# Referral checks read the whole chain above a customer; one lock for all referral writes keeps two
# concurrent referrals from closing a cycle that neither could see alone. Referrals are rare, so it is cheap.
T = TypeVar("T")
_REFERRAL_LOCK_KEY = zlib.crc32(b"loyalty.referral")


@dataclass(frozen=True)
class Written(Generic[T]):
    """A stored resource and whether this call created it (201) or replayed it (200)."""

    resource: T
    created: bool
    # Internal ids of the customers whose figures this write changed, for the real-time re-score.
    customer_ids: tuple[int, ...] = ()


def _conflict(kind_name: str, external_id: str) -> ProblemError:
    return ProblemError(
        CONFLICT,
        f"{kind_name} {external_id!r} already exists with different content; use a new id for a different "
        f"{kind_name.lower()}",
    )


# ---------------------------------------------------------------- orders


async def _order_view(session: AsyncSession, order: Order, external_customer_id: str) -> schemas.Order:
    items = (
        await session.scalars(select(OrderItem).where(OrderItem.order_id == order.id).order_by(OrderItem.line_no))
    ).all()
    return schemas.Order(
        order_id=order.external_id,
        customer_id=external_customer_id,
        placed_at=order.placed_at,
        total=order.total,
        currency=order.currency,
        items=[
            schemas.OrderItemIn(sku=i.sku, category=i.category, quantity=i.quantity, unit_price=i.unit_price)
            for i in items
        ],
        channel=order.channel,
        refunded=order.refunded,
        created_at=order.created_at,
    )


async def create_order(session: AsyncSession, data: schemas.OrderCreate) -> Written[schemas.Order]:
    """Store an order once; a replay with the same content returns it, a different one is a 409."""
    customer_id = await ensure_customer_id(session, data.customer_id)
    content_hash = data.content_hash()
    now = utcnow()
    statement = insert_ignoring_conflicts(session, Order, ["external_id"]).returning(Order.id)
    order_id = await session.scalar(
        statement,
        {
            "external_id": data.order_id,
            "customer_id": customer_id,
            "placed_at": data.placed_at,
            "total": data.total,
            "refunded": Decimal(0),
            "currency": data.currency,
            "channel": data.channel,
            "content_hash": content_hash,
            "created_at": now,
        },
    )
    if order_id is None:
        existing = await session.scalar(select(Order).where(Order.external_id == data.order_id))
        assert existing is not None  # the conflicting row is committed: ON CONFLICT waited for it
        if existing.content_hash != content_hash:
            raise _conflict("Order", data.order_id)
        return Written(
            await _order_view(session, existing, data.customer_id), created=False, customer_ids=(customer_id,)
        )
    if data.items:
        await session.execute(
            insert(OrderItem),
            [
                {
                    "order_id": order_id,
                    "line_no": line_no,
                    "sku": item.sku,
                    "category": item.category,
                    "quantity": item.quantity,
                    "unit_price": item.unit_price,
                }
                for line_no, item in enumerate(data.items)
            ],
        )
    view = schemas.Order(
        **data.model_dump(exclude={"placed_at", "items"}),
        placed_at=data.placed_at,
        items=data.items,
        refunded=Decimal(0),
        created_at=now,
    )
    return Written(view, created=True, customer_ids=(customer_id,))


async def create_orders_batch(
    session: AsyncSession, raw_orders: Sequence[Any]
) -> tuple[schemas.OrderBatchResult, set[int]]:
    """Each order in its own savepoint: one bad order rolls back alone and never rejects the others.

    Returns the result and the customers with new orders, to be re-scored once for the whole batch.
    """
    results: list[schemas.BatchItemResult] = []
    affected: set[int] = set()
    created = replayed = failed = 0
    for index, raw in enumerate(raw_orders):
        order_id = raw.get("order_id") if isinstance(raw, dict) else None
        label = order_id if isinstance(order_id, str) else None
        try:
            data = schemas.OrderCreate.model_validate(raw)
        except ValidationError as error:
            problem = validation_problem(error, prefix=f"orders[{index}]")
            results.append(schemas.BatchItemResult(order_id=label, status=problem.status, problem=problem.to_dict()))
            failed += 1
            continue
        try:
            async with session.begin_nested():
                written = await create_order(session, data)
        except ProblemError as problem:
            results.append(schemas.BatchItemResult(order_id=label, status=problem.status, problem=problem.to_dict()))
            failed += 1
            continue
        results.append(schemas.BatchItemResult(order_id=data.order_id, status=201 if written.created else 200))
        if written.created:
            created += 1
            affected.update(written.customer_ids)
        else:
            replayed += 1
    result = schemas.OrderBatchResult(results=results, created=created, replayed=replayed, failed=failed)
    return result, affected


# ---------------------------------------------------------------- refunds


async def create_refund(
    session: AsyncSession, order_external_id: str, data: schemas.RefundCreate
) -> Written[schemas.Refund]:
    """Refunds of one order together never exceed its total, even when several arrive at once."""
    order = (
        await session.execute(
            select(Order.id, Order.customer_id, Order.placed_at, Customer.external_id.label("customer_external_id"))
            .join(Customer, Customer.id == Order.customer_id)
            .where(Order.external_id == order_external_id)
        )
    ).first()
    if order is None:
        raise ProblemError(NOT_FOUND, f"No order with order_id {order_external_id!r}")
    if data.refunded_at < order.placed_at:
        raise field_problem("refunded_at", "must not be before the order was placed")
    # The order is part of the content: the same refund id against another order is a conflict.
    content_hash = content_hash_with(data, order_external_id)
    now = utcnow()
    statement = insert_ignoring_conflicts(session, Refund, ["external_id"]).returning(Refund.id)
    refund_id = await session.scalar(
        statement,
        {
            "external_id": data.refund_id,
            "order_id": order.id,
            "customer_id": order.customer_id,
            "amount": data.amount,
            "refunded_at": data.refunded_at,
            "content_hash": content_hash,
            "created_at": now,
        },
    )
    if refund_id is None:
        existing = await session.scalar(select(Refund).where(Refund.external_id == data.refund_id))
        assert existing is not None
        if existing.content_hash != content_hash:
            raise _conflict("Refund", data.refund_id)
        view = schemas.Refund(
            refund_id=existing.external_id,
            order_id=order_external_id,
            customer_id=order.customer_external_id,
            amount=existing.amount,
            refunded_at=existing.refunded_at,
            created_at=existing.created_at,
        )
        return Written(view, created=False, customer_ids=(order.customer_id,))
    # One conditional UPDATE: the row lock it takes orders concurrent refunds, and the condition sees the
    # committed running total, so no interleaving can push refunds past the order total.
    accepted = await session.scalar(
        update(Order)
        .where(Order.id == order.id, Order.refunded + literal(data.amount, Order.refunded.type) <= Order.total)
        .values(refunded=Order.refunded + literal(data.amount, Order.refunded.type))
        .returning(Order.id)
    )
    if accepted is None:
        raise ProblemError(
            REFUND_EXCEEDS,
            f"Refunds of order {order_external_id!r} would exceed its total",
            errors=[FieldError("amount", "refunds of this order together would exceed its total")],
        )
    view = schemas.Refund(
        refund_id=data.refund_id,
        order_id=order_external_id,
        customer_id=order.customer_external_id,
        amount=data.amount,
        refunded_at=data.refunded_at,
        created_at=now,
    )
    return Written(view, created=True, customer_ids=(order.customer_id,))


def content_hash_with(data: Schema, *context: str) -> str:
    """The stored content hash of a write whose identity also depends on context (a refund's order)."""
    return hashlib.sha256((data.content_hash() + "|" + "|".join(context)).encode()).hexdigest()


# ---------------------------------------------------------------- events


async def record_events(session: AsyncSession, raw_events: Sequence[Any]) -> schemas.EventBatchResult:
    """Store valid events in one statement; invalid ones are reported by index, duplicates only counted."""
    valid: list[schemas.EventIn] = []
    rejected: list[schemas.RejectedEvent] = []
    for index, raw in enumerate(raw_events):
        try:
            valid.append(schemas.EventIn.model_validate(raw))
        except ValidationError as error:
            problem = validation_problem(error, prefix=f"events[{index}]")
            rejected.append(schemas.RejectedEvent(index=index, problem=problem.to_dict()))
    accepted = 0
    if valid:
        customer_ids = await ensure_customer_ids(session, (event.customer_id for event in valid))
        now = utcnow()
        statement = insert_ignoring_conflicts(session, InteractionEvent, ["external_id"]).returning(
            InteractionEvent.external_id
        )
        inserted = await session.scalars(
            statement,
            [
                {
                    "external_id": event.event_id,
                    "customer_id": customer_ids[event.customer_id],
                    "type": event.type,
                    "target": event.target,
                    "occurred_at": event.occurred_at,
                    "created_at": now,
                }
                for event in valid
            ],
        )
        accepted = len(inserted.all())
    return schemas.EventBatchResult(accepted=accepted, duplicates=len(valid) - accepted, rejected=rejected)


# ---------------------------------------------------------------- referrals

_CHAIN_REACHES = text(
    """
    WITH RECURSIVE chain(customer_id, depth) AS (
        SELECT referrer_id, 1 FROM referral WHERE referee_id = :start
        UNION ALL
        SELECT r.referrer_id, c.depth + 1 FROM referral r JOIN chain c ON r.referee_id = c.customer_id
        WHERE c.depth < 100000
    )
    SELECT 1 FROM chain WHERE customer_id = :target LIMIT 1
    """
)


async def create_referral(
    session: AsyncSession,
    data: schemas.ReferralCreate,
    *,
    field: str | None = None,
    replay_ignores_time: bool = False,
) -> Written[schemas.Referral]:
    """Record who referred whom; refuses self-referral, a referee claimed by someone else, and cycles."""
    # The customer PUT reports every referral error against its own `referred_by` field.
    referrer_field = field or "referrer_id"
    referee_field = field or "referee_id"
    if data.referrer_id == data.referee_id:
        raise field_problem(referee_field, "a customer cannot refer themselves", SELF_REFERRAL)
    ids = await ensure_customer_ids(session, [data.referrer_id, data.referee_id])
    referrer, referee = ids[data.referrer_id], ids[data.referee_id]
    await advisory_lock(session, _REFERRAL_LOCK_KEY)
    existing = (
        await session.execute(
            select(Referral, Customer.external_id)
            .join(Customer, Customer.id == Referral.referrer_id)
            .where(Referral.referee_id == referee)
        )
    ).first()
    if existing is not None:
        referral, referrer_external = existing
        if referral.referrer_id != referrer:
            raise field_problem(
                referee_field, f"already referred by another customer ({referrer_external!r})", REFEREE_CLAIMED
            )
        # A profile update resends `referred_by` with no time of its own; only the referral route's time counts.
        if referral.occurred_at != data.occurred_at and not replay_ignores_time:
            raise _conflict("Referral", f"{data.referrer_id}->{data.referee_id}")
        view = schemas.Referral(
            referrer_id=data.referrer_id,
            referee_id=data.referee_id,
            occurred_at=referral.occurred_at,
            created_at=referral.created_at,
        )
        return Written(view, created=False, customer_ids=(referrer, referee))
    # A cycle closes when the referee already stands somewhere above the referrer.
    if await session.scalar(_CHAIN_REACHES, {"start": referrer, "target": referee}):
        raise field_problem(
            referrer_field,
            f"{data.referee_id!r} already refers {data.referrer_id!r} directly or indirectly; this would be a cycle",
            REFERRAL_CYCLE,
        )
    now = utcnow()
    session.add(Referral(referrer_id=referrer, referee_id=referee, occurred_at=data.occurred_at, created_at=now))
    await session.flush()
    view = schemas.Referral(
        referrer_id=data.referrer_id, referee_id=data.referee_id, occurred_at=data.occurred_at, created_at=now
    )
    return Written(view, created=True, customer_ids=(referrer, referee))
