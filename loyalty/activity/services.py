"""Idempotent ingestion: each write is keyed by the storefront's id, so retries and races never double a record."""

from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from sqlalchemy import (
    BigInteger,
    CompoundSelect,
    Insert,
    Select,
    bindparam,
    cast,
    delete,
    func,
    insert,
    literal,
    null,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from loyalty.activity import schemas
from loyalty.customers.lookup import ensure_customer_id, ensure_customer_ids, ensure_customers
from loyalty.db.base import Base
from loyalty.db.bulk import in_list, in_parameter, insert_new_rows, insert_rows
from loyalty.db.dialect import advisory_lock, insert_ignoring_conflicts, plan_for_these_parameters
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
from loyalty.recalc import incremental
from loyalty.tiers.config import TiersConfig

# Referral checks read the whole chain above a customer; one lock for all referral writes keeps two
# concurrent referrals from closing a cycle that neither could see alone. Referrals are rare, so it is cheap.
T = TypeVar("T")
_REFERRAL_LOCK_KEY = zlib.crc32(b"loyalty.referral")
_ORDER_TABLE, _ITEM_TABLE = (Base.metadata.tables[model.__tablename__] for model in (Order, OrderItem))


@dataclass(frozen=True)
class Written(Generic[T]):
    """A stored resource and whether this call created it (201) or replayed it (200)."""

    resource: T
    created: bool
    # Internal ids of the customers whose figures this write changed, for the real-time re-score.
    customer_ids: tuple[int, ...] = ()
    # The customers (with their referrers) this write has already locked for the re-score, if it did.
    locked: tuple[int, ...] | None = None


def _conflict(kind_name: str, external_id: str) -> ProblemError:
    return ProblemError(
        CONFLICT,
        f"{kind_name} {external_id!r} already exists with different content; use a new id for a different "
        f"{kind_name.lower()}",
    )


# ---------------------------------------------------------------- orders


def order_conflict(order_id: str) -> ProblemError:
    return _conflict("Order", order_id)


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


@functools.cache
def _insert_new_order(dialect: str) -> Insert:
    """Built once per process and database kind: building it took longer than running it, on every order."""
    return insert_ignoring_conflicts(dialect, Order, ["external_id"]).returning(Order.id)


_INSERT_ITEM = insert(_ITEM_TABLE)
# The item columns a new order's statement takes as arrays (PostgreSQL), one array per column.
_ITEM_FIELDS = ("sku", "category", "quantity", "unit_price")


@functools.cache
def _insert_new_orders_and_lock(alone: bool) -> Select[Any]:
    """PostgreSQL: new orders (one alone, or a group's), their items and the re-score's lock on their customers
    (and referrers) in one statement: three round trips become one on every order and every group.

    Every column travels as one array. The orders' insert is a data-modifying CTE answering the orders it inserted
    (an id stored meanwhile by a concurrent request inserts nothing); the items' insert joins their orders'
    external ids to it, so only inserted orders get items. The lock is ``incremental.lock_statement`` on the
    customers of the inserted orders (and their referrers), the set the re-score would lock on its own: a customer
    whose order lost to a concurrent request is neither locked nor re-scored, as when the order is posted alone.
    Each locked row carries the inserted ids as ``inserted``; no row answered means nothing was inserted.

    An order ``alone`` names its customer in the ``customer_ids`` parameter instead: the same set whenever the
    order is inserted, and planned on the customer indexes from a list, where the set read back from the insert
    cost 0.3-0.6 ms more per order (``create_order``'s median on one connection, 20k demo customers).
    """
    order = (
        func.unnest(
            *(bindparam(f"order_{name}", type_=postgresql.ARRAY(_ORDER_TABLE.c[name].type)) for name in ORDER_COLUMNS)
        )
        .table_valued(*ORDER_COLUMNS)
        .render_derived(name="new_order")
    )
    new_orders = (
        postgresql.insert(Order)
        .from_select(ORDER_COLUMNS, select(*(order.c[name] for name in ORDER_COLUMNS)))
        .on_conflict_do_nothing(index_elements=["external_id"])
        .returning(Order.id, Order.external_id, Order.customer_id)
        .cte("new_orders")
    )
    item_columns = ("external_order_id", "line_no", *_ITEM_FIELDS)
    item = (
        func.unnest(
            bindparam("item_external_order_id", type_=postgresql.ARRAY(_ORDER_TABLE.c.external_id.type)),
            bindparam("item_line_no", type_=postgresql.ARRAY(_ITEM_TABLE.c.line_no.type)),
            *(bindparam(f"item_{name}", type_=postgresql.ARRAY(_ITEM_TABLE.c[name].type)) for name in _ITEM_FIELDS),
        )
        .table_valued(*item_columns)
        .render_derived(name="item")
    )
    new_items = insert(_ITEM_TABLE).from_select(
        ITEM_COLUMNS,
        select(new_orders.c.id, *(item.c[name] for name in item_columns[1:])).join_from(
            new_orders, item, item.c.external_order_id == new_orders.c.external_id
        ),
    )
    # Counting the inserted orders runs their insert to the end before any customer is locked (EXISTS would stop
    # at the first), so orders and locks are taken in the order of separate statements, and never in a cycle.
    any_inserted = select(func.count()).select_from(new_orders).scalar_subquery() > 0
    inserted = select(func.array_agg(new_orders.c.external_id)).scalar_subquery().label("inserted")
    return (
        incremental.lock_statement(
            "postgresql",
            with_referrers=True,
            only_if=any_inserted,
            customers=None if alone else select(new_orders.c.customer_id),
        )
        .add_columns(inserted)
        .add_cte(new_items.cte("new_items"))
    )


def _new_orders_parameters(
    order_rows: Sequence[tuple[Any, ...]], orders: Sequence[schemas.OrderCreate]
) -> dict[str, Any]:
    """``_insert_new_orders_and_lock``'s arrays: ``order_rows`` (values in ``ORDER_COLUMNS`` order) and the items
    of their ``orders``, numbered by line within each order."""
    items = [(data.order_id, line_no, item) for data in orders for line_no, item in enumerate(data.items)]
    return {
        **{
            f"order_{name}": list(values)
            for name, values in zip(ORDER_COLUMNS, zip(*order_rows, strict=True), strict=True)
        },
        "item_external_order_id": [order_id for order_id, _line_no, _item in items],
        "item_line_no": [line_no for _order_id, line_no, _item in items],
        **{f"item_{name}": [getattr(item, name) for _order_id, _line_no, item in items] for name in _ITEM_FIELDS},
    }


async def create_order(session: AsyncSession, data: schemas.OrderCreate) -> Written[schemas.Order]:
    """Store an order once; a replay with the same content returns it, a different one is a 409."""
    customer_id = await ensure_customer_id(session, data.customer_id)
    content_hash = schemas.order_content_hash(data)
    now = utcnow()
    order = {
        "external_id": data.order_id,
        "customer_id": customer_id,
        "placed_at": data.placed_at,
        "total": data.total,
        "refunded": Decimal(0),
        "currency": data.currency,
        "channel": data.channel,
        "content_hash": content_hash,
        "created_at": now,
    }
    # The session's connection runs the inserts: nothing is pending in the session to flush first, and the
    # session's own per-statement work was a noticeable part of every order.
    connection = await session.connection()
    locked: tuple[int, ...] | None = None
    order_id: int | None = None
    if connection.dialect.name == "postgresql":
        parameters = _new_orders_parameters([tuple(order[name] for name in ORDER_COLUMNS)], [data])
        parameters["customer_ids"] = [customer_id]
        locked = tuple(row.id for row in await connection.execute(_insert_new_orders_and_lock(alone=True), parameters))
        created = bool(locked)  # no row locked: nothing inserted
    else:
        order_id = await connection.scalar(_insert_new_order(connection.dialect.name), order)
        created = order_id is not None
    if not created:
        existing = await _stored_order(session, data.order_id)
        if existing.content_hash != content_hash:
            raise order_conflict(data.order_id)
        return Written(
            await _order_view(session, existing, data.customer_id), created=False, customer_ids=(customer_id,)
        )
    if data.items and order_id is not None:
        # The table, not the ORM class: the ORM's bulk path would also fetch every new item's id, unused here.
        await connection.execute(
            _INSERT_ITEM,
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
    return Written(new_order_view(data, now), created=True, customer_ids=(customer_id,), locked=locked)


def new_order_view(data: schemas.OrderCreate, created_at: datetime) -> schemas.Order:
    """A just-created order as the API answers it: what was sent, nothing refunded yet."""
    return schemas.Order(
        **data.model_dump(exclude={"placed_at", "items"}),
        placed_at=data.placed_at,
        items=data.items,
        refunded=Decimal(0),
        created_at=created_at,
    )


async def stored_order_view(session: AsyncSession, data: schemas.OrderCreate) -> tuple[schemas.Order, int]:
    """The stored order a replay of ``data`` answers with, and its customer's internal id."""
    existing = await _stored_order(session, data.order_id)
    return await _order_view(session, existing, data.customer_id), existing.customer_id


async def _stored_order(session: AsyncSession, order_id: str) -> Order:
    existing = await session.scalar(select(Order).where(Order.external_id == order_id))
    # Only asked for an order id found stored (an insert's ON CONFLICT waited for its commit); none is deleted.
    assert existing is not None
    return existing


async def tiers_after(
    session: AsyncSession, written: Written[Any], tiers: TiersConfig, cache: incremental.ModelCache
) -> dict[int, str]:
    """A new write re-scores its customers in its transaction; a replay changed nothing and reads their tiers."""
    if not written.created:
        return await incremental.current_tiers(session, written.customer_ids)
    return await incremental.rescore_after_write(session, written.customer_ids, tiers, cache, locked=written.locked)


async def create_orders_batch(
    session: AsyncSession, raw_orders: Sequence[Any]
) -> tuple[schemas.OrderBatchResult, set[int]]:
    """Validate every order, then write the valid ones together; one bad order never rejects the others.

    Each order's outcome is ``write_orders``'. Returns the result and the customers with new orders, to be
    re-scored once for the whole batch.
    """
    results: list[schemas.BatchItemResult | None] = [None] * len(raw_orders)
    valid: list[tuple[int, schemas.OrderCreate]] = []
    for index, raw in enumerate(raw_orders):
        try:
            data = schemas.OrderCreate.model_validate(raw)
        except ValidationError as error:
            order_id = raw.get("order_id") if isinstance(raw, dict) else None
            problem = validation_problem(error, prefix=f"orders[{index}]")
            label = order_id if isinstance(order_id, str) else None
            results[index] = schemas.BatchItemResult(order_id=label, status=problem.status, problem=problem.to_dict())
            continue
        valid.append((index, data))
    # Batches are how a shop loads its history, often into a young database: see plan_for_these_parameters.
    await plan_for_these_parameters(session)
    written = await write_orders(session, [data for _index, data in valid])
    for (index, data), status in zip(valid, written.statuses, strict=True):
        if status == CONFLICT.status:
            problem = order_conflict(data.order_id)
            results[index] = schemas.BatchItemResult(order_id=data.order_id, status=status, problem=problem.to_dict())
        else:
            results[index] = schemas.BatchItemResult(order_id=data.order_id, status=status)
    final = [result for result in results if result is not None]
    assert len(final) == len(raw_orders)  # every order has exactly one outcome
    created, replayed = written.statuses.count(201), written.statuses.count(200)
    failed = len(final) - created - replayed
    result = schemas.OrderBatchResult(results=final, created=created, replayed=replayed, failed=failed)
    return result, set(written.customers.values())


@dataclass(frozen=True)
class OrdersWritten:
    """What ``write_orders`` did with each order it was given."""

    # Per order, in the order given: 201 created, 200 a replay of what is stored, 409 a conflict with it.
    statuses: list[int]
    # The customer (internal id) of each order created, by order id.
    customers: dict[str, int]
    # When the created orders were stored (their ``created_at``).
    created_at: datetime
    # What ``lock_statement`` (with referrers) answered, if the write took the re-score's lock (``lock_for_rescore``).
    locked: tuple[int, ...] | None = None


async def write_orders(
    session: AsyncSession, orders: Sequence[schemas.OrderCreate], lock_for_rescore: bool = False
) -> OrdersWritten:
    """Store valid orders together, each with the outcome posting them one by one, in order, would give.

    The first occurrence of a new order id is created (201); a later one in the list, or an id already stored, is
    a replay (200) when its content is the same and a conflict (409) otherwise. Nothing is re-scored here; with
    ``lock_for_rescore``, PostgreSQL takes the re-score's lock in the orders' own statement (``locked``).
    """
    hashes = [schemas.order_content_hash(data) for data in orders]
    firsts: dict[str, int] = {}
    for index, data in enumerate(orders):
        firsts.setdefault(data.order_id, index)
    candidates = [(orders[index], hashes[index]) for index in firsts.values()]
    written = await _write_new_orders(session, candidates, lock_for_rescore)
    statuses: list[int] = []
    for index, (data, content_hash) in enumerate(zip(orders, hashes, strict=True)):
        if data.order_id in written.inserted and firsts[data.order_id] == index:
            statuses.append(201)
        elif written.stored_hashes[data.order_id] == content_hash:
            statuses.append(200)
        else:
            statuses.append(CONFLICT.status)
    return OrdersWritten(statuses, written.inserted, written.created_at, written.locked)


@dataclass(frozen=True)
class _BatchWrite:
    # Customer (internal id) of each order this batch inserted, by order id.
    inserted: dict[str, int]
    # Content hash stored for every order id of the batch, inserted now or before.
    stored_hashes: dict[str, str]
    created_at: datetime
    # The customers (with their referrers) locked for the re-score by the insert itself, if it took the lock.
    locked: tuple[int, ...] | None = None


ORDER_COLUMNS = (
    "external_id",
    "customer_id",
    "placed_at",
    "total",
    "refunded",
    "currency",
    "channel",
    "content_hash",
    "created_at",
)
ITEM_COLUMNS = ("order_id", "line_no", "sku", "category", "quantity", "unit_price")


@functools.cache
def _stored_orders_and_customers(dialect: str) -> CompoundSelect[Any]:
    """The content hash of each stored order among ``order_ids`` and the internal id of each stored customer among
    ``customer_ids`` (a row with a ``customer_id`` is a customer): one round trip, where each group of single
    orders paid two before writing anything."""
    return union_all(
        select(Order.external_id, Order.content_hash, cast(null(), BigInteger).label("customer_id")).where(
            in_parameter(dialect, Order.external_id, "order_ids")
        ),
        select(Customer.external_id, cast(null(), Order.content_hash.type), Customer.id).where(
            in_parameter(dialect, Customer.external_id, "customer_ids")
        ),
    )


async def _write_new_orders(
    session: AsyncSession, candidates: list[tuple[schemas.OrderCreate, str]], lock_for_rescore: bool = False
) -> _BatchWrite:
    """Insert the orders not stored yet (one candidate per id) and their items, in a handful of statements; with
    ``lock_for_rescore`` on PostgreSQL, the insert also takes the re-score's lock (``_insert_new_orders_and_lock``)."""
    now = utcnow()
    if not candidates:
        return _BatchWrite({}, {}, now)
    # Read first, so replays and conflicts of stored orders create no customer, as a single 409 creates none.
    connection = await session.connection()
    stored_hashes: dict[str, str] = {}
    stored_customers: dict[str, int] = {}
    wanted = {
        "order_ids": [data.order_id for data, _hash in candidates],
        "customer_ids": sorted({data.customer_id for data, _hash in candidates}),
    }
    for external_id, content_hash, customer_id in await connection.execute(
        _stored_orders_and_customers(connection.dialect.name), wanted
    ):
        if customer_id is None:
            stored_hashes[external_id] = content_hash
        else:
            stored_customers[external_id] = customer_id
    new = sorted(
        (entry for entry in candidates if entry[0].order_id not in stored_hashes), key=lambda entry: entry[0].order_id
    )
    if not new:
        return _BatchWrite({}, stored_hashes, now)
    customers = await ensure_customers(session, (data.customer_id for data, _hash in new), stored_customers)
    order_rows = [
        (
            data.order_id,
            customers.ids[data.customer_id],
            data.placed_at,
            data.total,
            Decimal(0),
            data.currency,
            data.channel,
            content_hash,
            now,
        )
        for data, content_hash in new
    ]
    locked: tuple[int, ...] | None = None
    if lock_for_rescore and connection.dialect.name == "postgresql":
        parameters = _new_orders_parameters(order_rows, [data for data, _hash in new])
        rows = (await connection.execute(_insert_new_orders_and_lock(alone=False), parameters)).all()
        inserted_orders = set(rows[0].inserted) if rows else set()
        locked = tuple(row.id for row in rows)
    else:
        inserted_ids: dict[str, int] = dict(
            await insert_new_rows(
                connection,
                _ORDER_TABLE,
                ORDER_COLUMNS,
                order_rows,
                conflict_column="external_id",
                returning=("external_id", "id"),
            )
        )
        inserted_orders = set(inserted_ids)
        await insert_rows(
            connection,
            _ITEM_TABLE,
            ITEM_COLUMNS,
            [
                (inserted_ids[data.order_id], line_no, item.sku, item.category, item.quantity, item.unit_price)
                for data, _hash in new
                if data.order_id in inserted_ids
                for line_no, item in enumerate(data.items)
            ],
        )
    inserted: dict[str, int] = {}
    for data, content_hash in new:
        if data.order_id in inserted_orders:
            inserted[data.order_id] = customers.ids[data.customer_id]
            stored_hashes[data.order_id] = content_hash
    # Orders a concurrent request stored between our read and our insert (ON CONFLICT waited for it to commit).
    lost = [data.order_id for data, _hash in new if data.order_id not in inserted_orders]
    if lost:
        stored_hashes.update(
            (
                await session.execute(
                    select(Order.external_id, Order.content_hash).where(in_list(session, Order.external_id, lost))
                )
            ).all()
        )
        # A customer created here only for an order that turned out to conflict would outlive the 409.
        unused = {customers.ids[external] for external in customers.created} - set(inserted.values())
        if unused:
            await session.execute(delete(Customer).where(Customer.id.in_(sorted(unused))))
    return _BatchWrite(inserted, stored_hashes, now, locked)


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
