"""Scoring settings: windows, horizon, blend and influence weights (the `[scoring]` table of the tiers file)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class InfluenceWeights(BaseModel):
    """How much each kind of influence counts, in 'orders' worth: revenue is divided by the mean order value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    converted_referral: float = Field(default=1.0, ge=0, le=1000)
    referred_revenue: float = Field(default=0.5, ge=0, le=1000)
    review: float = Field(default=0.25, ge=0, le=1000)
    share: float = Field(default=0.1, ge=0, le=1000)


class ScoringConfig(BaseModel):
    """Defaults follow PRODUCT.md: 365-day window and horizon, value blended half predicted, half observed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_days: int = Field(default=365, ge=1, le=3650, description="Evaluation window for net spend and orders.")
    horizon_days: int = Field(default=365, ge=1, le=3650, description="How far ahead predicted value looks.")
    annual_discount_rate: float = Field(default=0.0, ge=0, le=1)
    value_blend: float = Field(
        default=0.5, ge=0, le=1, description="Weight of predicted value; the rest is net spend in the window."
    )
    influence: InfluenceWeights = InfluenceWeights()
    second_level_decay: float = Field(
        default=0.5, ge=0, le=1, description="Share of the revenue of customers referred by referred customers."
    )
    interest_window_days: int = Field(default=90, ge=1, le=3650)
    top_interests: int = Field(default=5, ge=0, le=50)
