"""Turning scores into tier decisions and rows: shared by the full run and the real-time re-score."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np
from numpy.typing import NDArray

from loyalty.db.models import CustomerTier
from loyalty.db.staging import EPOCH
from loyalty.lib.money import format_money
from loyalty.scoring.config import ScoringConfig
from loyalty.scoring.figures import Figures, ReferralFigures
from loyalty.scoring.scores import SCORE_NAMES, Scores, raw_for_score
from loyalty.tiers.config import TiersConfig
from loyalty.tiers.rules import (
    Assignment,
    CustomerFacts,
    Decision,
    DecisionColumns,
    Missing,
    Progress,
    TierState,
    assign,
    evaluate,
    evaluate_columns,
    phrase_missing,
)

MICROS_PER_DAY = 86_400_000_000.0


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
        current = facts.scores.get(score, 0.0)
        return _value_missing(self.cutoffs, self.config, score, target, current, self.current_raw.get(score, 0.0))

    def phrase(self, missing: Missing) -> str:
        return phrase_missing(missing)


@dataclass(frozen=True)
class ChunkValueTranslator:
    """``ValueTranslator`` for the customers of a chunk (``evaluate_columns``), from their raw score columns."""

    cutoffs: dict[str, list[float]]
    config: ScoringConfig
    raw: dict[str, list[float]]

    # Many customers of a chunk share their raw scores (no referral yet, one purchase): one Missing for each.
    known: dict[tuple[str, float, float, float], Missing] = field(default_factory=dict, compare=False)
    # Many more share what they miss ("spend 20.00 more", "refer 1 more friend who buys"): one Missing for each
    # figure and amount, worded once. A Missing made here carries nothing else (no current or target), so these
    # two decide its words.
    worded: dict[tuple[str, float], tuple[Missing, str]] = field(default_factory=dict, compare=False)

    def missing_for_score_at(self, score: str, target: float, offset: int, current: float) -> Missing | None:
        raw = self.raw[score][offset]
        key = (score, target, current, raw)
        missing = self.known.get(key)
        if missing is None:
            missing = _value_missing(self.cutoffs, self.config, score, target, current, raw)
            # 0.0 and -0.0 are one key but read differently ("-0.00"): zero is not shared.
            if missing.needed:
                shared = self.worded.get((missing.figure, missing.needed))
                if shared is None:
                    self.worded[(missing.figure, missing.needed)] = (missing, phrase_missing(missing))
                else:
                    missing = shared[0]
            self.known[key] = missing
        return missing

    def phrase(self, missing: Missing) -> str:
        shared = self.worded.get((missing.figure, missing.needed))
        if shared is not None and shared[0] is missing:
            return shared[1]
        return phrase_missing(missing)


def _value_missing(
    cutoffs: dict[str, list[float]],
    config: ScoringConfig,
    score: str,
    target: float,
    current_score: float,
    current_raw: float,
) -> Missing:
    needed_raw = _raw_target(cutoffs, score, target)
    if needed_raw is None:
        return Missing(figure=f"{score}_score", needed=max(0.0, target - current_score))
    gap = max(0.0, needed_raw - current_raw)
    if score == "value" and config.value_blend < 1:
        return Missing(figure="net_spend", needed=round(gap / (1.0 - config.value_blend) + 0.005, 2))
    if score == "influence" and config.influence.converted_referral > 0:
        return Missing(figure="converted_referrals", needed=float(math.ceil(gap / config.influence.converted_referral)))
    if score == "frequency":
        return Missing(figure="occasions", needed=float(max(1, math.ceil(gap))))
    return Missing(figure=f"{score}_score", needed=max(0.0, target - current_score))


# The raw value each score target needs depends only on a run's cut-offs, never on the customer: worked out once per
# run and target instead of once per customer. Keyed by id() with the cut-offs kept alive alongside, as the rules
# cache their compiled config.
_RAW_TARGETS: dict[int, tuple[dict[str, list[float]], dict[tuple[str, float], float | None]]] = {}
_RAW_TARGETS_LIMIT = 8


def _raw_target(cutoffs: dict[str, list[float]], score: str, target: float) -> float | None:
    entry = _RAW_TARGETS.get(id(cutoffs))
    if entry is None or entry[0] is not cutoffs:
        if len(_RAW_TARGETS) >= _RAW_TARGETS_LIMIT:
            _RAW_TARGETS.clear()
        entry = (cutoffs, {})
        _RAW_TARGETS[id(cutoffs)] = entry
    known = entry[1]
    key = (score, target)
    if key not in known:
        known[key] = raw_for_score(cutoffs, score, target)
    return known[key]


def fact_columns(figures: Figures, referrals: ReferralFigures, scores: Scores) -> dict[str, NDArray[Any]]:
    """Every figure the rules can read, by name, as a column of the population (NaN where it is unknown)."""
    return {
        "occasions": figures.occasions,
        "orders_in_window": figures.orders_in_window,
        "net_spend": figures.net_spend,
        "average_order_value": figures.average_order_value,
        "predicted_value": scores.predicted_value,
        "expected_purchases": scores.expected_purchases,
        "p_alive": scores.p_alive,
        "converted_referrals": referrals.converted_referrals,
        "referred_revenue": referrals.referred_revenue,
        "reviews": figures.reviews,
        "shares": figures.shares,
        "days_since_last": figures.days_since_last,
    }


def facts_at(
    position: int, figures: Figures, referrals: ReferralFigures, scores: Scores
) -> tuple[CustomerFacts, dict[str, float]]:
    """The rule inputs of one customer, and the raw score inputs for progress texts."""
    values = {}
    for name, column in fact_columns(figures, referrals, scores).items():
        value = float(column[position])
        if not math.isnan(value):  # an unknown figure is left out, which fails every condition on it
            values[name] = value
    facts = CustomerFacts(
        paid_orders=int(figures.paid_orders[position]),
        scores={name: float(scores.score[name][position]) for name in SCORE_NAMES},
        figures=values,
    )
    raw = {name: float(scores.raw[name][position]) for name in SCORE_NAMES}
    return facts, raw


def used_figures(tiers: TiersConfig) -> frozenset[str]:
    """The figures any rule or text reads: those the conditions name, and occasions ("3 purchases so far")."""
    named = {condition.figure for tier in tiers.tier for condition in tier.conditions if condition.figure}
    return frozenset(named | {"occasions"})


def decide(
    tiers: TiersConfig, facts: CustomerFacts, raw: dict[str, float], cutoffs: dict[str, list[float]]
) -> Decision:
    return evaluate(tiers, facts, ValueTranslator(cutoffs, tiers.scoring, raw))


def decide_chunk(
    tiers: TiersConfig,
    population: tuple[Figures, ReferralFigures, Scores, dict[str, list[float]]],
    start: int,
    stop: int,
) -> DecisionColumns:
    """``decide`` for the customers ``start:stop`` of a population at once, reading only the figures the rules use:
    the full run's inner loop."""
    figures, referrals, scores, cutoffs = population
    window = slice(start, stop)
    columns = fact_columns(figures, referrals, scores)
    raw = {name: scores.raw[name][window].tolist() for name in SCORE_NAMES}
    return evaluate_columns(
        tiers,
        figures.paid_orders[window],
        {name: scores.score[name][window] for name in SCORE_NAMES},
        {name: columns[name][window] for name in used_figures(tiers)},
        ChunkValueTranslator(cutoffs, tiers.scoring, raw),
    )


