"""Offer, campaign, code and redemption shapes."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal

from pydantic import Field, field_validator, model_validator

from loyalty.lib.clock import PlannedTime
from loyalty.lib.money import Money
from loyalty.lib.schemas import MAX_ID, ExternalId, Schema
from loyalty.tiers.config import TierId

OfferKind = Literal["percent_off", "amount_off", "free_shipping", "gift"]


class OfferBase(Schema):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[^\x00-\x1f\x7f]+$")
    kind: OfferKind
    value: Money | None = Field(
        default=None,
        description="percent_off: the percentage (0-100]; amount_off: the amount; gift: its worth (optional); "
        "free_shipping: none.",
    )
    valid_days: int = Field(ge=1, le=3650, description="Validity of each code, in days from issue.")
    min_order_total: Money | None = None
    uses_per_code: int = Field(default=1, ge=1, le=1000)


class OfferCreate(OfferBase):
    @model_validator(mode="after")
    def _value_fits_kind(self) -> OfferCreate:
        if self.kind == "percent_off" and (self.value is None or not Decimal(0) < self.value <= Decimal(100)):
            raise ValueError("value: a percent_off offer needs a percentage above 0 and at most 100")
        if self.kind == "amount_off" and (self.value is None or self.value <= 0):
            raise ValueError("value: an amount_off offer needs an amount above zero")
        if self.kind == "free_shipping" and self.value not in (None, Decimal(0)):
            raise ValueError("value: a free_shipping offer takes no value")
        return self


class Offer(OfferBase):
    offer_id: int
    created_at: datetime


class Filters(Schema):
    """Optional score floors on top of the tiers."""

    min_value_score: float | None = Field(default=None, ge=0, le=100)
    min_frequency_score: float | None = Field(default=None, ge=0, le=100)
    min_influence_score: float | None = Field(default=None, ge=0, le=100)


class CampaignCreate(Schema):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    offer_id: int = Field(ge=1, le=MAX_ID)
    tiers: list[TierId] = Field(min_length=1, max_length=4)
    send_at: PlannedTime | None = None
    cron: str | None = Field(default=None, max_length=100, description="Five crontab fields, or six with seconds.")
    holdout_pct: float = Field(default=10.0, ge=0, le=50)
    filters: Filters = Filters()

    @field_validator("tiers")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _one_schedule(self) -> CampaignCreate:
        if (self.send_at is None) == (self.cron is None):
            raise ValueError("give exactly one of send_at (a single send) or cron (recurring)")
        return self


class CampaignSend(Schema):
    occurrence_at: datetime
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    late_seconds: float | None = Field(description="How long after its due time the send started.")
    issued: int
    holdout: int
    attempts: int


class Campaign(Schema):
    campaign_id: int
    name: str
    offer_id: int
    tiers: list[str]
    filters: Filters
    send_at: datetime | None
    cron: str | None
    holdout_pct: float
    status: Literal["scheduled", "running", "completed", "cancelled"]
    next_send_at: datetime | None
    issued: int
    holdout: int
    sends: list[CampaignSend]
    created_at: datetime
    cancelled_at: datetime | None
    completed_at: datetime | None


class IncrementalRevenue(Schema):
    estimate: str | None
    ci95: list[str] | None
    method: str


class RevenuePerCustomer(Schema):
    treatment: str | None
    holdout: str | None


class CampaignResults(Schema):
    campaign_id: int
    issued: int
    holdout: int
    redeemed: int
    redemption_rate: float | None
    window: dict[str, datetime | None]
    revenue_per_customer: RevenuePerCustomer
    incremental_revenue: IncrementalRevenue
    insufficient_data: bool


class CodeCheck(Schema):
    code: str
    valid: bool
    reason: str | None = None
    offer: Offer
    expires_at: datetime
    uses_left: int


class RedemptionCreate(Schema):
    # No control characters: PostgreSQL text cannot hold NUL, so one would fail the lookup instead of finding nothing.
    code: str = Field(min_length=1, max_length=32, pattern=r"^[^\x00-\x1f\x7f]+$")
    customer_id: ExternalId
    order_id: ExternalId
    order_total: Money


class Redemption(Schema):
    redemption_id: int
    code: str
    customer_id: str
    order_id: str
    order_total: Money
    redeemed_at: datetime
    voided_at: datetime | None
    offer: Offer
