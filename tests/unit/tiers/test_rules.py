"""Tier rules: conditions, the shipped rules, explanations, progress, and assignment with grace and pins."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loyalty.tiers.config import TiersConfig, load_tiers, parse_tiers
from loyalty.tiers.rules import (
    Assignment,
    CustomerFacts,
    Decision,
    Missing,
    Progress,
    TierState,
    assign,
    decide_tier,
    describe_rule,
    evaluate,
    evaluate_many,
    phrase_missing,
    progress_for,
    rank,
    rank_many,
    tier_order,
)

SHIPPED = Path(__file__).resolve().parents[3] / "config" / "tiers.toml"
NOW = datetime(2026, 11, 24, tzinfo=UTC)
NEW = TierState(tier=None, since=None, below_since=None, pinned_tier=None, pinned_until=None)


@pytest.fixture(scope="module")
def shipped() -> TiersConfig:
    return load_tiers(SHIPPED)


def config_with(*, vip: dict[str, Any] | None = None, nurture: dict[str, Any] | None = None) -> TiersConfig:
    """VIP and Insider with the given rules above a catch-all Member tier and Guest."""
    tiers: list[dict[str, Any]] = []
    if vip is not None:
        tiers.append({"id": "vip", "name": "VIP", "grace_days": 30, **vip})
    if nurture is not None:
        tiers.append({"id": "nurture", "name": "Insider", "grace_days": 14, **nurture})
    tiers += [{"id": "one_time", "name": "Member"}, {"id": "prospect", "name": "Guest"}]
    return parse_tiers({"tier": tiers})


def facts(paid_orders: int = 1, scores: dict[str, float] | None = None, **figures: float) -> CustomerFacts:
    return CustomerFacts(paid_orders=paid_orders, scores=scores or {}, figures=figures)


def state(tier: str | None, **fields: Any) -> TierState:
    values: dict[str, Any] = {"since": NOW - timedelta(days=100), "below_since": None}
    values |= {"pinned_tier": None, "pinned_until": None} | fields
    return TierState(tier=tier, **values)


# --- Conditions ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "customer", "qualifies"),
    [
        ({"score": "value", "gte": 80}, facts(scores={"value": 80}), True),
        ({"score": "value", "gte": 80}, facts(scores={"value": 79.99}), False),
        ({"score": "frequency", "lte": 20}, facts(scores={"frequency": 20}), True),
        ({"score": "frequency", "lte": 20}, facts(scores={"frequency": 20.5}), False),
        ({"score": "influence", "eq": 0}, facts(scores={"influence": 0}), True),
        ({"score": "influence", "eq": 0}, facts(scores={"influence": 0.5}), False),
        ({"figure": "net_spend", "gte": 200}, facts(net_spend=200), True),
        # Float sums a hair under the threshold still meet it.
        ({"figure": "net_spend", "gte": 200}, facts(net_spend=199.99999999997), True),
        ({"figure": "net_spend", "gte": 200}, facts(net_spend=199.99), False),
        ({"figure": "days_since_last", "lte": 30}, facts(days_since_last=30), True),
        ({"figure": "days_since_last", "lte": 30}, facts(days_since_last=30.5), False),
        ({"figure": "occasions", "eq": 1}, facts(occasions=1), True),
        ({"figure": "occasions", "eq": 1}, facts(occasions=1.0000000000002), True),
        ({"figure": "occasions", "eq": 1}, facts(occasions=2), False),
        ({"figure": "occasions", "gte": 2, "lte": 4}, facts(occasions=4), True),
        ({"figure": "occasions", "gte": 2, "lte": 4}, facts(occasions=5), False),
        ({"figure": "occasions", "gte": 2, "lte": 4}, facts(occasions=1), False),
        # Absent or NaN: the condition fails, whichever comparison.
        ({"figure": "reviews", "gte": 0}, facts(), False),
        ({"figure": "days_since_last", "lte": 30}, facts(), False),
        ({"figure": "days_since_last", "lte": 30}, facts(days_since_last=math.nan), False),
        ({"score": "value", "lte": 100}, facts(), False),
    ],
)
def test_each_comparison(condition: dict[str, Any], customer: CustomerFacts, qualifies: bool) -> None:
    config = config_with(vip={"all": [condition]})
    assert evaluate(config, customer).tier == ("vip" if qualifies else "one_time")
    assert decide_tier(config, customer) == ("vip" if qualifies else "one_time")


ANY_OR_ALL = [{"score": "value", "gte": 80}, {"figure": "reviews", "gte": 3}]


@pytest.mark.parametrize(
    ("combinator", "value", "reviews", "tier"),
    [
        ("any", 85, 0, "vip"),
        ("any", 10, 3, "vip"),
        ("any", 10, 2, "one_time"),
        ("all", 85, 3, "vip"),
        ("all", 85, 2, "one_time"),
        ("all", 10, 3, "one_time"),
    ],
)
def test_any_needs_one_all_needs_every(combinator: str, value: float, reviews: float, tier: str) -> None:
    config = config_with(vip={combinator: ANY_OR_ALL})
    assert evaluate(config, facts(scores={"value": value}, reviews=reviews)).tier == tier


def test_empty_condition_list_matches_every_paying_customer() -> None:
    config = config_with(vip={"any": [{"score": "value", "gte": 80}]}, nurture={"all": []})
    decision = evaluate(config, facts(scores={"value": 1}))
    assert decision.tier == "nurture"
    assert decision.matched == ()


def test_first_matching_tier_in_file_order_wins() -> None:
    config = config_with(
        vip={"any": [{"figure": "occasions", "gte": 2}]}, nurture={"any": [{"figure": "occasions", "gte": 1}]}
    )
    assert evaluate(config, facts(occasions=5)).tier == "vip"
    assert evaluate(config, facts(occasions=1)).tier == "nurture"


def test_no_paid_order_is_prospect_whatever_the_figures() -> None:
    config = config_with(vip={"any": [{"score": "value", "gte": 0}]})
    decision = evaluate(config, facts(0, {"value": 99}, occasions=3))
    assert decision.tier == "prospect"
    assert decision.matched == ()


def test_prospect_exists_even_when_the_file_leaves_it_out() -> None:
    config = parse_tiers({"tier": [{"id": "one_time", "name": "Member"}]})
    decision = evaluate(config, facts(0))
    assert decision.tier == "prospect"
    assert decision.explanation == "Prospect: no paid order yet"
    assert rank(config, "prospect") == 1


# --- The shipped rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("customer", "tier"),
    [
        (facts(4, {"value": 80, "frequency": 50, "influence": 0}, occasions=4), "vip"),
        (facts(1, {"value": 10, "influence": 90}, occasions=1), "vip"),
        (facts(2, {"value": 40, "influence": 0}, occasions=2), "nurture"),
        (facts(1, {"value": 55, "influence": 0}, occasions=1), "nurture"),
        (facts(1, {"value": 30, "influence": 0}, occasions=1), "one_time"),
        # Two orders on one day are one purchase occasion.
        (facts(2, {"value": 30, "influence": 0}, occasions=1), "one_time"),
        (facts(0, {"value": 0, "influence": 0}, occasions=0), "prospect"),
    ],
)
def test_shipped_rules(shipped: TiersConfig, customer: CustomerFacts, tier: str) -> None:
    assert evaluate(shipped, customer).tier == tier


def test_rank_and_rule_text(shipped: TiersConfig) -> None:
    assert tier_order(shipped) == ("vip", "nurture", "one_time", "prospect")
    assert [rank(shipped, tier) for tier in ("vip", "nurture", "one_time", "prospect")] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="gold"):
        rank(shipped, "gold")
    assert [describe_rule(tier) for tier in shipped.tier] == [
        "value score ≥ 80 or influence score ≥ 90",
        "purchase occasions ≥ 2 or value score ≥ 50",
        "any other customer with a paid order",
        "no paid order yet",
    ]


def test_rule_text_for_each_kind_of_condition() -> None:
    config = config_with(
        vip={
            "all": [
                {"figure": "net_spend", "gte": 200},
                {"figure": "days_since_last", "lte": 30},
                {"figure": "occasions", "gte": 2, "lte": 5},
                {"figure": "reviews", "eq": 1},
                {"score": "frequency", "gte": 40.5},
            ]
        }
    )
    vip = config.get("vip")
    assert vip is not None
    assert describe_rule(vip) == (
        "net spend ≥ 200.00 and days since the last order ≤ 30 and purchase occasions between 2 and 5"
        " and reviews = 1 and frequency score ≥ 40.5"
    )


# --- Explanations -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("customer", "explanation"),
    [
        (facts(5, {"value": 86, "influence": 10}, occasions=5), "VIP: value score 86 ≥ 80"),
        (
            facts(5, {"value": 86.5, "influence": 95}, occasions=5),
            "VIP: value score 86.5 ≥ 80 and influence score 95 ≥ 90",
        ),
        (facts(3, {"value": 20, "influence": 0}, occasions=3), "Insider: 3 purchase occasions ≥ 2"),
        (facts(1, {"value": 55, "influence": 0}, occasions=1), "Insider: value score 55 ≥ 50"),
        (facts(1, {"value": 30, "influence": 0}, occasions=1), "Member: one purchase so far"),
        (facts(0), "Guest: no paid order yet"),
    ],
)
def test_explanations_on_the_shipped_rules(shipped: TiersConfig, customer: CustomerFacts, explanation: str) -> None:
    assert evaluate(shipped, customer).explanation == explanation


def test_explanations_format_money_and_counts() -> None:
    config = config_with(
        vip={"all": [{"figure": "net_spend", "gte": 200}, {"figure": "converted_referrals", "gte": 1}]},
        nurture={"any": [{"figure": "days_since_last", "lte": 30}]},
    )
    assert evaluate(config, facts(net_spend=240.5, converted_referrals=1)).explanation == (
        "VIP: net spend 240.50 ≥ 200.00 and 1 converted referral ≥ 1"
    )
    assert evaluate(config, facts(days_since_last=12)).explanation == "Insider: 12 days since the last order ≤ 30"
    assert evaluate(config, facts(3, occasions=2)).explanation == "Member: 2 purchases so far"
    # Without the occasions figure, paid orders tell how many purchases there were.
    assert evaluate(config, facts(1)).explanation == "Member: one purchase so far"


def test_matched_lists_the_conditions_that_held(shipped: TiersConfig) -> None:
    decision = evaluate(shipped, facts(3, {"value": 60}, occasions=3))
    assert [condition.subject for condition in decision.matched] == ["occasions", "value"]


# --- Progress -----------------------------------------------------------------------------------------------------


def test_progress_from_member_offers_either_way_up(shipped: TiersConfig) -> None:
    progress = evaluate(shipped, facts(1, {"value": 30, "influence": 0}, occasions=1)).progress
    assert progress == Progress(
        "nurture",
        "place 1 more order or raise your value score from 30 to 50",
        (Missing("occasions", 1.0), Missing("value_score", 20.0)),
    )


def test_progress_from_insider_to_vip_in_score_points(shipped: TiersConfig) -> None:
    progress = evaluate(shipped, facts(3, {"value": 62, "influence": 40}, occasions=3)).progress
    assert progress.next_tier == "vip"
    assert progress.text == "raise your value score from 62 to 80 or raise your influence score from 40 to 90"
    assert progress.missing == (Missing("value_score", 18.0), Missing("influence_score", 50.0))


def test_top_tier_and_prospect_progress(shipped: TiersConfig) -> None:
    assert evaluate(shipped, facts(5, {"value": 90}, occasions=5)).progress == Progress(None, "top tier reached", ())
    assert evaluate(shipped, facts(0)).progress == Progress(
        "one_time", "place a first order", (Missing("occasions", 1.0),)
    )


def test_progress_any_joins_with_or_and_rounds_up() -> None:
    config = config_with(vip={"any": [{"figure": "net_spend", "gte": 200}, {"figure": "occasions", "gte": 3.5}]})
    progress = evaluate(config, facts(1, net_spend=80.004, occasions=1)).progress
    # 119.996 short is 120.00 to spend; 2.5 occasions short is 3 whole orders.
    assert progress.text == "spend 120.00 more or place 3 more orders"
    assert progress.missing == (Missing("net_spend", 120.0), Missing("occasions", 3.0))


def test_progress_all_lists_only_what_is_unmet() -> None:
    config = config_with(
        vip={
            "all": [
                {"figure": "net_spend", "gte": 200},
                {"figure": "converted_referrals", "gte": 2},
                {"figure": "reviews", "gte": 1},
                {"figure": "shares", "gte": 5},
            ]
        }
    )
    progress = evaluate(config, facts(2, net_spend=250, converted_referrals=1, reviews=0, shares=5)).progress
    assert progress.text == "refer 1 more friend who buys and write 1 more review"
    assert progress.missing == (Missing("converted_referrals", 1.0), Missing("reviews", 1.0))


def test_progress_on_an_upper_bound() -> None:
    config = config_with(vip={"all": [{"figure": "days_since_last", "lte": 30}, {"figure": "occasions", "gte": 2}]})
    progress = evaluate(config, facts(2, days_since_last=40, occasions=2)).progress
    assert progress.text == "place an order"
    assert progress.missing == (Missing("days_since_last", -10.0),)


def test_progress_on_an_unknown_figure_names_the_rule() -> None:
    config = config_with(vip={"all": [{"figure": "days_since_last", "lte": 30}]})
    progress = evaluate(config, facts(1)).progress
    assert progress.text == "needs days since the last order ≤ 30"
    assert progress.missing == (Missing("days_since_last", 30.0),)


def test_progress_on_a_lower_score_bound_and_a_missing_score() -> None:
    config = config_with(vip={"all": [{"score": "frequency", "lte": 20}, {"score": "value", "gte": 70}]})
    progress = evaluate(config, facts(1, {"frequency": 62})).progress
    assert progress.text == "lower your frequency score from 62 to 20 and raise your value score to 70"
    assert progress.missing == (Missing("frequency_score", -42.0), Missing("value_score", 70.0))


class SpendTranslator:
    """Stands in for the scoring module: value in money, nothing to offer for the other scores."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, float]] = []

    def missing_for_score(self, score: str, target: float, facts: CustomerFacts) -> Missing | None:
        self.asked.append((score, target))
        return Missing("net_spend", 120.0) if score == "value" else None

    def phrase(self, missing: Missing) -> str:
        return phrase_missing(missing)


