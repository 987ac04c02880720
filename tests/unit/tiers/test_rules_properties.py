"""Tier rules, as properties over generated configs, customers and stored states (PRODUCT.md, Tiers).

Scores, figures and thresholds are drawn on a grid (halves; whole numbers for counts), so a value is either exactly
on a threshold or at least 0.5 away from it: the documented meaning of a rule ("inclusive comparisons; an absent
figure fails") can then be stated plainly, without the float tolerance the rules add (it has its own test below).
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty.tiers.config import SCORES, Condition, Tier, TiersConfig, parse_tiers
from loyalty.tiers.rules import (
    PROSPECT,
    CustomerFacts,
    TierState,
    assign,
    decide_tier,
    evaluate,
    evaluate_many,
    rank,
    rank_many,
    tier_order,
)
from loyalty.tiers.services import _count as count_preview_move

halves = st.integers(0, 400).map(lambda k: k / 2)
counts = st.integers(0, 12).map(float)
# A few figures of each kind: counts of things are whole, money and days are not.
FIGURE_VALUES = {"occasions": counts, "reviews": counts, "net_spend": halves, "days_since_last": halves}
FIGURES = tuple(FIGURE_VALUES)
NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)

# Derandomized: the same examples on every run, so CI cannot flake; raise max_examples for a longer search.
PROPERTY = settings(max_examples=300, deadline=None, derandomize=True)

scores = st.integers(0, 200).map(lambda k: k / 2)  # 0-100


@st.composite
def conditions(draw: st.DrawFn, *, comparisons: tuple[str, ...] = ("gte", "lte", "eq", "range")) -> dict[str, Any]:
    if draw(st.booleans()):
        subject, values = {"score": draw(st.sampled_from(SCORES))}, scores
    else:
        figure = draw(st.sampled_from(FIGURES))
        subject, values = {"figure": figure}, FIGURE_VALUES[figure]
    comparison = draw(st.sampled_from(comparisons))
    if comparison == "range":
        low, high = sorted((draw(values), draw(values)))
        return {**subject, "gte": low, "lte": high}
    return {**subject, comparison: draw(values)}


@st.composite
def configs(
    draw: st.DrawFn, *, comparisons: tuple[str, ...] = ("gte", "lte", "eq", "range"), one_per_subject: bool = False
) -> TiersConfig:
    """A valid tiers config: some of the paying tiers in any order (the last without conditions), prospect
    anywhere in the file or left out, grace periods. ``one_per_subject``: no two conditions of a tier on the same
    score or figure (which could contradict each other: `occasions ≥ 2` and `occasions ≤ 1`)."""
    paying = draw(st.permutations(["vip", "nurture", "one_time"]))[: draw(st.sampled_from([1, 2, 3]))]
    tiers: list[dict[str, Any]] = []
    for position, tier_id in enumerate(paying):
        tier: dict[str, Any] = {"id": tier_id, "name": tier_id.title(), "grace_days": draw(st.integers(0, 60))}
        if position < len(paying) - 1:
            combinator = draw(st.sampled_from(["any", "all"]))
            subject = (lambda condition: condition.get("score") or condition["figure"]) if one_per_subject else None
            rule = st.lists(conditions(comparisons=comparisons), min_size=1, max_size=3, unique_by=subject)
            tier[combinator] = draw(rule)
        tiers.append(tier)
    if draw(st.booleans()):
        tiers.insert(draw(st.integers(0, len(tiers))), {"id": PROSPECT, "name": "Guest"})
    return parse_tiers({"tier": tiers})


@st.composite
def customers(draw: st.DrawFn) -> CustomerFacts:
    """Scores and figures on the grid, some absent and some NaN (both fail every condition on them)."""

    def measured(values: dict[str, st.SearchStrategy[float]]) -> dict[str, float]:
        present = draw(st.lists(st.sampled_from(list(values)), unique=True))
        return {name: draw(st.one_of(values[name], values[name], values[name], st.just(math.nan))) for name in present}

    return CustomerFacts(draw(st.integers(0, 4)), measured(dict.fromkeys(SCORES, scores)), measured(FIGURE_VALUES))


def holds(condition: Condition, customer: CustomerFacts) -> bool:
    """A condition's documented meaning: inclusive bounds on a known value."""
    value = (customer.scores if condition.score else customer.figures).get(condition.subject, math.nan)
    if math.isnan(value):
        return False
    if condition.eq is not None:
        return value == condition.eq
    return (condition.gte is None or value >= condition.gte) and (condition.lte is None or value <= condition.lte)


