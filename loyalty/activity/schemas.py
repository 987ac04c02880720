"""Request and response shapes for orders, refunds, events and referrals."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

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