def test_a_translator_words_score_gaps_and_falls_back_to_score_points(shipped: TiersConfig) -> None:
    translator = SpendTranslator()
    progress = evaluate(shipped, facts(3, {"value": 62, "influence": 40}, occasions=3), translator).progress
    assert translator.asked == [("value", 80.0), ("influence", 90.0)]
    assert progress.text == "spend 120.00 more or raise your influence score from 40 to 90"
    assert progress.missing == (Missing("net_spend", 120.0), Missing("influence_score", 50.0))


class AlwaysSpendTranslator(SpendTranslator):
    def missing_for_score(self, score: str, target: float, facts: CustomerFacts) -> Missing | None:
        return Missing("net_spend", 120.0)


def test_the_same_action_twice_is_listed_once() -> None:
    config = config_with(vip={"any": [{"score": "value", "gte": 80}, {"score": "frequency", "gte": 80}]})
    progress = evaluate(config, facts(1, {"value": 10, "frequency": 10}), AlwaysSpendTranslator()).progress
    assert progress.text == "spend 120.00 more"
    assert progress.missing == (Missing("net_spend", 120.0),)


def test_progress_for_a_stored_tier_other_than_the_decision(shipped: TiersConfig) -> None:
    customer = facts(1, {"value": 30}, occasions=1)
    assert progress_for(shipped, "vip", customer).text == "top tier reached"
    assert (
        progress_for(shipped, "nurture", customer).text
        == "raise your value score from 30 to 80 or raise your influence score to 90"
    )
    # Pinned below what the figures earn: the tier above is already within reach.
    assert progress_for(shipped, "one_time", facts(5, {"value": 60}, occasions=5)) == Progress(
        "nurture", "meets the rule for Insider", ()
    )