def qualifies(tier: Tier, customer: CustomerFacts) -> bool:
    results = [holds(condition, customer) for condition in tier.conditions]
    if not results:
        return True
    return any(results) if tier.combinator == "any" else all(results)


def columns(config: TiersConfig, people: list[CustomerFacts]) -> list[str]:
    """The tiers rank_many gives, from columns with NaN where a value is absent."""
    ranks = rank_many(
        config,
        [person.paid_orders for person in people],
        {name: [person.scores.get(name, math.nan) for person in people] for name in SCORES},
        {name: np.array([person.figures.get(name, math.nan) for person in people]) for name in FIGURES},
    )
    order = tier_order(config)
    return [order[r] for r in ranks.tolist()]


# --- Deciding -----------------------------------------------------------------------------------------------------


@PROPERTY
@given(config=configs(), customer=customers())
def test_every_customer_gets_exactly_one_tier_and_prospect_means_no_paid_order(
    config: TiersConfig, customer: CustomerFacts
) -> None:
    decision = evaluate(config, customer)
    assert decision.tier in tier_order(config)
    assert (decision.tier == PROSPECT) == (customer.paid_orders == 0)
    assert decide_tier(config, customer) == decision.tier


@PROPERTY
@given(config=configs(), customer=customers())
def test_the_first_tier_in_file_order_whose_rule_holds_wins(config: TiersConfig, customer: CustomerFacts) -> None:
    decision = evaluate(config, customer)
    if customer.paid_orders == 0:
        return
    paying = [tier for tier in config.tier if tier.id != PROSPECT]
    expected = next(tier for tier in paying if qualifies(tier, customer))
    assert decision.tier == expected.id
    # The explanation names exactly the conditions that held.
    assert list(decision.matched) == [condition for condition in expected.conditions if holds(condition, customer)]


@PROPERTY
@given(config=configs(), people=st.lists(customers(), min_size=1, max_size=40), seed=st.integers(0, 2**32))
def test_every_way_of_deciding_agrees_in_any_order(config: TiersConfig, people: list[CustomerFacts], seed: int) -> None:
    """One by one, lazily, columnar, and after shuffling the customers: the same tier for each customer."""
    one_by_one = [evaluate(config, person).tier for person in people]
    assert [decision.tier for decision in evaluate_many(config, people)] == one_by_one
    assert columns(config, people) == one_by_one
    shuffled = list(range(len(people)))
    random.Random(seed).shuffle(shuffled)
    assert columns(config, [people[i] for i in shuffled]) == [one_by_one[i] for i in shuffled]
    assert [evaluate(config, people[i]).tier for i in shuffled] == [one_by_one[i] for i in shuffled]


@PROPERTY
@given(
    config=configs(comparisons=("gte",)),
    customer=customers(),
    name=st.sampled_from(SCORES + FIGURES),
    raise_by=st.integers(0, 400).map(lambda k: k / 2),
)
def test_with_minimum_rules_more_never_means_a_lower_tier(
    config: TiersConfig, customer: CustomerFacts, name: str, raise_by: float
) -> None:
    """Where every condition is a minimum (`gte`), a higher score or figure (or a known one instead of none)
    never lowers the tier the rules give."""
    is_score = name in SCORES
    measured = dict(customer.scores if is_score else customer.figures)
    current = measured.get(name, math.nan)
    measured[name] = raise_by if math.isnan(current) else current + raise_by
    more = replace(customer, scores=measured) if is_score else replace(customer, figures=measured)
    assert rank(config, decide_tier(config, more)) <= rank(config, decide_tier(config, customer))


