"""Bulk import of history from CSV files: orders (a generic layout or a shop platform's export), customers, events.

Files are streamed: a csv reader over the open file (any iterable of lines, even an unseekable stream), rows
grouped into records as they come, each record validated with the API's own schemas (``OrderCreate``,
``RefundCreate``, ``CustomerUpsert``, ``EventIn``; plain valid orders by a fast path that accepts exactly what
``OrderCreate`` accepts), and ``batch_size`` records written at a time, one transaction per batch, with set-based
statements (on PostgreSQL, whole columns as arrays and items by COPY). One batch is written while the next is read,
so memory holds two batches, whatever the file size.

Every write is keyed by the storefront id with ``INSERT ... ON CONFLICT DO NOTHING`` and the same content hash
the API stores, so re-running a file imports nothing twice: a record already stored with the same content
(imported before, or sent to the API) counts as a duplicate; one stored with different content is rejected as a
conflict, as the API answers 409. Skipped and rejected records go to the rejects CSV: their original rows plus a
``reason`` column. A batch that fails on the database stops the import; the batches before it stay committed and
a re-run picks up where it stopped.

An order's rows must be consecutive. Rows of an order that reappear later in the same batch are rejected (the
first group stands); in a later batch the stored-content check decides: identical content is a duplicate,
anything else a conflict. Remembering every id of the file would take memory in proportion to its size.

Import writes history only, nobody is re-scored per order: the next full recalculation scores the imported
customers.

Generic orders (``generic``)
    ``order_id, customer_id, placed_at, total, currency`` and optionally ``channel`` and the item columns
    ``sku, category, quantity, unit_price`` (``category`` optional). Consecutive rows with the same ``order_id``
    are that order's items and must agree on the order's fields (later rows may leave them empty). Without item
    columns an order has no items. ``placed_at`` is RFC 3339 with an offset; a naive time is rejected, as by the API.

Shop platform order export (``shop-export``, Shopify's layout: one row per line item; only an order's first row
carries the order-level fields)
    - ``order_id`` = ``Name`` (``#1001``).
    - ``customer_id`` = ``Email``, trimmed and lower-cased so one shopper is one customer; also stored as the
      customer's email when it is a valid address and the customer has none yet. No email: rejected.
    - ``placed_at`` = ``Paid at``, else ``Created at`` (``2024-03-05 14:03:21 -0500`` or RFC 3339).
    - ``total`` = ``Subtotal``: goods after discounts (``Discount Amount`` is already taken off), without
      ``Shipping`` and ``Taxes``, which is the service's definition of an order total. ``Total`` is not used.
    - ``currency`` = ``Currency``.
    - items: ``Lineitem sku`` (``Lineitem name`` when the sku is empty), ``Lineitem quantity``, ``Lineitem price``;
      the export has no category.
    - refund ``<Name>-refund``: ``Financial Status`` ``refunded`` or ``voided`` refunds the whole total; otherwise a
      ``Refunded Amount`` above zero is refunded, capped at the total (the export's amount includes refunded tax
      and shipping, which the total leaves out). The export has no refund date: ``Cancelled at`` when present and
      not earlier than ``placed_at``, else ``placed_at`` itself.
    - ``Financial Status`` other than ``paid``, ``partially_refunded``, ``refunded``, ``voided`` (``pending``,
      ``authorized``, ``partially_paid``, ``unpaid``, ``expired`` ...): skipped with the reason.

Customers: ``customer_id`` and optionally ``email``, ``joined_at``, ``marketing_opt_out``; every other column is an
attribute (empty cells are left out). New customers are created, existing ones updated like the API's PUT (empty
cells keep the stored value, attributes are merged); an unchanged customer counts as a duplicate.

Events: ``event_id, customer_id, type, target, occurred_at``, as ``POST /v1/events``.
"""

from __future__ import annotations

import asyncio
import csv
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, TextIO, TypeGuard, TypeVar

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from loyalty.activity.schemas import EventIn, OrderContent, OrderCreate, RefundCreate, order_content_hash
from loyalty.activity.services import ITEM_COLUMNS, ORDER_COLUMNS, content_hash_with
from loyalty.customers.lookup import ensure_customer_ids, ensure_customers
from loyalty.customers.schemas import AttributeValue, CustomerUpsert, Email
from loyalty.db.base import Base
from loyalty.db.bulk import in_list, insert_new_rows, insert_rows
from loyalty.db.dialect import insert_ignoring_conflicts
from loyalty.db.models import Customer, InteractionEvent, Order, OrderItem, Refund
from loyalty.db.session import create_session_maker, transaction
from loyalty.db.statistics import analyze_after_load
from loyalty.lib.clock import EARLIEST, FUTURE_SLACK, utcnow
from loyalty.lib.errors import validation_problem
from loyalty.lib.money import MAX_AMOUNT, parse_money
from loyalty.lib.schemas import ExternalId
from loyalty.settings import get_settings

