"""Finding customers by the storefront's id, creating the unknown ones race-free."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.db.bulk import in_list
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


@dataclass(frozen=True)
class EnsuredCustomers:
    """Internal ids by storefront id, and which of those customers this call created."""

    ids: dict[str, int]
    created: frozenset[str]


async def ensure_customers(session: AsyncSession, external_ids: Iterable[str]) -> EnsuredCustomers:
    """Internal ids for storefront ids, creating customers not seen before.

    Concurrent requests may create the same customer: ``ON CONFLICT DO NOTHING`` lets exactly one insert win
    and the others read the winner's row, instead of failing on the unique key. Ids are inserted in sorted order,
    so two requests creating overlapping sets wait on each other in one direction only, never in a cycle.
    """
    wanted = sorted(set(external_ids))
    if not wanted:
        return EnsuredCustomers({}, frozenset())
    found: dict[str, int] = {
        str(external_id): customer_id
        for external_id, customer_id in await session.execute(
            select(Customer.external_id, Customer.id).where(in_list(session, Customer.external_id, wanted))
        )
    }
    missing = [external_id for external_id in wanted if external_id not in found]
    if not missing:
        return EnsuredCustomers(found, frozenset())
    now = utcnow()
    statement = insert_ignoring_conflicts(session, Customer, ["external_id"]).returning(
        Customer.external_id, Customer.id
    )
    inserted = {
        str(external_id): customer_id
        for external_id, customer_id in await session.execute(
            statement,
            [
                {"external_id": e, "attributes": {}, "marketing_opt_out": False, "created_at": now, "updated_at": now}
                for e in missing
            ],
        )
    }
    found.update(inserted)
    # Customers another transaction created between our read and our insert: theirs are the rows to use.
    raced = [external_id for external_id in missing if external_id not in inserted]
    if raced:
        found.update(
            (str(external_id), customer_id)
            for external_id, customer_id in await session.execute(
                select(Customer.external_id, Customer.id).where(in_list(session, Customer.external_id, raced))
            )
        )
    return EnsuredCustomers(found, frozenset(inserted))


async def ensure_customer_ids(session: AsyncSession, external_ids: Iterable[str]) -> dict[str, int]:
    """Internal ids for storefront ids, creating customers not seen before (race-free, see ``ensure_customers``)."""
    return (await ensure_customers(session, external_ids)).ids


async def ensure_customer_id(session: AsyncSession, external_id: str) -> int:
    return (await ensure_customer_ids(session, [external_id]))[external_id]