@pytest.mark.parametrize(
    ("missing", "text"),
    [
        (Missing("net_spend", 120.0), "spend 120.00 more"),
        (Missing("occasions", 2.0), "place 2 more orders"),
        (Missing("orders_in_window", 1.0), "place 1 more order"),
        (Missing("converted_referrals", 1.0), "refer 1 more friend who buys"),
        (Missing("converted_referrals", 2.0), "refer 2 more friends who buy"),
        (Missing("reviews", 1.0), "write 1 more review"),
        (Missing("shares", 3.0), "make 3 more social shares"),
        (Missing("referred_revenue", 50.0), "have the friends you referred spend 50.00 more"),
        (Missing("average_order_value", 12.5), "raise your average order value by 12.50"),
        (Missing("p_alive", 0.25), "raise your probability of being active by 0.25"),
        (Missing("days_since_last", -5.0), "place an order"),
        (Missing("expected_purchases", -0.5), "lower your expected purchases by 0.5"),
        (Missing("value_score", 18.0, current=62, target=80), "raise your value score from 62 to 80"),
        (Missing("value_score", 18.0), "raise your value score by 18"),
    ],
)
def test_phrases(missing: Missing, text: str) -> None:
    assert phrase_missing(missing) == text


# --- Many at once -------------------------------------------------------------------------------------------------


