"""Customer profiles: create or update, read, mint a customer token."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from loyalty.access.tokens import mint_customer_token
from loyalty.activity.schemas import ReferralCreate
from loyalty.activity.services import Written, create_referral
from loyalty.customers import schemas
from loyalty.customers.lookup import ensure_customer_id, require_customer_id
from loyalty.db.models import Customer, OutboxEvent, Referral
from loyalty.lib.clock import utcnow
from loyalty.lib.errors import NOT_FOUND, ProblemError
from loyalty.tiers.badge_cache import note_changed as note_badges_changed


async def get_customer(session: AsyncSession, external_id: str) -> schemas.Customer:
    referrer = aliased(Customer)
    row = (
        await session.execute(
            select(Customer, referrer.external_id)
            .outerjoin(Referral, Referral.referee_id == Customer.id)
            .outerjoin(referrer, referrer.id == Referral.referrer_id)
            .where(Customer.external_id == external_id)
        )
    ).first()
    if row is None:
        raise ProblemError(NOT_FOUND, f"No customer with customer_id {external_id!r}")
    customer, referred_by = row
    return schemas.Customer(
        customer_id=external_id,
        email=customer.email,
        joined_at=customer.joined_at,
        attributes=customer.attributes,
        marketing_opt_out=customer.marketing_opt_out,
        referred_by=referred_by,
        created_at=customer.created_at,
        updated_at=customer.updated_at,
    )


async def upsert_customer(
    session: AsyncSession, external_id: str, data: schemas.CustomerUpsert
) -> Written[schemas.Customer]:
    """Create the profile if it is new, then apply the fields that were sent."""
    existed = await session.scalar(select(Customer.id).where(Customer.external_id == external_id))
    customer_id = existed if existed is not None else await ensure_customer_id(session, external_id)
    changes = data.model_dump(exclude_unset=True, exclude={"referred_by"})
    changes = {key: value for key, value in changes.items() if value is not None or key in ("email", "joined_at")}
    if changes:
        await session.execute(update(Customer).where(Customer.id == customer_id).values(**changes, updated_at=utcnow()))
    affected: tuple[int, ...] = ()
    if data.referred_by is not None:
        referral = ReferralCreate(
            referrer_id=data.referred_by, referee_id=external_id, occurred_at=_referral_time(data.joined_at)
        )
        written = await create_referral(session, referral, field="referred_by", replay_ignores_time=True)
        affected = written.customer_ids if written.created else ()
    return Written(await get_customer(session, external_id), created=existed is None, customer_ids=affected)


def _referral_time(joined_at: datetime | None) -> datetime:
    return joined_at or utcnow()


async def mint_token(session: AsyncSession, external_id: str, secret: str, ttl_seconds: int) -> schemas.CustomerToken:
    customer_id = await require_customer_id(session, external_id)
    token, expires_at = mint_customer_token(customer_id, external_id, secret, ttl_seconds)
    return schemas.CustomerToken(token=token, expires_at=expires_at)


async def erase_customer(session: AsyncSession, external_id: str) -> None:
    """Erase a customer's personal data; orders and scores stay, anonymised, so aggregates and results hold.

    The storefront id is unlinked (later activity under it starts a new customer), email and attributes are
    removed, the customer is opted out, and the outbox events about them are deleted. Tokens minted before the
    erasure stop working, because they name the storefront id.
    """
    customer_id = await session.scalar(select(Customer.id).where(Customer.external_id == external_id))
    if customer_id is None:
        raise ProblemError(NOT_FOUND, f"No customer with customer_id {external_id!r}")
    note_badges_changed(session, [customer_id])
    await session.execute(
        update(Customer)
        .where(Customer.id == customer_id)
        .values(
            external_id=None, email=None, attributes={}, marketing_opt_out=True, erased_at=utcnow(), updated_at=utcnow()
        )
    )
    await session.execute(delete(OutboxEvent).where(OutboxEvent.customer_id == customer_id))
