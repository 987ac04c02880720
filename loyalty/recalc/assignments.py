"""Turning scores into tier decisions and rows: shared by the full run and the real-time re-score."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import numpy as np

from loyalty.lib.money import format_money
from loyalty.scoring.config import ScoringConfig
from loyalty.scoring.figures import Figures, ReferralFigures
from loyalty.scoring.scores import Scores, raw_for_score
from loyalty.tiers.config import TiersConfig
from loyalty.tiers.rules import (
    Assignment,
    CustomerFacts,
    Decision,
    Missing,
    TierState,
    assign,
    evaluate,
    phrase_missing,
)


@dataclass(frozen=True)
class ValueTranslator:
    """Says what a score target means in figures a customer can act on ("spend 120.00 more").

    The value score ranks ``blend x predicted value + (1 - blend) x net spend``; holding the prediction still, a
    target on that ranking needs ``(target raw - current raw) / (1 - blend)`` more spend. Frequency and influence
    are phrased as their plain actions.
    """

    cutoffs: dict[str, list[float]]
    config: ScoringConfig
    current_raw: dict[str, float]

    def missing_for_score(self, score: str, target: float, facts: CustomerFacts) -> Missing | None:
        needed_raw = raw_for_score(self.cutoffs, score, target)
        current = self.current_raw.get(score, 0.0)
        if needed_raw is None:
            return Missing(figure=f"{score}_score", needed=max(0.0, target - facts.scores.get(score, 0.0)))
        gap = max(0.0, needed_raw - current)
        if score == "value" and self.config.value_blend < 1:
            return Missing(figure="net_spend", needed=round(gap / (1.0 - self.config.value_blend) + 0.005, 2))
        if score == "influence" and self.config.influence.converted_referral > 0:
            return Missing(
                figure="converted_referrals", needed=float(math.ceil(gap / self.config.influence.converted_referral))
            )
        if score == "frequency":
            return Missing(figure="occasions", needed=float(max(1, math.ceil(gap))))
        return Missing(figure=f"{score}_score", needed=max(0.0, target - facts.scores.get(score, 0.0)))

    def phrase(self, missing: Missing) -> str:
        return phrase_missing(missing)


def facts_at(
    position: int, figures: Figures, referrals: ReferralFigures, scores: Scores
) -> tuple[CustomerFacts, dict[str, float]]:
    """The rule inputs of one customer, and the raw score inputs for progress texts."""
    days_since = figures.days_since_last[position]
    values = {
        "occasions": float(figures.occasions[position]),
        "orders_in_window": float(figures.orders_in_window[position]),
        "net_spend": float(figures.net_spend[position]),
        "average_order_value": float(figures.average_order_value[position]),
        "predicted_value": float(scores.predicted_value[position]),
        "expected_purchases": float(scores.expected_purchases[position]),
        "p_alive": float(scores.p_alive[position]),
        "converted_referrals": float(referrals.converted_referrals[position]),
        "referred_revenue": float(referrals.referred_revenue[position]),
        "reviews": float(figures.reviews[position]),
        "shares": float(figures.shares[position]),
    }
    if not np.isnan(days_since):
        values["days_since_last"] = float(days_since)
    facts = CustomerFacts(
        paid_orders=int(figures.paid_orders[position]),
        scores={name: float(scores.score[name][position]) for name in ("value", "frequency", "influence")},
        figures=values,
    )
    raw = {name: float(scores.raw[name][position]) for name in ("value", "frequency", "influence")}
    return facts, raw


def decide(
    tiers: TiersConfig, facts: CustomerFacts, raw: dict[str, float], cutoffs: dict[str, list[float]]
) -> Decision:
    return evaluate(tiers, facts, ValueTranslator(cutoffs, tiers.scoring, raw))


def progress_json(decision: Decision) -> dict[str, Any]:
    progress = decision.progress
    return {
        "next_tier": progress.next_tier,
        "text": progress.text,
        "missing": [{"figure": m.figure, "needed": _needed(m)} for m in progress.missing],
    }


def _needed(missing: Missing) -> str | float:
    if missing.figure in ("net_spend", "average_order_value", "referred_revenue", "predicted_value"):
        return format_money(Decimal(str(missing.needed)))
    return missing.needed


def score_row(
    customer_id: int,
    position: int,
    figures: Figures,
    referrals: ReferralFigures,
    scores: Scores,
    interests: list[dict[str, Any]],
    as_of: datetime,
    computed_at: datetime,
    run_id: int | None,
) -> dict[str, Any]:
    """One customer_score row."""
    scored = bool(figures.occasions[position] > 0)
    first, last = figures.first_day[position], figures.last_day[position]
    return {
        "customer_id": customer_id,
        "run_id": run_id,
        "as_of": as_of,
        "computed_at": computed_at,
        "value_score": float(scores.score["value"][position]),
        "frequency_score": float(scores.score["frequency"][position]),
        "influence_score": float(scores.score["influence"][position]),
        "paid_orders": int(figures.paid_orders[position]),
        "occasions": int(figures.occasions[position]),
        "orders_in_window": int(figures.orders_in_window[position]),
        "net_spend": _money(figures.net_spend[position]),
        "lifetime_spend": _money(figures.lifetime_spend[position]),
        "average_order_value": _money(figures.average_order_value[position]),
        "first_purchase_at": _day_start(first) if scored else None,
        "last_purchase_at": _day_start(last) if scored else None,
        "days_since_last": float(figures.days_since_last[position]) if scored else None,
        "frequency": int(figures.frequency[position]),
        "recency_days": float(figures.recency[position]),
        "age_days": float(figures.age[position]),
        "mean_repeat_spend": float(figures.mean_repeat_spend[position]),
        "expected_purchases": float(scores.expected_purchases[position]),
        "p_alive": float(scores.p_alive[position]),
        "expected_spend": float(scores.expected_spend[position]),
        "predicted_value": float(scores.predicted_value[position]),
        "converted_referrals": int(referrals.converted_referrals[position]),
        "referred_revenue": float(referrals.referred_revenue[position]),
        "reviews": int(figures.reviews[position]),
        "shares": int(figures.shares[position]),
        "interests": interests,
    }


def tier_row(
    customer_id: int, assignment: Assignment, decision: Decision, pin_reason: str | None, now: datetime
) -> dict[str, Any]:
    """One customer_tier row; a pin that expired is cleared with its reason."""
    pinned = assignment.pinned_tier is not None
    return {
        "customer_id": customer_id,
        "tier": assignment.tier,
        "since": assignment.since,
        "qualified_tier": decision.tier,
        "below_since": assignment.below_since,
        "explanation": decision.explanation,
        "progress": progress_json(decision),
        "pinned_tier": assignment.pinned_tier,
        "pinned_until": assignment.pinned_until,
        "pin_reason": pin_reason if pinned else None,
        "updated_at": now,
    }


@dataclass(frozen=True)
class Placement:
    """A customer's new tier with the rows that record it."""

    previous_tier: str | None
    assignment: Assignment
    score: dict[str, Any]
    tier: dict[str, Any]
    history: dict[str, Any] | None