def random_facts(generator: random.Random) -> CustomerFacts:
    def maybe(value: float) -> float:
        roll = generator.random()
        return math.nan if roll < 0.05 else value

    scores = {
        name: maybe(generator.choice([0, 50, 79.99999999999, 80, 90, generator.uniform(0, 100)]))
        for name in ("value", "frequency", "influence")
    }
    figures = {
        "occasions": maybe(generator.randint(0, 4)),
        "net_spend": maybe(generator.choice([200.0, generator.uniform(0, 400)])),
        "days_since_last": maybe(generator.uniform(0, 60)),
    }
    return CustomerFacts(generator.randint(0, 3), scores, figures)


def test_evaluate_many_and_rank_many_agree_with_evaluate(shipped: TiersConfig) -> None:
    candidate = config_with(
        vip={"all": [{"figure": "net_spend", "gte": 200}, {"figure": "days_since_last", "lte": 30}]},
        nurture={"any": [{"figure": "occasions", "eq": 2}, {"score": "frequency", "gte": 50, "lte": 80}]},
    )
    generator = random.Random(7)
    customers = [random_facts(generator) for _ in range(2000)]
    for config in (shipped, candidate):
        one_by_one = [evaluate(config, customer) for customer in customers]
        assert list(evaluate_many(config, customers)) == one_by_one
        ranks = rank_many(
            config,
            [customer.paid_orders for customer in customers],
            {name: [customer.scores[name] for customer in customers] for name in ("value", "frequency", "influence")},
            {
                name: np.array([customer.figures[name] for customer in customers])
                for name in ("occasions", "net_spend", "days_since_last")
            },
        )
        order = tier_order(config)
        assert [order[r] for r in ranks.tolist()] == [decision.tier for decision in one_by_one]
        assert len({decision.tier for decision in one_by_one}) == 4