OrderFormat = Literal["generic", "shop-export"]
ORDER_FORMATS: tuple[OrderFormat, ...] = ("generic", "shop-export")
DEFAULT_BATCH_SIZE = 5000
# Groups of rows parsed between two pauses that let the batch being written talk to the database.
_PARSE_SLICE = 100

CUSTOMER_TABLE, ORDER_TABLE, ORDER_ITEM_TABLE, REFUND_TABLE = (
    Base.metadata.tables[model.__tablename__] for model in (Customer, Order, OrderItem, Refund)
)

GENERIC_ORDER_COLUMNS = ("order_id", "customer_id", "placed_at", "total", "currency")
GENERIC_ITEM_COLUMNS = ("sku", "quantity", "unit_price")
SHOP_REQUIRED_COLUMNS = ("name", "email", "financial status", "currency", "subtotal")
SHOP_IMPORTED_STATUSES = frozenset({"paid", "partially_refunded", "refunded", "voided"})
SHOP_FULLY_REFUNDED_STATUSES = frozenset({"refunded", "voided"})
# Where the service's fields come from in a shop export, so a reason names the column a person can fix.
SHOP_SOURCES = {
    "order_id": "Name",
    "customer_id": "Email",
    "placed_at": "Paid at/Created at",
    "total": "Subtotal",
    "currency": "Currency",
    "sku": "Lineitem sku",
    "quantity": "Lineitem quantity",
    "unit_price": "Lineitem price",
    "amount": "Refunded Amount",
    "refund_id": "Name",
}
CUSTOMER_FIELDS = ("customer_id", "email", "joined_at", "marketing_opt_out")
EVENT_COLUMNS = ("event_id", "customer_id", "type", "target", "occurred_at")

NOT_CONSECUTIVE = "rows of this order are not consecutive: the order appeared earlier in the file"
ORDER_CONFLICT = "order_id already stored with different content; use a new id for a different order"
REFUND_CONFLICT = "refund already stored with different content"
REFUND_EXCEEDS = "the order is stored, but this refund would take its refunds above the order total"

_EMAIL: TypeAdapter[str] = TypeAdapter(Email)
_EXTERNAL_ID: TypeAdapter[str] = TypeAdapter(ExternalId)
R = TypeVar("R")


class ImportFileError(ValueError):
    """The file cannot be imported at all (missing columns, not CSV, not UTF-8); nothing more is read."""


@dataclass
class ImportSummary:
    """What one import read and wrote; ``reasons`` counts the skipped and rejected records by reason."""

    kind: str
    rows: int = 0
    imported: int = 0
    updated: int = 0
    refunds: int = 0
    duplicates: int = 0
    skipped: int = 0
    rejected: int = 0
    customers_created: int = 0
    seconds: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def records(self) -> int:
        """Records (orders, customers or events) dealt with so far."""
        return self.imported + self.updated + self.duplicates + self.skipped + self.rejected


Progress = Callable[[ImportSummary], None]


class _Rejects:
    """The rejects CSV: each skipped or rejected record's original rows with a ``reason`` column."""

    def __init__(self, out: TextIO | None, header: Sequence[str], summary: ImportSummary) -> None:
        self._writer = csv.writer(out) if out is not None else None
        self.summary = summary
        if self._writer is not None:
            self._writer.writerow([*header, "reason"])

    def add(self, rows: Sequence[Sequence[str]], reason: str, *, skipped: bool = False) -> None:
        if skipped:
            self.summary.skipped += 1
        else:
            self.summary.rejected += 1
        self.summary.reasons[reason] += 1
        if self._writer is not None:
            self._writer.writerows([*row, reason] for row in rows)


class _Columns:
    """Cells by column name; names match case-insensitively and short rows read as empty cells."""

    def __init__(self, header: Sequence[str]) -> None:
        self.header = list(header)
        self.index: dict[str, int] = {}
        for position, name in enumerate(header):
            self.index.setdefault(name.strip().lower(), position)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def missing(self, names: Iterable[str]) -> list[str]:
        return [name for name in names if name not in self.index]

    def get(self, row: Sequence[str], name: str) -> str:
        position = self.index.get(name)
        if position is None or position >= len(row):
            return ""
        return row[position].strip()

    def picker(self, names: Sequence[str]) -> Callable[[Sequence[str]], list[str]]:
        """A function reading the named cells of a row at once, as ``get`` reads them one by one."""
        positions = [self.index.get(name) for name in names]
        width = max((position for position in positions if position is not None), default=-1) + 1

        def pick(row: Sequence[str]) -> list[str]:
            if len(row) < width:
                return [self.get(row, name) for name in names]
            return [row[position].strip() if position is not None else "" for position in positions]

        return pick

    def width_problem(self, rows: Sequence[Sequence[str]]) -> str | None:
        for row in rows:
            if len(row) > len(self.header):
                return f"a row has {len(row)} cells but the header has {len(self.header)} columns"
        return None