@PROPERTY
@given(config=configs(comparisons=("gte",)), people=st.lists(customers(), max_size=20), lower_by=halves)
def test_lowering_minimums_never_moves_anyone_down(
    config: TiersConfig, people: list[CustomerFacts], lower_by: float
) -> None:
    """A preview of easier rules (every `gte` lowered) moves customers up or nowhere."""
    data = config.model_dump(mode="json", exclude_none=True)
    for tier in data["tier"]:
        for condition in tier.get("any") or tier.get("all") or []:
            condition["gte"] = max(0.0, condition["gte"] - lower_by)
    easier = parse_tiers(data)
    for person in people:
        assert rank(easier, decide_tier(easier, person)) <= rank(config, decide_tier(config, person))


@PROPERTY
@given(config=configs(one_per_subject=True), customer=customers())
def test_doing_what_the_progress_says_reaches_the_next_tier(config: TiersConfig, customer: CustomerFacts) -> None:
    """Progress ("spend 120.00 more or place 2 more orders") names enough: doing all of it (for an `any` rule, any
    one of it) earns at least the tier it leads to. A figure that is not known yet is named with its target."""
    decision = evaluate(config, customer)
    progress = decision.progress
    if customer.paid_orders == 0 or progress.next_tier is None:
        return
    order = tier_order(config)
    assert progress.next_tier == order[rank(config, decision.tier) - 1]
    target = config.get(progress.next_tier)
    assert target is not None
    items = progress.missing[:1] if target.combinator == "any" else progress.missing
    scores_after, figures_after = dict(customer.scores), dict(customer.figures)
    for item in items:
        score = item.figure.removesuffix("_score")
        measured = scores_after if score != item.figure and score in SCORES else figures_after
        name = score if measured is scores_after else item.figure
        current = measured.get(name, math.nan)
        measured[name] = item.needed if math.isnan(current) else current + item.needed
    after = CustomerFacts(customer.paid_orders, scores_after, figures_after)
    assert rank(config, decide_tier(config, after)) <= rank(config, progress.next_tier), (progress, after)


def test_float_noise_a_billionth_under_a_threshold_still_meets_it() -> None:
    config = parse_tiers(
        {
            "tier": [
                {"id": "vip", "name": "VIP", "all": [{"figure": "net_spend", "gte": 200}]},
                {"id": "one_time", "name": "Member"},
            ]
        }
    )
    for value, tier in [(200 * (1 - 1e-10), "vip"), (0.1 + 0.2 + 199.7, "vip"), (200 * (1 - 1e-8), "one_time")]:
        assert decide_tier(config, CustomerFacts(1, {}, {"net_spend": value})) == tier


# --- Assigning ----------------------------------------------------------------------------------------------------

# Around now: just before and after, and days to months either side.
instants = st.sampled_from([-90, -30, -14, -1, -0.25, 0, 0.25, 1, 14, 30, 90]).map(lambda days: NOW + timedelta(days))


@st.composite
def stored_states(draw: st.DrawFn, config: TiersConfig) -> TierState:
    """What may be stored for a customer: no tier yet, or a tier of this config or of an earlier one (any stable
    id), with a grace clock and a pin that may be active, expired or name a tier no longer configured."""
    ids = st.sampled_from([None, "vip", "nurture", "one_time", PROSPECT])
    tier = draw(ids)
    pinned_tier = draw(ids)
    return TierState(
        tier=tier,
        since=None if tier is None else draw(st.none() | instants.filter(lambda at: at <= NOW)),
        below_since=None if tier is None else draw(st.none() | instants.filter(lambda at: at <= NOW)),
        pinned_tier=pinned_tier,
        pinned_until=None if pinned_tier is None else draw(instants),
    )


