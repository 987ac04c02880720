"""Customer profile shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import Field, StringConstraints, field_validator

from loyalty.lib.clock import EventTime
from loyalty.lib.schemas import ExternalId, Schema
from loyalty.tiers.schemas import HistoryItem

AttributeValue = str | int | float | bool | None
Email = Annotated[str, StringConstraints(max_length=320, pattern=r"^[^@\s\x00-\x1f\x7f]+@[^@\s\x00-\x1f\x7f]+$")]
MAX_ATTRIBUTES = 50


class CustomerUpsert(Schema):
    """Create or update a profile; fields left out keep their stored value."""

    email: Email | None = None
    joined_at: EventTime | None = None
    attributes: dict[str, AttributeValue] | None = Field(
        default=None, description="Free segmentation attributes (location, device, age band ...); no PII."
    )
    marketing_opt_out: bool | None = None
    referred_by: ExternalId | None = None

    @field_validator("attributes")
    @classmethod
    def _bounded(cls, value: dict[str, AttributeValue] | None) -> dict[str, AttributeValue] | None:
        if value is None:
            return value
        if len(value) > MAX_ATTRIBUTES:
            raise ValueError(f"at most {MAX_ATTRIBUTES} attributes")
        for key, item in value.items():
            if not 1 <= len(key) <= 64:
                raise ValueError("attribute names are 1 to 64 characters")
            if isinstance(item, str) and len(item) > 256:
                raise ValueError(f"attribute {key!r} is longer than 256 characters")
            if isinstance(item, float) and not (abs(item) < 1e15):
                raise ValueError(f"attribute {key!r} must be a finite number below 1e15")
        return value


class Customer(Schema):
    customer_id: str
    email: str | None
    joined_at: datetime | None
    attributes: dict[str, AttributeValue]
    marketing_opt_out: bool
    referred_by: str | None
    created_at: datetime
    updated_at: datetime


class CustomerToken(Schema):
    token: str
    expires_at: datetime


class CustomerPath(Schema):
    customer_id: ExternalId


class Scores(Schema):
    value: float
    frequency: float
    influence: float


class Figures(Schema):
    """Raw figures behind the scores; money as decimal strings, days as numbers."""

    paid_orders: int
    occasions: int
    orders_in_window: int
    net_spend: str
    lifetime_spend: str
    average_order_value: str
    first_purchase_at: datetime | None
    last_purchase_at: datetime | None
    days_since_last: float | None
    predicted_value: str
    expected_purchases: float
    p_alive: float
    expected_spend: str
    converted_referrals: int
    referred_revenue: str
    reviews: int
    shares: int
    as_of: datetime


class CustomerTierView(Schema):
    tier: str
    tier_name: str
    since: datetime | None
    qualified_tier: str
    explanation: str
    progress: dict[str, Any]
    pinned_tier: str | None
    pinned_until: datetime | None
    pin_reason: str | None


class Interest(Schema):
    target: str
    engagements: int


class CustomerDetail(Customer):
    tier: CustomerTierView
    scores: Scores
    figures: Figures | None
    interests: list[Interest]


class CustomerListItem(Schema):
    customer_id: str
    email: str | None
    tier: str
    scores: Scores
    figures: Figures | None


class ScoreSpread(Schema):
    p10: float
    p50: float
    p90: float


class Segment(Schema):
    tier: str
    name: str
    customers: int
    share: float
    revenue_share: float
    scores: dict[str, ScoreSpread]


class SegmentList(Schema):
    items: list[Segment]
    customers: int


class Me(Schema):
    """A customer's own rewards status."""

    customer_id: str
    tier: str
    tier_name: str
    since: datetime | None
    benefits: list[str]
    next_tier: str | None
    progress: dict[str, Any]
    scores_text: dict[str, str]
    pinned_until: datetime | None


class MyOffer(Schema):
    code: str
    offer: dict[str, Any]
    status: str
    issued_at: datetime
    expires_at: datetime
    uses_left: int


class MyOffers(Schema):
    items: list[MyOffer]


class MyHistory(Schema):
    items: list[HistoryItem]
