"""Codes at checkout: check without redeeming, redeem (never past the uses allowed), void to give a use back."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.dialect import insert_ignoring_conflicts
from loyalty.db.models import Customer, IssuedCode, Offer, OutboxEvent, Redemption
from loyalty.lib.clock import utcnow
from loyalty.lib.errors import (
    CODE_BELOW_MINIMUM,
    CODE_EXPIRED,
    CODE_NOT_THEIRS,
    CODE_UNKNOWN,
    CODE_USED_UP,
    CONFLICT,
    NOT_FOUND,
    FieldError,
    ProblemError,
    ProblemKind,
)
from loyalty.offers import schemas
from loyalty.offers.services import offer_view


def _normalise(code: str) -> str:
    return code.strip().upper()


async def _code_with_owner(session: AsyncSession, code: str) -> Any:
    row = (
        await session.execute(
            select(IssuedCode, Offer, Customer.external_id)
            .join(Offer, Offer.id == IssuedCode.offer_id)
            .join(Customer, Customer.id == IssuedCode.customer_id)
            .where(IssuedCode.code == _normalise(code))
        )
    ).first()
    if row is None:
        raise ProblemError(CODE_UNKNOWN, "No offer code with this value", errors=[FieldError("code", "unknown code")])
    return row


def _refusal(
    issued: IssuedCode, offer: Offer, owner: str | None, customer_id: str | None, total: Decimal | None, now: datetime
) -> tuple[ProblemKind, str, str] | None:
    """Why the code cannot be used now (kind, field, message), or None."""
    if customer_id is not None and owner != customer_id:
        return CODE_NOT_THEIRS, "customer_id", "the code was issued to another customer"
    if issued.expires_at <= now or issued.status == "expired":
        return CODE_EXPIRED, "code", f"the code expired at {issued.expires_at.isoformat()}"
    if issued.uses_left <= 0:
        return CODE_USED_UP, "code", "every use of the code has been redeemed"
    if total is not None and offer.min_order_total is not None and total < offer.min_order_total:
        return CODE_BELOW_MINIMUM, "order_total", f"the offer needs an order of at least {offer.min_order_total}"
    return None


async def check_code(
    session: AsyncSession, code: str, customer_id: str | None, order_total: Decimal | None
) -> schemas.CodeCheck:
    issued, offer, owner = await _code_with_owner(session, code)
    refusal = _refusal(issued, offer, owner, customer_id, order_total, utcnow())
    return schemas.CodeCheck(
        code=issued.code,
        valid=refusal is None,
        reason=refusal[2] if refusal else None,
        offer=offer_view(offer),
        expires_at=issued.expires_at,
        uses_left=issued.uses_left,
    )


def _view(redemption: Redemption, issued: IssuedCode, offer: Offer, customer_id: str) -> schemas.Redemption:
    return schemas.Redemption(
        redemption_id=redemption.id,
        code=issued.code,
        customer_id=customer_id,
        order_id=redemption.order_ref,
        order_total=redemption.order_total,
        redeemed_at=redemption.redeemed_at,
        voided_at=redemption.voided_at,
        offer=offer_view(offer),
    )


async def redeem(session: AsyncSession, data: schemas.RedemptionCreate) -> tuple[schemas.Redemption, bool]:
    """Redeem a code for an order; (redemption, created). A replay for the same order returns the first one."""
    now = utcnow()
    issued, offer, owner = await _code_with_owner(session, data.code)
    existing = await session.scalar(
        select(Redemption).where(Redemption.code_id == issued.id, Redemption.order_ref == data.order_id)
    )
    if existing is not None:
        return _replay(existing, issued, offer, owner, data), False
    refusal = _refusal(issued, offer, owner, data.customer_id, data.order_total, now)
    if refusal is not None:
        kind, field, message = refusal
        raise ProblemError(kind, message, errors=[FieldError(field, message)])
    redemption_id = await session.scalar(
        insert_ignoring_conflicts(session, Redemption, ["code_id", "order_ref"]).returning(Redemption.id),
        {
            "code_id": issued.id,
            "customer_id": issued.customer_id,
            "order_ref": data.order_id,
            "order_total": data.order_total,
            "redeemed_at": now,
        },
    )
    if redemption_id is None:
        # A concurrent request for the same order won; answer as its replay.
        raced = await session.scalar(
            select(Redemption).where(Redemption.code_id == issued.id, Redemption.order_ref == data.order_id)
        )
        assert raced is not None
        return _replay(raced, issued, offer, owner, data), False
    # The conditional decrement is the only guard that holds under any concurrency: it takes the code's row lock
    # and re-checks the uses left as committed, so a use is never given twice.
    remaining = await session.scalar(
        update(IssuedCode)
        .where(IssuedCode.id == issued.id, IssuedCode.uses_left > 0, IssuedCode.expires_at > now)
        .values(uses_left=IssuedCode.uses_left - 1)
        .returning(IssuedCode.uses_left)
    )
    if remaining is None:
        raise ProblemError(
            CODE_USED_UP, "every use of the code has been redeemed", errors=[FieldError("code", "no use left")]
        )
    session.add(
        OutboxEvent(
            event_type="offer.redeemed",
            customer_id=issued.customer_id,
            dedupe_key=f"offer.redeemed:{redemption_id}",
            occurred_at=now,
            payload={
                "code": issued.code,
                "customer_id": owner,
                "offer_id": offer.id,
                "campaign_id": issued.campaign_id,
                "order_id": data.order_id,
                "order_total": str(data.order_total),
                "redemption_id": redemption_id,
            },
            created_at=now,
        )
    )
    redemption = await session.get(Redemption, redemption_id)
    assert redemption is not None
    await session.flush()
    return _view(redemption, issued, offer, owner), True


def _replay(
    redemption: Redemption, issued: IssuedCode, offer: Offer, owner: str, data: schemas.RedemptionCreate
) -> schemas.Redemption:
    if owner != data.customer_id or redemption.order_total != data.order_total:
        raise ProblemError(
            CONFLICT, f"Code {issued.code} was already redeemed for order {data.order_id!r} with different content"
        )
    return _view(redemption, issued, offer, owner)


async def void(session: AsyncSession, redemption_id: int) -> None:
    """Void a redemption (the order was cancelled) and give the use back; voiding twice changes nothing."""
    voided = await session.scalar(
        update(Redemption)
        .where(Redemption.id == redemption_id, Redemption.voided_at.is_(None))
        .values(voided_at=utcnow())
        .returning(Redemption.code_id)
    )
    if voided is None:
        if await session.get(Redemption, redemption_id) is None:
            raise ProblemError(NOT_FOUND, f"No redemption with redemption_id {redemption_id}")
        return
    await session.execute(update(IssuedCode).where(IssuedCode.id == voided).values(uses_left=IssuedCode.uses_left + 1))