def progress_json(progress: Progress) -> dict[str, Any]:
    return {
        "next_tier": progress.next_tier,
        "text": progress.text,
        "missing": [{"figure": m.figure, "needed": _needed(m)} for m in progress.missing],
    }


def _needed(missing: Missing) -> str | float:
    if missing.figure in _MONEY_FIGURES:
        return format_money(Decimal(str(missing.needed)))
    return missing.needed


_MONEY_FIGURES = frozenset({"net_spend", "average_order_value", "referred_revenue", "predicted_value"})


class ProgressTexts:
    """``json.dumps(progress_json(progress))`` for the rows of one chunk, the same text assembled from pieces each
    encoded once: the next tier, each missing item, and whole progress objects that many customers share (prospects,
    the top tier). The progress objects must outlive this: they are told apart by identity. ``items`` may be kept
    from chunk to chunk of a run (amounts recur across chunks)."""

    def __init__(self, items: dict[tuple[str, float], str] | None = None) -> None:
        self._texts: dict[int, str] = {}
        self._tiers: dict[str | None, str] = {}
        self._items = {} if items is None else items

    def text(self, progress: Progress) -> str:
        text = self._texts.get(id(progress))
        if text is None:
            tier = self._tiers.get(progress.next_tier)
            if tier is None:
                tier = self._tiers[progress.next_tier] = json.dumps(progress.next_tier)
            items = ", ".join([self._item(missing) for missing in progress.missing])
            # The layout of json.dumps with its default separators; a string alone is what json.dumps makes of it
            # (ASCII, escaped), without the encoder object's own dispatch for every customer.
            text = f'{{"next_tier": {tier}, "text": {encode_basestring_ascii(progress.text)}, "missing": [{items}]}}'
            self._texts[id(progress)] = text
        return text

    def _item(self, missing: Missing) -> str:
        key = (missing.figure, missing.needed)
        # 0.0 and -0.0 are one key but may read differently ("-0.00"): zero is encoded every time.
        text = self._items.get(key) if missing.needed else None
        if text is None:
            text = self._items[key] = (
                f'{{"figure": {json.dumps(missing.figure)}, "needed": {json.dumps(_needed(missing))}}}'
            )
        return text


MONEY_SCORE_COLUMNS = frozenset({"net_spend", "lifetime_spend", "average_order_value"})
INSTANT_SCORE_COLUMNS = frozenset({"first_purchase_at", "last_purchase_at"})


