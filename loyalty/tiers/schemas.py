"""Tier shapes: the badge, the tier list, pins, previews, history."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from loyalty.lib.clock import PlannedTime
from loyalty.lib.schemas import Schema
from loyalty.tiers.config import TierId


class MissingItem(Schema):
    figure: str
    needed: float | str


class Progress(Schema):
    next_tier: str | None
    text: str
    missing: list[MissingItem]


class TierBadge(Schema):
    customer_id: str
    tier: str
    tier_name: str
    since: datetime | None
    benefits: list[str]
    next_tier: str | None
    progress: Progress
    pinned_until: datetime | None


class TierInfo(Schema):
    tier: str
    name: str
    rule_text: str
    benefits: list[str]
    grace_days: int
    welcome_offer: str | None


class TierList(Schema):
    items: list[TierInfo]


class TierPin(Schema):
    tier: TierId
    until: PlannedTime
    reason: str = Field(min_length=1, max_length=500, pattern=r"^[^\x00]+$")


class PreviewResult(Schema):
    moves: dict[str, dict[str, int]]
    customers: int
    config_hash: str
    based_on_run: int | None = Field(description="The full run whose scores the preview re-evaluated.")


class HistoryItem(Schema):
    from_: str | None = Field(alias="from", serialization_alias="from")
    to: str
    at: datetime
    reason: str
    kind: str

    model_config = Schema.model_config | {"populate_by_name": True}