def configured(config: TiersConfig, tier_id: str | None) -> bool:
    return tier_id is not None and tier_id in tier_order(config)


@PROPERTY
@given(data=st.data(), customer=customers(), allow_downgrade=st.booleans())
def test_what_is_stored(data: st.DataObject, customer: CustomerFacts, allow_downgrade: bool) -> None:
    """Pins win while active; an expired pin gives way at once; upgrades apply at once; downgrades only in a full
    recalculation and after the grace period (none when no paid order is left); `since` moves with the tier."""
    config = data.draw(configs())
    current = data.draw(stored_states(config))
    decision = evaluate(config, customer)
    result = assign(config, current, decision, NOW, allow_downgrade=allow_downgrade)

    assert result.changed == (result.tier != current.tier)
    assert result.since == (NOW if result.changed else current.since or NOW)
    assert configured(config, result.tier)
    until = current.pinned_until
    pin_active = configured(config, current.pinned_tier) and (until is None or until > NOW)  # no end: never expires
    if pin_active:
        assert (result.tier, result.pinned_tier, result.pinned_until) == (
            current.pinned_tier,
            current.pinned_tier,
            current.pinned_until,
        )
        return
    assert (result.pinned_tier, result.pinned_until) == (None, None)
    if current.pinned_tier is not None and current.tier is not None:
        assert result.tier == decision.tier  # the pin was the reason for the stored tier: no grace to honour
        return
    if current.tier is None or not configured(config, current.tier):
        assert result.tier == decision.tier
        return
    before, decided = rank(config, current.tier), rank(config, decision.tier)
    if decided <= before:
        assert result.tier == decision.tier
        assert result.below_since is None
        return
    # A lower decision: held, except in a full recalculation once the grace period is over.
    held_in = config.get(current.tier)
    assert held_in is not None  # prospect is never above a decision
    grace = timedelta(days=0 if decision.tier == PROSPECT else held_in.grace_days)
    due = (current.below_since or NOW) + grace <= NOW
    assert result.tier == (decision.tier if allow_downgrade and due else current.tier)
    if result.tier == current.tier:
        assert result.below_since == (current.below_since or NOW)


@PROPERTY
@given(data=st.data(), customer=customers())
def test_the_preview_counts_each_customer_where_applying_the_config_puts_them(
    data: st.DataObject, customer: CustomerFacts
) -> None:
    """Previews skip grace periods (they show where the rules put customers) and keep pins in force; so where no
    grace holds anyone back, the preview's move is the change a full recalculation makes."""
    candidate = data.draw(configs())
    current = data.draw(stored_states(candidate))
    if current.tier is None:
        current = replace(current, pinned_tier=None, pinned_until=None)  # a pin is stored with the tier it sets
    else:
        current = replace(current, below_since=NOW - timedelta(days=3650))
    stored = None if current.tier is None else (current.tier, current.pinned_tier, current.pinned_until)
    counted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    count_preview_move(counted, candidate, stored, decide_tier(candidate, customer), NOW)
    [(source, targets)] = counted.items()
    [(target, one)] = targets.items()
    applied = assign(candidate, current, evaluate(candidate, customer), NOW, allow_downgrade=True)
    assert one == 1
    assert source == (current.tier or PROSPECT)
    assert target == applied.tier, (current, applied)


def test_a_pin_to_a_tier_the_candidate_drops_is_not_counted_as_held() -> None:
    """The preview counted a customer pinned to VIP as staying VIP under a config without VIP; applying it drops the
    pin and the rules decide (here: one paid order, so the catch-all tier)."""
    candidate = parse_tiers({"tier": [{"id": "one_time", "name": "Member"}]})
    pin = ("vip", "vip", NOW + timedelta(days=30))
    counted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    count_preview_move(counted, candidate, pin, decide_tier(candidate, CustomerFacts(1)), NOW)
    assert counted == {"vip": {"one_time": 1}}