def state_from_row(stored: Any) -> TierState:
    """The rules' view of a stored customer_tier row (None for a customer without one)."""
    if stored is None:
        return TierState(tier=None, since=None, below_since=None, pinned_tier=None, pinned_until=None)
    return TierState(
        tier=stored.tier,
        since=stored.since,
        below_since=stored.below_since,
        pinned_tier=stored.pinned_tier,
        pinned_until=stored.pinned_until,
    )


def place_customer(
    tiers: TiersConfig,
    position: int,
    population: tuple[Figures, ReferralFigures, Scores, dict[str, list[float]]],
    interests: list[dict[str, Any]],
    stored: Any,
    *,
    as_of: datetime,
    now: datetime,
    allow_downgrade: bool,
    score_run_id: int | None,
    history_run_id: int | None,
) -> Placement:
    """Apply the rules to one customer of a scored population: the full run and the real-time path share this."""
    figures, referrals, scores, cutoffs = population
    customer_id = int(figures.customer_id[position])
    state = state_from_row(stored)
    pin_reason = stored.pin_reason if stored is not None else None
    facts, raw = facts_at(position, figures, referrals, scores)
    decision = decide(tiers, facts, raw, cutoffs)
    assignment = assign(tiers, state, decision, now, allow_downgrade=allow_downgrade, pin_reason=pin_reason)
    history = None
    if assignment.changed:
        history = {
            "customer_id": customer_id,
            "from_tier": state.tier,
            "to_tier": assignment.tier,
            "at": now,
            "kind": assignment.kind,
            "reason": assignment.reason,
            "run_id": history_run_id,
        }
    return Placement(
        previous_tier=state.tier,
        assignment=assignment,
        score=score_row(customer_id, position, figures, referrals, scores, interests, as_of, now, score_run_id),
        tier=tier_row(customer_id, assignment, decision, pin_reason, now),
        history=history,
    )


def _money(value: float) -> Decimal:
    return Decimal(str(round(float(value), 4)))


def _day_start(day: float) -> datetime:
    return datetime.fromtimestamp(float(day) * 86_400.0, UTC)