def _reason(error: ValidationError, sources: dict[str, str] | None = None) -> str:
    """One line naming every field at fault, as the API's 422 lists them."""
    parts = []
    for problem in validation_problem(error).errors or []:
        name = problem.field
        if sources:
            leaf = name.rsplit(".", 1)[-1]
            source = sources.get(leaf)
            name = f"{name} ({source})" if source else name
        parts.append(f"{name}: {problem.message}")
    return "; ".join(parts)


# ---------------------------------------------------------------- reading


def _read(lines: Iterable[str]) -> tuple[list[str], Iterator[list[str]]]:
    """The header and an iterator over the data rows; blank lines are passed over."""
    reader = csv.reader(lines)

    def guarded() -> Iterator[list[str]]:
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield row
        except (csv.Error, UnicodeDecodeError) as error:
            raise ImportFileError(
                f"line {reader.line_num + 1}: cannot read the file further ({error}); the batches before it "
                "were imported, and a re-run after fixing the file imports nothing twice"
            ) from None

    rows = guarded()
    try:
        header = next(reader)
    except StopIteration:
        raise ImportFileError("the file is empty: no header row") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise ImportFileError(f"cannot read the header row: {error}") from None
    if header:
        # A byte order mark survives when the caller opened the file as plain UTF-8 (spreadsheet exports).
        header[0] = header[0].removeprefix("\ufeff")
    return header, rows


def _grouped(rows: Iterator[list[str]], key_position: int) -> Iterator[list[list[str]]]:
    """Consecutive rows sharing a non-empty key, as one group each."""
    group: list[list[str]] = []
    key = ""
    for row in rows:
        row_key = row[key_position].strip() if key_position < len(row) else ""
        if group and row_key and row_key == key:
            group.append(row)
            continue
        if group:
            yield group
        group, key = [row], row_key
    if group:
        yield group


# ---------------------------------------------------------------- orders: parsing


@dataclass(frozen=True)
class _OrderRecord:
    rows: list[list[str]]
    order: OrderContent
    content_hash: str
    refund: RefundCreate | None = None
    refund_hash: str | None = None
    email: str | None = None


@dataclass(frozen=True)
class _Skip:
    reason: str
    skipped: bool = False


# The plain forms of CSV cells that the fast path below accepts without pydantic; anything else is validated by
# ``OrderCreate`` itself, which also words every rejection.
_PLAIN_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)")
_PLAIN_AMOUNT = re.compile(r"\d{1,10}(?:\.\d{1,4})?")
_PLAIN_QUANTITY = re.compile(r"[1-9]\d{0,6}")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")
_ITEM_FIELDS = frozenset({"sku", "category", "quantity", "unit_price"})
_ORDER_FIELDS = frozenset({*GENERIC_ORDER_COLUMNS, "channel", "items"})


def _plain_label(value: Any) -> TypeGuard[str]:
    """What ``ExternalId`` and ``Label`` accept: 1 to 255 characters, no control characters."""
    return isinstance(value, str) and 0 < len(value) <= 255 and _CONTROL_CHARACTER.search(value) is None


def _plain_time(value: Any, latest: datetime) -> datetime | None:
    """``EventTime`` for an RFC 3339 text (or an aware datetime) inside the accepted bounds, else None."""
    if isinstance(value, str):
        if _PLAIN_TIME.fullmatch(value) is None:
            return None
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        return None
    try:
        value = value.astimezone(UTC)
    except OverflowError:
        return None
    return value if EARLIEST <= value <= latest else None


def _plain_money(value: Any, fraction_digits: int) -> Decimal | None:
    """``Money`` for a decimal text: plain digits directly (the value ``parse_money`` gives them), others through it."""
    if not isinstance(value, str):
        return None
    if _PLAIN_AMOUNT.fullmatch(value) is not None and len(value.partition(".")[2]) <= fraction_digits:
        amount = Decimal(value)
        return amount if amount <= MAX_AMOUNT else None
    try:
        return parse_money(value)
    except ValueError:
        return None


@dataclass(slots=True)
class _PlainItem:
    sku: str
    quantity: int
    unit_price: Decimal
    category: str | None


@dataclass(slots=True)
class _PlainOrder:
    """An order the fast path validated: the values ``OrderCreate`` would hold, without building the model."""

    order_id: str
    customer_id: str
    placed_at: datetime
    total: Decimal
    currency: str
    items: list[_PlainItem]
    channel: str | None