def test_rank_many_without_a_column_fails_its_conditions(shipped: TiersConfig) -> None:
    ranks = rank_many(shipped, [1, 1, 0], {"value": [90.0, 10.0, 90.0]}, {})
    assert ranks.tolist() == [0, 2, 3]


# --- Assignment ---------------------------------------------------------------------------------------------------


def decided(config: TiersConfig, customer: CustomerFacts) -> Decision:
    return evaluate(config, customer)


VIP_FACTS = facts(5, {"value": 86}, occasions=5)
INSIDER_FACTS = facts(3, {"value": 20}, occasions=3)
MEMBER_FACTS = facts(1, {"value": 30}, occasions=1)


def test_new_customer_gets_the_decision(shipped: TiersConfig) -> None:
    result = assign(shipped, NEW, decided(shipped, VIP_FACTS), NOW, allow_downgrade=False)
    assert result == Assignment("vip", NOW, None, True, "initial", "initial: value score 86 ≥ 80")


def test_upgrade_applies_at_once_even_in_real_time(shipped: TiersConfig) -> None:
    current = state("nurture", below_since=NOW - timedelta(days=3))
    result = assign(shipped, current, decided(shipped, VIP_FACTS), NOW, allow_downgrade=False)
    assert result == Assignment("vip", NOW, None, True, "upgrade", "upgrade: value score 86 ≥ 80")


