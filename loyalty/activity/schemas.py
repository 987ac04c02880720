"""Request and response shapes for orders, refunds, events and referrals."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, Protocol

from pydantic import Field, StringConstraints, field_validator

from loyalty.lib.clock import EventTime
from loyalty.lib.money import Money
from loyalty.lib.schemas import ExternalId, Label, Schema
from loyalty.settings import get_settings

MAX_BATCH = 1000
EventType = Literal["page_view", "product_view", "ad_click", "email_click", "review", "social_share"]


class OrderItemIn(Schema):
    sku: Label
    category: Label | None = None
    quantity: int = Field(ge=1, le=1_000_000)
    unit_price: Money


class OrderBase(Schema):
    order_id: ExternalId
    customer_id: ExternalId
    placed_at: datetime
    total: Money = Field(description="What the customer paid for goods after discounts, without tax and shipping.")
    currency: str
    items: list[OrderItemIn] = Field(default_factory=list, max_length=1000)
    channel: Label | None = None


class OrderCreate(OrderBase):
    placed_at: EventTime

    @field_validator("currency")
    @classmethod
    def _store_currency(cls, value: str) -> str:
        store = get_settings().currency
        if value.upper() != store:
            raise ValueError(f"must be {store}, the store currency; convert amounts before sending")
        return store


def _needs_no_escaping(text: str) -> bool:
    """Printable ASCII without quotes or backslashes is its own JSON string body, as ``json.dumps`` writes it."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _json_string(value: str) -> str:
    return f'"{value}"' if _needs_no_escaping(value) else json.dumps(value)


def _quoted(value: str) -> str:
    return f'"{value}"'


class ItemContent(Protocol):
    @property
    def sku(self) -> str: ...
    @property
    def category(self) -> str | None: ...
    @property
    def quantity(self) -> int: ...
    @property
    def unit_price(self) -> Decimal: ...


class OrderContent(Protocol):
    """What makes an order's content: an ``OrderCreate``, or the importer's lighter record of a validated one."""

    @property
    def order_id(self) -> str: ...
    @property
    def customer_id(self) -> str: ...
    @property
    def placed_at(self) -> datetime: ...
    @property
    def total(self) -> Decimal: ...
    @property
    def currency(self) -> str: ...
    @property
    def items(self) -> Sequence[ItemContent]: ...
    @property
    def channel(self) -> str | None: ...


def order_content_hash(order: OrderContent) -> str:
    """``order.content_hash()``, the same digest at a fraction of the cost, for batches and imports of many orders.

    It writes the canonical JSON (keys sorted, no spaces, ASCII) of the model's JSON form directly instead of
    through ``model_dump`` and ``json.dumps``: money in its API form, the time (UTC once validated) as pydantic
    writes it, with ``Z`` and microseconds only when there are any. Tests hold it equal to ``content_hash`` across
    the variants of every field, and fail as soon as the schema gains a field this does not write.
    """
    placed_at = order.placed_at
    if placed_at.tzinfo is not UTC:
        raise ValueError("a validated order's placed_at is in UTC")
    # format_money's rounding, with the currency's quantum looked up once per order instead of once per amount.
    quantum = Decimal(1).scaleb(-get_settings().currency_exponent)
    items = order.items
    texts = [order.order_id, order.customer_id, order.currency, order.channel or ""]
    for item in items:
        texts += (item.sku, item.category or "")
    # One check of all the texts together: nearly always none needs escaping, and each is then simply quoted.
    text = _quoted if _needs_no_escaping("".join(texts)) else _json_string
    items_json = ",".join(
        f'{{"category":{"null" if item.category is None else text(item.category)},"quantity":{item.quantity:d},'
        f'"sku":{text(item.sku)},"unit_price":"{item.unit_price.quantize(quantum)}"}}'
        for item in items
    )
    channel = "null" if order.channel is None else text(order.channel)
    canonical = (
        f'{{"channel":{channel},"currency":{text(order.currency)},"customer_id":{text(order.customer_id)},'
        f'"items":[{items_json}],"order_id":{text(order.order_id)},'
        f'"placed_at":"{placed_at.isoformat().replace("+00:00", "Z")}","total":"{order.total.quantize(quantum)}"}}'
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class Order(OrderBase):
    refunded: Money
    created_at: datetime
    tier: str | None = Field(default=None, description="The customer's tier id after this order.")


class OrderBatch(Schema):
    # Items are validated one by one in the service, so one bad order never rejects the others.
    orders: list[Any] = Field(max_length=MAX_BATCH)


class BatchItemResult(Schema):
    order_id: str | None
    status: int
    problem: dict[str, Any] | None = None


class OrderBatchResult(Schema):
    results: list[BatchItemResult]
    created: int
    replayed: int
    failed: int


class RefundCreate(Schema):
    refund_id: ExternalId
    amount: Money
    refunded_at: EventTime

    @field_validator("amount")
    @classmethod
    def _positive(cls, value: Any) -> Any:
        if value == 0:
            raise ValueError("must be greater than zero")
        return value


class Refund(Schema):
    refund_id: str
    order_id: str
    customer_id: str
    amount: Money
    refunded_at: datetime
    created_at: datetime


class EventIn(Schema):
    event_id: ExternalId
    customer_id: ExternalId
    type: EventType
    target: Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]+$")]
    occurred_at: EventTime


class EventBatch(Schema):
    events: list[Any] = Field(max_length=MAX_BATCH)


class RejectedEvent(Schema):
    index: int
    problem: dict[str, Any]


class EventBatchResult(Schema):
    accepted: int
    duplicates: int
    rejected: list[RejectedEvent]


class ReferralCreate(Schema):
    referrer_id: ExternalId
    referee_id: ExternalId
    occurred_at: EventTime


class Referral(Schema):
    referrer_id: str
    referee_id: str
    occurred_at: datetime
    created_at: datetime