def _fast_order(raw: dict[str, Any]) -> _PlainOrder | None:
    """The values ``OrderCreate.model_validate(raw)`` gives, for the plain valid orders that fill nearly every file.

    It accepts only what the schema accepts and yields the same values (the money parser is the schema's own, times
    are UTC as ``EventTime`` makes them), so a row is imported or rejected exactly as the API would, for a fraction
    of pydantic's price. Whatever it does not recognise as plain answers None and goes to the schema, which decides
    and words the reason. Tests compare the two on valid and invalid input.
    """
    if not raw.keys() <= _ORDER_FIELDS:
        return None
    order_id, customer_id, channel = raw.get("order_id"), raw.get("customer_id"), raw.get("channel")
    if not (_plain_label(order_id) and _plain_label(customer_id) and (channel is None or _plain_label(channel))):
        return None
    settings = get_settings()
    fraction_digits = settings.currency_exponent
    placed_at = _plain_time(raw.get("placed_at"), utcnow() + FUTURE_SLACK)
    total = _plain_money(raw.get("total"), fraction_digits)
    currency = raw.get("currency")
    if placed_at is None or total is None or not isinstance(currency, str) or currency.upper() != settings.currency:
        return None
    raw_items = raw.get("items", [])
    if not isinstance(raw_items, list) or len(raw_items) > 1000:
        return None
    items = []
    for raw_item in raw_items:
        if not isinstance(raw_item, dict) or not raw_item.keys() <= _ITEM_FIELDS:
            return None
        sku, category, quantity = raw_item.get("sku"), raw_item.get("category"), raw_item.get("quantity")
        unit_price = _plain_money(raw_item.get("unit_price"), fraction_digits)
        if (
            unit_price is None
            or not _plain_label(sku)
            or (category is not None and not _plain_label(category))
            or not isinstance(quantity, str)
            or _PLAIN_QUANTITY.fullmatch(quantity) is None
            or int(quantity) > 1_000_000
        ):
            return None
        items.append(_PlainItem(sku, int(quantity), unit_price, category))
    return _PlainOrder(order_id, customer_id, placed_at, total, settings.currency, items, channel)


def _validated_order(raw: dict[str, Any]) -> OrderContent:
    """The order as the API's schema validates it; raises its ValidationError for the reason."""
    return _fast_order(raw) or OrderCreate.model_validate(raw)


class _GenericOrders:
    """Parses the row groups of a generic order file, reading each row's cells by precomputed position."""

    ORDER_FIELDS = (*GENERIC_ORDER_COLUMNS, "channel")
    # Fields every row of an order may repeat, and must then repeat identically.
    SHARED_FIELDS = ("customer_id", "placed_at", "total", "currency", "channel")

    def __init__(self, columns: _Columns, with_items: bool) -> None:
        self.with_items = with_items
        self.order_cells = columns.picker(self.ORDER_FIELDS)
        self.shared_cells = columns.picker(self.SHARED_FIELDS)
        self.item_cells = columns.picker(("sku", "category", "quantity", "unit_price"))

    def __call__(self, rows: list[list[str]]) -> _OrderRecord | _Skip:
        order_id, customer_id, placed_at, total, currency, channel = self.order_cells(rows[0])
        first = (customer_id, placed_at, total, currency, channel)
        for row in rows[1:]:
            for name, value, expected in zip(self.SHARED_FIELDS, self.shared_cells(row), first, strict=True):
                if value and value != expected:
                    return _Skip(f"rows of this order disagree on {name}")
        raw: dict[str, Any] = {
            "order_id": order_id,
            "customer_id": customer_id,
            "placed_at": placed_at,
            "total": total,
            "currency": currency,
        }
        if channel:
            raw["channel"] = channel
        if self.with_items:
            items = []
            for row in rows:
                sku, category, quantity, unit_price = cells = self.item_cells(row)
                if any(cells):
                    items.append(
                        {"sku": sku, "category": category or None, "quantity": quantity, "unit_price": unit_price}
                    )
            raw["items"] = items
        try:
            order = _validated_order(raw)
        except ValidationError as error:
            return _Skip(_reason(error))
        return _OrderRecord(rows, order, order_content_hash(order))


def _shop_time(value: str) -> datetime | str:
    """The export's ``2024-03-05 14:03:21 -0500``; anything else goes to the schema as text, to judge as the API."""
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S %z")
    except ValueError:
        return value


def _shop_order(columns: _Columns, rows: list[list[str]]) -> _OrderRecord | _Skip:
    first = rows[0]
    status = columns.get(first, "financial status").lower().replace(" ", "_")
    if status not in SHOP_IMPORTED_STATUSES:
        return _Skip(f"financial status {status or 'empty'!r}: not a paid order", skipped=True)
    email = columns.get(first, "email").lower()
    if not email:
        return _Skip("Email is empty: the customer cannot be identified")
    items = []
    for row in rows:
        cells = {
            "sku": columns.get(row, "lineitem sku") or columns.get(row, "lineitem name"),
            "quantity": columns.get(row, "lineitem quantity"),
            "unit_price": columns.get(row, "lineitem price"),
        }
        if any(cells.values()):
            items.append(cells)
    raw = {
        "order_id": columns.get(first, "name"),
        "customer_id": email,
        "placed_at": _shop_time(columns.get(first, "paid at") or columns.get(first, "created at")),
        "total": columns.get(first, "subtotal"),
        "currency": columns.get(first, "currency"),
        "items": items,
    }
    try:
        order = _validated_order(raw)
    except ValidationError as error:
        return _Skip(_reason(error, SHOP_SOURCES))
    try:
        refund = _shop_refund(columns, first, order, status)
    except ValidationError as error:
        return _Skip(_reason(error, SHOP_SOURCES))
    except InvalidOperation:
        return _Skip(f"Refunded Amount: {columns.get(first, 'refunded amount')[:40]!r} is not a decimal amount")
    try:
        stored_email: str | None = _EMAIL.validate_python(email)
    except ValidationError:
        stored_email = None
    return _OrderRecord(
        rows,
        order,
        order_content_hash(order),
        refund=refund,
        refund_hash=content_hash_with(refund, order.order_id) if refund is not None else None,
        email=stored_email,
    )


