"""Finding customers by the storefront's id, creating the unknown ones race-free."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import CursorResult, Insert, Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from loyalty.db.bulk import in_parameter
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


async def ensure_customers(
    session: AsyncSession, external_ids: Iterable[str], stored: dict[str, int] | None = None
) -> EnsuredCustomers:
    """Internal ids for storefront ids, creating customers not seen before.

    Concurrent requests may create the same customer: ``ON CONFLICT DO NOTHING`` lets exactly one insert win
    and the others read the winner's row, instead of failing on the unique key. Ids are inserted in sorted order,
    so two requests creating overlapping sets wait on each other in one direction only, never in a cycle.

    ``stored``: the stored customers among these ids, as the caller already read them in this transaction (with
    something else it needed, saving the lookup's round trip); an id it lacks is created as if the lookup had not
    found it.
    """
    wanted = sorted(set(external_ids))
    if not wanted:
        return EnsuredCustomers({}, frozenset())
    # The session's connection runs these Core statements: the ORM session's own per-statement work cost more
    # than the lookup on every order. The session flushes nothing on its own (autoflush is off), so this is the
    # same as before.
    connection = await session.connection()
    dialect = connection.dialect.name
    if stored is None:
        stored = {
            str(external_id): customer_id for external_id, customer_id in await _find_ids(connection, dialect, wanted)
        }
    found = {external_id: stored[external_id] for external_id in wanted if external_id in stored}
    missing = [external_id for external_id in wanted if external_id not in found]
    if not missing:
        return EnsuredCustomers(found, frozenset())
    now = utcnow()
    inserted = {
        str(external_id): customer_id
        for external_id, customer_id in await connection.execute(
            _insert_new_customers(dialect),
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
            (str(external_id), customer_id) for external_id, customer_id in await _find_ids(connection, dialect, raced)
        )
    return EnsuredCustomers(found, frozenset(inserted))


async def _find_ids(
    connection: AsyncConnection, dialect: str, external_ids: list[str]
) -> CursorResult[str | None, int]:
    # One id (a single order's customer) is an equality: PostgreSQL keeps one generic plan of it, where it plans
    # the array form of a list anew on every call. Lists keep the array: one statement whatever their length.
    if len(external_ids) == 1:
        return await connection.execute(_id_by_external_id(), {"external_id": external_ids[0]})
    return await connection.execute(_ids_by_external_id(dialect), {"external_ids": external_ids})


# Built once per process and database kind: every order, refund and event resolves its customer through these.
@functools.cache
def _ids_by_external_id(dialect: str) -> Select[str | None, int]:
    return select(Customer.external_id, Customer.id).where(in_parameter(dialect, Customer.external_id, "external_ids"))


@functools.cache
def _id_by_external_id() -> Select[str | None, int]:
    return select(Customer.external_id, Customer.id).where(Customer.external_id == bindparam("external_id"))


@functools.cache
def _insert_new_customers(dialect: str) -> Insert:
    return insert_ignoring_conflicts(dialect, Customer, ["external_id"]).returning(Customer.external_id, Customer.id)


async def ensure_customer_ids(session: AsyncSession, external_ids: Iterable[str]) -> dict[str, int]:
    """Internal ids for storefront ids, creating customers not seen before (race-free, see ``ensure_customers``)."""
    return (await ensure_customers(session, external_ids)).ids


async def ensure_customer_id(session: AsyncSession, external_id: str) -> int:
    return (await ensure_customer_ids(session, [external_id]))[external_id]
