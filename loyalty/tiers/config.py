"""The tiers configuration (``config/tiers.toml``, or its JSON form for previews): schema and loading."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from loyalty.lib.errors import field_path
from loyalty.scoring.config import ScoringConfig

TIER_IDS = ("vip", "nurture", "one_time", "prospect")
SCORES = ("value", "frequency", "influence")
# Raw figures a condition may name; each is computed per customer by the recalculation.
FIGURES = (
    "occasions",
    "orders_in_window",
    "net_spend",
    "average_order_value",
    "days_since_last",
    "predicted_value",
    "expected_purchases",
    "p_alive",
    "converted_referrals",
    "referred_revenue",
    "reviews",
    "shares",
)

TierId = Literal["vip", "nurture", "one_time", "prospect"]
ScoreName = Literal["value", "frequency", "influence"]
FigureName = Literal[
    "occasions",
    "orders_in_window",
    "net_spend",
    "average_order_value",
    "days_since_last",
    "predicted_value",
    "expected_purchases",
    "p_alive",
    "converted_referrals",
    "referred_revenue",
    "reviews",
    "shares",
]


class Condition(BaseModel):
    """One comparison of a score (0-100) or a raw figure with a threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    score: ScoreName | None = None
    figure: FigureName | None = None
    gte: float | None = Field(default=None, allow_inf_nan=False)
    lte: float | None = Field(default=None, allow_inf_nan=False)
    eq: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_subject_one_comparison(self) -> Condition:
        if (self.score is None) == (self.figure is None):
            raise ValueError("name exactly one of `score` or `figure`")
        comparisons = [op for op in ("gte", "lte", "eq") if getattr(self, op) is not None]
        if not comparisons:
            raise ValueError("give a comparison: `gte`, `lte` or `eq`")
        if "eq" in comparisons and len(comparisons) > 1:
            raise ValueError("`eq` cannot be combined with `gte` or `lte`")
        if self.score is not None:
            for op in comparisons:
                value = getattr(self, op)
                if not 0 <= value <= 100:
                    raise ValueError(f"`{op}` must be between 0 and 100 for a score")
        return self

    @property
    def subject(self) -> str:
        return self.score or self.figure or ""


class Tier(BaseModel):
    """A reward tier: how a customer enters it, what it gives, how long it is kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: TierId
    name: str = Field(min_length=1, max_length=100)
    any: tuple[Condition, ...] | None = None
    all: tuple[Condition, ...] | None = None
    benefits: tuple[str, ...] = ()
    welcome_offer: str | None = Field(default=None, min_length=1, max_length=100)
    grace_days: int = Field(default=0, ge=0, le=3650)

    @model_validator(mode="after")
    def _one_combinator(self) -> Tier:
        if self.any is not None and self.all is not None:
            raise ValueError("use either `any` or `all`, not both")
        if self.id == "prospect" and (self.any or self.all):
            raise ValueError("the prospect tier has no conditions: it holds every customer without a paid order")
        return self

    @property
    def conditions(self) -> tuple[Condition, ...]:
        return self.any or self.all or ()

    @property
    def combinator(self) -> Literal["any", "all"]:
        return "any" if self.any is not None else "all"


class TiersConfig(BaseModel):
    """An ordered list of tiers; for customers with a paid order the first matching tier wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tier: tuple[Tier, ...] = Field(min_length=1)
    scoring: ScoringConfig = ScoringConfig()

    @model_validator(mode="after")
    def _complete_and_unique(self) -> TiersConfig:
        ids = [tier.id for tier in self.tier]
        duplicates = sorted({tier_id for tier_id in ids if ids.count(tier_id) > 1})
        if duplicates:
            raise ValueError(f"tier ids must be unique; repeated: {', '.join(duplicates)}")
        paying = [tier for tier in self.tier if tier.id != "prospect"]
        if not paying:
            raise ValueError("define at least one tier besides prospect")
        if paying[-1].conditions:
            raise ValueError(
                f"the last tier ({paying[-1].id}) must have no conditions, so every paying customer has a tier"
            )
        return self

    def get(self, tier_id: str) -> Tier | None:
        return next((tier for tier in self.tier if tier.id == tier_id), None)

    @property
    def config_hash(self) -> str:
        """A stable hash of the content, recorded with every run that used it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class TiersConfigError(ValueError):
    """The tiers file (or JSON) is invalid; says where and why."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "; ".join(f"{field}: {message}" for field, message in errors)
        super().__init__(f"{source}: {lines}")


def parse_tiers(data: Any, source: str = "tiers config") -> TiersConfig:
    """Validate the dict form; field paths read like ``tier[0].any[1].gte``."""
    try:
        return TiersConfig.model_validate(data)
    except ValidationError as error:
        errors = [
            # Errors about the list as a whole (ordering, duplicates) belong to `tier`.
            (field_path(tuple(item["loc"])) if item["loc"] else "tier", item["msg"].removeprefix("Value error, "))
            for item in error.errors(include_url=False, include_input=False)
        ]
        raise TiersConfigError(source, errors) from None


def load_tiers(path: Path) -> TiersConfig:
    """Read and validate ``config/tiers.toml``; a broken file names the file, the field and the reason."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise TiersConfigError(str(path), [("file", error.strerror or str(error))]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise TiersConfigError(str(path), [("syntax", str(error))]) from None
    return parse_tiers(data, str(path))