def _shop_refund(columns: _Columns, first: list[str], order: OrderContent, status: str) -> RefundCreate | None:
    if status in SHOP_FULLY_REFUNDED_STATUSES:
        amount = order.total
    else:
        refunded_text = columns.get(first, "refunded amount")
        amount = min(Decimal(refunded_text), order.total) if refunded_text else Decimal(0)
    if amount <= 0:
        return None
    refunded_at = order.placed_at
    cancelled = _shop_time(columns.get(first, "cancelled at"))
    if isinstance(cancelled, datetime) and cancelled >= order.placed_at and cancelled <= utcnow():
        refunded_at = cancelled
    return RefundCreate(refund_id=f"{order.order_id}-refund", amount=amount, refunded_at=refunded_at)


# ---------------------------------------------------------------- orders: writing


async def _customer_ids(session: AsyncSession, external_ids: Iterable[str], summary: ImportSummary) -> dict[str, int]:
    """Internal ids, creating the customers not seen before race-free (``ensure_customers``) and counting them."""
    customers = await ensure_customers(session, external_ids)
    summary.customers_created += len(customers.created)
    return customers.ids


async def _write_orders(session: AsyncSession, batch: list[_OrderRecord], rejects: _Rejects) -> None:
    summary = rejects.summary
    customer_ids = await _customer_ids(session, (record.order.customer_id for record in batch), summary)
    emails = {record.order.customer_id: record.email for record in batch if record.email}
    if emails:
        # Only a customer without an email gets the export's: one set through the API is the newer truth.
        await session.execute(
            update(CUSTOMER_TABLE)
            .where(CUSTOMER_TABLE.c.id == bindparam("customer_pk"), CUSTOMER_TABLE.c.email.is_(None))
            .values(email=bindparam("new_email"), updated_at=utcnow()),
            [{"customer_pk": customer_ids[external], "new_email": email} for external, email in emails.items()],
        )
    now = utcnow()
    connection = await session.connection()
    # Sorted by id: concurrent writers of overlapping orders then wait on each other in one order, never a cycle.
    inserted: dict[str, int] = dict(
        await insert_new_rows(
            connection,
            ORDER_TABLE,
            ORDER_COLUMNS,
            sorted(
                (
                    record.order.order_id,
                    customer_ids[record.order.customer_id],
                    record.order.placed_at,
                    record.order.total,
                    Decimal(0),
                    record.order.currency,
                    record.order.channel,
                    record.content_hash,
                    now,
                )
                for record in batch
            ),
            conflict_column="external_id",
            returning=("external_id", "id"),
        )
    )
    summary.imported += len(inserted)
    stored: dict[str, int] = dict(inserted)
    # Refunds already on orders stored before this batch, to keep a new refund within the order total.
    earlier_refunded: dict[int, Decimal] = {}
    others = [record for record in batch if record.order.order_id not in inserted]
    if others:
        # FOR UPDATE (a no-op on SQLite, whose writer holds the database lock) keeps a concurrent API refund from
        # changing these orders' refunded sums until this batch commits.
        existing = {
            row.external_id: row
            for row in (
                await session.execute(
                    select(Order.external_id, Order.id, Order.content_hash, Order.total, Order.refunded)
                    .where(in_list(session, Order.external_id, [record.order.order_id for record in others]))
                    .with_for_update()
                )
            ).all()
        }
        for record in others:
            row = existing.get(record.order.order_id)
            if row is None or row.content_hash != record.content_hash:
                rejects.add(record.rows, ORDER_CONFLICT)
                continue
            summary.duplicates += 1
            stored[record.order.order_id] = row.id
            earlier_refunded[row.id] = row.refunded
    await insert_rows(
        connection,
        ORDER_ITEM_TABLE,
        ITEM_COLUMNS,
        [
            (inserted[record.order.order_id], line_no, item.sku, item.category, item.quantity, item.unit_price)
            for record in batch
            if record.order.order_id in inserted
            for line_no, item in enumerate(record.order.items)
        ],
    )
    refunding = [record for record in batch if record.refund is not None and record.order.order_id in stored]
    await _write_refunds(session, refunding, stored, earlier_refunded, customer_ids, rejects)