def test_same_tier_is_unchanged_and_clears_the_grace_clock(shipped: TiersConfig) -> None:
    current = state("vip", below_since=NOW - timedelta(days=10))
    result = assign(shipped, current, decided(shipped, VIP_FACTS), NOW, allow_downgrade=True)
    assert (result.tier, result.kind, result.changed) == ("vip", "unchanged", False)
    assert result.since == current.since
    assert result.below_since is None


def test_first_time_below_starts_the_grace_period(shipped: TiersConfig) -> None:
    current = state("vip")
    result = assign(shipped, current, decided(shipped, INSIDER_FACTS), NOW, allow_downgrade=True)
    assert current.since is not None
    assert result == Assignment("vip", current.since, NOW, False, "held", "held in VIP: grace until 2026-12-24")


def test_within_grace_the_tier_is_held_and_the_clock_kept(shipped: TiersConfig) -> None:
    started = NOW - timedelta(days=29, hours=23)
    current = state("vip", below_since=started)
    result = assign(shipped, current, decided(shipped, INSIDER_FACTS), NOW, allow_downgrade=True)
    assert (result.tier, result.kind, result.changed, result.below_since) == ("vip", "held", False, started)
    assert result.reason == "held in VIP: grace until 2026-11-24 01:00 UTC"


def test_after_grace_a_full_recalculation_downgrades(shipped: TiersConfig) -> None:
    current = state("vip", below_since=NOW - timedelta(days=30))
    result = assign(shipped, current, decided(shipped, INSIDER_FACTS), NOW, allow_downgrade=True)
    assert result == Assignment(
        "nurture", NOW, None, True, "downgrade", "downgrade after 30-day grace: 3 purchase occasions ≥ 2"
    )


def test_real_time_never_downgrades(shipped: TiersConfig) -> None:
    current = state("vip", below_since=NOW - timedelta(days=300))
    result = assign(shipped, current, decided(shipped, MEMBER_FACTS), NOW, allow_downgrade=False)
    assert (result.tier, result.kind, result.changed) == ("vip", "held", False)
    assert result.below_since == current.below_since
    assert result.reason == "held in VIP: grace ended 2026-02-27, downgrade at the next full recalculation"


def test_grace_is_the_current_tiers(shipped: TiersConfig) -> None:
    # Insider keeps 14 days of grace, whatever VIP's is.
    current = state("nurture", below_since=NOW - timedelta(days=14))
    result = assign(shipped, current, decided(shipped, MEMBER_FACTS), NOW, allow_downgrade=True)
    assert (result.tier, result.kind) == ("one_time", "downgrade")
    assert result.reason == "downgrade after 14-day grace: one purchase so far"


def test_qualifying_again_during_grace_clears_it(shipped: TiersConfig) -> None:
    current = state("vip", below_since=NOW - timedelta(days=20))
    held = assign(shipped, current, decided(shipped, INSIDER_FACTS), NOW, allow_downgrade=True)
    assert held.below_since == current.below_since
    back = assign(shipped, current, decided(shipped, VIP_FACTS), NOW + timedelta(days=1), allow_downgrade=False)
    assert (back.tier, back.kind, back.below_since) == ("vip", "unchanged", None)


