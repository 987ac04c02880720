"""Finding customers by the storefront's id, creating the unknown ones race-free."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.dialect import insert_ignoring_conflicts
from loyalty.db.models import Customer
from loyalty.lib.clock import utcnow
from loyalty.lib.errors import NOT_FOUND, ProblemError


async def find_customer_id(session: AsyncSession, external_id: str) -> int | None:
    return await session.scalar(select(Customer.id).where(Customer.external_id == external_id))


async def require_customer_id(session: AsyncSession, external_id: str) -> int:
    customer_id = await find_customer_id(session, external_id)
    if customer_id is None:
        raise ProblemError(NOT_FOUND, f"No customer with customer_id {external_id!r}")
    return customer_id


async def ensure_customer_ids(session: AsyncSession, external_ids: Iterable[str]) -> dict[str, int]:
    """Internal ids for storefront ids, creating customers not seen before.

    Concurrent requests may create the same customer: ``ON CONFLICT DO NOTHING`` lets exactly one insert win
    and the others read the winner's row, instead of failing on the unique key.
    """
    wanted = sorted(set(external_ids))
    if not wanted:
        return {}
    found = dict(
        (await session.execute(select(Customer.external_id, Customer.id).where(Customer.external_id.in_(wanted)))).all()
    )
    missing = [external_id for external_id in wanted if external_id not in found]
    if missing:
        now = utcnow()
        statement = insert_ignoring_conflicts(session, Customer, ["external_id"])
        await session.execute(
            statement,
            [
                {"external_id": e, "attributes": {}, "marketing_opt_out": False, "created_at": now, "updated_at": now}
                for e in missing
            ],
        )
        created = await session.execute(
            select(Customer.external_id, Customer.id).where(Customer.external_id.in_(missing))
        )
        found.update(dict(created.all()))
    return {str(key): value for key, value in found.items()}


async def ensure_customer_id(session: AsyncSession, external_id: str) -> int:
    return (await ensure_customer_ids(session, [external_id]))[external_id]
