"""The full run's chunk of rows (``stage_chunk``, texts made column by column) against the per-customer path the
real-time re-score uses (``place_customer``, one customer at a time): the same rows, to the last character.

Populations mix prospects, NaN figures, raw scores that many customers share (the column path words each shared
value once), -0.0, empty and filled cut-off grids, scoring configs that reach every translator branch, and stored
rows with every situation ``assign`` knows: none, same tier, upgrades, grace, pins active, expired, without an end
or to a tier the config drops, stored tiers the config no longer defines, and rows re-scored after the run began.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty.db.models import CustomerTier
from loyalty.db.staging import stored_instant
from loyalty.recalc import staged
from loyalty.recalc.assignments import TIER_STATE_COLUMNS, ProgressTexts, place_customer, progress_json
from loyalty.recalc.full import _StoredState
from loyalty.scoring.config import InfluenceWeights, ScoringConfig
from loyalty.scoring.figures import Figures, ReferralFigures
from loyalty.scoring.scores import SCORE_NAMES, Scores
from loyalty.tiers.config import SCORES, TiersConfig, parse_tiers
from loyalty.tiers.rules import CustomerFacts, Missing, Progress, evaluate, evaluate_columns, tier_order
from tests.unit.tiers.test_rules_properties import NOW, configs, customers, stored_states

CHECK = settings(max_examples=150, deadline=None, derandomize=True)
STARTED = NOW - timedelta(minutes=5)

# Values repeat across customers on purpose (grid points, zero, -0.0), with arbitrary floats and NaN between them.
amounts = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, 2.0, 50.0, 199.99999999997, 200.0]),
    st.floats(0, 5000, allow_nan=False),
    st.just(math.nan),
)
percentiles = st.one_of(st.integers(0, 200).map(lambda k: k / 2), st.floats(0, 100), st.just(math.nan))
whole = st.integers(0, 6)


@st.composite
def populations(draw: st.DrawFn) -> tuple[Figures, ReferralFigures, Scores, dict[str, list[float]]]:
    size = draw(st.integers(1, 30))

    def column(values: st.SearchStrategy[Any], dtype: Any = np.float64) -> Any:
        return np.array(draw(st.lists(values, min_size=size, max_size=size)), dtype=dtype)

    paid = column(st.integers(0, 4), np.int64)
    occasions = np.where(paid > 0, column(whole, np.int64), 0)
    days = column(st.one_of(st.integers(19_000, 20_600).map(float), st.just(math.nan)))
    figures = Figures(
        customer_id=np.arange(1, size + 1, dtype=np.int64) * 7,
        occasions=occasions,
        paid_orders=paid,
        first_day=days,
        last_day=days + 3,
        lifetime_spend=column(amounts),
        net_spend=column(amounts),
        orders_in_window=column(whole, np.int64),
        repeat_spend=column(amounts),
        reviews=column(whole, np.int64),
        shares=column(whole, np.int64),
        as_of_day=20_700.0,
    )
    referrals = ReferralFigures(converted_referrals=column(whole, np.int64), referred_revenue=column(amounts))
    scores = Scores(
        expected_purchases=column(amounts),
        p_alive=column(st.floats(0, 1)),
        expected_spend=column(amounts),
        predicted_value=column(amounts),
        raw={name: column(amounts) for name in SCORE_NAMES},
        score={name: column(percentiles) for name in SCORE_NAMES},
    )
    cutoffs = {
        name: sorted(draw(st.lists(st.floats(0, 3000), max_size=12)) if draw(st.booleans()) else [])
        for name in SCORE_NAMES
    }
    return figures, referrals, scores, cutoffs


@st.composite
def tiers_configs(draw: st.DrawFn) -> TiersConfig:
    """A generated config with a scoring config that takes each way of wording a score gap."""
    config = draw(configs())
    scoring = ScoringConfig(
        value_blend=draw(st.sampled_from([0.5, 1.0])),
        influence=InfluenceWeights(converted_referral=draw(st.sampled_from([0.0, 1.0, 2.5]))),
    )
    return config.model_copy(update={"scoring": scoring})


@st.composite
def stored_rows(draw: st.DrawFn, config: TiersConfig) -> SimpleNamespace | None:
    if draw(st.integers(0, 4)) == 0:
        return None
    state = draw(stored_states(config))
    if state.tier is None:
        return None  # a customer_tier row always has a tier
    return SimpleNamespace(
        tier=state.tier,
        since=state.since or NOW - timedelta(days=40),
        below_since=state.below_since,
        pinned_tier=state.pinned_tier,
        pinned_until=state.pinned_until,
        pin_reason=draw(st.sampled_from([None, "", "summer campaign"])) if state.pinned_tier else None,
        updated_at=draw(st.sampled_from([STARTED - timedelta(days=1), STARTED, STARTED + timedelta(seconds=1)])),
    )


def reference_rows(
    context: staged.RunContext, start: int, stop: int, states: dict[int, Any]
) -> tuple[list[tuple[Any, ...]], list[int]]:
    """What the per-customer path stores, in the staged rows' form: tier row, then the history columns."""
    rows, kept = [], []
    population = (context.figures, context.referrals, context.scores, context.cutoffs)
    for position in range(start, stop):
        customer_id = int(context.figures.customer_id[position])
        stored = states.get(customer_id)
        if stored is not None and stored.updated_at > context.started_at:
            continue
        kept.append(customer_id)
        placement = place_customer(
            context.tiers,
            position,
            population,
            stored,
            now=context.now,
            allow_downgrade=True,
            history_run_id=context.run_id,
        )
        row = dict(placement.tier)
        row["progress"] = json.dumps(row["progress"])
        for name in ("since", "below_since", "pinned_until", "updated_at"):
            row[name] = stored_instant(context.postgres, row[name])
        assignment = placement.assignment
        history = (placement.previous_tier, assignment.changed, assignment.kind, assignment.reason)
        rows.append((*(row[name] for name in staged.TIER_COLUMNS), *history))
    return rows, kept