def test_no_paid_order_left_skips_grace_but_waits_for_a_full_run(shipped: TiersConfig) -> None:
    current = state("vip")
    nothing_left = decided(shipped, facts(0))
    real_time = assign(shipped, current, nothing_left, NOW, allow_downgrade=False)
    assert (real_time.tier, real_time.kind, real_time.below_since) == ("vip", "held", NOW)
    full = assign(shipped, current, nothing_left, NOW, allow_downgrade=True)
    assert full == Assignment("prospect", NOW, None, True, "downgrade", "downgrade without grace: no paid order yet")


def test_a_tier_without_grace_downgrades_on_the_first_full_run() -> None:
    config = parse_tiers(
        {
            "tier": [
                {"id": "nurture", "name": "Insider", "any": [{"figure": "occasions", "gte": 2}]},
                {"id": "one_time", "name": "Member"},
            ]
        }
    )
    result = assign(config, state("nurture"), decided(config, facts(1, occasions=1)), NOW, allow_downgrade=True)
    assert result == Assignment("one_time", NOW, None, True, "downgrade", "downgrade: one purchase so far")


def test_active_pin_wins(shipped: TiersConfig) -> None:
    until = datetime(2027, 1, 1, tzinfo=UTC)
    current = state("one_time", pinned_tier="vip", pinned_until=until)
    result = assign(
        shipped, current, decided(shipped, MEMBER_FACTS), NOW, allow_downgrade=False, pin_reason="press partner"
    )
    assert result == Assignment(
        "vip", NOW, None, True, "pinned", "pinned by marketing until 2027-01-01: press partner", "vip", until
    )
    # Once in the pinned tier, neither a higher nor a lower decision moves the customer.
    pinned = state("vip", pinned_tier="vip", pinned_until=until)
    for decision in (decided(shipped, MEMBER_FACTS), decided(shipped, facts(0))):
        kept = assign(shipped, pinned, decision, NOW, allow_downgrade=True)
        assert (kept.tier, kept.kind, kept.changed, kept.since) == ("vip", "unchanged", False, pinned.since)
        assert (kept.pinned_tier, kept.pinned_until) == ("vip", until)
    below = state("one_time", pinned_tier="one_time", pinned_until=until)
    assert assign(shipped, below, decided(shipped, VIP_FACTS), NOW, allow_downgrade=False).tier == "one_time"


def test_expired_pin_recomputes_at_once(shipped: TiersConfig) -> None:
    current = state("vip", pinned_tier="vip", pinned_until=NOW)
    result = assign(shipped, current, decided(shipped, MEMBER_FACTS), NOW, allow_downgrade=False)
    assert result == Assignment(
        "one_time", NOW, None, True, "pin_expired", "pin expired 2026-11-24: one purchase so far"
    )
    assert (result.pinned_tier, result.pinned_until) == (None, None)
    still = assign(shipped, current, decided(shipped, VIP_FACTS), NOW, allow_downgrade=False)
    assert (still.tier, still.kind, still.changed, still.pinned_tier) == ("vip", "unchanged", False, None)


def test_a_stored_tier_no_longer_configured_is_replaced() -> None:
    config = config_with(vip={"any": [{"score": "value", "gte": 80}]})
    result = assign(config, state("nurture"), decided(config, facts(1, {"value": 10})), NOW, allow_downgrade=False)
    assert (result.tier, result.kind, result.changed) == ("one_time", "downgrade", True)
    assert result.reason == "downgrade: nurture is no longer a configured tier; one purchase so far"


def test_since_when_never_stored(shipped: TiersConfig) -> None:
    current = TierState(tier="vip", since=None, below_since=None, pinned_tier=None, pinned_until=None)
    assert assign(shipped, current, decided(shipped, VIP_FACTS), NOW, allow_downgrade=False).since == NOW