async def _write_refunds(
    session: AsyncSession,
    records: list[_OrderRecord],
    stored: dict[str, int],
    earlier_refunded: dict[int, Decimal],
    customer_ids: dict[str, int],
    rejects: _Rejects,
) -> None:
    if not records:
        return
    summary = rejects.summary
    now = utcnow()
    by_refund_id: dict[str, _OrderRecord] = {}
    rows = []
    for record in records:
        refund = record.refund
        assert refund is not None
        assert record.refund_hash is not None
        by_refund_id[refund.refund_id] = record
        rows.append(
            {
                "external_id": refund.refund_id,
                "order_id": stored[record.order.order_id],
                "customer_id": customer_ids[record.order.customer_id],
                "amount": refund.amount,
                "refunded_at": refund.refunded_at,
                "content_hash": record.refund_hash,
                "created_at": now,
            }
        )
    statement = insert_ignoring_conflicts(session, Refund, ["external_id"]).returning(Refund.external_id)
    inserted = set((await (await session.connection()).scalars(statement, rows)).all())
    not_inserted = [refund_id for refund_id in by_refund_id if refund_id not in inserted]
    if not_inserted:
        hashes = dict(
            (
                await session.execute(
                    select(Refund.external_id, Refund.content_hash).where(Refund.external_id.in_(not_inserted))
                )
            ).all()
        )
        for refund_id in not_inserted:
            if hashes.get(refund_id) != by_refund_id[refund_id].refund_hash:
                rejects.add(by_refund_id[refund_id].rows, REFUND_CONFLICT)
    # A new refund on an order stored before may meet refunds sent to the API since: never above the total.
    over: list[str] = []
    for refund_id in inserted:
        record = by_refund_id[refund_id]
        order_id = stored[record.order.order_id]
        assert record.refund is not None
        if order_id in earlier_refunded and earlier_refunded[order_id] + record.refund.amount > record.order.total:
            over.append(refund_id)
            rejects.add(record.rows, REFUND_EXCEEDS)
    if over:
        await session.execute(REFUND_TABLE.delete().where(REFUND_TABLE.c.external_id.in_(over)))
        inserted.difference_update(over)
    summary.refunds += len(inserted)
    if inserted:
        # The order keeps the sum of its refunds, as the API's conditional UPDATE does one refund at a time.
        order_ids = sorted({stored[by_refund_id[refund_id].order.order_id] for refund_id in inserted})
        refunds_sum = (
            select(func.coalesce(func.sum(REFUND_TABLE.c.amount), 0))
            .where(REFUND_TABLE.c.order_id == ORDER_TABLE.c.id)
            .scalar_subquery()
        )
        await session.execute(update(ORDER_TABLE).where(ORDER_TABLE.c.id.in_(order_ids)).values(refunded=refunds_sum))


async def _run_batches(
    engine: AsyncEngine,
    groups: Iterator[list[list[str]]],
    columns: _Columns,
    parse: Callable[[list[list[str]]], R | _Skip],
    key: Callable[[R], str] | None,
    write: Callable[[AsyncSession, list[R], _Rejects], Awaitable[None]],
    sink: _Rejects,
    batch_size: int,
    progress: Progress | None,
    filled: Sequence[type[Base]],
) -> None:
    """Parse groups of rows into records and write them ``batch_size`` at a time, one transaction per batch; then
    analyze the tables it ``filled`` (``db.statistics``), if it wrote anything.

    One batch is written while the next is parsed: the database works on its own core while this process parses,
    so an import takes about the longer of the two rather than their sum. Batches are still written one at a time
    and in file order, so what one batch finds stored is everything before it, as with no overlap.
    """
    summary = sink.summary
    session_maker = create_session_maker(engine)
    batch: list[R] = []
    # Keys of the batch being built: a key seen again in it means the rows of one order were not consecutive.
    keys: set[str] = set()
    writing: asyncio.Task[None] | None = None

    async def write_batch(records: list[R]) -> None:
        async with transaction(session_maker) as session:
            await write(session, records, sink)
        if progress:
            progress(summary)

    async def flush() -> None:
        nonlocal batch, writing
        if writing is not None:
            in_flight, writing = writing, None
            await in_flight
        if batch:
            writing = asyncio.create_task(write_batch(batch))
            batch = []
            keys.clear()
            # Let the write send its first statement before parsing goes on.
            await asyncio.sleep(0)
        elif progress:
            progress(summary)

    try:
        for count, group in enumerate(groups, start=1):
            if count % _PARSE_SLICE == 0:
                # Parsing holds the event loop; a pause now and then lets the batch in flight exchange its
                # statements and results with the database.
                await asyncio.sleep(0)
            summary.rows += len(group)
            width_problem = columns.width_problem(group)
            outcome = _Skip(width_problem) if width_problem else parse(group)
            if isinstance(outcome, _Skip):
                sink.add(group, outcome.reason, skipped=outcome.skipped)
                continue
            if key is not None:
                record_key = key(outcome)
                if record_key in keys:
                    sink.add(group, NOT_CONSECUTIVE)
                    continue
                keys.add(record_key)
            batch.append(outcome)
            if len(batch) >= batch_size:
                await flush()
        await flush()
    finally:
        # Also when reading fails part-way: the batch in flight commits (or fails) before the error surfaces, so
        # every batch before the error is imported, as the error message promises.
        if writing is not None:
            await writing
    if summary.imported or summary.updated or summary.refunds or summary.customers_created:
        await analyze_after_load(engine, (model.__tablename__ for model in filled))