@CHECK
# NaN money in the generated figures is cast for the score rows, which only this test's populations carry.
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@given(data=st.data(), config=tiers_configs(), population=populations(), postgres=st.booleans())
def test_stage_chunk_stores_what_the_per_customer_path_stores(
    data: st.DataObject, config: TiersConfig, population: Any, postgres: bool
) -> None:
    figures, referrals, scores, cutoffs = population
    ids = figures.customer_id.tolist()
    states = {customer_id: data.draw(stored_rows(config)) for customer_id in ids}
    states = {customer_id: row for customer_id, row in states.items() if row is not None}
    context = staged.RunContext(
        tiers=config,
        figures=figures,
        referrals=referrals,
        scores=scores,
        cutoffs=cutoffs,
        interests={},
        run_id=3,
        as_of=NOW,
        now=NOW,
        started_at=STARTED,
        postgres=postgres,
    )
    start = data.draw(st.integers(0, len(ids) - 1))
    stop = data.draw(st.integers(start + 1, len(ids)))

    chunk = staged.stage_chunk(context, start, stop, states)

    expected, kept = reference_rows(context, start, stop, states)
    assert len(chunk.tiers) == len(expected)
    for got, want in zip(chunk.tiers, expected, strict=True):
        assert got == want
        assert [type(value) for value in got] == [type(value) for value in want]  # True is not 1, "" is not None
    assert chunk.scores["customer_id"].tolist() == kept


@CHECK
@given(config=configs(), people=st.lists(customers(), min_size=1, max_size=25), absent=st.sets(st.sampled_from(SCORES)))
def test_evaluate_columns_says_what_evaluate_says(config: TiersConfig, people: list[Any], absent: set[str]) -> None:
    """With the default translator too, and with score columns left out (every condition on them fails)."""
    figure_names = sorted({name for person in people for name in person.figures} | {"occasions"})
    columns = evaluate_columns(
        config,
        [person.paid_orders for person in people],
        {name: [person.scores.get(name, math.nan) for person in people] for name in SCORES if name not in absent},
        {name: np.array([person.figures.get(name, math.nan) for person in people]) for name in figure_names},
    )
    names = {tier.id: tier.name for tier in config.tier}
    for index, person in enumerate(people):
        scores = {name: value for name, value in person.scores.items() if name not in absent}
        decision = evaluate(config, type(person)(person.paid_orders, scores, person.figures))
        assert columns.tiers[index] == decision.tier
        assert columns.explanations[index] == decision.explanation
        assert columns.progress[index] == decision.progress
        assert [m.figure for m in columns.progress[index].missing] == [m.figure for m in decision.progress.missing]
        prefix = f"{names.get(decision.tier, 'Prospect')}: "
        assert columns.explanations[index] == prefix + columns.details[index]
    assert set(columns.tiers) <= set(tier_order(config))


def test_the_staged_tier_columns_are_every_column_of_customer_tier() -> None:
    assert sorted(staged.TIER_COLUMNS) == sorted(column.name for column in CustomerTier.__table__.columns)


def test_the_states_the_full_run_reads_from_the_driver_are_those_the_rules_read() -> None:
    assert _StoredState._fields == ("customer_id", *(column.key for column in TIER_STATE_COLUMNS))


@pytest.mark.parametrize("spends", [[0.0, -0.0, 0.0], [-0.0, 0.0, -0.0]])
def test_zero_and_negative_zero_are_worded_apart_as_one_by_one(spends: list[float]) -> None:
    """The column path words a value once for all customers who share it; 0.0 and -0.0 are equal keys that money
    formatting tells apart ("0.00", "-0.00")."""
    config = parse_tiers(
        {
            "tier": [
                {"id": "vip", "name": "VIP", "all": [{"figure": "net_spend", "lte": 10}]},
                {"id": "one_time", "name": "M"},
            ]
        }
    )
    people = [CustomerFacts(1, {}, {"net_spend": spend, "occasions": 1.0}) for spend in spends]
    columns = evaluate_columns(config, [1] * len(spends), {}, {"net_spend": spends, "occasions": [1.0] * len(spends)})
    assert columns.explanations == [evaluate(config, person).explanation for person in people]
    texts = ProgressTexts()
    progresses = [Progress("vip", "x", (Missing("net_spend", amount),)) for amount in spends]
    assert [texts.text(progress) for progress in progresses] == [json.dumps(progress_json(p)) for p in progresses]