def score_columns(
    figures: Figures, referrals: ReferralFigures, scores: Scores, positions: slice
) -> dict[str, NDArray[Any]]:
    """The customer_score columns of a run of customers, computed from the population's arrays.

    Money is a float in currency units and instants are microseconds since the epoch; NaN stands for NULL (the
    purchase dates and days since the last order of a customer without a paid order).
    """
    scored = figures.occasions[positions] > 0

    def when_scored(values: NDArray[Any]) -> NDArray[np.float64]:
        return np.where(scored, values, np.nan)

    return {
        "value_score": scores.score["value"][positions],
        "frequency_score": scores.score["frequency"][positions],
        "influence_score": scores.score["influence"][positions],
        "paid_orders": figures.paid_orders[positions],
        "occasions": figures.occasions[positions],
        "orders_in_window": figures.orders_in_window[positions],
        "net_spend": figures.net_spend[positions],
        "lifetime_spend": figures.lifetime_spend[positions],
        "average_order_value": figures.average_order_value[positions],
        "first_purchase_at": when_scored(figures.first_day[positions] * MICROS_PER_DAY),
        "last_purchase_at": when_scored(figures.last_day[positions] * MICROS_PER_DAY),
        "days_since_last": when_scored(figures.days_since_last[positions]),
        "frequency": figures.frequency[positions].astype(np.int64),
        "recency_days": figures.recency[positions],
        "age_days": figures.age[positions],
        "mean_repeat_spend": figures.mean_repeat_spend[positions],
        "expected_purchases": scores.expected_purchases[positions],
        "p_alive": scores.p_alive[positions],
        "expected_spend": scores.expected_spend[positions],
        "predicted_value": scores.predicted_value[positions],
        "converted_referrals": referrals.converted_referrals[positions],
        "referred_revenue": referrals.referred_revenue[positions],
        "reviews": figures.reviews[positions],
        "shares": figures.shares[positions],
    }


def score_rows(
    figures: Figures,
    referrals: ReferralFigures,
    scores: Scores,
    interests: Mapping[int, list[dict[str, Any]]],
    as_of: datetime,
    computed_at: datetime,
    run_ids: Mapping[int, int | None],
) -> list[dict[str, Any]]:
    """The customer_score rows of a whole scored population, for the ORM (the real-time path).

    The columns are computed once for everyone and read back as Python values a column at a time: computed per
    customer, their thirty-odd array operations on slices of one cost more than the rest of that customer's
    placement. ``interests`` and ``run_ids`` (the run of a stored score) are by customer; absent means none.
    """
    ids = figures.customer_id.tolist()
    rows: list[dict[str, Any]] = [
        {
            "customer_id": customer_id,
            "run_id": run_ids.get(customer_id),
            "as_of": as_of,
            "computed_at": computed_at,
            "interests": interests.get(customer_id, []),
        }
        for customer_id in ids
    ]
    for name, column in score_columns(figures, referrals, scores, slice(None)).items():
        values = column.tolist()
        if name in MONEY_SCORE_COLUMNS:
            values = [_money(value) for value in values]
        else:
            # NaN stands for NULL; an instant is then microseconds since the epoch.
            instant = name in INSTANT_SCORE_COLUMNS
            values = [
                None
                if isinstance(value, float) and math.isnan(value)
                else EPOCH + timedelta(microseconds=value)
                if instant
                else value
                for value in values
            ]
        for row, value in zip(rows, values, strict=True):
            row[name] = value
    return rows


def tier_row(
    customer_id: int, assignment: Assignment, decision: Decision, pin_reason: str | None, now: datetime
) -> dict[str, Any]:
    """One customer_tier row; a pin that expired is cleared with its reason."""
    return {
        "customer_id": customer_id,
        "tier": assignment.tier,
        "since": assignment.since,
        "qualified_tier": decision.tier,
        "below_since": assignment.below_since,
        "explanation": decision.explanation,
        "progress": progress_json(decision.progress),
        "pinned_tier": assignment.pinned_tier,
        "pinned_until": assignment.pinned_until,
        "pin_reason": kept_pin_reason(assignment, pin_reason),
        "updated_at": now,
    }


def kept_pin_reason(assignment: Assignment, pin_reason: str | None) -> str | None:
    """The stored pin reason while the pin is kept; an expired pin is cleared with its reason."""
    return pin_reason if assignment.pinned_tier is not None else None


@dataclass(frozen=True)
class Placement:
    """A customer's new tier with the rows that record it."""

    previous_tier: str | None
    assignment: Assignment
    tier: dict[str, Any]
    history: dict[str, Any] | None


# The stored customer_tier fields the rules and the row writers read (see state_from_row), for both run kinds.
TIER_STATE_COLUMNS = (
    CustomerTier.tier,
    CustomerTier.since,
    CustomerTier.below_since,
    CustomerTier.pinned_tier,
    CustomerTier.pinned_until,
    CustomerTier.pin_reason,
    CustomerTier.updated_at,
)


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
    stored: Any,
    *,
    now: datetime,
    allow_downgrade: bool,
    history_run_id: int | None,
) -> Placement:
    """Apply the rules to one customer of a scored population: the full run and the real-time path share this.

    Its score row is ``score_rows``', made for the whole population at once.
    """
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
        tier=tier_row(customer_id, assignment, decision, pin_reason, now),
        history=history,
    )


def _money(value: float) -> Decimal:
    return Decimal(str(round(float(value), 4)))