def _require(columns: _Columns, names: Sequence[str], what: str, *, hint: bool = False) -> None:
    missing = columns.missing(names)
    if missing:
        advice = " (this looks like a shop export: use --format shop-export)" if hint else ""
        raise ImportFileError(f"{what} needs the columns {', '.join(names)}; missing: {', '.join(missing)}{advice}")


async def import_orders(
    engine: AsyncEngine,
    lines: Iterable[str],
    *,
    file_format: OrderFormat = "generic",
    rejects: TextIO | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import orders (and a shop export's refunds) from CSV lines; the module docstring describes the layouts."""
    started = time.perf_counter()
    header, rows = _read(lines)
    columns = _Columns(header)
    parse: Callable[[list[list[str]]], _OrderRecord | _Skip]
    if file_format == "generic":
        _require(columns, GENERIC_ORDER_COLUMNS, "a generic order file", hint="lineitem name" in columns)
        present_items = [name for name in GENERIC_ITEM_COLUMNS if name in columns]
        if present_items and len(present_items) < len(GENERIC_ITEM_COLUMNS):
            raise ImportFileError(
                f"item columns need all of {', '.join(GENERIC_ITEM_COLUMNS)}; missing: "
                + ", ".join(columns.missing(GENERIC_ITEM_COLUMNS))
            )
        key_position = columns.index["order_id"]
        parse = _GenericOrders(columns, with_items=bool(present_items))

    elif file_format == "shop-export":
        _require(columns, SHOP_REQUIRED_COLUMNS, "a shop order export")
        if "paid at" not in columns and "created at" not in columns:
            raise ImportFileError("a shop order export needs a 'Paid at' or a 'Created at' column")
        key_position = columns.index["name"]

        def parse(group: list[list[str]]) -> _OrderRecord | _Skip:
            return _shop_order(columns, group)

    else:
        raise ImportFileError(f"unknown order file format {file_format!r}; use one of {', '.join(ORDER_FORMATS)}")
    summary = ImportSummary("orders")
    sink = _Rejects(rejects, header, summary)
    await _run_batches(
        engine,
        _grouped(rows, key_position),
        columns,
        parse,
        lambda record: record.order.order_id,
        _write_orders,
        sink,
        batch_size,
        progress,
        filled=(Customer, Order, OrderItem, Refund),
    )
    summary.seconds = time.perf_counter() - started
    return summary


# ---------------------------------------------------------------- customers


@dataclass(frozen=True)
class _CustomerRecord:
    rows: list[list[str]]
    customer_id: str
    changes: dict[str, Any]


def _customer(columns: _Columns, rows: list[list[str]], attribute_names: list[str]) -> _CustomerRecord | _Skip:
    row = rows[0]
    raw: dict[str, Any] = {name: columns.get(row, name) for name in CUSTOMER_FIELDS[1:] if columns.get(row, name)}
    attributes: dict[str, AttributeValue] = {
        name: columns.get(row, name) for name in attribute_names if columns.get(row, name)
    }
    if attributes:
        raw["attributes"] = attributes
    try:
        customer_id = _EXTERNAL_ID.validate_python(columns.get(row, "customer_id"))
        data = CustomerUpsert.model_validate(raw)
    except ValidationError as error:
        reason = _reason(error)
        return _Skip(f"customer_id{reason.removeprefix('body')}" if reason.startswith("body:") else reason)
    return _CustomerRecord(rows, customer_id, data.model_dump(exclude_unset=True))


async def _write_customers(session: AsyncSession, batch: list[_CustomerRecord], rejects: _Rejects) -> None:
    summary = rejects.summary
    wanted = {record.customer_id for record in batch}
    state: dict[str, dict[str, Any]] = {}
    pks: dict[str, int] = {}
    for row in (
        await session.execute(
            select(
                Customer.external_id,
                Customer.id,
                Customer.email,
                Customer.joined_at,
                Customer.attributes,
                Customer.marketing_opt_out,
            ).where(Customer.external_id.in_(wanted))
        )
    ).all():
        external_id = str(row.external_id)
        pks[external_id] = row.id
        state[external_id] = {
            "email": row.email,
            "joined_at": row.joined_at,
            "attributes": dict(row.attributes),
            "marketing_opt_out": row.marketing_opt_out,
        }
    new = wanted - state.keys()
    if new:
        pks.update(await ensure_customer_ids(session, new))
        summary.customers_created += len(new)
        for external_id in new:
            state[external_id] = {"email": None, "joined_at": None, "attributes": {}, "marketing_opt_out": False}
    before = {external_id: dict(values) for external_id, values in state.items()}
    for record in batch:
        current = state[record.customer_id]
        wished = dict(current)
        for name, value in record.changes.items():
            # Attributes merge as the file gives them column by column; an empty cell removes nothing.
            wished[name] = {**current["attributes"], **value} if name == "attributes" else value
        if record.customer_id in new:
            new.discard(record.customer_id)
            summary.imported += 1
        elif wished != current:
            summary.updated += 1
        else:
            summary.duplicates += 1
        state[record.customer_id] = wished
    changed = [external_id for external_id, values in state.items() if values != before[external_id]]
    if changed:
        table = CUSTOMER_TABLE
        await session.execute(
            update(table)
            .where(table.c.id == bindparam("customer_pk"))
            .values(
                email=bindparam("new_email", type_=table.c.email.type),
                joined_at=bindparam("new_joined_at", type_=table.c.joined_at.type),
                attributes=bindparam("new_attributes", type_=table.c.attributes.type),
                marketing_opt_out=bindparam("new_opt_out", type_=table.c.marketing_opt_out.type),
                updated_at=utcnow(),
            ),
            [
                {
                    "customer_pk": pks[external_id],
                    "new_email": state[external_id]["email"],
                    "new_joined_at": state[external_id]["joined_at"],
                    "new_attributes": state[external_id]["attributes"],
                    "new_opt_out": state[external_id]["marketing_opt_out"],
                }
                for external_id in changed
            ],
        )


async def import_customers(
    engine: AsyncEngine,
    lines: Iterable[str],
    *,
    rejects: TextIO | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> ImportSummary:
    """Create or update customer profiles from CSV lines; columns beyond the known ones are attributes."""
    started = time.perf_counter()
    header, rows = _read(lines)
    columns = _Columns(header)
    _require(columns, ("customer_id",), "a customer file")
    if "referred_by" in columns:
        raise ImportFileError("referrals are not imported from a customer file; send them to POST /v1/referrals")
    attribute_names = [name for name in columns.index if name not in CUSTOMER_FIELDS and name]
    summary = ImportSummary("customers")
    sink = _Rejects(rejects, header, summary)
    await _run_batches(
        engine,
        ([row] for row in rows),
        columns,
        lambda group: _customer(columns, group, attribute_names),
        None,
        _write_customers,
        sink,
        batch_size,
        progress,
        filled=(Customer,),
    )
    summary.seconds = time.perf_counter() - started
    return summary


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class _EventRecord:
    rows: list[list[str]]
    event: EventIn


def _event(columns: _Columns, rows: list[list[str]]) -> _EventRecord | _Skip:
    try:
        event = EventIn.model_validate({name: columns.get(rows[0], name) for name in EVENT_COLUMNS})
    except ValidationError as error:
        return _Skip(_reason(error))
    return _EventRecord(rows, event)


async def _write_events(session: AsyncSession, batch: list[_EventRecord], rejects: _Rejects) -> None:
    summary = rejects.summary
    customer_ids = await _customer_ids(session, (record.event.customer_id for record in batch), summary)
    now = utcnow()
    statement = insert_ignoring_conflicts(session, InteractionEvent, ["external_id"]).returning(
        InteractionEvent.external_id
    )
    inserted = await (await session.connection()).scalars(
        statement,
        [
            {
                "external_id": record.event.event_id,
                "customer_id": customer_ids[record.event.customer_id],
                "type": record.event.type,
                "target": record.event.target,
                "occurred_at": record.event.occurred_at,
                "created_at": now,
            }
            for record in batch
        ],
    )
    accepted = len(inserted.all())
    # Events have no content check, as in the API: a known event id is a duplicate, whatever it says.
    summary.imported += accepted
    summary.duplicates += len(batch) - accepted


async def import_events(
    engine: AsyncEngine,
    lines: Iterable[str],
    *,
    rejects: TextIO | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> ImportSummary:
    """Record interaction events from CSV lines, as ``POST /v1/events`` would."""
    started = time.perf_counter()
    header, rows = _read(lines)
    columns = _Columns(header)
    _require(columns, EVENT_COLUMNS, "an event file")
    summary = ImportSummary("events")
    sink = _Rejects(rejects, header, summary)
    await _run_batches(
        engine,
        ([row] for row in rows),
        columns,
        lambda group: _event(columns, group),
        None,
        _write_events,
        sink,
        batch_size,
        progress,
        filled=(Customer, InteractionEvent),
    )
    summary.seconds = time.perf_counter() - started
    return summary
